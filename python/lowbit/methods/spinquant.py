"""SpinQuant (Liu et al., 2024): learn the rotations R1 and R2 by Cayley SGD on the Stiefel manifold.

Start from QuaRot's randomized Hadamards and minimise the language-model loss of the network whose
activations (and KV cache) are quantized — fake quantization with straight-through estimators —
while the weights stay in full precision (the paper's setting when GPTQ quantizes the weights
afterwards, "W16A4KV4"). The rotations are then folded into the weights exactly as QuaRot's are.

The learning never rotates the weights: with ``y = Q(x·R)·(W·R)ᵀ = (Q(x·R)·Rᵀ)·Wᵀ``, each
quantization point is sandwiched instead — ``Q(x·R1)·R1ᵀ`` on the two norm outputs of a layer,
``v·R2`` on the values and ``Q(a)·R2ᵀ`` on the ``o_proj`` input, ``Q(x·H)·Hᵀ`` on the ``down_proj``
input — which is the same function and the same gradients, at a fraction of the cost (the 49152 ×
576 embedding is never multiplied by R1).

:class:`CayleySGD` is the optimiser of Li, Fuxin & Todorovic (ICLR 2020), "Efficient Riemannian
optimization on the Stiefel manifold via the Cayley transform", Algorithm 2 (momentum projected onto
the tangent space, step ``α = min(lr, 2q/‖W‖)``), with the exact Cayley retraction
``X ← (I − α/2·W)⁻¹(I + α/2·W)·X`` in float64, so every iterate is orthogonal to rounding error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ShapeError
from ..models.adapters import Adapter
from .quarot import quarot_rotations
from .rotation import Rotations, apply_rotations, check_rotatable, fuse_norms

log = logging.getLogger(__name__)

__all__ = ["CayleySGD", "SpinQuantResult", "learn_rotations", "spinquant"]


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum on square orthogonal matrices (each parameter ``(n, n)``, ``XᵀX = I``).

    Args:
        params: the orthogonal parameters (float32 or float64; a float64 master copy is kept).
        lr: the largest step ``α``.
        momentum: ``β``.
        q: step cap ``α ≤ 2q/‖W‖`` (keeps the Cayley transform well conditioned).
    """

    def __init__(self, params: Any, lr: float = 1.5, momentum: float = 0.9, q: float = 0.5):
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, q=q))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ShapeError(f"params: CayleySGD takes square matrices, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, beta, q = group["lr"], group["momentum"], group["q"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["x"] = p.detach().double().clone()
                    state["m"] = torch.zeros_like(state["x"])
                x, m = state["x"], state["m"]
                g = p.grad.detach().double()
                m.mul_(beta).sub_(g)
                w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
                w = w_hat - w_hat.T
                m.copy_(w @ x)
                alpha = min(lr, 2.0 * q / (float(w.norm()) + 1e-8))
                state["last"] = (float(g.norm()), float(w.norm()), alpha)
                eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
                x.copy_(torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ x))
                p.copy_(x.to(p.dtype))
        return loss


@dataclass
class SpinQuantResult:
    """The learned rotations, the training loss per step, and ``(step, held-out loss)`` pairs
    (step 0 = the initial QuaRot rotation); ``rotations`` are those of the lowest held-out loss."""

    rotations: Rotations
    losses: list
    seconds: float
    val_losses: list = field(default_factory=list)


def _per_head(x: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = x.shape
    return (x.reshape(*shape[:-1], -1, head_dim) @ r).reshape(shape)


def learn_rotations(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    act: Optional[dict] = None,
    kv: Optional[dict] = None,
    steps: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    seqlen: int = 256,
    batch_size: int = 1,
    seed: int = 0,
    online_qk: bool = True,
    online_down: bool = True,
    val_rows: int = 8,
    eval_every: int = 10,
    adapter: Optional[Adapter] = None,
    progress: bool = False,
) -> SpinQuantResult:
    """Learn R1 (hidden²) and one R2 (head_dim²) per layer for a **norm-fused, unrotated** model.

    Args:
        model: a Llama-family causal LM after :func:`~lowbit.methods.rotation.fuse_norms` (left
            unchanged: the hooks it uses are removed before returning).
        calib: ``(n, L)`` int64 calibration ids; batches of ``batch_size`` windows of ``seqlen`` tokens
            are drawn from it (seeded).
        act: :class:`~lowbit.nn.ActQuantizer` config of the activations (``None``: 4-bit sym, clip 0.9).
        kv: :class:`~lowbit.kv.KVQuantizer` config (``"uniform"`` method) to fake-quantize
            the KV cache during learning, or ``None``.
        steps, lr, momentum: Cayley SGD, the step size decaying from ``lr`` to 0 on a cosine.
        online_qk, online_down: whether R3/R4 will be used (they are fixed Hadamards, present in the
            learning forward as in the final model).
        val_rows, eval_every: the last ``val_rows`` rows of ``calib`` (their first ``seqlen`` tokens)
            are held out; the quantized network's loss on them is measured before learning and
            every ``eval_every`` steps, and the rotations with the lowest held-out loss are
            returned — the quantized loss is a rugged function of the rotation (rounding), so the
            last iterate is not always the best one, and the initial QuaRot rotation competes too.
            No hold-out when ``calib`` has ``val_rows`` rows or fewer (the last iterate is returned).

    Returns:
        :class:`SpinQuantResult` with float64 rotations ready for
        :func:`~lowbit.methods.rotation.apply_rotations`.
    """
    from ..nn.attention import install_attention, is_installed, uninstall_attention
    from ..kv.base import KVQuantizer
    from ..nn.online import ActQuantizer, online_hadamard

    adapter = check_rotatable(model, adapter)
    d = adapter.dims(model)
    layers = adapter.decoder_layers(model)
    if calib.dim() != 2 or calib.dtype != torch.long:
        raise ShapeError(f"calib: must be an int64 (n, seqlen) tensor, got {tuple(calib.shape)} {calib.dtype}")
    seqlen = min(seqlen, calib.shape[1])
    init = quarot_rotations(d.hidden, d.head_dim, len(layers), seed)
    dtype = next(model.parameters()).dtype
    r1 = nn.Parameter(init.r1.to(dtype))
    r2s = [nn.Parameter(r.to(dtype)) for r in init.r2]
    quant = ActQuantizer(**(act or {"bits": 4, "sym": True, "clip_ratio": 0.9}))

    hooks: list = []
    saved_attn: list = []
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)

    def sandwich_r1(_m, _inp, out):
        return quant(out @ r1) @ r1.T

    layer: Any
    try:
        for li, layer in enumerate(layers):
            attn, r2 = adapter.attention(layer), r2s[li]
            v, o, down = adapter.linears(layer, ("v", "o", "down"))
            hooks.append(adapter.attn_norm(layer).register_forward_hook(sandwich_r1))
            hooks.append(adapter.mlp_norm(layer).register_forward_hook(sandwich_r1))
            hooks.append(v.register_forward_hook(lambda m, i, out, r2=r2: _per_head(out, r2, d.head_dim)))
            hooks.append(
                o.register_forward_pre_hook(
                    lambda m, args, r2=r2: (_per_head(quant(args[0]), r2.T, d.head_dim),) + tuple(args[1:])
                )
            )
            if online_down:
                hooks.append(
                    down.register_forward_pre_hook(
                        lambda m, args: (online_hadamard(quant(online_hadamard(args[0])), inverse=True),) + tuple(args[1:])
                    )
                )
            else:
                hooks.append(down.register_forward_pre_hook(lambda m, args: (quant(args[0]),) + tuple(args[1:])))
            if online_qk or kv is not None:
                # the attention's own state, restored as is afterwards (a calibrated quantizer included)
                saved_attn.append((attn, is_installed(attn), bool(getattr(attn, "lowbit_rotate_qk", False)), attn._modules.get("lowbit_kv")))
                kvq = KVQuantizer(d.n_kv_heads, d.head_dim, **kv) if kv is not None else None
                install_attention(attn, rotary=adapter.rotary(model), rotate_qk=online_qk, kv=kvq)

        params = [r1, *r2s]
        opt = CayleySGD(params, lr=lr, momentum=momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))  # as SpinQuant's trainer
        gen = torch.Generator().manual_seed(int(seed))
        n_train = calib.shape[0] - val_rows if 0 < val_rows < calib.shape[0] else calib.shape[0]
        val_ids = calib[n_train:, :seqlen] if n_train < calib.shape[0] else None

        def held_out_loss(ids: torch.Tensor) -> float:
            with torch.no_grad():
                total = 0.0
                for i in range(ids.shape[0]):
                    total += float(model(ids[i : i + 1], labels=ids[i : i + 1], use_cache=False).loss)
                return total / ids.shape[0]

        val_losses: list = []
        best: Optional[tuple[float, list]] = None
        if val_ids is not None:
            val_losses.append((0, held_out_loss(val_ids)))
            best = (val_losses[-1][1], [p.detach().double().clone() for p in params])
        losses = []
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="spinquant", unit="step")
        for step in range(steps):
            rows = torch.randint(0, n_train, (batch_size,), generator=gen)
            start = int(torch.randint(0, calib.shape[1] - seqlen + 1, (1,), generator=gen))
            ids = calib[rows, start : start + seqlen]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log.isEnabledFor(logging.DEBUG):
                g, w, a = opt.state[r1]["last"]
                log.debug("step %d loss %.4f |G1| %.3g |W1| %.3g alpha %.3g", step, losses[-1], g, w, a)
            if val_ids is not None and ((step + 1) % max(1, eval_every) == 0 or step + 1 == steps):
                val_losses.append((step + 1, held_out_loss(val_ids)))
                if best is None or val_losses[-1][1] < best[0]:
                    best = (val_losses[-1][1], [opt.state[p]["x"].clone() for p in params])
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {losses[-1]:.3f}")
        if bar is not None:
            bar.close()
        model.train(was_training)
        seconds = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
        for attn, was_installed, rotate_qk, old_kv in saved_attn:
            uninstall_attention(attn)
            if was_installed:
                install_attention(attn, rotary=adapter.rotary(model), rotate_qk=rotate_qk, kv=old_kv)

    if best is not None:
        chosen = best[1]
    else:
        chosen = [opt.state[p]["x"].clone() if p in opt.state else p.detach().double().clone() for p in params]
    rot = Rotations(
        r1=chosen[0],
        r2=chosen[1:],
        online_qk=online_qk,
        online_down=online_down,
        source="spinquant",
    )
    log.info("spinquant: %d steps in %.1f s, loss %.4f -> %.4f", steps, seconds, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return SpinQuantResult(rot, losses, seconds, val_losses)


def spinquant(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    adapter: Optional[Adapter] = None,
    **kwargs: Any,
) -> SpinQuantResult:
    """Fuse the norms, learn the rotations (:func:`learn_rotations`, same keyword arguments) and
    apply them to ``model`` in place."""
    adapter = check_rotatable(model, adapter)
    fuse_norms(model, adapter)
    res = learn_rotations(model, calib, adapter=adapter, **kwargs)
    apply_rotations(model, res.rotations, adapter)
    return res


def _rotate(step, model, adapter, recipe, calib, progress):
    """SpinQuant against the recipe's own activation quantizer and (plain per-token) KV quantizer."""
    act = recipe.activation.quantizer_config() if recipe.activation is not None else None
    kv = None
    if recipe.kv is not None and recipe.kv.method == "uniform":
        kv = recipe.kv.quantizer_config(adapter.dims(model).head_dim)
    res = spinquant(
        model, calib, adapter=adapter, act=act, kv=kv, steps=step.steps, lr=step.lr, momentum=step.momentum,
        seqlen=step.seqlen, batch_size=step.batch_size, seed=step.seed, online_qk=step.online_qk,
        online_down=step.online_down, progress=progress,
    )
    return res.rotations, res.losses


def _register() -> None:
    from .registry import RotationMethod, register_rotation

    register_rotation(RotationMethod("spinquant", _rotate, needs_calibration=True))


_register()
