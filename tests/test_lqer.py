"""LQER / L²QER (methods/lqer.py) and the low-rank branch they attach (nn/lowrank.py).

What is pinned: full rank reconstructs the error exactly; a unit scale is the plain SVD; each
variant is optimal in its own norm (Eckart–Young on the scaled error); the input magnitudes are
L²QER's (batch mean of |x|, max over batches, after the online Hadamard); a branch adds exactly
``x·(A·B)`` to the stored layer's product, after its input transform; the branch's bytes count in
bits per weight; the step lowers the weight error of a tiny model and is reported per layer;
bad input gets typed errors (the checkpoint entry included). The compositions are in
test_compose.py (``test_lowrank_composes``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from checkpoint_tools import edit_config
from lowbit.errors import CheckpointError, ShapeError, ValueRangeError
from lowbit.grids import UniformGrid
from lowbit.methods.lqer import input_magnitudes, lqer_factors, normalised_scale
from lowbit.models.tiny import random_ids, tiny_model
from lowbit.nn import QUANT_LINEARS, QuantLinear
from lowbit.nn.lowrank import LowRankBranch, attach_lowrank, lowrank_of
from lowbit.nn.online import InputTransform, attach_input_transform, online_hadamard
from lowbit.recipe import LowRank, Recipe, VectorQuant, WeightQuant

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _error(out=24, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.01


def _scale(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 3 + 0.05


def test_full_rank_reconstructs_the_error_exactly():
    E = _error()
    for s in (None, _scale()):
        A, B = lqer_factors(E, min(E.shape), s)
        torch.testing.assert_close((A @ B).t(), E, rtol=0, atol=1e-6)


def test_unit_scale_is_the_plain_svd():
    E = _error()
    A1, B1 = lqer_factors(E, 5, torch.ones(E.shape[1]))
    A0, B0 = lqer_factors(E, 5)
    torch.testing.assert_close(A1 @ B1, A0 @ B0, rtol=0, atol=1e-7)
    U, S, Vh = torch.linalg.svd(E.t().double(), full_matrices=False)
    torch.testing.assert_close(A0 @ B0, (U[:, :5] * S[:5] @ Vh[:5]).float(), rtol=0, atol=1e-7)


def test_each_variant_is_optimal_in_its_own_norm():
    E, s = _error(), _scale()
    Ap, Bp = lqer_factors(E, 4)
    As, Bs = lqer_factors(E, 4, s)
    plain = lambda A, B: float((E.t() - A @ B).norm())  # noqa: E731
    scaled = lambda A, B: float((s[:, None] * (E.t() - A @ B)).norm())  # noqa: E731
    assert scaled(As, Bs) < scaled(Ap, Bp) * 0.99
    assert plain(Ap, Bp) < plain(As, Bs) * 0.99
    # a rescaled s gives the same branch (the normalisation is only numerics)
    A2, B2 = lqer_factors(E, 4, s * 37.0)
    torch.testing.assert_close(A2 @ B2, As @ Bs, rtol=0, atol=1e-7)


def test_normalised_scale_clamps_and_centres():
    s = normalised_scale(torch.tensor([0.0, 1e-6, 2.0, 8.0]))
    assert float(s.min() * s.max()) == pytest.approx(1.0)
    assert float(s[0]) == float(s[1])  # both clamped at the floor


def test_lqer_factors_refuses_bad_input():
    E = _error()
    with pytest.raises(ValueRangeError, match="rank: must be an int in"):
        lqer_factors(E, 0)
    with pytest.raises(ValueRangeError, match="rank: must be an int in"):
        lqer_factors(E, 25)
    with pytest.raises(ShapeError, match="scale: must have shape"):
        lqer_factors(E, 2, torch.ones(3))
    with pytest.raises(ValueRangeError, match="scale: must be finite and positive"):
        lqer_factors(E, 2, torch.zeros(E.shape[1]))
    bad = E.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueRangeError, match="error: has NaN"):
        lqer_factors(bad, 2)
    with pytest.raises(ShapeError, match="error: must be a 2-D float tensor"):
        lqer_factors(E[0], 2)


def _qlinear(out=24, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * 0.05
    qw = UniformGrid(bits=3, group_size=16).quantize_weight(W)
    return W, QuantLinear.from_quantized(qw, torch.randn(out, generator=g) * 0.1)


@pytest.mark.parametrize("hadamard,act", [(False, None), (True, None), (True, {"bits": 8, "sym": True, "clip_ratio": 1.0})])
def test_branch_adds_x_times_ab_after_the_input_transform(hadamard, act):
    W, ql = _qlinear()
    x = torch.randn(3, 5, 32)
    if hadamard or act:
        attach_input_transform(ql, InputTransform(hadamard=hadamard, act=act))
    with torch.no_grad():
        base = ql(x)
        A, B = torch.randn(32, 4) * 0.1, torch.randn(4, 24) * 0.1
        attach_lowrank(ql, LowRankBranch.from_factors(A, B))
        got = ql(x)
        xt = online_hadamard(x) if hadamard else x
        if act:
            xt = ql.lowbit_input.act(xt)
    torch.testing.assert_close(got, base + (xt @ A) @ B, rtol=1e-5, atol=1e-5)
    # its bytes are counted: 16 bits per element of A and B
    plain = (ql.qweight.numel() * 8 + ql.scales.numel() * 16 + (0 if ql.zeros is None else ql.zeros.numel() * 16)) / (24 * 32)
    assert ql.bits_per_weight() == pytest.approx(plain + 16 * 4 * (32 + 24) / (24 * 32))
    with torch.no_grad():
        attach_lowrank(ql, None)
        torch.testing.assert_close(ql(x), base, rtol=0, atol=0)


def test_branch_refuses_what_cannot_run_it():
    W, ql = _qlinear()
    with pytest.raises(ValueRangeError, match="does not run a low-rank branch"):
        attach_lowrank(torch.nn.Linear(32, 24), LowRankBranch(32, 24, 2))
    with pytest.raises(ShapeError, match="branch: is 24 → 32"):
        attach_lowrank(ql, LowRankBranch(24, 32, 2))
    with pytest.raises(ValueRangeError, match="rank: must be at most"):
        LowRankBranch(32, 24, 25)
    with pytest.raises(ShapeError, match="inner sizes differ"):
        LowRankBranch.from_factors(torch.zeros(32, 2), torch.zeros(3, 24))
    with pytest.raises(ValueRangeError, match="A: has NaN"):
        LowRankBranch.from_factors(torch.full((32, 2), float("nan")), torch.zeros(2, 24))


def test_input_magnitudes_are_batch_means_then_the_max():
    model = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 4, 32)], progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS)}
    name = next(n for n in layers if n.endswith("mlp.down_proj"))
    attach_input_transform(layers[name], InputTransform(hadamard=True))
    calib = random_ids(4, 16, seed=1)
    seen = []
    h = layers[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        mags = input_magnitudes(model, {name: layers[name]}, calib, batch_size=2)
    finally:
        h.remove()
    assert len(seen) == 2
    want = torch.maximum(*[online_hadamard(x).abs().reshape(-1, x.shape[-1]).mean(0) for x in seen])
    torch.testing.assert_close(mags[name], want, rtol=1e-6, atol=1e-7)


def _fp_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


_BASES = {
    "rtn": WeightQuant("rtn", 3, 32),
    "quip": VectorQuant("quip", 2, finetune_steps=0, e2e_steps=0),
    "omniquant": WeightQuant("omniquant", 3, 32, options={"epochs": 1}),
}


@pytest.mark.parametrize("method,base_method", [("lqer", "rtn"), ("l2qer", "rtn"), ("l2qer", "quip"), ("l2qer", "omniquant")])
def test_lowrank_step_lowers_the_weight_error_and_is_reported(method, base_method):
    calib = random_ids(4, 32, seed=1)
    fp = tiny_model("llama", seed=2)
    W = _fp_weights(fp)
    step = _BASES[base_method]
    base = lowbit.quantize(tiny_model("llama", seed=2), [step], calib, progress=False)
    comp = lowbit.quantize(tiny_model("llama", seed=2), [step, LowRank(method, 4)], calib, progress=False)
    rows = {s.name: s for s in comp.lowbit_report.layers}
    base_rows = {s.name: s for s in base.lowbit_report.layers}
    assert set(rows) == set(W)
    for n, m in comp.named_modules():
        if n in W:
            b = lowrank_of(m)
            assert b is not None and b.rank == 4
            err = float((m.dequantize_weight() + b.delta_weight() - W[n]).norm() / W[n].norm())
            assert rows[n].method == f"{base_method}+{method}" and rows[n].rel_weight_error == pytest.approx(err, rel=1e-4)
            assert err < base_rows[n].rel_weight_error
            assert rows[n].bits == pytest.approx(base_rows[n].bits + 16 * 4 * (m.in_features + m.out_features) / (m.in_features * m.out_features))
            assert torch.equal(b.A, b.A.half().float()) and torch.equal(b.B, b.B.half().float())  # what fp16 stores
    # the quantized model's output moves towards the full-precision one
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        want = fp(ids).logits
        assert float((comp(ids).logits - want).norm()) < float((base(ids).logits - want).norm())


def test_lowrank_step_is_checked():
    with pytest.raises(ValueRangeError, match="rank: must be an int"):
        LowRank("l2qer", 0)
    with pytest.raises(ValueRangeError, match="method: unknown low-rank method 'svd'"):
        LowRank("svd", 4)
    with pytest.raises(ValueRangeError, match="has no weight step"):
        Recipe((LowRank("lqer", 4),))
    assert LowRank("l2qer").needs_calibration and not LowRank("lqer").needs_calibration
    assert Recipe((LowRank("lqer", 4), WeightQuant("rtn", 3, 32))).steps[1].step == "lowrank"  # after the weight step
    with pytest.raises(ValueRangeError, match="rank: 64 is more than"):
        lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32), LowRank("lqer", 64)], progress=False)
    with pytest.raises(ShapeError, match="calib"):
        lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32), LowRank("l2qer", 4)], progress=False)


def test_checkpoint_entry_of_the_branch_is_checked(tmp_path):
    model = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32), LowRank("lqer", 4)], progress=False)
    ck = lowbit.save(model, tmp_path / "ck")
    name = next(n for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS))
    for bad, msg in (({"rank": 0}, "lowrank.rank: must be an int in"), ({"rank": 4, "x": 1}, "lowrank: must be an object"),
                     ({"rank": 10**9}, "lowrank.rank: must be an int in"), ("4", "lowrank: must be an object")):
        edit_config(ck, lambda cfg, bad=bad: cfg["quantization_config"]["layers"][name].update({"lowrank": bad}))
        with pytest.raises(CheckpointError, match=msg):
            lowbit.load(ck)
    # a rank that disagrees with the stored A/B: the shapes are checked
    edit_config(ck, lambda cfg: cfg["quantization_config"]["layers"][name].update({"lowrank": {"rank": 3}}))
    with pytest.raises(CheckpointError, match="lowbit_lowrank.A: shape"):
        lowbit.load(ck)
    # without the entry the branch's tensors are unexpected
    edit_config(ck, lambda cfg: cfg["quantization_config"]["layers"][name].pop("lowrank"))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        lowbit.load(ck)


def test_quantized_forward_is_the_dense_product_with_the_branch():
    W, ql = _qlinear()
    A, B = torch.randn(32, 3) * 0.1, torch.randn(3, 24) * 0.1
    attach_lowrank(ql, LowRankBranch.from_factors(A, B))
    x = torch.randn(4, 32)
    with torch.no_grad():
        dense = ql.dequantize_weight() + lowrank_of(ql).delta_weight()
        torch.testing.assert_close(ql(x), F.linear(x, dense, ql.bias), rtol=1e-5, atol=1e-5)


def test_inspect_shows_each_branch_and_its_bits(capsys, tmp_path):
    from lowbit.cli import main

    model = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32), LowRank("lqer", 4)], progress=False)
    ck = lowbit.save(model, tmp_path / "ck")
    assert main(["inspect", str(ck)]) == 0
    out = capsys.readouterr().out
    m = model.model.layers[0].mlp.down_proj
    assert f"r4 (+{16 * 4 * (m.in_features + m.out_features) / (m.in_features * m.out_features):.3f} b/w)" in out
    n = sum(isinstance(x, QUANT_LINEARS) for x in model.modules())
    line = next(ln for ln in out.splitlines() if ln.startswith("low-rank branches"))
    assert f"{n} linears, " in line


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_forward_adds_the_branch(dtype):
    """On CUDA the packed weight runs on lowbit's kernel and the branch through torch's (cuBLAS)
    matmuls; the result is the CPU layer's."""
    W, ql = _qlinear(out=64, n=128)
    attach_lowrank(ql, LowRankBranch.from_factors(torch.randn(128, 8) * 0.05, torch.randn(8, 64) * 0.05))
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = ql(x).double()
        g = ql.to("cuda")
        assert g.use_cuda_kernels(x.to("cuda", dtype))
        got = g(x.to("cuda", dtype)).double().cpu()
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


# ----------------------------------------------------------------------------------------------
# RILQ (methods/rilq.py): the branches trained on the model-wise loss


def test_reference_forward_is_the_full_precision_model_even_rotated(monkeypatch):
    """The RILQ targets come from the float weights the weight step quantized: with QuaRot's
    rotation folded in, they are still the full-precision model's output."""
    from lowbit.methods import rilq
    from lowbit.recipe import Rotate

    calib = random_ids(4, 16, seed=1)
    with torch.no_grad():
        want = tiny_model("llama", seed=2)(calib).logits
    seen = {}
    real = rilq.reference_forward

    from contextlib import contextmanager

    @contextmanager
    def spy(model, references):
        with real(model, references):
            seen["logits"] = model(calib).logits.detach()
            yield

    monkeypatch.setattr(rilq, "reference_forward", spy)
    lowbit.quantize(tiny_model("llama", seed=2), [Rotate("quarot"), WeightQuant("rtn", 2, 32), LowRank("rilq", 2, options={"steps": 2})],
                    calib, progress=False)
    torch.testing.assert_close(seen["logits"], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _rilq_setup(rank=4):
    from lowbit.methods.lqer import attach_lqer
    from lowbit.methods.rilq import OPTIONS, _hidden_and_logits

    calib = random_ids(1, 32, seed=1).repeat(6, 1)  # random text does not generalise: held-back = trained-on text
    fp = tiny_model("llama", seed=2)
    refs = {f"model.{n}": w for n, w in ((k[len("model."):], v) for k, v in _fp_weights(fp).items())}
    with torch.no_grad():
        targets = _hidden_and_logits(fp, calib)[0]
    q = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 2, 32)], progress=False)
    attach_lqer(q, refs, rank, calib, scaled=True)
    branches = [lowrank_of(m) for m in q.modules() if isinstance(m, QUANT_LINEARS)]
    return q, branches, calib, targets, dict(OPTIONS)


def test_rilq_training_lowers_the_held_back_loss():
    from lowbit.methods.rilq import train_branches

    q, branches, calib, targets, opts = _rilq_setup()
    start_A = branches[0].A.detach().clone()
    start, best, ran = train_branches(q, branches, calib, targets, {**opts, "steps": 30, "lr": 1e-3, "eval_every": 10})
    assert best < start and ran == 30
    assert not torch.equal(branches[0].A, start_A)
    assert not any(p.requires_grad or p.grad is not None for b in branches for p in (b.A, b.B))  # frozen again


def test_rilq_keeps_the_best_and_stops_early():
    from lowbit.methods.rilq import train_branches

    q, branches, calib, targets, opts = _rilq_setup()
    start_A = [b.A.detach().clone() for b in branches]
    start, best, ran = train_branches(q, branches, calib, targets, {**opts, "steps": 50, "lr": 10.0, "eval_every": 1, "patience": 2})
    assert ran == 2 and best == start  # a diverging step never beats the start: stopped after 2 misses, start kept
    assert all(torch.equal(b.A, a) for b, a in zip(branches, start_A))


def test_rilq_step_options_are_checked():
    with pytest.raises(ValueRangeError, match="options: the 'rilq' lowrank method has no option"):
        LowRank("rilq", 4, options={"epochs": 2})
    with pytest.raises(ValueRangeError, match="options: the 'lqer' lowrank method has no option"):
        LowRank("lqer", 4, options={"steps": 2})
    with pytest.raises(ValueRangeError, match="options: steps"):
        LowRank("rilq", 4, options={"steps": -1})
    with pytest.raises(ValueRangeError, match="options: patience must be a positive int"):
        LowRank("rilq", 4, options={"patience": 0})
    with pytest.raises(ValueRangeError, match="both 0"):
        LowRank("rilq", 4, options={"w_hidden": 0, "w_ce": 0})
    assert LowRank("rilq", 4).needs_calibration
    step = LowRank("rilq", 4, options={"steps": 3})
    assert lowbit.recipe.step_from_dict(step.to_dict()) == step  # a recipe that saves must load


# ----------------------------------------------------------------------------------------------
# the peft adapter export (io/peft_adapter.py)


def _dense_equivalent(q, arch="llama"):
    """A plain transformers model computing what ``q`` computes without its branches."""
    dense = tiny_model(arch, seed=2)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, mod in dense.named_modules():
            src = qmods.get(name)
            if isinstance(src, QUANT_LINEARS):
                mod.weight.copy_(src.dequantize_weight())
                if mod.bias is not None:
                    mod.bias.copy_(src.bias)
        qparams = dict(q.named_parameters())
        for n, p in dense.named_parameters():
            if n in qparams and qparams[n].shape == p.shape and "lowbit_lowrank" not in n:
                p.copy_(qparams[n])
    return dense


def test_peft_adapter_loads_onto_the_dense_equivalent(tmp_path):
    peft = pytest.importorskip("peft")
    from lowbit.io.peft_adapter import save_peft_adapter

    q = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32), LowRank("lqer", 4)], progress=False)
    out = save_peft_adapter(q, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "lowbit_manifest.json"]
    ids = random_ids(2, 16, seed=3)
    model = peft.PeftModel.from_pretrained(_dense_equivalent(q), str(out))
    with torch.no_grad():
        want = q(ids).logits
        got = model(ids).logits
        without = _dense_equivalent(q)(ids).logits
    assert float((without - want).abs().max()) > 1e-3  # the adapter is what closes the gap
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(CheckpointError, match="already exists"):
        save_peft_adapter(q, out)
    assert save_peft_adapter(q, out, overwrite=True) == out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        save_peft_adapter(q, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_peft_adapter_refuses_what_lora_cannot_express(tmp_path):
    from lowbit.io.peft_adapter import save_peft_adapter
    from lowbit.recipe import Rotate

    plain = lowbit.quantize(tiny_model("llama", seed=2), [WeightQuant("rtn", 3, 32)], progress=False)
    with pytest.raises(ValueRangeError, match="no low-rank branches"):
        save_peft_adapter(plain, tmp_path / "a")
    rotated = lowbit.quantize(tiny_model("llama", seed=2), [Rotate("quarot"), WeightQuant("rtn", 3, 32), LowRank("lqer", 2)], progress=False)
    with pytest.raises(ValueRangeError, match="online Hadamard"):
        save_peft_adapter(rotated, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
