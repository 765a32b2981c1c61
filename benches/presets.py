"""Every preset on the bundled SmolLM2-135M: perplexity, bits/weight, KV bytes/token, quantization time.

    python benches/presets.py [--presets w4-gptq,w3-gptq] [--calib-samples 128] [--eval-tokens 16384]
    python benches/presets.py --tag w4a4kv4 --presets w4a4kv4-norot,w4a4kv4-quarot,w4a4kv4-spinquant,kv4-kvquant,kv2-kvquant,kv4-uniform,kv2-uniform
    python benches/presets.py --tag vq --presets w2-gptq,w2-quip,w2-rsavq,w3-gptq+group_size=none+sym=true,w3-quip

A preset may carry overrides of its weight step as ``+field=value`` (``none``, ``true``/``false``,
numbers), e.g. ``w4-gptq+group_size=none`` for per-channel GPTQ at about 4 bits, and of another
step as ``+kind.field=value``, e.g. ``kv2-akvq+kv.salient_frac=0.02``, and of a weight method's
own options as ``+opt.name=value``, e.g. ``w3-tesseraq+opt.init=gptq`` (another step's method's as
``+kind.opt.name=value``, e.g. ``w2-gptq-rilq+lowrank.opt.lr=0.001``). ``--rss`` adds each
preset's peak resident memory.

    python benches/presets.py --tag blockrecon-w3 --calib-samples 32 --eval-tokens 8192 --rss \
        --presets w3-rtn,w3-gptq,w3-omniquant,w3-tesseraq+opt.init=gptq,w3-tesseraq

Both evaluation splits, side by side: in-domain (Shakespeare's tragedies, Hamlet first) and
out-of-domain (news), FP measured in the same run. Calibration: the built-in multi-domain mix
(``--calib-parts`` picks parts, ``--calib-data PATH`` takes your own text), passes in bfloat16 where
the CPU has it natively (as the CLI does). Writes
``benches/results/<date>-presets[-TAG].{json,md}``. The KV column is the bytes the packed cache
(:class:`lowbit.kv.cache.QuantizedKVCache`) really holds per token after a 512-token prefill,
beside the fp16 cache's.
"""

from __future__ import annotations

import argparse
import copy
import time

from _bundled import setup
from _results import write_results


def _parse_value(v: str):
    low = v.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _recipe(spec: str):
    """``preset+field=value+…`` → (preset name, {step kind: overrides}): ``field`` changes the weight
    step, ``kv.field`` (or ``rotation.``, ``activation.``, ``embedding.``) that step."""
    name, *parts = spec.split("+")
    overrides: dict = {}
    for p in parts:
        key, _, value = p.partition("=")
        kind, _, field = key.rpartition(".")
        if kind == "opt" or kind.endswith(".opt"):  # a method's own option (weight step's, or ``lowrank.opt.``)
            step = "weight" if kind == "opt" else kind[: -len(".opt")]
            overrides.setdefault(step, {}).setdefault("options", {})[field] = _parse_value(value)
            continue
        overrides.setdefault(kind or "weight", {})[field] = _parse_value(value)
    return name, overrides


def _apply(recipe, overrides: dict, label: str):
    """``recipe`` with each step's fields replaced (an explicit None, e.g. per-channel, reaches the
    step: ``resolve(**kw)`` would drop it)."""
    from dataclasses import replace

    import lowbit

    overrides, steps = dict(overrides), []
    for s in recipe.steps:
        if s.step in overrides:
            change = overrides.pop(s.step)
            if "options" in change:  # merged with the preset's own options
                change["options"] = {**(getattr(s, "options", None) or {}), **change["options"]}
            s = replace(s, **change)
        steps.append(s)
    if overrides:
        raise SystemExit(f"--presets {label}: the recipe has no {', '.join(overrides)} step to change")
    return lowbit.Recipe(tuple(steps), label)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux: ``5`` into ``/proc/self/clear_refs``);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset (``VmHWM``), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="w8-rtn,w4-rtn,w3-rtn,w2-rtn,w4-gptq,w4-ldlq,w3-gptq,w2-gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-parts", default=None, help="comma-separated calibration parts (default: the whole mix)")
    ap.add_argument("--calib-data", default=None, help="a text file, folder or JSONL to calibrate on instead")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rss", action="store_true",
                    help="report each preset's peak resident memory (Linux: the peak is reset before each one)")
    args = ap.parse_args()

    import torch

    import lowbit
    from lowbit import data
    from lowbit.driver import fast_calib_dtype
    from lowbit.eval import perplexity
    from lowbit.nn import QUANT_LINEARS

    parts = args.calib_parts.split(",") if args.calib_parts else None
    b = setup(args.threads, args.eval_tokens, args.calib_samples, args.seqlen, parts=parts, source=args.calib_data)
    model, ids, calib, fp = b.model, b.ids, b.calib, b.fp
    splits = data.EVAL_SPLITS
    rows = [{"preset": "fp32", "ppl": fp, "ratio": {sp: 1.0 for sp in splits}, "bits": 32.0, "act": "-", "kv": "-", "seconds": 0.0}]
    def run(name: str) -> dict:
        q = copy.deepcopy(model)
        t = time.perf_counter()
        preset, overrides = _recipe(name)
        recipe = lowbit.recipe.resolve(preset)
        if overrides:
            recipe = _apply(recipe, overrides, name)
        lowbit.quantize(q, recipe, calib, progress=False, calib_dtype=fast_calib_dtype())
        secs = time.perf_counter() - t
        for m in q.modules():  # evaluate on the dense weights, as `lowbit eval` does (speed, not numerics)
            if isinstance(m, QUANT_LINEARS):
                m.cache_dequantized = True
        ppl = {sp: perplexity(q, ids[sp], seqlen=args.seqlen) for sp in splits}
        bits = n = 0
        for m in q.modules():
            if isinstance(m, QUANT_LINEARS):
                k = m.in_features * m.out_features
                bits += m.bits_per_weight() * k
                n += k
        recipe = q.lowbit_recipe
        act = f"A{recipe.activation.bits}" if recipe.activation is not None else "fp32"
        kv = "fp32"
        if recipe.kv is not None:
            from lowbit.kv.cache import QuantizedKVCache

            cache = QuantizedKVCache(q)
            with torch.no_grad():
                q(ids["in-domain"][:, : args.seqlen], cache=cache, use_cache=True)
            kv = f"{cache.kv_bytes_per_token():.0f} B vs {cache.fp16_bytes_per_token():.0f} B fp16"
        wbits = bits / n if n else 32.0
        ratio = {sp: ppl[sp] / fp[sp] for sp in splits}
        return {"preset": name, "ppl": ppl, "ratio": ratio, "bits": wbits, "act": act, "kv": kv, "seconds": secs}

    def table() -> str:
        source = args.calib_data or ("parts " + args.calib_parts if args.calib_parts else "the built-in mix")
        head = (f"SmolLM2-135M-Instruct, first {args.eval_tokens} tokens of each evaluation split (in-domain: tragedies; "
                f"out-of-domain: news), seqlen {args.seqlen}, {args.calib_samples}×{args.seqlen} calibration tokens from "
                f"{source}, {args.threads} threads")
        md = [head, "", "| preset | ppl in-domain | × FP | ppl out-of-domain | × FP | bits/weight (linears, incl. scales) "
              "| activations | KV cache per token | quantization time |" + (" peak RSS |" if args.rss else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.rss else "")]
        md += [f"| {r['preset']} | {r['ppl']['in-domain']:.2f} | {r['ratio']['in-domain']:.3f} | {r['ppl']['out-of-domain']:.2f} "
               f"| {r['ratio']['out-of-domain']:.3f} | {r['bits']:.3f} | {r['act']} | {r['kv']} | {r['seconds']:.1f} s |"
               + (f" {r['peak_rss_gib']:.2f} GiB |" if "peak_rss_gib" in r else (" - |" if args.rss else "")) for r in rows]
        return "\n".join(md)

    def write() -> None:  # after every preset, so that a long run stopped early keeps what it measured
        if not args.no_write:
            write_results(f"presets{'-' + args.tag if args.tag else ''}", {"settings": vars(args), "rows": rows}, table())

    for name in args.presets.split(","):
        measure = args.rss and _reset_peak_rss()
        row = run(name)
        if measure:
            row["peak_rss_gib"] = _peak_rss_gib()
        rows.append(row)
        rss = f"  peak RSS {row['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in row else ""
        print(f"{name:18s} in-domain ppl {row['ppl']['in-domain']:9.2f} ×FP {row['ratio']['in-domain']:7.3f}  "
              f"out-of-domain ppl {row['ppl']['out-of-domain']:9.2f} ×FP {row['ratio']['out-of-domain']:7.3f}  "
              f"bits/w {row['bits']:.3f}  {row['act']}  KV {row['kv']}  {row['seconds']:6.1f} s{rss}", flush=True)
        write()

    print(table())
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
