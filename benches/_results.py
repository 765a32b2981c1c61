"""Where every benchmark writes its results: ``benches/results/<date>-<name>.json`` (the data) and
``.md`` (the printed table)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, indent: int = 2, ensure_ascii: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def write_results(name: str, data: Any, markdown: str, indent: int = 2, ensure_ascii: bool = True) -> Path:
    """Write ``data`` as JSON and ``markdown`` beside it; returns the path stem (``<stem>.json``,
    ``<stem>.md``)."""
    stem = Path(__file__).parent / "results" / f"{dt.date.today().isoformat()}-{name}"
    write_json(stem.parent / f"{stem.name}.json", data, indent, ensure_ascii)
    (stem.parent / f"{stem.name}.md").write_text(markdown.rstrip("\n") + "\n")
    return stem
