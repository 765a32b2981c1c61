"""lowbit.pack / unpack / pack_ternary / unpack_ternary (rust/src/pack.rs)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit

BITS = [1, 2, 3, 4, 8]
FORMS = ["base3", "2bit"]


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference of the documented layout: a little-endian bit stream per row."""
    n = codes.shape[-1]
    rows = codes.reshape(-1, n).astype(np.uint64)
    stream = ((rows[:, :, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = stream.reshape(rows.shape[0], n * bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(*codes.shape[:-1], -(-n * bits // 8))


# --- golden bytes: the on-disk layout, pinned forever -----------------------------------------


def test_golden_bytes_bits():
    assert lowbit.pack(np.array([1, 0, 1, 1, 0, 0, 0, 1], np.uint8), 1).tolist() == [0b10001101]
    assert lowbit.pack(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b00000011]
    assert lowbit.pack(np.array([0xA, 0x5, 0xF], np.uint8), 4).tolist() == [0x5A, 0x0F]
    assert lowbit.pack(np.arange(8, dtype=np.uint8), 3).tolist() == [0x88, 0xC6, 0xFA]
    assert lowbit.pack(np.array([7, 1, 5], np.uint8), 3).tolist() == [0b01_001_111, 0b0000000_1]
    assert lowbit.pack(np.array([200, 3], np.uint8), 8).tolist() == [200, 3]


def test_golden_bytes_ternary():
    # base3 = llama.cpp TQ1_0 byte: q = Σ (v_j+1)·3^(4-j); byte = ceil(q·256/243)
    v = np.array([-1, 0, 1, 1, -1, 1, 0], np.int8)
    q0 = 0 * 81 + 1 * 27 + 2 * 9 + 2 * 3 + 0 * 1
    q1 = 2 * 81 + 1 * 27 + 1 * 9 + 1 * 3 + 1 * 1  # padded with zeros (digit 1)
    want = [(q0 * 256 + 242) // 243, (q1 * 256 + 242) // 243]
    assert lowbit.pack_ternary(v).tolist() == want
    assert lowbit.pack_ternary(np.array([-1, 0, 1, 0, 1], np.int8), "2bit").tolist() == [0b01100100, 0b10]


def test_base3_decode_rule_matches_tq1_0():
    # Every byte value decodes by ((byte·3^j mod 256)·3) >> 8 - 1, exactly as ggml's TQ1_0.
    packed = np.arange(256, dtype=np.uint8).reshape(256, 1)
    got = lowbit.unpack_ternary(packed, 5)
    pow3 = np.array([1, 3, 9, 27, 81], np.uint32)
    want = (((np.arange(256, dtype=np.uint32)[:, None] * pow3) & 0xFF) * 3 >> 8).astype(np.int8) - 1
    np.testing.assert_array_equal(got, want)


def test_matches_independent_numpy_reference():
    rng = np.random.default_rng(1)
    for bits in BITS:
        for n in [1, 7, 8, 64, 333]:
            codes = rng.integers(0, 1 << bits, size=(3, n), dtype=np.uint8)
            np.testing.assert_array_equal(lowbit.pack(codes, bits), numpy_pack(codes, bits))


def test_gguf_tq1_0_bytes_agree_when_available():
    """Our base3 bytes are the bytes gguf's TQ1_0 writes for its 5-per-byte part."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    rng = np.random.default_rng(2)
    trits = rng.integers(-1, 2, size=256).astype(np.int8)
    block = quants.quantize(trits.astype(np.float32).reshape(1, 256), gguf.GGMLQuantizationType.TQ1_0)
    raw = np.asarray(block, dtype=np.uint8).reshape(-1)
    # TQ1_0 block: qs[48] holds values j + 32·k... in its own order; compare as multisets of bytes
    # of its first 32-byte group: byte m encodes values m, m+32, m+64, m+96, m+128 (digit 0 first).
    group = trits[:160].reshape(5, 32).T  # (32, 5): the 5 values of byte m
    ours = lowbit.pack_ternary(np.ascontiguousarray(group)).reshape(-1)
    np.testing.assert_array_equal(ours, raw[:32])


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_every_length_up_to_1000(bits):
    rng = np.random.default_rng(bits)
    for n in range(0, 1001):
        codes = rng.integers(0, 1 << bits, size=(2, n), dtype=np.uint8)
        p = lowbit.pack(codes, bits)
        assert p.shape == (2, lowbit.packed_size(n, bits))
        np.testing.assert_array_equal(lowbit.unpack(p, bits, n), codes)


@pytest.mark.parametrize("form", FORMS)
def test_ternary_every_length_up_to_1000(form):
    rng = np.random.default_rng(7)
    for n in range(0, 1001):
        v = rng.integers(-1, 2, size=(2, n), dtype=np.int8)
        np.testing.assert_array_equal(lowbit.unpack_ternary(lowbit.pack_ternary(v, form), n, form), v)


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=40),
    data=st.data(),
)
def test_roundtrip_property(bits, shape, data):
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    p = lowbit.pack(codes, bits)
    assert p.shape == shape[:-1] + (lowbit.packed_size(shape[-1], bits),)
    np.testing.assert_array_equal(lowbit.unpack(p, bits, shape[-1]), codes)


@settings(max_examples=200, deadline=None)
@given(
    form=st.sampled_from(FORMS),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=60),
    data=st.data(),
)
def test_ternary_roundtrip_property(form, shape, data):
    v = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(-1, 1)))
    np.testing.assert_array_equal(lowbit.unpack_ternary(lowbit.pack_ternary(v, form), shape[-1], form), v)


def test_large_arrays_use_threads_and_agree():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, size=(2000, 4096), dtype=np.uint8)
    p = lowbit.pack(codes, 2)
    np.testing.assert_array_equal(p, numpy_pack(codes, 2))
    np.testing.assert_array_equal(lowbit.unpack(p, 2, 4096), codes)
    odd = rng.integers(0, 8, size=(3001, 1001), dtype=np.uint8)
    np.testing.assert_array_equal(lowbit.unpack(lowbit.pack(odd, 3), 3, 1001), odd)


def test_other_integer_dtypes_and_noncontiguous():
    codes = np.arange(24, dtype=np.int64).reshape(4, 6) % 4
    np.testing.assert_array_equal(lowbit.unpack(lowbit.pack(codes, 2), 2, 6), codes)
    view = np.arange(64, dtype=np.uint8).reshape(8, 8)[:, ::2] % 16
    np.testing.assert_array_equal(lowbit.unpack(lowbit.pack(view, 4), 4, 4), view)


# --- bad input -----------------------------------------------------------------------------


def test_code_out_of_range_names_value_and_position():
    codes = np.zeros((3, 10), np.uint8)
    codes[2, 7] = 4
    with pytest.raises(lowbit.ValueRangeError, match=r"codes.*found 4 at row 2, column 7"):
        lowbit.pack(codes, 2)
    with pytest.raises(lowbit.ValueRangeError, match="codes"):
        lowbit.pack(np.array([-1, 0]), 2)
    with pytest.raises(lowbit.ValueRangeError, match="codes"):
        lowbit.pack(np.array([0, 300]), 8)


def test_bad_ternary_values():
    with pytest.raises(lowbit.ValueRangeError, match=r"values.*found 2 at row 0, column 1"):
        lowbit.pack_ternary(np.array([[0, 2, 1]], np.int8))
    with pytest.raises(lowbit.ValueRangeError, match="values"):
        lowbit.pack_ternary(np.array([0, -5]))
    with pytest.raises(lowbit.ValueRangeError, match="packed"):
        lowbit.unpack_ternary(np.array([[0b11]], np.uint8), 4, "2bit")
    with pytest.raises(lowbit.ValueRangeError, match="form"):
        lowbit.pack_ternary(np.zeros(5, np.int8), "base4")


def test_bad_dtypes():
    with pytest.raises(lowbit.DTypeError, match="codes"):
        lowbit.pack(np.zeros(8, np.float32), 2)
    with pytest.raises(lowbit.DTypeError, match="packed"):
        lowbit.unpack(np.zeros(2, np.int16), 2, 8)
    with pytest.raises(lowbit.DTypeError, match="values"):
        lowbit.pack_ternary(np.zeros(5, np.float32))
    with pytest.raises(TypeError):
        lowbit.pack([1, 2], 2)


def test_bad_bits_and_short_buffers():
    with pytest.raises(lowbit.UnsupportedSizeError, match="bits"):
        lowbit.pack(np.zeros(8, np.uint8), 5)
    with pytest.raises(lowbit.UnsupportedSizeError, match="bits"):
        lowbit.unpack(np.zeros(8, np.uint8), 0, 8)
    with pytest.raises(lowbit.ShapeError, match=r"packed.*exactly 3"):
        lowbit.unpack(np.zeros((2, 2), np.uint8), 2, 10)
    with pytest.raises(lowbit.ShapeError, match="packed"):
        lowbit.unpack(np.zeros((2, 4), np.uint8), 2, 10)  # too long is as wrong as too short
    with pytest.raises(lowbit.ShapeError, match="packed"):
        lowbit.unpack_ternary(np.zeros((1, 1), np.uint8), 6)
    with pytest.raises(lowbit.ShapeError, match="n"):
        lowbit.unpack(np.zeros(2, np.uint8), 2, -1)


def test_core_rejects_shape_mismatch_directly():
    from lowbit import _core

    with pytest.raises(lowbit.ShapeError, match="packed"):
        _core.unpack(np.zeros((2, 1), np.uint8), 2, 10)
    with pytest.raises(lowbit.ValueRangeError, match="codes"):
        _core.pack(np.full((1, 4), 9, np.uint8), 3)


def test_unpack_into_out_buffer():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 4, size=(2, 3, 50), dtype=np.uint8)
    p = lowbit.pack(codes, 2)
    out = np.full((2, 3, 50), 9, np.uint8)
    assert lowbit.unpack(p, 2, 50, out=out) is out
    np.testing.assert_array_equal(out, codes)
    v = rng.integers(-1, 2, size=(4, 33), dtype=np.int8)
    o = np.zeros((4, 33), np.int8)
    assert lowbit.unpack_ternary(lowbit.pack_ternary(v), 33, out=o) is o
    np.testing.assert_array_equal(o, v)
    with pytest.raises(lowbit.ShapeError, match="out"):
        lowbit.unpack(p, 2, 50, out=np.zeros((6, 50), np.uint8))
    with pytest.raises(lowbit.DTypeError, match="out"):
        lowbit.unpack(p, 2, 50, out=np.zeros((2, 3, 50), np.int8))
    with pytest.raises(lowbit.ShapeError, match="out"):
        lowbit.unpack(p, 2, 50, out=np.zeros((2, 3, 100), np.uint8)[..., ::2])


def test_streamed_large_outputs_roundtrip():
    # > 8 MB of output takes the non-temporal-store path, with aligned and unaligned rows.
    rng = np.random.default_rng(5)
    for n, bits in [(4096, 2), (4093, 3), (1001, 4)]:
        rows = (12 << 20) // n
        codes = rng.integers(0, 1 << bits, size=(rows, n), dtype=np.uint8)
        np.testing.assert_array_equal(lowbit.unpack(lowbit.pack(codes, bits), bits, n), codes)
    v = rng.integers(-1, 2, size=(3001, 4003), dtype=np.int8)
    for form in FORMS:
        np.testing.assert_array_equal(lowbit.unpack_ternary(lowbit.pack_ternary(v, form), 4003, form), v)
