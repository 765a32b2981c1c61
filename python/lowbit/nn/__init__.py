"""Modules that run from packed low-bit storage (DESIGN §2 ``nn/``)."""

from __future__ import annotations

from .quant_linear import PackingFormat, QuantLinear, storage_bits

__all__ = ["PackingFormat", "QuantLinear", "storage_bits"]
