"""QuantLinear: packed storage round trip, exact forward, sizes, repr (mirrors lowbit/nn/quant_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import ShapeError, ValueRangeError
from lowbit.grids.base import QuantizedWeight
from lowbit.nn import PackingFormat, QuantLinear, storage_bits


def make_qw(
    out: int = 24,
    n_in: int = 100,
    *,
    bits: int = 4,
    group_size: int = 64,
    kind: str = "uniform",
    sym: bool = False,
    perm: bool = False,
    seed: int = 0,
    method: str = "rtn",
) -> QuantizedWeight:
    """A random QuantizedWeight that honours the contract (fp16-representable scales/zeros)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-n_in // group_size)
    max_code = {"ternary": 2, "binary": 1}.get(kind, (1 << bits) - 1)
    codes = torch.randint(0, max_code + 1, (out, n_in), generator=g).to(torch.uint8)
    scales = (torch.rand(out, n_groups, generator=g) * 0.05 + 1e-3).half().float()
    zeros = None
    if kind == "ternary":
        zero_const = 1.0
    elif kind == "binary":
        zero_const = 0.5
    elif sym:
        zero_const = float(1 << (bits - 1))
    else:
        zero_const = 0.0
        zeros = torch.randint(0, max_code + 1, (out, n_groups), generator=g).float()
    p = torch.randperm(n_in, generator=g) if perm else None
    return QuantizedWeight(
        codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size, kind=kind,
        zero_const=zero_const, perm=p, method=method,
    )


UNIFORM = [(b, sym) for b in (1, 2, 3, 4, 5, 8) for sym in (True, False)]


def _x(n_in: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 5, n_in, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("bits,sym", UNIFORM)
def test_uniform_round_trip_exact(bits, sym, perm):
    qw = make_qw(bits=bits, sym=sym, perm=perm, seed=bits)
    m = QuantLinear.from_quantized(qw)
    assert torch.equal(m.dequantize_weight(), qw.dequantize())
    back = m.to_quantized()
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scales, qw.scales)
    assert (back.zeros is None) == sym
    x = _x(100)
    assert torch.equal(m(x), F.linear(x, qw.dequantize()))


@pytest.mark.parametrize("kind,bits", [("ternary", 2), ("binary", 1)])
@pytest.mark.parametrize("perm", [False, True])
def test_ternary_binary_round_trip_exact(kind, bits, perm):
    qw = make_qw(kind=kind, bits=bits, perm=perm, group_size=32)
    m = QuantLinear.from_quantized(qw)
    assert m.packing is (PackingFormat.BASE3 if kind == "ternary" else PackingFormat.LSB)
    assert torch.equal(m.to_quantized().codes, qw.codes)
    x = _x(100)
    assert torch.equal(m(x), F.linear(x, qw.dequantize()))


def test_packed_layout_matches_rust_packers():
    qw = make_qw(bits=2, n_in=100)
    m = QuantLinear.from_quantized(qw)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (24, 25)
    assert torch.equal(m.qweight, lowbit.pack(qw.codes, 2))
    t = make_qw(kind="ternary", bits=2, n_in=100)
    mt = QuantLinear.from_quantized(t)
    assert mt.qweight.shape == (24, 20)
    assert torch.equal(mt.qweight, lowbit.pack_ternary(t.codes.to(torch.int8) - 1, "base3"))
    # widths without a packer use an 8-bit container
    assert storage_bits(5) == 8 and storage_bits(3) == 3
    assert QuantLinear.from_quantized(make_qw(bits=6)).qweight.shape == (24, 100)


def test_buffers_and_state_dict():
    qw = make_qw(bits=3, sym=False, perm=True)
    bias = torch.randn(24)
    m = QuantLinear.from_quantized(qw, bias)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "perm", "bias"}
    assert sd["scales"].dtype == torch.float16 and sd["scales"].shape == (24, 2)
    assert sd["zeros"].dtype == torch.float16
    assert sd["perm"].dtype == torch.int64 and sd["perm"].shape == (100,)
    assert not m.bias.requires_grad
    sym = QuantLinear.from_quantized(make_qw(bits=4, sym=True))
    assert set(sym.state_dict()) == {"qweight", "scales"}


def test_bias_and_group_not_dividing():
    qw = make_qw(n_in=100, group_size=64, bits=4, perm=True)
    assert qw.n_groups == 2
    bias = torch.randn(24)
    m = QuantLinear.from_quantized(qw, bias)
    x = _x(100)
    assert torch.equal(m(x), F.linear(x, qw.dequantize(), bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    qw = make_qw(bits=4)
    m = QuantLinear.from_quantized(qw, torch.randn(24))
    x = _x(100, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, qw.dequantize().to(dtype), m.bias.to(dtype)))


def test_module_dtype_cast_keeps_fp16_storage():
    qw = make_qw(bits=4)
    m = QuantLinear.from_quantized(qw, torch.randn(24))
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and m.zeros.dtype == torch.float16
    assert m.bias.dtype == torch.bfloat16
    m.float()
    assert torch.equal(m.dequantize_weight(), qw.dequantize())


def test_bits_per_weight():
    m = QuantLinear.from_quantized(make_qw(n_in=128, bits=4, group_size=64, sym=False))
    assert m.bits_per_weight() == 4.5
    m = QuantLinear.from_quantized(make_qw(n_in=128, bits=4, group_size=64, sym=True))
    assert m.bits_per_weight() == 4.25
    qw = make_qw(n_in=128, bits=2, group_size=32, sym=False, perm=True)
    assert QuantLinear.from_quantized(qw).bits_per_weight() == qw.bits_per_weight() == 3.0
    # ternary, 100 columns: 20 bytes per row (1.6 bits) + one fp16 scale per 100 weights
    m = QuantLinear.from_quantized(make_qw(n_in=100, kind="ternary", bits=2, group_size=100))
    assert m.bits_per_weight() == pytest.approx(1.6 + 16 / 100)
    # padding is counted: 3 bits × 100 codes = 38 bytes per row
    m = QuantLinear.from_quantized(make_qw(n_in=100, bits=3, group_size=64, sym=True))
    assert m.bits_per_weight() == pytest.approx((38 * 8 + 2 * 16) / 100)


def test_extra_repr():
    m = QuantLinear.from_quantized(make_qw(bits=3, perm=True, method="gptq"), torch.zeros(24))
    r = repr(m)
    for s in ("in_features=100", "out_features=24", "bits=3", "group_size=64", "kind=uniform",
              "sym=False", "method=gptq", "act_order=True", "bias=True"):
        assert s in r, (s, r)


def test_cache_dequantized():
    qw = make_qw(bits=4)
    m = QuantLinear.from_quantized(qw, cache_dequantized=True)
    x = _x(100)
    y1 = m(x)
    assert m._cache is not None
    assert torch.equal(m(x), y1)
    with torch.no_grad():
        m.scales.mul_(2)  # an in-place change invalidates the cache
    assert torch.allclose(m(x), 2 * y1, rtol=1e-5, atol=1e-6)
    m.clear_cache()
    assert m._cache is None
    assert "cache_dequantized=True" in repr(m)
    plain = QuantLinear.from_quantized(qw)
    plain(x)
    assert plain._cache is None


def test_from_metadata_and_load_state_dict():
    qw = make_qw(bits=2, perm=True)
    src = QuantLinear.from_quantized(qw, torch.randn(24))
    dst = QuantLinear.from_metadata(src.metadata())
    dst.load_state_dict(src.state_dict())
    x = _x(100)
    assert torch.equal(dst(x), src(x))
    bad = dict(src.state_dict())
    bad["scales"] = bad["scales"].float()
    with pytest.raises(RuntimeError, match="scales"):
        dst.load_state_dict(bad)


def test_contract_violations():
    qw = make_qw(bits=4)
    qw.scales = qw.scales + 1e-6  # not fp16-representable
    with pytest.raises(ValueRangeError, match="scales"):
        QuantLinear.from_quantized(qw)
    qw = make_qw(bits=2)
    qw.codes[0, 0] = 4
    with pytest.raises(ValueRangeError, match="codes"):
        QuantLinear.from_quantized(qw)
    qw = make_qw(kind="ternary", bits=2)
    qw.codes[0, 0] = 3
    with pytest.raises(ValueRangeError, match="codes"):
        QuantLinear.from_quantized(qw)
    qw = make_qw(bits=4)
    qw.scales = qw.scales[:, :1]
    with pytest.raises(ShapeError, match="scales"):
        QuantLinear.from_quantized(qw)
    qw = make_qw(bits=4, perm=True)
    qw.perm[0] = qw.perm[1]
    with pytest.raises(ValueRangeError, match="perm"):
        QuantLinear.from_quantized(qw)
    with pytest.raises(ShapeError, match="bias"):
        QuantLinear.from_quantized(make_qw(), torch.zeros(3))
    with pytest.raises(ValueRangeError, match="kind"):
        QuantLinear(8, 8, bits=4, group_size=8, kind="nf4")


@pytest.mark.gpu
def test_cuda_forward_matches_cpu():
    qw = make_qw(bits=3, perm=True)
    m = QuantLinear.from_quantized(qw, torch.randn(24))
    x = _x(100)
    ref = m(x)
    m.cuda()
    y = m(x.cuda())
    assert y.device.type == "cuda"
    assert torch.equal(m.dequantize_weight().cpu(), qw.dequantize())
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-5)
