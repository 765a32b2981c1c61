"""Per-row round-to-nearest of the vocabulary matrices — the input embeddings and the output head —
on the uniform grid with its MSE clip search (:mod:`lowbit.methods.rtn`'s grid, one group per
row): the recipe's :class:`~lowbit.recipe.EmbedQuant` step, run once after the weight step.

The results are stored as :class:`~lowbit.nn.quant_embedding.QuantEmbedding` and
:class:`~lowbit.nn.quant_embedding.QuantHead` (packed codes, fp16 per-row scales and zeros).

**Tied embeddings** (the head's weight is the embeddings' weight):

* both targets: the matrix is quantized once; the head becomes a ``QuantHead`` tied to the
  ``QuantEmbedding`` (it reads the same codes, the checkpoint stores them once) and the model stays
  tied (``config.tie_word_embeddings`` unchanged);
* one target: the model is untied first (``config.tie_word_embeddings`` becomes False, the head
  gets its own copy, as a rotation does); the target is quantized and the other keeps the dense
  matrix, so the checkpoint stores both.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ValueRangeError
from ..grids.base import QuantizedWeight
from ..grids.uniform import UniformGrid, check_weight

__all__ = ["quantize_rows", "apply"]

log = logging.getLogger(__name__)

#: rows quantized at a time: the clip search then holds a few ``(ROW_CHUNK, cols)`` temporaries,
#: not several copies of a whole ``(vocab, hidden)`` matrix
ROW_CHUNK = 4096


@torch.no_grad()
def quantize_rows(W: torch.Tensor, bits: int, *, sym: bool = False, mse: bool = True, name: str = "W") -> QuantizedWeight:
    """Round each row of ``W`` to its own uniform grid (one scale and zero point per row).

    Args:
        W: ``(rows, cols)`` float (fp32/fp16/bf16/fp64), finite: an embedding matrix
            ``(vocab, hidden)`` or a head weight ``(vocab, hidden)``.
        bits: 4, 6 or 8.
        sym: constant zero point ``2^(bits−1)`` instead of a zero per row.
        mse: search a clipped range per row (GPTQ's ``Quantizer(mse=True)``: shrink the range while
            the ``|error|^2.4`` sum falls); without it every entry is within half a step of its row's grid.
        name: what ``W`` is called in error messages.

    Returns:
        :class:`~lowbit.grids.base.QuantizedWeight` (codes ``(rows, cols)`` uint8, scales/zeros
        ``(rows, 1)`` float32 fp16-exact, ``group_size = cols``, ``method="rtn"``), on ``W``'s device.

    Raises:
        DTypeError / ShapeError / ValueRangeError naming ``name`` (not a float 2-D tensor, NaN or
        inf, values too large for fp16 scales); UnsupportedSizeError naming ``bits``.
    """
    from ..layouts.rows import check_bits

    check_bits(bits)
    check_weight(W, name)
    grid = UniformGrid(bits=int(bits), group_size=None, sym=bool(sym), mse=bool(mse))
    parts = []
    for i in range(0, W.shape[0], ROW_CHUNK):
        try:
            parts.append(grid.quantize_weight(W[i : i + ROW_CHUNK]))
        except ValueRangeError as e:
            raise ValueRangeError(f"{name}: {str(e).partition(': ')[2]}") from e
    codes = torch.cat([p.codes for p in parts])
    scales = torch.cat([p.scales for p in parts])
    zeros = None if sym else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
    return grid.build(codes, scales, zeros, method="rtn")


def _find(model: nn.Module, adapter: Any, target: str, required: bool) -> Optional[tuple[str, nn.Module]]:
    """``(module name, module)`` of ``target`` (``"embed_tokens"`` / ``"lm_head"``) in ``model``."""
    get = adapter.embeddings if target == "embed_tokens" else adapter.lm_head
    try:
        module = get(model)
    except AttributeError:
        module = None
    name = next((n for n, m in model.named_modules() if m is module), None) if module is not None else None
    if name is None:
        if required:
            raise ValueRangeError(f"targets: the {type(model).__name__} has no {target!r} module")
        return None
    want = nn.Embedding if target == "embed_tokens" else nn.Linear
    if not isinstance(module, want):
        if required:
            raise ValueRangeError(
                f"targets: {target!r} ({name}) is a {type(module).__name__}, not a dense {want.__name__} "
                "(already quantized?)"
            )
        return None
    return name, module


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _rel_error(qw: QuantizedWeight, W: torch.Tensor) -> float:
    W = W.detach().float()
    return float((qw.dequantize().to(W.device) - W).norm() / W.norm().clamp_min(1e-30))


@torch.no_grad()
def apply(step: Any, model: nn.Module, adapter: Any, calib: Any = None) -> list[tuple[str, float, float]]:
    """Quantize ``step.targets`` of ``model`` in place (see the module docstring for tied models).

    Args:
        step: an :class:`~lowbit.recipe.EmbedQuant`.
        model: a causal LM of a supported architecture; the targets still dense.
        adapter: its :class:`~lowbit.models.adapters.Adapter`.
        calib: unused (the method is data-free).

    Returns:
        ``[(module name, stored bits per weight, relative weight error), ...]`` per target.

    Raises:
        ValueRangeError: a target the model lacks or has already quantized (naming ``targets``);
            a weight with NaN or inf (naming it, e.g. ``model.embed_tokens.weight``).
    """
    from ..nn.quant_embedding import QuantEmbedding, QuantHead

    found = {t: _find(model, adapter, t, required=t in step.targets) for t in ("embed_tokens", "lm_head")}
    emb, head = found["embed_tokens"], found["lm_head"]
    tied = emb is not None and head is not None and emb[1].weight is head[1].weight
    for t in step.targets:  # every weight checked before anything is swapped
        name, mod = found[t]  # type: ignore[misc]
        check_weight(mod.weight.detach(), f"{name}.weight")

    def quantize(name: str, mod: nn.Module) -> QuantizedWeight:
        return quantize_rows(mod.weight.detach(), step.bits, sym=step.sym, mse=step.mse, name=f"{name}.weight")

    stats = []
    if tied and set(step.targets) == {"embed_tokens", "lm_head"}:
        (emb_name, emb_mod), (head_name, head_mod) = emb, head  # type: ignore[misc]
        qw = quantize(emb_name, emb_mod)
        qe = QuantEmbedding.from_quantized(qw, dtype=emb_mod.weight.dtype)
        qh = QuantHead.tied(qe, emb_name, bias=head_mod.bias)
        err = _rel_error(qw, emb_mod.weight)
        _set_module(model, emb_name, qe)
        _set_module(model, head_name, qh)
        return [(emb_name, qe.bits_per_weight(), err), (head_name, qh.bits_per_weight(), err)]
    if tied:
        from .rotation import _untie_lm_head

        log.info("EmbedQuant of %s only: untying the embeddings and the head", step.targets[0])
        _untie_lm_head(model, adapter)
        head = _find(model, adapter, "lm_head", required="lm_head" in step.targets)
    for t in step.targets:
        name, mod = emb if t == "embed_tokens" else head  # type: ignore[misc]
        qw = quantize(name, mod)
        if t == "embed_tokens":
            new: Any = QuantEmbedding.from_quantized(qw, dtype=mod.weight.dtype)
        else:
            new = QuantHead.from_quantized(qw, mod.bias)
        stats.append((name, new.bits_per_weight(), _rel_error(qw, mod.weight)))
        _set_module(model, name, new)
    return stats


def _register() -> None:
    from .registry import PostWeightMethod, register_post_weight

    register_post_weight(PostWeightMethod("rtn", "embedding", apply))


_register()
