"""lowbit.eval: perplexity on non-overlapping windows, checked against an independent loop."""

import math

import pytest
import torch

from lowbit import eval as lbeval
from lowbit.errors import DTypeError, ShapeError
from lowbit.models import random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def manual_ppl(model, tokens, seqlen):
    """exp(mean NLL) written out: one window at a time, log-softmax, gather the next token."""
    ids = tokens[0]
    n = ids.numel() // seqlen
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seqlen : (w + 1) * seqlen][None]
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(total / count)


def test_perplexity_matches_manual_loop(model):
    tokens = random_ids(1, 4 * 64 + 17, seed=1)
    ppl = lbeval.perplexity(model, tokens, seqlen=64)
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(manual_ppl(model, tokens, 64), rel=1e-5)
    # also equal to exp of transformers' own mean loss (every window has the same length)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in tokens[0, : 4 * 64].reshape(4, 64)]
    assert ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    # a random-init tiny model is close to uniform over its 256-token vocabulary
    assert 150 < ppl < 400


def test_batching_and_tail(model):
    tokens = random_ids(1, 5 * 32 + 7, seed=2)
    one = lbeval.perplexity(model, tokens, seqlen=32, batch_size=1)
    assert lbeval.perplexity(model, tokens, seqlen=32, batch_size=2) == pytest.approx(one, rel=1e-5)
    batched = lbeval.perplexity(model, tokens, seqlen=32, batch_size=8, progress=True)
    assert batched == pytest.approx(one, rel=1e-5)
    # the tail shorter than a window is dropped
    assert lbeval.perplexity(model, tokens[:, : 5 * 32], seqlen=32) == pytest.approx(one, rel=1e-6)
    # a 1-D stream works too
    assert lbeval.perplexity(model, tokens[0], seqlen=32) == pytest.approx(one, rel=1e-6)


def test_nll_counts_predicted_tokens(model):
    tokens = random_ids(1, 100, seed=3)
    total, count = lbeval.nll(model, tokens, seqlen=30)
    assert count == 3 * 29
    assert math.exp(total / count) == pytest.approx(lbeval.perplexity(model, tokens, seqlen=30))
    # fewer tokens than seqlen: one window of all of them
    total, count = lbeval.nll(model, tokens[:, :20], seqlen=512)
    assert count == 19


def test_perplexity_leaves_model_in_eval_and_no_grad(model):
    model.train()
    lbeval.perplexity(model, random_ids(1, 64), seqlen=32)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_plain_logits_model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(16, 16)
    tokens = random_ids(1, 64, vocab_size=16, seed=4)
    ppl = lbeval.perplexity(emb, tokens, seqlen=16)
    with torch.no_grad():
        logp = torch.log_softmax(emb(tokens[0].reshape(4, 16))[:, :-1].double(), -1)
        expected = math.exp(-logp.gather(2, tokens[0].reshape(4, 16)[:, 1:, None]).mean().item())
    assert ppl == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=torch.tensor([[5]])), "T"),
        (dict(tokens=torch.zeros(1, 0, dtype=torch.long)), "T"),
        (dict(seqlen=1), "seqlen"),
        (dict(seqlen=0), "seqlen"),
        (dict(batch_size=0), "batch_size"),
        (dict(tokens=torch.zeros(2, 64, dtype=torch.long)), r"\(1, T\)"),
    ],
)
def test_validation(model, kwargs, match):
    args = dict(tokens=random_ids(1, 64), seqlen=32)
    args.update(kwargs)
    with pytest.raises(ShapeError, match=match):
        lbeval.perplexity(model, args.pop("tokens"), **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_token_dtype(model, dtype):
    with pytest.raises(DTypeError, match="dtype"):
        lbeval.perplexity(model, torch.zeros(1, 64, dtype=dtype), seqlen=32)


def test_design_form_with_tokenizer_and_text():
    """DESIGN §3: ``perplexity(model, tok, text)`` tokenizes the text itself."""
    from lowbit.models.tiny import tiny_model

    class ByteTok:
        def encode(self, text, add_special_tokens=False):
            return list(text.encode()[:4096])

    model = tiny_model("llama", seed=0)
    text = "To be, or not to be, that is the question. " * 20
    ids = torch.tensor([ByteTok().encode(text)])
    assert lbeval.perplexity(model, ByteTok(), text, seqlen=64) == pytest.approx(
        lbeval.perplexity(model, ids, seqlen=64), rel=1e-6
    )
    with pytest.raises(ShapeError, match="text"):
        lbeval.perplexity(model, ByteTok(), 42, seqlen=64)
