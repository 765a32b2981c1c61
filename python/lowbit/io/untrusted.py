"""Reading files that someone else may have written: a downloaded checkpoint, a model folder.

Every reader here treats the file as hostile:

- only **regular files** are read (a FIFO would block forever, ``/dev/zero`` would fill memory);
  the check is made on the opened descriptor (``O_NONBLOCK``, so opening a FIFO cannot block);
- a **size cap** bounds what is read into memory;
- JSON is parsed strictly: no ``NaN``/``Infinity`` constants and no number that overflows a float
  (``1e400``), no duplicate keys, nesting at most
  :data:`MAX_JSON_DEPTH`, numbers of at most a few thousand digits (Python's own limit).

Every failure is a :class:`~lowbit.errors.CheckpointError` naming the file and the reason.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "file_kind",
    "check_regular_file",
    "check_folder_files",
    "read_bytes",
    "read_json",
]

MAX_JSON_BYTES = 64 << 20
"""Largest JSON file read (64 MiB: a 70B model's config with every layer's entry is well under 1 MiB)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in a JSON file (lowbit's own configs nest 6 levels)."""


def file_kind(mode: int) -> str:
    """``"FIFO"``, ``"character device"``, … for an ``st_mode`` (for error messages)."""
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def _not_regular(path: Path, what: str, mode: int) -> CheckpointError:
    return CheckpointError(f"{what}: {str(path)!r} is a {file_kind(mode)}, not a regular file; lowbit reads only regular files")


def check_regular_file(path: Path, what: str) -> os.stat_result:
    """``os.stat(path)`` (symlinks followed) if it is a regular file, else a :class:`CheckpointError`.

    Args:
        path: the file.
        what: how the message names it (``"config.json"``).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: missing in {str(path.parent)!r}") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, what, st.st_mode)
    return st


def check_folder_files(folder: Path) -> None:
    """Every entry of ``folder`` that is not a folder must be a regular file (:func:`check_regular_file`):
    for folders that a library (the tokenizer loader, ``from_pretrained``) reads by names lowbit does
    not control, where one FIFO would block it."""
    for entry in os.scandir(folder):
        if not entry.is_dir():
            check_regular_file(Path(entry.path), entry.name)


def read_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """The whole content of the regular file ``path``, refusing anything larger than ``max_bytes``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: missing in {str(path.parent)!r}") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot open {str(path)!r}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, what, st.st_mode)
        if st.st_size > max_bytes:
            raise CheckpointError(f"{what}: {str(path)!r} has {st.st_size} bytes, more than the {max_bytes} lowbit reads")
        chunks, total = [], 0
        while True:  # read to EOF, never past the cap (the file may grow while we read)
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise CheckpointError(f"{what}: {str(path)!r} grew past the {max_bytes} bytes lowbit reads")
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _no_constant(name: str) -> Any:
    raise ValueError(f"the non-standard constant {name} (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj`` (iterative; stops counting past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path`` strictly (see the module docstring).

    Raises:
        CheckpointError: missing, not a regular file, too large, not UTF-8, not valid JSON, a
            NaN/Infinity constant or an overflowing number, a duplicate key, nested deeper than
            :data:`MAX_JSON_DEPTH`.
    """
    data = read_bytes(path, what, max_bytes)
    try:
        obj = json.loads(
            data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_no_duplicates
        )
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what}: {str(path)!r} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{what}: {str(path)!r} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, the hooks above, over-long integers
        raise CheckpointError(f"{what}: {str(path)!r} is not valid JSON: {e}") from None
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what}: {str(path)!r} nests deeper than {MAX_JSON_DEPTH} levels")
    return obj
