"""Moved to :mod:`lowbit.kv` (kept so that old imports keep working)."""

from __future__ import annotations

from ..kv.cache import kv_bytes_report
from ..kv.calibrate import calibrate_kv

__all__ = ["calibrate_kv", "kv_bytes_report"]
