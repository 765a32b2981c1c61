"""The `lowbit` command line: user mistakes give one line and exit status 2."""

import json

import pytest

from lowbit.cli import main


def _run(capsys, *argv):
    capsys.readouterr()  # drop whatever the test's own setup printed
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_presets_lists_the_issue_presets(capsys):
    rc, out, _ = _run(capsys, "presets")
    assert rc == 0
    for name in ["w8-rtn", "w4-rtn", "w4-gptq", "w3-gptq", "w2-gptq", "w4-ldlq"]:
        assert name in out


def test_unknown_recipe(capsys, tmp_path):
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--recipe", "w9-magic", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "w9-magic" in _one_line_error(err)


def test_bits_outside_the_grid(capsys, tmp_path):
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--bits", "5", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "bits" in _one_line_error(err)


def test_existing_output_folder_is_refused(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "--overwrite" in _one_line_error(err)
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_missing_model_folder(capsys, tmp_path):
    rc, _, err = _run(capsys, "quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "nope" in _one_line_error(err)


def test_unsupported_architecture_folder(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(d)
    rc, _, err = _run(capsys, "quantize", "--model", str(d), "--recipe", "w4-rtn", "--no-eval", "--out", str(tmp_path / "o"))
    assert rc == 2
    _one_line_error(err)


def test_corrupt_checkpoint(capsys, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "lowbit", "format_version": 1}}))
    (d / "model.safetensors").write_bytes(b"\x00\x01garbage")
    rc, _, err = _run(capsys, "eval", "ppl", str(d))
    assert rc == 2
    _one_line_error(err)
    rc, _, err = _run(capsys, "inspect", str(tmp_path / "missing"))
    assert rc == 2
    assert "not a checkpoint folder" in _one_line_error(err)


# ----------------------------------------------------------------------------------------------
# checked before any work is done; inputs that used to give random or broken models


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny full-precision Llama as a Hugging Face folder (weights + tokenizer)."""
    from lowbit.models.tiny import TINY_VOCAB, tiny_model

    from test_checkpoint import tiny_tokenizer

    d = tmp_path / "hf"
    tiny_model("llama", seed=0).save_pretrained(d)
    tiny_tokenizer(TINY_VOCAB).save_pretrained(d)
    return d


@pytest.fixture
def no_model_loading(monkeypatch):
    import lowbit.models

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the argument was checked")

    monkeypatch.setattr(lowbit.models, "load_model", fail)


@pytest.mark.parametrize("args,match", [
    (["--threads", "-1"], "--threads: must be at least 1, got -1"),
    (["--threads", "many"], "--threads: must be an integer"),
    (["--seqlen", "0"], "--seqlen: must be at least 1"),
    (["--calib-samples", "-5"], "--calib-samples: must be at least 1"),
])
def test_bad_numbers_are_one_line_errors(capsys, tmp_path, no_model_loading, args, match):
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"), *args)
    assert rc == 2
    assert match in _one_line_error(err)


def test_unwritable_output_is_refused_before_quantizing(capsys, tmp_path, no_model_loading, monkeypatch):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "file" / "sub" / "o"))
    assert rc == 2 and "which is not a folder" in _one_line_error(err)
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", "/proc/lowbit/o")
    assert rc == 2 and "--out: cannot write under '/proc'" in _one_line_error(err)
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "ro" / "o"))
    assert rc == 2 and "read-only filesystem" in _one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created on the way


def test_overwrite_of_a_foreign_folder_is_refused_before_quantizing(capsys, tmp_path, no_model_loading):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}}))
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"), "--overwrite")
    assert rc == 2 and "not a lowbit checkpoint" in _one_line_error(err)
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_quantizing_a_lowbit_checkpoint_or_a_folder_missing_a_tensor_is_refused(capsys, tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    import lowbit
    from lowbit.models.tiny import tiny_model

    ck = lowbit.save(lowbit.quantize(tiny_model("llama"), "w4-rtn", progress=False), tmp_path / "ck")
    rc, _, err = _run(capsys, "quantize", "--model", str(ck), "--recipe", "w4-rtn", "--no-eval", "--out", str(tmp_path / "o"))
    assert rc == 2 and "is a lowbit checkpoint (already quantized)" in _one_line_error(err)

    f = hf_folder / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    rc, _, err = _run(capsys, "quantize", "--model", str(hf_folder), "--recipe", "w4-rtn", "--no-eval", "--out", str(tmp_path / "o"))
    assert rc == 2
    line = _one_line_error(err)
    assert "has no tensor for 'model.layers.1.mlp.down_proj.weight'" in line and "randomly" in line
    assert not (tmp_path / "o").exists()


def test_seqlen_beyond_the_models_positions_is_refused(capsys, tmp_path, hf_folder):
    rc, _, err = _run(capsys, "quantize", "--model", str(hf_folder), "--recipe", "w4-rtn", "--seqlen", "100000",
                      "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "--seqlen: 100000 exceeds the model's max_position_embeddings (256)" in _one_line_error(err)


def test_inspect_validates_like_load(capsys, tmp_path):
    """inspect used to print (exit 0) folders that load refuses."""
    import lowbit
    from lowbit.models.tiny import tiny_model

    from checkpoint_tools import edit_config

    ck = lowbit.save(lowbit.quantize(tiny_model("llama"), "w4-rtn", progress=False), tmp_path / "ck")
    rc, out, _ = _run(capsys, "inspect", str(ck))
    assert rc == 0 and "model.layers.1.mlp.down_proj" in out
    edit_config(ck, lambda cfg: cfg.update(num_attention_heads=0), sign=False)
    rc, _, err = _run(capsys, "inspect", str(ck))
    assert rc == 2 and "num_attention_heads" in _one_line_error(err)


def test_calib_data_problems_are_refused_before_loading_the_model(capsys, tmp_path, no_model_loading):
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"),
                      "--calib-data", str(tmp_path / "nope.jsonl"))
    assert rc == 2
    assert "calib_data:" in (line := _one_line_error(err)) and "nope.jsonl" in line and "does not exist" in line
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"), "--calib-data", str(tmp_path / "bad.jsonl"))
    assert rc == 2 and "line 1 has no string field 'text'" in _one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_calib_data_calibrates_on_the_users_text(capsys, tmp_path, hf_folder):
    text = tmp_path / "mine.txt"
    text.write_text("the cat sat on the mat and the dog ran to the sun. " * 60)
    out = tmp_path / "o"
    rc, printed, err = _run(capsys, "quantize", "--model", str(hf_folder), "--recipe", "w4-gptq", "--no-eval", "--seqlen", "32",
                            "--calib-samples", "4", "--calib-data", str(text), "--out", str(out), "--quiet")
    assert rc == 0, err
    assert f"4×32 tokens, {str(text)!r}" in printed
    assert json.loads((out / "lowbit_report.json").read_text())["calib_data"] == str(text)
    # too little text for one window of --seqlen: one line, nothing written
    (tmp_path / "short.txt").write_text("the cat")
    rc, _, err = _run(capsys, "quantize", "--model", str(hf_folder), "--recipe", "w4-gptq", "--no-eval", "--seqlen", "32",
                      "--calib-data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o2"))
    assert rc == 2 and "fewer than one window of seqlen=32" in _one_line_error(err)
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("args,match", [
    (["--recipe", "w3-omniquant", "--option", "epochs"], "--option: expected NAME=VALUE"),
    (["--recipe", "w3-omniquant", "--option", "epoch=2"], "options: the 'omniquant' weight method has no option(s) ['epoch']"),
    (["--recipe", "w3-omniquant", "--option", "epochs=-1"], "options: epochs must be a non-negative int"),
    (["--recipe", "kv2-akvq", "--option", "epochs=2"], "--option: recipe 'kv2-akvq' has no weight step"),
])
def test_method_options_are_checked_before_loading_the_model(capsys, tmp_path, no_model_loading, args, match):
    rc, _, err = _run(capsys, "quantize", "--model", "bundled", "--out", str(tmp_path / "o"), *args)
    assert rc == 2
    assert match in _one_line_error(err)


def test_method_options_merge_into_the_presets_own():
    from lowbit.cli import _with_options
    from lowbit.recipe import resolve

    r = _with_options(resolve("w2-omniquant"), ["epochs=8", "init=mse"], "w2-omniquant")
    assert r.weight.options == {"aug_loss": True, "epochs": 8, "init": "mse"} and r.name == "w2-omniquant"
    r = _with_options(resolve("w2-tesseraq"), ["thresholds=[0.5, 0.1]"], "w2-tesseraq")
    assert r.weight.options == {"thresholds": [0.5, 0.1]}


def test_presets_list_the_method_options(capsys):
    rc, out, _ = _run(capsys, "presets")
    assert rc == 0 and "weight-method options" in out and "stage_steps=20" in out


def test_block_trained_recipes_default_to_fewer_calibration_sequences(capsys, tmp_path, hf_folder):
    from lowbit.methods.blockrecon import CALIB_SAMPLES
    from lowbit.recipe import DEFAULT_CALIB_SAMPLES, PRESETS

    assert PRESETS["w3-gptq"].calib_samples == DEFAULT_CALIB_SAMPLES == 128
    for name in ("w3-omniquant", "w2-tesseraq", "w3-affinequant", "w3-cqe", "w4a4kv4-quarot-tesseraq"):
        assert PRESETS[name].calib_samples == CALIB_SAMPLES == 32, name
    rc, out, _ = _run(capsys, "presets")
    assert rc == 0 and "32 seqs" in out and "128 seqs" in out
    text = tmp_path / "mine.txt"
    text.write_text("the cat sat on the mat and the dog ran to the sun. " * 400)
    for extra, n in (((), 32), (("--calib-samples", "5"), 5)):
        out_dir = tmp_path / f"o{n}"
        rc, printed, err = _run(capsys, "quantize", "--model", str(hf_folder), "--recipe", "w3-omniquant", "--option", "epochs=0",
                                "--no-eval", "--seqlen", "16", "--calib-data", str(text), *extra, "--out", str(out_dir), "--quiet")
        assert rc == 0, err
        assert f"{n}×16 tokens" in printed
        assert json.loads((out_dir / "lowbit_report.json").read_text())["calib_samples"] == n
