"""Checkpoints: packed safetensors + ``config.json`` (DESIGN §4). No pickle, no remote code.

``checkpoint`` saves and loads; ``publish`` writes output folders atomically and race-free;
``untrusted`` reads files someone else may have written.
"""

from __future__ import annotations

from .checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REPORT_NAME,
    SUPPORTED_FORMAT_VERSIONS,
    WEIGHTS_NAME,
    load,
    load_with_tokenizer,
    read_quantization_config,
    read_report,
    save,
)
from .peft_adapter import save_peft_adapter

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SUPPORTED_FORMAT_VERSIONS",
    "WEIGHTS_NAME",
    "load",
    "save_peft_adapter",
    "load_with_tokenizer",
    "read_quantization_config",
    "read_report",
    "save",
]
