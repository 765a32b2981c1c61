"""Loading a checkpoint someone else wrote (mirrors lowbit/io/untrusted.py and the load half of
lowbit/io/checkpoint.py): non-regular files, oversized and malformed JSON, config sizes checked
before anything is built, non-finite tensors, a config edited after saving, the key allow-list."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
import lowbit.io as lio
from lowbit.errors import CheckpointError
from lowbit.models.tiny import random_ids
from lowbit.models.tiny import tiny_model as fp_tiny

from checkpoint_tools import edit_config, poison
from test_checkpoint import RECIPE, copy_checkpoint, tiny_model

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama")
    return model, lio.save(model, tmp_path_factory.mktemp("ck") / "llama", quantization_config={"recipe": RECIPE})


@pytest.fixture
def ck(saved, tmp_path):
    return copy_checkpoint(saved[1], tmp_path / "ck")


def _load_in_subprocess(*paths: Path, timeout: float = 60) -> list[str]:
    """``lowbit.load`` of each path in one child process with a timeout (a hang must fail the test,
    not block the suite); returns what each load gave: ``ok`` or the error class and message."""
    code = (
        "import sys, lowbit.io as lio\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        lio.load(p); print('ok', flush=True)\n"
        "    except Exception as e:\n        print(type(e).__name__ + ': ' + str(e), flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=timeout)
    return r.stdout.strip().splitlines()


# ----------------------------------------------------------------------------------------------
# files that are not regular files, oversized and malformed JSON


def test_fifos_and_devices_are_refused_without_blocking(saved, tmp_path):
    fifo_cfg, zero_cfg, fifo_weights = (copy_checkpoint(saved[1], tmp_path / n) for n in ("a", "b", "c"))
    (fifo_cfg / "config.json").unlink()
    os.mkfifo(fifo_cfg / "config.json")
    (zero_cfg / "config.json").unlink()
    (zero_cfg / "config.json").symlink_to("/dev/zero")
    (fifo_weights / "model.safetensors").unlink()
    os.mkfifo(fifo_weights / "model.safetensors")
    a, b, c = _load_in_subprocess(fifo_cfg, zero_cfg, fifo_weights)
    assert a.startswith("CheckpointError: config.json:") and "is a FIFO, not a regular file" in a
    assert b.startswith("CheckpointError: config.json:") and "is a character device, not a regular file" in b
    assert c.startswith("CheckpointError: model.safetensors:") and "is a FIFO" in c
    tok = copy_checkpoint(saved[1], tmp_path / "t")
    os.mkfifo(tok / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*FIFO"):
        lio.load_with_tokenizer(tok)


def test_oversized_config_is_refused_without_reading_it(ck):
    with open(ck / "config.json", "r+b") as f:
        f.truncate(70 << 20)  # sparse: 70 MiB of zeros
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="config.json: .* bytes, more than the"):
        lio.load(ck)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "nests deeper than"),
    ('{"a": ' * 50 + "1" + "}" * 50, "nests deeper than"),
    ('{"rms_norm_eps": NaN}', "NaN"),
    ('{"rms_norm_eps": 1e400}', "too large for a float"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ("\xff\xfe{}", "not UTF-8|not valid JSON"),
    ('{"x": ' + "9" * 5000 + "}", "not valid JSON"),
])
def test_malformed_json_is_a_checkpoint_error(ck, text, match):
    (ck / "config.json").write_bytes(text.encode("utf-8", "surrogateescape") if not text.startswith("\xff") else b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=match):
        lio.load(ck)


# ----------------------------------------------------------------------------------------------
# every size from config.json is checked before anything is built


@pytest.mark.parametrize("key,value,match", [
    ("hidden_size", 2**40, r"hidden_size: must be an int in \[1, 131072\]"),
    ("num_attention_heads", 0, r"num_attention_heads: must be an int"),
    ("num_key_value_heads", 3, "does not divide num_attention_heads"),
    ("vocab_size", -1, "vocab_size"),
    ("rms_norm_eps", -1.0, "rms_norm_eps: must be a finite number"),
    ("max_position_embeddings", 2**62, "max_position_embeddings"),
    ("hidden_act", "os.system", "hidden_act: must be an activation"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings: must be true or false"),
    ("pad_token_id", 1000, "pad_token_id.*outside the vocabulary"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -5.0}, "rope_theta: must be positive"),
    ("model_type", "gpt2", "model_type.*not supported"),
])
def test_config_values_are_typed_and_bounded(ck, key, value, match):
    edit_config(ck, lambda cfg: cfg.update({key: value}), sign=False)
    with pytest.raises(CheckpointError, match=match):
        lio.load(ck)


def test_layer_count_is_checked_against_the_tensors_before_building(ck):
    edit_config(ck, lambda cfg: cfg.update(num_hidden_layers=4000), sign=True)
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers: 4000, but the weights hold tensors of 2 decoder layers"):
        lio.load(ck)
    assert time.perf_counter() - t < 5  # building 4000 layers (even on meta) would take minutes


@pytest.mark.parametrize("field,value,match", [
    ("in_features", 2**40, r"in_features: must be in \[1, 16777216\]"),
    ("group_size", 2**62, r"group_size: must be in \[1, 64\]"),
    ("group_size", 0, "group_size"),
    ("bits", 9, "bits"),
])
def test_layer_sizes_are_bounded(ck, field, value, match):
    edit_config(ck, lambda cfg: cfg["quantization_config"]["layers"][Q].update({field: value}), sign=False)
    with pytest.raises(CheckpointError, match=match):
        lio.load(ck)


def test_kv_quantizer_sizes_are_checked_before_its_buffers_are_allocated(tmp_path):
    model = lowbit.quantize(fp_tiny("qwen2", seed=5), "kv4-kvquant", random_ids(4, 64, seed=6), progress=False)
    out = lio.save(model, tmp_path / "kv")

    def huge(cfg):
        kv = cfg["quantization_config"]["online"]["attention"]["model.layers.0.self_attn"]["kv"]
        kv.update(num_kv_heads=2**15, head_dim=2**12)  # 2^27 channels x 16 levels: 8 GiB of buffers

    edit_config(out, huge)
    with pytest.raises(CheckpointError, match=r"self_attn.*kv: quantizer for 32768 heads × 4096 does not fit"):
        lio.load(out)


# ----------------------------------------------------------------------------------------------
# non-finite values


@pytest.mark.parametrize("tensor", [f"{Q}.scales", "model.layers.0.mlp.gate_proj.zeros", "model.norm.weight",
                                    "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_tensors_are_refused_naming_them(ck, tensor, bad):
    poison(ck, tensor, bad, index=3)
    with pytest.raises(CheckpointError, match=rf"{tensor}: holds 1 non-finite value"):
        lio.load(ck)


def test_non_finite_vq_tables_are_refused(tmp_path):
    from lowbit.nn import VQLinear

    model = fp_tiny("llama", seed=0)
    vq = VQLinear(64, 64, dim=8, stages=[{"codebook": "learned", "k": 16}], method="rsavq", device="cpu")
    g = torch.Generator().manual_seed(0)
    vq.codes0 = torch.randint(0, 256, tuple(vq.codes0.shape), dtype=torch.uint8, generator=g)
    vq.table0 = torch.randn(16, 8, generator=g).half()
    vq.row_scale = torch.ones(64, dtype=torch.float16)
    model.model.layers[0].self_attn.q_proj = vq
    out = lio.save(model, tmp_path / "vq")
    lio.load(out)
    for name in (f"{Q}.table0", f"{Q}.row_scale"):
        ck = copy_checkpoint(out, tmp_path / name)
        poison(ck, name, math.nan)
        with pytest.raises(CheckpointError, match=rf"{name}: holds 1 non-finite"):
            lio.load(ck)


def test_uncalibrated_kv_ranges_may_be_infinite_but_never_nan(tmp_path):
    model = fp_tiny("llama", seed=1)
    lowbit.quantize(model, [lowbit.KVQuant(4, "kvquant")], random_ids(2, 32, seed=2), progress=False)
    kv = model.model.layers[0].self_attn.lowbit_kv
    kv.key_lo.fill_(-math.inf)  # the state before calibration
    out = lio.save(model, tmp_path / "kv")
    assert torch.isinf(lio.load(out).model.layers[0].self_attn.lowbit_kv.key_lo).all()
    name = "model.layers.0.self_attn.lowbit_kv.key_lo"
    poison(out, name, math.nan)
    with pytest.raises(CheckpointError, match=f"{name}: holds 1 non-finite"):
        lio.load(out)


def test_non_finite_perplexity_is_an_error():
    model = fp_tiny("llama", seed=2)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    with pytest.raises(lowbit.ValueRangeError, match="perplexity: .*not a finite perplexity"):
        lowbit.eval.perplexity(model, random_ids(1, 64, seed=3), seqlen=32)


# ----------------------------------------------------------------------------------------------
# the description: an edited config is refused


def test_flipped_tie_word_embeddings_is_refused(ck):
    edit_config(ck, lambda cfg: cfg.update(tie_word_embeddings=True), sign=False)
    with pytest.raises(CheckpointError, match="config.json: its model description .* edited after saving"):
        lio.load(ck)
    edit_config(ck, lambda cfg: None, sign=True)  # a writer that also fixes the digest
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight', 'lm_head.weight' are stored separately, but the architecture ties them"):
        lio.load(ck)


def test_deleted_online_section_is_refused(tmp_path):
    model = lowbit.quantize(fp_tiny("llama", seed=0), [lowbit.Rotate("quarot"), lowbit.ActQuant(8)], progress=False)
    out = lio.save(model, tmp_path / "rot")
    edit_config(out, lambda cfg: cfg["quantization_config"].pop("online"), sign=False)
    with pytest.raises(CheckpointError, match="model description"):
        lio.load(out)
    with pytest.raises(CheckpointError, match="model description"):
        lio.read_quantization_config(out)


def test_edited_layer_entry_and_swapped_weights_are_refused(saved, tmp_path):
    ck = copy_checkpoint(saved[1], tmp_path / "a")
    edit_config(ck, lambda cfg: cfg["quantization_config"]["layers"][Q].update(method="rtn"), sign=False)
    with pytest.raises(CheckpointError, match="model description"):
        lio.load(ck)
    other = lio.save(tiny_model("qwen2"), tmp_path / "qwen2", quantization_config={"recipe": RECIPE})
    ck2 = copy_checkpoint(saved[1], tmp_path / "b")
    (ck2 / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model description"):
        lio.load(ck2)


def test_keys_outside_the_allow_list_never_reach_transformers(ck, monkeypatch):
    """``_attn_implementation`` naming a hub kernel, ``auto_map``: ignored, and so not in the digest."""
    import transformers

    seen = {}
    real = transformers.AutoConfig.for_model

    def spy(model_type, **kwargs):
        seen.update(kwargs)
        return real(model_type, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "for_model", spy)
    edit_config(ck, lambda cfg: cfg.update(_attn_implementation="some-org/kernel", auto_map={"AutoModel": "x.Y"},
                                           trust_remote_code=True), sign=False)
    model = lio.load(ck)
    assert seen and not {"_attn_implementation", "auto_map", "trust_remote_code", "quantization_config"} & set(seen)
    assert model.config._attn_implementation != "some-org/kernel"


def test_format_1_checkpoints_are_refused_with_the_fix(ck):
    edit_config(ck, lambda cfg: cfg["quantization_config"].update(format_version=1), sign=False)
    with pytest.raises(CheckpointError, match="format_version: 1 .* quantize and save the model again"):
        lio.load(ck)
