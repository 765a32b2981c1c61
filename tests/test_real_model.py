"""Quality on the real model: SmolLM2-135M-Instruct (bundled GGUF), measured out of domain.

The `bundle` fixture (conftest) holds the model, 4096 tokens of the out-of-domain split (news, a
domain the calibration mix does not contain), 16×512 calibration tokens from the built-in mix, and
the FP perplexity, measured in the same run. Bounds, re-measured on this reduced set (the
full-scale numbers, 128 calibration sequences and 16,384 tokens of both splits, are in
benches/results and the README): out of domain GPTQ W4 g64 measured 1.252× FP (RTN 1.287×), GPTQ W3
g64 2.194× (RTN 2.936×), GPTQ W2 g32 457.3 against RTN's 8662 (true-sequential, 2026-12-02; with
32 calibration sequences and without true-sequential: 1.234×, 2.064×, 442.7). The tests ask for
W4 ≤ 1.27×, W3 ≤ 2.3×, each below its data-free counterpart RTN (the same grid, with the MSE clip
search) by a set share of RTN's excess perplexity, and W2 at least 10× below RTN W2. They are short of the issue's
targets (W4 ≤ 1.10×, W3 ≤ 1.45× out of domain at full scale): see the README's results.
"""

import copy

import pytest

import lowbit
from lowbit.driver import fast_calib_dtype
from lowbit.eval import perplexity

pytestmark = pytest.mark.slow

SEQLEN = 512  # as conftest.REAL_SEQLEN


def test_fp_perplexity_is_plausible(bundle):
    assert 10 < bundle[4] < 80


def test_gptq_w4_out_of_domain_and_below_rtn(bundle, quantized_ppl, tmp_path):
    model, tok, ids, calib, fp = bundle
    q = lowbit.quantize(copy.deepcopy(model), "w4-gptq", calib, progress=False, calib_dtype=fast_calib_dtype())
    ppl, rtn = perplexity(q, ids, seqlen=SEQLEN), quantized_ppl("w4-rtn")
    print(f"out of domain: FP {fp:.2f}  W4 g64: GPTQ {ppl:.2f} ({ppl / fp:.3f}×)  RTN {rtn:.2f} ({rtn / fp:.3f}×)")
    assert ppl <= 1.27 * fp  # measured 1.252
    assert ppl - fp <= 0.92 * (rtn - fp)  # measured 0.876: with 16 calibration sequences GPTQ removes an eighth of RTN's excess
    # The packed checkpoint reloads to the same perplexity.
    lowbit.save(q, tmp_path / "w4", quantization_config={"recipe": q.lowbit_recipe.to_list()}, tokenizer=tok)
    assert perplexity(lowbit.load(tmp_path / "w4"), ids, seqlen=SEQLEN) == pytest.approx(ppl, rel=1e-4)


def test_gptq_w3_out_of_domain_and_well_below_rtn(bundle, quantized_ppl):
    fp = bundle[4]
    ppl, rtn = quantized_ppl("w3-gptq"), quantized_ppl("w3-rtn")
    print(f"out of domain: FP {fp:.2f}  W3 g64: GPTQ {ppl:.2f} ({ppl / fp:.3f}×)  RTN {rtn:.2f} ({rtn / fp:.3f}×)")
    assert ppl <= 2.3 * fp  # measured 2.194
    assert ppl - fp <= 0.7 * (rtn - fp)  # measured 0.617


def test_gptq_w2_far_below_rtn_w2(bundle, quantized_ppl):
    gptq, rtn = quantized_ppl("w2-gptq"), quantized_ppl("w2-rtn")
    print(f"out of domain: FP {bundle[4]:.2f}  W2 g32: GPTQ {gptq:.1f}  RTN {rtn:.1f}")
    assert gptq * 10 <= rtn


def test_cli_end_to_end(tmp_path, capsys):
    """`lowbit quantize` on the bundled model, then `eval ppl` and `inspect` on what it wrote."""
    from lowbit.cli import main

    out = tmp_path / "w4"
    args = ["quantize", "--model", "bundled", "--recipe", "w4-rtn", "--out", str(out), "--eval-tokens", "1024", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for key in ["FP perplexity (in-domain)", "quantized perplexity (out-of-domain)", "bits/weight", "size on disk", "peak RSS"]:
        assert key in printed
    assert main(args) == 2  # the folder exists now: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", "ppl", str(out), "--eval-tokens", "1024", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity (in-domain)" in printed and "perplexity (out-of-domain)" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.29.mlp.down_proj" in printed and "FP perplexity (out-of-domain)" in printed


def test_the_documented_token_counts_hold(bundle):
    """The token counts lowbit.data's docstring and the README give, for the bundled tokenizer."""
    from lowbit import data

    assert data.token_counts(bundle[1]) == {
        "shakespeare": 737_380, "scripture": 228_037, "encyclopedia": 219_330, "chat": 54_898, "code": 248_879,
        "in-domain": 256_164, "out-of-domain": 75_680,
    }
