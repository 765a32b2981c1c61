"""Where the model-level benchmarks (presets.py, quantize.py, online.py) write their results:
``benches/results/<date>-<name>.json`` (the data) and ``.md`` (the printed table)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any


def write_results(name: str, data: Any, markdown: str) -> Path:
    """Write ``data`` as JSON and ``markdown`` beside it; returns the path stem."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"{dt.date.today().isoformat()}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")
    return stem
