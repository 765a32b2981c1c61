"""The weight-method registry: each method file registers how it quantizes one linear, what it
needs, the layer type its result is stored as, and the hooks it runs around the layer loop.

:func:`lowbit.quantize`'s loop (:mod:`lowbit.driver`) only asks this registry; it never names a
method. A new weight method is one file that calls :func:`register` at import, plus a preset line
in :mod:`lowbit.recipe` (and its name in the step config's list of methods).

Hooks, all optional, in the order the loop calls them:

* ``quantize(step, W, H, fisher) -> (qweight, loss)`` — per linear: ``W`` the ``(out, in)``
  float32 weight, ``H`` its ``(in, in)`` Hessian (``None`` unless the method needs ``"hessian"``),
  ``fisher`` its ``(out, in)`` diagonal Fisher (``None`` unless it needs ``"fisher"``); returns a
  packed weight that ``layer().from_quantized(qweight, bias)`` turns into the stored module, and
  the method's proxy loss (or ``None``).
* ``between_groups(step, block, inps, kwargs, fp_outs, index)`` — after each linear group of a
  decoder block except the last (QuIP#'s tuning of the layers not quantized yet).
* ``after_block(step, block, inps, kwargs, fp_outs, index) -> (before, after) or None`` — after the
  block's linears are quantized, before its outputs feed the next block (block reconstruction).
* ``after_model(step, model, calib, calib_dtype) -> (before, after) or None`` — once, after the
  loop (end-to-end tuning, QAT).

A *block* method (learned post-training quantization, :mod:`lowbit.methods.blockrecon`) gives
``quantize_block`` instead of relying on ``quantize`` alone:

* ``quantize_block(step, block, groups, data, index) -> ({name: qweight}, (before, after) or None)``
  — per decoder block, before any of its linears is replaced: ``groups`` the block's linears in
  groups sharing an input, ``[[(path, nn.Linear), ...], ...]`` (the adapter's ``linear_groups``), ``data`` a :class:`~lowbit.methods.blockrecon.BlockData`
  (the quantized chain's inputs, the full-precision targets); returns the packed weight of every
  linear and the reconstruction loss before/after. The loop swaps the stored layers in itself.

A method whose default run is paced by its calibration set (block training: each sequence is an
Adam step per block) says how many sequences that default run takes in ``calib_samples``; the CLI
uses it when ``--calib-samples`` is not given (:attr:`lowbit.recipe.Recipe.calib_samples`).

A method's own hyper-parameters are its ``options`` (name → default, JSON values); a step sets them
through ``WeightQuant(options={...})``, checked by name here and by value in ``check_step(step)``
(also where a method refuses a step it cannot run, e.g. a grid it does not support).

Whole-model steps that run once after the weight step (the embeddings' and head's ``EmbedQuant``)
register a :class:`PostWeightMethod` under their step kind; the loop finds them by the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .._registry import Registry
from ..errors import ValueRangeError

__all__ = [
    "WeightMethod",
    "register",
    "weight_method",
    "weight_methods",
    "NEEDS",
    "FAMILIES",
    "RotationMethod",
    "register_rotation",
    "rotation_method",
    "rotation_methods",
    "KVMethod",
    "register_kv",
    "kv_method",
    "kv_methods",
    "PostWeightMethod",
    "register_post_weight",
    "post_weight_method",
    "post_weight_methods",
]

#: what a method may ask the loop for
NEEDS = frozenset({"hessian", "fisher"})
#: the step config a method is configured by: ``"grid"`` — :class:`~lowbit.recipe.WeightQuant`
#: (scalar codes on a uniform/ternary/binary grid), ``"vq"`` — :class:`~lowbit.recipe.VectorQuant`
FAMILIES = ("grid", "vq")


@dataclass(frozen=True)
class WeightMethod:
    """One registered weight method (see the module docstring for the hooks' signatures)."""

    name: str
    quantize: Callable[..., tuple[Any, Optional[float]]]
    layer: Callable[[], type]
    family: str = "grid"
    needs: frozenset = field(default_factory=frozenset)
    between_groups: Optional[Callable[..., None]] = None
    after_block: Optional[Callable[..., Optional[tuple[float, float]]]] = None
    after_model: Optional[Callable[..., Optional[tuple[float, float]]]] = None
    quantize_block: Optional[Callable[..., tuple[dict, Optional[tuple[float, float]]]]] = None
    options: dict = field(default_factory=dict)
    check_step: Optional[Callable[[Any], None]] = None
    calib_samples: Optional[int] = None

    @property
    def needs_calibration(self) -> bool:
        """Whether the loop must have calibration data for this method (Hessians, Fisher, blocks)."""
        return bool(self.needs) or self.quantize_block is not None

    def resolved_options(self, step: Any) -> dict:
        """The method's options for ``step``: the defaults, replaced by the step's ``options``."""
        return {**self.options, **(getattr(step, "options", None) or {})}

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueRangeError(f"family: {self.family!r} of method {self.name!r} is not one of {FAMILIES}")
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueRangeError(f"needs: unknown requirement(s) {sorted(unknown)} of method {self.name!r}; known: {sorted(NEEDS)}")


def _load_builtin() -> None:
    from . import affinequant, cqe, gptq, ldlq, omniquant, quip, rsavq, rtn, tesseraq  # noqa: F401  (each registers itself)


_REGISTRY: Registry[WeightMethod] = Registry("weight method", _load_builtin)


def register(method: WeightMethod) -> WeightMethod:
    """Add ``method`` under its name (a second registration of a name is an error)."""
    return _REGISTRY.register(method)


def weight_method(name: str) -> WeightMethod:
    """The registered method ``name``.

    Raises:
        ValueRangeError: no method of that name is registered (the message lists those that are).
    """
    return _lookup(_REGISTRY, name)


def weight_methods(family: Optional[str] = None) -> dict[str, WeightMethod]:
    """Every registered weight method (of ``family``, if given), by name, in registration order."""
    return {n: m for n, m in _REGISTRY.all().items() if family is None or m.family == family}


# ----------------------------------------------------------------------------------------------
# rotations and KV-cache methods: the other steps a recipe can hold


@dataclass(frozen=True)
class RotationMethod:
    """One registered rotation (the recipe's ``Rotate`` step names it by ``method``).

    ``rotate(step, model, adapter, recipe, calib, progress) -> (rotations, losses)`` folds the
    rotation into ``model`` in place and attaches its online parts; ``rotations`` is a
    :class:`~lowbit.methods.rotation.Rotations`, ``losses`` the optimisation's per-step losses
    (empty for a fixed rotation). It sees the whole ``recipe`` so that a learned rotation can
    train against the activation and KV quantizers that follow it.
    """

    name: str
    rotate: Callable[..., tuple[Any, list]]
    needs_calibration: bool = False


@dataclass(frozen=True)
class KVMethod:
    """One registered KV-cache method (the recipe's ``KVQuant`` step names it by ``method``).

    The loop installs the step's quantizer (the :class:`~lowbit.kv.base.KVQuantizer` subclass
    registered under the same name) in every attention; ``calibrate(step, model, calib)``, if
    given, then fits it on calibration ids; ``needs_calibration`` says whether it must have them
    (a bool, or a function of the step for a method whose options decide). ``step_options`` are the ``KVQuant`` fields the method
    reads besides ``bits``, ``group_size`` and ``sink_tokens`` (a step that sets another one away
    from its default is refused when the recipe is built); ``describe(step)`` the summary line.
    """

    name: str
    calibrate: Optional[Callable[..., None]] = None
    needs_calibration: Union[bool, Callable[[Any], bool]] = False
    step_options: tuple[str, ...] = ()
    describe: Optional[Callable[[Any], str]] = None


def _load_rotations() -> None:
    from . import quarot, spinquant  # noqa: F401  (each registers itself)


def _load_kv() -> None:
    from ..kv import base

    base._load_builtin()  # each KV method file registers its quantizer class and its KVMethod


_ROTATIONS: Registry[RotationMethod] = Registry("rotation", _load_rotations)
_KV: Registry[KVMethod] = Registry("KV-cache method", _load_kv)


def register_rotation(method: RotationMethod) -> RotationMethod:
    """Add a rotation under its name."""
    return _ROTATIONS.register(method)


def register_kv(method: KVMethod) -> KVMethod:
    """Add a KV-cache method under its name."""
    return _KV.register(method)


def rotation_methods() -> dict[str, RotationMethod]:
    """Every registered rotation, by name."""
    return _ROTATIONS.all()


def kv_methods() -> dict[str, KVMethod]:
    """Every registered KV-cache method, by name."""
    return _KV.all()


def rotation_method(name: str) -> RotationMethod:
    """The rotation ``name`` (``ValueRangeError`` listing the registered ones if there is none)."""
    return _lookup(_ROTATIONS, name)


def kv_method(name: str) -> KVMethod:
    """The KV-cache method ``name`` (``ValueRangeError`` listing the registered ones if there is none)."""
    return _lookup(_KV, name)


def _lookup(registry: Registry, name: str) -> Any:
    entry = registry.get(name)
    if entry is None:
        raise ValueRangeError(f"method: unknown {registry.what} {name!r}; registered: {tuple(registry.all())}")
    return entry


# ----------------------------------------------------------------------------------------------
# post-weight steps: whole-model steps that run once after the weight step (EmbedQuant)


@dataclass(frozen=True)
class PostWeightMethod:
    """One registered post-weight method: a recipe step of kind ``kind`` whose ``method`` field is
    ``name`` (e.g. ``EmbedQuant``: kind ``"embedding"``, method ``"rtn"``).

    The loop calls ``apply(step, model, adapter, calib) -> [(module name, bits per weight,
    relative weight error), ...] or None`` once, after the weight step (and its ``after_model``
    hook), before activation and KV-cache steps; it changes ``model`` in place (swapping in stored
    layers, attaching branches) and its result becomes rows of the run report (a row of a layer
    the weight step reported replaces that row's bits and error, its method becomes
    ``"<weight method>+<name>"``). With ``needs_reference`` it is called with
    ``references={module name: (out, in) float32 weight}``: the weight each linear had when the
    weight method quantized it (after rotations and merged transformations), kept by the loop
    for this step only (LQER's error ``W − Q(W)``).
    """

    name: str
    kind: str
    apply: Callable[..., Optional[list]]
    needs_calibration: bool = False
    needs_reference: bool = False
    options: dict = field(default_factory=dict)  # its own hyper-parameters and their defaults (step.options)
    check_step: Optional[Callable[[Any], None]] = None  # typed checks of a step's values (ValueRangeError)

    def resolved_options(self, step: Any) -> dict:
        """The method's options for ``step``: the defaults, replaced by the step's ``options``."""
        return {**self.options, **(getattr(step, "options", None) or {})}


def _load_post_weight() -> None:
    from . import embed_quant, lqer, rilq  # noqa: F401  (each registers itself)


_POST_WEIGHT: Registry[PostWeightMethod] = Registry("post-weight method", _load_post_weight)


def register_post_weight(method: PostWeightMethod) -> PostWeightMethod:
    """Add a post-weight method under its name (a second registration of a name is an error)."""
    return _POST_WEIGHT.register(method)


def post_weight_methods(kind: Optional[str] = None) -> dict[str, PostWeightMethod]:
    """Every registered post-weight method (of step kind ``kind``, if given), by name."""
    return {n: m for n, m in _POST_WEIGHT.all().items() if kind is None or m.kind == kind}


def post_weight_method(step: Any) -> Optional[PostWeightMethod]:
    """The post-weight method that runs the recipe step ``step``, or ``None`` when no post-weight
    method is registered for its kind (``step.step``: a rotation, weight, activation or KV step).

    Raises:
        ValueRangeError: the kind has post-weight methods but none called ``step.method``.
    """
    kind = getattr(step, "step", None)
    methods = post_weight_methods(kind)
    if not methods:
        return None
    entry = methods.get(getattr(step, "method", None))
    if entry is None:
        raise ValueRangeError(f"method: unknown {kind} method {getattr(step, 'method', None)!r}; registered: {tuple(methods)}")
    return entry
