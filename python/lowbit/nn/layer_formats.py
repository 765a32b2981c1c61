"""Stored layer formats: the registry that a checkpoint's ``quantization_config.layers[*].format``
names (``"packed"``: :class:`~lowbit.nn.QuantLinear`, ``"vq"``: :class:`~lowbit.nn.VQLinear`,
``"embedding"`` / ``"head"``: :class:`~lowbit.nn.quant_embedding.QuantEmbedding` /
:class:`~lowbit.nn.quant_embedding.QuantHead`, the per-row quantized vocabulary matrices).

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
from ..errors import ValueRangeError

__all__ = [
    "LayerFormat",
    "ROLES",
    "register_format",
    "layer_format",
    "layer_formats",
    "entry_format",
    "format_of",
    "stored_layer_classes",
    "replaces_linear",
]


ROLES = ("linear", "vocab")


def replaces_linear(name: str, old: nn.Module, meta: dict) -> Optional[str]:
    """``None`` if ``old`` is an ``nn.Linear`` with the entry's ``in_features``, ``out_features``
    and ``bias``, else what differs (the default :attr:`LayerFormat.replaces`)."""
    if not isinstance(old, nn.Linear):
        return f"{name!r} is a {type(old).__name__}, not a Linear"
    if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
        return (
            f"(in, out) = {(meta['in_features'], meta['out_features'])} but the architecture has "
            f"{(old.in_features, old.out_features)}"
        )
    if (old.bias is not None) != meta["bias"]:
        return f"bias: {meta['bias']} but the architecture's layer has bias={old.bias is not None}"
    return None


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
        replaces: ``(name, old, meta) -> None or message``: whether the architecture's module
            ``old`` (built from the config) is what an entry ``meta`` for ``name`` may replace; a
            message says why not. Default :func:`replaces_linear` (an ``nn.Linear`` of the entry's
            ``in_features``/``out_features``/``bias``).
        link: ``(model, layer, meta) -> None``, optional: called once every layer of a checkpoint is
            installed, for a layer that shares another's storage (a head tied to the embeddings);
            raises ``ValueError``/``TypeError`` with a message naming the field.
        size_fields: the integer metadata fields that are sizes, bounded by the checkpoint reader
            before any module is built from them.
        role: ``"linear"`` for a decoder linear (what :data:`lowbit.nn.QUANT_LINEARS` and the
            online input transforms take), ``"vocab"`` for the embeddings and the output head.
    """

    name: str
    module: type
    fields: dict
    check_metadata: Callable[[dict], None]
    check_tensor: Callable[[Any, str, torch.Tensor, torch.Tensor], Optional[str]]
    has_data: Callable[[Any], bool]
    shape_hint: Optional[Callable[[Any, str], str]] = None
    replaces: Callable[[str, nn.Module, dict], Optional[str]] = replaces_linear
    link: Optional[Callable[[nn.Module, Any, dict], None]] = None
    size_fields: tuple = ("in_features", "out_features")
    role: str = "linear"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueRangeError(f"role: {self.role!r} of layer format {self.name!r} is not one of {ROLES}")


def _load_builtin() -> None:
    from . import quant_embedding, quant_linear, vq_linear  # noqa: F401  (each registers its format)


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


def stored_layer_classes(role: Optional[str] = "linear") -> tuple[type, ...]:
    """The classes of the registered formats of ``role`` (``"linear"``: the decoder linears,
    ``"vocab"``: embeddings and head; ``None``: every format), what a checkpoint's entries build."""
    return tuple(f.module for f in _FORMATS.all().values() if role is None or f.role == role)
