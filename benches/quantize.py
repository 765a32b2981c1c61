"""Whole-model quantization benchmark: W4 GPTQ of the bundled SmolLM2-135M on this machine.

    python benches/quantize.py [--recipe w4-gptq] [--calib-samples 128] [--seqlen 512] [--threads 2]

Prints the per-stage times (load, capture, Hessians, quantize, outputs), the total, and the peak
RSS of the process, and writes ``benches/results/<date>-quantize-<recipe>.{json,md}``. Targets
(issue 4): total quantization ≤ 2 minutes and peak RSS ≤ 2 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

from _results import write_results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w4-gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import lowbit
    from lowbit import data
    from lowbit.models import load_model

    torch.set_num_threads(args.threads)
    lowbit.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model("bundled")
    t_load = time.perf_counter() - t0
    calib = data.calibration(tok, n=args.calib_samples, seqlen=args.seqlen, seed=0)
    t1 = time.perf_counter()
    from lowbit.driver import fast_calib_dtype

    calib_dtype = fast_calib_dtype() if args.calib_dtype == "auto" else getattr(torch, args.calib_dtype)
    lowbit.quantize(model, args.recipe, calib, progress=False, calib_dtype=calib_dtype)
    total = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stages = dict(model.lowbit_report.stage_seconds)

    rows = [("stage", "seconds"), ("load model (cached)", f"{t_load:.1f}")]
    rows += [(k, f"{v:.1f}") for k, v in stages.items()]
    rows += [("total quantization", f"{total:.1f}"), ("peak RSS", f"{rss / 2**30:.2f} GiB")]
    targets = {
        "total ≤ 120 s": total <= 120,
        "peak RSS ≤ 2 GiB": rss <= 2 * 2**30,
    }
    w = max(len(r[0]) for r in rows)
    head = (
        f"{args.recipe} on SmolLM2-135M, {args.calib_samples}×{args.seqlen} calibration tokens, "
        f"{args.threads} threads, calibration passes in {calib_dtype or 'float32'}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    lines = [head, ""] + [f"{a.ljust(w)}  {b.rjust(8)}" for a, b in rows] + [""]
    lines += [f"{k}: {'pass' if ok else 'short'}" for k, ok in targets.items()]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(f"quantize-{args.recipe}", {
            "recipe": args.recipe, "calib_samples": args.calib_samples, "seqlen": args.seqlen,
            "threads": args.threads, "load_seconds": t_load, "stage_seconds": stages,
            "total_seconds": total, "peak_rss_bytes": rss, "targets": targets,
        }, "```\n" + text + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
