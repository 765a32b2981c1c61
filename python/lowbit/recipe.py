"""Recipes: what to do to a model, as an ordered list of step configs, and the named presets.

Each step is a frozen dataclass (torchao style): defaults, validation in ``__post_init__``, a
``version``, and ``to_dict``/``from_dict`` so the recipe is stored in the checkpoint. A preset name
is just a recipe. Today there is one kind of step, :class:`WeightQuant` (RTN, GPTQ or LDLQ on a
uniform, ternary or binary grid); rotations, activation and KV quantization join as more step kinds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence, Union

from .errors import LowbitError, UnsupportedSizeError, ValueRangeError

__all__ = ["WeightQuant", "Recipe", "PRESETS", "resolve", "UnknownRecipeError"]

METHODS = ("rtn", "gptq", "ldlq")
KINDS = ("uniform", "ternary", "binary")
UNIFORM_BITS = (2, 3, 4, 8)


class UnknownRecipeError(LowbitError, ValueError):
    """A recipe name that is not a preset."""


@dataclass(frozen=True)
class WeightQuant:
    """Quantize the weights of every linear layer in the decoder blocks.

    Attributes:
        method: ``"rtn"`` (round to nearest), ``"gptq"`` (Hessian-aware, lazy block updates) or
            ``"ldlq"`` (QuIP's LDL form of the same rounding).
        bits: 2, 3, 4 or 8 for the uniform grid (ternary and binary imply their own width).
        group_size: columns per scale; ``None`` = one scale per output channel. A group size that
            does not divide ``in_features`` leaves a shorter last group.
        sym: symmetric grid (no zero points).
        kind: ``"uniform"``, ``"ternary"`` (1.58-bit, absmean) or ``"binary"`` (sign · mean|w|).
        mse: search a clipping range per group (shrink the range, keep the lowest error).
        act_order: GPTQ/LDLQ column order by descending Hessian diagonal (stored as a permutation).
        static_groups: with act_order, fix the group parameters before the permuted pass.
        damp: Hessian damping, a fraction of the mean diagonal.
        block_size: GPTQ lazy-batch width.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: Optional[int] = 64
    sym: bool = False
    kind: str = "uniform"
    mse: bool = True
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    version: int = 1
    step: str = field(default="weight", init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueRangeError(f"method: unknown weight method {self.method!r}; choose from {METHODS}")
        if self.kind not in KINDS:
            raise ValueRangeError(f"kind: unknown grid {self.kind!r}; choose from {KINDS}")
        if self.kind == "uniform" and self.bits not in UNIFORM_BITS:
            raise UnsupportedSizeError(f"bits: {self.bits} is not on the uniform grid; choose from {UNIFORM_BITS}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueRangeError(f"group_size: must be a positive int or None, got {self.group_size!r}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueRangeError(f"damp: must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueRangeError(f"block_size: must be >= 1, got {self.block_size}")

    @property
    def needs_hessian(self) -> bool:
        return self.method != "rtn"

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        w = {"ternary": "ternary", "binary": "binary"}.get(self.kind, f"W{self.bits} {'sym' if self.sym else 'asym'}")
        extra = " act-order" if self.act_order and self.method != "rtn" else ""
        return f"{self.method.upper()} {w} {g}{extra}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightQuant":
        d = {k: v for k, v in d.items() if k != "step"}
        return cls(**d)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps, and the name it was made from (if a preset)."""

    steps: tuple
    name: Optional[str] = None

    @property
    def weight(self) -> Optional[WeightQuant]:
        return next((s for s in self.steps if isinstance(s, WeightQuant)), None)

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.steps]

    @classmethod
    def from_list(cls, steps: Sequence[dict], name: Optional[str] = None) -> "Recipe":
        out = []
        for i, s in enumerate(steps):
            kind = s.get("step")
            if kind != "weight":
                raise ValueRangeError(f"recipe[{i}]: unknown step kind {kind!r}")
            out.append(WeightQuant.from_dict(s))
        return cls(tuple(out), name)

    def describe(self) -> str:
        return " → ".join(s.describe() for s in self.steps)


PRESETS: dict[str, Recipe] = {
    "w8-rtn": Recipe((WeightQuant("rtn", 8, None, sym=True, mse=False),), "w8-rtn"),
    "w4-rtn": Recipe((WeightQuant("rtn", 4, 64),), "w4-rtn"),
    "w3-rtn": Recipe((WeightQuant("rtn", 3, 64),), "w3-rtn"),
    "w2-rtn": Recipe((WeightQuant("rtn", 2, 32),), "w2-rtn"),
    "w4-gptq": Recipe((WeightQuant("gptq", 4, 64),), "w4-gptq"),
    "w3-gptq": Recipe((WeightQuant("gptq", 3, 64),), "w3-gptq"),
    "w2-gptq": Recipe((WeightQuant("gptq", 2, 32),), "w2-gptq"),
    "w4-ldlq": Recipe((WeightQuant("ldlq", 4, 64),), "w4-ldlq"),
    "w1.58-gptq": Recipe((WeightQuant("gptq", 2, 64, kind="ternary", mse=False),), "w1.58-gptq"),
}


def resolve(recipe: Union[str, Recipe, WeightQuant, Sequence[Any]], **overrides: Any) -> Recipe:
    """A :class:`Recipe` from a preset name, a recipe, one step, or a list of steps/dicts.

    ``overrides`` (e.g. ``bits=3, group_size=128, sym=True``) replace fields of the weight step.
    """
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise UnknownRecipeError(f"recipe: unknown preset {recipe!r}; presets: {', '.join(PRESETS)}")
        r = PRESETS[recipe]
    elif isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, WeightQuant):
        r = Recipe((recipe,))
    else:
        steps = [s if not isinstance(s, dict) else WeightQuant.from_dict(s) for s in recipe]
        r = Recipe(tuple(steps))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        steps = tuple(replace(s, **overrides) if isinstance(s, WeightQuant) else s for s in r.steps)
        r = Recipe(steps, r.name)
    return r
