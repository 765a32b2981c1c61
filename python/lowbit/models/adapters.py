"""Per-architecture adapters: where a causal LM keeps its decoder layers, norms, linears and RoPE.

Methods and the driver reach into a model only through an adapter, never by attribute paths of
their own. :func:`get_adapter` picks one by ``model.config.model_type``.

Llama, Qwen2 and Mistral in ``transformers`` share one layout::

    model.model.embed_tokens         embeddings
    model.model.layers[i]            decoder layers
        .input_layernorm
        .self_attn.{q,k,v,o}_proj
        .post_attention_layernorm
        .mlp.{gate,up,down}_proj
    model.model.norm                 final norm
    model.model.rotary_emb           RoPE (transformers >= 5: one module for the whole model)
    model.lm_head                    output head (may share its weight with the embeddings)

Linear roles
------------
Code outside ``lowbit.models`` never spells a projection's attribute path; it asks the adapter
for a linear by its *role*, one of :data:`ROLES`::

    role    reads                         writes                      weight (out, in)
    q       attn_norm output (residual)   queries                     (n_heads·head_dim, hidden)
    k       attn_norm output (residual)   keys                        (n_kv_heads·head_dim, hidden)
    v       attn_norm output (residual)   values                      (n_kv_heads·head_dim, hidden)
    o       attention output              the residual stream         (hidden, n_heads·head_dim)
    gate    mlp_norm output (residual)    the MLP's gate              (intermediate, hidden)
    up      mlp_norm output (residual)    the MLP's up branch         (intermediate, hidden)
    down    act(gate)·up                  the residual stream         (hidden, intermediate)

:meth:`Adapter.linear` returns one, :meth:`Adapter.residual_readers` the linears reading the
residual stream grouped by the norm that feeds them (``[(attn_norm, [q, k, v]), (mlp_norm,
[gate, up])]``), :meth:`Adapter.residual_writers` the two that add into it (``[o, down]``): what a
rotation of the residual stream (R1) must rotate on each side. :meth:`Adapter.linear_groups` lists
a layer's linears in execution order, grouped by shared input: ``[[q, k, v], [o], [gate, up],
[down]]`` (:attr:`Adapter.group_roles`) — one Hessian per group suffices for GPTQ-style methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ..errors import CheckpointError, UnsupportedModelError, ValueRangeError
from .config_schema import Activation, Bool, Field, Float, Int, LayerTypes, Rope, TokenIds, check_config

__all__ = [
    "ROLES",
    "Adapter",
    "Dims",
    "LlamaAdapter",
    "Qwen2Adapter",
    "MistralAdapter",
    "ADAPTERS",
    "supported_model_types",
    "get_adapter",
    "adapter_for_type",
]

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
"""The linear roles of a decoder layer, in execution order (see the module docstring's table)."""

_LLAMA_CONFIG: dict[str, Field] = {
    "hidden_size": Int(hi=1 << 17),
    "intermediate_size": Int(hi=1 << 20),
    "num_hidden_layers": Int(hi=4096),
    "num_attention_heads": Int(hi=4096),
    "num_key_value_heads": Int(hi=4096, optional=True),
    "head_dim": Int(hi=4096, optional=True),
    "vocab_size": Int(hi=1 << 22),
    "max_position_embeddings": Int(hi=1 << 24),
    "hidden_act": Activation(),
    "rms_norm_eps": Float(hi=1.0),
    "rope_parameters": Rope(optional=True),
    "attention_bias": Bool(),
    "mlp_bias": Bool(),
    "attention_dropout": Float(hi=1.0, closed_lo=True),
    "tie_word_embeddings": Bool(),
    "pretraining_tp": Int(hi=64),
    "initializer_range": Float(hi=1.0, closed_lo=True),
    "use_cache": Bool(),
    "bos_token_id": TokenIds(optional=True),
    "eos_token_id": TokenIds(optional=True),
    "pad_token_id": TokenIds(optional=True),
}
_SLIDING: dict[str, Field] = {
    "sliding_window": Int(hi=1 << 24, optional=True),
    "use_sliding_window": Bool(),
    "max_window_layers": Int(lo=0, hi=4096),
    "layer_types": LayerTypes(optional=True),
}



@dataclass(frozen=True)
class Dims:
    """Widths of a decoder: ``hidden``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``intermediate``."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int


class Adapter:
    """The Llama layout; subclasses for architectures that share it only change ``model_types``
    and the config keys they add."""

    model_types: ClassVar[tuple[str, ...]] = ()
    config_schema: ClassVar[Mapping[str, Field]] = _LLAMA_CONFIG
    """The config keys a checkpoint may set for this architecture (the allow-list), with their types."""
    layers_path: ClassVar[str] = "model.layers"
    """Where the decoder layers are, as a state-dict prefix."""
    attention_module: ClassVar[str] = "lowbit.models.llama_attention"
    """The module holding this architecture's lowbit attention forward (``lowbit_attention_forward``,
    with ``check_attention``): the RoPE point, the projections, the attention call."""
    attention_path: ClassVar[str] = "self_attn"
    """Where a decoder layer keeps its self-attention, relative to the layer."""
    role_paths: ClassVar[Mapping[str, str]] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    """Each role of :data:`ROLES` → the linear's path relative to a decoder layer (what
    ``layer.get_submodule`` takes; also the suffix of its state-dict and checkpoint names)."""
    group_roles: ClassVar[tuple[tuple[str, ...], ...]] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
    """The roles in execution order, grouped by shared input (each role exactly once)."""
    groups: ClassVar[tuple[tuple[str, ...], ...]]
    """:attr:`group_roles` as paths (``(("self_attn.q_proj", ...), ...)``); derived, never set by
    hand (see ``__init_subclass__``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._derive_groups()

    @classmethod
    def _derive_groups(cls) -> None:
        roles = [r for g in cls.group_roles for r in g]
        if sorted(roles) != sorted(ROLES) or set(cls.role_paths) != set(ROLES):
            raise TypeError(
                f"{cls.__name__}: group_roles and role_paths must each name every role of {ROLES} exactly once"
            )
        cls.groups = tuple(tuple(cls.role_paths[r] for r in g) for g in cls.group_roles)

    def decoder_layers(self, model: Any) -> nn.ModuleList:
        """The decoder layers, in order."""
        return model.model.layers

    def embeddings(self, model: Any) -> nn.Embedding:
        """The input token embeddings."""
        return model.model.embed_tokens

    def final_norm(self, model: Any) -> nn.Module:
        """The norm after the last decoder layer."""
        return model.model.norm

    def lm_head(self, model: Any) -> nn.Linear:
        """The output projection to the vocabulary."""
        return model.lm_head

    def rotary(self, model: Any) -> nn.Module:
        """The rotary position embedding module shared by all layers."""
        return model.model.rotary_emb

    def attention_forward(self) -> Any:
        """``(forward, check)``: the lowbit attention forward of this architecture (bound to each
        attention module by :func:`lowbit.nn.attention.install_attention`) and the check that a
        module is an attention it can drive."""
        import importlib

        mod = importlib.import_module(self.attention_module)
        return mod.lowbit_attention_forward, mod.check_attention

    def attention(self, layer: Any) -> Any:
        """A decoder layer's self-attention module (:attr:`attention_path`; it holds the ``q``,
        ``k``, ``v`` and ``o`` linears and is what :func:`lowbit.nn.attention.install_attention`
        drives)."""
        return layer.get_submodule(self.attention_path)

    def linear_name(self, role: str) -> str:
        """The path of the linear in ``role`` (one of :data:`ROLES`) relative to a decoder layer,
        e.g. ``"self_attn.v_proj"`` for ``"v"``.

        Raises:
            ValueRangeError: ``role`` is not one of :data:`ROLES`.
        """
        path = self.role_paths.get(role) if isinstance(role, str) else None
        if path is None:
            raise ValueRangeError(f"role: must be one of {ROLES}, got {role!r}")
        return path

    def linear(self, layer: nn.Module, role: str) -> Any:
        """The module in ``role`` (one of :data:`ROLES`) of a decoder layer: an ``nn.Linear`` with
        ``weight`` of shape ``(out, in)`` as the table in the module docstring gives (``"v"``:
        ``(n_kv_heads·head_dim, hidden)``, ``"o"``: ``(hidden, n_heads·head_dim)``, ``"down"``:
        ``(hidden, intermediate)``, ...), or the stored layer that replaced it once quantized —
        whatever is there; callers that need a dense linear check it (see
        :meth:`linear_groups`).

        Raises:
            ValueRangeError: ``role`` is not one of :data:`ROLES`.
        """
        return layer.get_submodule(self.linear_name(role))

    def linears(self, layer: nn.Module, roles: Any) -> list:
        """``[self.linear(layer, r) for r in roles]``."""
        return [self.linear(layer, r) for r in roles]

    def residual_readers(self, layer: nn.Module) -> list[tuple[Any, list]]:
        """``[(attn_norm, [q, k, v]), (mlp_norm, [gate, up])]``: the linears that read the residual
        stream (hidden-wide inputs, ``weight`` ``(·, hidden)``), grouped by the norm whose output
        feeds them — a norm's scale folds into these, and R1 multiplies their weights on the right."""
        return [
            (self.attn_norm(layer), self.linears(layer, ("q", "k", "v"))),
            (self.mlp_norm(layer), self.linears(layer, ("gate", "up"))),
        ]

    def residual_writers(self, layer: nn.Module) -> list:
        """``[o, down]``: the linears whose outputs are added into the residual stream
        (hidden-wide outputs, ``weight`` ``(hidden, ·)``) — R1ᵀ multiplies their weights (and
        biases) on the left."""
        return self.linears(layer, ("o", "down"))

    def attn_norm(self, layer: Any) -> Any:
        """The norm whose output feeds the ``q``, ``k`` and ``v`` linears."""
        return layer.input_layernorm

    def mlp_norm(self, layer: Any) -> Any:
        """The norm whose output feeds the ``gate`` and ``up`` linears."""
        return layer.post_attention_layernorm

    def dims(self, model: Any) -> "Dims":
        """Hidden size, head counts and widths, from the model config."""
        c = model.config
        n_heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
        return Dims(
            hidden=int(c.hidden_size),
            n_heads=n_heads,
            n_kv_heads=int(getattr(c, "num_key_value_heads", None) or n_heads),
            head_dim=head_dim,
            intermediate=int(c.intermediate_size),
        )

    def check_config(self, cfg: Mapping[str, Any]) -> dict:
        """The architecture keys of a checkpoint's ``config.json``, checked (see
        :mod:`lowbit.models.config_schema`); unknown keys are dropped.

        Raises:
            CheckpointError: a bad value, or values that do not fit together (heads, head size,
                token ids, per-layer lists).
        """
        arch = check_config(cfg, self.config_schema)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in arch:
                raise CheckpointError(f"config.json.{key}: missing")
        heads = arch["num_attention_heads"]
        kv = arch.get("num_key_value_heads") or heads
        if heads % kv:
            raise CheckpointError(f"config.json.num_key_value_heads: {kv} does not divide num_attention_heads={heads}")
        head_dim = arch.get("head_dim")
        if head_dim is None:
            if arch["hidden_size"] % heads:
                raise CheckpointError(
                    f"config.json.num_attention_heads: {heads} does not divide hidden_size={arch['hidden_size']} (and no head_dim)"
                )
            head_dim = arch["hidden_size"] // heads
        if head_dim % 2:
            raise CheckpointError(f"config.json.head_dim: RoPE needs an even head size, got {head_dim}")
        for key in ("pad_token_id",):
            ids = arch.get(key)
            if ids is not None and any(i >= arch["vocab_size"] for i in (ids if isinstance(ids, list) else [ids])):
                raise CheckpointError(f"config.json.{key}: {ids!r} is outside the vocabulary (vocab_size={arch['vocab_size']})")
        types = arch.get("layer_types")
        if types is not None and len(types) != arch["num_hidden_layers"]:
            raise CheckpointError(
                f"config.json.layer_types: {len(types)} entries for num_hidden_layers={arch['num_hidden_layers']}"
            )
        return arch

    def check_tensor_names(self, arch: Mapping[str, Any], names: Any) -> None:
        """Check ``arch`` against the tensor names a weights file holds before anything is built:
        the decoder layers stored must be exactly ``0 .. num_hidden_layers - 1``.

        Raises:
            CheckpointError: naming the layer count found.
        """
        pat = re.compile(re.escape(self.layers_path) + r"\.(\d+)\.")
        found = {int(m.group(1)) for n in names if (m := pat.match(n))}
        want = arch["num_hidden_layers"]
        if found != set(range(want)):
            extra = sorted(found - set(range(want)))
            hint = f"; layers {extra[:5]} are beyond it" if extra else f"; {len(set(range(want)) - found)} layers have no tensors"
            raise CheckpointError(
                f"config.json.num_hidden_layers: {want}, but the weights hold tensors of {len(found)} decoder layers{hint}"
            )

    def linear_groups(self, layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """``[[(name, linear), ...], ...]``: a layer's linears in execution order, grouped by shared input.

        Names are relative to the layer (``"self_attn.q_proj"``), as ``layer.get_submodule`` takes them;
        the groups are :attr:`group_roles` (their paths: :attr:`groups`).

        Raises:
            UnsupportedModelError: a member is not a dense ``nn.Linear`` (already quantized, or another module).
        """
        out = []
        for group in self.group_roles:
            members = []
            for role in group:
                name = self.linear_name(role)
                module = layer.get_submodule(name)
                if not isinstance(module, nn.Linear):
                    raise UnsupportedModelError(
                        f"{type(self).__name__}: {name!r} of {type(layer).__name__} is a "
                        f"{type(module).__name__}, expected nn.Linear"
                    )
                members.append((name, module))
            out.append(members)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


Adapter._derive_groups()


class LlamaAdapter(Adapter):
    model_types = ("llama",)


class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
    config_schema = {**{k: v for k, v in _LLAMA_CONFIG.items() if k not in ("attention_bias", "mlp_bias")}, **_SLIDING}


class MistralAdapter(Adapter):
    model_types = ("mistral",)
    config_schema = {**{k: v for k, v in _LLAMA_CONFIG.items() if k not in ("attention_bias", "mlp_bias")}, **_SLIDING}


ADAPTERS: dict[str, type[Adapter]] = {
    t: cls for cls in (LlamaAdapter, Qwen2Adapter, MistralAdapter) for t in cls.model_types
}


def supported_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values that have an adapter."""
    return tuple(ADAPTERS)


def adapter_for_type(model_type: Any) -> Adapter:
    """The adapter for a ``config.model_type`` value.

    Raises:
        UnsupportedModelError: no adapter knows it.
    """
    cls = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    return cls()


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        UnsupportedModelError: the model has no config or its ``model_type`` has no adapter.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return cls()
