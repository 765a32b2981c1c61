"""Stubs for the Rust extension ``lowbit._core`` (rust/src/py.rs). Arrays are C-contiguous numpy."""

from typing import Optional

import numpy as np
import numpy.typing as npt

MAX_N: int

def hadamard_f32(
    x: npt.NDArray[np.float32],
    normalize: bool = True,
    inverse: bool = False,
    strict: bool = False,
    signs: Optional[npt.NDArray[np.int8]] = None,
    out: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...
def hadamard_inplace_f32(
    x: npt.NDArray[np.float32],
    normalize: bool = True,
    inverse: bool = False,
    strict: bool = False,
    signs: Optional[npt.NDArray[np.int8]] = None,
) -> None: ...
def hadamard_f64(
    x: npt.NDArray[np.float64],
    normalize: bool = True,
    inverse: bool = False,
    strict: bool = False,
    signs: Optional[npt.NDArray[np.int8]] = None,
    out: Optional[npt.NDArray[np.float64]] = None,
) -> npt.NDArray[np.float64]: ...
def hadamard_inplace_f64(
    x: npt.NDArray[np.float64],
    normalize: bool = True,
    inverse: bool = False,
    strict: bool = False,
    signs: Optional[npt.NDArray[np.int8]] = None,
) -> None: ...
def hadamard_plan(n: int, strict: bool = False) -> tuple[bool, list[tuple[int, int, int]]]: ...
def hadamard_base(k: int) -> npt.NDArray[np.int8]: ...
def hadamard_base_orders() -> list[int]: ...
def random_signs(n: int, seed: int) -> npt.NDArray[np.int8]: ...
def random_permutation(n: int, seed: int) -> npt.NDArray[np.uint64]: ...
def pack(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]: ...
def unpack(
    packed: npt.NDArray[np.uint8], bits: int, n: int, out: Optional[npt.NDArray[np.uint8]] = None
) -> npt.NDArray[np.uint8]: ...
def pack_ternary(values: npt.NDArray[np.int8], form: str = "base3") -> npt.NDArray[np.uint8]: ...
def unpack_ternary(
    packed: npt.NDArray[np.uint8], n: int, form: str = "base3", out: Optional[npt.NDArray[np.int8]] = None
) -> npt.NDArray[np.int8]: ...
def vq_kmeans(
    x: npt.NDArray[np.float32],
    k: int,
    iters: int = 10,
    seed: int = 0,
    weights: Optional[npt.NDArray[np.float32]] = None,
    init: Optional[npt.NDArray[np.float32]] = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32], npt.NDArray[np.float64]]: ...
def vq_assign(
    x: npt.NDArray[np.float32],
    codebook: npt.NDArray[np.float32],
    weights: Optional[npt.NDArray[np.float32]] = None,
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...
def e8p_encode(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]: ...
def e8p_decode(
    codes: npt.NDArray[np.uint16],
    out: Optional[npt.NDArray[np.float32]] = None,
    row_scale: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...
def e8p_codebook() -> npt.NDArray[np.float32]: ...
def e81b_codebook() -> npt.NDArray[np.float32]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
