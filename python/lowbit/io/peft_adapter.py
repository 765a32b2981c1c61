"""The low-rank branches of a quantized model as a peft LoRA adapter folder (the ecosystem's format).

A branch ``y += (x·A)·B`` is LoRA's ``y += scaling · x·lora_Aᵀ·lora_Bᵀ`` with ``lora_A = Aᵀ``
``(r, in)``, ``lora_B = Bᵀ`` ``(out, r)`` and ``lora_alpha = r`` (``scaling = alpha / r = 1``). The
adapter's base is the quantized model's dense equivalent — each linear's dequantized weight
``Q(W)``, its other parameters as stored — so it only maps when the branch multiplies the linear's
plain input: a linear with an online Hadamard or activation quantizer (``lowbit.nn.online``) is
refused, since a peft base model would not apply them.

Written with the checkpoint's guarantees: a staging folder published atomically, a manifest of
what was written, nothing of the user's overwritten (``overwrite`` replaces only a folder a lowbit
save wrote).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import ValueRangeError
from ..nn.lowrank import lowrank_of
from ..nn.online import input_transform_of
from .checkpoint import _write_json, publish_folder

__all__ = ["save_peft_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``({peft key: fp16 tensor}, {module name: rank})`` of every branch of ``model``.

    Raises:
        ValueRangeError: no branch at all, or a branched linear with an online input transform.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, mod in model.named_modules():
        b = lowrank_of(mod)
        if b is None:
            continue
        t = input_transform_of(mod)
        if t is not None and (t.hadamard or t.act is not None):
            raise ValueRangeError(
                f"model: {name} applies an online {'Hadamard' if t.hadamard else 'activation quantizer'} to its input, "
                "which a peft base model does not; its branch has no LoRA equivalent"
            )
        ranks[name] = b.rank
        tensors[f"base_model.model.{name}.lora_A.weight"] = b.A.detach().t().contiguous().half().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.B.detach().t().contiguous().half().cpu()
    if not ranks:
        raise ValueRangeError("model: has no low-rank branches to export (a recipe with a LowRank step attaches them)")
    return tensors, ranks


def save_peft_adapter(model: nn.Module, out_dir: Union[str, os.PathLike], *, overwrite: bool = False,
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s low-rank branches as a peft LoRA adapter folder (``adapter_config.json``
    and ``adapter_model.safetensors``, fp16) that ``peft.PeftModel.from_pretrained`` loads onto
    the model's dense equivalent (see the module docstring).

    Args:
        model: a model :func:`lowbit.quantize` gave branches (``LowRank`` step), or one loaded.
        out_dir: the folder to create.
        overwrite: replace an existing folder a lowbit save wrote (never anything else).
        base_model_name_or_path: recorded in the config (peft's field; informative).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        ValueRangeError: no branches, or a branch peft cannot express (see :func:`peft_tensors`).
        CheckpointError: ``out_dir`` exists (without ``overwrite``) or holds files lowbit did not
            write; the folder cannot be written.
    """
    from safetensors.torch import save_file

    tensors, ranks = peft_tensors(model)
    r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank; the others by pattern
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: k for n, k in ranks.items() if k != r},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    out_dir = Path(os.path.abspath(out_dir))

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(config, tmp / ADAPTER_CONFIG)

    publish_folder(out_dir, write, overwrite=overwrite)
    return out_dir
