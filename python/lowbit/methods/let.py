"""OmniQuant's learnable equivalent transformation (LET; Shao et al., ICLR 2024) of one decoder
block, for 4-bit activations: per-channel scales that move the activations' outliers into the
weights, trained with the block, then merged into the weights and norms.

Four transformations, each exact in full precision (Llama-family blocks, RMSNorm, so no shift):

* ``s_attn`` (hidden): the attention norm's weight ÷ s, the q/k/v input columns × s;
* ``s_mlp`` (hidden): the MLP norm's weight ÷ s, the gate/up input columns × s;
* ``s_vo`` (KV heads × head_dim): v's output rows (and bias) ÷ s, o's input columns × s, each
  query head taking its KV head's scales (GQA: repeated ``n_heads / n_kv_heads`` times);
* ``s_qk`` (KV heads × head_dim / 2): q's rows ÷ s, k's rows × s (and biases), the scale of
  channel ``i`` and ``i + head_dim/2`` tied, so that it commutes with RoPE's rotation of that pair
  and the transformation stays exact before RoPE.

``s_attn``, ``s_mlp`` and ``s_vo`` start at SmoothQuant's ``max|X|^α / max|W|^(1−α)`` from the
block's calibration inputs (``init="identity"``: at 1, so the block starts as the clipping alone
— ``init="auto"`` picks it for weight-only runs, where there is no activation outlier to move,
and SmoothQuant's when the block trains with quantized activations), ``s_qk`` at 1 (the official code's choice, OpenGVLab/OmniQuant
issue #26); scales below 1e-2 are clamped there each forward, as the official
``TruncateFunction`` does. Compared with OpenGVLab/OmniQuant ``models/transformation.py``
(``smooth_ln_fcs_temporary``, ``smooth_fc_fc_temporary``, ``smooth_q_k_temporary``) and
``quantize/omniquant.py`` (the SmoothQuant initialisation, no shift for LLaMA); the official code
has no GQA path (its issues #16, #92) and scales q/k without tying RoPE pairs.

The merged norm weights are rounded to fp16 in the forward too (straight-through), since a
checkpoint stores them so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import ValueRangeError
from .blockrecon import BlockData, fp16_round_ste, observe_inputs

__all__ = ["LET", "LETWeight", "INITS"]

#: where the scales start (:class:`LET`'s ``init``)
INITS = ("auto", "smoothquant", "identity")

_MIN_SCALE = 1e-2


def _path(block: nn.Module, module: nn.Module) -> str:
    for name, m in block.named_modules():
        if m is module:
            return name
    raise KeyError("module not in block")


@torch.no_grad()
def _input_absmax(block: nn.Module, modules: list, data: BlockData) -> list[torch.Tensor]:
    """Per-channel ``max |x|`` of each module's input over the block's calibration inputs."""
    out: list[Optional[torch.Tensor]] = [None] * len(modules)

    def sink(i: int, x: torch.Tensor) -> None:
        m = x.abs().flatten(0, -2).amax(0)
        out[i] = m if out[i] is None else torch.maximum(out[i], m)

    observe_inputs(block, modules, data, sink)
    return out  # type: ignore[return-value]


def _smooth(act: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale ``max|X|^α / max|W|^(1−α)`` over ``weights``' columns."""
    w = torch.cat([W.detach().float().abs() for W in weights]).amax(0)
    return (act.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


class LET(nn.Module):
    """The four learned scales of one decoder block (see the module docstring).

    Args:
        block: the decoder block (its linears dense).
        adapter: the architecture's adapter (roles, norms).
        dims: the model's :class:`~lowbit.models.adapters.Dims`.
        data: the block's calibration activations (for the SmoothQuant initialisation).
        alpha: SmoothQuant's migration strength.
        init: ``"smoothquant"`` (the scales above), ``"identity"`` (every scale 1), or ``"auto"``:
            SmoothQuant's when ``data.act`` quantizes the linears' inputs, else the identity.
        qk: also learn ``s_qk``.
        fp16_norms: round the transformed norm weights to fp16 in the forward (what a checkpoint
            stores); ``False`` keeps the transformation exact in float32.
    """

    def __init__(self, block: nn.Module, adapter: Any, dims: Any, data: BlockData, alpha: float = 0.75, qk: bool = True,
                 fp16_norms: bool = True, init: str = "smoothquant") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueRangeError(f"init: must be one of {INITS}, got {init!r}")
        self.fp16_norms = fp16_norms
        (attn_norm, qkv), (mlp_norm, gate_up) = adapter.residual_readers(block)
        q, k, v = qkv
        o = adapter.linear(block, "o")
        self.block_paths = {
            "attn_norm": _path(block, attn_norm), "mlp_norm": _path(block, mlp_norm),
            **{r: _path(block, m) for r, m in zip(("q", "k", "v", "o", "gate", "up"), (q, k, v, o, *gate_up))},
        }
        self.n_heads, self.n_kv, self.hd = int(dims.n_heads), int(dims.n_kv_heads), int(dims.head_dim)
        if init == "auto":
            init = "smoothquant" if data.act is not None else "identity"
        if init == "smoothquant":  # the calibration pass only where its statistics are used
            x_attn, x_o, x_mlp = _input_absmax(block, [q, o, gate_up[0]], data)
            s_attn = _smooth(x_attn, [q.weight, k.weight, v.weight], alpha)
            s_mlp = _smooth(x_mlp, list(m.weight for m in gate_up), alpha)
            # v→o: one scale per KV channel, from the o columns (and o inputs) of all its query heads
            rep = self.n_heads // self.n_kv
            xo = x_o.view(self.n_kv, rep, self.hd).amax(1).flatten()
            wo = o.weight.detach().float().abs().amax(0).view(self.n_kv, rep, self.hd).amax(1).flatten()
            s_vo = (xo.clamp_min(1e-5).pow(alpha) / wo.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        else:
            dev = q.weight.device
            s_attn, s_mlp = torch.ones(q.weight.shape[1], device=dev), torch.ones(gate_up[0].weight.shape[1], device=dev)
            s_vo = torch.ones(self.n_kv * self.hd, device=dev)
        self.s_attn, self.s_mlp, self.s_vo = nn.Parameter(s_attn), nn.Parameter(s_mlp), nn.Parameter(s_vo)
        self.s_qk = nn.Parameter(torch.ones(self.n_kv * self.hd // 2)) if qk else None

    # -- the scales as they act ------------------------------------------------------------------
    @staticmethod
    def _clamped(s: torch.Tensor) -> torch.Tensor:
        return s.clamp_min(_MIN_SCALE)

    def _vo_kv(self) -> torch.Tensor:
        return self._clamped(self.s_vo)

    def _vo_q(self) -> torch.Tensor:
        """``s_vo`` per o input column (query heads × head_dim)."""
        rep = self.n_heads // self.n_kv
        return self._vo_kv().view(self.n_kv, 1, self.hd).expand(self.n_kv, rep, self.hd).reshape(-1)

    def _qk_kv(self) -> torch.Tensor:
        """``s_qk`` per k output channel (KV heads × head_dim), RoPE pairs tied."""
        half = self._clamped(self.s_qk).view(self.n_kv, self.hd // 2)
        return torch.cat([half, half], dim=1).reshape(-1)

    def _qk_q(self) -> torch.Tensor:
        rep = self.n_heads // self.n_kv
        return self._qk_kv().view(self.n_kv, 1, self.hd).expand(self.n_kv, rep, self.hd).reshape(-1)

    # -- the attention-side edges (AffineQuant generalises these) -----------------------------------
    def v_rows(self, W: torch.Tensor) -> torch.Tensor:
        """v's output rows (weight ``(n_kv·hd, in)`` or bias ``(n_kv·hd,)``) ÷ ``s_vo``."""
        return W / self._vo_kv().view(-1, *([1] * (W.dim() - 1)))

    def o_cols(self, W: torch.Tensor) -> torch.Tensor:
        """o's input columns ``(out, n_heads·hd)`` × ``s_vo`` of each query head's KV head."""
        return W * self._vo_q().unsqueeze(0)

    def q_rows(self, W: torch.Tensor) -> torch.Tensor:
        """q's output rows ÷ ``s_qk`` (of each query head's KV head)."""
        return W if self.s_qk is None else W / self._qk_q().view(-1, *([1] * (W.dim() - 1)))

    def k_rows(self, W: torch.Tensor) -> torch.Tensor:
        """k's output rows × ``s_qk``."""
        return W if self.s_qk is None else W * self._qk_kv().view(-1, *([1] * (W.dim() - 1)))

    def transform(self, role: str, W: torch.Tensor, tensor: str = "weight") -> torch.Tensor:
        """The transformed ``tensor`` (``"weight"`` or ``"bias"``) of the module in ``role``
        (``"attn_norm"``, ``"mlp_norm"``, ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``)."""
        if role in ("attn_norm", "mlp_norm"):
            w = W / self._clamped(self.s_attn if role == "attn_norm" else self.s_mlp)
            return fp16_round_ste(w) if self.fp16_norms else w
        if role in ("q", "k", "v"):
            W = {"q": self.q_rows, "k": self.k_rows, "v": self.v_rows}[role](W)
            return W if tensor == "bias" else W * self._clamped(self.s_attn).unsqueeze(0)
        if role == "o":
            return self.o_cols(W)
        return W * self._clamped(self.s_mlp).unsqueeze(0)  # gate, up

    def on_step(self, step: int, epoch_steps: int, epochs: float) -> None:
        """Called after every training step (AffineQuant widens its masks here)."""

    def params(self) -> list[nn.Parameter]:
        """The learned scales."""
        return [p for p in (self.s_attn, self.s_mlp, self.s_vo, self.s_qk) if p is not None]


    def _targets(self, block: nn.Module) -> list[tuple[str, str, str]]:
        """``[(fake_quantized key, role, tensor)]`` of every tensor the transformation changes."""
        out = []
        for role in ("q", "k", "v", "o", "gate", "up"):
            path = self.block_paths[role]
            out.append((path, role, "weight"))
            if role in ("q", "k", "v") and block.get_submodule(path).bias is not None:
                out.append((f"{path}:bias", role, "bias"))
        out += [(self.block_paths[r], r, "weight") for r in ("attn_norm", "mlp_norm")]
        return out

    def parametrizations(self, block: nn.Module, quantizers: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """What :func:`~lowbit.methods.blockrecon.fake_quantized` installs for training with the
        transformation: each transformed tensor through a :class:`LETWeight` (a linear's weight then
        through its quantizer from ``quantizers``), the other linears through their quantizer alone."""
        out: dict[str, nn.Module] = {}
        for key, role, tensor in self._targets(block):
            out[key] = LETWeight(self, role, tensor, quantizers.get(key) if tensor == "weight" else None)
        for key, q in quantizers.items():
            out.setdefault(key, q)
        return out

    @torch.no_grad()
    def merge(self, block: nn.Module) -> None:
        """Write the transformed tensors into ``block`` (the norms absorb their scales; the linears
        hold their transformed, not yet quantized, weights): exact in full precision, up to the
        norms' fp16 rounding."""
        for key, role, tensor in self._targets(block):
            mod = block.get_submodule(key.partition(":")[0])
            t = getattr(mod, tensor)
            t.copy_(self.transform(role, t.detach().float(), tensor).to(t.dtype))


class LETWeight(nn.Module):
    """Parametrization: a tensor transformed by the block's :class:`LET`, then (for a linear's
    weight) fake-quantized by ``quant`` (``None``: only transformed)."""

    def __init__(self, let: LET, role: str, tensor: str = "weight", quant: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.let, self.role, self.tensor, self.quant = let, role, tensor, quant

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        W = self.let.transform(self.role, W, self.tensor)
        return self.quant(W) if self.quant is not None else W
