"""Plain prose from a MediaWiki XML dump: the encyclopedic part of the calibration mix.

The dump is the shortened English Wikipedia sample that ``gensim`` ships with its tests
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
206 pages, 6 MB of XML; Wikipedia text is CC BY-SA). Redirect pages are skipped; each article keeps
its title, its section headings and its paragraphs, and loses templates, tables, references, files,
categories, HTML tags and markup (see :func:`clean`).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["articles", "clean"]

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(r"<(gallery|math|timeline|syntaxhighlight|source|score|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
# A [[File:...]] / [[Image:...]] / [[Category:...]] link, possibly with nested links in its caption.
_NAMESPACE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_RULE = re.compile(r"^-{4,}\s*$", re.M)
_SPACES = re.compile(r"[ \t]+")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")
# Sections past which an article is lists of links and citations, not prose.
_TAIL_SECTIONS = re.compile(r"^(See also|References|Notes|Footnotes|Further reading|External links|Bibliography|Sources)$", re.M | re.I)


_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
# A template left unbalanced (its arguments hold literal braces): dropped to the end of its paragraph.
_UNCLOSED = re.compile(r"\{\{.*?(?=\n\n|\Z)", re.S)
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)


def _drop_nested(text: str, inner: "re.Pattern[str]") -> str:
    """Remove every span ``inner`` matches, innermost first, until none is left (templates
    ``{{…}}`` inside templates, tables inside tables)."""
    while True:
        text, n = inner.subn("", text)
        if not n:
            return text


def _drop_namespace_links(text: str) -> str:
    """Remove ``[[File:…]]``-style links whole, their captions' nested ``[[…]]`` included."""
    while True:
        m = _NAMESPACE_LINK.search(text)
        if m is None:
            return text
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]


def clean(wikitext: str, title: str = "") -> str:
    """Readable prose from one article's wikitext.

    * templates ``{{…}}`` and tables ``{|…|}`` are dropped, nesting respected (an unbalanced
      template to the end of its paragraph); so are ``<ref>``
      citations, comments, ``<math>``/``<gallery>``-like blocks, other HTML tags, file, image,
      category and interlanguage links;
    * ``[[target|label]]`` becomes ``label``, ``[[target]]`` ``target``, ``[url label]`` ``label``;
    * ``== Heading ==`` becomes ``Heading``; bold/italic quotes and list marks go;
    * the article stops at its "See also" / "References" / "External links" section;
    * the title, when given, is the first line; blank-line runs become one blank line.
    """
    text = html.unescape(wikitext)  # &nbsp; &mdash; … (the XML layer's escapes are already undone)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _drop_nested(text, _INNER_TEMPLATE)
    text = _drop_nested(text, _INNER_TABLE)
    text = _UNCLOSED.sub("", text)
    text = _drop_namespace_links(text)
    text = _LINK.sub(r"\2", text)
    text = _PLAIN_LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\2", text)
    tail = _TAIL_SECTIONS.search(text)
    if tail is not None:
        text = text[: tail.start()]
    text = _QUOTES.sub("", text)
    text = _LIST.sub("", text)
    text = _RULE.sub("", text)
    text = text.replace("\u00a0", " ")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    lines = [line for line in text.split("\n") if not line.strip().startswith(("|", "!", "}", "{"))]
    text = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
    return f"{title}\n\n{text}" if title and text else text


def articles(dump: Path) -> list[str]:
    """The cleaned articles of a ``.xml.bz2`` MediaWiki dump, in dump order (redirects and
    non-article namespaces skipped, empty results dropped)."""
    out: list[str] = []
    with bz2.open(dump, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            ns = {c.tag.split("}")[-1]: c for c in elem.iter()}
            title = (ns["title"].text or "") if "title" in ns else ""
            is_article = "ns" in ns and (ns["ns"].text or "").strip() == "0"
            body = (ns["text"].text or "") if "text" in ns else ""
            if is_article and "redirect" not in ns and not body.lstrip().upper().startswith("#REDIRECT"):
                cleaned = clean(body, title)
                if cleaned:
                    out.append(cleaned)
            elem.clear()
    return out
