"""A user's own calibration text (``--calib-data PATH`` / ``calibration(..., source=PATH)``).

``PATH`` is one of

* a text file: one document, the whole file;
* a ``.jsonl`` file: one JSON object a line, each with a string ``"text"`` (blank lines skipped;
  other keys ignored) — the format of most instruction and pre-training dumps;
* a folder: every regular, non-hidden file under it (recursively, sorted by relative path), each
  read as above by its suffix.

Files must be UTF-8. Everything else — a missing path, a FIFO or device, a non-UTF-8 file, a JSONL
line that is not an object with a string ``text``, data with no text at all — is a
:class:`~lowbit.errors.CalibrationDataError` naming the file (and line). More than
:data:`MAX_CHARS` characters of documents are sampled down with the calibration seed, whole
documents first, so a large corpus costs a bounded tokenization.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Iterable, Sequence, Union

from ..errors import CalibrationDataError

__all__ = ["MAX_CHARS", "read_documents", "sample_documents"]

MAX_CHARS = 8_000_000
PathLike = Union[str, "os.PathLike[str]"]


def _regular(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CalibrationDataError(f"calib_data: {str(path)!r} does not exist") from None
    except OSError as e:
        raise CalibrationDataError(f"calib_data: cannot read {str(path)!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise CalibrationDataError(f"calib_data: {str(path)!r} is not a regular file or a folder")
    return st


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationDataError(f"calib_data: cannot read {str(path)!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"calib_data: {str(path)!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def _jsonl(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"calib_data: {str(path)!r} line {i} is not JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationDataError(f"calib_data: {str(path)!r} line {i} has no string field 'text'")
        docs.append(obj["text"])
    return docs


def _file_documents(path: Path) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path)
    return [_read_text(path)]


def _folder_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if stat.S_ISREG(p.stat().st_mode):
                yield p


def read_documents(path: PathLike) -> list[str]:
    """The non-blank documents of a calibration file or folder (see the module docstring), in order.

    Raises:
        CalibrationDataError: naming the file, for every way the data can be unusable, and when
            no document has any non-whitespace text.
    """
    path = Path(os.fspath(path))
    st = _regular(path)
    if stat.S_ISDIR(st.st_mode):
        files = list(_folder_files(path))
        if not files:
            raise CalibrationDataError(f"calib_data: the folder {str(path)!r} has no (non-hidden, regular) files")
        docs = [d for f in files for d in _file_documents(f)]
    else:
        docs = _file_documents(path)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise CalibrationDataError(f"calib_data: {str(path)!r} holds no text (empty or whitespace only)")
    return docs


def sample_documents(docs: Sequence[str], seed: int, max_chars: int = MAX_CHARS) -> list[str]:
    """At most ``max_chars`` characters of ``docs``: all of them when they fit, else whole
    documents in a seeded random order until the budget is used, the last one cut to fit."""
    if sum(len(d) for d in docs) <= max_chars:
        return list(docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out: list[str] = []
    left = max_chars
    for i in order:
        if left <= 0:
            break
        out.append(docs[i][:left])
        left -= len(out[-1]) + 2
    return out
