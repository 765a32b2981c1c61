"""Checkpoints: packed safetensors + ``config.json`` (DESIGN §4). No pickle, no remote code."""

from __future__ import annotations

from .checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    WEIGHTS_NAME,
    load,
    load_with_tokenizer,
    read_quantization_config,
    save,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "WEIGHTS_NAME",
    "load",
    "load_with_tokenizer",
    "read_quantization_config",
    "save",
]
