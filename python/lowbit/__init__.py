"""lowbit — extremely low-bit quantization of LLMs on a Rust core.

Public API (see ``DESIGN.md`` §3): any-size Hadamard transforms and low-bit packing today;
quantization methods, checkpoints and the CLI grow on top of them.
"""

from __future__ import annotations

from . import _core, errors
from .errors import (
    CheckpointError,
    DTypeError,
    LowbitError,
    ShapeError,
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


def set_num_threads(n: int) -> None:
    """Size the thread pool of the Rust kernels (0 = ``LOWBIT_NUM_THREADS`` or all cores)."""
    _core.set_num_threads(int(n))


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
]
