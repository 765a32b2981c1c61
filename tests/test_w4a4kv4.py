"""Composed recipes on tiny models: rotation + weights + activations + KV cache, through the driver,
the checkpoint and ``generate``."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import io as lio
from lowbit.errors import ShapeError, UnsupportedSizeError, ValueRangeError
from lowbit.models.tiny import TINY_ARCHS, random_ids, tiny_model
from lowbit.nn import QuantLinear, input_transform_of
from lowbit.nn.attention import attention_config
from lowbit.kv.cache import QuantizedKVCache
from lowbit.recipe import PRESETS, ActQuant, KVQuant, Recipe, Rotate, WeightQuant, resolve


def _linears(model):
    for layer in model.model.layers:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            yield name, layer.get_submodule(name)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# recipes


def test_recipe_steps_compose_in_a_fixed_order():
    r = Recipe((KVQuant(2), ActQuant(8), WeightQuant("rtn", 4), Rotate("quarot")))
    assert [s.step for s in r.steps] == ["rotation", "weight", "activation", "kv"]
    assert r.rotation.method == "quarot" and r.activation.bits == 8 and r.kv.bits == 2
    back = Recipe.from_list(r.to_list())
    assert back.steps == r.steps
    assert not Recipe((KVQuant(4, "uniform"),)).needs_calibration
    assert Recipe((KVQuant(4, "kvquant"),)).needs_calibration
    assert Recipe((Rotate("spinquant"),)).needs_calibration and not Recipe((Rotate("quarot"),)).needs_calibration


def test_recipe_errors_name_the_field():
    with pytest.raises(ValueRangeError, match="a second 'kv' step"):
        Recipe((KVQuant(2), KVQuant(4)))
    with pytest.raises(ValueRangeError, match="unknown step kind 'dropout'"):
        Recipe.from_list([{"step": "dropout"}])
    with pytest.raises(UnsupportedSizeError, match="bits: 5"):
        KVQuant(5)
    with pytest.raises(ValueRangeError, match="method: unknown rotation 'random'"):
        Rotate("random")
    with pytest.raises(ValueRangeError, match="clip_ratio"):
        ActQuant(4, clip_ratio=0.0)
    with pytest.raises(ValueRangeError, match="no weight step"):
        resolve("kv4-kvquant", bits=3)
    for name in ("w4a4kv4-norot", "w4a4kv4-quarot", "w4a4kv4-spinquant", "kv4-kvquant", "kv2-kvquant"):
        assert name in PRESETS


# ---------------------------------------------------------------------------------------------
# the driver


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_w4a4kv4_quarot_builds_the_whole_pipeline(arch, tmp_path):
    model = tiny_model(arch, seed=0, tie_word_embeddings=arch == "llama")  # rotation unties; the checkpoint keeps both
    calib = random_ids(4, 64, seed=1)
    ids = random_ids(1, 48, seed=2)
    lowbit.quantize(model, "w4a4kv4-quarot", calib, progress=False)
    for name, lin in _linears(model):
        assert isinstance(lin, QuantLinear), name
        t = input_transform_of(lin)
        assert t is not None and t.act is not None and t.act.bits == 4
        assert t.hadamard == (name == "mlp.down_proj")
    cfg = attention_config(model.model.layers[0].self_attn)
    assert cfg["rotate_qk"] is True and cfg["kv"]["bits"] == 4
    assert set(model.lowbit_report.hadamards) == {"R1 (64)", "R2 (16)", "R3 (16)", "R4 (128)"}
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()

    out = lio.save(model, tmp_path / "ck")
    qc = lio.read_quantization_config(out)
    assert set(qc["online"]) == {"inputs", "attention"}
    loaded = lio.load(out)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, logits, atol=1e-5, rtol=1e-5)
        gen = loaded.generate(ids[:, :8], cache=QuantizedKVCache(loaded), max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 14)


def test_activation_quantization_alone_runs_on_dense_linears(tmp_path):
    model = tiny_model("llama", seed=3)
    ids = random_ids(2, 32, seed=4)
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.quantize(model, [Rotate("quarot"), ActQuant(8, clip_ratio=1.0)], progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        a8 = model(ids).logits
    assert 0 < _rel(a8, ref) < 0.05  # 8-bit activations on the rotated model: close, not equal
    loaded = lio.load(lio.save(model, tmp_path / "a8"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, a8, atol=1e-6)


def test_kvquant_preset_calibrates_and_round_trips(tmp_path):
    model = tiny_model("qwen2", seed=5)
    calib = random_ids(4, 64, seed=6)
    ids = random_ids(1, 40, seed=7)
    lowbit.quantize(model, "kv4-kvquant", calib, progress=False)
    kv = model.model.layers[0].self_attn.lowbit_kv
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(ids).logits
        cached = model(ids, cache=QuantizedKVCache(model), use_cache=True).logits
    assert torch.allclose(cached, logits, atol=1e-4, rtol=1e-4)
    loaded = lio.load(lio.save(model, tmp_path / "kv"))
    for name, t in kv.state_dict().items():
        assert torch.equal(loaded.model.layers[0].self_attn.lowbit_kv.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, logits, atol=1e-6)


def test_spinquant_through_the_driver():
    model = tiny_model("mistral", seed=8)
    calib = random_ids(4, 64, seed=9)
    recipe = [Rotate("spinquant", steps=4, seqlen=32, lr=1.0), WeightQuant("rtn", 4, 16), ActQuant(4), KVQuant(4, "uniform")]
    lowbit.quantize(model, recipe, calib, progress=False)
    assert len(model.lowbit_report.rotation_losses) == 4
    assert "rotate" in model.lowbit_report.stage_seconds
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 16)).logits).all()


def test_recipes_that_need_data_say_so():
    with pytest.raises(ShapeError, match="calib: recipe 'kv4-kvquant' needs calibration"):
        lowbit.quantize(tiny_model("llama"), "kv4-kvquant", progress=False)
    with pytest.raises(ShapeError, match="calib: must be an int64"):
        lowbit.quantize(tiny_model("llama"), "w4a4kv4-spinquant", torch.zeros(2, 8), progress=False)


def test_checkpoint_rejects_a_bad_online_section(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), [Rotate("quarot"), ActQuant(8)], progress=False)
    out = lio.save(model, tmp_path / "ck")
    from checkpoint_tools import edit_config

    def add(cfg):
        cfg["quantization_config"]["online"]["inputs"]["model.layers.9.mlp.down_proj"] = {"hadamard": True, "act": None}

    edit_config(out, add)
    with pytest.raises(lowbit.CheckpointError, match="online.inputs\\['model.layers.9.mlp.down_proj'\\]: .*no module"):
        lio.load(out)

    def bad_bits(cfg):
        cfg["quantization_config"]["online"]["inputs"] = {"model.layers.0.mlp.down_proj": {"hadamard": True, "act": {"bits": 1}}}

    edit_config(out, bad_bits)
    with pytest.raises(lowbit.CheckpointError, match="bits"):
        lio.load(out)
