"""2-bit KV caches on the bundled SmolLM2-135M: perplexity beside the bytes each token costs.

    python benches/kv.py [--rows kv2-uniform,kv2-kvquant,akvq-paper,kv2-akvq] [--eval-tokens 4096]

Rows: ``kv2-uniform`` (per-token 2-bit, the data-free baseline), ``kv2-kvquant`` (the peer AKVQ is
held to: issue 15 asks for its perplexity +10 % at no more than +10 % bytes), AKVQ-VL as the paper
describes it (``akvq-paper``: Hadamard, one set of 2 % salient tokens in fp16 for all heads,
min–max per-token grid) and without its salient tokens (``akvq-paper-nosal``: the Hadamard
alone), the ``kv2-akvq`` preset (lowbit's choices, see ``lowbit/kv/akvq.py``) with and without
salient tokens, and the preset with each of its choices undone in turn: ``-fp16rows`` (2 % salient
rows in fp16, about the same bytes), ``-perhead``, ``-keygroup``, ``-mse``, ``-smooth``, and
``-alpha0.5`` (keys divided by the square root of their spread instead). Perplexity on the
out-of-domain split (news; ``--split`` for the other), FP measured in the same run; bytes per
token are what the packed cache (:class:`lowbit.kv.cache.QuantizedKVCache`) holds after one
512-token prefill (sink rows included), beside the method's own expectation for a long sequence.
Writes ``benches/results/<date>-kv.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import time

from _bundled import setup
from _results import write_results

PAPER = {"salient_bits": 16, "salient_per_head": False, "key_group_size": 64, "mse_clip": False, "key_smoothing": None}
#: row name → (method, step fields, akvq options)
ROWS = {
    "kv2-uniform": ("uniform", {}, None),
    "kv2-kvquant": ("kvquant", {}, None),
    "akvq-paper": ("akvq", {"salient_frac": 0.02}, PAPER),
    "akvq-paper-nosal": ("akvq", {"salient_frac": 0.0}, PAPER),
    "kv2-akvq": ("akvq", {}, None),
    "kv2-akvq-nosal": ("akvq", {"salient_frac": 0.0}, None),
    "kv2-akvq-fp16rows": ("akvq", {"salient_frac": 0.02}, {"salient_bits": 16}),
    "kv2-akvq-perhead": ("akvq", {}, {"salient_per_head": False}),
    "kv2-akvq-keygroup": ("akvq", {}, {"key_group_size": 64}),
    "kv2-akvq-mse": ("akvq", {}, {"mse_clip": False}),
    "kv2-akvq-smooth": ("akvq", {}, {"key_smoothing": None}),
    "kv2-akvq-alpha0.5": ("akvq", {}, {"key_smoothing": 0.5}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--split", default="out-of-domain")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")

    import torch

    import lowbit
    from lowbit.eval import perplexity
    from lowbit.kv.cache import QuantizedKVCache, kv_bytes_report
    from lowbit.recipe import KVQuant

    b = setup(args.threads, args.eval_tokens, args.calib_samples, args.seqlen)
    ids, fp = b.ids[args.split], b.fp[args.split]
    rows = [{"row": "fp16 cache", "ppl": fp, "ratio": 1.0, "bytes": None, "expected": None, "seconds": 0.0}]
    print(f"FP {fp:.2f}", flush=True)
    for name in names:
        method, fields, options = ROWS[name]
        step = KVQuant(2, method, **fields, **({"options": options} if options else {}))
        t = time.perf_counter()
        q = lowbit.quantize(copy.deepcopy(b.model), [step], b.calib, progress=False)
        ppl = perplexity(q, ids, seqlen=args.seqlen)
        secs = time.perf_counter() - t
        cache = QuantizedKVCache(q)
        with torch.no_grad():
            q(ids[:, : args.seqlen], cache=cache, use_cache=True)
        row = {"row": name, "step": step.to_dict(), "ppl": ppl, "ratio": ppl / fp, "bytes": cache.kv_bytes_per_token(),
               "fp16_bytes": cache.fp16_bytes_per_token(), "expected": kv_bytes_report(q)["kv_bytes_per_token"], "seconds": secs}
        rows.append(row)
        print(f"{name:20s} ppl {ppl:9.2f} ×FP {row['ratio']:7.3f}  {row['bytes']:7.0f} B/token (expected {row['expected']:.0f}, "
              f"fp16 {row['fp16_bytes']})  {secs:5.0f} s", flush=True)
        del q

    ref = next((r for r in rows if r["row"] == "kv2-kvquant"), None)
    head = (f"SmolLM2-135M-Instruct, first {args.eval_tokens} tokens of the {args.split} split, seqlen {args.seqlen}, "
            f"{args.calib_samples}×{args.seqlen} calibration tokens from the built-in mix, {args.threads} threads. "
            "Bytes: the packed cache after one prefill (sinks included) and the method's expectation per token.")
    md = [head, "", "| KV cache (2 bits) | ppl | × FP | × kv2-kvquant | bytes/token | × kv2-kvquant bytes | expected bytes/token |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / ref['ppl']:.3f}" if ref else "-"
        if r["bytes"] is None:
            md.append(f"| {r['row']} | {r['ppl']:.2f} | 1.000 | {rel} | fp16 | - | - |")
            continue
        relb = f"{r['bytes'] / ref['bytes']:.3f}" if ref else "-"
        md.append(f"| {r['row']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {rel} | {r['bytes']:.0f} | {relb} | {r['expected']:.0f} |")
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_results("kv", {"settings": vars(args), "rows": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
