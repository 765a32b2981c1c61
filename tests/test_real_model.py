"""Quality on the real model: SmolLM2-135M-Instruct (bundled GGUF), evaluation split (tragedies).

Bounds from the issue, FP measured in the same run: GPTQ W4 g64 ≤ 1.12 × FP, GPTQ W3 g64 ≤ 1.6 × FP,
GPTQ W2 g32 at least 10× lower perplexity than RTN W2 g32. Fewer calibration samples and evaluation
tokens than the CLI defaults keep the whole set within a few minutes on 2 cores.
"""

import copy

import pytest
import torch

import lowbit
from lowbit.driver import fast_calib_dtype
from lowbit.eval import perplexity

pytestmark = pytest.mark.slow

SEQLEN = 512  # as conftest.REAL_SEQLEN; the `bundle` fixture (conftest) holds model, tokenizer, ids, calib, FP ppl


def _ppl(bundle, recipe):
    model, _, ids, calib, _ = bundle
    q = lowbit.quantize(copy.deepcopy(model), recipe, calib, progress=False, calib_dtype=fast_calib_dtype())
    return perplexity(q, ids, seqlen=SEQLEN), q


def test_fp_perplexity_is_plausible(bundle):
    assert 10 < bundle[4] < 80


def test_gptq_w4(bundle, tmp_path):
    ppl, q = _ppl(bundle, "w4-gptq")
    print(f"FP {bundle[4]:.2f}  W4 GPTQ g64 {ppl:.2f}")
    assert ppl <= 1.12 * bundle[4]
    # The packed checkpoint reloads to the same perplexity.
    lowbit.save(q, tmp_path / "w4", quantization_config={"recipe": q.lowbit_recipe.to_list()}, tokenizer=bundle[1])
    assert perplexity(lowbit.load(tmp_path / "w4"), bundle[2], seqlen=SEQLEN) == pytest.approx(ppl, rel=1e-4)


def test_gptq_w3(bundle):
    ppl, _ = _ppl(bundle, "w3-gptq")
    print(f"FP {bundle[4]:.2f}  W3 GPTQ g64 {ppl:.2f}")
    assert ppl <= 1.6 * bundle[4]


def test_gptq_w2_far_below_rtn_w2(bundle):
    gptq, _ = _ppl(bundle, "w2-gptq")
    rtn, _ = _ppl(bundle, "w2-rtn")
    print(f"FP {bundle[4]:.2f}  W2 g32: GPTQ {gptq:.1f}  RTN {rtn:.1f}")
    assert gptq * 10 <= rtn


def test_cli_end_to_end(tmp_path, capsys):
    """`lowbit quantize` on the bundled model, then `eval ppl` and `inspect` on what it wrote."""
    from lowbit.cli import main

    out = tmp_path / "w4"
    args = ["quantize", "--model", "bundled", "--recipe", "w4-rtn", "--out", str(out), "--eval-tokens", "1024", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for key in ["FP perplexity", "quantized perplexity", "bits/weight", "size on disk", "peak RSS"]:
        assert key in printed
    assert main(args) == 2  # the folder exists now: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", "ppl", str(out), "--eval-tokens", "1024", "--quiet"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "model.layers.29.mlp.down_proj" in capsys.readouterr().out
