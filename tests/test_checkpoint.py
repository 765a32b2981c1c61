"""Checkpoint save/load (mirrors lowbit/io/checkpoint.py): exact round trip on tiny random
Llama / Qwen2 / Mistral models, atomic writes, and strict refusal of corrupt checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit.io as lio
from lowbit.errors import CheckpointError
from lowbit.io import checkpoint as ckpt
from lowbit.io import publish
from lowbit.nn import QuantLinear

from checkpoint_tools import edit_config, rewrite_tensors
from test_quant_linear import make_qw

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=128, max_position_embeddings=64,
)
# one grid per projection, so every storage variant goes through a checkpoint
GRIDS = {
    "q_proj": dict(bits=2, group_size=32, sym=False, perm=True, method="gptq"),
    "k_proj": dict(kind="ternary", bits=2, group_size=64),
    "v_proj": dict(kind="binary", bits=1, group_size=64),
    "o_proj": dict(bits=3, group_size=64, sym=True),
    "gate_proj": dict(bits=4, group_size=48, sym=False),  # 48 does not divide 64
    "up_proj": dict(bits=8, group_size=64, sym=True),
    "down_proj": dict(bits=4, group_size=48, sym=False, perm=True),  # in=128: groups 48, 48, 32
}
RECIPE = [{"method": "rtn", "bits": 4}]


def tiny_model(arch: str = "llama", tie: bool = False, seed: int = 0):
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[arch]
    config = getattr(transformers, cls)(tie_word_embeddings=tie, **TINY)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    i = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            leaf = name.rpartition(".")[2]
            qw = make_qw(mod.out_features, mod.in_features, seed=seed * 100 + i, **GRIDS[leaf])
            bias = None if mod.bias is None else mod.bias.detach() + 0.01 * i
            model.set_submodule(name, QuantLinear.from_quantized(qw, bias))
            i += 1
    with torch.no_grad():  # the dense tensors are stored fp16: fp16-exact values keep the round trip bit-exact
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved Llama checkpoint, for the read-only and corruption tests (each copies it)."""
    model = tiny_model("llama")
    out = lio.save(model, tmp_path_factory.mktemp("ck") / "llama", quantization_config={"recipe": RECIPE})
    return model, out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False)])
def test_round_trip_logits_identical(tmp_path, arch, tie):
    model = tiny_model(arch, tie)
    out = lio.save(model, tmp_path / "ck", quantization_config={"recipe": RECIPE})
    loaded = lio.load(out)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded), logits(model))
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_quant == 2 * 7
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    else:
        assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    if arch == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None


def test_config_json_layout(saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "lowbit_manifest.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format_version"] == 2 and qc["recipe"] == RECIPE
    assert len(qc["layers"]) == 14
    q = qc["layers"]["model.layers.0.self_attn.q_proj"]
    assert q == {
        "in_features": 64, "out_features": 64, "bits": 2, "group_size": 32, "kind": "uniform",
        "sym": False, "zero_const": 0.0, "act_order": True, "bias": False, "method": "gptq",
        "packing": "lsb",
    }
    assert qc["layers"]["model.layers.1.self_attn.k_proj"]["packing"] == "base3"
    assert lio.read_quantization_config(out) == qc
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["lowbit_format_version"] == "2"
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.uint8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.perm").dtype == torch.int64
    for f in out.iterdir():  # JSON and safetensors only: nothing starts with a pickle opcode
        assert not f.read_bytes().startswith(b"\x80")


def test_load_dtype_and_storage(saved):
    model, out = saved
    loaded = lio.load(out, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    q = loaded.model.layers[0].mlp.down_proj
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.uint8
    assert torch.equal(q.dequantize_weight(), model.model.layers[0].mlp.down_proj.dequantize_weight())
    assert logits(loaded).dtype == torch.bfloat16
    assert not loaded.training


def test_tokenizer_round_trip(tmp_path):
    model = tiny_model("llama", tie=True)
    out = lio.save(model, tmp_path / "ck", quantization_config={"recipe": RECIPE}, tokenizer=tiny_tokenizer())
    loaded, tok = lio.load_with_tokenizer(out)
    assert tok("w1 w2 w5")["input_ids"] == [1, 2, 5]
    assert torch.equal(logits(loaded), logits(model))
    bare = lio.save(model, tmp_path / "bare", quantization_config={"recipe": RECIPE})
    with pytest.raises(CheckpointError, match="tokenizer"):
        lio.load_with_tokenizer(bare)


def test_save_rejects_bad_quantization_config(tmp_path):
    model = tiny_model()
    with pytest.raises(CheckpointError, match="layers"):
        lio.save(model, tmp_path / "a", quantization_config={"recipe": [], "layers": {}})
    with pytest.raises(CheckpointError, match="quantization_config"):
        lio.save(model, tmp_path / "b", quantization_config={"recipe": [object()]})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# atomicity


def _tree(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_existing_dir_refused_then_overwritten(tmp_path):
    first = tiny_model(seed=0)
    out = lio.save(first, tmp_path / "ck", quantization_config={"recipe": RECIPE})
    before = _tree(out)
    with pytest.raises(CheckpointError, match="overwrite"):
        lio.save(tiny_model(seed=1), out, quantization_config={"recipe": RECIPE})
    assert _tree(out) == before
    second = tiny_model(seed=1)
    lio.save(second, out, quantization_config={"recipe": [{"method": "second"}]}, overwrite=True)
    assert os.listdir(tmp_path) == ["ck"]
    assert lio.read_quantization_config(out)["recipe"] == [{"method": "second"}]
    assert torch.equal(logits(lio.load(out)), logits(second))


def test_overwrite_without_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_rename_exchange", lambda a, b: None)
    out = lio.save(tiny_model(seed=0), tmp_path / "ck", quantization_config={"recipe": RECIPE})
    second = tiny_model(seed=1)
    lio.save(second, out, quantization_config={"recipe": RECIPE}, overwrite=True)
    assert os.listdir(tmp_path) == ["ck"]
    assert torch.equal(logits(lio.load(out)), logits(second))


def test_overwrite_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lio.save(tiny_model(), foreign, quantization_config={"recipe": RECIPE}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        lio.save(tiny_model(), tmp_path / "file", quantization_config={"recipe": RECIPE}, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    lio.save(tiny_model(), empty, quantization_config={"recipe": RECIPE}, overwrite=True)
    assert (empty / "model.safetensors").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_crash_mid_save_leaves_old_folder_and_no_temp(tmp_path, monkeypatch, overwrite):
    out = tmp_path / "ck"
    if overwrite:
        lio.save(tiny_model(seed=0), out, quantization_config={"recipe": RECIPE})
        before = _tree(out)

    def crash(obj, path):
        Path(path).write_text('{"half": ')  # a partial write, then the process "dies"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(CheckpointError, match="simulated"):
        lio.save(tiny_model(seed=1), out, quantization_config={"recipe": RECIPE}, overwrite=overwrite)
    if overwrite:
        assert os.listdir(tmp_path) == ["ck"]
        assert _tree(out) == before
        monkeypatch.undo()
        lio.load(out)
    else:
        assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# corrupt checkpoints


Q = "model.layers.0.self_attn.q_proj"


_rewrite = rewrite_tensors


def _set_qc(ck: Path, **fields) -> None:
    edit_config(ck, lambda cfg: cfg["quantization_config"].update(fields))


def test_truncated_safetensors(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lio.load(ck)
    f.write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lio.load(ck)


def test_missing_tensor(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    _rewrite(ck, lambda t: t.pop(f"{Q}.scales"))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{Q}.scales"):
        lio.load(ck)


def test_unexpected_tensor(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    _rewrite(ck, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.extra.weight"):
        lio.load(ck)


def test_wrong_shape(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    _rewrite(ck, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{Q}.qweight: shape \(64, 15\).*expected \(64, 16\)"):
        lio.load(ck)
    ck2 = copy_checkpoint(saved[1], tmp_path / "ck2")
    _rewrite(ck2, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match="model.norm.weight: shape"):
        lio.load(ck2)


def test_wrong_dtype(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    _rewrite(ck, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()}))
    with pytest.raises(CheckpointError, match=f"{Q}.scales: dtype torch.float32.*expected torch.float16"):
        lio.load(ck)
    ck2 = copy_checkpoint(saved[1], tmp_path / "ck2")
    _rewrite(ck2, lambda t: t.update({f"{Q}.perm": torch.zeros(64, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=f"{Q}.perm: not a permutation"):
        lio.load(ck2)


def test_bad_config(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    _set_qc(ck, format_version=3)
    with pytest.raises(CheckpointError, match="format_version"):
        lio.load(ck)
    _set_qc(ck, format_version=1)
    with pytest.raises(CheckpointError, match="format_version: 1 was written by an earlier lowbit"):
        lio.load(ck)
    _set_qc(ck, format_version=2, quant_method="gptq")
    with pytest.raises(CheckpointError, match="quant_method"):
        lio.load(ck)
    _set_qc(ck, quant_method="lowbit", layers={"model.layers.9.mlp.up_proj": saved[0].model.layers[0].mlp.up_proj.metadata()})
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj"):
        lio.load(ck)
    meta = dict(saved[0].model.layers[0].mlp.up_proj.metadata(), bits=9)
    _set_qc(ck, layers={"model.layers.0.mlp.up_proj": meta})
    with pytest.raises(CheckpointError, match="bits"):
        lio.load(ck)
    (ck / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        lio.load(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        lio.load(ck)


def test_missing_weights_file_and_folder(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        lio.load(ck)
    with pytest.raises(CheckpointError, match="path"):
        lio.load(tmp_path / "nowhere")


def test_layer_listed_but_stored_dense(saved, tmp_path):
    """A layers entry whose tensors are absent (a dense weight instead) is refused, naming both."""
    ck = copy_checkpoint(saved[1], tmp_path / "ck")

    def densify(t):
        for k in [k for k in t if k.startswith(Q + ".")]:
            t.pop(k)
        t[f"{Q}.weight"] = torch.zeros(64, 64)

    _rewrite(ck, densify)
    with pytest.raises(CheckpointError, match=f"unexpected tensor.*{Q}.weight"):
        lio.load(ck)
