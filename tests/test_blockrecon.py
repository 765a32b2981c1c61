"""Block reconstruction (methods/blockrecon.py) and the methods on it: OmniQuant's LWC, TesseraQ.

What is pinned: LWC at its initial clip is round-to-nearest within 2 %; TesseraQ's soft
initialisation is the weight itself; the merge into the packed QuantLinear reproduces the trained
fake-quant block (≤ 1e-5 relative); TesseraQ's codes survive re-rounding bit for bit (its merged
weight on the initial grid, the dequantized weight on the stored scales); the hardening schedule;
keep-if-better; the engine leaves the block's weights as they were; options are typed and checked
by name; both methods lower a tiny block's error and their checkpoints load (test_compose.py runs
them in every composition).
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import UnsupportedSizeError, ValueRangeError
from lowbit.grids import UniformGrid
from lowbit.methods.blockrecon import BlockData, fake_quantized, kept_if_better, reconstruct, split_batches
from lowbit.methods.let import LET
from lowbit.methods.omniquant import LWC, train_lwc
from lowbit.methods.omniquant import OPTIONS as OMNI_OPTIONS
from lowbit.methods.tesseraq import Rounding, rectified_sigmoid, rectified_sigmoid_inverse, train_tesseraq
from lowbit.models.adapters import get_adapter
from lowbit.models.tiny import random_ids, tiny_model
from lowbit.nn.quant_linear import QuantLinear
from lowbit.recipe import Recipe, WeightQuant

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weight(out=48, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * 0.05
    W[:, 5] *= 8  # an outlier column, so the clip matters
    return W


def _block(arch="llama", n=6, seqlen=16):
    """Decoder layer 0 of a tiny model, its captured inputs and full-precision outputs."""
    from lowbit.driver import _capture, _first

    model = tiny_model(arch, seed=2)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    ids = random_ids(n, seqlen, seed=1)
    inps, kwargs = _capture(model, layer, [(ids[i : i + 2], {"use_cache": False}) for i in range(0, n, 2)])
    with torch.no_grad():
        outs = [_first(layer(x, **kw)) for x, kw in zip(inps, kwargs)]
    linears = [item for g in adapter.linear_groups(layer) for item in g]
    return layer, linears, BlockData(inps, kwargs, outs, outs, adapter=adapter, dims=adapter.dims(model))


def _outputs(block, data):
    from lowbit.driver import _first

    with torch.no_grad():
        return torch.cat([_first(block(x, **kw)) for x, kw in zip(data.inps, data.kwargs)])


def _swap_packed(block, linears, quantizers):
    from lowbit.driver import _set_module

    for name, lin in linears:
        _set_module(block, name, QuantLinear.from_quantized(quantizers[name].quantized(lin.weight), lin.bias))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# OmniQuant LWC


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 64), (4, 32)])
def test_lwc_at_init_is_rtn_within_2_percent(bits, gs):
    W = _weight()
    grid = UniformGrid(bits=bits, group_size=gs)
    e_rtn = _rel(grid.quantize_weight(W).dequantize(), W)
    with torch.no_grad():
        e_lwc = _rel(LWC(W, grid)(W), W)
    assert abs(e_lwc / e_rtn - 1) <= 0.02, (e_lwc, e_rtn)


def test_lwc_merge_is_the_fake_quant_weight_and_packs():
    W = _weight()
    q = LWC(W, UniformGrid(bits=3, group_size=32))
    with torch.no_grad():
        q.gamma.uniform_(-1, 4)
        q.beta.uniform_(-1, 4)
        fake = q(W)
    qw = q.quantized(W)
    assert torch.equal(qw.scales, qw.scales.half().float())  # fp16-exact: the checkpoint stores them
    torch.testing.assert_close(qw.dequantize(), fake, rtol=0, atol=1e-7)
    torch.testing.assert_close(QuantLinear.from_quantized(qw).dequantize_weight(), fake, rtol=0, atol=1e-7)


def test_lwc_gradients_reach_both_logits():
    W = _weight()
    q = LWC(W, UniformGrid(bits=2, group_size=32))
    (q(W) - W).pow(2).sum().backward()
    assert q.gamma.grad.abs().sum() > 0 and q.beta.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_lwc_block_reproduces_the_trained_fake_quant_block(arch):
    block, linears, data = _block(arch)
    step = WeightQuant("omniquant", 2, 32)
    opts = {**OMNI_OPTIONS, "epochs": 3, "lr": 0.05, "init": 4.0, "aug_loss": True, "held_out": 0.2}
    lwcs, (before, after, kept) = train_lwc(step, block, linears, data, 0, opts)
    assert kept and after < before
    assert any(float((q.gamma.detach() - 4).abs().max()) > 1e-3 for q in lwcs.values())
    with fake_quantized(block, lwcs):
        fake = _outputs(block, data)
    _swap_packed(block, linears, lwcs)
    assert _rel(_outputs(block, data), fake) <= 1e-5


def test_lwc_init_mse_starts_from_the_mse_clip():
    W = _weight()
    grid = UniformGrid(bits=3, group_size=32)
    with torch.no_grad():
        got = LWC(W, grid, init="mse")(W)
    from dataclasses import replace

    want = replace(grid, mse=True).quantize_weight(W).dequantize()
    assert _rel(got, want) < 0.05 * _rel(want, W)  # the same clip, up to its fp16 rounding


# ---------------------------------------------------------------------------------------------
# LET


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_let_without_quantization_leaves_the_block_unchanged(arch):
    block, linears, data = _block(arch)
    assert data.dims.n_kv_heads < data.dims.n_heads  # GQA: the v→o and q·k scales are per KV head
    want = _outputs(block, data)
    let = LET(block, data.adapter, data.dims, data, alpha=0.75, fp16_norms=False)
    with torch.no_grad():
        for p in let.params():
            p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))  # away from the initialisation
    with fake_quantized(block, let.parametrizations(block, {})):
        assert _rel(_outputs(block, data), want) <= 1e-4
    let.merge(block)  # merged into the weights, norms and biases: still the same block
    assert _rel(_outputs(block, data), want) <= 1e-4


def test_let_identity_init_starts_as_the_clipping_alone():
    block, linears, data = _block()
    want = _outputs(block, data)
    let = LET(block, data.adapter, data.dims, data, init="identity", fp16_norms=False)
    assert all(torch.equal(p, torch.ones_like(p)) for p in let.params())
    smooth = LET(block, data.adapter, data.dims, data, alpha=0.5)
    assert not torch.equal(smooth.s_attn, torch.ones_like(smooth.s_attn))  # SmoothQuant's start is not 1
    plain = {name: lin.weight.detach().clone() for name, lin in linears}
    with fake_quantized(block, let.parametrizations(block, {})):
        for name, lin in linears:
            assert torch.equal(lin.weight, plain[name]), name
        assert _rel(_outputs(block, data), want) <= 1e-6
    with pytest.raises(ValueRangeError, match="init: must be one of"):
        LET(block, data.adapter, data.dims, data, init="awq")


def test_let_keeps_negative_norm_weights():
    # SmolLM2's norms have negative weights; the fp16 rounding of the transformed norms once
    # clamped them to +2^-24 like a scale (block 0's error 0.04 → 0.33 at the start)
    block, linears, data = _block()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in (data.adapter.attn_norm(block), data.adapter.mlp_norm(block)):
            norm.weight.copy_((torch.randn(norm.weight.shape, generator=g) * 0.3).half().float())
            assert bool((norm.weight < 0).any())
    want = _outputs(block, data)
    let = LET(block, data.adapter, data.dims, data, init="identity")  # fp16 norms, as trained
    with fake_quantized(block, let.parametrizations(block, {})):
        assert _rel(_outputs(block, data), want) <= 1e-6
    smooth = LET(block, data.adapter, data.dims, data, alpha=0.5)
    signs = torch.sign(data.adapter.attn_norm(block).weight.detach().clone())
    smooth.merge(block)
    assert torch.equal(torch.sign(data.adapter.attn_norm(block).weight), signs)
    assert _rel(_outputs(block, data), want) <= 1e-3  # up to the norms' fp16 rounding


def test_merged_let_and_lwc_block_reproduces_the_trained_block():
    block, linears, data = _block("qwen2")  # q/k/v biases: scaled with their rows
    step = WeightQuant("omniquant", 4, 32)
    opts = {**OMNI_OPTIONS, "epochs": 2, "let": True}
    let_start = LET(block, data.adapter, data.dims, data).s_attn.detach().clone()
    lwcs, (before, after, kept) = train_lwc(step, block, linears, data, 0, opts)
    assert after <= before
    # the block's norms and linears now hold the transformation; its packed form is the trained block
    norm = data.adapter.attn_norm(block).weight
    assert torch.equal(norm, norm.half().float())
    with fake_quantized(block, lwcs):
        fake = _outputs(block, data)
    _swap_packed(block, linears, lwcs)
    assert _rel(_outputs(block, data), fake) <= 1e-5
    assert let_start.shape == (data.dims.hidden,)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_affine_transform_without_quantization_leaves_the_block_unchanged(arch):
    from lowbit.methods.affinequant import AffineLET

    block, linears, data = _block(arch)
    want = _outputs(block, data)
    let = AffineLET(block, data.adapter, data.dims, data, fp16_norms=False)
    let.mask.fill_(1.0)  # the full matrices
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        let.A_vo.add_(0.02 * torch.randn(let.A_vo.shape, generator=g))
        let.qk_a.uniform_(0.5, 2.0, generator=g)
        let.qk_b.uniform_(-1.0, 1.0, generator=g)
    assert let.dominant()
    with fake_quantized(block, let.parametrizations(block, {})):
        assert _rel(_outputs(block, data), want) <= 1e-4  # exact through RoPE and GQA
    let.merge(block)
    assert _rel(_outputs(block, data), want) <= 1e-4


def test_affine_mask_widens_and_the_matrices_stay_dominant():
    from lowbit.methods.affinequant import AffineLET, band_mask

    block, linears, data = _block()
    let = AffineLET(block, data.adapter, data.dims, data, sf=0.5)
    assert torch.equal(let.mask, torch.eye(let.hd))  # epoch 0: diagonal only
    with torch.no_grad():
        let.A_vo.add_(torch.randn_like(let.A_vo))  # far from dominant once the band opens
    bands = []
    for step in range(12):  # 4 epochs of 3 steps
        let.on_step(step, 3, 4)
        bands.append(let.band)
        assert let.dominant()
    assert bands[0] == 1 and bands[-1] == let.hd and bands == sorted(bands)
    assert let.projections > 0
    assert torch.equal(band_mask(4, 2, 0.1), torch.tensor([[1, .1, 0, 0], [.1, 1, .1, 0], [0, .1, 1, .1], [0, 0, .1, 1]]))


def test_affinequant_lowers_the_block_error_and_its_packed_block_is_the_trained_one():
    from lowbit.methods.affinequant import OPTIONS as AFF_OPTIONS
    from lowbit.methods.affinequant import _make

    block, linears, data = _block("qwen2")
    step = WeightQuant("affinequant", 3, 32)
    seen = []

    def make(*a):
        t = _make(*a)
        seen.append(t)
        return t

    lwcs, (before, after, kept) = train_lwc(step, block, linears, data, 0, {**AFF_OPTIONS, "epochs": 3}, make_transform=make)
    assert after <= before and seen[0].band == seen[0].hd and seen[0].dominant()
    with fake_quantized(block, lwcs):
        fake = _outputs(block, data)
    _swap_packed(block, linears, lwcs)
    assert _rel(_outputs(block, data), fake) <= 1e-5


def test_svd_increment_at_zero_is_lwc_and_its_band():
    from lowbit.methods.cqe import SVDIncrement

    W = _weight()
    lwc = LWC(W, UniformGrid(bits=3, group_size=32))
    inc = SVDIncrement(W, 2, lwc)
    torch.testing.assert_close(inc.U @ torch.diag(torch.linalg.svdvals(W.double()).float()) @ inc.Vh, W, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(inc(W), lwc(W))  # D = 0: exactly LWC
        inc.d.normal_()
    D = inc.D()
    band = (torch.arange(D.shape[0])[:, None] - torch.arange(D.shape[0])[None, :]).abs() < 2
    assert bool((D[~band] == 0).all()) and bool((D[band] != 0).all())


def test_cqe_looks_ahead_and_its_packed_block_is_the_trained_one():
    from lowbit.driver import _capture
    from lowbit.methods.cqe import OPTIONS as CQE_OPTIONS
    from lowbit.methods.cqe import train_cqe

    model = tiny_model("llama", seed=2)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    block, nxt = layers[0], layers[1]
    ids = random_ids(6, 16, seed=1)
    inps, kwargs = _capture(model, block, [(ids[i : i + 2], {"use_cache": False}) for i in range(0, 6, 2)])
    outs = [_outputs(block, BlockData([x], [kw], [], [])) for x, kw in zip(inps, kwargs)]
    data = BlockData(inps, kwargs, outs, outs, adapter=adapter, dims=adapter.dims(model), following=[nxt])
    nxt_w = nxt.mlp.down_proj.weight.detach().clone()
    flag = nxt.mlp.down_proj.weight.requires_grad
    linears = [item for g in adapter.linear_groups(block) for item in g]
    lwcs, (before, after, kept) = train_cqe(WeightQuant("cqe", 3, 32), block, linears, data, 0, {**CQE_OPTIONS, "lookahead": 1})
    assert after <= before
    assert torch.equal(nxt.mlp.down_proj.weight, nxt_w) and nxt.mlp.down_proj.weight.requires_grad == flag
    assert nxt.mlp.down_proj.weight.grad is None  # the block ahead is read, never trained
    with fake_quantized(block, lwcs):
        fake = _outputs(block, data)
    _swap_packed(block, linears, lwcs)
    assert _rel(_outputs(block, data), fake) <= 1e-5
    from lowbit.methods.blockrecon import Reconstruction

    # the look-ahead term: the quantized block's error after the next block, added to its own
    assert Reconstruction(block, data, ahead=1).evaluate() > Reconstruction(block, data).evaluate() > 0


@pytest.mark.parametrize("method", ["affinequant", "cqe"])
def test_clip_first_ends_no_worse_than_lwc_alone(method):
    """``lwc_first``: the clip trains alone (exactly OmniQuant's LWC, same draw), then with the
    transformation, kept only if the held-back error goes down further — so the block's held-back
    error ends at most LWC's, and the clip-first start is LWC's own result."""
    import copy

    from lowbit.methods.affinequant import OPTIONS as AFF_OPTIONS
    from lowbit.methods.affinequant import _make
    from lowbit.methods.cqe import OPTIONS as CQE_OPTIONS
    from lowbit.methods.cqe import train_cqe

    block, linears, data = _block("qwen2")
    run = {"epochs": 3, "init": 4.0, "held_out": 0.2}
    b0 = copy.deepcopy(block)
    _, (lwc_before, lwc_after, _) = train_lwc(WeightQuant("omniquant", 2, 32), b0, _paths(b0, linears), data, 0,
                                              {**OMNI_OPTIONS, **run})
    assert lwc_after < lwc_before
    for first in (True, False):
        b = copy.deepcopy(block)
        lin = _paths(b, linears)
        if method == "affinequant":
            _, (before, after, _) = train_lwc(WeightQuant(method, 2, 32), b, lin, data, 0,
                                              {**AFF_OPTIONS, **run, "lwc_first": first}, make_transform=_make)
        else:
            _, (before, after, _) = train_cqe(WeightQuant(method, 2, 32), b, lin, data, 0,
                                              {**CQE_OPTIONS, **run, "lookahead": 0, "lwc_first": first})
        assert before == pytest.approx(lwc_before, rel=1e-6)  # the same start: the MSE clip
        if first:
            assert after <= lwc_after * (1 + 1e-6)


def _paths(block, linears):
    """``linears`` (path, module) re-pointed at the same paths of ``block`` (a copy)."""
    mods = dict(block.named_modules())
    return [(name, mods[name]) for name, _ in linears]


def test_fake_quantized_restores_the_weights_even_on_error():
    block, linears, _ = _block()
    name, lin = linears[0]
    W = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized(block, {name: LWC(W, UniformGrid(bits=2, group_size=32))}):
            assert not torch.equal(block.get_submodule(name).weight, W)
            raise RuntimeError("boom")
    lin = block.get_submodule(name)
    assert type(lin) is torch.nn.Linear and isinstance(lin.weight, torch.nn.Parameter)
    assert torch.equal(lin.weight, W)


# ---------------------------------------------------------------------------------------------
# TesseraQ


def test_rectified_sigmoid_inverse():
    p = torch.linspace(0, 0.999, 101)
    torch.testing.assert_close(rectified_sigmoid(rectified_sigmoid_inverse(p)), p, rtol=0, atol=1e-5)


def _rounding(W, bits=3, gs=32):
    grid = UniformGrid(bits=bits, group_size=gs)  # min-max: every weight inside the range
    qw = grid.quantize_weight(W)
    return Rounding(W, qw.scales, qw.zeros, grid), qw


def test_tesseraq_init_is_nearest_and_soft_init_is_the_weight():
    W = _weight()
    r, qw = _rounding(W)
    with torch.no_grad():
        assert torch.equal(r.codes().to(torch.uint8), qw.codes)  # hard at first: round to nearest
        r.release()
        # soft: the weight itself, wherever the grid reaches it (the zero point's rounding moves
        # the range by up to half a step, so a group's extreme weight can fall outside)
        x = r.base + r.frac + r.zero[:, r.gidx]
        inside = (x >= 0) & (x <= r.grid.maxq)
        assert float(inside.float().mean()) > 0.95
        torch.testing.assert_close(r(W)[inside], W[inside], rtol=1e-6, atol=1e-7)


def test_tesseraq_hardening_schedule():
    W = _weight()
    r, _ = _rounding(W)
    r.release()
    with torch.no_grad():
        r.nu.add_(torch.randn_like(r.nu))
    seen = r.hard.clone()
    for q in (0.8, 0.5, 0.1):
        r.harden(q)
        assert abs(float(r.hard.float().mean()) - (1 - q)) <= 0.01
        assert bool((r.hard | ~seen).all())  # hard stays hard
        seen = r.hard.clone()
    leaning = rectified_sigmoid(r.nu) > 0.5
    r.harden(0.0)
    assert bool(r.hard.all())
    assert torch.equal(r.up[~seen], leaning[~seen])  # the last soft ones round the way they lean


def test_tesseraq_merge_survives_rerounding_bit_for_bit():
    W = _weight()
    r, qw = _rounding(W, bits=2)
    grid = r.grid
    r.release()
    with torch.no_grad():
        r.nu.add_(2 * torch.randn_like(r.nu))
        r.v.uniform_(-0.3, 0.3)
    r.harden(0.0)
    codes = r.codes().to(torch.uint8)
    assert not torch.equal(codes, qw.codes)  # the rounding changed
    # the official code's merge: plain rounding of the merged weight on the initial grid
    gidx = torch.arange(W.shape[1]) // 32
    assert torch.equal(grid.quantize(r.merged_weight(W), qw.scales[:, gidx], qw.zeros[:, gidx]), codes)
    # the stored layer: the learned codes, and re-rounding its weight on its scales gives them back
    out = r.quantized(W)
    ql = QuantLinear.from_quantized(out)
    assert torch.equal(out.codes, codes)
    assert torch.equal(grid.quantize(ql.dequantize_weight(), out.scales[:, gidx], out.zeros[:, gidx]), codes)
    with torch.no_grad():
        torch.testing.assert_close(ql.dequantize_weight(), r(W), rtol=0, atol=1e-7)


@pytest.mark.parametrize("init", ["rtn", "lwc", "gptq"])
def test_merged_tesseraq_block_reproduces_the_trained_block(init):
    block, linears, data = _block()
    groups = get_adapter(tiny_model("llama")).linear_groups(block)
    step = WeightQuant("tesseraq", 2, 32)
    from lowbit.methods.registry import weight_method

    opts = {**weight_method("tesseraq").options, "init": init, "lwc_epochs": 1, "stage_steps": 12, "thresholds": [0.5, 0.2, 0.05]}
    roundings, (before, after, kept), _ = train_tesseraq(step, block, groups, data, 0, opts)
    # on the tiny random block only GPTQ's start leaves room to learn (RTN's and LWC's MSE clips
    # are already its held-back optimum), so that case pins that a trained rounding merges
    assert after <= before and (kept or init != "gptq")
    assert all(bool(r.hard.all()) for r in roundings.values())
    with fake_quantized(block, roundings):
        fake = _outputs(block, data)
    _swap_packed(block, linears, roundings)
    assert _rel(_outputs(block, data), fake) <= 1e-5


def test_tesseraq_gptq_init_starts_from_gptqs_codes():
    from lowbit.methods.gptq import gptq
    from lowbit.methods.tesseraq import _init_grid

    block, linears, data = _block()
    groups = get_adapter(tiny_model("llama")).linear_groups(block)
    step = WeightQuant("gptq", 3, 32)  # act-order on: the codes are stored permuted
    grid, init, _ = _init_grid(step, block, groups, data, 0, {"init": "gptq"})
    from lowbit.methods.tesseraq import input_hessians

    H = input_hessians(block, groups, data)[0]
    name, lin = groups[0][0]
    want = gptq(lin.weight.detach().float(), H, UniformGrid(bits=3, group_size=32, mse=True), damp=step.damp, act_order=True)
    r = Rounding(*init[name][:3], grid, perm=init[name][3])
    got = r.quantized(None)
    assert torch.equal(got.codes, want.qweight.codes) and torch.equal(got.perm, want.qweight.perm)
    with torch.no_grad():
        torch.testing.assert_close(r(None), want.qweight.dequantize(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the engine


def test_kept_if_better_restores_a_worse_or_nan_training():
    p = torch.nn.Parameter(torch.ones(3))
    b = torch.zeros(3, dtype=torch.bool)
    loss = {"v": 1.0}

    def worse():
        with torch.no_grad():
            p.mul_(5)
        b.fill_(True)
        loss["v"] = float("nan")

    before, after, kept = kept_if_better([p, b], lambda: loss["v"], worse)
    assert not kept and after == before == 1.0
    assert torch.equal(p.detach(), torch.ones(3)) and not bool(b.any())


def test_reconstruct_holds_back_sequences_and_restores_grad_flags():
    block, linears, data = _block(n=8)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    seen = []
    norm = [p for n, p in block.named_parameters() if "norm" in n][0]
    orig_loss = None

    def train(recon):
        nonlocal orig_loss
        held = {id(it[0]) for it in recon.held}
        seen.extend(id(it[0]) for it in recon.train if id(it[0]) in held)
        assert len(recon.held) == 2 and len(recon.train) == 6  # 8 sequences, a quarter held back
        orig_loss = recon.evaluate()

    reconstruct(block, data, [{"params": [norm], "lr": 1e-3}], held_out=0.25, train=train)
    assert not seen and orig_loss is not None
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags


def test_split_batches_slices_the_kwargs():
    block, linears, data = _block(n=6)
    items = split_batches(data.inps, data.kwargs, data.targets, batch=1)
    assert len(items) == 6 and all(x.shape[0] == 1 and t.shape == x.shape for x, _, t in items)


# ---------------------------------------------------------------------------------------------
# the recipe and the loop


def test_methods_lower_the_block_error_of_a_tiny_model(tmp_path):
    calib = random_ids(8, 32, seed=1)
    for method, opts in (("omniquant", {"epochs": 4, "lr": 0.01}), ("tesseraq", {"init": "gptq", "stage_steps": 4})):
        model = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant(method, 2, 32, options=opts)], calib, progress=False)
        report = model.lowbit_report
        assert report.finetune and all(a <= b for b, a in report.finetune.values())
        assert any(a < b for b, a in report.finetune.values())
        assert {s.method for s in report.layers} == {method}
        loaded = lowbit.load(lowbit.save(model, tmp_path / method))
        ids = random_ids(2, 16, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_options_are_checked_by_name_and_value():
    with pytest.raises(ValueRangeError, match="options: the 'omniquant' weight method has no option"):
        WeightQuant("omniquant", 3, 64, options={"epoch": 2})
    with pytest.raises(ValueRangeError, match="options: epochs"):
        WeightQuant("omniquant", 3, 64, options={"epochs": -1})
    with pytest.raises(ValueRangeError, match="options: init"):
        WeightQuant("tesseraq", 3, 64, options={"init": "gptq-ish"})
    with pytest.raises(ValueRangeError, match="options: thresholds"):
        WeightQuant("tesseraq", 3, 64, options={"thresholds": [0.5, 1.5]})
    with pytest.raises(ValueRangeError, match="options: the 'gptq' weight method has no option"):
        WeightQuant("gptq", 3, 64, options={"epochs": 2})
    with pytest.raises(UnsupportedSizeError, match="kind: the 'omniquant' method trains uniform grids only"):
        WeightQuant("omniquant", 2, 64, kind="ternary")
    with pytest.raises(ValueRangeError, match="options: let is what AffineQuant is"):
        WeightQuant("affinequant", 3, 64, options={"let": False})
    with pytest.raises(ValueRangeError, match="options: let_init must be one of"):
        WeightQuant("affinequant", 3, 64, options={"let_init": "ones"})
    with pytest.raises(ValueRangeError, match=r"options: the 'cqe' weight method has no option\(s\) \['let_init'\]"):
        WeightQuant("cqe", 3, 64, options={"let_init": "identity"})
    with pytest.raises(ValueRangeError, match="options: sf"):
        WeightQuant("affinequant", 3, 64, options={"sf": 2.0})
    with pytest.raises(ValueRangeError, match="options: lwc_first must be a bool"):
        WeightQuant("cqe", 3, 64, options={"lwc_first": "yes"})
    with pytest.raises(ValueRangeError, match="options: lwc_first must be a bool"):
        WeightQuant("affinequant", 3, 64, options={"lwc_first": 1})
    with pytest.raises(ValueRangeError, match="options: must be a dict"):
        WeightQuant("tesseraq", 3, 64, options=[("lr", 1)])


def test_options_travel_with_the_recipe():
    r = Recipe((WeightQuant("tesseraq", 2, 32, options={"thresholds": (0.5, 0.1), "lr": 0.02}),))
    back = Recipe.from_list(r.to_list())
    assert back.weight.options == {"thresholds": [0.5, 0.1], "lr": 0.02}
    assert back.needs_calibration
    assert lowbit.recipe.PRESETS["w2-omniquant"].weight.options == {"aug_loss": True}
