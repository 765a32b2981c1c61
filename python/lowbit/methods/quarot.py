"""QuaRot (Ashkboos et al., 2024): fixed randomized Hadamard rotations that remove outliers.

R1 = ``diag(s₁)·H_hidden`` on the residual stream and R2 = ``diag(s₂)·H_head_dim`` per head on
values/outputs (random signs from ``seed``), plus the online Hadamards R3 (queries/keys after RoPE)
and R4 (``down_proj`` input). The rotated model is exact in full precision; quantizing it (weights
with GPTQ, activations per token, the KV cache per token) then loses far less than quantizing the
original, whose activations have a few huge channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.adapters import Adapter
from .rotation import Rotations, apply_rotations, check_rotatable, fuse_norms

__all__ = ["quarot_rotations", "quarot"]


def quarot_rotations(hidden: int, head_dim: int, n_layers: int, seed: int = 0) -> Rotations:
    """Random Hadamard R1 ``(hidden, hidden)`` and one shared R2 ``(head_dim, head_dim)`` per layer
    (float64), from ``seed`` (R2 uses ``seed + 1``)."""
    from ..ops import random_hadamard

    r1 = torch.from_numpy(random_hadamard(hidden, seed, dtype="float64"))
    r2 = torch.from_numpy(random_hadamard(head_dim, seed + 1, dtype="float64"))
    return Rotations(r1=r1, r2=[r2] * n_layers, source="quarot")


def quarot(
    model: nn.Module,
    *,
    seed: int = 0,
    online_qk: bool = True,
    online_down: bool = True,
    adapter: Optional[Adapter] = None,
) -> Rotations:
    """Fuse the norms of ``model`` and rotate it with QuaRot's randomized Hadamards, in place.

    Returns the :class:`Rotations` applied (the model computes the same function in full precision).
    """
    adapter = check_rotatable(model, adapter)
    d = adapter.dims(model)
    rot = quarot_rotations(d.hidden, d.head_dim, len(adapter.decoder_layers(model)), seed)
    rot.online_qk, rot.online_down = online_qk, online_down
    fuse_norms(model, adapter)
    apply_rotations(model, rot, adapter)
    return rot


def _rotate(step, model, adapter, recipe, calib, progress):
    rot = quarot(model, seed=step.seed, online_qk=step.online_qk, online_down=step.online_down, adapter=adapter)
    return rot, []


def _register() -> None:
    from .registry import RotationMethod, register_rotation

    register_rotation(RotationMethod("quarot", _rotate))


_register()
