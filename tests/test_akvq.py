"""AKVQ-VL, the ``"akvq"`` KV method (lowbit/kv/akvq.py): Hadamard invariance, attention saliency
(per token and per KV head, causal), salient and sink rows stored exactly, the calibrated key
smoothing, the packed cache against fake quantization, the bytes it reports, the checkpoint round
trip and the recipe's errors. The real-model bound is in tests/test_real_model_w4a4kv4.py."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

import lowbit
from lowbit.errors import DTypeError, ShapeError, ValueRangeError
from lowbit.kv import AKVQQuantizer, KVQuantizer, QuantizedKVCache, kv_bytes_report
from lowbit.kv.akvq import calibrate_akvq
from lowbit.models.tiny import random_ids, tiny_model
from lowbit.nn.attention import install_model_attention, uninstall_model_attention
from lowbit.recipe import KVQuant

H, D = 2, 16


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pos(B: int, S: int) -> torch.Tensor:
    return torch.arange(S).unsqueeze(0).expand(B, S)


def smoothed(bits: int = 2, seed: int = 0, **kw) -> AKVQQuantizer:
    """A quantizer calibrated on keys with per-channel offsets ``mu`` and spreads ``sigma``."""
    q = AKVQQuantizer(H, D, bits, **kw)
    mu, sigma = torch.linspace(-4, 4, D), torch.linspace(0.5, 2.0, D)
    with q.observing():
        for i in range(3):
            x = rand(2, H, 40, D, seed=seed + i) * sigma + mu
            assert q.fake(x, pos(2, 40), "key") is x  # observing: keys pass through
    q.calibrate()
    return q


# ----------------------------------------------------------------------------------------------
# the quantizer


def test_options_and_sizes():
    q = AKVQQuantizer(H, D, 2)
    assert (q.group, q.key_group, q.salient_frac, q.salient_bits, q.mse_clip, q.key_smoothing, q.salient_per_head) == (16, 8, 0.035, 8, True, 1.0, True)
    assert not q.is_calibrated and AKVQQuantizer(H, D, 2, key_smoothing=None).is_calibrated
    # codes 16·2/8 = 4 bytes per head, keys 2 groups and values 1 group of fp16 (scale, offset), and
    # 3.5 % of the rows again at 8 bits (D codes, fp16 scale and offset, int32 index)
    assert q.expected_bytes_per_token() == pytest.approx((4 + 2 * 4) * H + (4 + 4) * H + 0.035 * 2 * H * (D + 8))
    q16 = AKVQQuantizer(H, D, 2, salient_frac=0.02, salient_bits=16)
    assert q16.expected_bytes_per_token() == pytest.approx((4 + 2 * 4) * H + (4 + 4) * H + 0.02 * 2 * H * (2 * D + 4))
    assert AKVQQuantizer(H, D, 2, key_group_size=16).key_group == 16
    assert AKVQQuantizer(H, D, 2, group_size=4).key_group == 2
    assert q16.n_salient(1) == 0 and q16.n_salient(50) == 1 and q16.n_salient(51) == 2
    cfg = q.config()
    assert KVQuantizer.from_config(cfg).config() == cfg and type(KVQuantizer.from_config(cfg)) is AKVQQuantizer


def test_calibration_fits_mean_and_spread():
    q = smoothed(key_smoothing=0.5)  # key_scale = σ^0.5
    assert q.is_calibrated
    torch.testing.assert_close(q.key_mean, torch.linspace(-4, 4, D).expand(H, D), atol=0.2, rtol=0)
    torch.testing.assert_close(q.key_scale, torch.linspace(0.5, 2.0, D).sqrt().expand(H, D), atol=0, rtol=0.08)
    with pytest.raises(ValueRangeError, match="calibrate"):
        q.calibrate()  # the observations were used up
    with pytest.raises(ValueRangeError, match="key_smoothing=None"):
        AKVQQuantizer(H, D, 2, key_smoothing=None).calibrate()


def test_sink_tokens_are_not_observed():
    q = AKVQQuantizer(H, D, 2, sink_tokens=1)
    x = rand(1, H, 5, D)
    x[:, :, 0] = 1e4  # a huge first token must not move the mean
    with q.observing():
        q.fake(x, pos(1, 5), "key")
    q.calibrate()
    torch.testing.assert_close(q.key_mean, x[0, :, 1:].mean(1))


def test_uncalibrated_smoothing_refuses_to_quantize():
    q = AKVQQuantizer(H, D, 2)
    with pytest.raises(ValueRangeError, match="calibrate"):
        q.quantize_keys(rand(1, H, 4, D), pos(1, 4))


def test_smoothing_lowers_the_key_error_on_offset_channels():
    x = rand(2, H, 64, D, seed=9) * torch.linspace(0.5, 2.0, D) + torch.linspace(-4, 4, D)
    p = pos(2, 64)
    err = {}
    for name, q in {"plain": AKVQQuantizer(H, D, 2, key_smoothing=None, sink_tokens=0), "smoothed": smoothed(sink_tokens=0)}.items():
        err[name] = float((q.fake(x, p, "key") - x).square().mean())
    assert err["smoothed"] < 0.7 * err["plain"]


def test_mse_clip_never_worse_than_min_max():
    x = rand(3, H, 20, D, seed=4) ** 3  # heavy tails: clipping helps
    p = pos(3, 20)
    err = {}
    for mse in (False, True):
        q = AKVQQuantizer(H, D, 2, mse_clip=mse, key_smoothing=None, sink_tokens=0)
        err[mse] = (q.fake(x, p, "value") - x).square().reshape(-1, D).sum(-1)
    assert bool((err[True] <= err[False] + 1e-6).all()) and float(err[True].sum()) < 0.9 * float(err[False].sum())


@pytest.mark.parametrize("per_head", [False, True])
def test_salient_and_sink_rows_are_exact(per_head):
    q = smoothed(sink_tokens=1, salient_bits=16)
    x = rand(2, H, 10, D, seed=3) * 3
    mask = torch.zeros(2, H, 10, dtype=torch.bool) if per_head else torch.zeros(2, 10, dtype=torch.bool)
    if per_head:
        mask[0, 1, 4] = mask[1, 0, 7] = True
    else:
        mask[0, 4] = mask[1, 7] = True
    for which in ("key", "value"):
        out = q.fake(x, pos(2, 10), which, mask)
        full = mask if per_head else mask.unsqueeze(1).expand(2, H, 10)
        full = full.clone()
        full[:, :, 0] = True  # the sink
        assert torch.equal(out[full], x.half().float()[full])
        assert not torch.equal(out[~full], x[~full])
        qkv = q.quantize_keys(x, pos(2, 10), mask) if which == "key" else q.quantize_values(x, pos(2, 10), mask)
        assert qkv.kind == ("akvq_key" if which == "key" else "uniform")
        assert qkv.sink_rows.numel() == int(full.sum())


def test_8bit_salient_rows():
    """At ``salient_bits=8`` the salient rows sit on their own 8-bit grid (within half a step of
    the input), the sinks stay fp16, and cat / narrow / index_batch keep every row where it was."""
    from lowbit.kv import QuantizedKV

    q = smoothed(sink_tokens=1)
    x = rand(2, H, 10, D, seed=5) * 3
    mask = torch.zeros(2, H, 10, dtype=torch.bool)
    mask[0, 1, 4] = mask[1, 0, 7] = mask[1, 1, 0] = True  # the last is a sink: stays fp16
    qkv = q.quantize_values(x, pos(2, 10), mask)
    assert qkv.row8_rows.tolist() == sorted([(0 * H + 1) * 10 + 4, (1 * H + 0) * 10 + 7])
    assert qkv.sink_rows.numel() == 2 * H and qkv.row8_codes.dtype == torch.uint8
    out = q.dequantize(qkv)
    step = qkv.row8_scales[:, 0].float()
    for (b, h, t), s in zip([(0, 1, 4), (1, 0, 7)], step):
        assert float((out[b, h, t] - x[b, h, t]).abs().max()) <= float(s) / 2 + 1e-6
        assert float(s) <= float(x[b, h, t].max() - x[b, h, t].min()) / 255 * 1.01 + 1e-6
    assert torch.equal(out[:, :, 0], x[:, :, 0].half().float())
    exp = qkv.nbytes() - QuantizedKV(**{**qkv.__dict__, "row8_rows": None, "row8_codes": None, "row8_scales": None}).nbytes()
    assert exp == 2 * (4 + D + 4)
    # the structural operations (token chunks, windows, beams) keep the rows
    halves = [q.quantize_values(x[:, :, :5], pos(2, 5), mask[:, :, :5]),
              q.quantize_values(x[:, :, 5:], pos(2, 5) + 5, mask[:, :, 5:])]
    assert torch.equal(q.dequantize(QuantizedKV.cat(halves)), out)
    assert torch.equal(q.dequantize(qkv.narrow(3, 5)), out[:, :, 3:8])
    assert torch.equal(q.dequantize(qkv.index_batch(torch.tensor([1, 1, 0]))), out[[1, 1, 0]])
    none = q.quantize_values(x, pos(2, 10), None)
    assert none.row8_rows.numel() == 0 and torch.equal(q.dequantize(QuantizedKV.cat([none, qkv])), torch.cat([q.dequantize(none), out], 2))


def test_salient_mask_errors():
    q = AKVQQuantizer(H, D, 2, key_smoothing=None)
    x = rand(2, H, 6, D)
    with pytest.raises(ShapeError, match="salient"):
        q.quantize_keys(x, pos(2, 6), torch.zeros(2, 3, 6, dtype=torch.bool))
    with pytest.raises(DTypeError, match="salient"):
        q.quantize_values(x, pos(2, 6), torch.zeros(2, 6))


def _uniform_query_key(S: int, heavy: int, Hk: int = 1, group: int = 1):
    """Queries that all point one way, keys zero except ``heavy`` (aligned, large)."""
    qd = torch.zeros(1, Hk * group, S, D)
    qd[..., 0] = 1.0
    k = torch.zeros(1, Hk, S, D)
    k[:, :, heavy, 0] = 20.0
    return qd, k


def test_saliency_is_causal_and_finds_the_heavy_token():
    q = AKVQQuantizer(1, D, 2, salient_frac=0.1, key_smoothing=None, sink_tokens=0)  # ceil(0.1 · 8) = 1 token
    query, key = _uniform_query_key(8, heavy=6)
    # causally, token 6 draws ~1 from queries 6 and 7, token 0 Σ 1/(i+1) from the others: token 0 wins
    m = q.saliency(query, key, pos(1, 8), None, 1.0)
    assert m.shape == (1, 1, 8) and m.sum() == 1 and bool(m[0, 0, 0])
    # heavy at 1 draws ~1 from 7 queries: that one wins
    query, key = _uniform_query_key(8, heavy=1)
    assert bool(q.saliency(query, key, pos(1, 8), None, 1.0)[0, 0, 1])
    # the model's bool mask can hide a key
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 1] = False
    assert not bool(q.saliency(query, key, pos(1, 8), mask, 1.0)[0, 0, 1])
    assert q.saliency(query[:, :, :1], key[:, :, :1], pos(1, 1), None, 1.0) is None  # decoding: none
    # a sink is stored whole anyway: with sink_tokens=1 the next heaviest token is picked instead of 0
    query, key = _uniform_query_key(8, heavy=6)
    m = AKVQQuantizer(1, D, 2, salient_frac=0.1, key_smoothing=None, sink_tokens=1).saliency(query, key, pos(1, 8), None, 1.0)
    assert not bool(m[0, 0, 0]) and m.sum() == 1


def test_saliency_in_query_chunks_is_the_same(monkeypatch):
    """The saliency pass over query blocks (long prefills) ranks as the one-block pass does."""
    q = AKVQQuantizer(2, D, 2, salient_frac=0.2, key_smoothing=None)
    query, key = rand(2, 4, 37, D, seed=1) * 2, rand(2, 2, 37, D, seed=2) * 2
    mask = torch.ones(2, 1, 37, 37, dtype=torch.bool).tril()
    mask[1, :, :, 3] = False
    want = q.saliency(query, key, pos(2, 37), mask, 0.25)
    monkeypatch.setattr(AKVQQuantizer, "SALIENCY_CHUNK", 5)
    assert torch.equal(q.saliency(query, key, pos(2, 37), mask, 0.25), want)
    assert not bool(want[1, :, 3].any())


def test_saliency_per_kv_head():
    S = 16
    query = torch.zeros(1, 4, S, D)
    query[..., 0] = 1.0
    key = torch.zeros(1, 2, S, D)
    key[:, 0, 3, 0] = 20.0  # head 0's pivot
    key[:, 1, 9, 0] = 20.0  # head 1's pivot
    per_head = AKVQQuantizer(2, D, 2, salient_frac=0.1, key_smoothing=None)  # 2 tokens per head
    m = per_head.saliency(query, key, pos(1, S), None, 1.0)
    assert m.shape == (1, 2, S) and m.sum(-1).tolist() == [[2, 2]]
    assert bool(m[0, 0, 3]) and not bool(m[0, 0, 9]) and bool(m[0, 1, 9]) and not bool(m[0, 1, 3])
    shared = AKVQQuantizer(2, D, 2, salient_frac=0.1, key_smoothing=None, salient_per_head=False)
    m = shared.saliency(query, key, pos(1, S), None, 1.0)
    assert m.shape == (1, S) and bool(m[0, 3]) and bool(m[0, 9])


def test_bad_options():
    with pytest.raises(ValueRangeError, match="outlier_frac"):
        AKVQQuantizer(H, D, 2, outlier_frac=0.01)
    with pytest.raises(ValueRangeError, match="sym"):
        AKVQQuantizer(H, D, 2, sym=True)
    with pytest.raises(ValueRangeError, match="key_group_size"):
        AKVQQuantizer(H, D, 2, key_group_size=5)
    with pytest.raises(ValueRangeError, match="key_smoothing"):
        AKVQQuantizer(H, D, 2, key_smoothing=1.5)
    with pytest.raises(ValueRangeError, match="mse_clip"):
        AKVQQuantizer(H, D, 2, mse_clip=1)
    with pytest.raises(ValueRangeError, match="salient_frac"):
        AKVQQuantizer(H, D, 2, salient_frac=0.6)
    with pytest.raises(ValueRangeError, match="salient_bits"):
        AKVQQuantizer(H, D, 2, salient_bits=4)


def test_recipe_errors():
    with pytest.raises(ValueRangeError, match="outlier_frac.*akvq"):
        KVQuant(2, "akvq", outlier_frac=0.05)
    with pytest.raises(ValueRangeError, match="sym.*akvq"):
        KVQuant(2, "akvq", sym=True)
    with pytest.raises(ValueRangeError, match="no option.*colour"):
        KVQuant(2, "akvq", options={"colour": 1})
    with pytest.raises(ValueRangeError, match="fields of KVQuant"):
        KVQuant(2, "akvq", options={"salient_frac": 0.1})
    with pytest.raises(ValueRangeError, match="JSON scalars"):
        KVQuant(2, "akvq", options={"key_smoothing": [0.5]})
    with pytest.raises(ValueRangeError, match="no option"):
        KVQuant(2, "uniform", options={"key_smoothing": 0.5})
    step = KVQuant(2, "akvq", options={"key_group_size": 4, "key_smoothing": None})
    assert step.quantizer_config(16)["key_group_size"] == 4 and step.quantizer_config(16)["key_smoothing"] is None
    assert lowbit.recipe.step_from_dict(step.to_dict()) == step


# ----------------------------------------------------------------------------------------------
# on the tiny model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


def test_hadamard_alone_changes_nothing(model):
    """With the quantizer observing (keys and values pass through unquantized), the rotated
    attention — queries and keys by H, values by H and the output back — gives the stock logits."""
    ids = random_ids(2, 20, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
        install_model_attention(model, kv={"bits": 2, "method": "akvq"})
        try:
            qs = [m for m in model.modules() if isinstance(m, AKVQQuantizer)]
            assert len(qs) == model.config.num_hidden_layers
            with contextlib.ExitStack() as stack:
                for q in qs:
                    stack.enter_context(q.observing())
                out = model(ids).logits
        finally:
            uninstall_model_attention(model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_packed_cache_equals_fake_and_generates(model, tmp_path):
    calib = random_ids(3, 32, seed=2)
    q = lowbit.quantize(copy.deepcopy(model), [KVQuant(2, "akvq", calib_samples=3, salient_frac=0.1)], calib, progress=False)
    kvs = [m for m in q.modules() if isinstance(m, AKVQQuantizer)]
    assert all(k.is_calibrated and k.key_mean.abs().sum() > 0 for k in kvs)
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        fake = q(ids).logits
        cache = QuantizedKVCache(q)
        packed = q(ids, cache=cache, use_cache=True).logits
    assert float((packed - fake).abs().max()) <= 1e-5 * float(fake.abs().max())
    out = q.generate(ids[:1, :8], cache=QuantizedKVCache(q), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    # the quantization is real: the logits move, but not far
    with torch.no_grad():
        ref = model(ids).logits
    assert 0 < float((fake - ref).abs().max()) < 0.5 * float(ref.abs().max())
    # a checkpoint keeps the calibrated smoothing
    loaded = lowbit.load(lowbit.save(q, tmp_path / "ck"))
    lk = [m for m in loaded.modules() if isinstance(m, AKVQQuantizer)]
    assert all(torch.equal(a.key_mean, b.key_mean) and torch.equal(a.key_scale, b.key_scale) and a.is_calibrated for a, b in zip(lk, kvs))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fake)


@pytest.mark.parametrize("bits", [8, 16])
def test_bytes_report_agrees_with_the_cache(model, bits):
    """With no sinks and ``salient_frac · S`` whole, the report's expected bytes are the stored ones."""
    S = 40
    step = KVQuant(2, "akvq", sink_tokens=0, salient_frac=0.05, options={"key_smoothing": None, "salient_bits": bits})  # 2 per head
    q = lowbit.quantize(copy.deepcopy(model), [step], None, progress=False)
    cache = QuantizedKVCache(q)
    with torch.no_grad():
        q(random_ids(1, S, seed=4), cache=cache, use_cache=True)
    which = "sink_rows" if bits == 16 else "row8_rows"
    rows = sum(int(getattr(layer.qkeys, which).numel() + getattr(layer.qvalues, which).numel()) for layer in cache.layers)
    cfg = q.config
    assert rows == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * math.ceil(0.05 * S)
    assert cache.kv_bytes_per_token() == pytest.approx(kv_bytes_report(q)["kv_bytes_per_token"])


def test_calibrate_akvq_errors(model):
    with pytest.raises(ValueRangeError, match="model"):
        calibrate_akvq(copy.deepcopy(model), random_ids(1, 8))
    m = copy.deepcopy(model)
    install_model_attention(m, kv={"bits": 2, "method": "akvq"})
    with pytest.raises(DTypeError, match="calib_ids"):
        calibrate_akvq(m, torch.zeros(1, 8))
    rep = calibrate_akvq(m, random_ids(2, 8, seed=1))
    assert rep["layers"] == m.config.num_hidden_layers and rep["tokens"] == 2 * 7
