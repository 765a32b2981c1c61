"""Property test of the checkpoint reader: whatever is done to a saved checkpoint's config.json or
weights file, ``lowbit.load`` either loads it or raises :class:`CheckpointError` — never another
exception, a hang or a crash — and ``lowbit inspect`` agrees (exit 0 exactly when load succeeds).

Mutations are drawn by hypothesis: a value anywhere in config.json replaced (by hostile numbers,
strings, containers), a key deleted or added — with the description digest re-signed half of the
time, as a hostile writer would, so the checks behind it are reached — and bytes of the weights
file flipped, truncated or its header length rewritten. ``LOWBIT_FUZZ_EXAMPLES`` sets how many
examples each property runs (CI: the default, with a fixed seed so that runs are reproducible).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lowbit
import lowbit.io as lio
from lowbit.cli import main
from lowbit.errors import CheckpointError
from lowbit.models.tiny import random_ids
from lowbit.models.tiny import tiny_model as fp_tiny

from checkpoint_tools import resign
from test_checkpoint import RECIPE, tiny_model

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two checkpoints that cover every section of the format: all packings and a tied head; a
    rotated model with online Hadamards, activation quantizers and a calibrated KV quantizer."""
    root = tmp_path_factory.mktemp("fuzz")
    packed = lio.save(tiny_model("llama", tie=True), root / "packed", quantization_config={"recipe": RECIPE})
    recipe = [lowbit.Rotate("quarot"), lowbit.WeightQuant("rtn", 4, 16), lowbit.ActQuant(8), lowbit.KVQuant(4, "kvquant")]
    online = lio.save(lowbit.quantize(fp_tiny("qwen2", seed=1), recipe, random_ids(2, 32, seed=2), progress=False), root / "online")
    return [packed, online]


HOSTILE_INTS = st.sampled_from([0, -1, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 4096, 2**31, 2**40, 2**63, 2**64, -(2**63)])
SCALARS = st.one_of(
    st.none(), st.booleans(), HOSTILE_INTS, st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "llama", "qwen2", "uniform", "ternary", "vq", "e8p", "learned", "lsb", "base3", "kvquant",
                     "some-org/kernel", "../../etc/passwd", "model.layers.0.mlp.down_proj", "\x00"]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    """Every (container path, key) in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix, i
            yield from _paths(v, prefix + (i,))


def _at(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _outcome(path: Path):
    """(loaded?, error) of lowbit.load, checking that the only error is CheckpointError."""
    try:
        lio.load(path)
        return True, None
    except CheckpointError as e:
        return False, e
    # anything else propagates and fails the property


def _check(path: Path, capsys) -> None:
    ok, err = _outcome(path)
    event("loaded" if ok else str(err).split(":")[0][:60])
    capsys.readouterr()
    rc = main(["inspect", str(path)])
    out, stderr = capsys.readouterr()
    assert rc == (0 if ok else 2), (err, stderr)
    if not ok:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), stderr


@FUZZ
@given(data=st.data())
def test_mutated_config_loads_or_raises_checkpoint_error(bases, capsys, data):
    base = data.draw(st.sampled_from(bases), label="base")
    cfg = json.loads((base / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        where = list(_paths(cfg))
        parent_path, key = data.draw(st.sampled_from(where), label="where")
        parent = _at(cfg, parent_path)
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="op")
        if op == "replace":
            parent[key] = data.draw(VALUES, label="value")
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="new key")] = data.draw(VALUES, label="new value")
        else:
            parent.append(data.draw(VALUES, label="new item"))
    work = Path(tempfile.mkdtemp())
    try:
        ck = work / "ck"
        shutil.copytree(base, ck)
        (ck / "config.json").write_text(json.dumps(cfg))
        if data.draw(st.booleans(), label="re-sign"):
            try:
                resign(ck)
            except (CheckpointError, KeyError, TypeError, AttributeError):
                pass  # a config too broken to compute a digest of: load must refuse it anyway
        _check(ck, capsys)
    finally:
        shutil.rmtree(work)


@FUZZ
@given(data=st.data())
def test_mutated_weights_file_loads_or_raises_checkpoint_error(bases, capsys, data):
    base = data.draw(st.sampled_from(bases), label="base")
    raw = bytearray((base / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    op = data.draw(st.sampled_from(["flip header", "flip data", "truncate", "length", "append"]), label="op")
    if op == "flip header":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(8, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif op == "flip data":
        i = data.draw(st.integers(8 + n, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif op == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(n - 16, n + 16).filter(lambda v: v >= 0))))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    work = Path(tempfile.mkdtemp())
    try:
        ck = work / "ck"
        shutil.copytree(base, ck)
        (ck / "model.safetensors").write_bytes(bytes(raw))
        _check(ck, capsys)
    finally:
        shutil.rmtree(work)
