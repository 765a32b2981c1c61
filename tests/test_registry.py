"""The weight-method registry: what is registered, what the recipe and CLI take from it, and a
method added from outside the package running through the generic loop."""

import pytest
import torch

import lowbit
from lowbit.errors import ValueRangeError
from lowbit.methods import registry
from lowbit.models.tiny import random_ids, tiny_model
from lowbit.nn import QuantLinear, VQLinear
from lowbit.recipe import WeightQuant, weight_method_names


def test_builtin_methods_are_registered_with_their_family_and_layer():
    methods = registry.weight_methods()
    assert set(methods) >= {"rtn", "gptq", "ldlq", "quip", "rsavq"}
    assert set(weight_method_names("grid")) >= {"rtn", "gptq", "ldlq"}
    assert set(weight_method_names("vq")) >= {"quip", "rsavq"}
    assert methods["rtn"].needs == frozenset() and methods["gptq"].needs == {"hessian"}
    assert methods["rsavq"].needs == {"hessian", "fisher"}
    assert methods["gptq"].layer() is QuantLinear and methods["quip"].layer() is VQLinear
    assert methods["quip"].after_block is not None and methods["gptq"].after_block is None


def test_unknown_and_duplicate_names_are_typed_errors():
    with pytest.raises(ValueRangeError, match="unknown weight method 'nope'.*registered"):
        registry.weight_method("nope")
    gptq = registry.weight_method("gptq")
    with pytest.raises(ValueRangeError, match="already registered"):
        registry.register(registry.WeightMethod("gptq", gptq.quantize, gptq.layer))
    with pytest.raises(ValueRangeError, match="needs: unknown"):
        registry.WeightMethod("x", gptq.quantize, gptq.layer, needs=frozenset({"gradients?"}))
    with pytest.raises(ValueRangeError, match="family"):
        registry.WeightMethod("x", gptq.quantize, gptq.layer, family="scalar")


def test_cli_method_choices_come_from_the_registry(capsys):
    from lowbit.cli import main

    assert main(["quantize", "--model", "bundled", "--out", "x", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in weight_method_names("grid"))


def test_a_method_registered_from_outside_runs_through_the_loop(monkeypatch):
    """A new grid method in one place: RTN of the weight scaled by the Hessian's diagonal — it
    needs a Hessian, so the loop must capture one per linear and hand it over."""
    from lowbit.grids import UniformGrid

    seen = []

    def quantize(step, W, H, fisher):
        assert H is not None and H.shape == (W.shape[1], W.shape[1]) and fisher is None
        seen.append(W.shape)
        return UniformGrid(bits=step.bits, group_size=step.group_size).quantize_weight(W), float(H.diagonal().mean())

    monkeypatch.setitem(registry._REGISTRY._entries, "toy", registry.WeightMethod("toy", quantize, registry.weight_method("rtn").layer, needs=frozenset({"hessian"})))
    model = tiny_model("llama", seed=1)
    lowbit.quantize(model, WeightQuant("toy", 4, 32), random_ids(4, 16), progress=False)
    assert len(seen) == 14  # 7 linears x 2 layers
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert all(s.method == "toy" and s.loss > 0 for s in model.lowbit_report.layers)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 8)).logits).all()


def test_layer_formats_are_registered_and_the_checkpoint_names_them(tmp_path):
    from lowbit.errors import CheckpointError
    from lowbit.io import checkpoint as ckpt
    from lowbit.nn.layer_formats import format_of, layer_format, layer_formats, stored_layer_classes

    assert set(layer_formats()) >= {"packed", "vq"}
    assert layer_format("packed").module is QuantLinear and layer_format("vq").module is VQLinear
    assert set(stored_layer_classes()) >= {QuantLinear, VQLinear}
    assert format_of(torch.nn.Linear(2, 2)) is None
    model = lowbit.quantize(tiny_model("qwen2", seed=2), "w4-rtn", progress=False)
    assert format_of(model.model.layers[0].mlp.up_proj).name == "packed"
    meta = dict(model.model.layers[0].mlp.up_proj.metadata(), format="lattice")
    with pytest.raises(CheckpointError, match=r"format: unknown layer format 'lattice'; known: 'packed', 'vq'"):
        ckpt._check_layer_meta("model.layers.0.mlp.up_proj", meta)
    bad = dict(model.model.layers[0].mlp.up_proj.metadata(), packing="nibbles")
    with pytest.raises(CheckpointError, match=r"up_proj'\]: packing: 'nibbles' is not the packing"):
        ckpt._check_layer_meta("model.layers.0.mlp.up_proj", bad)
