"""Saving never loses a user's file (mirrors lowbit/io/publish.py and the save half of
lowbit/io/checkpoint.py): what an overwrite may replace, race-free publishing, stale staging
folders after kill -9, permissions, byte-identical files, OS errors as typed errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lowbit.io as lio
from lowbit.errors import CheckpointError
from lowbit.io import checkpoint as ckpt
from lowbit.io import publish

from test_checkpoint import RECIPE, logits, tiny_model, tiny_tokenizer

QC = {"recipe": RECIPE}


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# ----------------------------------------------------------------------------------------------
# overwrite replaces only what lowbit wrote


def test_overwrite_refuses_a_folder_that_only_claims_to_be_lowbit(tmp_path, model):
    """The red-team case: config.json says quant_method lowbit, the folder is the user's."""
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    (home / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}}))
    (home / "thesis.tex").write_text("precious")
    before = _tree(home)
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint.*lowbit_manifest.json"):
        lio.save(model, home, quantization_config=QC, overwrite=True)
    assert _tree(home) == before
    assert sorted(os.listdir(tmp_path)) == ["home"]


def test_overwrite_refuses_a_checkpoint_holding_a_users_file(tmp_path, model):
    out = lio.save(model, tmp_path / "ck", quantization_config=QC, tokenizer=tiny_tokenizer(), report={"t": 1.5})
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    before = _tree(out)
    with pytest.raises(CheckpointError, match=r"holds 'eval', 'notes.txt', which lowbit did not write"):
        lio.save(tiny_model("llama", seed=1), out, quantization_config=QC, overwrite=True)
    assert _tree(out) == before
    # without the user's files it is replaced, tokenizer, report and manifest included
    (out / "notes.txt").unlink()
    (out / "eval").rmdir()
    second = tiny_model("llama", seed=1)
    lio.save(second, out, quantization_config=QC, overwrite=True)
    assert torch.equal(logits(lio.load(out)), logits(second))
    assert not (out / "tokenizer.json").exists() and not (out / ckpt.REPORT_NAME).exists()
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_manifest_lists_every_file_with_size_and_hash(tmp_path, model):
    out = lio.save(model, tmp_path / "ck", quantization_config=QC, tokenizer=tiny_tokenizer(), report={"seconds": 3.0})
    m = json.loads((out / ckpt.MANIFEST_NAME).read_text())
    names = set(os.listdir(out)) - {ckpt.MANIFEST_NAME}
    assert set(m["files"]) | set(m["volatile"]) == names
    assert m["volatile"] == [ckpt.REPORT_NAME]
    for name, entry in m["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert lio.read_report(out) == {"seconds": 3.0}
    assert "stats" not in lio.read_quantization_config(out)


# ----------------------------------------------------------------------------------------------
# race-free publishing


def test_folder_created_at_out_during_the_save_is_never_touched(tmp_path, model, monkeypatch):
    out = tmp_path / "ck"
    real = ckpt._write_json

    def someone_else_creates_out(obj, path):
        real(obj, path)
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(ckpt, "_write_json", someone_else_creates_out)
    with pytest.raises(CheckpointError, match="already exists"):
        lio.save(model, out, quantization_config=QC)
    assert _tree(out) == {"theirs.txt": b"theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging folder left
    # with overwrite, the foreign folder that appeared is refused at the swap (checked under the lock)
    (out / "theirs.txt").unlink()
    out.rmdir()
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lio.save(model, out, quantization_config=QC, overwrite=True)
    assert _tree(out) == {"theirs.txt": b"theirs"}


def test_an_empty_folder_created_during_the_save_is_not_replaced(tmp_path, model, monkeypatch):
    """POSIX rename() replaces an empty folder; the publish step must not."""
    out = tmp_path / "ck"
    real = ckpt._write_manifest

    def racer(folder, volatile):
        real(folder, volatile)
        out.mkdir()

    monkeypatch.setattr(ckpt, "_write_manifest", racer)
    with pytest.raises(CheckpointError, match="already exists"):
        lio.save(model, out, quantization_config=QC)
    assert out.is_dir() and os.listdir(out) == []


@pytest.mark.parametrize("renameat2", [True, False])
def test_concurrent_saves_to_one_new_folder_exactly_one_wins(tmp_path, monkeypatch, renameat2):
    if not renameat2:  # the portable path: claim the name with mkdir, rename onto the claim
        monkeypatch.setattr(publish, "_renameat2", lambda a, b, flag: None)
    models = [tiny_model("llama", seed=s) for s in range(4)]
    out = tmp_path / "ck"
    results: list = [None] * len(models)
    start = threading.Barrier(len(models))

    def run(i):
        start.wait()
        try:
            lio.save(models[i], out, quantization_config=QC)
            results[i] = "ok"
        except CheckpointError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r == "ok"]
    assert len(winners) == 1, results
    assert all("already exists" in str(r) for r in results if r != "ok"), results
    assert torch.equal(logits(lio.load(out)), logits(models[winners[0]]))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_overwrite_without_renameat2_uses_two_renames(tmp_path, model, monkeypatch):
    monkeypatch.setattr(publish, "_renameat2", lambda a, b, flag: None)
    out = lio.save(model, tmp_path / "ck", quantization_config=QC)
    with pytest.raises(CheckpointError, match="already exists"):
        lio.save(model, out, quantization_config=QC)
    second = tiny_model("llama", seed=2)
    lio.save(second, out, quantization_config=QC, overwrite=True)
    assert torch.equal(logits(lio.load(out)), logits(second))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_swap_refuses_a_target_replaced_between_check_and_swap(tmp_path, model, monkeypatch):
    out = lio.save(model, tmp_path / "ck", quantization_config=QC)
    real = publish._rename_exchange
    calls = []

    def replaced_just_before(a, b):
        if not calls:  # another process puts its own folder at out_dir after the check
            os.rename(out, tmp_path / "aside")
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / "data").write_text("other")
            os.rename(tmp_path / "other", out)
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(publish, "_rename_exchange", replaced_just_before)
    with pytest.raises(CheckpointError, match="replaced by another process"):
        lio.save(tiny_model("llama", seed=3), out, quantization_config=QC, overwrite=True)
    assert _tree(out) == {"data": b"other"}
    assert sorted(os.listdir(tmp_path)) == ["aside", "ck"]


# ----------------------------------------------------------------------------------------------
# kill -9 during a save


_KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import lowbit.io as lio
from lowbit.io import checkpoint as ckpt
from test_checkpoint import tiny_model
real = ckpt._write_json
def die(obj, path):
    real(obj, path)
    os.kill(os.getpid(), signal.SIGKILL)
ckpt._write_json = die
lio.save(tiny_model("llama"), {out!r}, quantization_config={{"recipe": []}})
"""

_LIVE_SAVE = """
import sys
from pathlib import Path
from lowbit.io.publish import staging
with staging(Path({out!r})) as tmp:
    (tmp / "partial").write_text("x")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def test_stale_staging_folders_of_dead_writers_are_cleaned(tmp_path, model):
    out = tmp_path / "ck"
    tests = str(Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", _KILLED_SAVE.format(tests=tests, out=str(out))], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    stale = [n for n in os.listdir(tmp_path) if publish.TMP_TAG in n]
    assert len(stale) == 1 and not out.exists()
    assert (tmp_path / stale[0] / ckpt.WEIGHTS_NAME).stat().st_size > 0  # a full copy, left behind

    # a live writer's staging folder (its lock is held) is left alone; the dead one is removed
    live = subprocess.Popen([sys.executable, "-c", _LIVE_SAVE.format(out=str(out))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        assert live_tmp.is_dir()
        lio.save(model, out, quantization_config=QC)
        assert sorted(os.listdir(tmp_path)) == sorted(["ck", live_tmp.name])
        assert (live_tmp / "partial").read_text() == "x"
        live.kill()  # now it is dead too: the next save of this output cleans it
        live.wait()
        lio.save(model, out, quantization_config=QC, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == ["ck"]
    finally:
        if live.poll() is None:
            live.kill()


def test_cleaning_only_touches_this_outputs_folders(tmp_path, model):
    (tmp_path / f".other{publish.TMP_TAG}abc").mkdir()
    (tmp_path / ".ck-notes").mkdir()
    lio.save(model, tmp_path / "ck", quantization_config=QC)
    assert sorted(os.listdir(tmp_path)) == sorted([".ck-notes", f".other{publish.TMP_TAG}abc", "ck"])


# ----------------------------------------------------------------------------------------------
# permissions, bytes, OS errors


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_folder_and_files_follow_the_umask(tmp_path, model, mask):
    old = os.umask(mask)
    try:
        out = lio.save(model, tmp_path / "ck", quantization_config=QC, tokenizer=tiny_tokenizer())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_same_model_twice_gives_byte_identical_files(tmp_path):
    import lowbit
    from lowbit.models.tiny import random_ids
    from lowbit.models.tiny import tiny_model as fp_tiny

    trees = []
    for i in range(4):  # the safetensors metadata order used to vary from save to save
        model = lowbit.quantize(fp_tiny("llama", seed=0), "w4-gptq", random_ids(4, 32, seed=1), progress=False)
        out = lio.save(model, tmp_path / f"run{i}", tokenizer=tiny_tokenizer(), report={"seconds": time.perf_counter()})
        trees.append({k: v for k, v in _tree(out).items() if k != ckpt.REPORT_NAME})
    assert all(t == trees[0] for t in trees[1:])
    assert set(trees[0]) >= {"config.json", "model.safetensors", ckpt.MANIFEST_NAME, "tokenizer.json"}
    assert b"seconds" not in trees[0]["config.json"]


def test_os_errors_while_saving_are_typed_and_leave_nothing(tmp_path, model, monkeypatch):
    def full(tensors, path, digest):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "_write_weights", full)
    with pytest.raises(CheckpointError, match="out_dir: cannot write .*No space left on device"):
        lio.save(model, tmp_path / "ck", quantization_config=QC)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="out_dir: cannot write"):
        lio.save(model, tmp_path / "file" / "ck", quantization_config=QC)
    with pytest.raises(CheckpointError, match="out_dir: cannot write"):
        lio.save(model, "/proc/lowbit-test/ck", quantization_config=QC)


def test_save_refuses_what_load_would_refuse(tmp_path):
    model = tiny_model("llama")
    model.config.rms_norm_eps = float("nan")
    with pytest.raises(CheckpointError, match="not JSON-serialisable|rms_norm_eps"):
        lio.save(model, tmp_path / "nan", quantization_config=QC)
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(CheckpointError, match="model_type.*'gpt2' is not supported"):
        lio.save(model, tmp_path / "gpt2", quantization_config=QC)
    with pytest.raises(CheckpointError, match="report: not JSON-serialisable"):
        lio.save(tiny_model("llama"), tmp_path / "r", quantization_config=QC, report={"x": float("inf")})
    assert os.listdir(tmp_path) == []
