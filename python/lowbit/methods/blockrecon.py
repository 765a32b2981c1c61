"""Block reconstruction: the one engine that trains a few parameters of a decoder block against
the full-precision block's output, on the captured calibration activations.

Learned post-training methods (OmniQuant's clipping, TesseraQ's rounding, QuIP#'s fine-tuning of
scales) share it. The pieces, each usable alone:

* :class:`BlockData` — what the layer loop captured for one block: the *quantized* chain's inputs
  (the blocks before it already quantized), the keyword arguments of the block, and two targets:
  the full-precision block's output on the full-precision chain (``targets``, OmniQuant's main
  loss) and on the quantized chain (``fp_outs``, OmniQuant's ``aug_loss``);
* :func:`fake_quantized` — the block's linears compute their weight through a
  :class:`WeightParametrization` (fake quantization with a straight-through estimator) while the
  context is open, via :mod:`torch.nn.utils.parametrize`; nothing of it survives the context;
* :func:`adam_steps` — the training loop: Adam (or AdamW, per parameter group) on a loss function
  of the step, stopping on a non-finite loss;
* :func:`kept_if_better` — run a training, keep its parameters only if the held-back loss went down;
* :func:`reconstruct` — all of it for one block: micro-batches, a held-back part of the
  calibration sequences never trained on, the relative MSE, bf16 autocast where asked.

A method's merge (turning its trained parametrization into codes and scales for the packed
:class:`~lowbit.nn.QuantLinear`) is the parametrization's :meth:`WeightParametrization.quantized`.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ValueRangeError

__all__ = [
    "BlockData",
    "WeightParametrization",
    "fake_quantized",
    "quantized_inputs",
    "observe_inputs",
    "adam_steps",
    "kept_if_better",
    "reconstruct",
    "rel_loss",
    "round_ste",
    "fp16_ste",
    "fp16_round_ste",
    "split_batches",
    "CALIB_SAMPLES",
]

#: calibration sequences a block-trained method's default run takes (``WeightMethod.calib_samples``):
#: each is an Adam step per block and epoch, so this paces the run — 32×512 tokens keep every
#: preset's default run on the bundled model within 25 minutes on 2 cores; ``--calib-samples``
#: scales it up
CALIB_SAMPLES = 32


@dataclass
class BlockData:
    """The calibration activations of one decoder block.

    Attributes:
        inps: the quantized chain's inputs, one ``(b, seqlen, hidden)`` tensor per captured batch.
        kwargs: the keyword arguments the model passes the block, one dict per batch.
        targets: the full-precision block's outputs on the full-precision chain's inputs (the same
            shapes as ``inps``).
        fp_outs: the full-precision block's outputs on ``inps`` (the quantized chain).
        autocast: run the training passes under CPU autocast in this dtype (``None``: float32).
        adapter: the architecture's adapter (roles, norms), for methods that transform the block.
        dims: the model's :class:`~lowbit.models.adapters.Dims` (head counts and widths).
        act: the recipe's activation quantizer (:meth:`lowbit.recipe.ActQuant.quantizer_config`),
            or ``None``: a method trains with it on every linear's input.
        following: the decoder blocks after this one, still full precision (read only), for a
            loss that looks ahead (CQE+'s cross-layer learning).
    """

    inps: Sequence[torch.Tensor]
    kwargs: Sequence[dict]
    targets: Sequence[torch.Tensor]
    fp_outs: Sequence[torch.Tensor]
    autocast: Optional[torch.dtype] = None
    adapter: Any = None
    dims: Any = None
    act: Optional[dict] = None
    following: Sequence[nn.Module] = ()

    @property
    def n_sequences(self) -> int:
        return int(sum(x.shape[0] for x in self.inps))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16-representable values (at least the smallest fp16 scale) forward,
    identity backward: a trained scale is the one a checkpoint stores."""
    from ..grids.uniform import FP16_MIN_SCALE

    r = x.detach().half().float().clamp_min(FP16_MIN_SCALE)
    return x + (r - x).detach()


def fp16_round_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value, sign kept (a norm weight may be negative or
    tiny; it is not clamped like :func:`fp16_ste`'s scales), identity backward. Finite: values
    past fp16's range are refused by the checkpoint, so they are clamped to ±65504 here."""
    r = x.detach().clamp(-65504.0, 65504.0).half().float()
    return x + (r - x).detach()


def rel_loss(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``‖y − t‖² / ‖t‖²`` in float32 (a scalar)."""
    y, t = y.float(), t.float()
    return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _slice(v: Any, sl: slice, b: int) -> Any:
    """``v`` with every tensor whose first axis is the batch (``b > 1``) sliced, recursively."""
    if isinstance(v, torch.Tensor):
        return v[sl] if b > 1 and v.dim() > 0 and v.shape[0] == b else v
    if isinstance(v, (tuple, list)):
        return type(v)(_slice(u, sl, b) for u in v)
    return v


def split_batches(inps: Sequence[torch.Tensor], kwargs: Sequence[dict], *targets: Sequence[torch.Tensor], batch: int) -> list[tuple]:
    """Split captured batches into micro-batches of ``batch`` sequences.

    Returns ``[(x, kw, t_1, …, t_k), ...]``: ``x`` and every target float32 ``(≤ batch, seqlen,
    hidden)``, ``kw`` the block's keyword arguments sliced to the same sequences.
    """
    out = []
    for i, (x, kw) in enumerate(zip(inps, kwargs)):
        b = x.shape[0]
        for j in range(0, b, batch):
            sl = slice(j, j + batch)
            out.append((x[sl].float(), {k: _slice(v, sl, b) for k, v in kw.items()}, *(t[i][sl].float() for t in targets)))
    return out


class WeightParametrization(nn.Module, abc.ABC):
    """A trainable fake quantization of one linear's weight (OmniQuant's LWC, TesseraQ's rounding)."""

    @abc.abstractmethod
    def forward(self, W: torch.Tensor) -> torch.Tensor:
        """``W (out, in) float32 → Ŵ`` of the same shape, differentiable in the parameters."""

    @abc.abstractmethod
    def quantized(self, W: torch.Tensor) -> Any:
        """The merge: a :class:`~lowbit.grids.QuantizedWeight` (codes, fp16 scales) whose
        dequantized weight is exactly ``forward(W)``."""


@contextlib.contextmanager
def fake_quantized(block: nn.Module, quantizers: dict[str, nn.Module]) -> Iterator[None]:
    """Within the context, each ``block.get_submodule(name).weight`` is ``quantizers[name](W)``
    (a key ``"name:bias"`` parametrizes that module's ``bias`` instead).

    The modules' own tensors stay untouched (the parametrization keeps the original tensor and
    the context restores it on exit, whatever happens inside).
    """
    done: list[tuple[nn.Module, str]] = []
    try:
        for key, q in quantizers.items():
            path, _, tensor = key.partition(":")
            mod = block.get_submodule(path)
            parametrize.register_parametrization(mod, tensor or "weight", q, unsafe=True)
            done.append((mod, tensor or "weight"))
        yield
    finally:
        for mod, tensor in done:
            parametrize.remove_parametrizations(mod, tensor, leave_parametrized=False)


@torch.no_grad()
def observe_inputs(block: nn.Module, modules: Sequence[nn.Module], data: BlockData, sink: Callable[[int, torch.Tensor], None]) -> None:
    """Run ``block`` (float32) on ``data``'s inputs and hand each input of ``modules[i]`` to
    ``sink(i, x)`` (``x`` detached float32 ``(b, seqlen, in_features)``): the block's calibration
    statistics (Hessians, activation ranges) come from here."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: sink(i, args[0].detach().float())) for i, m in enumerate(modules)]
    try:
        for x, kw in zip(data.inps, data.kwargs):
            block(x.float(), **kw)
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def quantized_inputs(linears: Sequence[nn.Module], act: Optional[dict]) -> Iterator[None]:
    """Within the context, each linear's input goes through the activation quantizer ``act``
    (straight-through gradient), after the online Hadamard it already has; ``None`` changes nothing."""
    from ..nn.online import InputTransform, attach_input_transform, input_transform_of

    if act is None:
        yield
        return
    old = [input_transform_of(m) for m in linears]
    try:
        for m, t in zip(linears, old):
            attach_input_transform(m, InputTransform(hadamard=t is not None and t.hadamard, act=act))
        yield
    finally:
        for m, t in zip(linears, old):
            attach_input_transform(m, t)


def adam_steps(
    groups: list[dict],
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    *,
    after_step: Optional[Callable[[int, float], Optional[bool]]] = None,
) -> bool:
    """The training loop: ``steps`` Adam steps on ``step_loss(step)`` (AdamW for a group with a
    ``weight_decay``), each with a fresh backward pass.

    Args:
        groups: torch optimizer parameter groups (``{"params": [...], "lr": ..., "weight_decay": ...}``).
        step_loss: the loss of step ``i`` (a scalar tensor with a graph to the parameters).
        steps: number of steps.
        after_step: called with ``(i, loss)`` after each step (a projection, a progress bar, an
            early stop: the loop ends when it returns True).

    Returns:
        False when a loss was not finite (the loop stops there; the caller's keep-if-better check
        then restores the parameters), else True.
    """
    groups = [g for g in groups if g["params"]]
    if not groups or steps <= 0:
        return True
    opt = torch.optim.AdamW(groups, weight_decay=0.0) if any(g.get("weight_decay") for g in groups) else torch.optim.Adam(groups)
    with torch.enable_grad():
        for i in range(steps):
            loss = step_loss(i)
            if not bool(torch.isfinite(loss)):
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None and after_step(i, float(loss.detach())) is True:
                break
    return True


def kept_if_better(params: Sequence[torch.Tensor], evaluate: Callable[[], float], train: Callable[[], Any]) -> tuple[float, float, bool]:
    """``evaluate()``, ``train()``, ``evaluate()`` again; the ``params`` keep their trained values
    only if the second loss is lower (a NaN never is), else they get their old values back.

    Returns ``(before, after, kept)``; ``after == before`` when not kept.
    """
    saved = [p.detach().clone() for p in params]
    before = evaluate()
    train()
    after = evaluate()
    kept = math.isfinite(after) and after < before
    if not kept:
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
        after = before
    return before, after, kept


def check_recon_options(opts: dict, *, ints: Sequence[str] = (), positive: Sequence[str] = (), fractions: Sequence[str] = (),
                        bools: Sequence[str] = ()) -> None:
    """Typed checks of block-reconstruction options (``ValueRangeError`` naming the option)."""
    for k in ints:
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueRangeError(f"options: {k} must be a non-negative int, got {v!r}")
    for k in positive:
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise ValueRangeError(f"options: {k} must be a positive number, got {v!r}")
    for k in fractions:
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueRangeError(f"options: {k} must be in [0, 1), got {v!r}")
    for k in bools:
        if not isinstance(opts[k], bool):
            raise ValueRangeError(f"options: {k} must be a bool, got {opts[k]!r}")


class Reconstruction:
    """The data side of one block's reconstruction: micro-batches, the held-back part, the loss.

    Args:
        block: the decoder block (float32 parameters), its linears possibly parametrized.
        data: the block's :class:`BlockData`.
        batch: sequences per training step.
        held_out: fraction of the calibration sequences held back (never trained on) to decide
            whether a training is kept (at least one sequence; all of them when there is one).
        aug_loss: add the relative error against ``fp_outs`` (the full-precision block on the
            quantized chain) to the one against ``targets``.
        seed: the draw of the training micro-batches.
        ahead: also add the relative error after the next ``ahead`` full-precision blocks
            (``data.following``), against the full-precision chain through them.
    """

    def __init__(self, block: nn.Module, data: BlockData, *, batch: int = 1, held_out: float = 0.125,
                 aug_loss: bool = False, seed: int = 0, ahead: int = 0) -> None:
        self.block, self.data, self.aug = block, data, bool(aug_loss)
        self.ahead = list(data.following[:ahead])
        ahead_targets = []
        with torch.no_grad():
            t = list(data.targets)
            for nxt in self.ahead:
                t = [self._run(nxt, x.float(), kw).detach() for x, kw in zip(t, data.kwargs)]
                ahead_targets.append(t)
        micro = split_batches(data.inps, data.kwargs, data.targets, data.fp_outs, *ahead_targets, batch=1)
        n_held = min(len(micro), max(1, int(round(held_out * len(micro)))))
        self.held = micro[:n_held]
        train = micro[n_held:] or micro
        self.train = [self._merge(train[i : i + batch]) for i in range(0, len(train), batch)]
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    @staticmethod
    def _merge(items: list[tuple]) -> tuple:
        if len(items) == 1:
            return items[0]
        x = torch.cat([it[0] for it in items])
        kw = items[0][1]  # the block's kwargs do not depend on the sequence (one mask, one RoPE)
        return (x, kw, *(torch.cat([it[k] for it in items]) for k in range(2, len(items[0]))))

    @property
    def epoch_steps(self) -> int:
        """Training steps in one pass over the training micro-batches."""
        return len(self.train)

    def _run(self, module: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.data.autocast or torch.bfloat16, enabled=self.data.autocast is not None and x.device.type == "cpu"):
            return _first(module(x, **kw))

    def loss(self, item: tuple) -> torch.Tensor:
        x, kw, t, t_aug, *t_ahead = item
        y = self._run(self.block, x, kw)
        loss = rel_loss(y, t)
        if self.aug:
            loss = loss + rel_loss(y, t_aug)
        for nxt, tj in zip(self.ahead, t_ahead):
            y = self._run(nxt, y.float(), kw)
            loss = loss + rel_loss(y, tj)
        return loss

    def step_loss(self, _: int) -> torch.Tensor:
        """The loss of the next training micro-batch (each epoch a fresh random order)."""
        if not self.order:
            self.order = torch.randperm(len(self.train), generator=self.gen).tolist()
        return self.loss(self.train[self.order.pop()])

    def evaluate(self) -> float:
        """Mean loss on the held-back sequences (no gradients)."""
        with torch.no_grad():
            return float(sum(float(self.loss(it)) for it in self.held) / len(self.held))


def reconstruct(
    block: nn.Module,
    data: BlockData,
    groups: list[dict],
    *,
    epochs: float = 1.0,
    batch: int = 1,
    held_out: float = 0.125,
    aug_loss: bool = False,
    seed: int = 0,
    train: Optional[Callable[[Reconstruction], Any]] = None,
    state: Optional[Sequence[torch.Tensor]] = None,
    after_step: Optional[Callable[[int, int], None]] = None,
    ahead: int = 0,
) -> tuple[float, float, bool]:
    """Train the parameters of ``groups`` so that ``block`` on the quantized chain's inputs
    reproduces the full-precision targets; keep them only if the held-back loss went down.

    Args:
        block: the decoder block; every parameter not in ``groups`` stays frozen.
        data: its :class:`BlockData`.
        groups: Adam parameter groups of leaf tensors (``lr`` per group, ``weight_decay`` → AdamW).
        epochs: passes over the training micro-batches (Adam steps = ``epochs`` × their number;
            ignored when ``train`` is given).
        batch, held_out, aug_loss, seed: as :class:`Reconstruction`.
        train: a custom schedule ``train(recon)`` in place of one :func:`adam_steps` run (TesseraQ's
            stages, each a fresh optimizer); it calls :func:`adam_steps` with ``recon.step_loss``.
        state: every tensor the training changes, restored when the result is not kept (default:
            the parameters of ``groups``; a schedule that also changes buffers lists them too).
        after_step: called as ``after_step(step, epoch_steps)`` after each Adam step (a mask
            schedule, a projection back into a feasible set).
        ahead: as :class:`Reconstruction` (the following blocks stay frozen).

    Returns:
        ``(before, after, kept)``: the held-back relative error before and after training.
    """
    params = [p for g in groups for p in g["params"]]
    frozen = [p for m in (block, *data.following[:ahead]) for p in m.parameters()]
    flags = {id(p): p.requires_grad for p in frozen}
    recon = Reconstruction(block, data, batch=batch, held_out=held_out, aug_loss=aug_loss, seed=seed, ahead=ahead)
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        steps = int(round(epochs * recon.epoch_steps))
        hook = None if after_step is None else (lambda i, _loss: after_step(i, recon.epoch_steps))
        run = (lambda: train(recon)) if train is not None else (lambda: adam_steps(groups, recon.step_loss, steps, after_step=hook))
        return kept_if_better(params if state is None else state, recon.evaluate, run)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
