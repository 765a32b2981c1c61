"""RSAVQ (methods/rsavq.py) and the diagonal Fisher it uses (methods/fisher.py)."""

import pytest
import torch

from lowbit.errors import DTypeError, ShapeError, ValueRangeError
from lowbit.grids.vq import VQWeight
from lowbit.methods.fisher import decoder_linear_names, fisher_diagonal
from lowbit.methods.hessian import proxy_loss
from lowbit.methods.rsavq import allocate_bits, channel_sensitivity, fisher_loss, rsavq, stage_plan
from lowbit.models.tiny import random_ids, tiny_model


def _layer(out=128, n=256, seed=0, hot_rows=(3, 17, 40, 99), hot_cols=(0, 5, 77)):
    """A synthetic layer: correlated inputs with a few loud columns, a Fisher that is K-FAC-like
    (row gradient energy × input energy, times noise) with a few very sensitive rows."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, n, generator=g) @ (torch.eye(n) + 0.5 * torch.randn(n, n, generator=g) / n**0.5)
    X[:, list(hot_cols)] *= 6.0
    H = 2 * X.T @ X / X.shape[0]
    W = 0.05 * torch.randn(out, n, generator=g)
    row = torch.ones(out)
    row[list(hot_rows)] = 300.0
    F = 1e-4 * row[:, None] * torch.diagonal(H)[None, :] * (0.5 + torch.rand(out, n, generator=g))
    return W, H, F


def _kfac_loss(W, Q, H, F):
    """H- and F-weighted error: Σ_r G_r·ΔW_r·H·ΔW_rᵀ with the Fisher's row factor G_r = Σ_j F_rj / tr H."""
    G = F.double().sum(1) / torch.diagonal(H).double().sum()
    E = (W - Q).double()
    return float(((E @ H.double()) * E).sum(1) @ G)


def _plain_vq(W, bits=2, dim=4, iters=12, seed=0):
    """Plain VQ at the same index bits: rows normalized by their fp16 RMS, one unweighted k-means
    codebook (k = 2^(bits·dim)), nearest-codeword assignment, no error feedback."""
    from lowbit import vq

    s = W.pow(2).mean(1).sqrt().half().float()
    x = (W / s[:, None]).reshape(-1, dim).contiguous()
    km = vq.kmeans(x, 1 << (bits * dim), iters=iters, seed=seed)
    cb = torch.as_tensor(km.codebook).half().float()
    return cb[torch.as_tensor(vq.assign(x, cb)).long()].reshape(W.shape) * s[:, None]


@pytest.fixture(scope="module")
def layer():
    return _layer()


@pytest.fixture(scope="module")
def result(layer):
    W, H, F = layer
    return rsavq(W, H, F, bits=2.0, seed=0)


# ---------------------------------------------------------------- storage plan and allocation


def test_stage_plan():
    assert [stage_plan(b, 4) for b in (1, 2, 3)] == [(4,), (8,), (8, 4)]
    assert [stage_plan(b, 8) for b in (1, 2, 3)] == [(8,), (8, 8), (8, 8, 8)]
    assert [stage_plan(b, 2) for b in (1, 2, 3, 4)] == [(2,), (4,), (4, 2), (8,)]


def test_allocate_bits_budget_and_order():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(200, generator=g).double() ** 4
    for bits in (1.0, 1.5, 2.0, 2.3, 3.0):
        b = allocate_bits(s, bits, (1, 2, 3))
        assert b.dtype == torch.int64 and set(b.tolist()) <= {1, 2, 3}
        assert b.sum() <= bits * 200 and b.sum() > bits * 200 - 1  # the whole budget is used
        order = torch.argsort(s)
        assert bool((b[order].diff() >= 0).all())  # a more sensitive row never gets fewer bits


def test_allocate_bits_equal_sensitivity_is_uniform():
    assert allocate_bits(torch.ones(10), 2.0, (1, 2, 3)).tolist() == [2] * 10


def test_allocate_bits_gives_more_bits_to_high_fisher_rows(layer, result):
    W, H, F = layer
    row_bits = torch.tensor(result.qweight.extra["row_bits"])
    assert row_bits[[3, 17, 40, 99]].tolist() == [3, 3, 3, 3]
    sens = channel_sensitivity(W, F)
    lo = torch.argsort(sens)[:10]
    assert float(row_bits[lo].float().mean()) < 2.0
    assert sorted(set(row_bits.tolist())) == [1, 2, 3]


# ---------------------------------------------------------------- the VQWeight it produces


def test_round_trip_and_loss(layer, result):
    W, H, F = layer
    qw = result.qweight
    assert isinstance(qw, VQWeight) and qw.method == "rsavq" and qw.dim == 4
    assert qw.su is None and qw.sv is None and qw.shape == tuple(W.shape)
    Q = qw.dequantize()
    # the loss is the proxy loss of exactly the stored weight
    assert result.loss == pytest.approx(proxy_loss(W, Q, H), rel=1e-12)
    # rebuild by hand from the stages: row_scale · Σ table[codes] / gain over the stages covering the row
    out, n = W.shape
    manual = torch.zeros(out, n // 4, 4)
    row_bits = qw.extra["row_bits"]
    cover = torch.zeros(out, dtype=torch.int64)
    for st in qw.stages:
        assert st.codebook == "learned" and st.table.dtype == torch.float32
        assert torch.equal(st.table, st.table.half().float())  # fp16-representable
        assert int(st.codes.max()) < st.k and int(st.codes.min()) >= 0
        rows = torch.arange(out) if st.rows is None else st.rows
        assert bool((rows.diff() > 0).all())
        manual[rows] += st.table[st.codes] / st.scale
        cover[rows] += st.index_bits
    assert torch.equal(cover, torch.tensor(row_bits) * 4)  # index bits per vector = row bits · dim
    assert torch.equal(qw.row_scale, qw.row_scale.half().float())
    torch.testing.assert_close(manual.reshape(out, n) * qw.row_scale[:, None], Q, rtol=0, atol=1e-6)


def test_bits_within_budget(layer, result):
    W, _, _ = layer
    qw = result.qweight
    out, n = W.shape
    assert qw.extra["index_bits"] == pytest.approx(2.0)
    overhead = 16 * out  # fp16 row scales
    for st in qw.stages:
        overhead += 16 * st.k * qw.dim + (0 if st.rows is None else 32 * st.rows.numel())
    assert qw.bits_per_weight() == pytest.approx(2.0 + overhead / (out * n))


def test_uniform_choice_is_one_stage(layer):
    W, H, F = layer
    qw = rsavq(W, H, F, bits=2, bit_choices=(2,)).qweight
    assert len(qw.stages) == 1 and qw.stages[0].rows is None and qw.stages[0].k == 256
    assert qw.bits_per_weight() == pytest.approx(2 + (16 * W.shape[0] + 16 * 256 * 4) / W.numel())


def test_dim8_and_half_precision_input(layer):
    W, H, F = layer
    res = rsavq(W.half(), H, F, bits=1.5, dim=8, bit_choices=(1, 2), iters=4)
    qw = res.qweight
    assert qw.dim == 8 and {st.k for st in qw.stages} == {256}
    assert qw.extra["index_bits"] <= 1.5
    assert res.loss == pytest.approx(proxy_loss(W.half().float(), qw.dequantize(), H), rel=1e-12)


def test_deterministic(layer):
    W, H, F = layer
    a = rsavq(W[:32], H, F[:32], seed=3, iters=3).qweight
    b = rsavq(W[:32], H, F[:32], seed=3, iters=3).qweight
    assert torch.equal(a.dequantize(), b.dequantize())


# ---------------------------------------------------------------- quality (tests that can fail)


def test_beats_plain_kmeans_vq(layer, result):
    W, H, F = layer
    Q = result.qweight.dequantize()
    P = _plain_vq(W, bits=2)
    # the H- and F-weighted error (Fisher rows × input Hessian) and the Fisher diagonal alone
    assert _kfac_loss(W, Q, H, F) < 0.5 * _kfac_loss(W, P, H, F)
    assert fisher_loss(W, Q, F) < 0.8 * fisher_loss(W, P, F)
    # the plain layer-output proxy loss too, thanks to the error feedback
    assert proxy_loss(W, Q, H) < proxy_loss(W, P, H)


def test_allocation_and_fisher_help(layer, result):
    """Ablation: the same method with every row at 2 bits, and with no Fisher information at all."""
    W, H, F = layer
    ours = _kfac_loss(W, result.qweight.dequantize(), H, F)
    uniform = rsavq(W, H, F, bits=2.0, bit_choices=(2,))
    assert ours < 0.8 * _kfac_loss(W, uniform.qweight.dequantize(), H, F)
    blind = rsavq(W, H, torch.ones_like(F), bits=2.0)
    assert ours < 0.8 * _kfac_loss(W, blind.qweight.dequantize(), H, F)


def test_zero_fisher_falls_back_to_hessian(layer):
    W, H, _ = layer
    res = rsavq(W[:16], H, torch.zeros(16, W.shape[1]), bits=2.0)
    assert res.qweight.extra["index_bits"] <= 2.0
    assert res.loss < proxy_loss(W[:16], torch.zeros(16, W.shape[1]), H) * 0.2


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        (dict(H=torch.eye(8)), ShapeError, "H"),
        (dict(F=torch.ones(3, 3)), ShapeError, "F"),
        (dict(F="x"), DTypeError, "F"),
        (dict(F=torch.full((8, 16), float("nan"))), ValueRangeError, "F"),
        (dict(F=-torch.ones(8, 16)), ValueRangeError, "F"),
        (dict(W=torch.full((8, 16), float("nan"))), ValueRangeError, "W"),
        (dict(W=torch.ones(8, 16, dtype=torch.int32)), DTypeError, "W"),
        (dict(dim=3), ShapeError, "dim"),
        (dict(bits=3.5), ValueRangeError, "bits"),
        (dict(bits=0.5), ValueRangeError, "bits"),
        (dict(bit_choices=()), ValueRangeError, "bit_choices"),
        (dict(bit_choices=(0, 2)), ValueRangeError, "bit_choices"),
        (dict(iters=0), ValueRangeError, "iters"),
        (dict(damp=-1.0), ValueRangeError, "damp"),
        (dict(fisher_power=-1.0), ValueRangeError, "fisher_power"),
    ],
)
def test_rsavq_bad_inputs(kw, exc, word):
    args = dict(W=torch.randn(8, 16), H=torch.eye(16), F=torch.ones(8, 16))
    opts = {k: v for k, v in kw.items() if k not in args}
    args.update({k: v for k, v in kw.items() if k in args})
    with pytest.raises(exc, match=word):
        rsavq(args["W"], args["H"], args["F"], **opts)


# ---------------------------------------------------------------- the diagonal Fisher


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_fisher_matches_hand_computed(tiny, batch_size):
    calib = random_ids(4, 24, seed=1)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    F = fisher_diagonal(tiny, calib, names, batch_size=batch_size)
    assert list(F) == names
    for name in names:
        w = tiny.get_submodule(name).weight
        want = torch.zeros_like(w)
        for i in range(0, 4, batch_size):
            ids = calib[i : i + batch_size]
            with torch.enable_grad():
                loss = tiny(input_ids=ids, labels=ids).loss  # HF: mean token loss, shifted labels
                (g,) = torch.autograd.grad(loss, w)
            want += g * g
        want /= 4 // batch_size
        assert F[name].dtype == torch.float32 and F[name].shape == w.shape
        torch.testing.assert_close(F[name], want, rtol=1e-4, atol=1e-12)
        assert float(F[name].sum()) > 0


def test_fisher_default_names_and_model_state_restored(tiny):
    p0 = tiny.model.embed_tokens.weight
    marker = torch.full_like(p0, 0.5)
    p0.grad = marker
    tiny.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    tiny.train()
    try:
        F = fisher_diagonal(tiny, random_ids(2, 16, seed=2))
        assert list(F) == decoder_linear_names(tiny) and len(F) == 14
        assert list(F)[0] == "model.layers.0.self_attn.q_proj"
        assert {n: p.requires_grad for n, p in tiny.named_parameters()} == flags
        assert p0.grad is marker
        assert all(p.grad is None for n, p in tiny.named_parameters() if p is not p0)
        assert tiny.training
    finally:
        p0.grad = None
        tiny.model.norm.weight.requires_grad_(True)
        tiny.eval()


def test_fisher_under_no_grad(tiny):
    with torch.no_grad():
        F = fisher_diagonal(tiny, random_ids(1, 8, seed=3), ["model.layers.0.mlp.up_proj"])
    assert float(F["model.layers.0.mlp.up_proj"].sum()) > 0


@pytest.mark.parametrize(
    "calib, kw, exc, word",
    [
        (torch.rand(2, 8), {}, DTypeError, "calib"),
        ([[1, 2, 3]], {}, DTypeError, "calib"),
        (torch.ones(8, dtype=torch.int64), {}, ShapeError, "calib"),
        (torch.ones(2, 1, dtype=torch.int64), {}, ShapeError, "calib"),
        (torch.full((1, 8), 256, dtype=torch.int64), {}, ValueRangeError, "calib"),
        (torch.full((1, 8), -1, dtype=torch.int64), {}, ValueRangeError, "calib"),
        (torch.ones(1, 8, dtype=torch.int64), dict(names=["model.layers.0.nope"]), ValueRangeError, "names"),
        (torch.ones(1, 8, dtype=torch.int64), dict(names=["model.layers.0.mlp"]), ValueRangeError, "names"),
        (torch.ones(1, 8, dtype=torch.int64), dict(names=[]), ValueRangeError, "names"),
        (torch.ones(1, 8, dtype=torch.int64), dict(batch_size=0), ValueRangeError, "batch_size"),
    ],
)
def test_fisher_bad_inputs(tiny, calib, kw, exc, word):
    with pytest.raises(exc, match=word):
        fisher_diagonal(tiny, calib, **kw)
