"""For fixed seeds the presets give the same stored codes as before issue 15's refactor (§1).

``tests/fixtures/byte_identity/`` holds, per cell (a tiny architecture and a recipe), the quantized
tensors of the checkpoint that the code at commit ``e037df2`` wrote (``make.py`` there says how).
Each cell is quantized and saved again with the current code and every tensor compared bit for bit:
same keys, same dtype, same shape, same bytes. The dense tensors are not compared (their storage
dtype changed to float16 on purpose).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_DIR = Path(__file__).resolve().parent / "fixtures" / "byte_identity"
_spec = importlib.util.spec_from_file_location("byte_identity_make", _DIR / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def _where(key: str, want: torch.Tensor, got: torch.Tensor) -> str:
    """The first differing element of two same-shape tensors, for the failure message."""
    a, b = want.reshape(-1), got.reshape(-1)
    if a.dtype.is_floating_point:
        diff = (a.view(torch.int16 if a.element_size() == 2 else torch.int32)
                != b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    else:
        diff = a != b
    idx = int(diff.nonzero()[0])
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), want.shape)) if want.ndim else ()
    return (f"{key}: {int(diff.sum())} of {a.numel()} elements differ; first at {pos}: "
            f"fixture {a[idx].item()!r}, now {b[idx].item()!r}")


# Known behaviour changes of the refactor, kept visible: the tensors named here are left out of
# the comparison for these cells, every other tensor of the cell must still be byte-identical.
# KVQuant's 1-D k-means moved from a torch Lloyd (an empty cell keeps its level) to the Rust k-means
# (lowbit.vq.kmeans with d=1, which re-seeds an empty cluster on the farthest samples) in c8a0bb7, as
# issue 15 §4 asks. Where the weighted-quantile initialisation repeats a level, the two end in
# different optima: kv2 one channel per model (llama layer 1 head 0 channel 14, qwen2 layer 0 head 1
# channel 11; weighted inertia of that channel about 1.3% higher than before), kv4 most channels (key
# inertia about 35% lower). Value levels and the key ranges are unchanged. On the bundled model
# kv2-kvquant went from 40.36 to 39.85 out of domain.
_KNOWN = {cell: ("key_levels",) for cell in ("kv2-kvquant", "kv4-kvquant")}
_PARAMS = [pytest.param(a, c, id=f"{a}-{c}") for a, c in make.CELLS]


@pytest.mark.parametrize("arch,cell", _PARAMS)
def test_stored_codes_are_byte_identical(arch, cell):
    path = make.fixture_path(arch, cell)
    with safe_open(str(path), "pt") as f:
        assert (f.metadata() or {}).get("commit", "").startswith(make.OLD_COMMIT), f"{path.name}: not written at {make.OLD_COMMIT}"
    want = load_file(str(path))
    got = make.stored_quantized(arch, cell)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{arch}-{cell}: tensors missing now {missing}, new {extra}"
    changed = _KNOWN.get(cell, ())
    compared = [k for k in sorted(want) if not k.endswith(changed or ("\0",))]
    assert compared, f"{arch}-{cell}: nothing left to compare"
    bad = []
    for key in compared:
        w, g = want[key], got[key]
        if w.dtype != g.dtype or w.shape != g.shape:
            bad.append(f"{key}: fixture {w.dtype} {tuple(w.shape)}, now {g.dtype} {tuple(g.shape)}")
        elif not torch.equal(w.reshape(-1).view(torch.uint8), g.reshape(-1).view(torch.uint8)):
            bad.append(_where(key, w, g))
    for key in sorted(set(want) - set(compared)):  # the known changes keep their dtype and shape
        assert (want[key].dtype, want[key].shape) == (got[key].dtype, got[key].shape), key
    assert not bad, f"{arch}-{cell}: {len(bad)} of {len(want)} stored tensors differ from {make.OLD_COMMIT}:\n  " + "\n  ".join(bad)
