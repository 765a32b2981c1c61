"""AKVQ-VL (Su et al. 2025, arXiv 2501.15021) for a text model: method ``"akvq"``.

Two parts, both applied by the attention on request of the quantizer's class attributes:

* **Walsh–Hadamard transform per head** (:attr:`rotate_keys`, :attr:`rotate_values`): keys after
  RoPE, and queries with them, are rotated by the orthonormal Hadamard ``H`` along ``head_dim``
  (``q·kᵀ = (qH)(kH)ᵀ``; the same transform as QuaRot's R3, applied once when R3 is on too), and
  values are rotated per KV head before caching, the attention output rotated back per head
  (``softmax·(VH)·Hᵀ = softmax·V``, ``H`` orthonormal). The
  rotation spreads outlier channels over the head, so a per-token 2-bit grid loses far less.
* **Attention-saliency-driven precision per token** (PSA, "pivot-token salient attention"): at
  prefill (more than one new token) the attention computes, from the full-precision rotated
  queries and keys, the attention mass each new token receives — ``Σ_heads Σ_queries softmax(q·kᵀ)``
  over the causally visible pairs of the chunk — and the ``ceil(salient_frac · S)`` tokens that
  draw the most (attention sinks such as the first token, and "pivot" tokens) are stored whole in
  fp16, besides the ``sink_tokens`` first positions; the others go to ``bits`` bits per token
  (asymmetric, groups of ``group_size``). Tokens written one at a time (decoding) are not salient.

The vision-specific part of the paper (TSA: text tokens above image tokens) does not apply to a
text model and is not implemented. No official code is known; this follows the paper's
description (``../shared/METHODS.md`` §14).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .base import KVQuantizer, check_fraction, register_quantizer
from .layout import QuantizedKV

__all__ = ["AKVQQuantizer"]


@register_quantizer
class AKVQQuantizer(KVQuantizer):
    """AKVQ-VL keys and values (see the module docstring).

    Arguments as :class:`~lowbit.kv.base.KVQuantizer` (``outlier_frac`` must be 0), plus
    ``salient_frac`` in ``[0, 0.5)``: the fraction of each prefill chunk's tokens kept whole in
    fp16 by attention saliency (default 0.02; 0 = the Hadamard alone).
    """

    method = "akvq"
    rotate_keys = True
    rotate_values = True
    wants_saliency = True
    options = {"salient_frac": 0.02}

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int = 2, method: Optional[str] = None, salient_frac: float = 0.02, **kwargs: Any) -> None:
        super().__init__(num_kv_heads, head_dim, bits, method, **kwargs)
        if self.outlier_frac:
            from ..errors import ValueRangeError

            raise ValueRangeError(f"outlier_frac: the 'akvq' KV method keeps salient tokens, not sparse outliers; use 0, got {self.outlier_frac!r}")
        self.salient_frac = check_fraction(salient_frac, "salient_frac")

    def _extra_repr(self) -> str:
        return f", sym={self.sym}, clip_ratio={self.clip_ratio}, salient_frac={self.salient_frac}"

    def n_salient(self, seq: int) -> int:
        """Tokens kept whole in a prefill chunk of ``seq`` tokens: ``ceil(salient_frac · seq)`` (0 for ``seq ≤ 1``)."""
        if seq <= 1 or self.salient_frac == 0:
            return 0
        return min(seq, int(math.ceil(self.salient_frac * seq - 1e-9)))

    def expected_bytes_per_token(self) -> float:
        """The per-token uniform storage plus, on average, ``salient_frac`` of the tokens as whole
        fp16 rows (``2·D`` bytes and an int32 row index per head, keys and values)."""
        H, D = self.num_kv_heads, self.head_dim
        return super().expected_bytes_per_token() + self.salient_frac * 2 * H * (2 * D + 4)

    def _quantize(self, x: torch.Tensor, positions: torch.Tensor, which: str, salient: Optional[torch.Tensor]) -> QuantizedKV:
        return self.per_token_uniform(x, positions, salient)

    @torch.no_grad()
    def saliency(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, attention_mask: Any, scaling: float) -> Optional[torch.Tensor]:
        """The ``n_salient(S)`` tokens of each sequence that receive the most attention in this chunk.

        Args:
            query: float ``(B, n_heads, S, D)`` full-precision queries (after RoPE; rotated or not,
                as long as ``key`` is rotated the same way).
            key: float ``(B, num_kv_heads, S, D)`` full-precision keys of the same tokens.
            positions: int64 ``(B, S)`` absolute positions: key ``j`` is visible to query ``i``
                when ``positions[j] ≤ positions[i]``.
            attention_mask: the model's mask, used when it is a 4-D ``(B, 1, S, ≥S)`` tensor (bool:
                ``True`` = visible; float: added to the scores); anything else is ignored.
            scaling: the attention's score scale.

        Returns:
            bool ``(B, S)``, or ``None`` when no token is salient (``S ≤ 1`` or ``salient_frac = 0``).
        """
        B, Hq, S, D = query.shape
        n = self.n_salient(S)
        if n == 0:
            return None
        group = Hq // key.shape[1]
        visible = positions[:, None, :] <= positions[:, :, None]  # (B, S_q, S_k)
        add = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] >= S and attention_mask.shape[-2] == S:
            m = attention_mask[:, 0, :, -S:]
            if m.dtype == torch.bool:
                visible = visible & m
            else:
                add = m.float()
        mass = torch.zeros(B, S, dtype=torch.float32, device=query.device)
        for h in range(Hq):  # one head at a time: memory B·S² instead of B·heads·S²
            s = (query[:, h].float() @ key[:, h // group].float().transpose(-1, -2)) * scaling
            if add is not None:
                s = s + add
            s = s.masked_fill(~visible, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked (padding) row gives no mass
            mass += p.sum(dim=1)
        top = mass.topk(n, dim=-1).indices
        return torch.zeros(B, S, dtype=torch.bool, device=query.device).scatter_(1, top, True)


def _describe(step: Any) -> str:
    frac = 0.02 if step.salient_frac is None else step.salient_frac
    return f"KV{step.bits} AKVQ-VL (Hadamard K/V per head, per-token {'sym' if step.sym else 'asym'}, {frac:.0%} salient tokens fp16, sink {step.sink_tokens})"


def _register() -> None:
    from ..methods.registry import KVMethod, register_kv

    register_kv(KVMethod("akvq", step_options=("sym", "clip_ratio", "salient_frac"), describe=_describe))


_register()
