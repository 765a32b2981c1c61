"""Stored layer formats: the registry that a checkpoint's ``quantization_config.layers[*].format``
names (``"packed"``: :class:`~lowbit.nn.QuantLinear`, ``"vq"``: :class:`~lowbit.nn.VQLinear`).

Each layer file registers its format at import: the module class, the typed fields of its
metadata entry, a check of an entry beyond the field types, and a check of each stored tensor.
:mod:`lowbit.io.checkpoint` keeps the file format, the atomic publish and the typed errors, and
asks this registry for everything about a layer; it names no layer class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._registry import Registry

__all__ = ["LayerFormat", "register_format", "layer_format", "layer_formats", "entry_format", "format_of", "stored_layer_classes"]


@dataclass(frozen=True)
class LayerFormat:
    """One stored layer format.

    Attributes:
        name: the ``format`` value of its metadata entries (``"packed"`` is also the default of an
            entry without one).
        module: the layer class; ``module.from_metadata(meta, device=, bias_dtype=)`` builds an empty
            one, ``layer.metadata()`` describes one.
        fields: metadata field → accepted Python types (bool is only accepted where listed).
        check_metadata: ``(meta) -> None``, raising ``ValueError``/``TypeError`` with a message naming
            the field, for what the types do not say (sizes that fit, a packing that matches a kind).
        check_tensor: ``(layer, leaf, tensor, want) -> None or message``: the stored ``tensor`` for
            ``layer``'s ``leaf`` (shape already checked against ``want``); a message says what is wrong.
        has_data: ``(layer) -> bool``: False for a layer on the meta device.
        shape_hint: ``(layer, leaf) -> str``, optional: what a stored tensor's shape follows from,
            appended to a checkpoint's shape error.
    """

    name: str
    module: type
    fields: dict
    check_metadata: Callable[[dict], None]
    check_tensor: Callable[[Any, str, torch.Tensor, torch.Tensor], Optional[str]]
    has_data: Callable[[Any], bool]
    shape_hint: Optional[Callable[[Any, str], str]] = None


def _load_builtin() -> None:
    from . import quant_linear, vq_linear  # noqa: F401  (each registers its format)


_FORMATS: Registry[LayerFormat] = Registry("layer format", _load_builtin)


def register_format(fmt: LayerFormat) -> LayerFormat:
    """Add ``fmt`` under its name (a second, different registration of a name is an error)."""
    return _FORMATS.register(fmt)


def layer_formats() -> dict[str, LayerFormat]:
    """Every registered format, by name."""
    return _FORMATS.all()


def layer_format(name: Any) -> Optional[LayerFormat]:
    """The format called ``name``, or ``None``."""
    return _FORMATS.get(name)


def entry_format(meta: dict) -> Optional[LayerFormat]:
    """The format a checkpoint's metadata entry names (``"packed"`` when it names none), or ``None``."""
    return layer_format(meta.get("format", "packed"))


def format_of(module: nn.Module) -> Optional[LayerFormat]:
    """The format ``module`` is stored in, or ``None`` for a module that is not a stored layer."""
    return next((f for f in _FORMATS.all().values() if isinstance(module, f.module)), None)


def stored_layer_classes() -> tuple[type, ...]:
    """The classes of every registered format (what a checkpoint's layer entries build)."""
    return tuple(f.module for f in _FORMATS.all().values())
