"""The layer-by-layer loop: quantize a causal LM one decoder layer at a time.

For a calibration batch ``(n, seqlen)``:

1. run the embeddings and capture the inputs of decoder layer 0 (and the keyword arguments the
   model passes every layer: attention mask, rotary position embeddings, …);
2. for each layer: run it on the captured inputs with forward hooks that accumulate one Hessian
   ``2·XᵀX`` per group of linears sharing an input (q/k/v; o; gate/up; down), keeping the
   full-precision outputs (with ``true_sequential``, the default of :class:`WeightQuant`, only
   q/k/v's Hessian comes from this pass: each later group's is taken from the block with the
   groups before it already quantized, the forward stopped at that group); quantize every linear
   with the recipe's weight method and swap in the stored layer it makes; run the registered
   hooks (between groups, after the block); run the *quantized* layer to get the next layer's
   inputs (and the layer's relative output error against the full-precision outputs);
3. only one layer's activations and Hessians are alive at a time (a method that needs the
   diagonal Fisher gets it for every decoder linear, computed once up front from calibration
   gradients).

Every method — weights, rotations, KV cache — is looked up in :mod:`lowbit.methods.registry`;
this module names none of them.

The loop follows IST-DASLab's ``llama_sequential`` without its habits: configuration is passed
explicitly, logging goes through :mod:`logging`, progress through tqdm.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .errors import ShapeError
from .eval import check_fits_model
from .io.checkpoint import round_to_storage
from .methods import HessianAccumulator
from .methods.registry import kv_method, post_weight_method, rotation_method, weight_method
from .models.adapters import get_adapter
from .nn import attach_input_transform, input_transform_of
from .recipe import DEFAULT_PRESET, ActQuant, KVQuant, Recipe, resolve

log = logging.getLogger(__name__)

__all__ = ["quantize", "QuantReport", "LayerStats"]


@dataclass
class LayerStats:
    """What happened to one linear layer."""

    name: str
    method: str
    bits: float
    group_size: Optional[int]
    rel_weight_error: float
    loss: Optional[float]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bits_per_weight": self.bits,
            "rel_weight_error": self.rel_weight_error,
            "loss": self.loss,
            "seconds": self.seconds,
        }


@dataclass
class QuantReport:
    """Per-layer errors and per-stage times of one :func:`quantize` run."""

    recipe: Recipe
    layers: list[LayerStats] = field(default_factory=list)
    block_output_error: dict[int, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    hadamards: dict[str, str] = field(default_factory=dict)  # rotation -> Hadamard plan used
    rotation_losses: list = field(default_factory=list)  # SpinQuant's loss per step
    finetune: dict[int, tuple[float, float]] = field(default_factory=dict)  # block -> output error before/after tuning
    e2e_loss: Optional[tuple[float, float]] = None  # held-out cross-entropy before/after end-to-end tuning
    references: Optional[dict] = None  # linear -> float weight as quantized, while a post-weight step needs it

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by :func:`_capture`'s hook to end a forward pass once the input it wants is captured."""


_DROPPED_KWARGS = ("past_key_value", "past_key_values")


@torch.no_grad()
def _capture(
    root: nn.Module,
    target: nn.Module,
    calls: Iterable[tuple[torch.Tensor, dict]],
    sink: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Run ``root(x, **kw)`` for each ``(x, kw)`` of ``calls`` up to its first call of the submodule
    ``target``, capture ``target``'s input there and skip the rest of the forward pass.

    The one capture path of the loop, used two ways:

    * ``target`` = decoder layer 0, ``root`` = the model, ``calls`` = ``(ids, {"use_cache": False})``
      per calibration batch, ``ids`` an int64 ``(b, seqlen)`` slice of ``calib`` (``b`` =
      ``batch_size``, the last batch possibly smaller). Returns ``(inputs, kwargs)``, one entry per
      call: ``inputs[i]`` the hidden states entering layer 0, ``(b, seqlen, hidden)`` in the dtype of
      the model's forward (its parameters' dtype), detached; ``kwargs[i]`` the keyword arguments the
      model passes every decoder layer (attention mask or ``None``, ``position_ids`` int64
      ``(1, seqlen)``, ``position_embeddings`` the rotary ``(cos, sin)``, each ``(1, seqlen,
      head_dim)`` in the forward's dtype, …) without ``past_key_value`` / ``past_key_values`` and with
      ``use_cache=False``, so that ``layer(inputs[i], **kwargs[i])`` runs the layer alone.
    * ``target`` = a linear of a decoder block, ``root`` = the block, ``calls`` = the captured
      ``zip(inputs, kwargs)``, ``sink`` = a :class:`~lowbit.methods.HessianAccumulator`'s
      ``add_batch``: each input of the linear, ``(b, seqlen, in_features)`` in the block's dtype,
      detached, is handed to ``sink`` and dropped at once (nothing is kept; returns ``([], [])``).

    ``target``'s input is its first positional argument (or its ``hidden_states`` keyword).
    ``target`` stays in place: a forward pre-hook, removed on return, does the capture.
    """
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def grab(module, args, kw):
        x = (args[0] if args else kw["hidden_states"]).detach()
        if sink is not None:
            sink(x)
        else:
            inputs.append(x)
            kept = {k: v for k, v in kw.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
            kept["use_cache"] = False
            kwargs.append(kept)
        raise _Stop

    hook = target.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x, kw in calls:
            try:
                root(x, **kw)
            except _Stop:
                pass
    finally:
        hook.remove()
    return inputs, kwargs


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def quantize(
    model: nn.Module,
    recipe: Any = DEFAULT_PRESET,
    calib: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 8,
    calib_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Apply ``recipe`` to ``model`` in place, layer by layer where it quantizes weights, and return it.

    The steps run in a fixed order: rotation (folded into the weights, online parts attached),
    weights (each linear quantized by the registered method and replaced by its stored layer),
    the post-weight steps (the embeddings and head, :class:`~lowbit.recipe.EmbedQuant`), then the
    unquantized parameters are rounded to the values a checkpoint stores
    (:func:`lowbit.io.checkpoint.round_to_storage`, fp16), activations (a per-token quantizer on
    every decoder linear's input), KV cache (a quantizer in every attention, calibrated here if
    its method calibrates).

    Args:
        model: a Hugging Face causal LM with a supported architecture (Llama, Qwen2, Mistral).
        recipe: a preset name (see :data:`lowbit.recipe.PRESETS`), a
            :class:`~lowbit.recipe.Recipe`, or steps.
        calib: ``(n, seqlen)`` int64 calibration token ids (see :func:`lowbit.data.calibration`);
            required when a step needs data (``recipe.needs_calibration``).
        batch_size: calibration sequences per forward pass.
        calib_dtype: dtype of the weight-calibration forward passes (``None``: the model's). The
            weights are always quantized from the model's own (fp32) copy; ``torch.bfloat16`` runs
            the passes ~3× faster on CPUs with AMX/AVX-512-BF16, at a small cost in Hessian precision.
        progress: show progress bars.
        overrides: fields replacing the weight step's (``bits=3``, ``group_size=128``, …).

    Returns:
        The same model; ``model.lowbit_report`` holds a :class:`QuantReport` (per-layer errors,
        stage times, the Hadamard plan of every rotation) and ``model.lowbit_recipe`` the recipe.

    Raises:
        UnsupportedModelError: no adapter for the architecture (rotations need one too).
        ShapeError: missing or malformed ``calib`` when the recipe needs it; a model with meta tensors.
        ValueRangeError: ``calib`` windows longer than the model's ``max_position_embeddings`` or
            token ids outside its vocabulary.
    """
    recipe = resolve(recipe, **overrides)
    adapter = get_adapter(model)
    if recipe.needs_calibration:
        if calib is None:
            raise ShapeError(f"calib: recipe {recipe.name or recipe.describe()!r} needs calibration token ids (n, seqlen); got None")
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
            got = f"{tuple(calib.shape)} {calib.dtype}" if isinstance(calib, torch.Tensor) else type(calib).__name__
            raise ShapeError(f"calib: must be an int64 (n, seqlen) tensor, got {got}")
        check_fits_model(model, calib, "calib")
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ShapeError(f"model: {name} is a meta tensor (no data); load the weights before quantizing")
    report = QuantReport(recipe)
    was_training = model.training
    model.eval()
    try:
        if recipe.rotation is not None:
            t = time.perf_counter()
            _rotate(model, adapter, recipe, calib, report, progress)
            report.stage_seconds["rotate"] = time.perf_counter() - t
        posts = [(step, post_weight_method(step)) for step in recipe.steps]  # whole-model steps after the weight step
        posts = [(step, post) for step, post in posts if post is not None]
        if any(post.needs_reference for _, post in posts):
            report.references = {}  # the float weights as quantized, for the post-weight steps only
        if recipe.weight is not None:
            _quantize_weights(model, adapter, recipe.weight, calib, report, batch_size, calib_dtype, progress)
            method = weight_method(recipe.weight.method)
            if method.after_model is not None:
                t = time.perf_counter()
                result = method.after_model(recipe.weight, model, calib, calib_dtype)
                if result is not None:
                    report.e2e_loss = result
                    report.stage_seconds["finetune_e2e"] = time.perf_counter() - t
        for step, post in posts:
            t = time.perf_counter()
            if post.needs_reference:
                stats = post.apply(step, model, adapter, calib, references=report.references) or []
            else:
                stats = post.apply(step, model, adapter, calib) or []
            secs = time.perf_counter() - t
            _report_rows(report, step.method, stats, secs)
            report.stage_seconds[step.step] = secs
        report.references = None
        # the unquantized parameters take the values a checkpoint stores (fp16), so that the
        # in-memory model is the one lowbit.load gives back and the online steps calibrate on it
        round_to_storage(model)
        if recipe.activation is not None:
            _attach_act_quant(model, adapter, recipe.activation)
        if recipe.kv is not None:
            t = time.perf_counter()
            _install_kv(model, adapter, recipe.kv, calib)
            report.stage_seconds["kv"] = time.perf_counter() - t
    finally:
        model.train(was_training)
    model.lowbit_report, model.lowbit_recipe = report, recipe
    return model


def _report_rows(report: QuantReport, method: str, stats: list, secs: float) -> None:
    """A post-weight step's ``(name, bits, error)`` rows into ``report.layers``: a layer the weight
    step reported gets the new bits and error (method ``"<weight method>+<method>"``, the time
    added), another is a new row."""
    index = {s.name: i for i, s in enumerate(report.layers)}
    for name, bits, err in stats:
        per = secs / len(stats)
        i = index.get(name)
        if i is None:
            report.layers.append(LayerStats(name, method, bits, None, err, None, per))
        else:
            old = report.layers[i]
            report.layers[i] = LayerStats(name, f"{old.method}+{method}", bits, old.group_size, err, old.loss, old.seconds + per)


def _rotate(model, adapter, recipe: Recipe, calib, report: QuantReport, progress: bool) -> None:
    from .methods.rotation import hadamard_summary

    step = recipe.rotation
    rot, report.rotation_losses = rotation_method(step.method).rotate(step, model, adapter, recipe, calib, progress)
    report.hadamards = hadamard_summary(model, rot, adapter)
    for name, plan in report.hadamards.items():
        if plan.startswith("fallback"):
            log.warning("rotation %s has no exact Hadamard: using the %s", name, plan)


def _attach_act_quant(model, adapter, step: ActQuant) -> None:
    """Give every decoder linear (dense or already quantized) a per-token activation quantizer,
    after its online Hadamard if it has one."""
    from .nn.online import InputTransform, attach_input_transform, input_transform_of

    for layer in adapter.decoder_layers(model):
        for lin in (layer.get_submodule(name) for group in adapter.groups for name in group):
            old = input_transform_of(lin)
            attach_input_transform(lin, InputTransform(hadamard=old is not None and old.hadamard, act=step.quantizer_config()))


def _install_kv(model, adapter, step: KVQuant, calib) -> None:
    """Put a KV quantizer in every attention (keeping its R3 setting), then run the method's calibration."""
    from .nn.attention import install_model_attention

    install_model_attention(model, rotate_qk=None, kv=step.quantizer_config(adapter.dims(model).head_dim))
    method = kv_method(step.method)
    if method.calibrate is not None:
        method.calibrate(step, model, calib)


@torch.no_grad()
def _quantize_weights(model, adapter, step: Any, calib, report: QuantReport, batch_size, calib_dtype, progress) -> None:
    layers = adapter.decoder_layers(model)
    method = weight_method(step.method)
    t_start = time.perf_counter()
    fisher: dict[str, torch.Tensor] = {}
    if "fisher" in method.needs:
        from .methods.fisher import fisher_diagonal

        fisher = fisher_diagonal(model, calib[: step.fisher_samples])
        report.stage_seconds["fisher"] = time.perf_counter() - t_start
        t_start = time.perf_counter()
    if "hessian" not in method.needs and method.quantize_block is None:
        _quantize_data_free(model, adapter, layers, method, step, report, progress)
        report.stage_seconds["quantize"] = time.perf_counter() - t_start
        return

    batches = ((calib[i : i + batch_size], {"use_cache": False}) for i in range(0, calib.shape[0], batch_size))
    inps, kwargs = _capture(model, layers[0], batches)
    if calib_dtype is not None:
        inps = [x.to(calib_dtype) for x in inps]
        kwargs = [_cast_floats(kw, calib_dtype) for kw in kwargs]
    report.stage_seconds["capture"] = time.perf_counter() - t_start
    if method.quantize_block is not None:
        _reconstruct_blocks(model, adapter, layers, method, step, inps, kwargs, report, calib_dtype, progress)
        return
    for key in ("hessians", "quantize", "outputs"):
        report.stage_seconds[key] = 0.0

    bar = _progress(len(layers), progress, report.recipe)
    prefix = _layer_prefix(model, layers)
    sequential = bool(getattr(step, "true_sequential", False))
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        groups = adapter.linear_groups(layer)
        accs = [HessianAccumulator(g[0][1].in_features) for g in groups]
        runner = _runner(layer, calib_dtype)
        hooks = [
            runner.get_submodule(g[0][0]).register_forward_hook(
                lambda m, inp, out, acc=acc: acc.add_batch(inp[0].detach())
            )
            for g, acc in zip(groups[:1] if sequential else groups, accs)
        ]
        try:
            fp_outs = [_first(runner(x, **kw)) for x, kw in zip(inps, kwargs)]
        finally:
            for h in hooks:
                h.remove()
        del runner
        t1 = time.perf_counter()
        report.stage_seconds["hessians"] += t1 - t0

        for gi, (group, acc) in enumerate(zip(groups, accs)):
            if sequential and gi > 0:
                t = time.perf_counter()
                runner = _runner(layer, calib_dtype)
                _capture(runner, runner.get_submodule(group[0][0]), zip(inps, kwargs), sink=acc.add_batch)
                del runner
                dt = time.perf_counter() - t
                report.stage_seconds["hessians"] += dt
                t1 += dt  # not counted as quantize time
            H = acc.hessian
            for name, lin in group:
                if bar is not None:
                    bar.set_postfix_str(f"layer {li} {name}")
                full = f"{prefix}.{li}.{name}"
                ql = _swap_in(report, full, layer, name, lin, method, step, H, fisher.pop(full, None))
                ql.cache_dequantized = True
            del H
            if method.between_groups is not None and gi + 1 < len(groups):
                method.between_groups(step, layer, inps, kwargs, fp_outs, li)
        del accs
        t2 = time.perf_counter()
        report.stage_seconds["quantize"] += t2 - t1
        if method.after_block is not None:
            result = method.after_block(step, layer, inps, kwargs, fp_outs, li)
            if result is not None:
                report.finetune[li] = result
                t3 = time.perf_counter()
                report.stage_seconds["finetune"] = report.stage_seconds.get("finetune", 0.0) + t3 - t2
                t2 = t3

        report.block_output_error[li] = _advance(layer, [n for g in groups for n, _ in g], inps, kwargs, fp_outs, calib_dtype)
        del fp_outs
        report.stage_seconds["outputs"] += time.perf_counter() - t2
        if bar is not None:
            bar.update(1)
        log.info("layer %d: output error %.4f", li, report.block_output_error[li])
    if bar is not None:
        bar.close()


@torch.no_grad()
def _advance(layer, names: list[str], inps: list, kwargs: list, fp_outs: list, calib_dtype) -> float:
    """Run the quantized ``layer`` on ``inps`` (replaced in place by its outputs, the next layer's
    inputs) and return its relative output error against ``fp_outs``; the stored layers ``names``
    drop the dequantized weights they cached for the passes."""
    num = den = 0.0
    runner = _runner(layer, calib_dtype)
    for i, (x, kw) in enumerate(zip(inps, kwargs)):
        y = _first(runner(x, **kw))
        num += float((y - fp_outs[i]).float().pow(2).sum())
        den += float(fp_outs[i].float().pow(2).sum())
        inps[i] = y
    for name in names:
        for mod in (layer, runner):
            ql = mod.get_submodule(name)
            ql.cache_dequantized = False
            ql.clear_cache()
    return (num / max(den, 1e-30)) ** 0.5


def _reconstruct_blocks(model, adapter, layers, method, step, inps, kwargs, report: QuantReport, calib_dtype, progress) -> None:
    """The loop of a block method (``method.quantize_block``): per decoder layer, the full-precision
    outputs on both chains, the method's training and merge, the stored layers swapped in, then
    the quantized layer's outputs as the next layer's inputs. The full-precision chain starts from
    the same layer-0 inputs and runs alongside (one more copy of the activations). With an
    activation step, each quantized layer gets its activation quantizer at once, so the quantized
    chain is the one the model will run (and the method trains with it: ``BlockData.act``)."""
    from .methods.blockrecon import BlockData
    from .nn.online import InputTransform

    fp_inps = list(inps)
    act = report.recipe.activation.quantizer_config() if report.recipe.activation is not None else None
    dims = adapter.dims(model)
    bar = _progress(len(layers), progress, report.recipe)
    prefix = _layer_prefix(model, layers)
    for key in ("outputs", "quantize"):
        report.stage_seconds[key] = 0.0
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        runner = _runner(layer, calib_dtype)
        fp_outs = [_first(runner(x, **kw)) for x, kw in zip(inps, kwargs)]
        targets = [_first(runner(x, **kw)) for x, kw in zip(fp_inps, kwargs)]
        del runner
        groups = adapter.linear_groups(layer)
        linears = [item for g in groups for item in g]
        data = BlockData(inps, kwargs, targets, fp_outs, autocast=calib_dtype, adapter=adapter, dims=dims, act=act,
                         following=layers[li + 1 :])
        t1 = time.perf_counter()
        qweights, result = method.quantize_block(step, layer, groups, data, li)
        per = (time.perf_counter() - t1) / max(1, len(linears))
        if result is not None:
            report.finetune[li] = result
        for name, lin in linears:
            ql = _swap_in(report, f"{prefix}.{li}.{name}", layer, name, lin, method, step, None, quantized=(qweights[name], None), seconds=per)
            ql.cache_dequantized = True
            if act is not None:  # the quantized chain runs as the model will: activations quantized too
                old = input_transform_of(ql)
                attach_input_transform(ql, InputTransform(hadamard=old is not None and old.hadamard, act=act))
        t2 = time.perf_counter()
        report.stage_seconds["quantize"] += t2 - t1
        report.block_output_error[li] = _advance(layer, [n for n, _ in linears], inps, kwargs, fp_outs, calib_dtype)
        fp_inps = targets
        del fp_outs, data
        report.stage_seconds["outputs"] += time.perf_counter() - t2 + (t1 - t0)
        if bar is not None:
            if result is not None:
                bar.set_postfix_str(f"layer {li} loss {result[0]:.4f} → {result[1]:.4f}")
            bar.update(1)
        log.info("layer %d: reconstruction %s, output error %.4f", li, result, report.block_output_error[li])
    if bar is not None:
        bar.close()


def fast_calib_dtype() -> Optional[torch.dtype]:
    """``torch.bfloat16`` where the CPU multiplies bf16 natively (AMX / AVX-512-BF16), else ``None``.

    The CLI uses it for the calibration passes: ~3× faster there, Hessians still accumulated in
    fp32/fp64 and the weights quantized from their fp32 copy.
    """
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def _runner(layer: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """The module the calibration passes run: the layer itself, or a copy cast to ``dtype``."""
    if dtype is None or all(p.dtype == dtype for p in layer.parameters()):
        return layer
    import copy

    return copy.deepcopy(layer).to(dtype)


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _swap_in(
    report: QuantReport,
    full_name: str,
    layer: nn.Module,
    name: str,
    lin: nn.Linear,
    method: Any,
    step: Any,
    hessian: Optional[torch.Tensor],
    fisher: Optional[torch.Tensor] = None,
    *,
    quantized: Optional[tuple] = None,
    seconds: float = 0.0,
) -> nn.Module:
    """Quantize ``lin`` with ``method`` (a registered :class:`~lowbit.methods.registry.WeightMethod`),
    or take its ``quantized`` ``(qweight, loss)`` when a block method made it, put the stored layer
    it makes in its place, record its stats (``seconds`` added to the layer's time)."""
    t = time.perf_counter() - seconds
    W = lin.weight.detach().float()
    qw, loss = quantized if quantized is not None else method.quantize(step, W, hessian, fisher)
    bias = lin.bias.detach() if lin.bias is not None else None
    ql: Any = method.layer().from_quantized(qw, bias)
    if report.references is not None:
        report.references[full_name] = W
    err = float((ql.dequantize_weight() - W).norm() / W.norm().clamp_min(1e-30))
    transform = input_transform_of(lin)
    if transform is not None:  # the online Hadamard / activation quantizer move to the new layer
        attach_input_transform(lin, None)
        attach_input_transform(ql, transform)
    _set_module(layer, name, ql)
    report.layers.append(
        LayerStats(full_name, step.method, ql.bits_per_weight(), getattr(step, "group_size", None), err, loss, time.perf_counter() - t)
    )
    return ql


def _layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    return "layers"


def _quantize_data_free(model, adapter, layers, method, step, report, progress) -> None:
    """The loop of a method that needs no data: every linear quantized from its weight alone."""
    bar = _progress(len(layers), progress, report.recipe)
    prefix = _layer_prefix(model, layers)
    for li, layer in enumerate(layers):
        for group in adapter.linear_groups(layer):
            for name, lin in group:
                _swap_in(report, f"{prefix}.{li}.{name}", layer, name, lin, method, step, None)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _progress(total: int, enabled: bool, recipe: Recipe):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"quantize {recipe.name or recipe.describe()}", unit="layer")
