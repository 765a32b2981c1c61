"""Tiny random-initialised Llama / Qwen2 / Mistral models for fast structural tests.

Built from ``transformers`` config classes (nothing downloaded): hidden 64, 2 layers, 4 heads,
2 KV heads (head dim 16), MLP 128, vocab 256, 256 positions. There is no tokenizer: feed
:func:`random_ids` (token ids below :data:`TINY_VOCAB`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ValueRangeError

__all__ = ["TINY_ARCHS", "TINY_VOCAB", "tiny_config", "tiny_model", "random_ids"]

TINY_ARCHS = ("llama", "qwen2", "mistral")
TINY_VOCAB = 256

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=256,
)


def tiny_config(arch: str, tie_word_embeddings: bool = False) -> Any:
    """The ``transformers`` config of a tiny ``arch`` model (one of :data:`TINY_ARCHS`)."""
    names = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
    if arch not in names:
        raise ValueRangeError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    import transformers

    Config = getattr(transformers, names[arch])
    return Config(**_COMMON, tie_word_embeddings=bool(tie_word_embeddings))


def tiny_model(arch: str, seed: int = 0, tie_word_embeddings: bool = False) -> Any:
    """A tiny float32 ``arch`` causal LM with weights drawn from ``seed``, in eval mode.

    The global torch RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_ids(*shape: int, vocab_size: int = TINY_VOCAB, seed: int = 0) -> torch.Tensor:
    """Random token ids of ``shape`` (e.g. ``random_ids(1, 1024)``) below ``vocab_size``, from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, int(vocab_size), tuple(int(s) for s in shape), generator=gen)
