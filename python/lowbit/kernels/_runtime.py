"""Finding, compiling and launching lowbit's CUDA kernels.

The ``.cu`` sources live in ``lowbit/kernels/cuda/`` (shipped inside the wheel; the repository's
top-level ``cuda/`` is a link to that folder). They are compiled at run time by NVRTC:

* on a CUDA machine through :class:`cupy.RawModule` (one module per source and ``-D`` defines, cached
  per device), and launched on torch's current stream with raw device pointers — no copies, no
  conversion of the torch tensors;
* anywhere, GPU or not, through :func:`compile_ptx` (NVRTC via NVIDIA's ``cuda-bindings``, which
  torch's CUDA wheels already install), so a test can compile every kernel to PTX on a CPU-only
  machine and a syntax error never reaches a user.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import DTypeError, KernelError, ShapeError

__all__ = [
    "CUDA_DIR",
    "source_path",
    "nvrtc_options",
    "compile_ptx",
    "cupy_available",
    "cuda_ready",
    "on_device",
    "get_kernel",
    "launch",
    "ptr",
    "run_matmul",
    "DTYPE_CODES",
    "dtype_code",
]

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

#: ``LOWBIT_DTYPE`` of each activation dtype (see ``cuda/common.cuh``).
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

_lock = threading.Lock()


def source_path(name: str) -> Path:
    """Path of the kernel source ``name`` (e.g. ``"uniform_gemm.cu"``) inside the installed package."""
    p = CUDA_DIR / name
    if not p.is_file():
        raise KernelError(f"name: no CUDA source {name!r} in {CUDA_DIR} (is the package installed completely?)")
    return p


def nvrtc_options(defines: Mapping[str, Any] = (), extra: Iterable[str] = ()) -> list[str]:
    """The NVRTC options every lowbit kernel is compiled with: C++17, the ``cuda/`` include folder,
    IEEE float math (no ``--use_fast_math``: the reference comparisons rely on it) and ``-D`` defines."""
    opts = ["-std=c++17", f"-I{CUDA_DIR}"]
    opts += [f"-D{k}={v}" for k, v in dict(defines).items()]
    opts += list(extra)
    return opts


def compile_ptx(name: str, defines: Mapping[str, Any] = (), arch: str = "compute_90") -> str:
    """Compile ``cuda/<name>`` to PTX with NVRTC and return the PTX text. Needs no GPU.

    Raises:
        KernelError: the source does not compile (the message holds NVRTC's log), or NVRTC is not
            installed (``cuda-bindings`` and the ``nvidia-cuda-nvrtc`` wheel come with torch's CUDA
            builds).
    """
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - torch's CUDA wheels install it
        raise KernelError(f"compile_ptx: NVRTC is not available ({e}); pip install cuda-bindings nvidia-cuda-nvrtc") from e
    src = source_path(name).read_bytes()
    opts = [o.encode() for o in nvrtc_options(defines, [f"--gpu-architecture={arch}"])]
    err, prog = nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], [])
    _nvrtc_check(nvrtc, err, "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelError(f"{name} ({dict(defines)}): NVRTC compilation failed:\n{log.decode(errors='replace').rstrip(chr(0))}")
        err, n = nvrtc.nvrtcGetPTXSize(prog)
        _nvrtc_check(nvrtc, err, "nvrtcGetPTXSize")
        ptx = b" " * n
        (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
        _nvrtc_check(nvrtc, err, "nvrtcGetPTX")
        return ptx.rstrip(b"\0").decode()
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_check(nvrtc: Any, err: Any, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelError(f"{what} failed: {err}")


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """CuPy can be imported (``pip install lowbit[gpu]`` installs ``cupy-cuda13x``)."""
    try:
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no CuPy
        return False
    return True


def on_device(t: torch.Tensor) -> bool:
    """``t`` lives where the kernels run (a CUDA tensor). The one place that asks, so the tests'
    host build of the kernels can stand in for the GPU."""
    return t.is_cuda


def cuda_ready(t: Optional[torch.Tensor] = None) -> bool:
    """The CUDA kernels can run here (a CUDA device and CuPy), and on ``t`` when given (a CUDA tensor)."""
    if t is not None and not on_device(t):
        return False
    return torch.cuda.is_available() and cupy_available()


_modules: dict[tuple, Any] = {}


def get_kernel(name: str, func: str, defines: Mapping[str, Any], device: torch.device) -> Any:
    """The CuPy kernel ``func`` of ``cuda/<name>`` compiled with ``defines`` for ``device`` (cached)."""
    if not cuda_ready():
        raise KernelError("lowbit's CUDA kernels need a CUDA device and CuPy (pip install 'lowbit[gpu]')")
    import cupy

    dev = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, tuple(sorted(dict(defines).items())), dev)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            src = source_path(name).read_text()
            with cupy.cuda.Device(dev):
                try:
                    mod = cupy.RawModule(code=src, options=tuple(nvrtc_options(defines)), backend="nvrtc")
                    mod.compile()
                except Exception as e:  # noqa: BLE001 - CuPy raises its own CompileException
                    raise KernelError(f"{name} ({dict(defines)}): compilation failed: {e}") from e
            _modules[key] = mod
    try:
        return mod.get_function(func)
    except Exception as e:  # noqa: BLE001
        raise KernelError(f"{name}: no kernel {func!r} ({e})") from e


_streams: dict[int, Any] = {}


def launch(
    kernel: Any, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], device: torch.device, shared_mem: int = 0
) -> None:
    """Launch ``kernel`` on torch's current stream of ``device`` (so it orders with torch's own work
    and is captured by CUDA graphs). ``args`` are numpy scalars (pointers as ``np.uint64``, see :func:`ptr`)."""
    import cupy

    handle = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _streams[handle] = cupy.cuda.ExternalStream(handle, device.index if device.index is not None else -1)
    if shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()), stream:
        kernel(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args), shared_mem=shared_mem)


def ptr(t: Optional[torch.Tensor]) -> np.uint64:
    """The device pointer of ``t`` as a kernel argument (``0`` for ``None``)."""
    return np.uint64(0 if t is None else t.data_ptr())


def dtype_code(x: torch.Tensor, arg: str = "x") -> int:
    """``LOWBIT_DTYPE`` of an activation tensor; float16, bfloat16 or float32 only."""
    code = DTYPE_CODES.get(x.dtype)
    if code is None:
        raise DTypeError(f"{arg}: the CUDA kernels take float16, bfloat16 or float32 activations, got {x.dtype}")
    return code


def check_activation(x: Any, in_features: int) -> torch.Tensor:
    """``x`` is a float16/bfloat16/float32 tensor whose last axis is ``in_features``."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"x: must be a torch tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise DTypeError(f"x: must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(f"x: last axis must be in_features={in_features}, got shape {tuple(x.shape)}")
    return x


def check_cuda(t: torch.Tensor, arg: str, device: torch.device) -> None:
    """``t`` lives on ``device`` (the layer's weights)."""
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{arg}: must be a torch tensor, got {type(t).__name__}")
    if t.device != device:
        raise KernelError(f"{arg}: is on {t.device}, the weights are on {device}")


def run_matmul(source: str, func: str, config: Any, x2: torch.Tensor, w: Any, n_out: int) -> torch.Tensor:
    """Launch a matmul kernel of ``source`` on ``x2`` ``(B, K)`` (unit stride along K; copied
    when not): ``config(x2, w, y)`` gives ``(defines, grid, block, args)`` for the new ``(B, n_out)``
    output ``y``, which is returned."""
    if x2.stride(-1) != 1 or x2.stride(0) < x2.shape[1]:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], n_out, dtype=x2.dtype, device=x2.device)
    defines, grid, block, args = config(x2, w, y)
    launch(get_kernel(source, func, defines, x2.device), grid, block, args, x2.device)
    return y
