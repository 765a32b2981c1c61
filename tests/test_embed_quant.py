"""Per-row quantized embeddings and head (mirrors lowbit/nn/quant_embedding.py and
lowbit/methods/embed_quant.py), the EmbedQuant recipe step, and the fp16 storage of the
unquantized tensors (lowbit/io/checkpoint.py)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open

import lowbit
import lowbit.io as lio
from lowbit.errors import CheckpointError, DTypeError, UnsupportedSizeError, ValueRangeError
from lowbit.io import checkpoint as ckpt
from lowbit.methods.embed_quant import quantize_rows
from lowbit.models.tiny import random_ids, tiny_model
from lowbit.nn.quant_embedding import QuantEmbedding, QuantHead, row_bytes
from lowbit.recipe import EmbedQuant, Recipe, WeightQuant, resolve, step_from_dict

from checkpoint_tools import edit_config, poison, rewrite_tensors

pytest.importorskip("transformers")

E = "model.embed_tokens"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _keys_and_dtypes(out) -> dict:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, 24, seed=3)


@pytest.fixture(scope="module")
def saved_tied(tmp_path_factory):
    """A tied tiny Llama, W4 RTN + 8-bit embeddings/head, saved once for the corruption tests."""
    model = lowbit.quantize(tiny_model("llama", seed=4, tie_word_embeddings=True),
                            [WeightQuant("rtn", 4, 32), EmbedQuant(8)], progress=False)
    return model, lio.save(model, tmp_path_factory.mktemp("ck") / "tied")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------------------------
# the stored layers


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_round_trip_each_width_is_packed_and_within_half_a_step(bits, sym):
    W = torch.randn(37, 50, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 37).unsqueeze(1)
    qw = quantize_rows(W, bits, sym=sym, mse=False)
    layer = QuantEmbedding.from_quantized(qw)
    assert layer.qweight.dtype == torch.uint8
    assert tuple(layer.qweight.shape) == (37, row_bytes(50, bits))
    assert row_bytes(50, bits) == {4: 25, 6: 25 + 13, 8: 50}[bits]  # really packed, not one code per byte
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (37,)
    assert (layer.zeros is None) == sym and (sym or layer.zeros.dtype == torch.float16)
    assert torch.equal(layer.unpack_codes(), qw.codes)
    if bits == 6:  # the two planes: low 4 bits, then high 2 bits, each in lowbit.pack's layout
        assert torch.equal(layer.qweight[:, :25], lowbit.pack(qw.codes & 15, 4))
        assert torch.equal(layer.qweight[:, 25:], lowbit.pack(qw.codes >> 4, 2))
    deq = layer.dequantize_weight()
    assert torch.equal(deq, qw.dequantize())
    step = layer.scales.float().unsqueeze(1)
    # half a step, plus what rounding the scale to fp16 (2^-11 relative) moves the grid's ends by
    assert bool(((deq - W).abs() <= (0.5 + ((1 << bits) - 1) * 2.0**-11) * step + 1e-7).all())
    assert float(((deq - W).abs() / step).mean()) < 0.3  # and mostly well inside it
    extra = 16 if sym else 32  # fp16 scale (+ zero) per row
    assert layer.bits_per_weight() == pytest.approx((row_bytes(50, bits) * 8 + extra) / 50)
    # the clip search never raises the |error|^2.4 it minimises
    clipped = quantize_rows(W, bits, sym=sym, mse=True)
    err = lambda q: float((q.dequantize() - W).abs().pow(2.4).sum())  # noqa: E731
    assert err(clipped) <= err(qw) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_embedding_lookup_and_head_are_the_dequantized_matrix(bits):
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    qw = quantize_rows(W, bits)
    emb, dense = QuantEmbedding.from_quantized(qw), qw.dequantize()
    ids = torch.tensor([[0, 39, 7], [7, 7, 1]])
    assert torch.equal(emb(ids), dense[ids])
    emb.cache_dequantized = True
    assert torch.equal(emb(ids), dense[ids])
    x = torch.randn(3, 24)
    for head in (QuantHead.from_quantized(qw), QuantHead.tied(emb, "emb")):
        assert torch.equal(head(x), torch.nn.functional.linear(x, dense))
    with pytest.raises(IndexError, match="ids: token id 40"):
        QuantEmbedding.from_quantized(qw)(torch.tensor([40]))
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # the output dtype follows casts
    assert emb.qweight.dtype == torch.uint8 and emb.scales.dtype == torch.float16  # storage never cast


def test_layers_refuse_bad_input_naming_it():
    qw = quantize_rows(torch.randn(8, 16), 8)
    with pytest.raises(UnsupportedSizeError, match="bits: 5"):
        QuantEmbedding(8, 16, bits=5)
    with pytest.raises(ValueRangeError, match="group_size"):
        QuantEmbedding.from_quantized(lowbit.grids.UniformGrid(bits=8, group_size=8).quantize_weight(torch.randn(8, 16)))
    bad = copy.copy(qw)
    bad.codes = qw.codes.clone()
    bad.scales = qw.scales + 1e-5  # not fp16-exact
    with pytest.raises(ValueRangeError, match="scales: values are not exactly representable"):
        QuantEmbedding.from_quantized(bad)
    with pytest.raises(ValueRangeError, match="tied_to: 'x' is a Linear"):
        QuantHead(16, 8, bits=8, tied_to="x").tie(torch.nn.Linear(16, 8))
    with pytest.raises(ValueRangeError, match=r"tied_to: .*\(vocab, hidden, bits, sym\)"):
        QuantHead(16, 8, bits=4, tied_to="x").tie(QuantEmbedding.from_quantized(qw))


# ----------------------------------------------------------------------------------------------
# the recipe step


def test_step_config_round_trip_and_preset():
    step = EmbedQuant(6, targets=["lm_head"], sym=True)
    assert step.targets == ("lm_head",)
    assert EmbedQuant.from_dict(step.to_dict()) == step
    assert step_from_dict(json.loads(json.dumps(step.to_dict()))) == step
    r = resolve("w4-gptq-e8")
    assert [s.step for s in r.steps] == ["weight", "embedding"] and r.embedding == EmbedQuant(8)
    assert Recipe.from_list(json.loads(json.dumps(r.to_list()))).steps == r.steps
    assert not EmbedQuant().needs_calibration and "E8 per-row" in r.describe()
    # listed before the weight step, it still runs after it
    assert [s.step for s in Recipe((EmbedQuant(), WeightQuant())).steps] == ["weight", "embedding"]
    assert lowbit.EmbedQuant is EmbedQuant


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(bits=5), UnsupportedSizeError, r"bits: 5 is not supported; choose from \(4, 6, 8\)"),
    (dict(bits=True), UnsupportedSizeError, "bits"),
    (dict(targets=("wte",)), ValueRangeError, r"targets: unknown target\(s\) \['wte'\]"),
    (dict(targets=()), ValueRangeError, "targets: empty"),
    (dict(targets=("lm_head", "lm_head")), ValueRangeError, "targets: a target listed twice"),
    (dict(targets="lm_head"), ValueRangeError, "targets: must be a tuple"),
    (dict(method="gptq"), ValueRangeError, "method: unknown embedding method 'gptq'"),
    (dict(sym=1), ValueRangeError, "sym: must be a bool"),
])
def test_bad_step_arguments_are_typed_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        EmbedQuant(**kwargs)


def test_a_target_the_model_lacks_or_already_quantized():
    model = tiny_model("llama", seed=1)
    del model.lm_head
    with pytest.raises(ValueRangeError, match="targets: the LlamaForCausalLM has no 'lm_head' module"):
        lowbit.quantize(model, EmbedQuant(targets=("lm_head",)), progress=False)
    model = lowbit.quantize(tiny_model("llama", seed=1), EmbedQuant(), progress=False)
    with pytest.raises(ValueRangeError, match=r"targets: 'embed_tokens' \(model.embed_tokens\) is a QuantEmbedding"):
        lowbit.quantize(model, EmbedQuant(), progress=False)


def test_nan_in_a_weight_is_refused_naming_it_and_nothing_is_swapped():
    model = tiny_model("qwen2", seed=1)
    with torch.no_grad():
        model.lm_head.weight[3, 4] = float("nan")
    with pytest.raises(ValueRangeError, match="lm_head.weight: contains NaN or inf"):
        lowbit.quantize(model, EmbedQuant(), progress=False)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear


# ----------------------------------------------------------------------------------------------
# save / load


CELLS = [  # arch, tied, targets, bits, with a weight step
    ("llama", True, ("embed_tokens", "lm_head"), 8, True),
    ("qwen2", False, ("embed_tokens", "lm_head"), 6, True),
    ("mistral", True, ("lm_head",), 4, True),
    ("llama", True, ("embed_tokens",), 8, False),
    ("qwen2", True, ("embed_tokens", "lm_head"), 4, False),
]


@pytest.mark.parametrize("arch,tied,targets,bits,weights", CELLS)
def test_save_load_gives_the_same_logits(arch, tied, targets, bits, weights, ids, tmp_path):
    steps = ([WeightQuant("rtn", 4, 32)] if weights else []) + [EmbedQuant(bits, targets=targets)]
    model = lowbit.quantize(tiny_model(arch, seed=2, tie_word_embeddings=tied), steps, progress=False)
    want = _logits(model, ids)
    out = lowbit.save(model, tmp_path / "ck")
    loaded = lowbit.load(out)
    assert torch.equal(_logits(loaded, ids), want)
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(emb, QuantEmbedding) == ("embed_tokens" in targets)
    assert isinstance(head, QuantHead) == ("lm_head" in targets)
    stats = {s.name: s for s in model.lowbit_report.layers}
    for t, name in (("embed_tokens", E), ("lm_head", "lm_head")):
        if t in targets:
            assert stats[name].bits == pytest.approx(bits + 32 / 64) and 0 < stats[name].rel_weight_error < 0.2
    keep_tied = tied and len(targets) == 2  # one target unties the model (the other stays dense)
    assert loaded.config.tie_word_embeddings is keep_tied
    if keep_tied:
        assert head.tied_to == E and head.storage() is emb
    assert loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_a_tied_pair_is_stored_once_and_stays_tied(saved_tied, ids):
    model, out = saved_tied
    keys = _keys_and_dtypes(out)
    assert {f"{E}.qweight", f"{E}.scales", f"{E}.zeros"} <= set(keys)
    assert not any(k.startswith("lm_head.") or k == f"{E}.weight" for k in keys)
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers[E]["format"] == "embedding" and layers["lm_head"] == {
        "format": "head", "in_features": 64, "out_features": 256, "bits": 8, "sym": False, "method": "rtn",
        "packing": "lsb", "bias": False, "tied_to": E}
    for m in (lowbit.load(out), copy.deepcopy(model), lowbit.load(out, dtype=torch.bfloat16)):
        assert m.lm_head.storage() is m.model.embed_tokens
        assert torch.equal(m.lm_head.dequantize_weight(), m.model.embed_tokens.dequantize_weight())
    bf16 = lowbit.load(out, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens(ids).dtype == torch.bfloat16 and _logits(bf16, ids).dtype == torch.bfloat16


def test_corrupt_vocabulary_tensors_are_refused_naming_them(saved_tied, tmp_path):
    out = saved_tied[1]
    cases = [
        (lambda t: t.update({f"{E}.qweight": t[f"{E}.qweight"][:, :-1].contiguous()}),
         rf"{E}.qweight: shape \(256, 63\).*expected \(256, 64\) \(lsb packing of 64 codes of 8 bits per row\)"),
        (lambda t: t.update({f"{E}.scales": t[f"{E}.scales"].float()}), rf"{E}.scales: dtype torch.float32 stored, expected torch.float16"),
        (lambda t: t.update({f"{E}.zeros": t[f"{E}.zeros"].to(torch.int16)}), rf"{E}.zeros: dtype torch.int16"),
        (lambda t: t.update({"lm_head.qweight": t[f"{E}.qweight"].clone()}), r"unexpected tensor.*'lm_head.qweight'"),
        (lambda t: t.pop(f"{E}.scales"), rf"missing tensor.*{E}.scales"),
        (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}),
         r"model.norm.weight: dtype torch.int64 .*expected a floating-point tensor"),
    ]
    for i, (edit, match) in enumerate(cases):
        ck = _copy(out, tmp_path / f"c{i}")
        rewrite_tensors(ck, edit)
        with pytest.raises(CheckpointError, match=match):
            lowbit.load(ck)
    ck = _copy(out, tmp_path / "nan")
    poison(ck, f"{E}.scales", float("nan"))
    with pytest.raises(CheckpointError, match=rf"{E}.scales: holds 1 non-finite"):
        lowbit.load(ck)


@pytest.mark.parametrize("edit,match", [
    (lambda la: la["lm_head"].update(tied_to="model.nowhere"), r"\['lm_head'\]: tied_to: the model has no module 'model.nowhere'"),
    (lambda la: la["lm_head"].update(tied_to="model.norm"), r"tied_to: 'model.norm' is a LlamaRMSNorm, not a QuantEmbedding"),
    (lambda la: la["lm_head"].update(bits=4, packing="lsb"), r"tied_to: .*\(vocab, hidden, bits, sym\)"),
    (lambda la: la[E].update(bits=5), rf"\['{E}'\]: bits: 5 is not supported"),
    (lambda la: la[E].update(packing="lsb4+2"), r"packing: 'lsb4\+2' is not the packing of 8 bits"),
    (lambda la: la[E].update(num_embeddings=2**30), r"num_embeddings: must be in \[1, 16777216\]"),
    (lambda la: la[E].update(num_embeddings=255), r"\(num_embeddings, embedding_dim\) = \(255, 64\) but the architecture has \(256, 64\)"),
    (lambda la: la.update({"model.norm": dict(la[E])}), r"'model.norm' is a LlamaRMSNorm, not an Embedding"),
])
def test_corrupt_vocabulary_entries_are_refused(saved_tied, tmp_path, edit, match):
    ck = _copy(saved_tied[1], tmp_path / "ck")
    edit_config(ck, lambda cfg: edit(cfg["quantization_config"]["layers"]))  # re-signed: the checks behind the digest
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(ck)


# ----------------------------------------------------------------------------------------------
# fp16 storage of the unquantized tensors


def test_dense_tensors_are_stored_fp16_and_load_as_float32(tmp_path, ids):
    model = lowbit.quantize(tiny_model("llama", seed=5), "w4-rtn", progress=False)
    out = lowbit.save(model, tmp_path / "ck")
    dtypes = _keys_and_dtypes(out)
    dense = {k: v for k, v in dtypes.items() if k.endswith(".weight")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(dense)
    assert set(dense.values()) == {"F16"}
    assert dtypes["model.layers.0.mlp.up_proj.qweight"] == "U8"
    loaded = lowbit.load(out)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))  # quantize rounded them to fp16 already
    exact = lowbit.save(model, tmp_path / "f32", dense_dtype=torch.float32)
    assert set(v for k, v in _keys_and_dtypes(exact).items() if k.endswith(".weight")) == {"F32"}
    assert (out / "model.safetensors").stat().st_size < (exact / "model.safetensors").stat().st_size
    with pytest.raises(DTypeError, match="dense_dtype: must be None or one of"):
        lowbit.save(model, tmp_path / "bad", dense_dtype="fp16")
    assert not (tmp_path / "bad").exists()


def test_a_bfloat16_model_is_stored_bfloat16(tmp_path):
    model = tiny_model("qwen2", seed=6).to(torch.bfloat16)
    out = lowbit.save(model, tmp_path / "ck")
    assert set(_keys_and_dtypes(out).values()) == {"BF16"}
    loaded = lowbit.load(out, dtype=torch.bfloat16)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_value_that_overflows_fp16_keeps_float32(tmp_path, ids, caplog):
    model = tiny_model("llama", seed=7)
    with torch.no_grad():
        model.model.norm.weight[5] = 1e5  # finite in fp32, inf in fp16
    assert ckpt.dense_storage_dtype(model.model.norm.weight) == torch.float32
    assert ckpt.dense_storage_dtype(model.lm_head.weight) == torch.float16
    lowbit.quantize(model, "w4-rtn", progress=False)
    assert float(model.model.norm.weight.detach()[5]) == 1e5  # not rounded to inf either
    with caplog.at_level(logging.WARNING, logger="lowbit.io.checkpoint"):
        out = lowbit.save(model, tmp_path / "ck")
    assert "model.norm.weight: finite values up to 100000 overflow torch.float16; stored as torch.float32" in caplog.text
    dtypes = _keys_and_dtypes(out)
    assert dtypes["model.norm.weight"] == "F32" and dtypes["lm_head.weight"] == "F16"
    loaded = lowbit.load(out)
    assert float(loaded.model.norm.weight.detach()[5]) == 1e5
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


# ----------------------------------------------------------------------------------------------
# the CLI summary


def test_cli_prints_the_size_on_disk_beside_the_source(tmp_path, capsys):
    from lowbit.cli import _fmt_bytes, main

    from test_checkpoint import tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("llama", seed=8, tie_word_embeddings=True).save_pretrained(src)
    tiny_tokenizer(256).save_pretrained(src)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(src), "--recipe", "w4-gptq-e8", "--out", str(out), "--no-eval",
            "--calib-samples", "2", "--seqlen", "32", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("size on disk"))
    ours = sum(f.stat().st_size for f in out.iterdir())
    assert row.split()[-7:] == [*_fmt_bytes(ours).split(), "(source:", *_fmt_bytes(weights).split(),
                                "model.safetensors;", f"{ours / weights:.2f}×)"]
    assert ours < 0.3 * weights  # 4-bit linears, 8-bit vocabulary, fp16 norms against an fp32 source
    assert "embeddings 8-bit per-row, head 8-bit per-row (tied: the embeddings' codes)" in printed
