"""KV-cache quantization: KVQuantizer (uniform / KVQuant), packed QuantizedKVCache, lowbit attention
forward (R3 + KV quantization) and KVQuant calibration (mirrors lowbit/kv/, lowbit/nn/attention.py
and lowbit/models/llama_attention.py). AKVQ-VL has its own file, tests/test_akvq.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.errors import DTypeError, ShapeError, UnsupportedModelError, ValueRangeError
from lowbit.kv import KVQuantizer, QuantizedKV, QuantizedKVCache, calibrate_kv, kv_bytes_report, levels_1d
from lowbit.models.adapters import get_adapter
from lowbit.models.tiny import TINY_ARCHS, random_ids, tiny_model
from lowbit.nn.attention import (
    attention_config,
    install_attention,
    install_from_config,
    install_model_attention,
    is_installed,
    uninstall_attention,
    uninstall_model_attention,
)

H, D = 2, 16


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def positions(B: int, S: int, start: int = 0) -> torch.Tensor:
    return (torch.arange(S) + start).unsqueeze(0).expand(B, S)


def key_like(*shape: int, seed: int = 0) -> torch.Tensor:
    """Samples shaped like the keys :func:`calibrated` fits (per-channel scale and offset)."""
    return rand(*shape, seed=seed) * torch.linspace(0.5, 3.0, D) + torch.linspace(-1, 1, D)


def calibrated(bits: int = 4, *, outlier_frac: float = 0.01, sink_tokens: int = 1, group_size=None, seed: int = 0) -> KVQuantizer:
    q = KVQuantizer(H, D, bits=bits, method="kvquant", outlier_frac=outlier_frac, sink_tokens=sink_tokens, group_size=group_size)
    q.calibrate(key_like(2000, H, D, seed=seed), rand(2000, H, D, seed=seed + 1), rand(2000, H, D, seed=seed + 2).abs(), None)
    return q


# ----------------------------------------------------------------------------------------------
# quantizers


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_uniform_error_bound(bits, group_size, sym):
    q = KVQuantizer(H, D, bits=bits, method="uniform", group_size=group_size, sym=sym, sink_tokens=0)
    x = rand(3, H, 7, D, seed=bits) * 2 + 0.5
    qkv = q.quantize_keys(x, positions(3, 7))
    y = q.dequantize(qkv)
    g = group_size or D
    scale = qkv.scales.float().repeat_interleave(g, dim=-1)
    assert qkv.scales.dtype == torch.float16
    assert (qkv.zeros is None) == sym
    assert bool(((y - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-7).all())


def test_uniform_known_values():
    q = KVQuantizer(1, 4, bits=2, method="uniform", sink_tokens=0)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)
    qkv = q.quantize_values(x, positions(1, 1))
    assert torch.equal(q.dequantize(qkv), x)
    assert qkv.zeros.item() == 0.0 and qkv.scales.item() == 1.0
    # codes 0,1,2,3 packed LSB first into one byte: 0 | 1<<2 | 2<<4 | 3<<6
    assert qkv.codes.reshape(-1).tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6]


@pytest.mark.parametrize("method", ["uniform", "kvquant"])
def test_sink_tokens_exact(method):
    q = calibrated(2, sink_tokens=2) if method == "kvquant" else KVQuantizer(H, D, bits=2, method="uniform", sink_tokens=2)
    x = rand(2, H, 5, D, seed=3) * 4
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    for y in (q.fake(x, pos, "key"), q.fake(x, pos, "value")):
        x16 = x.half().float()
        assert torch.equal(y[0, :, :2], x16[0, :, :2])
        assert not torch.equal(y[0, :, 2:], x16[0, :, 2:])
        assert not torch.equal(y[1], x16[1])


def test_kvquant_key_outliers_exact():
    q = calibrated(2, sink_tokens=0)
    assert bool((q.key_lo < q.key_hi).all())
    x = rand(1, H, 6, D, seed=5) * torch.linspace(0.5, 3.0, D)
    x[0, 1, 3, 4] = 50.0
    x[0, 0, 2, 7] = -80.0
    qkv = q.quantize_keys(x, positions(1, 6))
    y = q.dequantize(qkv)
    assert y[0, 1, 3, 4].item() == 50.0 and y[0, 0, 2, 7].item() == -80.0
    outside = (x < q.key_lo[None, :, None]) | (x > q.key_hi[None, :, None])
    assert qkv.outlier_idx.numel() == int(outside.sum())
    assert torch.equal(y[outside], x.half().float()[outside])
    assert qkv.outlier_idx.dtype == torch.int32 and qkv.outlier_val.dtype == torch.float16


def test_kvquant_value_outliers_topk_exact():
    q = calibrated(3, outlier_frac=0.05, sink_tokens=0)
    k = q.n_value_outliers
    assert k == round(0.05 * H * D + 1e-9) == 2
    x = rand(2, H, 4, D, seed=6)
    qkv = q.quantize_values(x, positions(2, 4))
    assert qkv.outlier_idx.numel() == 2 * 4 * k
    y = q.dequantize(qkv)
    top = x.abs().permute(0, 2, 1, 3).reshape(2, 4, H * D).topk(k, dim=-1).values
    for b in range(2):
        for s in range(4):
            tok, tok_y = x[b, :, s].reshape(-1), y[b, :, s].reshape(-1)
            big = tok.abs() >= top[b, s, -1]
            assert torch.equal(tok_y[big], tok.half().float()[big])
    assert ((y - x) ** 2).mean() / x.var() < 0.05


def test_kvquant_levels_sorted_in_range():
    for bits in (2, 3, 4):
        q = calibrated(bits)
        for lv in (q.key_levels, q.value_levels):
            assert lv.shape[-1] == 1 << bits and lv.dtype == torch.float32
            assert bool((lv[..., 1:] >= lv[..., :-1]).all())
            assert float(lv.min()) >= -1.0 and float(lv.max()) <= 1.0
        assert bool(q.calibrated)


def _np_kmeans(x: np.ndarray, w: np.ndarray, L: int, iters: int) -> np.ndarray:
    """Straightforward weighted Lloyd, two inits (weighted quantiles, linspace), lower inertia kept."""
    order = np.argsort(x, kind="stable")
    x, w = x[order].astype(np.float64), w[order].astype(np.float64)
    cw = np.cumsum(w)

    def inertia(lv):
        mids = (lv[1:] + lv[:-1]) / 2
        a = np.searchsorted(mids, x, side="right")
        return float((w * (x - lv[a]) ** 2).sum())

    def lloyd(lv):
        for _ in range(iters):
            mids = (lv[1:] + lv[:-1]) / 2
            a = np.searchsorted(mids, x, side="right")
            new = lv.copy()
            for j in range(L):
                m = a == j
                if w[m].sum() > 0:
                    new[j] = (w[m] * x[m]).sum() / w[m].sum()
            new = np.sort(new)
            if np.array_equal(new, lv):
                break
            lv = new
        return lv

    targets = (np.arange(L) + 0.5) / L * cw[-1]
    init = x[np.minimum(np.searchsorted(cw, targets, side="left"), len(x) - 1)]
    a, b = lloyd(init), lloyd(np.linspace(-1, 1, L))
    return a if inertia(a) <= inertia(b) else b


def test_kmeans_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.tanh(torch.randn(3, 400, generator=g) * 0.7)
    w = torch.rand(3, 400, generator=g) ** 3
    got = levels_1d(x, w, 4, iters=100)
    for r in range(3):
        want = _np_kmeans(x[r].numpy(), w[r].numpy(), 4, 100)
        np.testing.assert_allclose(got[r].numpy(), want, rtol=0, atol=1e-5)
    assert levels_1d(x[0], None, 8).shape == (8,)


def test_kmeans_not_worse_than_uniform():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 1000, generator=g) * 0.3).clamp(-1, 1)
    w = torch.rand(16, 1000, generator=g)
    L = 8

    def inertia(lv):
        mids = (lv[:, 1:] + lv[:, :-1]) / 2
        idx = torch.searchsorted(mids.contiguous(), x.contiguous())
        return (w * (x - lv.gather(1, idx)) ** 2).sum(1)

    km = levels_1d(x, w, L)
    uni = torch.linspace(-1, 1, L).expand(16, L).contiguous()
    assert bool((inertia(km) <= inertia(uni) + 1e-6).all())
    assert float(inertia(km).sum()) < 0.5 * float(inertia(uni).sum())


def test_calibrate_fast_enough_shape():
    q = KVQuantizer(3, 64, bits=4, method="kvquant")
    out = q.calibrate(rand(4000, 3, 64), rand(4000, 3, 64))
    assert set(out) == {"key_inertia", "value_inertia"}
    assert q.key_levels.shape == (3, 64, 16) and q.value_levels.shape == (16,)


@pytest.mark.parametrize("method,bits", [("uniform", 4), ("uniform", 2), ("kvquant", 4), ("kvquant", 2), ("kvquant", 3)])
def test_packed_storage_smaller(method, bits):
    q = calibrated(bits) if method == "kvquant" else KVQuantizer(H, D, bits=bits, method="uniform")
    x = key_like(2, H, 64, D, seed=7)
    for qkv in (q.quantize_keys(x, positions(2, 64)), q.quantize_values(x, positions(2, 64))):
        assert qkv.codes.dtype == torch.uint8
        assert qkv.codes.shape == (2, H, 64, -(-D * bits // 8))
        fp16 = x.numel() * 2
        assert qkv.nbytes() < fp16 * (bits + 2.5) / 16
        assert qkv.nbytes() == sum(
            t.numel() * t.element_size()
            for t in (qkv.codes, qkv.scales, qkv.zeros, qkv.outlier_idx, qkv.outlier_val, qkv.sink_rows, qkv.sink_val)
            if t is not None
        )


@pytest.mark.parametrize("method", ["uniform", "kvquant"])
def test_chunking_independent_and_structural_ops(method):
    q = calibrated(3) if method == "kvquant" else KVQuantizer(H, D, bits=3, method="uniform", group_size=8)
    x = rand(2, H, 9, D, seed=8) * 2
    x[1, 0, 4, 3] = 40.0
    pos = positions(2, 9)
    for kind, fn in (("key", q.quantize_keys), ("value", q.quantize_values)):
        whole = fn(x, pos)
        parts = [fn(x[:, :, a:b], pos[:, a:b]) for a, b in ((0, 1), (1, 5), (5, 6), (6, 9))]
        joined = QuantizedKV.cat(parts)
        assert joined.shape == whole.shape
        assert torch.equal(q.dequantize(joined), q.dequantize(whole))
        assert torch.equal(q.fake(x, pos, kind), q.dequantize(whole))
        assert torch.equal(q.dequantize(whole.narrow(2, 5)), q.dequantize(whole)[:, :, 2:7])
        idx = torch.tensor([1, 1, 0])
        assert torch.equal(q.dequantize(whole.index_batch(idx)), q.dequantize(whole)[idx])


def test_fake_dtype_and_grad():
    q = KVQuantizer(H, D, bits=4, method="uniform")
    x = rand(1, H, 3, D).to(torch.bfloat16)
    assert q.fake(x, positions(1, 3), "value").dtype == torch.bfloat16
    xg = rand(1, H, 3, D).requires_grad_(True)
    q.fake(xg, positions(1, 3), "key").sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(xg))


def test_config_roundtrip_and_state_dict():
    q = calibrated(3, group_size=8)
    cfg = json.loads(json.dumps(q.config()))
    r = KVQuantizer.from_config(cfg)
    assert not bool(r.calibrated)
    assert {k: v.shape for k, v in r.state_dict().items()} == {k: v.shape for k, v in q.state_dict().items()}
    r.load_state_dict(q.state_dict())
    x = rand(1, H, 5, D, seed=9)
    assert torch.equal(r.fake(x, positions(1, 5), "key"), q.fake(x, positions(1, 5), "key"))
    r.half()
    assert r.key_levels.dtype == torch.float32 and r.value_levels.dtype == torch.float32
    assert KVQuantizer.from_config(KVQuantizer(H, D, method="uniform").config()).state_dict() == {}


def test_uncalibrated_kvquant_raises():
    q = KVQuantizer(H, D, bits=4, method="kvquant")
    with pytest.raises(ValueRangeError, match="calibrate"):
        q.quantize_keys(rand(1, H, 2, D), positions(1, 2))
    with pytest.raises(ValueRangeError, match="calibrate"):
        q.fake(rand(1, H, 2, D), positions(1, 2), "value")


def test_bad_inputs():
    q = KVQuantizer(H, D, bits=4, method="uniform")
    p = positions(1, 3)
    with pytest.raises(ShapeError, match="k"):
        q.quantize_keys(rand(H, 3, D), p)
    with pytest.raises(ShapeError, match="num_kv_heads"):
        q.quantize_keys(rand(1, H + 1, 3, D), p)
    with pytest.raises(DTypeError, match="v"):
        q.quantize_values(torch.ones(1, H, 3, D, dtype=torch.int32), p)
    bad = rand(1, H, 3, D)
    bad[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueRangeError, match="k"):
        q.quantize_keys(bad, p)
    with pytest.raises(ShapeError, match="positions"):
        q.quantize_keys(rand(1, H, 3, D), positions(1, 4))
    with pytest.raises(DTypeError, match="positions"):
        q.quantize_keys(rand(1, H, 3, D), p.float())
    with pytest.raises(ValueRangeError, match="kind"):
        q.fake(rand(1, H, 3, D), p, "query")
    with pytest.raises(ValueRangeError, match="bits"):
        KVQuantizer(H, D, bits=5)
    with pytest.raises(ValueRangeError, match="method"):
        KVQuantizer(H, D, method="kivi")
    with pytest.raises(ValueRangeError, match="group_size"):
        KVQuantizer(H, D, group_size=5)
    with pytest.raises(ValueRangeError, match="clip_ratio"):
        KVQuantizer(H, D, clip_ratio=0.0)
    with pytest.raises(ValueRangeError, match="outlier_frac"):
        KVQuantizer(H, D, outlier_frac=0.7)
    with pytest.raises(ValueRangeError, match="calibrate"):
        q.calibrate(rand(10, H, D), rand(10, H, D))
    k = KVQuantizer(H, D, method="kvquant")
    with pytest.raises(ShapeError, match="keys"):
        k.calibrate(rand(10, H, D + 1), rand(10, H, D))
    with pytest.raises(ValueRangeError, match="value_weights"):
        k.calibrate(rand(10, H, D), rand(10, H, D), None, -rand(10, H, D).abs() - 1)
    with pytest.raises(ValueRangeError, match="cfg"):
        KVQuantizer.from_config({"num_kv_heads": 2, "head_dim": 16, "colour": 1})


# ----------------------------------------------------------------------------------------------
# attention and cache on the tiny models


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in TINY_ARCHS}


def _install_calibrated(model, method: str, bits: int = 4, rotate_qk: bool = True) -> None:
    install_model_attention(model, rotate_qk=rotate_qk, kv={"bits": bits, "method": method})
    if method == "kvquant":
        calibrate_kv(model, random_ids(2, 32, seed=11), fisher=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_install_without_changes_is_exact(models, arch):
    m = models[arch]
    ids = random_ids(2, 20, seed=1)
    with torch.no_grad():
        ref = m(ids).logits
        attns = install_model_attention(m)
        assert all(is_installed(a) for a in attns)
        assert torch.equal(m(ids).logits, ref)
        assert attention_config(attns[0]) == {"rotate_qk": False, "kv": None}
        assert "lowbit_kv" not in dict(m.named_modules()) and not any("rotary" in k and "self_attn" in k for k in m.state_dict())
        uninstall_model_attention(m)
        assert not is_installed(attns[0]) and attention_config(attns[0]) is None
        assert torch.equal(m(ids).logits, ref)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rotate_qk_invariant(models, arch):
    m = models[arch]
    ids = random_ids(2, 20, seed=2)
    with torch.no_grad():
        ref = m(ids).logits
        install_model_attention(m, rotate_qk=True)
        out = m(ids).logits
        uninstall_model_attention(m)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["uniform", "kvquant"])
def test_cached_equals_uncached(models, arch, method):
    from transformers import DynamicCache

    m = models[arch]
    ids = random_ids(2, 16, seed=3)
    _install_calibrated(m, method)
    try:
        with torch.no_grad():
            full = m(ids).logits  # no cache: fake quantization
            cache = QuantizedKVCache(m)
            full_packed = m(ids, cache=cache, use_cache=True).logits
            assert cache.get_seq_length() == 16
            assert float((full_packed - full).abs().max()) <= 1e-5
            packed, dyn = QuantizedKVCache(m), DynamicCache(config=m.config)
            steps_p, steps_d = [], []
            for t in range(ids.shape[1]):
                steps_p.append(m(ids[:, t : t + 1], cache=packed, use_cache=True).logits)
                steps_d.append(m(ids[:, t : t + 1], cache=dyn, use_cache=True).logits)
            step_p, step_d = torch.cat(steps_p, 1), torch.cat(steps_d, 1)
            assert float((step_p - step_d).abs().max()) <= 1e-5
            # one token at a time vs one pass: same quantized values; only the matmuls' rounding differs
            assert float((step_p - full).abs().max()) <= 1e-4
            # the packed cache stores no dense copy and is much smaller than fp16
            layer = packed.layers[0]
            assert layer.keys.numel() == 0 and layer.values.numel() == 0
            assert packed.kv_bytes_per_token() < 0.5 * packed.fp16_bytes_per_token()
            assert packed.fp16_bytes_per_token() == 2 * 2 * 2 * 2 * 16
    finally:
        uninstall_model_attention(m)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_with_quantized_cache(models, arch):
    m = models[arch]
    _install_calibrated(m, "kvquant", bits=2)
    try:
        ids = random_ids(1, 6, seed=4)
        cache = QuantizedKVCache(m)
        out = m.generate(ids, cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 11)
        assert cache.get_seq_length() == 10
        out2 = m.generate(ids, past_key_values=QuantizedKVCache(m), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, out2)
        assert torch.equal(cache.positions(0), torch.arange(10).unsqueeze(0))
    finally:
        uninstall_model_attention(m)


def test_generate_beam_search_and_crop(models):
    m = models["llama"]
    _install_calibrated(m, "uniform", bits=4)
    try:
        ids = random_ids(1, 5, seed=5)
        out = m.generate(ids, cache=QuantizedKVCache(m), max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 9)
        cache = QuantizedKVCache(m)
        with torch.no_grad():
            m(ids, cache=cache, use_cache=True)
            cache.crop(-2)
            assert cache.get_seq_length() == 3
            nxt = m(ids[:, 3:], cache=cache, use_cache=True).logits
            ref = m(ids).logits[:, 3:]
        uninstall_model_attention(m)
        _install_calibrated(m, "uniform", bits=4)
        with torch.no_grad():
            ref = m(ids).logits[:, 3:]
        assert float((nxt - ref).abs().max()) <= 1e-4
    finally:
        uninstall_model_attention(m)


def test_quantization_changes_logits_and_kvquant_beats_uniform_at_2_bits(models):
    m = models["llama"]
    ids = random_ids(2, 48, seed=6)
    with torch.no_grad():
        ref = m(ids).logits
    errs = {}
    for method in ("uniform", "kvquant"):
        _install_calibrated(m, method, bits=2, rotate_qk=False)
        with torch.no_grad():
            errs[method] = float(((m(ids).logits - ref) ** 2).mean())
        uninstall_model_attention(m)
    assert 0 < errs["kvquant"] < errs["uniform"]


def test_calibrate_kv_leaves_params_untouched(models):
    m = models["qwen2"]
    install_model_attention(m, kv={"bits": 3, "method": "kvquant"})
    try:
        flags = {n: p.requires_grad for n, p in m.named_parameters()}
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        rep = calibrate_kv(m, random_ids(3, 20, seed=7), fisher=True, batch_size=2, max_tokens=40)
        assert rep["layers"] == [0, 1] and rep["tokens"] == 40
        assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
        assert all(p.grad is None for p in m.parameters())
        assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        kv = m.model.layers[0].self_attn.lowbit_kv
        assert bool(kv.calibrated) and kv.enabled
        levels = kv.key_levels.clone()
        calibrate_kv(m, random_ids(3, 20, seed=7), fisher=False)
        assert not torch.equal(levels, kv.key_levels)
        rep = kv_bytes_report(m)
        assert 0 < rep["ratio"] < 0.35
    finally:
        uninstall_model_attention(m)


def test_attention_config_roundtrip(models):
    m = models["mistral"]
    _install_calibrated(m, "kvquant", bits=3)
    ids = random_ids(1, 12, seed=8)
    try:
        with torch.no_grad():
            want = m(ids).logits
        attn = m.model.layers[1].self_attn
        cfg = json.loads(json.dumps(attention_config(attn)))
        assert cfg["rotate_qk"] is True and cfg["kv"]["method"] == "kvquant"
        state = {k: v.clone() for k, v in attn.lowbit_kv.state_dict().items()}
        uninstall_attention(attn)
        install_from_config(attn, cfg, get_adapter(m).rotary(m))
        attn.lowbit_kv.load_state_dict(state)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, want)
        assert "model.layers.1.self_attn.lowbit_kv.key_levels" in m.state_dict()
    finally:
        uninstall_model_attention(m)


def test_attention_and_cache_errors(models):
    m = models["llama"]
    attn = m.model.layers[0].self_attn
    rotary = get_adapter(m).rotary(m)
    with pytest.raises(UnsupportedModelError, match="attn"):
        install_attention(torch.nn.Linear(2, 2), rotary=rotary)
    with pytest.raises(ShapeError, match="kv"):
        install_attention(attn, rotary=rotary, kv=KVQuantizer(3, 16, method="uniform"))
    with pytest.raises(ValueRangeError, match="kv"):
        install_attention(attn, rotary=rotary, kv="kvquant")
    with pytest.raises(ValueRangeError, match="rotary"):
        install_attention(attn, rotary=None)
    with pytest.raises(ValueRangeError, match="lowbit_kv"):
        QuantizedKVCache(m)
    install_model_attention(m, kv={"bits": 4, "method": "kvquant"})
    try:
        with pytest.raises(ValueRangeError, match="calibrate"):
            m(random_ids(1, 4))
        cache = QuantizedKVCache(m)
        with pytest.raises(ValueRangeError, match="positions"):
            cache.update(rand(1, 2, 3, 16), rand(1, 2, 3, 16), 0)
        with pytest.raises(ValueRangeError, match="empty"):
            cache.kv_bytes_per_token()
        with pytest.raises(ValueRangeError, match="kvquant"):
            calibrate_kv(tiny_model("llama"), random_ids(1, 4))
        with pytest.raises(ShapeError, match="calib_ids"):
            calibrate_kv(m, random_ids(1, 1))
        with pytest.raises(DTypeError, match="calib_ids"):
            calibrate_kv(m, torch.zeros(1, 4))
    finally:
        uninstall_model_attention(m)
