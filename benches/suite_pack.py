"""Pack suite (1 thread): lowbit's ``pack``/``unpack`` at 1, 2, 4 bits and ``pack_ternary``/``unpack_ternary``
(``base3``, ``2bit``) beside numpy bit operations in the same byte layouts and gguf's TQ1_0/TQ2_0 numpy
reference. Rows and targets: benches/README.md, "Pack".
"""

from __future__ import annotations

import gc
import sys
from typing import Callable, Optional

import numpy as np

import lowbit
from lowbit import _core

from _harness import Group, Timer, fmt_time, optional_import, version

gguf_quants = optional_import("gguf.quants")  # llama.cpp's numpy reference (PyPI: gguf)
GQT = optional_import("gguf").GGMLQuantizationType if gguf_quants is not None else None

#: the peers' installed versions (None: not installed), for the run's header
PEERS = {"gguf": version("gguf") if gguf_quants is not None else None}


# ---------------------------------------------------------------------------------------------------
# Pack peers (numpy), same byte layouts as lowbit (LSB first)


def np_pack2(c: np.ndarray) -> np.ndarray:
    r, n = c.shape
    c4 = c.reshape(r, n // 4, 4)
    return c4[..., 0] | (c4[..., 1] << 2) | (c4[..., 2] << 4) | (c4[..., 3] << 6)


# The numpy unpack peers take the same courtesy as lowbit's out= rows: `out` (the (rows, n) result) and the
# scratch arrays may be preallocated and reused; left as None they are allocated on each call (new array).


def np_unpack2(p: np.ndarray, n: int, out: Optional[np.ndarray] = None, tmp: Optional[np.ndarray] = None) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.uint8)
    if tmp is None:
        tmp = np.empty_like(p)
    o = out.reshape(r, n // 4, 4)
    np.bitwise_and(p, 3, out=o[..., 0])
    np.right_shift(p, 2, out=tmp)
    np.bitwise_and(tmp, 3, out=o[..., 1])
    np.right_shift(p, 4, out=tmp)
    np.bitwise_and(tmp, 3, out=o[..., 2])
    np.right_shift(p, 6, out=o[..., 3])
    return out


def np_pack4(c: np.ndarray) -> np.ndarray:
    r, n = c.shape
    c2 = c.reshape(r, n // 2, 2)
    return c2[..., 0] | (c2[..., 1] << 4)


def np_unpack4(p: np.ndarray, n: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.uint8)
    o = out.reshape(r, n // 2, 2)
    np.bitwise_and(p, 15, out=o[..., 0])
    np.right_shift(p, 4, out=o[..., 1])
    return out


def np_pack1(c: np.ndarray) -> np.ndarray:
    return np.packbits(c, axis=-1, bitorder="little")


def np_unpack1(p: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(p, axis=-1, count=n, bitorder="little")  # no out= in numpy


def np_pack_t2(v: np.ndarray) -> np.ndarray:
    return np_pack2(v.view(np.uint8) + np.uint8(1))


def np_unpack_t2(p: np.ndarray, n: int, out: Optional[np.ndarray] = None, tmp: Optional[np.ndarray] = None) -> np.ndarray:
    u = np_unpack2(p, n, None if out is None else out.view(np.uint8), tmp)
    np.subtract(u, np.uint8(1), out=u)
    return u.view(np.int8)


def np_pack_t3(v: np.ndarray) -> np.ndarray:
    """TQ1_0 byte encoding, 5 values per byte, first value most significant (n % 5 == 0)."""
    r, n = v.shape
    d = (v.view(np.uint8) + np.uint8(1)).reshape(r, n // 5, 5).astype(np.uint16)
    q = d[..., 0] * 81 + d[..., 1] * 27 + d[..., 2] * 9 + d[..., 3] * 3 + d[..., 4]  # Σ d_j 3^(4-j)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def np_unpack_t3(
    p: np.ndarray,
    n: int,
    out: Optional[np.ndarray] = None,
    tmp8: Optional[np.ndarray] = None,
    tmp16: Optional[np.ndarray] = None,
) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.int8)
    if tmp8 is None:
        tmp8 = np.empty_like(p)
    if tmp16 is None:
        tmp16 = np.empty(p.shape, dtype=np.uint16)
    o = out.view(np.uint8).reshape(r, n // 5, 5)
    for j, m in enumerate((1, 3, 9, 27, 81)):
        src = p if m == 1 else np.multiply(p, np.uint8(m), out=tmp8)  # byte·3^j mod 256
        np.multiply(src, np.uint16(3), out=tmp16)
        np.right_shift(tmp16, 8, out=o[..., j], casting="unsafe")
    np.subtract(o, np.uint8(1), out=o)
    return out


def _check_round_trip(what: str, unpack: Callable[..., np.ndarray], out: np.ndarray, want: np.ndarray) -> None:
    """``unpack(out)`` (lowbit into a reused array, which it returns) and ``unpack()`` (a new array) give
    back ``want``; otherwise stop: a wrong kernel is not timed."""
    if not (unpack(out) is out and np.array_equal(out, want)):
        raise SystemExit(f"lowbit {what} round trip (out=) failed")
    if not np.array_equal(unpack()[:4], want[:4]):
        raise SystemExit(f"lowbit {what} round trip failed")


def run(args, timer: Timer, rng) -> list[Group]:
    groups: list[Group] = []
    lowbit.set_num_threads(1)
    n = 5120  # a multiple of 8, 5 and 256 (gguf block), so every format packs rows without padding
    total = (16 if args.quick else 64) << 20
    rows = total // n
    ne = rows * n
    size = f"{ne / 2**20:.0f} M codes ({rows}×{n})"

    # -- verification on a small input (also checks lowbit against the numpy reference layouts, and the
    #    numpy peers' out= forms against their allocating forms)
    def small(bits):
        return rng.integers(0, 1 << bits, size=(3, 40), dtype=np.uint8)

    bad: dict[str, str] = {}
    Fn = Callable[..., np.ndarray]
    bit_fns: list[tuple[int, Fn, Fn]] = [(1, np_pack1, np_unpack1), (2, np_pack2, np_unpack2), (4, np_pack4, np_unpack4)]
    for bits, pk, upk in bit_fns:
        c = small(bits)
        p = pk(c)
        ok = np.array_equal(upk(p, c.shape[1]), c) and np.array_equal(p, _core.pack(c, bits))
        if bits > 1:
            o = np.full(c.shape, 0xAA, np.uint8)
            ok = ok and upk(p, c.shape[1], o) is o and np.array_equal(o, c)
        if not ok:
            bad[f"np{bits}"] = "MISMATCH"
    tv = rng.integers(-1, 2, size=(3, 40), dtype=np.int8)
    tern_fns: list[tuple[str, Fn, Fn]] = [("base3", np_pack_t3, np_unpack_t3), ("2bit", np_pack_t2, np_unpack_t2)]
    for form, pk, upk in tern_fns:
        p = pk(tv)
        o = np.full(tv.shape, 77, np.int8)
        if not (
            np.array_equal(upk(p, 40), tv)
            and np.array_equal(p, _core.pack_ternary(tv, form))
            and np.array_equal(upk(p, 40, o), tv)
            and np.array_equal(o, tv)
        ):
            bad[f"np-{form}"] = "MISMATCH"
    gguf_types = {"base3": "TQ1_0", "2bit": "TQ2_0"}
    if gguf_quants is None:
        for f in gguf_types:
            bad[f"gguf-{f}"] = "not installed"
    else:
        tvf = rng.integers(-1, 2, size=(2, 512)).astype(np.float32)
        tvf[:, ::256] = 1.0  # every block has scale 1, so the round trip is exact
        for f, qn in gguf_types.items():
            q = getattr(GQT, qn)
            if not np.array_equal(gguf_quants.dequantize(gguf_quants.quantize(tvf, q), q), tvf):
                bad[f"gguf-{f}"] = "MISMATCH"

    def add(op, lowbit_fn, in_bytes, out_bytes, peers, unpack_target=False):
        """peers: (name, key in `bad` or None, fn, target factor or None); key None = lowbit itself."""
        t = timer(lowbit_fn)
        print(f"  {op}: {fmt_time(t)} ({ne / t / 1e9:.2f} G elem/s)", file=sys.stderr)
        g = Group("pack", op, size, n, rows, 1, "call", t, ne, in_bytes + out_bytes)
        if unpack_target:
            g.targets.append(("≥8 G elem/s", ne / t >= 8e9))
        for name, key, fn, factor in peers:
            if key in bad:
                g.peer(name, status=bad[key])
                continue
            tp = timer(fn, samples=3)
            tgt = None
            if unpack_target and factor:
                tgt = (f"≥{factor}× {name.split()[0]}", tp / t >= factor)
            g.peer(name, tp, target=tgt)
        groups.append(g)

    ub = np.empty((rows, n), dtype=np.uint8)  # the reused out= buffer of every unpack row (lowbit and numpy)
    bit_rows: list[tuple[int, Fn, Fn, str, str]] = [
        (1, np_pack1, np_unpack1, "np.packbits little", "np.unpackbits little"),
        (2, np_pack2, np_unpack2, "numpy shift-or", "numpy shift-mask"),
        (4, np_pack4, np_unpack4, "numpy shift-or", "numpy shift-mask"),
    ]
    for bits, pk, upk, pname, uname in bit_rows:
        codes = rng.integers(0, 1 << bits, size=(rows, n), dtype=np.uint8)
        packed = _core.pack(codes, bits)
        _check_round_trip(f"{bits}-bit", lambda *out: _core.unpack(packed, bits, n, *out), ub, codes)
        pb = packed.nbytes
        add(f"pack {bits}-bit", lambda: _core.pack(codes, bits), ne, pb, [(pname, f"np{bits}", lambda: pk(codes), None)])
        np_peers: list[tuple[str, Optional[str], Fn, Optional[int]]]
        if bits == 1:
            np_peers = [(f"{uname} (new array)", "np1", lambda: upk(packed, n), None)]  # numpy has no out=
        else:
            tmp = np.empty_like(packed)
            np_out = (lambda: upk(packed, n, ub, tmp)) if bits == 2 else (lambda: upk(packed, n, ub))
            np_peers = [
                (f"{uname} (out=)", f"np{bits}", np_out, 8),
                (f"{uname} (new array)", f"np{bits}", lambda: upk(packed, n), None),
            ]
        add(
            f"unpack {bits}-bit, out=",
            lambda: _core.unpack(packed, bits, n, ub),
            pb,
            ne,
            np_peers + [("lowbit (new array)", None, lambda: _core.unpack(packed, bits, n), None)],
            unpack_target=bits in (2, 4),
        )
        del codes, packed
        gc.collect()

    del ub
    gc.collect()
    vals = rng.integers(-1, 2, size=(rows, n), dtype=np.int8)
    vals_f = vals.astype(np.float32) if gguf_quants is not None else None
    vb = np.empty((rows, n), dtype=np.int8)  # the reused out= buffer of the ternary unpack rows
    for form, npk, nupk in tern_fns:
        packed = _core.pack_ternary(vals, form)
        _check_round_trip(f"ternary {form}", lambda *out: _core.unpack_ternary(packed, n, form, *out), vb, vals)
        pb = packed.nbytes
        qn = gguf_types[form]
        gq = getattr(GQT, qn) if GQT is not None else None
        gpacked = gguf_quants.quantize(vals_f, gq) if f"gguf-{form}" not in bad else None
        add(
            f"pack ternary {form}",
            lambda: _core.pack_ternary(vals, form),
            ne,
            pb,
            [
                ("numpy", f"np-{form}", lambda: npk(vals), None),
                (f"gguf {qn} quantize (f32 in)", f"gguf-{form}", lambda: gguf_quants.quantize(vals_f, gq), None),
            ],
        )
        tmp8 = np.empty_like(packed)
        if form == "base3":
            tmp16 = np.empty(packed.shape, dtype=np.uint16)
            np_out = lambda: nupk(packed, n, vb, tmp8, tmp16)  # noqa: E731
        else:
            np_out = lambda: nupk(packed, n, vb, tmp8)  # noqa: E731
        add(
            f"unpack ternary {form}, out=",
            lambda: _core.unpack_ternary(packed, n, form, vb),
            pb,
            ne,
            [
                ("numpy (out=)", f"np-{form}", np_out, 8),
                ("numpy (new array)", f"np-{form}", lambda: nupk(packed, n), None),
                (
                    f"gguf {qn} dequantize (f32 out, new array)",  # gguf has no out=
                    f"gguf-{form}",
                    lambda: gguf_quants.dequantize(gpacked, gq),
                    50,
                ),
                ("lowbit (new array)", None, lambda: _core.unpack_ternary(packed, n, form), None),
            ],
            unpack_target=True,
        )
        del packed, gpacked, tmp8
        gc.collect()
    return groups
