"""lowbit.quantize on tiny random Llama / Qwen2 / Mistral models (structure, save/load, errors)."""

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, ShapeError
from lowbit.models.tiny import tiny_model
from lowbit.nn import QuantLinear

ARCHS = ["llama", "qwen2", "mistral"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _calib(model, n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["w4-gptq", "w4-rtn", "w4-ldlq", "w2-gptq", "w1.58-gptq"])
def test_quantize_save_load_roundtrip(arch, recipe, tmp_path):
    model = tiny_model(arch, seed=1)
    ids = _calib(model, n=2, seqlen=24, seed=5)
    fp = _logits(model, ids)
    lowbit.quantize(model, recipe, _calib(model), progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(LINEARS) * model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, QuantLinear)
                   for n, m in model.named_modules() if ".layers." in n)
    q = _logits(model, ids)
    assert torch.isfinite(q).all()
    assert not torch.equal(q, fp)
    report = model.lowbit_report
    assert len(report.layers) == len(quantized)
    assert all(0 <= s.rel_weight_error < 1 for s in report.layers)

    lowbit.save(model, tmp_path / "ckpt", quantization_config={"recipe": model.lowbit_recipe.to_list()})
    loaded = lowbit.load(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, ids), q)


def test_gptq_beats_rtn_on_logits():
    ref = tiny_model("llama", seed=3)
    calib = _calib(ref, n=16, seqlen=64)
    want = _logits(ref, calib)
    errs = {}
    for recipe in ["w3-rtn", "w3-gptq"]:
        model = lowbit.quantize(tiny_model("llama", seed=3), recipe, calib, progress=False, group_size=32)
        errs[recipe] = float((_logits(model, calib) - want).norm() / want.norm())
    assert errs["w3-gptq"] < errs["w3-rtn"], errs


def test_overrides_and_presets():
    model = tiny_model("llama")
    lowbit.quantize(model, "w4-rtn", progress=False, bits=3, group_size=16, sym=True)
    ql = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert ql.bits == 3 and ql.group_size == 16
    assert model.lowbit_recipe.weight.sym


def test_gptq_needs_calibration():
    with pytest.raises(ShapeError, match="calib"):
        lowbit.quantize(tiny_model("llama"), "w4-gptq", None, progress=False)
    with pytest.raises(ShapeError, match="calib"):
        lowbit.quantize(tiny_model("llama"), "w4-gptq", torch.zeros(2, 8), progress=False)


def test_bad_recipes_are_typed_errors():
    from lowbit.recipe import UnknownRecipeError

    with pytest.raises(UnknownRecipeError, match="w9-magic"):
        lowbit.quantize(tiny_model("llama"), "w9-magic", progress=False)
    with pytest.raises(lowbit.UnsupportedSizeError, match="bits"):
        lowbit.quantize(tiny_model("llama"), "w4-rtn", progress=False, bits=5)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(LowbitError, match="gpt2"):
        lowbit.quantize(model, "w4-rtn", progress=False)


def test_bf16_calibration_passes_keep_fp32_weights_and_quality():
    ref = tiny_model("qwen2", seed=4)
    calib = _calib(ref, n=8, seqlen=48)
    want = _logits(ref, calib)
    out = {}
    for dt in [None, torch.bfloat16]:
        model = lowbit.quantize(tiny_model("qwen2", seed=4), "w4-gptq", calib, progress=False, calib_dtype=dt)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert next(m for m in model.modules() if isinstance(m, QuantLinear)).scales.dtype == torch.float16
        out[dt] = float((_logits(model, calib) - want).norm() / want.norm())
    # bf16 passes perturb the Hessians a little, not the result's quality.
    assert out[torch.bfloat16] < 1.5 * out[None] + 1e-3, out


def _o_proj_codes(true_sequential: bool):
    """Codes of layer 0's o_proj after quantizing a tiny Llama with W3 GPTQ."""
    model = tiny_model("llama", seed=4)
    recipe = lowbit.WeightQuant("gptq", 3, 32, true_sequential=true_sequential)
    lowbit.quantize(model, recipe, _calib(model), progress=False)
    return model, model.model.layers[0].self_attn.o_proj.qweight


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_takes_o_proj_hessian_from_the_quantized_qkv(true_sequential):
    """Layer 0's o_proj must be GPTQ of its weight under the Hessian of its inputs as the block
    computes them with q/k/v already quantized (true-sequential) or in full precision (not)."""
    from lowbit.grids import UniformGrid
    from lowbit.methods import HessianAccumulator, gptq

    quantized, codes = _o_proj_codes(true_sequential)
    ref = tiny_model("llama", seed=4)
    attn = ref.model.layers[0].self_attn
    if true_sequential:
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, getattr(quantized.model.layers[0].self_attn, name))
    acc = HessianAccumulator(attn.o_proj.in_features)
    hook = attn.o_proj.register_forward_pre_hook(lambda m, args: acc.add_batch(args[0].detach()))
    calib = _calib(ref)
    with torch.no_grad():
        for i in range(0, calib.shape[0], 8):  # the driver's batch size
            ref(calib[i : i + 8])
    hook.remove()
    step = lowbit.WeightQuant("gptq", 3, 32)
    grid = UniformGrid(bits=3, group_size=32, sym=step.sym, mse=step.mse)
    res = gptq(attn.o_proj.weight.detach().float(), acc.hessian, grid, block_size=step.block_size,
               damp=step.damp, act_order=step.act_order, static_groups=step.static_groups)
    want = QuantLinear.from_quantized(res.qweight).qweight
    assert torch.equal(codes, want)
    other = _o_proj_codes(not true_sequential)[1]
    assert not torch.equal(codes, other)  # the two Hessians differ enough to change codes


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_layer0_inputs_and_streamed_linear_inputs(arch):
    """driver._capture, the loop's one capture path: the inputs of decoder layer 0 (shapes, dtype,
    the keyword arguments that run the layer alone), then a linear's inputs streamed to a sink."""
    from lowbit.driver import _capture

    model = tiny_model(arch, seed=2).eval()
    calib = _calib(model, n=5, seqlen=16)
    layers = model.model.layers
    layer0 = layers[0]
    batches = ((calib[i : i + 2], {"use_cache": False}) for i in range(0, 5, 2))
    inputs, kwargs = _capture(model, layer0, batches)
    hidden = model.config.hidden_size
    assert [tuple(x.shape) for x in inputs] == [(2, 16, hidden), (2, 16, hidden), (1, 16, hidden)]
    assert all(x.dtype == torch.float32 and not x.requires_grad for x in inputs)
    assert layers[0] is layer0 and not layer0._forward_pre_hooks  # left in place, hook removed
    with torch.no_grad():
        ref = model(calib[:2], output_hidden_states=True).hidden_states
    assert torch.equal(inputs[0], ref[0])
    for kw in kwargs:
        assert kw["use_cache"] is False
        assert "past_key_value" not in kw and "past_key_values" not in kw and "hidden_states" not in kw
        assert kw["position_ids"].dtype == torch.long and tuple(kw["position_ids"].shape) == (1, 16)
        cos, sin = kw["position_embeddings"]
        assert tuple(cos.shape) == tuple(sin.shape) == (1, 16, model.config.hidden_size // model.config.num_attention_heads)
    with torch.no_grad():
        out = layer0(inputs[0], **kwargs[0])
    assert torch.equal(out[0] if isinstance(out, tuple) else out, ref[1])  # the layer runs alone on them

    down = layer0.mlp.down_proj
    want: list = []
    hook = down.register_forward_pre_hook(lambda m, args: want.append(args[0].detach()))
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs):
            layer0(x, **kw)
    hook.remove()
    got: list = []
    assert _capture(layer0, down, zip(inputs, kwargs), sink=got.append) == ([], [])
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not down._forward_pre_hooks
