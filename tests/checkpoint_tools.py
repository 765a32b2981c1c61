"""Helpers for tests that edit saved checkpoints the way a hostile or careless writer would."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit.io import checkpoint as ckpt


def rewrite_tensors(ck: Path, edit) -> None:
    """Apply ``edit(tensors)`` to a checkpoint's weights, keeping the header metadata."""
    f = ck / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        metadata = h.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata=metadata)


def poison(ck: Path, name: str, value: float, index: int = 0) -> None:
    """Set element ``index`` (flattened) of the stored tensor ``name`` to ``value``."""

    def edit(tensors):
        t = tensors[name].clone()
        t.view(-1)[index] = value
        tensors[name] = t

    rewrite_tensors(ck, edit)


def resign(ck: Path) -> None:
    """Make the weights header's description digest match the (edited) ``config.json`` — what a
    hostile writer can always do — so that the checks behind the digest are reached."""
    f = ck / "model.safetensors"
    cfg = json.loads((ck / "config.json").read_text())
    qc = cfg["quantization_config"]
    arch = ckpt._adapter(cfg["model_type"], "test").check_config(cfg)
    with safe_open(str(f), "pt") as h:
        metadata = h.metadata()
    metadata[ckpt._DIGEST_KEY] = ckpt._digest(ckpt._description(cfg["model_type"], arch, qc))
    save_file(load_file(str(f)), str(f), metadata=metadata)


def edit_config(ck: Path, edit, *, sign: bool = True) -> None:
    """Apply ``edit(cfg)`` to ``config.json`` (then :func:`resign` unless ``sign=False``)."""
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    if sign:
        resign(ck)
