"""``lowbit`` command line: quantize, evaluate and inspect models.

    lowbit quantize --model bundled --recipe w4-gptq --out OUT_DIR
    lowbit eval ppl OUT_DIR
    lowbit inspect OUT_DIR
    lowbit presets

A user mistake (unknown recipe, unsupported model, bad bits, existing output folder, corrupt
checkpoint) prints one line ``lowbit: error: …`` and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main"]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _linear_bits(model) -> tuple[float, int, int]:
    """(bits per weight over the quantized linears, their packed bytes, their weight count)."""
    from .nn import QUANT_LINEARS

    bits = 0.0
    count = 0
    for m in model.modules():
        if isinstance(m, QUANT_LINEARS):
            n = m.in_features * m.out_features
            bits += m.bits_per_weight() * n
            count += n
    return (bits / count if count else 0.0), int(bits / 8), count


def _dense_cache(model, on: bool) -> None:
    """Keep each quantized linear's decoded weight while evaluating (speed for memory), or drop it."""
    from .nn import QUANT_LINEARS

    for m in model.modules():
        if isinstance(m, QUANT_LINEARS):
            m.cache_dequantized = on
            if not on:
                m.clear_cache()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


#: the files of a Hugging Face model folder that hold weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _source_bytes(spec) -> tuple[int, str]:
    """``(bytes, what)`` of the source model on disk: the bundled GGUF the bundled model was
    converted from, or the weight files of a Hugging Face folder."""
    if str(spec) == "bundled":
        from .models.loader import gguf_path

        path = gguf_path()
        return path.stat().st_size, path.name
    files = [f for f in Path(spec).expanduser().rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    names = ", ".join(sorted(f.name for f in files)[:3]) + (", …" if len(files) > 3 else "")
    return sum(f.stat().st_size for f in files), names or "no weight files"


def _size_on_disk(out: Path, spec) -> str:
    """The checkpoint's size on disk beside the source model's, e.g. ``57.3 MiB (source: 93.8 MiB
    SmolLM2-135M-Instruct.Q4_1.gguf; 0.61×)``."""
    ours = _dir_bytes(out)
    src, what = _source_bytes(spec)
    ratio = f"; {ours / src:.2f}×" if src else ""
    return f"{_fmt_bytes(ours)} (source: {_fmt_bytes(src)} {what}{ratio})"


def _vocab_storage(model) -> str:
    """How the embeddings and the output head are stored (per-row quantized, or dense with the dtype
    a checkpoint gives them)."""
    from .io.checkpoint import dense_storage_dtype
    from .models.adapters import get_adapter
    from .nn.quant_embedding import QuantEmbedding, QuantHead

    adapter = get_adapter(model)
    parts = []
    for what, mod in (("embeddings", adapter.embeddings(model)), ("head", adapter.lm_head(model))):
        if isinstance(mod, (QuantEmbedding, QuantHead)):
            tied = " (tied: the embeddings' codes)" if isinstance(mod, QuantHead) and mod.tied_to else ""
            parts.append(f"{what} {mod.bits}-bit per-row{tied}")
        else:
            tied = " (tied)" if what == "head" and mod.weight is getattr(adapter.embeddings(model), "weight", None) else ""
            parts.append(f"{what} {str(dense_storage_dtype(mod.weight)).removeprefix('torch.')}{tied}")
    return ", ".join(parts)


def _threads(n: Optional[int]) -> None:
    if n:
        import torch

        import lowbit

        torch.set_num_threads(n)
        lowbit.set_num_threads(n)


def _with_options(recipe: Any, pairs: list, name: str) -> Any:
    """``recipe`` with ``--option NAME=VALUE`` pairs merged into its weight step's ``options``
    (values read as JSON — numbers, true/false, null, lists — else as strings)."""
    from dataclasses import replace

    if recipe.weight is None or not hasattr(recipe.weight, "options"):
        raise _UserError(f"--option: recipe {name!r} has no weight step with method options")
    opts = dict(recipe.weight.options or {})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UserError(f"--option: expected NAME=VALUE, got {pair!r}")
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return type(recipe)(tuple(replace(s, options=opts) if s is recipe.weight else s for s in recipe.steps), recipe.name)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from . import data, eval as leval, io
    from .driver import quantize
    from .models import load_model
    from .recipe import resolve
    from dataclasses import replace

    out = Path(os.path.abspath(args.out))
    if os.path.lexists(out) and not args.overwrite:
        raise _UserError(f"--out: {out} already exists; pass --overwrite to replace it")
    _check_writable(out, args.overwrite)
    recipe = resolve(args.recipe, bits=args.bits, method=args.method, sym=args.sym)
    if args.group is not None:
        if recipe.weight is None or not hasattr(recipe.weight, "group_size"):
            raise _UserError(f"--group: recipe {args.recipe!r} has no grouped weight step (vector quantization has no groups)")
        recipe = type(recipe)(
            tuple(replace(s, group_size=args.group or None) if s is recipe.weight else s for s in recipe.steps), recipe.name
        )
    if args.option:
        recipe = _with_options(recipe, args.option, args.recipe)
    if args.calib_samples is None:  # the recipe's own pace: block-trained methods take fewer
        args.calib_samples = recipe.calib_samples
    _threads(args.threads)
    # the user's calibration text is read (and refused) before the model is loaded
    calib_docs = data.user.read_documents(args.calib_data) if args.calib_data is not None and recipe.needs_calibration else None
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    leval.check_length(model, args.seqlen, "--seqlen")
    rows = [["", "value"]]
    splits = _eval_splits(args) if not args.no_eval else ()
    eval_ids = {sp: data.evaluation(tok, n_tokens=args.eval_tokens, split=sp) for sp in splits}
    fp_ppl = {sp: leval.perplexity(model, ids, seqlen=args.seqlen, progress=not args.quiet) for sp, ids in eval_ids.items()}
    calib = None
    if recipe.needs_calibration:
        calib = data.calibration(tok, n=args.calib_samples, seqlen=args.seqlen, seed=args.seed, source=calib_docs)
    from .driver import fast_calib_dtype

    calib_dtype = {"auto": fast_calib_dtype(), "float32": None, "bfloat16": torch.bfloat16}[args.calib_dtype]
    tq = time.perf_counter()
    quantize(model, recipe, calib, progress=not args.quiet, calib_dtype=calib_dtype)
    t_quant = time.perf_counter() - tq
    report = model.lowbit_report
    q_ppl: dict = {}
    if eval_ids:
        _dense_cache(model, True)
        q_ppl = {sp: leval.perplexity(model, ids, seqlen=args.seqlen, progress=not args.quiet) for sp, ids in eval_ids.items()}
        _dense_cache(model, False)
    qconfig = {"recipe": recipe.to_list(), "recipe_name": recipe.name}
    io.save(model, out, quantization_config=qconfig, tokenizer=tok, overwrite=args.overwrite,
            report=_stats(report, fp_ppl, q_ppl, args))
    bpw, lin_bytes, _ = _linear_bits(model)
    rows += [
        ["model", str(args.model)],
        ["recipe", f"{recipe.name or 'custom'}: {recipe.describe()}"],
        ["calibration", _calib_source(args, recipe)],
        *_ppl_rows(fp_ppl, q_ppl),
        ["bits/weight (linears, incl. scales)", f"{bpw:.3f}" if bpw else "full precision"],
        ["quantized linears, packed", _fmt_bytes(lin_bytes)],
        *[[f"Hadamard {k}", v] for k, v in report.hadamards.items()],
        ["activations", recipe.activation.describe() if recipe.activation is not None else "full precision"],
        ["KV cache per token", _kv_bytes(model, tok) if recipe.kv is not None else "fp32 (not quantized)"],
        ["embeddings / head", _vocab_storage(model)],
        ["size on disk", _size_on_disk(out, args.model)],
        ["load time", f"{t_load:.1f} s"],
        ["quantization time", f"{t_quant:.1f} s"],
        *[[f"  {k}", f"{v:.1f} s"] for k, v in report.stage_seconds.items()],
        ["peak RSS", _fmt_bytes(_peak_rss_bytes())],
        ["saved to", str(out)],
    ]
    print(_table(rows))
    return 0


def _eval_splits(args: argparse.Namespace) -> tuple:
    from .data import EVAL_SPLITS

    return EVAL_SPLITS if args.eval_split == "both" else (args.eval_split,)


def _calib_source(args: argparse.Namespace, recipe) -> str:
    if not recipe.needs_calibration:
        return "none (data-free recipe)"
    from .data import CALIBRATION_MIX

    what = repr(str(args.calib_data)) if args.calib_data is not None else f"built-in mix ({', '.join(CALIBRATION_MIX)})"
    return f"{args.calib_samples}×{args.seqlen} tokens, {what}"


def _ppl_rows(fp: dict, q: dict) -> list:
    """Rows ``FP perplexity (split)``, ``quantized perplexity (split)``, ``ratio (split)`` per split."""
    if not fp:
        return [["FP perplexity", "skipped"], ["quantized perplexity", "skipped"]]
    rows = []
    for sp in fp:
        rows += [[f"FP perplexity ({sp})", f"{fp[sp]:.2f}"], [f"quantized perplexity ({sp})", f"{q[sp]:.2f}"],
                 [f"ratio ({sp})", f"{q[sp] / fp[sp]:.3f}×"]]
    return rows


def _check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written *before* the model is quantized: a parent
    that is a file, a read-only or pseudo filesystem (``/proc``), a folder without write permission,
    an existing folder that ``--overwrite`` may not replace."""
    import errno
    import tempfile

    from .io.checkpoint import check_replaceable

    if overwrite and os.path.lexists(out):
        check_replaceable(out)
    ancestor = out.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _UserError(f"--out: {str(out)!r} is under {str(ancestor)!r}, which is not a folder")
    try:  # the only reliable test (root ignores permissions, /proc refuses new entries, ro mounts)
        probe = tempfile.mkdtemp(prefix=".lowbit-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as e:
        reason = "read-only filesystem" if e.errno == errno.EROFS else (e.strerror or str(e))
        raise _UserError(f"--out: cannot write under {str(ancestor)!r} ({reason})") from None


def _kv_bytes(model, tok) -> str:
    """Bytes per token the packed KV cache holds after a 256-token prefill, beside fp16's."""
    import torch

    from . import data
    from .kv.cache import QuantizedKVCache

    ids = data.evaluation(tok, n_tokens=256)
    cache = QuantizedKVCache(model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    q, fp16 = cache.kv_bytes_per_token(), cache.fp16_bytes_per_token()
    return f"{q:.0f} B (fp16: {fp16:.0f} B, {fp16 / q:.1f}× smaller)"


def _stats(report, fp_ppl, q_ppl, args) -> dict:
    return {
        "fp_perplexity": fp_ppl or None,
        "perplexity": q_ppl or None,
        "eval_tokens": None if args.no_eval else args.eval_tokens,
        "seqlen": args.seqlen,
        "calib_samples": args.calib_samples,
        "calib_data": None if args.calib_data is None else str(args.calib_data),
        "seed": args.seed,
        "calib_dtype": args.calib_dtype,
        "stage_seconds": report.stage_seconds,
        "block_output_error": {str(k): v for k, v in report.block_output_error.items()},
        "hadamards": report.hadamards,
        "rotation_losses": report.rotation_losses,
        "layers": {s.name: s.to_dict() for s in report.layers},
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from . import data, eval as leval, io

    _threads(args.threads)
    model, tok = io.load_with_tokenizer(args.dir)
    t = time.perf_counter()
    _dense_cache(model, True)
    rows = [["", "value"], ["checkpoint", str(args.dir)]]
    for sp in _eval_splits(args):
        ids = data.evaluation(tok, n_tokens=args.eval_tokens, split=sp)
        rows.append([f"perplexity ({sp})", f"{leval.perplexity(model, ids, seqlen=args.seqlen, progress=not args.quiet):.2f}"])
    rows += [["eval tokens", f"{args.eval_tokens} per split"], ["time", f"{time.perf_counter() - t:.1f} s"]]
    print(_table(rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Validate the checkpoint exactly as :func:`lowbit.load` does (by loading it), then print its
    layers from the loaded modules and the run report (``lowbit_report.json``) where there is one."""
    import re

    from . import io
    from .nn import QUANT_LINEARS
    from .nn.lowrank import lowrank_of

    path = Path(args.dir)
    model = io.load(path)
    qc = io.read_quantization_config(path)
    report = io.read_report(path) or {}
    lstats = _obj(report.get("layers"))
    natural = lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]  # noqa: E731
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LINEARS)}
    rows = [["layer", "kind", "bits", "group", "method", "low-rank", "bits/w", "rel. weight err", "proxy loss"]]
    total_bits = total_weights = branch_bits = 0.0
    n_branches = 0
    for name in sorted(layers, key=natural):
        mod, meta = layers[name], layers[name].metadata()
        st = _obj(lstats.get(name))
        bpw = mod.bits_per_weight()
        n_w = mod.in_features * mod.out_features
        total_bits += bpw * n_w
        total_weights += n_w
        if meta.get("format") == "vq":
            kind = "vq" + (" incoherent" if meta["incoherent"] else "")
            bits = " + ".join(s["codebook"] + ("" if s["rows"] is None else f"[{s['rows']} rows]") for s in meta["stages"])
            group = f"d={meta['dim']}"
        else:
            kind, bits, group = meta["kind"], str(meta["bits"]), str(meta["group_size"])
        branch = lowrank_of(mod)
        if branch is not None:
            n_branches += 1
            branch_bits += branch.bits()
        low = "-" if branch is None else f"r{branch.rank} (+{branch.bits() / n_w:.3f} b/w)"
        rows.append([name, kind, bits, group, meta["method"], low, f"{bpw:.3f}",
                     _num(st.get("rel_weight_error"), ".4f"), _num(st.get("loss"), ".4g")])
    print(_table(rows))
    blocks = _obj(report.get("block_output_error"))
    if blocks:
        print()
        order = sorted(blocks, key=natural)
        print(_table([["decoder layer", "rel. output error"]] + [[k, _num(blocks[k], ".4f")] for k in order]))
    summary = [["", "value"], ["checkpoint", str(path)], ["recipe", str(qc.get("recipe_name") or qc.get("recipe"))],
               ["quantized linears", str(len(layers))],
               ["bits/weight (linears, incl. scales, codebooks, signs)", f"{total_bits / total_weights:.3f}" if total_weights else "-"],
               ["size on disk", _fmt_bytes(_dir_bytes(path))]]
    if n_branches:
        summary.insert(5, ["low-rank branches (fp16, counted in bits/weight)",
                           f"{n_branches} linears, {branch_bits / total_weights:.3f} bits/weight"])
    online = qc.get("online", {})
    inputs, attention = online.get("inputs", {}), online.get("attention", {})
    if inputs or attention:
        acts = {json.dumps(c.get("act"), sort_keys=True) for c in inputs.values() if c.get("act")}
        kvs = {json.dumps(c.get("kv"), sort_keys=True) for c in attention.values() if c.get("kv")}
        summary += [
            ["online Hadamard inputs (R4)", str(sum(bool(c.get("hadamard")) for c in inputs.values()))],
            ["online Hadamard q/k (R3)", str(sum(bool(c.get("rotate_qk")) for c in attention.values()))],
            ["activation quantizer", "; ".join(sorted(acts)) or "none"],
            ["KV-cache quantizer", "; ".join(sorted(kvs)) or "none"],
        ]
    for k, v in _obj(report.get("hadamards")).items():
        summary.append([f"Hadamard {k}", str(v)])
    fp, q = _obj(report.get("fp_perplexity")), _obj(report.get("perplexity"))
    for sp in fp:
        summary += [[f"FP perplexity ({sp})", _num(fp.get(sp), ".2f")], [f"perplexity ({sp})", _num(q.get(sp), ".2f")]]
    print()
    print(_table(summary))
    return 0


def _obj(v) -> dict:
    """``v`` if it is a dict, else ``{}`` (the report is informative: a malformed part is skipped)."""
    return v if isinstance(v, dict) else {}


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def cmd_presets(args: argparse.Namespace) -> int:
    from .recipe import PRESETS

    from .methods.registry import post_weight_methods, weight_methods

    print(_table([["preset", "steps", "calibration"]]
                 + [[k, r.describe(), f"{r.calib_samples} seqs" if r.needs_calibration else "none"] for k, r in PRESETS.items()]))
    rows = [[name, ", ".join(f"{k}={json.dumps(v)}" for k, v in m.options.items())] for name, m in weight_methods().items() if m.options]
    if rows:
        print("\nweight-method options (quantize --option NAME=VALUE):")
        print(_table([["method", "options (defaults)"]] + rows))
    rows = [[f"{m.kind}: {name}", ", ".join(f"{k}={json.dumps(v)}" for k, v in m.options.items())]
            for name, m in post_weight_methods().items() if m.options]
    if rows:
        print("\nother steps' method options (a recipe step's options={...}):")
        print(_table([["step: method", "options (defaults)"]] + rows))
    return 0


def _quiet_transformers(verbose: bool) -> None:
    """lowbit shows its own progress; transformers' loading bars and config warnings are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not verbose:
        hf_logging.set_verbosity_error()


class _UserError(Exception):
    pass


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line ``lowbit: error: …`` and exit 2, like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.removeprefix("lowbit").strip()
        raise _UserError(f"{where}: {message} (see `{self.prog} --help`)" if where else f"{message} (see `lowbit --help`)")


def _parser() -> argparse.ArgumentParser:
    from .recipe import DEFAULT_PRESET, weight_method_names

    p = _Parser(prog="lowbit", description="Extremely low-bit quantization of LLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save a packed checkpoint")
    q.add_argument("--model", required=True, help="'bundled' (SmolLM2-135M-Instruct) or a local HF folder")
    q.add_argument("--recipe", default=DEFAULT_PRESET, help=f"preset name (see `lowbit presets`; default {DEFAULT_PRESET})")
    q.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    q.add_argument("--bits", type=int, help="override the weight bits")
    q.add_argument("--group", type=int, help="override the group size (0 = per channel)")
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None, help="symmetric grid")
    q.add_argument("--method", choices=weight_method_names("grid"), help="override the weight method")
    q.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a weight method's own option, e.g. --option epochs=8 for omniquant (repeatable; see `lowbit presets`)")
    q.add_argument("--calib-samples", type=_positive_int, default=None,
                   help="calibration sequences (default: the recipe's, shown by `lowbit presets`: 128, or fewer for "
                        "block-trained methods, whose time grows with it)")
    q.add_argument("--calib-data", type=Path, metavar="PATH",
                   help="calibrate on your own text: a text file, a folder of text files, or JSONL with a 'text' field "
                        "(default: the built-in multi-domain mix)")
    q.add_argument("--seqlen", type=_positive_int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--calib-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the calibration forward passes (auto: bfloat16 where the CPU has it natively)")
    q.add_argument("--eval-tokens", type=_positive_int, default=16384)
    q.add_argument("--eval-split", choices=["both", "in-domain", "out-of-domain"], default="both",
                   help="evaluation text: Shakespeare's tragedies (in-domain), news (out-of-domain), or both")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--threads", type=_positive_int, help="threads for torch and the Rust kernels")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="what", required=True, parser_class=_Parser)
    ep = esub.add_parser("ppl", help="perplexity on the evaluation split")
    ep.add_argument("dir")
    ep.add_argument("--eval-tokens", type=_positive_int, default=16384)
    ep.add_argument("--seqlen", type=_positive_int, default=512)
    ep.add_argument("--eval-split", choices=["both", "in-domain", "out-of-domain"], default="both")
    ep.add_argument("--threads", type=_positive_int, help="threads for torch and the Rust kernels")
    ep.add_argument("--quiet", action="store_true")
    ep.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="bits, sizes and per-layer errors of a checkpoint")
    i.add_argument("dir")
    i.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("presets", help="list the recipe presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UserError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command in ("quantize", "eval"):
        _quiet_transformers(args.verbose)
    from .errors import LowbitError

    try:
        return args.func(args)
    except (LowbitError, _UserError) as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit inspect DIR | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
