"""Packed checkpoints: save / load a model whose linears are :class:`~lowbit.nn.QuantLinear` (DESIGN §4).

Layout of a checkpoint folder (format_version 1)::

    config.json          the Hugging Face model config (``model.config.to_dict()``) plus
                         "quantization_config": {
                             "quant_method": "lowbit", "format_version": 1,
                             "recipe": [...],                      # as given by the caller
                             "layers": {"model.layers.0.self_attn.q_proj": {
                                 "in_features", "out_features", "bits", "group_size", "kind", "sym",
                                 "zero_const", "act_order", "bias", "method", "packing"},
                                 "model.layers.0.mlp.down_proj": {        # a VQLinear (QuIP#, RSAVQ)
                                     "format": "vq", "in_features", "out_features", "dim",
                                     "stages": [{"codebook", "k", "index_bits", "rows", "scale"}, ...],
                                     "incoherent", "bias", "method"}, ...},
                             "online": {                           # only when there are any
                                 "inputs": {"model.layers.0.mlp.down_proj": {"hadamard", "act"}, ...},
                                 "attention": {"model.layers.0.self_attn": {"rotate_qk", "kv"}, ...}}}
    model.safetensors    every tensor of ``model.state_dict()``, tied tensors once (the first name
                         in state-dict order, e.g. ``model.embed_tokens.weight``); a quantized linear
                         ``W`` stores ``W.qweight`` (uint8), ``W.scales`` (fp16), ``W.zeros`` (fp16,
                         asymmetric), ``W.perm`` (int64, act-order), ``W.bias``; a vector-quantized
                         one ``W.codes{s}`` (uint8), ``W.table{s}`` (fp16), ``W.rows{s}`` (int32),
                         ``W.row_scale`` (fp16), ``W.su``/``W.sv`` (uint8 sign bits); header metadata
                         ``{"format": "pt", "lowbit_format_version": "1"}``
    tokenizer files      when a tokenizer was given (``tokenizer.save_pretrained``)

A rotated model (QuaRot / SpinQuant) is stored with its rotations folded into the weights (and
``tie_word_embeddings`` false, since the head and embeddings differ); the online parts — Hadamards on
``down_proj`` inputs and on queries/keys, activation quantizers, KV quantizers with their calibrated
tensors (``…self_attn.lowbit_kv.*``) — are rebuilt by :func:`load` from ``"online"``.

Only JSON and safetensors are written or read: loading never unpickles and never runs remote code.

Saving is atomic: everything is written into a hidden temp folder beside ``out_dir`` (same
filesystem), fsynced, then renamed into place. Replacing an existing checkpoint (``overwrite=True``)
swaps the two folders with one ``renameat2(RENAME_EXCHANGE)`` where the OS offers it (Linux), else
renames the old folder aside first; either way a crash leaves the old checkpoint or the new one at
``out_dir`` (with the two-rename fallback, a crash between the renames leaves the old one as
``.<name>.lowbit-old-*`` beside it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from ..errors import CheckpointError
from ..grids.base import GRID_KINDS
from ..nn.quant_linear import PackingFormat, QuantLinear
from ..nn.vq_linear import VQLinear

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "save",
    "load",
    "load_with_tokenizer",
    "read_quantization_config",
]

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
QUANT_METHOD = "lowbit"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TMP_TAG = ".lowbit-tmp-"
_OLD_TAG = ".lowbit-old-"
_QUANT_TENSORS = {"qweight": torch.uint8, "scales": torch.float16, "zeros": torch.float16, "perm": torch.int64}

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------
# save


def save(
    model: nn.Module,
    out_dir: PathLike,
    *,
    quantization_config: Optional[dict] = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a transformers causal LM with :class:`QuantLinear` layers) to ``out_dir``.

    Args:
        model: a ``transformers.PreTrainedModel`` (it needs ``.config.to_dict()``).
        out_dir: the checkpoint folder to create.
        quantization_config: at least ``{"recipe": [...]}`` (JSON-serialisable); ``quant_method``,
            ``format_version`` and ``layers`` are filled in here (``layers`` from the QuantLinear
            modules found in the model; passing one is an error). ``None``: the recipe that
            :func:`lowbit.quantize` left on the model (``model.lowbit_recipe``).
        tokenizer: saved beside the weights with ``save_pretrained`` when given.
        overwrite: replace an existing checkpoint at ``out_dir`` (only a lowbit checkpoint or an
            empty folder is ever replaced).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: ``out_dir`` exists (without ``overwrite``), or is not a checkpoint to
            replace; a bad ``quantization_config``; a model that cannot be serialised.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if quantization_config is None:
        recipe = getattr(model, "lowbit_recipe", None)
        quantization_config = {"recipe": recipe.to_list() if recipe is not None else []}
    config = _config_json(model, quantization_config)
    tensors = _state_tensors(model)

    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise CheckpointError(f"out_dir: {str(out_dir)!r} already exists; pass overwrite=True to replace it")
        _check_replaceable(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_TMP_TAG}", dir=parent))
    try:
        _write_weights(tensors, tmp / WEIGHTS_NAME)
        _write_json(config, tmp / CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp, directory=True)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _config_json(model: nn.Module, quantization_config: dict) -> dict:
    if not isinstance(quantization_config, dict):
        raise CheckpointError(f"quantization_config: must be a dict, got {type(quantization_config).__name__}")
    qc = dict(quantization_config)
    if "layers" in qc:
        raise CheckpointError("quantization_config: 'layers' is filled in by lowbit.io.save; do not pass it")
    if qc.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
        raise CheckpointError(f"quantization_config.quant_method: must be {QUANT_METHOD!r}, got {qc['quant_method']!r}")
    if qc.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"quantization_config.format_version: save writes {FORMAT_VERSION}, got {qc['format_version']!r}")
    qc["quant_method"] = QUANT_METHOD
    qc["format_version"] = FORMAT_VERSION
    qc.setdefault("recipe", [])
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, VQLinear)):
            if mod.row_scale.is_meta if isinstance(mod, VQLinear) else mod.qweight.is_meta:
                raise CheckpointError(f"{name}: {type(mod).__name__} has no data (meta tensors)")
            layers[name] = mod.metadata()
    qc["layers"] = layers
    online = _online_config(model)
    if online:
        qc["online"] = online
    elif "online" in qc:
        raise CheckpointError("quantization_config: 'online' is filled in by lowbit.io.save; do not pass it")

    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise CheckpointError(f"model: needs a transformers config (model.config.to_dict()), got {type(model).__name__}")
    cfg = hf_config.to_dict()
    if "model_type" not in cfg or not cfg["model_type"]:
        raise CheckpointError(f"model.config: has no model_type ({type(hf_config).__name__})")
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = qc
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"quantization_config: not JSON-serialisable: {e}") from None
    return cfg


def _online_config(model: nn.Module) -> dict:
    """``{"inputs": {linear: InputTransform config}, "attention": {attn: attention config}}`` of the
    online transforms (Hadamards, activation and KV quantizers) attached to ``model``; ``{}`` if none."""
    from ..nn.attention import attention_config, is_installed
    from ..nn.online import input_transform_of

    inputs, attention = {}, {}
    for name, mod in model.named_modules():
        t = input_transform_of(mod)
        if t is not None:
            inputs[name] = t.config()
        if is_installed(mod):
            attention[name] = attention_config(mod)
    out = {}
    if inputs:
        out["inputs"] = inputs
    if attention:
        out["attention"] = attention
    return out


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, each shared tensor once (first name wins), contiguous on the CPU."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise CheckpointError(f"{name}: tensor has no data (meta device)")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue  # tied to seen[key]
        seen[key] = name
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: safetensors stores whole, unshared tensors
        out[name] = t
    return out


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", "lowbit_format_version": str(FORMAT_VERSION)})


def _write_json(obj: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # platforms that cannot open directories (Windows)
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a lowbit checkpoint or an empty folder."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CheckpointError(f"out_dir: {str(out_dir)!r} exists and is not a folder; not replacing it")
    if not any(out_dir.iterdir()):
        return
    try:
        with open(out_dir / CONFIG_NAME, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config", {})
        ok = isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"out_dir: {str(out_dir)!r} exists and is not a lowbit checkpoint; not replacing it even with overwrite=True"
        )


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out_dir: Path) -> None:
    parent = out_dir.parent
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        _fsync_path(parent, directory=True)
        return
    if _rename_exchange(tmp, out_dir):  # out_dir is new, tmp now holds the old checkpoint
        _fsync_path(parent, directory=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_OLD_TAG}", dir=parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _fsync_path(parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# load


def read_quantization_config(path: PathLike) -> dict:
    """The validated ``quantization_config`` of the checkpoint at ``path`` (no weights read)."""
    return _read_config(Path(path))[1]


def load(path: PathLike, *, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model saved by :func:`save`, with its :class:`QuantLinear` layers packed.

    The architecture comes from ``config.json`` (``transformers.AutoConfig.for_model`` +
    ``AutoModelForCausalLM.from_config``, parameters created on the meta device, no remote code);
    every tensor comes from ``model.safetensors``, checked strictly.

    Args:
        device: where the model is placed.
        dtype: float dtype of the unquantized parameters (embeddings, norms, biases, lm_head);
            QuantLinear storage keeps its own dtypes (uint8 codes, fp16 scales/zeros).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: a missing/unreadable ``config.json`` or ``model.safetensors``, an unknown
            ``quant_method``/``format_version``/``model_type``, a layer entry that does not fit the
            architecture, a missing or unexpected tensor, a tensor of the wrong shape or dtype. The
            message names the file, field or tensor.
    """
    path = Path(path)
    cfg, qc = _read_config(path)
    model = _build_model(cfg)
    _install_quant_layers(model, qc["layers"], dtype)
    _install_online(model, qc.get("online", {}))
    _load_tensors(model, path / WEIGHTS_NAME, dtype, device)
    model.to(device)
    model.eval()
    return model


def load_with_tokenizer(path: PathLike, *, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """:func:`load` plus the tokenizer saved beside the weights (``AutoTokenizer``, local files only)."""
    path = Path(path)
    model = load(path, device=device, dtype=dtype)
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        raise CheckpointError(f"tokenizer: no tokenizer files ({', '.join(names)}) in {str(path)!r}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise CheckpointError(f"tokenizer: cannot load the tokenizer in {str(path)!r}: {e}") from e
    return model, tok


def _read_config(path: Path) -> tuple[dict, dict]:
    if not path.is_dir():
        raise CheckpointError(f"path: {str(path)!r} is not a checkpoint folder")
    cfile = path / CONFIG_NAME
    try:
        with open(cfile, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{CONFIG_NAME}: missing in {str(path)!r}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{CONFIG_NAME}: cannot read {str(cfile)!r}: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{CONFIG_NAME}: must hold a JSON object, got {type(cfg).__name__}")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config: missing from {CONFIG_NAME} (not a lowbit checkpoint?)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {qc.get('quant_method')!r}")
    version = qc.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"quantization_config.format_version: unknown version {version!r}; this lowbit reads {SUPPORTED_FORMAT_VERSIONS}"
        )
    if not isinstance(qc.get("recipe", []), list):
        raise CheckpointError(f"quantization_config.recipe: must be a list, got {type(qc['recipe']).__name__}")
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"quantization_config.layers: must be an object, got {type(layers).__name__}")
    for name, meta in layers.items():
        _check_layer_meta(name, meta)
    return cfg, qc


_LAYER_FIELDS: dict[str, tuple[type, ...]] = {
    "in_features": (int,),
    "out_features": (int,),
    "bits": (int,),
    "group_size": (int,),
    "kind": (str,),
    "sym": (bool,),
    "zero_const": (int, float),
    "act_order": (bool,),
    "bias": (bool,),
    "method": (str,),
    "packing": (str,),
}


_VQ_FIELDS: dict[str, tuple[type, ...]] = {
    "in_features": (int,),
    "out_features": (int,),
    "dim": (int,),
    "stages": (list,),
    "incoherent": (bool,),
    "bias": (bool,),
    "method": (str,),
}


def _check_fields(where: str, meta: dict, fields: dict[str, tuple[type, ...]]) -> None:
    for field, types in fields.items():
        if field not in meta:
            raise CheckpointError(f"{where}.{field}: missing")
        v = meta[field]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise CheckpointError(f"{where}.{field}: must be {'/'.join(t.__name__ for t in types)}, got {v!r}")


def _check_layer_meta(name: str, meta: Any) -> None:
    where = f"quantization_config.layers[{name!r}]"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: must be an object, got {type(meta).__name__}")
    fmt = meta.get("format", "packed")
    if fmt == "vq":
        _check_fields(where, meta, _VQ_FIELDS)
        try:
            layer = VQLinear.from_metadata(meta, device="meta")
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        for s, spec in enumerate(meta["stages"]):
            if spec.get("index_bits", layer.stage_specs[s]["index_bits"]) != layer.stage_specs[s]["index_bits"]:
                raise CheckpointError(f"{where}.stages[{s}].index_bits: {spec['index_bits']!r} does not fit k={spec.get('k')}")
        return
    if fmt != "packed":
        raise CheckpointError(f"{where}.format: unknown layer format {fmt!r}; known: 'packed', 'vq'")
    _check_fields(where, meta, _LAYER_FIELDS)
    if meta["kind"] not in GRID_KINDS:
        raise CheckpointError(f"{where}.kind: unknown grid kind {meta['kind']!r}; known: {GRID_KINDS}")
    if meta["packing"] != PackingFormat.for_kind(meta["kind"]).value:
        raise CheckpointError(
            f"{where}.packing: {meta['packing']!r} is not the packing of kind {meta['kind']!r} "
            f"({PackingFormat.for_kind(meta['kind']).value!r})"
        )
    try:
        QuantLinear.from_metadata(meta, device="meta")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory, no init); buffers stay real so that
    computed non-persistent buffers (RoPE ``inv_freq``) are right. Ties made during construction
    survive: an already-meta parameter is registered as is."""
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _build_model(cfg: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model_type = kwargs.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{CONFIG_NAME}: model_type missing or invalid ({model_type!r})")
    kwargs.pop("auto_map", None)  # never resolve remote code
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{CONFIG_NAME}.model_type: cannot build config for {model_type!r}: {e}") from None
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{CONFIG_NAME}.model_type: no causal-LM architecture for {model_type!r}: {e}") from None
    return model


def _module(model: nn.Module, name: str, where: str) -> nn.Module:
    """``model.get_submodule(name)``, or a :class:`CheckpointError` naming the config entry ``where``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: the {type(model).__name__} architecture has no module {name!r}") from None


def _install_quant_layers(model: nn.Module, layers: dict, dtype: torch.dtype) -> None:
    for name, meta in layers.items():
        where = f"quantization_config.layers[{name!r}]"
        old = _module(model, name, where)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{where}: {name!r} is a {type(old).__name__}, not a Linear")
        if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
            raise CheckpointError(
                f"{where}: (in, out) = {(meta['in_features'], meta['out_features'])} but the architecture has "
                f"{(old.in_features, old.out_features)}"
            )
        if (old.bias is not None) != meta["bias"]:
            raise CheckpointError(f"{where}.bias: {meta['bias']} but the architecture's layer has bias={old.bias is not None}")
        cls: Any = VQLinear if meta.get("format") == "vq" else QuantLinear
        new = cls.from_metadata(meta, device="meta", bias_dtype=dtype)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, new)


def _install_online(model: nn.Module, online: Any) -> None:
    """Re-attach the online transforms recorded by :func:`_online_config` (before the tensors load,
    so a KV quantizer's calibrated buffers are expected and filled)."""
    from ..nn.online import InputTransform, attach_input_transform

    if not isinstance(online, dict) or set(online) - {"inputs", "attention"}:
        raise CheckpointError(f"quantization_config.online: must be an object with 'inputs'/'attention', got {online!r}")
    for section in ("inputs", "attention"):
        entries = online.get(section, {})
        if not isinstance(entries, dict):
            raise CheckpointError(f"quantization_config.online.{section}: must be an object, got {type(entries).__name__}")
        for name, cfg in entries.items():
            where = f"quantization_config.online.{section}[{name!r}]"
            mod = _module(model, name, where)
            try:
                if section == "inputs":
                    if not isinstance(mod, (nn.Linear, QuantLinear)):
                        raise CheckpointError(f"{where}: {name!r} is a {type(mod).__name__}, not a linear")
                    attach_input_transform(mod, InputTransform.from_config(cfg))
                else:
                    from ..models.adapters import get_adapter
                    from ..nn.attention import install_from_config

                    install_from_config(mod, cfg, get_adapter(model).rotary(model))
            except CheckpointError:
                raise
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointError(f"{where}: {e}") from None


def _load_tensors(model: nn.Module, file: Path, dtype: torch.dtype, device: Any) -> None:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{WEIGHTS_NAME}: missing in {str(file.parent)!r}")

    # Group state-dict names that are the same tensor (tied embeddings): a file holds one of them.
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)

    try:  # only the reading is wrapped: errors of the assignment (device OOM, …) are not "corrupt"
        f = safe_open(str(file), framework="pt", device="cpu")
        keys = set(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{WEIGHTS_NAME}: corrupt or truncated ({str(file)!r}): {e}") from None
    with f:
        unexpected = sorted(keys - expected.keys())
        if unexpected:
            raise CheckpointError(f"{WEIGHTS_NAME}: unexpected tensor(s) {_names(unexpected)} for this architecture")
        missing = [names[0] for names in groups.values() if not any(n in keys for n in names)]
        if missing:
            raise CheckpointError(f"{WEIGHTS_NAME}: missing tensor(s) {_names(missing)}")
        for names in groups.values():
            key = next(n for n in names if n in keys)
            try:
                t = f.get_tensor(key)
            except Exception as e:  # safetensors reports I/O and format errors with various types
                raise CheckpointError(f"{key}: cannot read it from {WEIGHTS_NAME}: {e}") from None
            _assign(model, names, key, t, expected[key], dtype, device)

    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:  # pragma: no cover - guarded by the missing-tensor check
            raise CheckpointError(f"{WEIGHTS_NAME}: missing tensor {name!r}")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _assign(model: nn.Module, names: list[str], key: str, t: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, device: Any) -> None:
    mod_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(mod_name) if mod_name else model
    if tuple(t.shape) != tuple(want.shape):
        hint = ""
        if isinstance(owner, QuantLinear) and leaf == "qweight":
            hint = f" ({owner.packing.value} packing of {owner.in_features} codes of {owner.bits} bits per row)"
        raise CheckpointError(f"{key}: shape {tuple(t.shape)} in {WEIGHTS_NAME}, expected {tuple(want.shape)}{hint}")
    if isinstance(owner, VQLinear) and leaf != "bias":
        if t.dtype != want.dtype:
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected {want.dtype}")
        if leaf.startswith("rows") and t.numel():
            r = t.long()
            if int(r.min()) < 0 or int(r.max()) >= owner.out_features or not bool((r[1:] > r[:-1]).all()):
                raise CheckpointError(f"{key}: row indices must be ascending and in 0..{owner.out_features - 1}")
        value = t.to(device)
    elif isinstance(owner, QuantLinear) and leaf in _QUANT_TENSORS:
        if t.dtype != _QUANT_TENSORS[leaf]:
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected {_QUANT_TENSORS[leaf]}")
        if leaf == "perm" and not torch.equal(torch.sort(t).values, torch.arange(t.numel())):
            raise CheckpointError(f"{key}: not a permutation of 0..{t.numel() - 1}")
        value = t.to(device)
    elif want.is_floating_point():
        if not t.is_floating_point():
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected a floating-point tensor")
        value = t.to(device=device, dtype=dtype)
    else:
        if t.dtype != want.dtype:
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected {want.dtype}")
        value = t.to(device)
    if isinstance(want, nn.Parameter):
        value = nn.Parameter(value, requires_grad=want.requires_grad and value.is_floating_point())
    for name in names:  # every alias gets the same object, so ties survive
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf in mod._parameters:
            mod._parameters[leaf] = value  # type: ignore[assignment]
        else:
            mod._buffers[leaf] = value
