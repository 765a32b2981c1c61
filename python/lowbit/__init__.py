"""lowbit — extremely low-bit quantization of LLMs on a Rust core.

Public API (``DESIGN.md`` §3)::

    y = lowbit.hadamard(x)                       # any-size fast Hadamard transforms
    p = lowbit.pack(codes, bits=2)               # packed low-bit storage
    model = lowbit.quantize(model, "w4-gptq", calib=lowbit.data.calibration(tok))
    lowbit.save(model, "out/", tokenizer=tok)    # atomic, safetensors
    model = lowbit.load("out/")
    lowbit.eval.perplexity(model, lowbit.data.evaluation(tok))

The torch/transformers parts (``quantize``, ``save``, ``load``, ``data``, ``eval``, ``nn``) are
imported on first use, so ``import lowbit`` stays light.
"""

from __future__ import annotations

from . import _core, errors
from .errors import (
    AllocationError,
    CalibrationDataError,
    CheckpointError,
    DTypeError,
    KernelError,
    LowbitError,
    MissingPackageError,
    ShapeError,
    UnsupportedModelError,
    UnsupportedSizeError,
    ValueRangeError,
)
from .ops import (
    HadamardBlock,
    HadamardPlan,
    hadamard,
    hadamard_matrix,
    hadamard_plan,
    pack,
    pack_ternary,
    packed_size,
    random_hadamard,
    random_signs,
    unpack,
    unpack_ternary,
)

__version__ = "0.1.0"


_LAZY = {
    "quantize": ("lowbit.driver", "quantize"),
    "save": ("lowbit.io", "save"),
    "load": ("lowbit.io", "load"),
    "load_with_tokenizer": ("lowbit.io", "load_with_tokenizer"),
    "Recipe": ("lowbit.recipe", "Recipe"),
    "WeightQuant": ("lowbit.recipe", "WeightQuant"),
    "VectorQuant": ("lowbit.recipe", "VectorQuant"),
    "Rotate": ("lowbit.recipe", "Rotate"),
    "ActQuant": ("lowbit.recipe", "ActQuant"),
    "KVQuant": ("lowbit.recipe", "KVQuant"),
    "EmbedQuant": ("lowbit.recipe", "EmbedQuant"),
    "LowRank": ("lowbit.recipe", "LowRank"),
    "QuantizedKVCache": ("lowbit.kv.cache", "QuantizedKVCache"),
    "PRESETS": ("lowbit.recipe", "PRESETS"),
    "QuantLinear": ("lowbit.nn", "QuantLinear"),
    "VQLinear": ("lowbit.nn", "VQLinear"),
    "QuantEmbedding": ("lowbit.nn.quant_embedding", "QuantEmbedding"),
    "QuantHead": ("lowbit.nn.quant_embedding", "QuantHead"),
    "data": ("lowbit.data", None),
    "eval": ("lowbit.eval", None),
    "nn": ("lowbit.nn", None),
    "io": ("lowbit.io", None),
    "models": ("lowbit.models", None),
    "recipe": ("lowbit.recipe", None),
    "vq": ("lowbit.vq", None),
    "kernels": ("lowbit.kernels", None),
}


def __getattr__(name: str):
    """Import the torch-based parts of the API on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def set_num_threads(n: int) -> None:
    """Size the thread pool of the Rust kernels (0 = ``LOWBIT_NUM_THREADS`` or all cores).

    Raises:
        ValueRangeError: ``n`` is not an int in ``[0, 4096]``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
        raise ValueRangeError(f"n: the number of threads must be an int in [0, 4096], got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the Rust kernels run on."""
    return _core.get_num_threads()


__all__ = [
    "__version__",
    *errors.__all__,
    "HadamardBlock",
    "HadamardPlan",
    "hadamard",
    "hadamard_plan",
    "hadamard_matrix",
    "random_hadamard",
    "random_signs",
    "pack",
    "unpack",
    "packed_size",
    "pack_ternary",
    "unpack_ternary",
    "set_num_threads",
    "get_num_threads",
    *_LAZY,
]
