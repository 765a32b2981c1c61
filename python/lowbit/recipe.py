"""Recipes: what to do to a model, as an ordered list of step configs, and the named presets.

Each step is a frozen dataclass (torchao style): defaults, validation in ``__post_init__``, a
``version``, and ``to_dict``/``from_dict`` so the recipe is stored in the checkpoint. A preset name
is just a recipe. Step kinds, applied in this order whatever order they are listed in:

* :class:`Rotate` — QuaRot (random Hadamard) or SpinQuant (learned, Cayley SGD) rotations, with
  the online Hadamards R3 (queries/keys) and R4 (``down_proj`` input);
* :class:`WeightQuant` — RTN, GPTQ or LDLQ on a uniform, ternary or binary grid;
* :class:`VectorQuant` — vector quantization instead: QuIP# (incoherence + BlockLDLQ + E8P lattice
  codebook) or RSAVQ (Fisher-guided learned codebooks with channel-wise bit allocation); it is the
  recipe's weight step, so a recipe has a WeightQuant or a VectorQuant, not both;
* :class:`EmbedQuant` — per-row 4/6/8-bit quantization of the embeddings and the output head,
  after the weight step (a tied pair stays tied, stored once);
* :class:`ActQuant` — per-token quantization of every decoder linear's input;
* :class:`KVQuant` — the KV cache: plain per-token (``"uniform"``) or KVQuant (per-channel pre-RoPE
  keys, learned non-uniform levels, dense-and-sparse outliers, attention sink).

At most one step of each kind; any subset composes (``kv4-kvquant`` is a KV step alone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Sequence, Union

from .errors import LowbitError, UnsupportedSizeError, ValueRangeError

__all__ = ["WeightQuant", "VectorQuant", "Rotate", "EmbedQuant", "LowRank", "ActQuant", "KVQuant", "Recipe", "PRESETS", "resolve", "UnknownRecipeError"]

KINDS = ("uniform", "ternary", "binary")
UNIFORM_BITS = (2, 3, 4, 8)


def weight_method_names(family: str) -> tuple[str, ...]:
    """Names of the registered weight methods of ``family`` (``"grid"``: :class:`WeightQuant`,
    ``"vq"``: :class:`VectorQuant`; see :mod:`lowbit.methods.registry`)."""
    from .methods.registry import weight_methods

    return tuple(weight_methods(family))


def _needs_hessian(method: str) -> bool:
    """Whether the registered weight method ``method`` asks the loop for Hessians."""
    from .methods.registry import weight_method

    return "hessian" in weight_method(method).needs


def _needs_data(method: str) -> bool:
    """Whether the registered weight method ``method`` needs calibration data (Hessians, Fisher, blocks)."""
    from .methods.registry import weight_method

    return weight_method(method).needs_calibration


def _check_method_options(step: Any, method: Any = None) -> None:
    """Check ``step.options`` (a step's method options) by name against the registered method's
    ``options`` (``method``: the registry entry; default the weight method ``step.method``), then
    the whole step by the method's ``check_step``."""
    from .methods.registry import weight_method

    method = weight_method(step.method) if method is None else method
    opts = step.options
    if opts is not None:
        if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
            raise ValueRangeError(f"options: must be a dict of option names to values, or None, got {opts!r}")
        unknown = sorted(set(opts) - set(method.options))
        if unknown:
            raise ValueRangeError(
                f"options: the {step.method!r} {step.step} method has no option(s) {unknown}; it takes {sorted(method.options) or 'none'}"
            )
        bad = sorted(k for k, v in opts.items() if not _json_value(v))
        if bad:
            raise ValueRangeError(f"options: {bad} must be JSON values (None, bool, int, float, str, or lists of them)")
        object.__setattr__(step, "options", {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()})
    if method.check_step is not None:
        method.check_step(step)


def _json_value(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_json_value(u) for u in v)
    return v is None or isinstance(v, (bool, int, float, str))


class UnknownRecipeError(LowbitError, ValueError):
    """A recipe name that is not a preset."""


@dataclass(frozen=True)
class WeightQuant:
    """Quantize the weights of every linear layer in the decoder blocks.

    Attributes:
        method: ``"rtn"`` (round to nearest), ``"gptq"`` (Hessian-aware, lazy block updates) or
            ``"ldlq"`` (QuIP's LDL form of the same rounding), or a block-reconstruction method:
            ``"omniquant"`` (learnable weight clipping trained per block), ``"tesseraq"``
            (progressive adaptive rounding and dequantization scales trained per block) —
            any method registered in :mod:`lowbit.methods.registry` of family ``"grid"``.
        bits: 2, 3, 4 or 8 for the uniform grid (ternary and binary imply their own width).
        group_size: columns per scale; ``None`` = one scale per output channel. A group size that
            does not divide ``in_features`` leaves a shorter last group.
        sym: symmetric grid (no zero points).
        kind: ``"uniform"``, ``"ternary"`` (1.58-bit, absmean) or ``"binary"`` (sign · mean|w|).
        mse: search a clipping range per group (shrink the range, keep the lowest error).
        act_order: GPTQ/LDLQ column order by descending Hessian diagonal (stored as a permutation).
        static_groups: with act_order, fix the group parameters before the permuted pass.
        damp: Hessian damping, a fraction of the mean diagonal. 0.1, not GPTQ's 0.01: on the
            bundled model it generalizes better out of domain at 4 and 2 bits (W4 g64, 64×512
            mixed calibration, 8192 news tokens: 1.199× FP against 1.225× at 0.03; W2 g32: 11.8×
            against 12.5× at 0.01); the ``w3-gptq`` preset keeps 0.01 (1.987× against 2.076×).
            ``benches/results/2026-12-02-gptq-defaults-ood.md`` has the table.
        block_size: GPTQ lazy-batch width.
        true_sequential: within a decoder block, take each group's Hessian (q/k/v; o; gate/up;
            down) from the block with the groups before it already quantized, as GPTQModel and
            IST-DASLab's ``--true-sequential`` do; ``False`` takes every Hessian from the
            full-precision block in one pass.
        options: the method's own hyper-parameters by name (``None`` = its defaults), e.g.
            ``{"epochs": 2}`` for ``"omniquant"``; the names the registered method's ``options``
            lists, JSON values.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: Optional[int] = 64
    sym: bool = False
    kind: str = "uniform"
    mse: bool = True
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.1
    block_size: int = 128
    true_sequential: bool = True
    options: Optional[dict] = None
    version: int = 1
    step: str = field(default="weight", init=False)

    def __post_init__(self) -> None:
        if self.method not in weight_method_names("grid"):
            raise ValueRangeError(f"method: unknown weight method {self.method!r}; choose from {weight_method_names('grid')}")
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
        _check_method_options(self)

    @property
    def needs_hessian(self) -> bool:
        return _needs_hessian(self.method)

    @property
    def needs_calibration(self) -> bool:
        return _needs_data(self.method)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        w = {"ternary": "ternary", "binary": "binary"}.get(self.kind, f"W{self.bits} {'sym' if self.sym else 'asym'}")
        extra = " act-order" if self.act_order and self.needs_hessian else ""
        if self.options:
            extra += " (" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + ")"
        return f"{self.method.upper()} {w} {g}{extra}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightQuant":
        d = {k: v for k, v in d.items() if k != "step"}
        return cls(**d)


QUIP_BITS = (2, 3, 4)


@dataclass(frozen=True)
class VectorQuant:
    """Vector-quantize the weights of every linear layer in the decoder blocks (the recipe's weight step).

    Attributes:
        method: ``"quip"`` (QuIP#: randomized-Hadamard incoherence on both sides, BlockLDLQ, E8P
            lattice codebook; 3/4 bits with a residual codebook) or ``"rsavq"`` (diagonal Fisher from
            calibration gradients, Fisher-weighted learned codebooks with error feedback, channel-wise
            bit allocation under the budget).
        bits: bits per weight: 2, 3 or 4 for QuIP#; the average index budget (1.0–3.0) for RSAVQ.
        seed: Hadamard signs (QuIP#), k-means initialisation (RSAVQ).
        damp: Hessian damping, a fraction of the mean diagonal.
        dim: vector length (QuIP#: 8, fixed by E8P; RSAVQ: 4 by default).
        fisher_samples: calibration sequences whose gradients make RSAVQ's Fisher (ignored by QuIP#).
        kmeans_iters: Lloyd iterations of RSAVQ's codebooks.
        finetune_steps: Adam steps of block fine-tuning after each decoder block is quantized
            (row scales, input-channel scales, norms against the full-precision block output;
            :mod:`lowbit.methods.finetune`); 0 turns it off.
        tune_linears: between the quantization of a block's linear groups, also fine-tune the weights
            of the groups not quantized yet (``finetune_steps // 3`` steps each time), as QuIP# does.
            Off by default: it lowers the block errors of the tiny test models, but it is not yet
            measured on the real model, and it adds about half again to the tuning time.
        e2e_steps: then steps of end-to-end fine-tuning of the same parameters on the next-token loss
            of the calibration sequences (one sequence per step); 0 turns it off.
    """

    method: str = "quip"
    bits: float = 2
    seed: int = 0
    damp: float = 0.01
    dim: Optional[int] = None
    fisher_samples: int = 32
    kmeans_iters: int = 12
    finetune_steps: int = 48
    e2e_steps: int = 32
    tune_linears: bool = False
    version: int = 1
    step: str = field(default="weight", init=False)

    def __post_init__(self) -> None:
        if self.method not in weight_method_names("vq"):
            raise ValueRangeError(f"method: unknown vector-quantization method {self.method!r}; choose from {weight_method_names('vq')}")
        if self.method == "quip":
            _check_bits(self.bits, QUIP_BITS)
            if self.dim not in (None, 8):
                raise UnsupportedSizeError(f"dim: QuIP#'s E8P codebook has vectors of length 8, got {self.dim}")
        else:
            _check_ratio(self.bits, "bits", 1.0, 3.0, lo_open=False)
            if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= 8):
                raise ValueRangeError(f"dim: must be an int in 1..8, got {self.dim!r}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueRangeError(f"damp: must be in [0, 1), got {self.damp}")
        for arg in ("fisher_samples", "kmeans_iters", "finetune_steps", "e2e_steps"):
            v = getattr(self, arg)
            zero_ok = arg in ("finetune_steps", "e2e_steps")
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
                raise ValueRangeError(f"{arg}: must be a {'non-negative' if zero_ok else 'positive'} int, got {v!r}")

    @property
    def needs_hessian(self) -> bool:
        return _needs_hessian(self.method)

    @property
    def vector_dim(self) -> int:
        return self.dim if self.dim is not None else (8 if self.method == "quip" else 4)

    def describe(self) -> str:
        if self.method == "quip":
            cb = {2: "E8P", 3: "E8P+E8 residual", 4: "E8P+E8P residual"}[int(self.bits)]
            return f"QuIP# W{int(self.bits)} {cb} (incoherence, BlockLDLQ)"
        return f"RSAVQ {self.bits:g} bits/weight (d={self.vector_dim}, Fisher-guided, channel bit allocation)"

    def to_dict(self) -> dict:
        return asdict(self)


def _check_bits(value: Any, allowed: tuple, arg: str = "bits") -> None:
    if isinstance(value, bool) or value not in allowed:
        raise UnsupportedSizeError(f"{arg}: {value!r} is not supported; choose from {allowed}")


def _check_ratio(value: Any, arg: str, lo: float = 0.0, hi: float = 1.0, lo_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise ValueRangeError(f"{arg}: must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class Rotate:
    """Rotate the model before quantizing it (norms folded first; exact in full precision).

    Attributes:
        method: ``"quarot"`` (randomized Hadamard R1/R2) or ``"spinquant"`` (R1/R2 learned by Cayley
            SGD on the Stiefel manifold, starting from QuaRot's, against the loss of the network with
            quantized activations and KV cache).
        seed: random signs of the Hadamards (and the calibration batches SpinQuant draws).
        online_qk: R3, Hadamard on queries and keys after RoPE (needed for a rotated KV cache).
        online_down: R4, Hadamard on the ``down_proj`` input, folded into its weight.
        steps, lr, momentum, seqlen, batch_size: SpinQuant's optimisation (ignored by QuaRot): Cayley
            SGD with a cosine-decayed step from ``lr``. The paper's lr of 1.5 (for 7B models, batch
            8×2048) oscillates on the 135M test model with batch 1×256; 0.1 was the best of
            {0.05, 0.1, 0.2, 0.4, 1.5} measured on it.
    """

    method: str = "quarot"
    seed: int = 0
    online_qk: bool = True
    online_down: bool = True
    steps: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    seqlen: int = 256
    batch_size: int = 1
    version: int = 1
    step: str = field(default="rotation", init=False)

    def __post_init__(self) -> None:
        from .methods.registry import rotation_methods

        if self.method not in rotation_methods():
            raise ValueRangeError(f"method: unknown rotation {self.method!r}; choose from {tuple(rotation_methods())}")
        for name in ("steps", "seqlen", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueRangeError(f"{name}: must be a {'non-negative' if name == 'steps' else 'positive'} int, got {v!r}")
        _check_ratio(self.lr, "lr", 0.0, 1e3)
        _check_ratio(self.momentum, "momentum", 0.0, 0.999, lo_open=False)

    @property
    def needs_calibration(self) -> bool:
        from .methods.registry import rotation_method

        return rotation_method(self.method).needs_calibration

    def describe(self) -> str:
        online = "+".join(n for n, on in (("R3", self.online_qk), ("R4", self.online_down)) if on)
        learn = f" {self.steps} steps" if self.method == "spinquant" else ""
        return f"{'QuaRot' if self.method == 'quarot' else 'SpinQuant'} R1/R2{learn}" + (f" +{online}" if online else "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ActQuant:
    """Quantize every decoder linear's input per token (the linear multiplies the integer codes).

    Attributes:
        bits: 4 or 8 (2–8 accepted).
        sym: symmetric per-token grid (QuaRot's choice) or asymmetric.
        clip_ratio: shrink each token's range before rounding, in (0, 1].
        group_size: channels per scale inside a token; ``None`` = one scale per token.
    """

    bits: int = 4
    sym: bool = True
    clip_ratio: float = 0.9
    group_size: Optional[int] = None
    version: int = 1
    step: str = field(default="activation", init=False)

    def __post_init__(self) -> None:
        _check_bits(self.bits, (2, 3, 4, 5, 6, 7, 8))
        _check_ratio(self.clip_ratio, "clip_ratio")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueRangeError(f"group_size: must be a positive int or None, got {self.group_size!r}")

    def quantizer_config(self) -> dict:
        return {"bits": self.bits, "sym": self.sym, "clip_ratio": self.clip_ratio, "group_size": self.group_size}

    def describe(self) -> str:
        return f"A{self.bits} per-token {'sym' if self.sym else 'asym'} clip {self.clip_ratio:g}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KVQuant:
    """Quantize the KV cache as it is written.

    Attributes:
        bits: 2, 3 or 4.
        method: a registered KV method (:func:`lowbit.methods.registry.kv_methods`):
            ``"uniform"`` — keys (after RoPE and R3) and values per token, groups of
            ``group_size`` in each head; ``"kvquant"`` — KVQuant: keys per channel before RoPE with a
            calibrated range, non-uniform levels learned by sensitivity-weighted k-means, the top
            ``outlier_frac`` kept exact and sparse, values per token likewise; ``"akvq"`` —
            AKVQ-VL: Hadamard on keys (after RoPE) and values per head, per-token grid (keys
            smoothed by a calibrated per-channel mean and spread), the ``salient_frac`` tokens
            drawing the most attention at prefill kept at 8 bits or fp16 (its other options via
            ``options``).
        group_size: per-token group width (``None`` = the head dim).
        sym: symmetric grid for the uniform method.
        clip_ratio: range shrink for the uniform method.
        outlier_frac: fraction kept in full precision (kvquant).
        sink_tokens: the first tokens (attention sinks) kept in fp16.
        salient_frac: fraction of each prefill's tokens kept at higher precision by attention
            saliency (akvq; ``None`` = the method's default, 3.5 % at 8 bits).
        fisher: weight the k-means by squared gradients of the loss (else unweighted).
        calib_samples: calibration sequences the method calibrates on (the first ones of
            ``calib``): KVQuant's ranges and levels (the paper uses 16), AKVQ's key smoothing.
        options: the method's own quantizer options by name (``None`` = none), e.g.
            ``{"key_smoothing": None}`` for ``"akvq"`` — the keys of its quantizer class's
            ``options`` (:mod:`lowbit.kv`) other than the fields above; JSON scalars only. The
            values are checked when the quantizer is built.
    """

    bits: int = 4
    method: str = "kvquant"
    group_size: Optional[int] = None
    sym: bool = False
    clip_ratio: float = 1.0
    outlier_frac: float = 0.01
    sink_tokens: int = 1
    salient_frac: Optional[float] = None
    fisher: bool = True
    calib_samples: int = 16
    options: Optional[dict] = None
    version: int = 1
    step: str = field(default="kv", init=False)

    def __post_init__(self) -> None:
        _check_bits(self.bits, (2, 3, 4))
        from .methods.registry import kv_methods

        if self.method not in kv_methods():
            raise ValueRangeError(f"method: unknown KV method {self.method!r}; choose from {tuple(kv_methods())}")
        _check_ratio(self.clip_ratio, "clip_ratio")
        _check_ratio(self.outlier_frac, "outlier_frac", 0.0, 0.5, lo_open=False)
        if isinstance(self.calib_samples, bool) or not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ValueRangeError(f"calib_samples: must be a positive int, got {self.calib_samples!r}")
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueRangeError(f"sink_tokens: must be a non-negative int, got {self.sink_tokens!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueRangeError(f"group_size: must be a positive int or None, got {self.group_size!r}")
        if self.salient_frac is not None:
            _check_ratio(self.salient_frac, "salient_frac", 0.0, 0.5, lo_open=False)
        self._check_options()
        used = kv_methods()[self.method].step_options
        for f in fields(self):
            if f.name in _KV_METHOD_OPTIONS and f.name not in used and getattr(self, f.name) != f.default:
                raise ValueRangeError(
                    f"{f.name}: the {self.method!r} KV method does not use it (it reads {', '.join(used) or 'no option'} "
                    f"besides bits, group_size and sink_tokens); leave it at {f.default!r}"
                )

    def _check_options(self) -> None:
        if self.options is None:
            return
        from .kv.base import quantizer_class

        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueRangeError(f"options: must be a dict of option names to values, or None, got {self.options!r}")
        own = {f.name for f in fields(self)}
        taken = sorted(k for k in self.options if k in own)
        if taken:
            raise ValueRangeError(f"options: {taken} are fields of KVQuant; set them as KVQuant({taken[0]}=...)")
        known = quantizer_class(self.method).options
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueRangeError(
                f"options: the {self.method!r} KV method has no option(s) {unknown}; it takes "
                f"{sorted(k for k in known if k not in own) or 'none'}"
            )
        bad = sorted(k for k, v in self.options.items() if not (v is None or isinstance(v, (bool, int, float, str))))
        if bad:
            raise ValueRangeError(f"options: {bad} must be JSON scalars (None, bool, int, float, str)")

    @property
    def needs_calibration(self) -> bool:
        from .methods.registry import kv_method

        needs = kv_method(self.method).needs_calibration
        return bool(needs(self)) if callable(needs) else bool(needs)

    def quantizer_config(self, head_dim: int) -> dict:
        """Keyword arguments of :class:`lowbit.kv.KVQuantizer` (less the head counts): ``bits``,
        ``method``, ``group_size``, ``sink_tokens``, the fields the method reads (set ones only) and
        :attr:`options`."""
        from .methods.registry import kv_method

        out = {"bits": self.bits, "method": self.method, "group_size": self.group_size or head_dim, "sink_tokens": self.sink_tokens}
        for name in kv_method(self.method).step_options:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.options or {})
        return out

    def describe(self) -> str:
        from .methods.registry import kv_method

        describe = kv_method(self.method).describe
        return describe(self) if describe is not None else f"KV{self.bits} {self.method}"

    def to_dict(self) -> dict:
        return asdict(self)


#: the KVQuant fields only some methods read (each method's KVMethod.step_options lists its own)
_KV_METHOD_OPTIONS = ("sym", "clip_ratio", "outlier_frac", "salient_frac")

EMBED_TARGETS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class EmbedQuant:
    """Quantize the vocabulary matrices — the input embeddings and the output head — per row (one
    fp16 scale, and zero point if asymmetric, per token row), once, after the weight step.

    Stored as :class:`~lowbit.nn.quant_embedding.QuantEmbedding` / ``QuantHead`` (packed codes).
    On the bundled model that matrix (49152 × 576, tied) is a fifth of the parameters but, stored
    fp16, about half of a W4 checkpoint; ``benches/results/2026-12-02-embed-quant.md`` has the size
    and the perplexity each width gives.

    Attributes:
        bits: 4, 6 or 8.
        targets: which of ``"embed_tokens"`` and ``"lm_head"`` to quantize (the adapter's
            embeddings and head). A tied model with both targets is quantized once and stays tied
            (the head reads the embeddings' codes; stored once); with one target it is untied first
            (``config.tie_word_embeddings`` becomes False) and the other keeps the dense matrix.
        sym: constant zero point ``2^(bits−1)`` instead of an fp16 zero per row.
        mse: search a clipped range per row (the uniform grid's MSE search, as ``WeightQuant.mse``).
        method: the registered post-weight method (:func:`lowbit.methods.registry.post_weight_methods`;
            ``"rtn"``, per-row round to nearest).
    """

    bits: int = 8
    targets: tuple = EMBED_TARGETS
    sym: bool = False
    mse: bool = True
    method: str = "rtn"
    version: int = 1
    step: str = field(default="embedding", init=False)

    def __post_init__(self) -> None:
        from .methods.registry import post_weight_methods

        _check_bits(self.bits, (4, 6, 8))
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
            raise ValueRangeError(f"targets: must be a tuple of names from {EMBED_TARGETS}, got {targets!r}")
        targets = tuple(targets)
        unknown = [t for t in targets if t not in EMBED_TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            why = f"unknown target(s) {unknown}" if unknown else ("empty" if not targets else "a target listed twice")
            raise ValueRangeError(f"targets: {why} in {targets!r}; choose from {EMBED_TARGETS}")
        object.__setattr__(self, "targets", tuple(t for t in EMBED_TARGETS if t in targets))
        for name in ("sym", "mse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueRangeError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        methods = post_weight_methods("embedding")
        if self.method not in methods:
            raise ValueRangeError(f"method: unknown embedding method {self.method!r}; choose from {tuple(methods)}")

    @property
    def needs_calibration(self) -> bool:
        from .methods.registry import post_weight_methods

        return post_weight_methods("embedding")[self.method].needs_calibration

    def describe(self) -> str:
        what = " + ".join({"embed_tokens": "embeddings", "lm_head": "head"}[t] for t in self.targets)
        return f"{what} E{self.bits} per-row {'sym' if self.sym else 'asym'}{' MSE clip' if self.mse else ''}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EmbedQuant":
        return cls(**{k: v for k, v in d.items() if k != "step"})


@dataclass(frozen=True)
class LowRank:
    """A low-rank branch on every quantized decoder linear, ``y = x·Q(W)ᵀ + (x·A)·B``, fitted
    after the weight step to what it lost (:mod:`lowbit.nn.lowrank`; the branch is stored fp16
    and counted in bits per weight: ``16·rank·(in + out)/(in·out)``).

    Attributes:
        method: the registered low-rank method (:func:`lowbit.methods.registry.post_weight_methods`
            of kind ``"lowrank"``): ``"lqer"`` (the SVD of the quantization error), ``"l2qer"``
            (the SVD of the error scaled by the inputs' mean magnitudes; needs calibration),
            ``"rilq"`` (L²QER's branch trained on the whole model's loss; needs calibration).
        rank: the branch's inner size (1 … min(in, out) of each layer).
        options: the method's own hyper-parameters (name → value; ``lowbit presets`` lists them),
            checked by name against its registered defaults and by value by the method.
    """

    method: str = "l2qer"
    rank: int = 8
    options: Optional[dict] = None
    version: int = 1
    step: str = field(default="lowrank", init=False)

    def __post_init__(self) -> None:
        from .methods.registry import post_weight_methods

        methods = post_weight_methods("lowrank")
        if self.method not in methods:
            raise ValueRangeError(f"method: unknown low-rank method {self.method!r}; choose from {tuple(methods)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 65536:
            raise ValueRangeError(f"rank: must be an int in [1, 65536], got {self.rank!r}")
        _check_method_options(self, methods[self.method])

    @property
    def needs_calibration(self) -> bool:
        from .methods.registry import post_weight_methods

        return post_weight_methods("lowrank")[self.method].needs_calibration

    def describe(self) -> str:
        opts = "".join(f" {k}={v}" for k, v in (self.options or {}).items())
        return f"{self.method.upper().replace('L2', 'L²')} rank {self.rank} fp16{opts}"

    def to_dict(self) -> dict:
        return asdict(self)


STEP_KINDS: dict[str, type] = {
    "rotation": Rotate, "weight": WeightQuant, "lowrank": LowRank, "embedding": EmbedQuant, "activation": ActQuant,
    "kv": KVQuant,
}
#: the classes a "weight" step can be (a stored VectorQuant is told apart by its method)
WEIGHT_STEPS: tuple[type, ...] = (WeightQuant, VectorQuant)
STEP_ORDER = ("rotation", "weight", "lowrank", "embedding", "activation", "kv")


def step_from_dict(d: dict, where: str = "step") -> Any:
    """A step dataclass from its ``to_dict`` form."""
    if not isinstance(d, dict):
        raise ValueRangeError(f"{where}: must be a dict, got {type(d).__name__}")
    cls = STEP_KINDS.get(d.get("step", "weight"))
    if cls is WeightQuant and d.get("method") in weight_method_names("vq"):
        cls = VectorQuant
    if cls is None:
        raise ValueRangeError(f"{where}: unknown step kind {d.get('step')!r}; known: {tuple(STEP_KINDS)}")
    try:
        return cls(**{k: v for k, v in d.items() if k != "step"})
    except TypeError as e:
        raise ValueRangeError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps, and the name it was made from (if a preset)."""

    steps: tuple
    name: Optional[str] = None

    def __post_init__(self) -> None:
        kinds = [getattr(s, "step", None) for s in self.steps]
        for i, k in enumerate(kinds):
            if k not in STEP_KINDS:
                raise ValueRangeError(f"recipe[{i}]: not a step ({type(self.steps[i]).__name__})")
            if kinds.index(k) != i:
                raise ValueRangeError(f"recipe[{i}]: a second {k!r} step; a recipe has at most one of each kind")
        ordered = tuple(sorted(self.steps, key=lambda s: STEP_ORDER.index(s.step)))
        object.__setattr__(self, "steps", ordered)
        if "lowrank" in kinds and "weight" not in kinds:
            raise ValueRangeError("recipe: a 'lowrank' step repairs the weight step's error; this recipe has no weight step")

    def _kind(self, kind: str) -> Any:
        return next((s for s in self.steps if s.step == kind), None)

    @property
    def weight(self) -> Optional[Union[WeightQuant, VectorQuant]]:
        return self._kind("weight")

    @property
    def rotation(self) -> Optional[Rotate]:
        return self._kind("rotation")

    @property
    def embedding(self) -> Optional[EmbedQuant]:
        return self._kind("embedding")

    @property
    def lowrank(self) -> Optional[LowRank]:
        return self._kind("lowrank")

    @property
    def activation(self) -> Optional[ActQuant]:
        return self._kind("activation")

    @property
    def kv(self) -> Optional[KVQuant]:
        return self._kind("kv")

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`lowbit.quantize` needs calibration token ids for this recipe."""
        return any(getattr(s, "needs_hessian", False) or getattr(s, "needs_calibration", False) for s in self.steps)

    @property
    def calib_samples(self) -> int:
        """The calibration sequences this recipe's default run takes: what its weight method asks
        for (block-trained methods pace their run by it), else :data:`DEFAULT_CALIB_SAMPLES`. The CLI's ``--calib-samples`` overrides it."""
        from .methods.registry import weight_method

        asked = weight_method(self.weight.method).calib_samples if self.weight is not None else None
        return DEFAULT_CALIB_SAMPLES if asked is None else asked

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.steps]

    @classmethod
    def from_list(cls, steps: Sequence[dict], name: Optional[str] = None) -> "Recipe":
        return cls(tuple(step_from_dict(s, f"recipe[{i}]") for i, s in enumerate(steps)), name)

    def describe(self) -> str:
        return " → ".join(s.describe() for s in self.steps)


#: calibration sequences of a recipe whose methods ask for no other number (``Recipe.calib_samples``)
DEFAULT_CALIB_SAMPLES = 128

PRESETS: dict[str, Recipe] = {
    "w8-rtn": Recipe((WeightQuant("rtn", 8, None, sym=True, mse=False),), "w8-rtn"),
    "w4-rtn": Recipe((WeightQuant("rtn", 4, 64),), "w4-rtn"),
    "w3-rtn": Recipe((WeightQuant("rtn", 3, 64),), "w3-rtn"),
    "w2-rtn": Recipe((WeightQuant("rtn", 2, 32),), "w2-rtn"),
    "w4-gptq": Recipe((WeightQuant("gptq", 4, 64),), "w4-gptq"),
    # the same with 8-bit per-row embeddings and head: 88.9 MiB on disk for the bundled model against
    # 115.7 MiB with them fp16, perplexity within 0.3% (benches/results/2026-12-02-embed-quant.md)
    "w4-gptq-e8": Recipe((WeightQuant("gptq", 4, 64), EmbedQuant(8)), "w4-gptq-e8"),
    # damp 0.01 at 3 bits: out of domain 1.987x FP against 2.076x at 0.1 (64x512 mix, 8192 news tokens)
    "w3-gptq": Recipe((WeightQuant("gptq", 3, 64, damp=0.01),), "w3-gptq"),
    "w2-gptq": Recipe((WeightQuant("gptq", 2, 32),), "w2-gptq"),
    "w4-ldlq": Recipe((WeightQuant("ldlq", 4, 64),), "w4-ldlq"),
    "w1.58-gptq": Recipe((WeightQuant("gptq", 2, 64, kind="ternary", mse=False),), "w1.58-gptq"),
    # learned post-training quantization, block by block (lowbit.methods.blockrecon): OmniQuant's
    # learnable weight clipping, TesseraQ's progressive adaptive rounding on top of it
    "w3-omniquant": Recipe((WeightQuant("omniquant", 3, 64),), "w3-omniquant"),
    "w2-omniquant": Recipe((WeightQuant("omniquant", 2, 32, options={"aug_loss": True}),), "w2-omniquant"),
    "w3-tesseraq": Recipe((WeightQuant("tesseraq", 3, 64),), "w3-tesseraq"),
    "w2-tesseraq": Recipe((WeightQuant("tesseraq", 2, 32),), "w2-tesseraq"),
    # AffineQuant: LWC + the equivalent transformation with v→o matrices (norm side diagonal: it merges)
    "w3-affinequant": Recipe((WeightQuant("affinequant", 3, 64),), "w3-affinequant"),
    # LSI/CQE+: learned singular-value increments (a band of 3) with LWC, the loss two blocks ahead
    "w3-cqe": Recipe((WeightQuant("cqe", 3, 64),), "w3-cqe"),
    # a rank-8 fp16 low-rank branch on every linear, fitted to the quantizer's error (lowbit.methods.lqer):
    # L²QER weights the error by the inputs' magnitudes, LQER is the plain SVD (the comparison)
    "w3-rtn-l2qer": Recipe((WeightQuant("rtn", 3, 64), LowRank("l2qer", 8)), "w3-rtn-l2qer"),
    "w3-rtn-lqer": Recipe((WeightQuant("rtn", 3, 64), LowRank("lqer", 8)), "w3-rtn-lqer"),
    "w2-gptq-l2qer": Recipe((WeightQuant("gptq", 2, 32), LowRank("l2qer", 8)), "w2-gptq-l2qer"),
    # RILQ: the L²QER branches trained together on the whole model's loss (hidden-state MSE + CE)
    "w2-gptq-rilq": Recipe((WeightQuant("gptq", 2, 32), LowRank("rilq", 8)), "w2-gptq-rilq"),
    # vector quantization: QuIP# (E8P lattice, incoherence, BlockLDLQ) and RSAVQ (Fisher-guided)
    "w2-quip": Recipe((VectorQuant("quip", 2),), "w2-quip"),
    "w3-quip": Recipe((VectorQuant("quip", 3),), "w3-quip"),
    "w4-quip": Recipe((VectorQuant("quip", 4),), "w4-quip"),
    "w2-rsavq": Recipe((VectorQuant("rsavq", 2.0),), "w2-rsavq"),
    # W4A4KV4: GPTQ weights, 4-bit per-token activations and KV cache; the baseline without rotation
    "w4a4kv4-norot": Recipe((WeightQuant("gptq", 4, 64), ActQuant(4), KVQuant(4, "uniform")), "w4a4kv4-norot"),
    "w4a4kv4-quarot": Recipe(
        (Rotate("quarot"), WeightQuant("gptq", 4, 64), ActQuant(4), KVQuant(4, "uniform")), "w4a4kv4-quarot"
    ),
    "w4a4kv4-spinquant": Recipe(
        (Rotate("spinquant"), WeightQuant("gptq", 4, 64), ActQuant(4), KVQuant(4, "uniform")), "w4a4kv4-spinquant"
    ),
    # OmniQuant's W4A4 setting: LWC + LET trained with the 4-bit activations on (let_lr 1e-3, alpha 0.75)
    "w4a4kv4-omniquant": Recipe(
        (WeightQuant("omniquant", 4, 64, options={"let": True, "let_lr": 1e-3}), ActQuant(4), KVQuant(4, "uniform")), "w4a4kv4-omniquant"
    ),
    "w4a4kv4-affinequant": Recipe(
        (WeightQuant("affinequant", 4, 64, options={"alpha": 0.75, "sf": 0.1, "let_lr": 1e-3}), ActQuant(4), KVQuant(4, "uniform")),
        "w4a4kv4-affinequant",
    ),
    # TesseraQ's rounding on QuaRot's rotated model, from GPTQ's codes, trained with the 4-bit activations on
    "w4a4kv4-quarot-tesseraq": Recipe(
        (Rotate("quarot"), WeightQuant("tesseraq", 4, 64), ActQuant(4), KVQuant(4, "uniform")),
        "w4a4kv4-quarot-tesseraq",
    ),
    # KV cache only, on an otherwise full-precision model
    "kv4-kvquant": Recipe((KVQuant(4, "kvquant"),), "kv4-kvquant"),
    "kv2-kvquant": Recipe((KVQuant(2, "kvquant"),), "kv2-kvquant"),
    "kv4-uniform": Recipe((KVQuant(4, "uniform"),), "kv4-uniform"),
    "kv2-uniform": Recipe((KVQuant(2, "uniform"),), "kv2-uniform"),
    "kv2-akvq": Recipe((KVQuant(2, "akvq"),), "kv2-akvq"),
}


DEFAULT_PRESET = "w4-gptq"
"""The preset :func:`lowbit.quantize` and ``lowbit quantize`` use when none is given."""


def resolve(recipe: Union[str, Recipe, WeightQuant, VectorQuant, Sequence[Any]], **overrides: Any) -> Recipe:
    """A :class:`Recipe` from a preset name, a recipe, one step, or a list of steps/dicts.

    ``overrides`` (e.g. ``bits=3, group_size=128, sym=True``) replace fields of the weight step
    (it is an error to override a recipe without one).
    """
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise UnknownRecipeError(f"recipe: unknown preset {recipe!r}; presets: {', '.join(PRESETS)}")
        r = PRESETS[recipe]
    elif isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, tuple(STEP_KINDS.values()) + WEIGHT_STEPS):
        r = Recipe((recipe,))
    else:
        items: Any = recipe
        r = Recipe(tuple(step_from_dict(s, f"recipe[{i}]") if isinstance(s, dict) else s for i, s in enumerate(items)))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        if r.weight is None:
            raise ValueRangeError(f"overrides {sorted(overrides)}: the recipe has no weight step to change")
        w = r.weight
        unknown = sorted(k for k in overrides if k not in {f.name for f in fields(w) if f.init})
        if unknown:
            raise ValueRangeError(f"overrides {unknown}: not fields of the weight step {type(w).__name__}")
        steps = tuple(replace(s, **overrides) if s is w else s for s in r.steps)
        r = Recipe(steps, r.name)
    return r
