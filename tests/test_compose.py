"""Every composition of recipe steps saves and loads: rotation × weight method × activations × KV.

Each cell quantizes a tiny model, saves it, loads it back and checks that the loaded model gives
the in-memory model's logits and still generates. The weight methods come from the registry
(`lowbit.methods.registry`), so a new method is covered here without a new test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.models.tiny import TINY_ARCHS, random_ids, tiny_model
from lowbit.methods.registry import weight_methods
from lowbit.recipe import ActQuant, KVQuant, Rotate, VectorQuant, WeightQuant
from lowbit.recipe import EmbedQuant

pytest.importorskip("transformers")

ROTATIONS = {"none": None, "quarot": Rotate("quarot"), "spinquant": Rotate("spinquant", steps=2, seqlen=16)}
# one cell config per registered weight method (a new method gets its cells from its family);
# RSAVQ with fewer Fisher samples and k-means iterations, to stay quick
# and the block-reconstruction methods with a few steps
_FAST = {
    "rsavq": dict(bits=2.0, fisher_samples=2, kmeans_iters=2),
    "omniquant": dict(options={"epochs": 1, "let": True}),
    "affinequant": dict(options={"epochs": 2}),
    "cqe": dict(options={"epochs": 1, "lookahead": 1}),
    "tesseraq": dict(options={"lwc_epochs": 1, "stage_steps": 2, "thresholds": [0.5]}),
}
WEIGHTS = {
    name: WeightQuant(name, 4, 32, **_FAST.get(name, {}))
    if m.family == "grid"
    else VectorQuant(name, **{"bits": 2, **_FAST.get(name, {})}, finetune_steps=0, e2e_steps=0)
    for name, m in weight_methods().items()
}
ACTS = {"none": None, "a8": ActQuant(8), "a4": ActQuant(4)}
KVS = {
    "none": None,
    "uniform": KVQuant(4, "uniform"),
    "kvquant": KVQuant(4, "kvquant", calib_samples=2),
    "akvq": KVQuant(2, "akvq", calib_samples=2, salient_frac=0.1),
}

# Every rotation with every weight method (A4, uniform KV: the full W4A4KV4 stack), and every
# activation × KV option with each rotation on one weight method: 50 cells, a few seconds each.
_SLOW = {("spinquant", "rsavq", "a4", "uniform"), ("none", "rsavq", "a4", "uniform")}  # RSAVQ's layer
# type is QuIP#'s (VQLinear), which has every cell; RSAVQ itself keeps two
CELLS = sorted(
    (
        {(r, w, "a4", "uniform") for r, w in itertools.product(ROTATIONS, WEIGHTS)}
        | {(r, "gptq", a, k) for r, a, k in itertools.product(ROTATIONS, ACTS, KVS)}
        | {("none", w, "none", "none") for w in WEIGHTS}
    )
    - _SLOW
)


@pytest.fixture(scope="module")
def calib():
    return random_ids(4, 32, seed=1)


# the three tiny architectures take turns, so each sees every kind of step
CELLS = [(TINY_ARCHS[i % len(TINY_ARCHS)], *c) for i, c in enumerate(CELLS)]


@pytest.mark.parametrize("arch,rot,weight,act,kv", CELLS, ids=["-".join(c) for c in CELLS])
def test_composition_saves_loads_and_generates(arch, rot, weight, act, kv, calib, tmp_path):
    steps = [s for s in (ROTATIONS[rot], WEIGHTS[weight], ACTS[act], KVS[kv]) if s is not None]
    model = lowbit.quantize(tiny_model(arch, seed=2), steps, calib, progress=False)
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    out = lowbit.save(model, tmp_path / "ck")
    loaded = lowbit.load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    gen = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


# The embeddings/head step (EmbedQuant, after the weight step) with each kind of step around it, on
# tied and untied models: a few cells (tests/test_embed_quant.py covers the step itself).
EMBED_CELLS = [
    ("llama", True, "none", "gptq", "none", "none"),
    ("qwen2", False, "quarot", "gptq", "a4", "uniform"),
    ("mistral", True, "spinquant", "quip", "a8", "kvquant"),
]


@pytest.mark.parametrize("arch,tied,rot,weight,act,kv", EMBED_CELLS, ids=["-".join(map(str, c)) for c in EMBED_CELLS])
def test_embed_quant_composes(arch, tied, rot, weight, act, kv, calib, tmp_path):
    from lowbit.nn.quant_embedding import QuantEmbedding, QuantHead

    steps = [s for s in (ROTATIONS[rot], WEIGHTS[weight], EmbedQuant(8), ACTS[act], KVS[kv]) if s is not None]
    model = lowbit.quantize(tiny_model(arch, seed=2, tie_word_embeddings=tied), steps, calib, progress=False)
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    loaded = lowbit.load(lowbit.save(model, tmp_path / "ck"))
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and isinstance(loaded.lm_head, QuantHead)
    assert (loaded.lm_head.tied_to is not None) == (tied and rot == "none")  # a rotation unties them first
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


# The low-rank branch (LowRank, after the weight step) of each registered low-rank method, on each
# family of weight method and stored layer (packed, VQ, block-trained), with rotations,
# activations, KV and the embeddings step around it: the branch saves, loads and runs the same.
def _lowrank_cells():
    from lowbit.methods.registry import post_weight_methods

    contexts = [
        ("llama", "none", "rtn", "none", "none", False),
        ("qwen2", "quarot", "gptq", "a4", "uniform", True),
        ("mistral", "spinquant", "quip", "a8", "kvquant", False),
        ("llama", "none", "tesseraq", "a4", "uniform", False),
    ]
    return [(m, *c) for m in post_weight_methods("lowrank") for c in contexts]


LOWRANK_CELLS = _lowrank_cells()


@pytest.mark.parametrize("method,arch,rot,weight,act,kv,embed", LOWRANK_CELLS, ids=["-".join(map(str, c)) for c in LOWRANK_CELLS])
def test_lowrank_composes(method, arch, rot, weight, act, kv, embed, calib, tmp_path):
    from lowbit.nn import QUANT_LINEARS
    from lowbit.nn.lowrank import lowrank_of
    from lowbit.recipe import LowRank

    steps = [s for s in (ROTATIONS[rot], WEIGHTS[weight], LowRank(method, 4), EmbedQuant(8) if embed else None, ACTS[act], KVS[kv])
             if s is not None]
    model = lowbit.quantize(tiny_model(arch, seed=2), steps, calib, progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS)}
    assert linears and all(lowrank_of(m) is not None and lowrank_of(m).rank == 4 for m in linears.values())
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        want = model(ids).logits
    loaded = lowbit.load(lowbit.save(model, tmp_path / "ck"))
    for n, m in loaded.named_modules():
        if n in linears:
            b = lowrank_of(m)
            assert b is not None and torch.equal(b.A, lowrank_of(linears[n]).A) and m.bits_per_weight() == linears[n].bits_per_weight()
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
