"""Rotations (QuaRot / SpinQuant surgery), the online transforms and the activation quantizer."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import ShapeError, UnsupportedModelError, ValueRangeError
from lowbit.methods.quarot import quarot, quarot_rotations
from lowbit.methods.rotation import Rotations, apply_rotations, fuse_norms, hadamard_summary
from lowbit.methods.spinquant import CayleySGD, learn_rotations
from lowbit.models.tiny import TINY_ARCHS, random_ids, tiny_model
from lowbit.nn import ActQuantizer, InputTransform, QuantLinear, attach_input_transform, online_hadamard
from lowbit.nn.attention import attention_config



def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _llama_like(hidden: int, heads: int, kv_heads: int, intermediate: int, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # give the norms non-trivial scales so that folding them is tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_quarot_is_exact_in_full_precision(arch, tied):
    model = tiny_model(arch, seed=1, tie_word_embeddings=tied)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = random_ids(2, 48)
    ref = model(ids).logits
    rot = quarot(model, seed=3)
    out = model(ids).logits
    assert _rel(out, ref) <= 1e-3
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    # the norms now carry no scale, and R3 / R4 are attached
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert attention_config(model.model.layers[0].self_attn)["rotate_qk"] is True
    assert model.model.layers[0].mlp.down_proj.lowbit_input.hadamard
    assert rot.source == "quarot"


@torch.no_grad()
def test_quarot_on_the_real_model_widths():
    """576 = 36·16 (R1) and 1536 = 12·128 (R4): the sizes where power-of-two-only code fails."""
    model = _llama_like(576, 9, 3, 1536)
    ids = random_ids(1, 64)
    ref = model(ids).logits
    rot = quarot(model, seed=0)
    assert _rel(model(ids).logits, ref) <= 1e-3
    plans = hadamard_summary(model, rot)
    assert plans == {"R1 (576)": plans["R1 (576)"], "R2 (64)": "2^6", "R3 (64)": "2^6", "R4 (1536)": plans["R4 (1536)"]}
    assert "36" in plans["R1 (576)"] and "12" in plans["R4 (1536)"]
    assert not any(p.startswith("fallback") for p in plans.values())


@torch.no_grad()
def test_sizes_without_hadamard_use_the_reported_fallback():
    model = _llama_like(88, 4, 2, 176)  # 88 = 8·11, head dim 22: no exact Hadamard
    ids = random_ids(1, 32)
    ref = model(ids).logits
    rot = quarot(model, seed=0)
    assert _rel(model(ids).logits, ref) <= 1e-3
    plans = hadamard_summary(model, rot)
    assert plans["R1 (88)"].startswith("fallback") and plans["R2 (22)"].startswith("fallback")


def test_rotation_needs_an_adapter():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported model types: llama"):
        quarot(gpt2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        lowbit.quantize(gpt2, "w4a4kv4-quarot", random_ids(1, 8, vocab_size=64), progress=False)


def test_rotation_refuses_quantized_layers():
    model = lowbit.quantize(tiny_model("llama"), "w4-rtn", progress=False)
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quarot(model)


def test_apply_rotations_checks_its_matrices():
    model = tiny_model("llama")
    fuse_norms(model)
    with pytest.raises(ShapeError, match="r1: expected a \\(64, 64\\)"):
        apply_rotations(model, Rotations(r1=torch.eye(32, dtype=torch.float64)))
    with pytest.raises(ShapeError, match="r1: not orthogonal"):
        apply_rotations(model, Rotations(r1=2 * torch.eye(64, dtype=torch.float64)))


def test_quarot_rotations_are_random_hadamards():
    rot = quarot_rotations(576, 64, 3, seed=5)
    assert rot.r1.shape == (576, 576) and rot.r1.dtype == torch.float64
    assert torch.allclose(rot.r1.T @ rot.r1, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rot.r1.abs(), torch.full((576, 576), 576**-0.5, dtype=torch.float64))
    assert torch.equal(rot.r1, torch.from_numpy(lowbit.random_hadamard(576, 5, dtype="float64")))
    assert len(rot.r2) == 3


# ---------------------------------------------------------------------------------------------
# online transforms and the activation quantizer


def test_online_hadamard_matches_the_matrix_and_its_gradient():
    x = torch.randn(3, 5, 1536, dtype=torch.float64, requires_grad=True)
    H = torch.from_numpy(lowbit.hadamard_matrix(1536))
    y = online_hadamard(x)
    assert torch.allclose(y, x.detach() @ H, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ H.T, atol=1e-12)
    with pytest.raises(ShapeError, match="x: online_hadamard"):
        online_hadamard(torch.ones(4, dtype=torch.int32))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_quantizer_per_token_error_bound(sym, bits):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 96) * torch.rand(4, 7, 1) * 10
    q = ActQuantizer(bits=bits, sym=sym, clip_ratio=1.0)
    codes, scale, zero = q.quantize(x)
    assert torch.equal(codes, codes.round())
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert codes.min() >= lo and codes.max() <= hi
    xq = q(x)
    assert ((xq - x).abs() <= scale.squeeze(-1) * 0.5 + 1e-6).all()
    assert codes.shape == (4, 7, 1, 96) and scale.shape == (4, 7, 1, 1)
    # groups: one scale per 32 channels
    codes_g, scale_g, _ = ActQuantizer(bits, sym, group_size=32).quantize(x)
    assert scale_g.shape == (4, 7, 3, 1)


def test_act_quantizer_straight_through_gradient_and_errors():
    x = torch.randn(2, 8, requires_grad=True)
    ActQuantizer(4)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 8))
    with pytest.raises(ValueRangeError, match="bits"):
        ActQuantizer(bits=1)
    with pytest.raises(ValueRangeError, match="clip_ratio"):
        ActQuantizer(clip_ratio=1.5)
    with pytest.raises(ShapeError, match="group_size"):
        ActQuantizer(4, group_size=5).quantize(torch.randn(2, 8))


@pytest.mark.parametrize("group_size", [None, 32])
def test_quant_linear_multiplies_integer_activations(group_size):
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 48)
    from lowbit.grids import UniformGrid
    from lowbit.methods import rtn

    ql = QuantLinear.from_quantized(rtn(lin.weight.detach(), UniformGrid(bits=4, group_size=32)), lin.bias.detach())
    t = InputTransform(hadamard=True, act={"bits": 4, "sym": True, "clip_ratio": 0.9, "group_size": group_size})
    attach_input_transform(ql, t)
    x = torch.randn(3, 10, 128)
    y = ql(x)
    # reference: fake-quantize the rotated input, then the dense product
    ref = torch.nn.functional.linear(t.act(online_hadamard(x)), ql.dequantize_weight(), ql.bias)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    # no pre-hook on a QuantLinear: the transform is applied once, in forward
    assert not ql._forward_pre_hooks
    # on an nn.Linear the same transform runs as a pre-hook
    dense = torch.nn.Linear(128, 48)
    dense.weight.data = ql.dequantize_weight()
    dense.bias.data = ql.bias.detach().clone()
    attach_input_transform(dense, t)
    assert torch.allclose(dense(x), ref, atol=1e-5)
    attach_input_transform(dense, None)
    assert torch.allclose(dense(x), torch.nn.functional.linear(x, dense.weight, dense.bias))


# ---------------------------------------------------------------------------------------------
# SpinQuant


def test_cayley_sgd_stays_orthogonal_and_solves_procrustes():
    torch.manual_seed(0)
    n = 24
    target, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    A = torch.randn(200, n, dtype=torch.float64)
    B = A @ target
    X = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    opt = CayleySGD([X], lr=0.05, momentum=0.9)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = ((A @ X - B) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        assert float((X.detach().T @ X.detach() - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-10
    # det(target) may be -1, unreachable from I on SO(n); then the optimum is a reflection away
    if torch.linalg.det(target) > 0:
        assert float(((A @ X.detach() - B) ** 2).mean()) < 1e-3 * first
    else:
        assert float(((A @ X.detach() - B) ** 2).mean()) < 0.5 * first


def test_spinquant_learns_and_keeps_the_model_exact():
    model = tiny_model("llama", seed=2)
    ids = random_ids(1, 64, seed=1)  # one window: every step sees the same batch, so the loss must fall
    ref = model(ids).logits.detach()
    fuse_norms(model)
    act = {"bits": 2, "sym": True, "clip_ratio": 1.0, "group_size": None}
    kv = {"bits": 2, "method": "uniform", "group_size": 16, "sym": False, "clip_ratio": 1.0, "outlier_frac": 0.0, "sink_tokens": 0}
    res = learn_rotations(model, ids, act=act, kv=kv, steps=15, lr=1.5, seqlen=64, batch_size=1, seed=0)
    assert len(res.losses) == 15
    assert min(res.losses[-3:]) < res.losses[0] - 0.01
    # learning leaves the (fused) model untouched: no hooks, no gradients, same function
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    r1 = res.rotations.r1
    assert torch.allclose(r1.T @ r1, torch.eye(64, dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(r1, quarot_rotations(64, 16, 2, 0).r1)
    apply_rotations(model, res.rotations)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) <= 1e-3


def test_spinquant_keeps_the_rotation_with_the_lowest_held_out_loss():
    model = tiny_model("qwen2", seed=3)
    fuse_norms(model)
    calib = random_ids(6, 32, seed=4)
    res = learn_rotations(model, calib, steps=4, lr=1.5, seqlen=32, val_rows=2, eval_every=2, seed=1)
    assert [s for s, _ in res.val_losses] == [0, 2, 4]
    best_step = min(res.val_losses, key=lambda sv: sv[1])[0]
    init = quarot_rotations(64, 16, 2, 1).r1
    assert torch.allclose(res.rotations.r1, init, atol=1e-6) == (best_step == 0)
    # without a hold-out (too few rows) the last iterate is returned and nothing is measured
    res = learn_rotations(model, calib[:2], steps=2, lr=1.5, seqlen=32, val_rows=2, seed=1)
    assert res.val_losses == [] and not torch.allclose(res.rotations.r1, init, atol=1e-6)


def test_spinquant_learning_restores_a_calibrated_kv_quantizer():
    from lowbit.nn.attention import install_model_attention
    from lowbit.kv.calibrate import calibrate_kv

    model = tiny_model("llama", seed=6)
    fuse_norms(model)
    install_model_attention(model, kv={"bits": 4, "method": "kvquant"})
    calibrate_kv(model, random_ids(2, 32, seed=7), fisher=False)
    kv = model.model.layers[0].self_attn.lowbit_kv
    before = {k: v.clone() for k, v in kv.state_dict().items()}
    learn_rotations(model, random_ids(2, 32, seed=8), steps=1, seqlen=32, val_rows=0)
    attn = model.model.layers[0].self_attn
    assert attn.lowbit_kv is kv and attention_config(attn)["rotate_qk"] is False
    assert all(torch.equal(kv.state_dict()[k], v) for k, v in before.items())
