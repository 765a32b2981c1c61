"""Packed checkpoints: save / load a model whose linears are :class:`~lowbit.nn.QuantLinear` (DESIGN §4).

Layout of a checkpoint folder (format_version 2)::

    config.json          the Hugging Face model config (``model.config.to_dict()``) plus
                         "quantization_config": {
                             "quant_method": "lowbit", "format_version": 2,
                             "recipe": [...],                      # as given by the caller
                             "layers": {"model.layers.0.self_attn.q_proj": {
                                 "in_features", "out_features", "bits", "group_size", "kind", "sym",
                                 "zero_const", "act_order", "bias", "method", "packing",
                                 "lowrank": {"rank"}},                # only with a low-rank branch
                                 "model.layers.0.mlp.down_proj": {        # a VQLinear (QuIP#, RSAVQ)
                                     "format": "vq", "in_features", "out_features", "dim",
                                     "stages": [{"codebook", "k", "index_bits", "rows", "scale"}, ...],
                                     "incoherent", "bias", "method"},
                                 "model.embed_tokens": {                  # a QuantEmbedding (EmbedQuant)
                                     "format": "embedding", "num_embeddings", "embedding_dim", "bits",
                                     "sym", "method", "packing"},
                                 "lm_head": {"format": "head", "in_features", "out_features", "bits",
                                     "sym", "method", "packing", "bias",
                                     "tied_to"}, ...},                     # "model.embed_tokens" or null
                             "online": {                           # only when there are any
                                 "inputs": {"model.layers.0.mlp.down_proj": {"hadamard", "act"}, ...},
                                 "attention": {"model.layers.0.self_attn": {"rotate_qk", "kv"}, ...}}}
    model.safetensors    every tensor of ``model.state_dict()``, tied tensors once (the first name
                         in state-dict order, e.g. ``model.embed_tokens.weight``); the unquantized
                         parameters (embeddings, norms, biases, a dense ``lm_head``) in float16 —
                         bfloat16 ones stay bfloat16, one whose finite values float16 cannot hold
                         keeps its dtype (``save(dense_dtype=...)`` chooses otherwise) —, buffers
                         (calibrated KV quantizers) in their own dtype; a quantized linear
                         ``W`` stores ``W.qweight`` (uint8), ``W.scales`` (fp16), ``W.zeros`` (fp16,
                         asymmetric), ``W.perm`` (int64, act-order), ``W.bias``; a vector-quantized
                         one ``W.codes{s}`` (uint8), ``W.table{s}`` (fp16), ``W.rows{s}`` (int32),
                         ``W.row_scale`` (fp16), ``W.su``/``W.sv`` (uint8 sign bits); either with a
                         low-rank branch (lowbit.nn.lowrank) also ``W.lowbit_lowrank.A`` / ``.B``
                         (fp16, like every unquantized parameter); a quantized
                         embedding or untied head ``E.qweight`` (uint8), ``E.scales``/``E.zeros``
                         (fp16, per row), a tied head nothing (it reads the embedding's); header metadata
                         ``{"format": "pt", "lowbit_format_version": "2",
                         "lowbit_description_sha256": ...}``
    tokenizer files      when a tokenizer was given (``tokenizer.save_pretrained``)
    lowbit_report.json   when a report was given: timings and statistics of the run (the only
                         file whose bytes differ between two runs of the same recipe and seed)
    lowbit_manifest.json what lowbit wrote: every file's size and SHA-256 (the report's only by
                         name), so an overwrite replaces only a folder that holds nothing else

**The description.** What :func:`load` builds is decided by three parts of ``config.json``: the
architecture keys its adapter allows (:meth:`~lowbit.models.adapters.Adapter.check_config`; every
other key, e.g. ``_attn_implementation`` or ``auto_map``, is ignored), ``layers`` and ``online``.
Their SHA-256 is stored in the weights file's header, so a config edited after saving (a flipped
``tie_word_embeddings``, a deleted ``online`` section) or paired with other weights is refused, not
loaded as a different model.

A rotated model (QuaRot / SpinQuant) is stored with its rotations folded into the weights (and
``tie_word_embeddings`` false, since the head and embeddings differ); the online parts — Hadamards on
``down_proj`` inputs and on queries/keys, activation quantizers, KV quantizers with their calibrated
tensors (``…self_attn.lowbit_kv.*``) — are rebuilt by :func:`load` from ``"online"``.

**Loading an untrusted checkpoint.** Only JSON and safetensors are read: loading never unpickles,
never runs remote code and never resolves hub kernels. Only regular files are read, JSON with a size
cap and strict parsing (:mod:`lowbit.io.untrusted`); every size in ``config.json`` is type- and
range-checked and the layer count checked against the tensors before any module is built; every
tensor is checked for name, shape, dtype and finiteness. Any violation is a :class:`CheckpointError`
naming the file, field or tensor.

**Saving** is atomic and never loses a user's file (:mod:`lowbit.io.publish`): the folder is
written beside ``out_dir`` and renamed into place in one step; without ``overwrite`` an existing
``out_dir`` is never touched (even one created while the save runs); with it, only a folder that
holds exactly what an earlier lowbit save wrote (its manifest) is replaced. The same model and
``quantization_config`` give byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from ..errors import CheckpointError, DTypeError, UnsupportedModelError, ValueRangeError
from ..nn.layer_formats import entry_format, format_of, layer_formats, stored_layer_classes
from ..nn.lowrank import CONFIG_KEY as LOWRANK_KEY
from ..nn.lowrank import LowRankBranch, attach_lowrank, lowrank_of
from ..nn.lowrank import check_config as check_lowrank_config
from .publish import publish, seal, staging
from .untrusted import check_folder_files, check_regular_file, read_json

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "save",
    "load",
    "load_with_tokenizer",
    "read_quantization_config",
    "read_report",
    "check_replaceable",
    "DENSE_DTYPES",
    "dense_storage_dtype",
    "round_to_storage",
]

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (2,)
QUANT_METHOD = "lowbit"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "lowbit_manifest.json"
REPORT_NAME = "lowbit_report.json"
_MANIFEST_FORMAT = "lowbit-manifest"
_MAX_MANIFEST_BYTES = 1 << 20
_DIGEST_KEY = "lowbit_description_sha256"
_MAX_FEATURES = 1 << 24

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the description: what load builds, and its digest


def _adapter(model_type: Any, where: str) -> Any:
    from ..models.adapters import adapter_for_type

    try:
        return adapter_for_type(model_type)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _description(model_type: str, arch: dict, qc: dict) -> dict:
    """Everything :func:`load` builds the model from (the recipe and report are informative only)."""
    return {
        "format_version": qc["format_version"],
        "model_type": model_type,
        "architecture": arch,
        "layers": qc["layers"],
        "online": qc.get("online", {}),
    }


def _digest(description: dict) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ----------------------------------------------------------------------------------------------
# save


def save(
    model: nn.Module,
    out_dir: PathLike,
    *,
    quantization_config: Optional[dict] = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    report: Optional[dict] = None,
    dense_dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write ``model`` (a transformers causal LM with :class:`QuantLinear` layers) to ``out_dir``.

    Args:
        model: a ``transformers.PreTrainedModel`` (it needs ``.config.to_dict()``) of an
            architecture lowbit can load (``lowbit.models.supported_model_types()``).
        out_dir: the checkpoint folder to create.
        quantization_config: at least ``{"recipe": [...]}`` (JSON-serialisable); ``quant_method``,
            ``format_version``, ``layers`` and ``online`` are filled in here (passing ``layers`` or
            ``online`` is an error). ``None``: the recipe that :func:`lowbit.quantize` left on the
            model (``model.lowbit_recipe``).
        tokenizer: saved beside the weights with ``save_pretrained`` when given.
        overwrite: replace an existing ``out_dir`` — only an empty folder or a checkpoint that
            holds nothing but what a lowbit save wrote (its ``lowbit_manifest.json``) is replaced.
        report: JSON-serialisable statistics of the run (timings, errors) for ``lowbit_report.json``;
            kept out of ``config.json`` so that the other files are byte-identical across runs.
        dense_dtype: the dtype of the unquantized parameters (embeddings, norms, biases, a dense
            ``lm_head``) in ``model.safetensors``: ``None`` — float16, bfloat16 for a bfloat16
            parameter —, ``torch.float16``, ``torch.bfloat16`` or ``torch.float32`` (exact for a
            float32 model). A parameter with a finite value the chosen dtype cannot hold keeps its
            own dtype (logged as a warning; see :func:`dense_storage_dtype`). Buffers (calibrated
            quantizer state) and the stored layers' tensors keep their dtypes.

    Returns:
        ``out_dir`` as an absolute :class:`~pathlib.Path`.

    Raises:
        CheckpointError: ``out_dir`` exists (without ``overwrite``; also when it appears while
            the save runs), or holds files lowbit did not write; a bad ``quantization_config``;
            a model that cannot be serialised or loaded back; the folder cannot be written (the
            message gives the OS reason: read-only, disk full, …). Nothing is left behind.
        DTypeError: ``dense_dtype`` is not one of the above.
    """
    dense_dtype = _check_dense_dtype(dense_dtype)
    out_dir = Path(os.path.abspath(out_dir))
    if quantization_config is None:
        recipe = getattr(model, "lowbit_recipe", None)
        quantization_config = {"recipe": recipe.to_list() if recipe is not None else []}
    config, digest = _config_json(model, quantization_config)
    if report is not None:
        _check_json("report", report)
    tensors = _state_tensors(model, dense_dtype)


    def write(tmp: Path) -> None:
        _write_weights(tensors, tmp / WEIGHTS_NAME, digest)
        _write_json(config, tmp / CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            _write_json(report, tmp / REPORT_NAME)

    publish_folder(out_dir, write, overwrite=overwrite, volatile=(REPORT_NAME,) if report is not None else ())
    return out_dir


def publish_folder(out_dir: Path, write: Any, *, overwrite: bool, volatile: tuple[str, ...] = ()) -> None:
    """Create ``out_dir`` (absolute) atomically: ``write(tmp)`` fills a staging folder, the manifest
    of what it wrote is added (``volatile`` files by name only), and the folder is published —
    replacing an existing ``out_dir`` only with ``overwrite`` and only if a lowbit save wrote it.

    Raises:
        CheckpointError: ``out_dir`` exists (without ``overwrite``, or holding files lowbit did not
            write); the folder cannot be written (the OS reason). Nothing is left behind.
    """
    if os.path.lexists(out_dir):
        if not overwrite:
            raise CheckpointError(f"out_dir: {str(out_dir)!r} already exists; pass overwrite=True to replace it")
        check_replaceable(out_dir)  # early, before writing; checked again under the lock at the swap
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with staging(out_dir) as tmp:
            write(tmp)
            _write_manifest(tmp, volatile=volatile)
            seal(tmp)
            publish(tmp, out_dir, overwrite=overwrite, replaceable=check_replaceable)
    except OSError as e:
        raise CheckpointError(f"out_dir: cannot write {str(out_dir)!r}: {e.strerror or e}") from e


def _check_json(where: str, obj: Any) -> str:
    """``obj`` as JSON text, or a :class:`CheckpointError` naming ``where``."""
    try:
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not JSON-serialisable: {e}") from None


def _config_json(model: nn.Module, quantization_config: dict) -> tuple[dict, str]:
    """``(config.json content, description digest)``, checked as :func:`load` will check them."""
    if not isinstance(quantization_config, dict):
        raise CheckpointError(f"quantization_config: must be a dict, got {type(quantization_config).__name__}")
    qc = dict(quantization_config)
    for key in ("layers", "online"):
        if key in qc:
            raise CheckpointError(f"quantization_config: {key!r} is filled in by lowbit.io.save; do not pass it")
    if qc.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
        raise CheckpointError(f"quantization_config.quant_method: must be {QUANT_METHOD!r}, got {qc['quant_method']!r}")
    if qc.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"quantization_config.format_version: save writes {FORMAT_VERSION}, got {qc['format_version']!r}")
    qc["quant_method"] = QUANT_METHOD
    qc["format_version"] = FORMAT_VERSION
    qc.setdefault("recipe", [])
    layers = {}
    for name, mod in model.named_modules():
        fmt = format_of(mod)
        if fmt is not None:
            if not fmt.has_data(mod):
                raise CheckpointError(f"{name}: {type(mod).__name__} has no data (meta tensors)")
            layers[name] = mod.metadata()
            branch = lowrank_of(mod)
            if branch is not None:  # the side branch's tensors are the layer's float parameters
                layers[name][LOWRANK_KEY] = branch.config()
    qc["layers"] = layers
    online = _online_config(model)
    if online:
        qc["online"] = online

    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise CheckpointError(f"model: needs a transformers config (model.config.to_dict()), got {type(model).__name__}")
    cfg = hf_config.to_dict()
    if "model_type" not in cfg or not cfg["model_type"]:
        raise CheckpointError(f"model.config: has no model_type ({type(hf_config).__name__})")
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = qc
    cfg = json.loads(_check_json("quantization_config", cfg))  # the digest is of what load parses back
    qc = cfg["quantization_config"]
    for name, meta in qc["layers"].items():
        _check_layer_meta(name, meta)
    arch = _adapter(cfg["model_type"], "model.config.model_type").check_config(cfg)
    return cfg, _digest(_description(cfg["model_type"], arch, qc))


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


#: the dtypes :func:`save` takes as ``dense_dtype``
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dense_dtype(dense_dtype: Any) -> Optional[torch.dtype]:
    if dense_dtype is not None and dense_dtype not in DENSE_DTYPES:
        raise DTypeError(f"dense_dtype: must be None or one of {DENSE_DTYPES}, got {dense_dtype!r}")
    return dense_dtype


def dense_storage_dtype(t: torch.Tensor, dense_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype the unquantized float parameter ``t`` is stored in by :func:`save`.

    Args:
        t: a float tensor of any shape (an embedding, norm, bias or dense head weight).
        dense_dtype: ``None``, the default policy — bfloat16 for a bfloat16 tensor, float16 for every
            other —, or one of :data:`DENSE_DTYPES` for every tensor.

    Returns:
        The chosen dtype; but ``t``'s own dtype when ``t`` holds a finite value that the chosen one
        turns into ±inf (``|x| > 65504`` in float16): an overflow is never stored silently.
    """
    target = _wanted_dtype(t, dense_dtype)
    if target == t.dtype or t.element_size() < torch.empty(0, dtype=target).element_size():
        return target
    if bool((torch.isfinite(t) & ~torch.isfinite(t.to(target))).any()):
        return t.dtype
    return target


def _wanted_dtype(t: torch.Tensor, dense_dtype: Optional[torch.dtype]) -> torch.dtype:
    if dense_dtype is not None:
        return dense_dtype
    return torch.bfloat16 if t.dtype == torch.bfloat16 else torch.float16


def _dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → the unquantized float parameters (every alias of a tied one): all float parameters
    but those of stored layers, except a stored layer's bias."""
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        fmt = format_of(mod)
        for leaf, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and (fmt is None or leaf == "bias"):
                out[f"{mod_name}.{leaf}" if mod_name else leaf] = p
    return out


@torch.no_grad()
def round_to_storage(model: nn.Module, dense_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Round ``model``'s unquantized float parameters, in place, to the values :func:`save` stores
    (:func:`dense_storage_dtype`), keeping their dtypes, so that ``load(save(model))`` gives the
    same logits as ``model``. :func:`lowbit.quantize` ends with it.

    Args:
        model: any module; stored layers' own tensors and every buffer are left as they are.
        dense_dtype: as :func:`save`'s.

    Returns:
        ``model``.

    Raises:
        DTypeError: ``dense_dtype`` is not ``None`` or one of :data:`DENSE_DTYPES`.
    """
    dense_dtype = _check_dense_dtype(dense_dtype)
    done: set[int] = set()
    for p in _dense_parameters(model).values():
        if id(p) in done or p.is_meta:
            continue
        done.add(id(p))
        target = dense_storage_dtype(p, dense_dtype)
        if target != p.dtype:
            p.copy_(p.to(target))
    return model


def _state_tensors(model: nn.Module, dense_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The state dict, each shared tensor once (first name wins), contiguous on the CPU; the
    unquantized parameters in their storage dtype (:func:`dense_storage_dtype`)."""
    dense = _dense_parameters(model)
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
        if name in dense:
            target, wanted = dense_storage_dtype(t, dense_dtype), _wanted_dtype(t, dense_dtype)
            if target != wanted:
                big = float(t[torch.isfinite(t)].abs().max())
                log.warning("%s: finite values up to %.6g overflow %s; stored as %s instead", name, big, wanted, target)
            t = t.to(target)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: safetensors stores whole, unshared tensors
        out[name] = t
    return out


def _write_weights(tensors: dict[str, torch.Tensor], path: Path, digest: str) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "lowbit_format_version": str(FORMAT_VERSION), _DIGEST_KEY: digest}
    save_file(tensors, str(path), metadata=metadata)
    _canonical_header(path)


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors header of ``path`` with its metadata keys sorted.

    safetensors keeps the metadata in a hash map, so its order (and the file's bytes) changes from
    run to run. The rewrite has the same length and leaves the tensor entries and data untouched.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        obj = json.loads(header)
        obj["__metadata__"] = dict(sorted(obj.get("__metadata__", {}).items()))
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # pragma: no cover - the same keys and values cannot grow
            raise CheckpointError(f"{WEIGHTS_NAME}: cannot rewrite its header in place")
        f.seek(8)
        f.write(text.ljust(n, b" "))


def _write_json(obj: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, volatile: tuple[str, ...]) -> None:
    """``lowbit_manifest.json``: the name, size and SHA-256 of every file in ``folder`` (``volatile``
    ones by name only), i.e. exactly what this save owns."""
    files, other = {}, []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            raise CheckpointError(f"out_dir: the tokenizer wrote {entry.name!r}, which is not a plain file; lowbit does not publish it")
        if entry.name in volatile:
            other.append(entry.name)
        else:
            p = Path(entry.path)
            files[entry.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    _write_json({"format": _MANIFEST_FORMAT, "version": 1, "files": files, "volatile": other}, folder / MANIFEST_NAME)


def _owned_files(folder: Path) -> Optional[set[str]]:
    """The file names the manifest in ``folder`` lists, or ``None`` when there is no valid one."""
    try:
        m = read_json(folder / MANIFEST_NAME, MANIFEST_NAME, _MAX_MANIFEST_BYTES)
    except CheckpointError:
        return None
    if not isinstance(m, dict) or m.get("format") != _MANIFEST_FORMAT:
        return None
    files, volatile = m.get("files"), m.get("volatile", [])
    if not isinstance(files, dict) or not isinstance(volatile, list):
        return None
    names = [*files, *volatile]
    if not all(isinstance(n, str) and n and "/" not in n and os.sep not in n and n not in (".", "..") for n in names):
        return None
    return set(names) | {MANIFEST_NAME}


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or a folder holding exactly what a lowbit save
    wrote (the files its manifest lists, or fewer).

    Raises:
        CheckpointError: ``out_dir`` is not a folder, has no valid ``lowbit_manifest.json``, or
            holds files or folders the manifest does not list (the message names them).
    """
    st = os.lstat(out_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"out_dir: {str(out_dir)!r} exists and is not a folder; not replacing it")
    entries = set(os.listdir(out_dir))
    if not entries:
        return
    owned = _owned_files(out_dir)
    if owned is None:
        raise CheckpointError(
            f"out_dir: {str(out_dir)!r} exists and is not a lowbit checkpoint (no valid {MANIFEST_NAME}); "
            "not replacing it even with overwrite=True"
        )
    extra = sorted(entries - owned)
    if extra:
        raise CheckpointError(
            f"out_dir: {str(out_dir)!r} holds {_names(extra)}, which lowbit did not write; not replacing it "
            "(move them out of the folder first)"
        )


# ----------------------------------------------------------------------------------------------
# load


@dataclass(frozen=True)
class _Checkpoint:
    """A checkpoint folder whose description has been read and checked (no tensor data read yet)."""

    path: Path
    config: dict
    qc: dict
    model_type: str
    arch: dict


def read_quantization_config(path: PathLike) -> dict:
    """The validated ``quantization_config`` of the checkpoint at ``path`` (the weights file's header
    is read to check the description; no tensor data is)."""
    return _open(Path(path)).qc


def read_report(path: PathLike) -> Optional[dict]:
    """The run report saved beside the checkpoint (``lowbit_report.json``), ``None`` if there is none.

    Raises:
        CheckpointError: the report exists but is not a regular file of valid JSON holding an object.
    """
    f = Path(path) / REPORT_NAME
    if not os.path.lexists(f):
        return None
    report = read_json(f, REPORT_NAME)
    if not isinstance(report, dict):
        raise CheckpointError(f"{REPORT_NAME}: must hold a JSON object, got {type(report).__name__}")
    return report


def load(path: PathLike, *, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model saved by :func:`save`, with its :class:`QuantLinear` layers packed.

    The architecture comes from the allow-listed keys of ``config.json`` (``AutoConfig.for_model`` +
    ``AutoModelForCausalLM.from_config``, parameters created on the meta device, no remote code);
    every tensor comes from ``model.safetensors``, checked strictly. See the module docstring for
    what is checked before anything is built.

    Args:
        device: where the model is placed.
        dtype: float dtype of the unquantized parameters (embeddings, norms, biases, lm_head; stored
            float16 by default, see :func:`save`'s ``dense_dtype``) and of a quantized embedding's
            output; the stored layers keep their own dtypes (uint8 codes, fp16 scales/zeros).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: a missing, non-regular, oversized or malformed ``config.json`` or
            ``model.safetensors``; an unknown ``quant_method``/``format_version``/``model_type``; a
            config value out of range; a description that does not match the weights; a layer
            entry that does not fit the architecture; a missing, unexpected, misshapen, mistyped
            or non-finite tensor. The message names the file, field or tensor.
    """
    ck = _open(Path(path))
    model = _build_model(ck.model_type, ck.arch)
    _install_quant_layers(model, ck.qc["layers"], dtype)
    _install_online(model, ck.qc.get("online", {}))
    _load_tensors(model, ck.path / WEIGHTS_NAME, dtype, device)
    model.to(device)
    model.eval()
    return model


def load_with_tokenizer(path: PathLike, *, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """:func:`load` plus the tokenizer saved beside the weights (``AutoTokenizer``, local files only).

    Every file in the folder must be a regular file or a folder (the tokenizer loader reads files
    lowbit does not list, and a FIFO among them would block it).
    """
    path = Path(path)
    model = load(path, device=device, dtype=dtype)
    from transformers import AutoTokenizer

    check_folder_files(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        raise CheckpointError(f"tokenizer: no tokenizer files ({', '.join(names)}) in {str(path)!r}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise CheckpointError(f"tokenizer: cannot load the tokenizer in {str(path)!r}: {e}") from e
    return model, tok


def _open(path: Path) -> _Checkpoint:
    """Read and check everything but the tensor data: config.json, the weights file's header, the
    description digest, the layer count."""
    if not path.is_dir():
        raise CheckpointError(f"path: {str(path)!r} is not a checkpoint folder")
    cfg, qc = _read_config(path)
    model_type = cfg.get("model_type")
    adapter = _adapter(model_type, f"{CONFIG_NAME}.model_type")
    arch = adapter.check_config(cfg)
    names, metadata = _read_header(path / WEIGHTS_NAME)
    if metadata.get("lowbit_format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{WEIGHTS_NAME}: header says lowbit_format_version {metadata.get('lowbit_format_version')!r}, "
            f"config.json says {FORMAT_VERSION}: the files come from different saves"
        )
    if metadata.get(_DIGEST_KEY) != _digest(_description(model_type, arch, qc)):
        raise CheckpointError(
            f"{CONFIG_NAME}: its model description (the architecture keys, quantization_config.layers and "
            f".online) is not the one {WEIGHTS_NAME} was saved with — the config was edited after saving, "
            "or belongs to other weights; re-save the model instead of editing config.json"
        )
    adapter.check_tensor_names(arch, names)
    return _Checkpoint(path, cfg, qc, model_type, arch)


def _read_header(file: Path) -> tuple[list[str], dict]:
    """``(tensor names, header metadata)`` of a safetensors file (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    check_regular_file(file, WEIGHTS_NAME)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{WEIGHTS_NAME}: corrupt or truncated ({str(file)!r}): {e}") from None


def _read_config(path: Path) -> tuple[dict, dict]:
    cfg = read_json(path / CONFIG_NAME, CONFIG_NAME)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{CONFIG_NAME}: must hold a JSON object, got {type(cfg).__name__}")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config: missing from {CONFIG_NAME} (not a lowbit checkpoint?)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {qc.get('quant_method')!r}")
    version = qc.get("format_version")
    if version == 1:
        raise CheckpointError(
            "quantization_config.format_version: 1 was written by an earlier lowbit without a checked "
            "description of the model; quantize and save the model again with this version"
        )
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
    online = qc.get("online", {})
    if not isinstance(online, dict) or set(online) - {"inputs", "attention"}:
        raise CheckpointError(f"quantization_config.online: must be an object with 'inputs'/'attention', got {str(online)[:200]}")
    for section in ("inputs", "attention"):
        if not isinstance(online.get(section, {}), dict):
            raise CheckpointError(f"quantization_config.online.{section}: must be an object, got {type(online[section]).__name__}")
    return cfg, qc


def _check_fields(where: str, meta: dict, fields: dict[str, tuple[type, ...]], sizes: tuple = ("in_features", "out_features")) -> None:
    for field, types in fields.items():
        if field not in meta:
            raise CheckpointError(f"{where}.{field}: missing")
        v = meta[field]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise CheckpointError(f"{where}.{field}: must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
    for field in sizes:  # sizes bound before any module is built from them
        if not 1 <= meta[field] <= _MAX_FEATURES:
            raise CheckpointError(f"{where}.{field}: must be in [1, {_MAX_FEATURES}], got {meta[field]!r}")


def _check_layer_meta(name: str, meta: Any) -> None:
    """Check one ``quantization_config.layers`` entry against its registered format."""
    where = f"quantization_config.layers[{name!r}]"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: must be an object, got {type(meta).__name__}")
    fmt = entry_format(meta)
    if fmt is None:
        known = ", ".join(repr(n) for n in layer_formats())
        raise CheckpointError(f"{where}.format: unknown layer format {meta.get('format')!r}; known: {known}")
    _check_fields(where, meta, fmt.fields, fmt.size_fields)
    try:
        fmt.check_metadata(meta)
        if LOWRANK_KEY in meta:
            if fmt.role != "linear":
                raise ValueRangeError(f"{LOWRANK_KEY}: a {fmt.name!r} layer has no low-rank branch (decoder linears do)")
            check_lowrank_config(meta[LOWRANK_KEY], meta)
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



def _build_model(model_type: str, arch: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(model_type, **arch)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as e:  # transformers' own checks raise many kinds; the values came from the file
        raise CheckpointError(f"{CONFIG_NAME}: cannot build a {model_type!r} model from it: {type(e).__name__}: {e}") from None
    return model


def _module(model: nn.Module, name: str, where: str) -> nn.Module:
    """``model.get_submodule(name)``, or a :class:`CheckpointError` naming the config entry ``where``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: the {type(model).__name__} architecture has no module {name!r}") from None


def _install_quant_layers(model: nn.Module, layers: dict, dtype: torch.dtype) -> None:
    """Replace each architecture module a ``layers`` entry names by an empty stored layer (its
    format says what it may replace), then run the formats' ``link`` hooks (a tied head)."""
    installed = []
    for name, meta in layers.items():
        where = f"quantization_config.layers[{name!r}]"
        old = _module(model, name, where)
        fmt: Any = entry_format(meta)  # checked by _check_layer_meta
        problem = fmt.replaces(name, old, meta)
        if problem:
            raise CheckpointError(f"{where}: {problem}")
        new = fmt.module.from_metadata(meta, device="meta", bias_dtype=dtype)
        if LOWRANK_KEY in meta:  # checked by _check_layer_meta; A and B load with the other tensors
            attach_lowrank(new, LowRankBranch(meta["in_features"], meta["out_features"], meta[LOWRANK_KEY]["rank"], device="meta"))
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, new)
        installed.append((where, fmt, new, meta))
    for where, fmt, new, meta in installed:
        if fmt.link is not None:
            try:
                fmt.link(model, new, meta)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{where}: {e}") from None


def _install_online(model: nn.Module, online: Any) -> None:
    """Re-attach the online transforms recorded by :func:`_online_config` (before the tensors load,
    so a KV quantizer's calibrated buffers are expected and filled)."""
    from ..nn.online import InputTransform, attach_input_transform

    for section in ("inputs", "attention"):  # the structure was checked by _read_config
        for name, cfg in online.get(section, {}).items():
            where = f"quantization_config.online.{section}[{name!r}]"
            mod = _module(model, name, where)
            try:
                if section == "inputs":
                    if not isinstance(mod, (nn.Linear, *stored_layer_classes())):
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
    """Assign every tensor of ``file`` (already checked to be a regular safetensors file by
    :func:`_open`) to ``model``, checked by name, shape, dtype and finiteness."""
    from safetensors import SafetensorError, safe_open

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
            stored = [n for n in names if n in keys]
            if len(stored) > 1:  # one would silently win over the other
                raise CheckpointError(
                    f"{WEIGHTS_NAME}: {_names(stored)} are stored separately, but the architecture ties them "
                    "(config.json's tie_word_embeddings)"
                )
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
    fmt = format_of(owner)
    if tuple(t.shape) != tuple(want.shape):
        hint = fmt.shape_hint(owner, leaf) if fmt is not None and fmt.shape_hint is not None else ""
        raise CheckpointError(f"{key}: shape {tuple(t.shape)} in {WEIGHTS_NAME}, expected {tuple(want.shape)}{hint}")
    if fmt is not None and leaf != "bias":  # a stored layer's own tensors keep their dtypes
        problem = fmt.check_tensor(owner, leaf, t, want)
        if problem:
            raise CheckpointError(f"{key}: {problem} ({WEIGHTS_NAME})")
        value = t.to(device)
    elif want.is_floating_point():
        if not t.is_floating_point():
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected a floating-point tensor")
        value = t.to(device=device, dtype=dtype)
    else:
        if t.dtype != want.dtype:
            raise CheckpointError(f"{key}: dtype {t.dtype} in {WEIGHTS_NAME}, expected {want.dtype}")
        value = t.to(device)
    if t.is_floating_point():
        _check_finite(key, t, leaf in getattr(owner, "infinite_buffers", ()))
    if isinstance(want, nn.Parameter):
        value = nn.Parameter(value, requires_grad=want.requires_grad and value.is_floating_point())
    for name in names:  # every alias gets the same object, so ties survive
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf in mod._parameters:
            mod._parameters[leaf] = value  # type: ignore[assignment]
        else:
            mod._buffers[leaf] = value


def _check_finite(key: str, t: torch.Tensor, infinities_ok: bool) -> None:
    """Refuse NaN anywhere and ±inf unless the owning module declares the buffer may hold them."""
    bad = torch.isnan(t) if infinities_ok else ~torch.isfinite(t)
    if bool(bad.any()):
        first = t[bad].flatten()[0].item()
        count = int(bad.sum())
        raise CheckpointError(f"{key}: holds {count} non-finite value(s) (first: {first}) in {WEIGHTS_NAME}")
