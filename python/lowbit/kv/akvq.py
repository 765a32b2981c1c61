"""AKVQ-VL (Su et al. 2025, arXiv 2501.15021) for a text model: method ``"akvq"``.

The paper's two parts, both applied by the attention on request of the quantizer's class
attributes:

* **Walsh–Hadamard transform per head** (:attr:`rotate_keys`, :attr:`rotate_values`): keys after
  RoPE, and queries with them, are rotated by the orthonormal Hadamard ``H`` along ``head_dim``
  (``q·kᵀ = (qH)(kH)ᵀ``; the same transform as QuaRot's R3, applied once when R3 is on too), and
  values are rotated per KV head before caching, the attention output rotated back per head
  (``softmax·(VH)·Hᵀ = softmax·V``, ``H`` orthonormal). The rotation spreads outlier channels
  over the head, so a per-token 2-bit grid loses far less.
* **Attention-saliency-driven precision** (PSA, "pivot-token salient attention"): at prefill (more
  than one new token) the attention computes, from the full-precision rotated queries and keys,
  the attention mass each new token receives — ``Σ_queries softmax(q·kᵀ)`` over the causally
  visible pairs of the chunk, summed over the query heads — and the ``ceil(salient_frac · S)``
  tokens past the ``sink_tokens`` first positions (stored whole in fp16 anyway) that draw the most
  ("pivot" tokens) are kept at higher precision: whole in fp16 (``salient_bits=16``) or each row
  on its own 8-bit grid (``salient_bits=8``, the default: half the bytes, so twice the tokens). Tokens written one at a time
  (decoding) are not salient.

The paper's description alone (``salient_frac=0.02, salient_bits=16, salient_per_head=False,
key_group_size=head_dim, mse_clip=False, key_smoothing=None``) gives a 2-bit cache far worse than KVQuant's on the bundled
model (``benches/results/2026-12-03-kv.md``); four choices of ours, each measured there, close
the gap at a few percent more bytes:

* ``salient_per_head`` (default on): the salient tokens are picked per KV head, by the mass its
  query heads give them, instead of one set for all heads (heads attend to different pivots).
* ``key_group_size`` (default half of ``group_size``): keys, whose rotated channels still differ
  in spread, get twice the scales of values.
* ``mse_clip`` (default on): each group's range is the one of 15 shrinks of min–max with the least
  squared error (:meth:`~lowbit.kv.base.KVQuantizer.uniform_grid`).
* ``key_smoothing`` (default 1.0; ``None`` = off): keys are centred by their calibrated per-channel
  mean ``μ`` (rotated, after RoPE) and divided by ``σ^α`` (``σ`` the channel's standard deviation,
  ``α = key_smoothing``) before the per-token grid, and the two are undone when dequantizing. The
  mean is shared by every token of a head, so it moves no attention weight by itself; it frees the
  2-bit grid from spending levels on a per-channel offset (RoPE leaves large ones in the low
  frequencies). It needs a calibration (:func:`calibrate_akvq`, run by the recipe step on
  ``calib_samples`` sequences), which observes the full-precision keys of a forward pass.

Keys are stored as kind ``"akvq_key"`` when smoothed (the per-token grid of the smoothed keys),
else ``"uniform"``; values always as ``"uniform"``. The vision-specific part of the paper (TSA:
text tokens above image tokens) does not apply to a text model and is not implemented. No
official code is known; this follows the paper's description (``../shared/METHODS.md`` §14).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import nn

from ..errors import ShapeError, ValueRangeError
from .base import KVQuantizer, check_fraction, check_int, register_quantizer
from .layout import QuantizedKV

__all__ = ["AKVQQuantizer", "calibrate_akvq"]


@register_quantizer
class AKVQQuantizer(KVQuantizer):
    """AKVQ-VL keys and values (see the module docstring).

    Arguments as :class:`~lowbit.kv.base.KVQuantizer` (``sym`` must be ``False``, ``outlier_frac``
    0), plus:

    Args:
        salient_frac: in ``[0, 0.5)``: the fraction of each prefill chunk's tokens kept whole by
            attention saliency (default 0.035; 0 = none).
        salient_bits: 8 (default: each salient row on its own 8-bit grid, an fp16 scale and
            offset per row) or 16 (whole fp16 rows).
        salient_per_head: pick the salient tokens per KV head (``True``) or one set for all heads.
        key_group_size: channels per key scale (must divide ``head_dim``); ``None`` = half of
            ``group_size`` (``group_size`` itself when that is odd).
        mse_clip: MSE-searched range per group instead of min–max.
        key_smoothing: ``None``, or ``α`` in ``[0, 1]``: centre keys by the calibrated channel mean
            and divide by ``σ^α`` before quantizing (needs :meth:`calibrate`).

    Buffers (fp32, saved): ``key_mean`` and ``key_scale`` ``(H, D)``, ``calibrated`` (bool).
    """

    method = "akvq"
    rotate_keys = True
    rotate_values = True
    wants_saliency = True
    kinds = ("uniform", "akvq_key")
    options = {"salient_frac": 0.035, "salient_bits": 8, "salient_per_head": True, "key_group_size": None, "mse_clip": True, "key_smoothing": 1.0}

    key_mean: torch.Tensor
    key_scale: torch.Tensor
    calibrated: torch.Tensor
    #: queries per block of the saliency pass (bounds its memory on long prefills)
    SALIENCY_CHUNK: ClassVar[int] = 1024

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 2,
        method: Optional[str] = None,
        salient_frac: float = 0.035,
        salient_bits: int = 8,
        salient_per_head: bool = True,
        key_group_size: Optional[int] = None,
        mse_clip: bool = True,
        key_smoothing: Optional[float] = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_kv_heads, head_dim, bits, method, **kwargs)
        if self.outlier_frac:
            raise ValueRangeError(f"outlier_frac: the 'akvq' KV method keeps salient tokens, not sparse outliers; use 0, got {self.outlier_frac!r}")
        if self.sym:
            raise ValueRangeError("sym: the 'akvq' KV method uses an asymmetric per-token grid; use sym=False")
        self.salient_frac = check_fraction(salient_frac, "salient_frac")
        if isinstance(salient_bits, bool) or salient_bits not in (8, 16):
            raise ValueRangeError(f"salient_bits: must be 8 or 16, got {salient_bits!r}")
        self.salient_bits = int(salient_bits)
        for name, flag in (("salient_per_head", salient_per_head), ("mse_clip", mse_clip)):
            if not isinstance(flag, bool):
                raise ValueRangeError(f"{name}: must be True or False, got {flag!r}")
        self.salient_per_head = salient_per_head
        self.mse_clip = mse_clip
        if key_group_size is not None:
            check_int(key_group_size, "key_group_size", 1)
            if self.head_dim % key_group_size:
                raise ValueRangeError(f"key_group_size: must divide head_dim={self.head_dim}, got {key_group_size}")
        self.key_group_size = key_group_size
        if key_smoothing is not None and (isinstance(key_smoothing, bool) or not isinstance(key_smoothing, (int, float)) or not 0.0 <= float(key_smoothing) <= 1.0):
            raise ValueRangeError(f"key_smoothing: must be None or in [0, 1], got {key_smoothing!r}")
        self.key_smoothing = None if key_smoothing is None else float(key_smoothing)
        H, D = self.num_kv_heads, self.head_dim
        self.register_buffer("key_mean", torch.zeros(H, D))
        self.register_buffer("key_scale", torch.ones(H, D))
        self.register_buffer("calibrated", torch.tensor(False))
        self._observed: Optional[list[torch.Tensor]] = None  # [Σx, Σx², count] while observing
        self._observing = False

    def _extra_repr(self) -> str:
        return (
            f", clip_ratio={self.clip_ratio}, salient_frac={self.salient_frac}, salient_bits={self.salient_bits}, salient_per_head={self.salient_per_head}, "
            f"key_group={self.key_group}, mse_clip={self.mse_clip}, key_smoothing={self.key_smoothing}, calibrated={bool(self.calibrated)}"
        )

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def key_group(self) -> int:
        """Channels per key scale: ``key_group_size``, else half of :attr:`group` (when even)."""
        if self.key_group_size is not None:
            return self.key_group_size
        return self.group // 2 if self.group % 2 == 0 else self.group

    @property
    def is_calibrated(self) -> bool:
        """``True`` without ``key_smoothing``; else whether :meth:`calibrate` has run (or calibrated buffers were loaded)."""
        return self.key_smoothing is None or bool(self.calibrated)

    def n_salient(self, seq: int) -> int:
        """Tokens kept whole (per head, with ``salient_per_head``) in a prefill chunk of ``seq``
        tokens: ``ceil(salient_frac · seq)`` (0 for ``seq ≤ 1``)."""
        if seq <= 1 or self.salient_frac == 0:
            return 0
        return min(seq, int(math.ceil(self.salient_frac * seq - 1e-9)))

    def expected_bytes_per_token(self) -> float:
        """Per non-sink token, keys and values: packed codes, an fp16 scale and offset per group
        (keys in :attr:`key_group`, values in :attr:`group`), and on average ``salient_frac`` of the
        rows again as whole rows with an int32 row index: ``2·D`` bytes in fp16, or ``D`` bytes and
        an fp16 scale and offset at 8 bits."""
        D = self.head_dim
        row = 2 * D + 4 if self.salient_bits == 16 else D + 4 + 4
        return self.grid_bytes(self.key_group) + self.grid_bytes(self.group) + self.salient_frac * 2 * self.num_kv_heads * row

    # -- calibration ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def observing(self) -> Iterator["AKVQQuantizer"]:
        """Within the block, :meth:`fake` records the keys it is handed (positions
        ``≥ sink_tokens``) for :meth:`calibrate` and returns keys and values unchanged, so the
        model runs in full precision. Observations accumulate over calls until :meth:`calibrate`."""
        if self._observed is None:
            H, D = self.num_kv_heads, self.head_dim
            self._observed = [torch.zeros(H, D, dtype=torch.float64), torch.zeros(H, D, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
        self._observing = True
        try:
            yield self
        finally:
            self._observing = False

    def _observe(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        keep = (positions >= self.sink_tokens)[:, None, :, None].to(x.device)  # (B, 1, S, 1)
        xd = x.detach().double() * keep
        obs = self._observed
        assert obs is not None
        obs[0] += xd.sum((0, 2)).cpu()
        obs[1] += xd.square().sum((0, 2)).cpu()
        obs[2] += keep.sum().double().cpu()

    def fake(self, x: torch.Tensor, positions: torch.Tensor, kind: str, salient: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._observing:
            if kind == "key":
                x = self.check_kv(x, "x")
                self._observe(x, self.check_positions(positions, x.shape[0], x.shape[2], x.device))
            return x
        return super().fake(x, positions, kind, salient)

    fake.__doc__ = KVQuantizer.fake.__doc__

    @torch.no_grad()
    def calibrate(self) -> dict:  # type: ignore[override]
        """Fit ``key_mean`` (the mean of each rotated key channel) and ``key_scale`` (``σ^α``, ``σ``
        its standard deviation floored at ``1e-6``) from the keys observed in :meth:`observing`
        blocks, and mark the quantizer calibrated; the observations are then dropped.

        Returns:
            ``{"tokens": n, "mean_abs_mean": …, "mean_std": …}`` over the observed key rows.

        Raises:
            ValueRangeError: ``key_smoothing`` is ``None`` (nothing to calibrate) or no key row
                (past the sinks) was observed.
        """
        if self.key_smoothing is None:
            raise ValueRangeError("calibrate: this 'akvq' quantizer has key_smoothing=None, so nothing to calibrate")
        obs, self._observed = self._observed, None
        if obs is None or float(obs[2]) < 1:
            raise ValueRangeError("calibrate: no key was observed; run the model inside `with quantizer.observing():` on calibration text first")
        n = obs[2]  # key rows observed (the same count for every head and channel)
        mean = obs[0] / n
        std = (obs[1] / n - mean.square()).clamp_min(0.0).sqrt().clamp_min(1e-6)
        dev = self.key_mean.device
        self.key_mean.copy_(mean.float().to(dev))
        self.key_scale.copy_(std.pow(self.key_smoothing).float().to(dev))
        self.calibrated.fill_(True)
        return {"tokens": int(n), "mean_abs_mean": float(mean.abs().mean()), "mean_std": float(std.mean())}

    # -- quantize -------------------------------------------------------------------------------

    def _quantize(self, x: torch.Tensor, positions: torch.Tensor, which: str, salient: Optional[torch.Tensor]) -> QuantizedKV:
        if which == "value":
            codes, scale, zeros = self.uniform_grid(x, self.group, mse=self.mse_clip)
            return self.finish("uniform", x, codes, scale, zeros, None, positions, salient)
        kind, u = "uniform", x
        if self.key_smoothing is not None:
            kind = "akvq_key"
            u = (x.float() - self.key_mean[None, :, None, :]) / self.key_scale[None, :, None, :]
        codes, scale, zeros = self.uniform_grid(u, self.key_group, mse=self.mse_clip)
        return self.finish(kind, x, codes, scale, zeros, None, positions, salient)  # whole rows from x itself

    def _decode(self, qkv: QuantizedKV, codes: torch.Tensor) -> torch.Tensor:
        if qkv.kind != "akvq_key":
            return super()._decode(qkv, codes)
        return self.decode_uniform(qkv, codes) * self.key_scale[None, :, None, :] + self.key_mean[None, :, None, :]

    # -- saliency -------------------------------------------------------------------------------

    @torch.no_grad()
    def saliency(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, attention_mask: Any, scaling: float) -> Optional[torch.Tensor]:
        """The ``n_salient(S)`` tokens of each sequence (and KV head) that receive the most attention in this chunk.

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
            bool ``(B, num_kv_heads, S)`` with ``salient_per_head`` (each KV head's tokens ranked by
            the mass its query heads give them), else ``(B, S)`` (ranked by the mass over all
            heads); ``None`` when no token is salient (``S ≤ 1`` or ``salient_frac = 0``).
        """
        B, Hq, S, D = query.shape
        n = self.n_salient(S)
        if n == 0:
            return None
        Hk = key.shape[1]
        if Hq % Hk:
            raise ShapeError(f"query: {Hq} query heads do not share {Hk} KV heads evenly")
        group = Hq // Hk
        mask4 = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] >= S and attention_mask.shape[-2] == S:
            mask4 = attention_mask
        mass = torch.zeros(B, Hk, S, dtype=torch.float32, device=query.device)
        keys = key.float()
        # one head and SALIENCY_CHUNK queries at a time: memory B·chunk·S, not B·heads·S²
        for i0 in range(0, S, self.SALIENCY_CHUNK):
            i1 = min(S, i0 + self.SALIENCY_CHUNK)
            visible = positions[:, None, :] <= positions[:, i0:i1, None]  # (B, chunk, S_k)
            add = None
            if mask4 is not None:
                m = mask4[:, 0, i0:i1, -S:]
                if m.dtype == torch.bool:
                    visible = visible & m
                else:
                    add = m.float()
            for h in range(Hq):
                s = (query[:, h, i0:i1].float() @ keys[:, h // group].transpose(-1, -2)) * scaling
                if add is not None:
                    s = s + add
                s = s.masked_fill(~visible, float("-inf"))
                p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked (padding) row gives no mass
                mass[:, h // group] += p.sum(dim=1)
        sinks = (positions < self.sink_tokens)[:, None, :]  # stored whole anyway: rank the others
        mass = mass.masked_fill(sinks, float("-inf"))
        if not self.salient_per_head:
            top = mass.sum(1).topk(n, dim=-1).indices
            return torch.zeros(B, S, dtype=torch.bool, device=query.device).scatter_(1, top, True)
        top = mass.topk(n, dim=-1).indices
        return torch.zeros(B, Hk, S, dtype=torch.bool, device=query.device).scatter_(2, top, True)


def akvq_quantizers(model: nn.Module) -> list[AKVQQuantizer]:
    """Every :class:`AKVQQuantizer` in ``model`` that smooths keys (and so needs calibration)."""
    return [m for m in model.modules() if isinstance(m, AKVQQuantizer) and m.key_smoothing is not None]


@torch.no_grad()
def calibrate_akvq(model: nn.Module, calib_ids: torch.Tensor) -> dict:
    """Calibrate the key smoothing of every AKVQ quantizer of ``model`` on ``calib_ids``.

    Runs the model once per calibration sequence in full precision (each quantizer inside
    :meth:`AKVQQuantizer.observing`, no cache), then :meth:`AKVQQuantizer.calibrate`.

    Args:
        model: a model whose attentions carry ``lowbit_kv`` AKVQ quantizers.
        calib_ids: int ``(n, seqlen)`` token ids (``seqlen ≥ 2``).

    Returns:
        ``{"layers": count, "tokens": key rows observed per layer, "seconds": …}``.

    Raises:
        DTypeError / ShapeError naming ``calib_ids``; ValueRangeError naming ``model`` when no
        AKVQ quantizer smooths keys.
    """
    import time

    from .calibrate import _check_ids

    ids = _check_ids(calib_ids)
    qs = akvq_quantizers(model)
    if not qs:
        raise ValueRangeError("model: no attention has an 'akvq' KV quantizer with key_smoothing; install one first")
    t = time.perf_counter()
    dev = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for q in qs:
            stack.enter_context(q.observing())
        for i in range(ids.shape[0]):
            model(ids[i : i + 1].to(dev), use_cache=False)
    stats = [q.calibrate() for q in qs]
    return {"layers": len(qs), "tokens": stats[0]["tokens"], "seconds": time.perf_counter() - t}


def _calibrate(step: Any, model: Any, calib: Any) -> None:
    if akvq_quantizers(model):
        calibrate_akvq(model, calib[: step.calib_samples])


def _needs_calibration(step: Any) -> bool:
    return (step.options or {}).get("key_smoothing", AKVQQuantizer.options["key_smoothing"]) is not None


def _describe(step: Any) -> str:
    o = {**AKVQQuantizer.options, **(step.options or {})}
    frac = o["salient_frac"] if step.salient_frac is None else step.salient_frac
    smooth = "" if o["key_smoothing"] is None else ", smoothed keys"
    sal = f"{frac:.1%} salient tokens {'fp16' if o['salient_bits'] == 16 else '8-bit'}{' per head' if o['salient_per_head'] else ''}"
    return f"KV{step.bits} AKVQ-VL (Hadamard K/V per head, per-token asym{smooth}, {sal}, sink {step.sink_tokens})"


def _register() -> None:
    from ..methods.registry import KVMethod, register_kv

    register_kv(KVMethod("akvq", _calibrate, needs_calibration=_needs_calibration, step_options=("clip_ratio", "salient_frac"), describe=_describe))


_register()
