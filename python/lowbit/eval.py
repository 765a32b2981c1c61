"""Perplexity, measured the way GPTQ's ``llama_eval`` does.

The token stream ``(1, T)`` is cut into ``T // seqlen`` non-overlapping windows of ``seqlen`` tokens
(a shorter tail is dropped; if ``T < seqlen`` the whole stream is one window). Each window is run on
its own, from an empty context, and every token but the window's first is predicted. Perplexity is
``exp(mean NLL)`` over all predicted tokens of all windows, accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._arrays import is_integer_tensor
from .errors import DTypeError, ShapeError, ValueRangeError

__all__ = ["windows", "nll", "perplexity", "check_fits_model", "check_length"]


def windows(tokens: torch.Tensor, seqlen: int = 512) -> torch.Tensor:
    """The ``(n_windows, L)`` non-overlapping windows of a ``(1, T)`` (or ``(T,)``) token tensor.

    ``L = seqlen`` and ``n_windows = T // seqlen``, or one window of ``T`` tokens when ``T < seqlen``.
    """
    if not isinstance(tokens, torch.Tensor):
        raise ShapeError(f"tokens must be a (1, T) LongTensor, got {type(tokens).__name__}")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ShapeError(f"tokens must have shape (1, T), got {tuple(tokens.shape)}")
    if not is_integer_tensor(tokens):
        raise DTypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if int(seqlen) < 2:
        raise ShapeError(f"seqlen must be at least 2, got {seqlen!r}")
    T = tokens.numel()
    if T < 2:
        raise ShapeError(f"tokens must hold at least 2 tokens (T >= 2), got T={T}")
    seqlen = min(int(seqlen), T)
    n = T // seqlen
    return tokens[: n * seqlen].reshape(n, seqlen).long()


def check_length(model: Any, length: int, arg: str = "seqlen") -> None:
    """Refuse sequences of ``length`` tokens beyond the model's ``max_position_embeddings``.

    Raises:
        ValueRangeError: naming ``arg``.
    """
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise ValueRangeError(f"{arg}: {length} exceeds the model's max_position_embeddings ({positions})")


def check_fits_model(model: Any, ids: torch.Tensor, arg: str = "seqlen") -> None:
    """Refuse ``(batch, L)`` token ids the model cannot take: ``L`` beyond its
    ``max_position_embeddings``, ids outside its vocabulary (a model without a config is not checked).

    Raises:
        ValueRangeError: naming ``arg`` for the length, ``tokens`` for the ids.
    """
    check_length(model, ids.shape[-1], arg)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueRangeError(f"tokens: token id {bad} is outside the model's vocabulary (vocab_size={vocab})")


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def nll(
    model: Any,
    tokens: torch.Tensor,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = False,
) -> tuple[float, int]:
    """``(sum of NLL in nats, number of predicted tokens)`` of ``model`` on ``tokens``' windows.

    ``model(input_ids)`` must return an object with ``.logits`` (a ``transformers`` causal LM) or the
    logits tensor itself, shaped ``(batch, L, vocab)``. The model is put in eval mode.
    """
    if int(batch_size) < 1:
        raise ShapeError(f"batch_size must be at least 1, got {batch_size!r}")
    chunks = windows(tokens, seqlen)
    check_fits_model(model, chunks)
    device = _device(model)
    model.eval()
    batches = range(0, chunks.shape[0], int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    total = 0.0
    count = 0
    for start in batches:
        ids = chunks[start : start + int(batch_size)].to(device)
        # transformers models: no KV cache to build for a single forward pass.
        out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        shift = logits[:, :-1, :].float()
        target = ids[:, 1:]
        loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(loss.double())
        count += target.numel()
    return total, count


def _tokenize(tokenizer: Any, text: Any, n_tokens: Optional[int]) -> torch.Tensor:
    if not callable(getattr(tokenizer, "encode", None)):
        raise ShapeError(f"tokens: expected (1, T) token ids or a tokenizer, got {type(tokenizer).__name__}")
    if text is None:
        from .data import evaluation

        return evaluation(tokenizer, n_tokens=n_tokens)
    if not isinstance(text, str):
        raise ShapeError(f"text: expected a str, got {type(text).__name__}")
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    return (ids if n_tokens is None else ids[:n_tokens]).unsqueeze(0)


def perplexity(
    model: Any,
    tokens: Any,
    text: Any = None,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = False,
    n_tokens: Optional[int] = 16384,
) -> float:
    """Perplexity ``exp(mean NLL)`` of ``model`` on the non-overlapping ``seqlen`` windows of ``tokens``.

    Two forms: ``perplexity(model, ids)`` with ``(1, T)`` token ids, or
    ``perplexity(model, tokenizer, text)`` which tokenizes ``text`` (a ``str``; ``None`` = the in-domain
    evaluation split) and keeps its first ``n_tokens`` tokens.

    Args:
        model: a causal LM (``transformers`` or anything returning logits).
        tokens: ``(1, T)`` token ids, e.g. :func:`lowbit.data.evaluation` — or a tokenizer.
        text: with a tokenizer, the text to score.
        seqlen: window length (``>= 2``); the tail shorter than a window is dropped.
        batch_size: windows per forward pass.
        progress: show a tqdm bar over the batches.

    Raises:
        ShapeError: ``T < 2``, ``seqlen < 2``, ``batch_size < 1`` or ``tokens`` not ``(1, T)``.
        DTypeError: ``tokens`` not integer token ids.
        ValueRangeError: windows longer than the model's ``max_position_embeddings``, token ids
            outside its vocabulary, or a loss that is not finite (the model's logits hold NaN or
            inf): a perplexity of ``nan`` is never returned.
    """
    if not isinstance(tokens, torch.Tensor):
        tokens = _tokenize(tokens, text, n_tokens)
    total, count = nll(model, tokens, seqlen=seqlen, batch_size=batch_size, progress=progress)
    mean = total / count
    if not math.isfinite(mean) or mean > 700.0:  # exp(700) is near float64's limit
        raise ValueRangeError(
            f"perplexity: the mean loss over {count} tokens is {mean:.4g}, not a finite perplexity; "
            "the model's logits hold NaN or inf (a broken checkpoint or an overflow in its dtype)"
        )
    return math.exp(mean)
