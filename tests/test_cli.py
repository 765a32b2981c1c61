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
    assert "config.json" in _one_line_error(err)
