"""Models: loading (the bundled SmolLM2-135M or a local HF folder), per-architecture adapters, and
tiny random models for tests. See ``DESIGN.md`` §2 and §5.

``transformers`` is imported lazily, by the functions that need it.
"""

from __future__ import annotations

from .adapters import (
    ADAPTERS,
    Adapter,
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    get_adapter,
    supported_model_types,
)
from .loader import BUNDLED, BUNDLED_GGUF, bundled_path, cache_dir, gguf_path, load_bundled, load_model
from .tiny import TINY_ARCHS, TINY_VOCAB, random_ids, tiny_config, tiny_model

__all__ = [
    "Adapter",
    "LlamaAdapter",
    "Qwen2Adapter",
    "MistralAdapter",
    "ADAPTERS",
    "supported_model_types",
    "get_adapter",
    "BUNDLED",
    "BUNDLED_GGUF",
    "cache_dir",
    "gguf_path",
    "bundled_path",
    "load_bundled",
    "load_model",
    "TINY_ARCHS",
    "TINY_VOCAB",
    "tiny_config",
    "tiny_model",
    "random_ids",
]
