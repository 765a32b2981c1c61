"""lowbit's CUDA kernels (``cuda/*.cu``, compiled at run time by NVRTC through CuPy).

* :mod:`~lowbit.kernels.uniform` — packed 2/3/4/8-bit (and 1-bit, ternary) weight × activation for
  1–16 rows (GEMV / skinny GEMM), fp32 accumulation, fp16/bf16/fp32 in and out;
* :mod:`~lowbit.kernels.vq` — the same for QuIP#'s E8P codebook (with an E81B or E8P residual stage);
* :mod:`~lowbit.kernels.hadamard` — the fused fast Walsh–Hadamard transform (sizes ``K·2^m``).

``QuantLinear`` / ``VQLinear`` use them for CUDA inputs; CPU inputs stay on the Rust core. Every
kernel has a CPU reference (numpy emulations of the kernels' arithmetic and torch decoders of the
GPU layouts), and :func:`compile_all` compiles every kernel to PTX without a GPU.
"""

from __future__ import annotations

import os

import torch

from . import _runtime
from ._runtime import CUDA_DIR, compile_ptx, cuda_ready, cupy_available, nvrtc_options, source_path

__all__ = [
    "CUDA_DIR",
    "compile_ptx",
    "compile_all",
    "cuda_ready",
    "cupy_available",
    "nvrtc_options",
    "source_path",
    "KERNEL_BUILDS",
    "kernels_enabled",
    "runs_on_kernels",
]

def kernels_enabled() -> bool:
    """CUDA forwards of the quantized layers use the kernels: CUDA and CuPy are present and the
    environment does not say ``LOWBIT_CUDA_KERNELS=0`` (then they decode a dense weight on the GPU)."""
    return os.environ.get("LOWBIT_CUDA_KERNELS", "1") != "0" and cuda_ready()


def runs_on_kernels(x: torch.Tensor) -> bool:
    """A forward of ``x`` takes the kernels: a float16/bfloat16/float32 tensor on the kernels'
    device (CUDA) with the kernels enabled (:func:`kernels_enabled`)."""
    return x.dtype in _runtime.DTYPE_CODES and _runtime.on_device(x) and kernels_enabled()


#: Every (source, defines, extern "C" kernel names) the library compiles; :func:`compile_all` and
#: the tests cover exactly this list.
KERNEL_BUILDS: list[tuple[str, dict, tuple[str, ...]]] = [
    ("uniform_gemm.cu", {"LOWBIT_BITS": bits, "LOWBIT_DTYPE": dt, "LOWBIT_BT": bt}, ("uniform_gemm_kernel",))
    for bits in (2, 3, 4, 8)
    for dt in (0, 1, 2)
    for bt in (1, 2, 4, 8, 16)
] + [
    ("vq_gemm.cu", {"LOWBIT_STAGE2": st, "LOWBIT_DTYPE": dt, "LOWBIT_BT": bt}, ("vq_gemm_kernel",))
    for st in (0, 1, 2)
    for dt in (0, 1, 2)
    for bt in (1, 2, 4, 8, 16)
] + [("fwht.cu", {"LOWBIT_DTYPE": dt}, ("fwht_r1", "fwht_r2", "fwht_r4")) for dt in (0, 1, 2)]


def compile_all(arch: str = "compute_90") -> dict[tuple[str, tuple], int]:
    """Compile every entry of :data:`KERNEL_BUILDS` to PTX (no GPU needed); returns PTX sizes.

    Raises :class:`~lowbit.errors.KernelError` on the first source that does not compile or lacks
    one of its kernels.
    """
    from ..errors import KernelError

    sizes = {}
    for name, defines, funcs in KERNEL_BUILDS:
        ptx = compile_ptx(name, defines, arch)
        for f in funcs:
            if f".entry {f}(" not in ptx:
                raise KernelError(f"{name} {defines}: kernel {f!r} is missing from the PTX")
        sizes[(name, tuple(sorted(defines.items())))] = len(ptx)
    return sizes
