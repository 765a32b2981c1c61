"""KV calibration: collect pre-RoPE keys, values and their Fisher sensitivities, fit the quantizers.

For every attention whose ``lowbit_kv`` quantizer calibrates (:attr:`~lowbit.kv.base.KVQuantizer.calibrates`,
e.g. KVQuant), :func:`calibrate_kv` runs the model on calibration windows with KV quantization
switched off, records the outputs of the key and value projections (keys before RoPE, values) as
``(tokens, kv_heads, head_dim)`` samples, and — with ``fisher=True`` — their squared gradients of
the language-modelling loss (the diagonal Fisher information KVQuant weights its k-means with).
Then each quantizer's ``calibrate(keys, values, key_weights, value_weights, iters=, seed=)`` fits it.

Tokens at positions ``< sink_tokens`` (stored exactly by the quantizer) are not sampled, and at
most ``max_tokens`` tokens per layer are kept (a seeded random subset of all calibration tokens,
the same for every layer).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._arrays import is_integer_tensor
from ..errors import DTypeError, ShapeError, ValueRangeError
from .base import KVQuantizer

__all__ = ["calibrate_kv"]


def _targets(model: nn.Module) -> list[tuple[int, tuple[Any, Any], KVQuantizer]]:
    """``[(layer index, (k linear, v linear), quantizer)]`` for every attention whose quantizer calibrates."""
    from ..models.adapters import get_adapter

    adapter = get_adapter(model)
    out = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        attn: Any = adapter.attention(layer)
        kv = attn._modules.get("lowbit_kv")
        if isinstance(kv, KVQuantizer) and kv.calibrates:
            out.append((i, (adapter.linear(layer, "k"), adapter.linear(layer, "v")), kv))
    return out


def _check_ids(calib_ids: Any) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor):
        raise DTypeError(f"calib_ids: must be an int64 torch tensor (n, seqlen), got {type(calib_ids).__name__}")
    if not is_integer_tensor(calib_ids):
        raise DTypeError(f"calib_ids: must hold integer token ids, got {calib_ids.dtype}")
    if calib_ids.dim() == 1:
        calib_ids = calib_ids.unsqueeze(0)
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 2:
        raise ShapeError(f"calib_ids: must have shape (n, seqlen) with seqlen >= 2, got {tuple(calib_ids.shape)}")
    return calib_ids.long()


def calibrate_kv(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    fisher: bool = True,
    batch_size: int = 1,
    max_tokens: int = 16384,
    iters: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Calibrate every KV quantizer of ``model`` that calibrates (KVQuant) on ``calib_ids``.

    One forward pass per batch (and, with ``fisher``, one backward pass of the summed next-token
    cross-entropy with respect to the outputs of the ``k`` and ``v`` linears only: the model's parameters
    get no gradient and their ``requires_grad`` flags are restored). KV quantization is off during
    the passes (full-precision keys and values, as KVQuant calibrates).

    Args:
        model: causal LM with lowbit attention installed (:func:`~lowbit.nn.attention.install_attention`).
        calib_ids: int ``(n, seqlen)`` calibration windows (each starts at position 0).
        fisher: weight the k-means by squared gradients (Fisher information); else uniform weights.
        batch_size: windows per forward pass.
        max_tokens: tokens sampled per layer (seeded random subset of the non-sink tokens).
        iters: Lloyd steps of the k-means.
        seed: sampling seed.
        progress: show a tqdm bar over the batches.

    Returns:
        ``{"layers": [layer indices], "tokens": sampled tokens per layer, "seconds": wall time,
        "inertia": {layer: {"key_inertia", "value_inertia"}}}``.

    Raises:
        ValueRangeError: no quantizer that calibrates in ``model``; ``batch_size``/``max_tokens`` < 1;
            no token left after excluding the sinks.
        DTypeError / ShapeError naming ``calib_ids``.
    """
    t0 = time.perf_counter()
    ids = _check_ids(calib_ids)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueRangeError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueRangeError(f"max_tokens: must be an int >= 1, got {max_tokens!r}")
    targets = _targets(model)
    if not targets:
        raise ValueRangeError(
            "model: no attention has a lowbit_kv quantizer that calibrates (such as 'kvquant'); install one with "
            "lowbit.nn.attention.install_attention(attn, rotary=..., kv=KVQuantizer(..., method='kvquant'))"
        )
    n, L = ids.shape
    sink = max(kv.sink_tokens for _, _, kv in targets)
    if sink >= L:
        raise ValueRangeError(f"calib_ids: windows of {L} tokens hold only sink tokens (sink_tokens={sink})")

    # which tokens to keep: a seeded subset of the (n, L - sink) non-sink tokens
    candidates = n * (L - sink)
    gen = torch.Generator().manual_seed(int(seed))
    keep = torch.zeros(n, L, dtype=torch.bool)
    if candidates <= max_tokens:
        keep[:, sink:] = True
    else:
        pick = torch.randperm(candidates, generator=gen)[:max_tokens]
        flat = torch.zeros(candidates, dtype=torch.bool)
        flat[pick] = True
        keep[:, sink:] = flat.view(n, L - sink)

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    samples: dict[int, dict[str, list[torch.Tensor]]] = {i: {"k": [], "v": [], "kw": [], "vw": []} for i, _, _ in targets}
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def make_hook(layer_idx: int, which: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
            if fisher:
                leaf = out.detach().requires_grad_(True)
                captured[(layer_idx, which)] = leaf
                return leaf
            captured[(layer_idx, which)] = out.detach()
            return None

        return hook

    for i, (k_lin, v_lin), _ in targets:
        hooks.append(k_lin.register_forward_hook(make_hook(i, "k")))
        hooks.append(v_lin.register_forward_hook(make_hook(i, "v")))

    enabled = {i: kv.enabled for i, _, kv in targets}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    batches = range(0, n, int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="KV calibration", unit="batch")
    try:
        for _, _, kv in targets:
            kv.enabled = False
        for p, _ in grad_flags:
            p.requires_grad_(False)
        model.eval()
        for start in batches:
            x = ids[start : start + int(batch_size)].to(device)
            sel = keep[start : start + int(batch_size)].to(device)
            captured.clear()
            with torch.set_grad_enabled(fisher):
                out = model(x, use_cache=False)
                if fisher:
                    logits = out.logits if hasattr(out, "logits") else out
                    loss = F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
                    )
                    loss.backward()
                    del logits, loss
                del out
            for i, _, kv in targets:
                H, D = kv.num_kv_heads, kv.head_dim
                for which in ("k", "v"):
                    t = captured[(i, which)]
                    samples[i][which].append(t.detach()[sel].reshape(-1, H, D).float().cpu())
                    if fisher:
                        g = t.grad if t.grad is not None else torch.zeros_like(t)
                        samples[i][which + "w"].append((g.detach()[sel].float() ** 2).reshape(-1, H, D).cpu())
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for i, _, kv in targets:
            kv.enabled = enabled[i]
        model.train(was_training)

    inertia = {}
    for i, _, kv in targets:
        s = samples[i]
        k = torch.cat(s["k"])
        v = torch.cat(s["v"])
        kw = torch.cat(s["kw"]) if fisher else None
        vw = torch.cat(s["vw"]) if fisher else None
        inertia[i] = kv.calibrate(k, v, kw, vw, iters=iters, seed=seed)
        samples[i] = {}
    return {
        "layers": [i for i, _, _ in targets],
        "tokens": int(keep.sum()),
        "seconds": time.perf_counter() - t0,
        "inertia": inertia,
    }
