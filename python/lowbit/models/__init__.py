"""Models: loading (the bundled SmolLM2-135M or a local HF folder), per-architecture adapters, and
tiny random models for tests. See ``DESIGN.md`` §2 and §5.

``transformers`` is imported lazily, by the functions that need it.
"""

from __future__ import annotations

from . import adapters, loader, tiny
from .adapters import *  # noqa: F403 - the adapters' public names, listed in adapters.__all__
from .loader import *  # noqa: F403 - the loader's public names, listed in loader.__all__
from .tiny import TINY_ARCHS, TINY_VOCAB, random_ids, tiny_config, tiny_model

__all__ = [
    *adapters.__all__,
    *loader.__all__,
    "TINY_ARCHS",
    "TINY_VOCAB",
    "tiny_config",
    "tiny_model",
    "random_ids",
]
