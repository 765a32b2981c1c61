"""The stored (packed) layouts of the quantized layers, as data and pure tensor functions: one file
per layout, read by the stored layers (:mod:`lowbit.nn`) and by the GPU kernels' conversions
(:mod:`lowbit.kernels`) alike, so neither imports the other for it.

* :mod:`~lowbit.layouts.uniform` — the packed uniform / ternary / binary codes of format
  ``packed`` (:class:`~lowbit.nn.QuantLinear`): :class:`~lowbit.layouts.uniform.PackingFormat`,
  :func:`~lowbit.layouts.uniform.storage_bits`, the stored tensors' dtypes, packing and unpacking
  the code words, and :func:`~lowbit.layouts.uniform.check_codes` (the one check of a method's codes).
* :mod:`~lowbit.layouts.rows` — the per-row packed codes of the vocabulary layers (formats
  ``embedding`` and ``head``): 4/8 bits LSB first, 6 bits as a 4-bit and a 2-bit plane.
* :mod:`~lowbit.layouts.vq` — the packed codebook indices and incoherence signs of format ``vq``
  (:class:`~lowbit.nn.vq_linear.VQLinear`).

This package imports neither :mod:`lowbit.nn` nor :mod:`lowbit.kernels` (``tests/test_layouts.py``).
"""

from __future__ import annotations

from . import rows, uniform, vq

__all__ = ["rows", "uniform", "vq"]
