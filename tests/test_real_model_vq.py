"""Vector quantization at 2 bits on the real model (SmolLM2-135M), FP and GPTQ measured in the same run.

The issue's bound is QuIP# at 2 bits (E8P, incoherence, BlockLDLQ, fine-tuned scales) at most half
the perplexity of GPTQ W2 g32, at ≤ 2.1 bits per weight overall (GPTQ W2 g32 spends 3 bits: fp16
scale and zero per 32). ``benches/presets.py --tag vq`` checks it at full scale (128 calibration
sequences, 16,384 tokens: 45.89 against 103.13, 0.45×). Here, on the `bundle` fixture with 16
calibration sequences to keep the slow set short (the end-to-end tuning then has 12 sequences), the
test asks for 0.6× so that it guards the method without sitting on the edge of calibration noise.
"""

import copy

import pytest

import lowbit
from lowbit.eval import perplexity
from lowbit.nn import VQLinear

pytestmark = pytest.mark.slow

SEQLEN = 512
N_CALIB = 16


def _bits(model):
    bits = n = 0.0
    for m in model.modules():
        if isinstance(m, lowbit.nn.QUANT_LINEARS):
            k = m.in_features * m.out_features
            bits += m.bits_per_weight() * k
            n += k
    return bits / n


def test_w2_quip_halves_gptq_w2_perplexity_at_2_bits(bundle, tmp_path, capsys):
    model, _, ids, calib, fp = bundle
    gptq = lowbit.quantize(copy.deepcopy(model), "w2-gptq", calib[:N_CALIB], progress=False)
    ppl_gptq = perplexity(gptq, ids, seqlen=SEQLEN)
    bits_gptq = _bits(gptq)
    del gptq
    quip = lowbit.quantize(copy.deepcopy(model), "w2-quip", calib[:N_CALIB], progress=False)
    ppl_quip = perplexity(quip, ids, seqlen=SEQLEN)
    bits_quip = _bits(quip)
    print(f"FP {fp:.2f}  GPTQ W2 g32 {ppl_gptq:.2f} ({bits_gptq:.3f} b/w)  QuIP# W2 {ppl_quip:.2f} ({bits_quip:.3f} b/w)")
    assert bits_quip <= 2.1
    assert ppl_quip <= 0.6 * ppl_gptq
    assert isinstance(quip.model.layers[0].mlp.down_proj, VQLinear) and isinstance(quip.model.layers[29].self_attn.q_proj, VQLinear)

    # the checkpoint reloads to the same perplexity, and inspect reports the bits with overhead
    from lowbit.cli import main

    path = lowbit.save(quip, tmp_path / "w2-quip")
    loaded = lowbit.load(path)
    assert perplexity(loaded, ids[:, :1024], seqlen=SEQLEN) == pytest.approx(perplexity(quip, ids[:, :1024], seqlen=SEQLEN), rel=1e-4)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "e8p" in printed and f"{bits_quip:.3f}" in printed
