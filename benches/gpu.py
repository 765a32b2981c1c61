#!/usr/bin/env python3
"""GPU benchmarks of lowbit's CUDA kernels beside torch fp16 on the same inputs (DESIGN.md §6; issue 7).

    python benches/gpu.py [--quick] [--no-write] [--skip-decode] [--peak-gbs 3350]

Needs a CUDA device and CuPy (``pip install 'lowbit[gpu]'``). Rows:

* **GEMV (batch 1) and skinny GEMM (batch 16)** for ``(N, K)`` = 4096×4096, 8192×8192,
  28672×8192 and 8192×28672 (out × in), fp16 activations: uniform W4 (g128, symmetric), W3 (g128),
  W2 (g64, asymmetric), ternary (per channel) and QuIP#'s E8P (2 bits) and E8P+E81B (3 bits).
  Weights are random bit patterns (every pattern is a valid code) built straight on the GPU. Each
  timing is a CUDA graph of 20 calls replayed 20 times (so Python launch overhead is excluded for
  both sides), CUDA events, the median of 5. Columns: time per call, effective GB/s (every byte
  the call must move: codes, scales, zeros, x, y), % of the GPU's memory bandwidth, and the
  speed-up over ``torch.nn.functional.linear`` with the fp16 weight on the same input. Every kernel
  is first checked against the dense weight it encodes (max relative error printed).
* **FWHT**: ``lowbit.kernels.hadamard.fwht`` on 8,192 rows of n = 1024 … 8192 (and 11008 = 172·64,
  28672 = 28·1024), fp16, against a plain device copy of the same tensor (``y.copy_(x)``).
* **Decode**: greedy tokens/s of the bundled SmolLM2-135M, batch 1, 128 new tokens after a
  64-token prompt, fp16 against w4-rtn and w2-rtn (``--quip``: also w2-quip without fine-tuning),
  eager and with the one-token step captured in a CUDA graph (static KV cache).

Writes ``benches/results/<date>-gpu.{json,md}`` (with the GPU's name) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672)]
#: (label, kind, container bits, group size, symmetric) for uniform; ("e8p", stage2) for VQ
FORMATS: list[tuple[str, str, Any, Any, Any]] = [
    ("W4 g128", "uniform", 4, 128, True),
    ("W3 g128", "uniform", 3, 128, True),
    ("W2 g64 asym", "uniform", 2, 64, False),
    ("ternary", "uniform", 2, None, True),
    ("E8P 2-bit", "vq", None, None, None),
    ("E8P+E81B 3-bit", "vq", "e81b", None, None),
]
PEAK_GBS = {"H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str, override: Optional[float]) -> float:
    if override:
        return override
    for key, v in PEAK_GBS.items():  # most specific first
        if key in name:
            return v
    return float("nan")


def capture(fn: Callable[[], Any], calls: int = 1, warmup: int = 3) -> tuple[Any, Any]:
    """``(graph, output of the last call)``: ``fn`` run ``warmup`` times on a side stream (kernels
    compiled, caches filled), then ``calls`` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    return g, out


def time_graph(fn: Callable[[], Any], calls: int = 20, replays: int = 20, repeats: int = 5) -> float:
    """Seconds per ``fn()`` call: ``calls`` calls captured in one CUDA graph, replayed."""
    g, _ = capture(fn, calls)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (replays * calls))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# matmul rows


def make_weight(fmt: tuple, n: int, k: int, device: str) -> tuple[Any, int]:
    """A random GPU-layout weight of ``fmt`` and the bytes one call reads for it."""
    from lowbit.kernels import uniform as ku
    from lowbit.kernels import vq as kvq

    label, kind, a, gs, sym = fmt
    gen = torch.Generator(device=device).manual_seed(0)
    if kind == "uniform":
        cb = a
        gs = gs or k
        words_per_row = ku._words_per_chunk(cb) * -(-k // ku._chunk_codes(cb))
        words = torch.randint(-(2**31), 2**31 - 1, (n, words_per_row), generator=gen, device=device, dtype=torch.int32)
        if label == "ternary":  # codes 0..2: clear the high bit of every 2-bit field where both are set
            words = words & ~((words >> 1) & words & 0x55555555)
        g = -(-k // gs)
        scales = (torch.rand(n, g, generator=gen, device=device) * 0.02 + 0.001).half()
        zeros = None if sym else torch.randint(0, 1 << cb, (n, g), generator=gen, device=device).half()
        zc = 1.0 if label == "ternary" else float(1 << (cb - 1))
        w = ku.UniformGPUWeight(cb, words, scales, zeros, zc, gs, None, None, k, n)
        nbytes = words.numel() * 4 + scales.numel() * 2 + (0 if zeros is None else zeros.numel() * 2)
        return w, nbytes
    stage2 = a
    cpr = -(-(k // 8) // 8) * 8
    c0 = torch.randint(-(2**15), 2**15 - 1, (n, cpr), generator=gen, device=device, dtype=torch.int16)
    c1 = None
    if stage2 == "e81b":
        c1 = torch.randint(0, 256, (n, cpr), generator=gen, device=device, dtype=torch.uint8)
    abs_tab, e81b = kvq.e8p_tables()
    rs = (torch.rand(n, generator=gen, device=device) * 0.02 + 0.01).half()
    w = kvq.E8PGPUWeight(c0, c1, stage2, 1.0, 1 / 2.04 if stage2 else 0.0, rs, torch.from_numpy(abs_tab).to(device),
                         torch.from_numpy(e81b).to(device), k, n)
    nbytes = c0.numel() * 2 + (0 if c1 is None else c1.numel()) + rs.numel() * 2
    return w, nbytes


def matmul_rows(batches: list[int], shapes: list[tuple[int, int]], peak: float) -> list[dict]:
    from lowbit.kernels.uniform import UniformGPUWeight, uniform_matmul
    from lowbit.kernels.vq import vq_matmul

    rows = []
    for n, k in shapes:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.float16)
            t16 = time_graph(lambda: F.linear(x, w16))
            bytes16 = n * k * 2 + (b * k + b * n) * 2
            rows.append(dict(op="fp16 linear (torch)", n=n, k=k, batch=b, us=t16 * 1e6, gbs=bytes16 / t16 / 1e9,
                             pct=100 * bytes16 / t16 / 1e9 / peak, speedup=1.0, err=0.0))
            for fmt in FORMATS:
                w, wbytes = make_weight(fmt, n, k, "cuda")
                is_vq = not isinstance(w, UniformGPUWeight)
                fn = (lambda: vq_matmul(x, w)) if is_vq else (lambda: uniform_matmul(x, w))
                dense = w.dequantize_rotated() if is_vq else w.dequantize()
                ref = F.linear(x.float(), dense)
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                del dense, ref
                t = time_graph(fn)
                nbytes = wbytes + (b * k + b * n) * 2
                rows.append(dict(op=fmt[0], n=n, k=k, batch=b, us=t * 1e6, gbs=nbytes / t / 1e9,
                                 pct=100 * nbytes / t / 1e9 / peak, speedup=t16 / t, err=err))
        del w16
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# FWHT rows


def fwht_rows(sizes: list[int], rows_n: int) -> list[dict]:
    from lowbit.kernels.hadamard import fwht

    import lowbit

    out = []
    for n in sizes:
        x = torch.randn(rows_n, n, device="cuda", dtype=torch.float16)
        y = torch.empty_like(x)
        ref = torch.from_numpy(np.asarray(lowbit.hadamard(x[:4].float().cpu().numpy())))
        err = (fwht(x[:4]).float().cpu() - ref).abs().max().item()
        t_copy = time_graph(lambda: y.copy_(x))
        t_fwht = time_graph(lambda: fwht(x, out=y))
        nbytes = 2 * x.numel() * 2
        out.append(dict(n=n, rows=rows_n, us=t_fwht * 1e6, copy_us=t_copy * 1e6, ratio=t_fwht / t_copy,
                        gbs=nbytes / t_fwht / 1e9, err=err))
    return out


# ----------------------------------------------------------------------------------------------
# decode


def decode_rate(model: Any, prompt: torch.Tensor, n_new: int, graph: bool) -> float:
    """Greedy tokens/s of ``model`` (batch 1) over ``n_new`` tokens after ``prompt`` (``(1, L)``),
    with a static KV cache; ``graph``: the one-token step replayed from a CUDA graph."""
    from transformers import StaticCache

    dev = prompt.device
    L = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=L + n_new + 8)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, cache_position=torch.arange(L, device=dev), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([L], device=dev)
        static_tok, static_pos = tok.clone(), pos.clone()

        def step() -> torch.Tensor:
            return model(static_tok, past_key_values=cache, cache_position=static_pos, use_cache=True).logits

        if graph:
            g, logits = capture(step, warmup=2)
            run = g.replay
        else:
            logits = None
            run = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n_new):
            static_pos.fill_(L + i)
            if graph:
                run()  # type: ignore[misc]
                nxt = logits[:, -1:].argmax(-1)  # type: ignore[index]
            else:
                nxt = step()[:, -1:].argmax(-1)
            static_tok.copy_(nxt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n_new / (time.perf_counter() - t0)


def decode_rows(presets: list[str], n_new: int, device: str = "cuda") -> list[dict]:
    import lowbit
    from lowbit import data
    from lowbit.models import load_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model, tok = load_model("bundled")
    prompt = data.evaluation(tok, n_tokens=64).to(device)  # (1, 64)
    rows = []
    for preset in ["fp16"] + presets:
        if preset == "fp16":
            m, _ = load_model("bundled")
        else:
            m, _ = load_model("bundled")
            name, *parts = preset.split("+")
            overrides = {k: int(v) for k, _, v in (p.partition("=") for p in parts)}
            kw: dict[str, Any] = {}
            if "quip" in name or "gptq" in name:
                kw["calib"] = data.calibration(tok, n=16, seqlen=256, seed=0)
            m = lowbit.quantize(m, lowbit.recipe.resolve(name, **overrides), **kw)
        m = m.to(device=device, dtype=dtype).eval()
        for graph in ([False, True] if device == "cuda" else [False]):
            try:
                rate = decode_rate(m, prompt, n_new, graph)
                rows.append(dict(model=preset, graph=graph, tok_s=rate, error=None))
            except Exception as e:  # noqa: BLE001 - report, keep going
                rows.append(dict(model=preset, graph=graph, tok_s=float("nan"), error=f"{type(e).__name__}: {e}"))
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------


def markdown(info: dict, mm: list[dict], fw: list[dict], dec: list[dict]) -> str:
    lines = [f"# GPU kernels — {info['gpu']} — {info['date']}", "",
             f"torch {info['torch']}, CuPy {info['cupy']}, CUDA {info['cuda']}; memory bandwidth taken as "
             f"{info['peak_gbs']:.0f} GB/s. Times: CUDA graph of 20 calls, median of 5.", ""]
    if mm:
        lines += ["## Matmul (fp16 activations)", "",
                  "| N×K (out×in) | batch | format | µs | GB/s | % of bandwidth | × fp16 | max rel. err |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mm:
            lines.append(f"| {r['n']}×{r['k']} | {r['batch']} | {r['op']} | {r['us']:.1f} | {r['gbs']:.0f} | "
                         f"{r['pct']:.0f} % | {r['speedup']:.2f} | {r['err']:.1e} |")
        lines.append("")
    if fw:
        lines += ["## FWHT (fp16)", "", "| n | rows | fwht µs | copy µs | fwht / copy | GB/s | max abs err |",
                  "|---|---|---|---|---|---|---|"]
        for r in fw:
            lines.append(f"| {r['n']} | {r['rows']} | {r['us']:.1f} | {r['copy_us']:.1f} | {r['ratio']:.2f} | "
                         f"{r['gbs']:.0f} | {r['err']:.1e} |")
        lines.append("")
    if dec:
        lines += ["## Decode, SmolLM2-135M, batch 1", "", "| model | CUDA graph | tokens/s | note |", "|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['model']} | {'yes' if r['graph'] else 'no'} | {r['tok_s']:.1f} | {r['error'] or ''} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, two FWHT sizes, 32 decode tokens")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--skip-fwht", action="store_true")
    ap.add_argument("--quip", action="store_true", help="also decode with w2-quip (no fine-tuning)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth of the GPU in GB/s")
    ap.add_argument("--decode-device", default="cuda", help="cpu: only check the decode loop (no kernels)")
    ap.add_argument("--json-out", default=None, help="also write the raw rows as JSON here")
    args = ap.parse_args(argv)

    presets = ["w4-rtn", "w2-rtn"] + (["w2-quip+finetune_steps=0+e2e_steps=0"] if args.quip else [])
    if args.decode_device == "cpu":
        for r in decode_rows(presets[:1], 8, device="cpu"):
            print(r)
        return 0
    if not torch.cuda.is_available():
        print("benches/gpu.py needs a CUDA device (and CuPy: pip install 'lowbit[gpu]')", file=sys.stderr)
        return 2
    from lowbit.kernels import cuda_ready

    if not cuda_ready():
        print("CuPy is not installed: pip install 'lowbit[gpu]'", file=sys.stderr)
        return 2
    import cupy

    name = torch.cuda.get_device_name()
    info = dict(gpu=name, date=dt.date.today().isoformat(), torch=torch.__version__, cupy=cupy.__version__,
                cuda=torch.version.cuda, peak_gbs=peak_bandwidth(name, args.peak_gbs))
    shapes = SHAPES[:2] if args.quick else SHAPES
    mm = [] if args.skip_matmul else matmul_rows([1, 16], shapes, info["peak_gbs"])
    sizes = [1024, 8192] if args.quick else [1024, 2048, 4096, 8192, 11008, 28672]
    fw = [] if args.skip_fwht else fwht_rows(sizes, 8192)
    dec = [] if args.skip_decode else decode_rows(presets, 32 if args.quick else 128)
    md = markdown(info, mm, fw, dec)
    print(md)
    if args.json_out:
        import json

        Path(args.json_out).write_text(json.dumps(dict(info=info, matmul=mm, fwht=fw, decode=dec), indent=2))
    if not args.no_write:
        from _results import write_results

        stem = write_results("gpu", dict(info=info, matmul=mm, fwht=fw, decode=dec), md)
        print(f"\nwritten: {stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
