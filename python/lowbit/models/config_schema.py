"""Typed fields of a model config: the allow-list of what a checkpoint's ``config.json`` may set.

An adapter (:mod:`lowbit.models.adapters`) lists the config keys its architecture needs, each with
one of these fields. :func:`check_config` keeps exactly those keys (everything else in the file —
``_attn_implementation``, ``auto_map``, hub-kernel names, labels — is ignored, never passed to
``transformers``) and checks each value's type and range, so no size from a file reaches a
constructor unchecked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import CheckpointError

__all__ = ["Field", "Int", "Float", "Bool", "Choice", "Activation", "TokenIds", "Rope", "LayerTypes", "check_config"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Field:
    """One config key: ``optional`` allows JSON ``null``."""

    optional: bool = False

    def check(self, where: str, v: Any) -> Any:
        if v is None:
            if self.optional:
                return None
            raise CheckpointError(f"{where}: must not be null")
        return self._check(where, v)

    def _check(self, where: str, v: Any) -> Any:  # pragma: no cover - every field overrides it
        return v


@dataclass(frozen=True)
class Int(Field):
    lo: int = 1
    hi: int = 1 << 20

    def _check(self, where: str, v: Any) -> int:
        if not _is_int(v) or not self.lo <= v <= self.hi:
            raise CheckpointError(f"{where}: must be an int in [{self.lo}, {self.hi}], got {v!r}")
        return v


@dataclass(frozen=True)
class Float(Field):
    """A finite number in ``(lo, hi)`` (``lo`` included when ``closed_lo``)."""

    lo: float = 0.0
    hi: float = math.inf
    closed_lo: bool = False

    def _check(self, where: str, v: Any) -> float:
        ok = _is_number(v) and math.isfinite(v) and (v >= self.lo if self.closed_lo else v > self.lo) and v < self.hi
        if not ok:
            lo = "[" if self.closed_lo else "("
            raise CheckpointError(f"{where}: must be a finite number in {lo}{self.lo}, {self.hi}), got {v!r}")
        return v


@dataclass(frozen=True)
class Bool(Field):
    def _check(self, where: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise CheckpointError(f"{where}: must be true or false, got {v!r}")
        return v


@dataclass(frozen=True)
class Choice(Field):
    """One of ``choices``."""

    choices: tuple[str, ...] = ()

    def _check(self, where: str, v: Any) -> str:
        if not isinstance(v, str) or v not in self.choices:
            raise CheckpointError(f"{where}: must be one of {sorted(self.choices)}, got {v!r}")
        return v


@dataclass(frozen=True)
class Activation(Field):
    """``hidden_act``: an activation name transformers maps."""

    def _check(self, where: str, v: Any) -> str:
        from transformers.activations import ACT2CLS

        if not isinstance(v, str) or v not in ACT2CLS:
            raise CheckpointError(f"{where}: must be an activation transformers knows ({', '.join(sorted(ACT2CLS))}), got {v!r}")
        return v


@dataclass(frozen=True)
class TokenIds(Field):
    """A token id or a list of them (``eos_token_id`` may be several)."""

    def _check(self, where: str, v: Any) -> Any:
        ids = v if isinstance(v, list) else [v]
        if not ids or len(ids) > 64 or not all(_is_int(i) and 0 <= i < 1 << 24 for i in ids):
            raise CheckpointError(f"{where}: must be a token id or a list of token ids, got {v!r}")
        return v


@dataclass(frozen=True)
class Rope(Field):
    """``rope_parameters``: ``rope_type`` (a RoPE variant transformers knows) and finite numbers."""

    def _check(self, where: str, v: Any) -> dict:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if not isinstance(v, dict):
            raise CheckpointError(f"{where}: must be an object, got {type(v).__name__}")
        known = {"default", *ROPE_INIT_FUNCTIONS}
        rope_type = v.get("rope_type", "default")
        if rope_type not in known:
            raise CheckpointError(f"{where}.rope_type: must be one of {sorted(known)}, got {rope_type!r}")
        for k, x in v.items():
            if k == "rope_type":
                continue
            vals = x if isinstance(x, list) else [x]
            if len(vals) > 1 << 16 or not all(isinstance(e, bool) or (_is_number(e) and math.isfinite(e)) for e in vals):
                raise CheckpointError(f"{where}.{k}: must be a finite number (or a list of them), got {x!r}")
        theta = v.get("rope_theta")
        if theta is not None and not (_is_number(theta) and theta > 0):
            raise CheckpointError(f"{where}.rope_theta: must be positive, got {theta!r}")
        return v


@dataclass(frozen=True)
class LayerTypes(Field):
    """``layer_types``: one attention kind per decoder layer."""

    def _check(self, where: str, v: Any) -> list:
        kinds = ("full_attention", "sliding_attention")
        if not isinstance(v, list) or len(v) > 1 << 16 or not all(k in kinds for k in v):
            raise CheckpointError(f"{where}: must be a list of {kinds}, got {str(v)[:80]}")
        return v


def check_config(cfg: Mapping[str, Any], schema: Mapping[str, Field], where: str = "config.json") -> dict:
    """The keys of ``cfg`` that ``schema`` lists, each checked; keys not in the schema are dropped.

    Returns:
        A new dict (``schema`` order) of the keys present in ``cfg``.

    Raises:
        CheckpointError: a value of the wrong type or out of range (the message names the key).
    """
    out = {}
    for key, field in schema.items():
        if key in cfg:
            out[key] = field.check(f"{where}.{key}", cfg[key])
    return out
