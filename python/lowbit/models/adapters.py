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

:meth:`Adapter.linear_groups` lists a layer's linears in execution order, grouped by shared input:
``[[q, k, v], [o], [gate, up], [down]]`` — one Hessian per group suffices for GPTQ-style methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "Dims",
    "LlamaAdapter",
    "Qwen2Adapter",
    "MistralAdapter",
    "ADAPTERS",
    "supported_model_types",
    "get_adapter",
]


@dataclass(frozen=True)
class Dims:
    """Widths of a decoder: ``hidden``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``intermediate``."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int


class Adapter:
    """The Llama layout; subclasses for architectures that share it only change ``model_types``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

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

    def attention(self, layer: Any) -> Any:
        """A decoder layer's self-attention module (holds q/k/v/o_proj)."""
        return layer.self_attn

    def attn_norm(self, layer: Any) -> Any:
        """The norm whose output feeds q/k/v."""
        return layer.input_layernorm

    def mlp_norm(self, layer: Any) -> Any:
        """The norm whose output feeds gate/up."""
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

    def linear_groups(self, layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """``[[(name, linear), ...], ...]``: a layer's linears in execution order, grouped by shared input.

        Names are relative to the layer (``"self_attn.q_proj"``), as ``layer.get_submodule`` takes them.
        """
        out = []
        for group in self.groups:
            members = []
            for name in group:
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


class LlamaAdapter(Adapter):
    model_types = ("llama",)


class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)


class MistralAdapter(Adapter):
    model_types = ("mistral",)


ADAPTERS: dict[str, type[Adapter]] = {
    t: cls for cls in (LlamaAdapter, Qwen2Adapter, MistralAdapter) for t in cls.model_types
}


def supported_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values that have an adapter."""
    return tuple(ADAPTERS)


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
