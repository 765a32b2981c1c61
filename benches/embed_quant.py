"""What 8/6/4-bit per-row embeddings and head cost and save on top of W4 GPTQ (bundled SmolLM2-135M).

    python benches/embed_quant.py [--calib-samples 16] [--eval-tokens 4096] [--threads 2] [--out PATH]

Rows: the full-precision model (its source on disk: the bundled Q4_1 GGUF), ``w4-gptq`` (the
embeddings and tied head stored dense, fp16) and ``w4-gptq`` + ``EmbedQuant(8 / 6 / 4)`` (per-row
RTN with the MSE clip search, tied head kept tied). Every recipe runs in full (GPTQ included) on a
copy of the model, is saved with its tokenizer to a temporary folder (size on disk: every file
``lowbit.save`` writes, and ``model.safetensors`` alone) and evaluated on both splits, in-domain
(tragedies) and out-of-domain (news), FP measured in the same run. Calibration: the built-in mix,
passes in bfloat16 where the CPU has it natively (as the CLI does). Writes
``benches/results/<date>-embed-quant.{json,md}``, or only the markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _bundled import setup
from _results import write_results


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,6,4", help="EmbedQuant widths to measure")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import lowbit
    from lowbit import data
    from lowbit.driver import fast_calib_dtype
    from lowbit.eval import perplexity
    from lowbit.models.loader import gguf_path
    from lowbit.nn.layer_formats import stored_layer_classes
    from lowbit.recipe import EmbedQuant, Recipe, resolve

    b = setup(args.threads, args.eval_tokens, args.calib_samples, args.seqlen)
    model, tok, ids, calib, fp = b.model, b.tok, b.ids, b.calib, b.fp
    splits = data.EVAL_SPLITS
    src = gguf_path().stat().st_size
    rows = [("full precision (its source: the bundled Q4_1 GGUF)", fp, f"{_mib(src)} (GGUF)", "-", "-", "-")]
    print(f"FP  in-domain {fp['in-domain']:.3f}  out-of-domain {fp['out-of-domain']:.3f}", flush=True)

    base = resolve("w4-gptq")
    recipes = [("w4-gptq (embeddings/head fp16)", base)]
    for b in (int(x) for x in args.bits.split(",")):
        recipes.append((f"w4-gptq + EmbedQuant({b})", Recipe(base.steps + (EmbedQuant(b),), f"w4-gptq-e{b}")))
    for label, recipe in recipes:
        q = copy.deepcopy(model)
        t = time.perf_counter()
        lowbit.quantize(q, recipe, calib, progress=False, calib_dtype=fast_calib_dtype())
        secs = time.perf_counter() - t
        vocab = " / ".join(
            f"{m.bits_per_weight():.3f}" for m in q.modules() if isinstance(m, stored_layer_classes("vocab"))
        ) or "16 (fp16)"
        with tempfile.TemporaryDirectory() as d:
            out = lowbit.save(q, Path(d) / "ck", tokenizer=tok)
            total = sum(f.stat().st_size for f in out.iterdir())
            weights = (out / "model.safetensors").stat().st_size
        for m in q.modules():  # evaluate on the dense weights (speed, not numerics: the same values)
            if isinstance(m, stored_layer_classes(None)):
                m.cache_dequantized = True
        ppl = {sp: perplexity(q, ids[sp], seqlen=args.seqlen) for sp in splits}
        rows.append((label, ppl, _mib(total), _mib(weights), vocab, f"{secs:.0f} s"))
        print(f"{label:34s} in-domain {ppl['in-domain']:.3f} ({ppl['in-domain'] / fp['in-domain']:.4f}×)  "
              f"out-of-domain {ppl['out-of-domain']:.3f} ({ppl['out-of-domain'] / fp['out-of-domain']:.4f}×)  "
              f"{_mib(total)} on disk ({_mib(weights)} weights)  {secs:.0f} s", flush=True)
        del q

    head = (f"SmolLM2-135M-Instruct (bundled), first {args.eval_tokens} tokens of each evaluation split "
            f"(in-domain: tragedies; out-of-domain: news), seqlen {args.seqlen}, {args.calib_samples}×{args.seqlen} "
            f"calibration tokens from the built-in mix, calibration passes in "
            f"{'bfloat16' if fast_calib_dtype() is not None else 'float32'}, {args.threads} threads. Size on disk: "
            "every file `lowbit.save` writes (config, tokenizer, manifest, weights), and `model.safetensors` alone; "
            "the unquantized tensors (norms; the embeddings/head where not quantized) stored fp16. The embedding "
            "matrix (49152 × 576) is tied to the head: quantized once, stored once.")
    md = [head, "",
          "| model | ppl in-domain | × FP | ppl out-of-domain | × FP | size on disk | model.safetensors "
          "| embeddings / head bits per weight (incl. scales) | quantization time |",
          "|---|---|---|---|---|---|---|---|---|"]
    for label, ppl, total, weights, vocab, secs in rows:
        md.append(f"| {label} | {ppl['in-domain']:.3f} | {ppl['in-domain'] / fp['in-domain']:.4f} "
                  f"| {ppl['out-of-domain']:.3f} | {ppl['out-of-domain'] / fp['out-of-domain']:.4f} "
                  f"| {total} | {weights} | {vocab} | {secs} |")
    text = "\n".join(md)
    print(text)
    data_rows = [{"model": label, "ppl": ppl, "size_on_disk": total, "model_safetensors": weights, "vocab_bits": vocab, "seconds": secs}
                 for label, ppl, total, weights, vocab, secs in rows]
    if args.out is None:
        write_results("embed-quant", {"settings": vars(args), "rows": data_rows}, text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
