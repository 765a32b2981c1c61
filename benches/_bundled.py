"""What the model-level benchmarks (presets.py, embed_quant.py) share: the bundled model, both
evaluation splits, the calibration set and the full-precision perplexities, set up one way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Bundled:
    """The bundled SmolLM2-135M set up for a benchmark run.

    Attributes:
        model, tok: the full-precision model (float32) and its tokenizer.
        ids: split name (``lowbit.data.EVAL_SPLITS``) → int64 ``(1, eval_tokens)`` token ids.
        calib: int64 ``(calib_samples, seqlen)`` calibration windows (seed 0).
        fp: split name → the full-precision perplexity at ``seqlen``.
    """

    model: Any
    tok: Any
    ids: dict
    calib: Any
    fp: dict


def setup(threads: int, eval_tokens: int, calib_samples: int, seqlen: int,
          parts: Optional[list] = None, source: Optional[str] = None) -> Bundled:
    """Set torch's and lowbit's thread counts, load the bundled model, take ``eval_tokens`` of each
    evaluation split and ``calib_samples`` × ``seqlen`` calibration tokens (the built-in mix, its
    ``parts``, or the user text at ``source``), and measure the full-precision perplexities."""
    import torch

    import lowbit
    from lowbit import data
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    torch.set_num_threads(threads)
    lowbit.set_num_threads(threads)
    model, tok = load_model("bundled")
    ids = {sp: data.evaluation(tok, n_tokens=eval_tokens, split=sp) for sp in data.EVAL_SPLITS}
    calib = data.calibration(tok, n=calib_samples, seqlen=seqlen, seed=0, parts=parts, source=source)
    fp = {sp: perplexity(model, x, seqlen=seqlen) for sp, x in ids.items()}
    return Bundled(model, tok, ids, calib, fp)
