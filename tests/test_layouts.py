"""``lowbit.layouts``: the stored layouts as data and pure functions, shared by ``nn/`` and ``kernels/``.

The kernels convert a stored layer by reading its layout (``layouts.uniform``), not the layer's
module, so ``kernels/`` imports nothing from ``nn/`` and ``layouts/`` neither of them (issue 15 §2).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.layouts import uniform as layout

_PKG = Path(lowbit.__file__).resolve().parent


def _modules_after(code: str) -> list[str]:
    """The ``lowbit`` modules loaded in a fresh interpreter after running ``code``."""
    prog = f"{code}\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('lowbit'))))"
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_importing_the_kernels_does_not_import_nn():
    mods = _modules_after("import lowbit.kernels, lowbit.kernels.uniform, lowbit.kernels.vq, lowbit.kernels.hadamard")
    assert "lowbit.kernels.uniform" in mods and "lowbit.layouts.uniform" in mods
    assert not [m for m in mods if m.startswith("lowbit.nn")], mods


def test_importing_the_layouts_imports_neither_nn_nor_kernels():
    mods = _modules_after("import lowbit.layouts, lowbit.layouts.uniform")
    assert not [m for m in mods if m.startswith(("lowbit.nn", "lowbit.kernels"))], mods


def _imported(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names (function-level imports included), absolute."""
    parts = ["lowbit", *path.relative_to(_PKG).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("package,forbidden", [("kernels", ("lowbit.nn",)), ("layouts", ("lowbit.nn", "lowbit.kernels"))])
def test_no_import_statement_reaches_back(package, forbidden):
    """Also the imports inside functions, which an import-time check does not see."""
    bad = [
        f"{f.relative_to(_PKG)}: {name}"
        for f in sorted((_PKG / package).glob("*.py"))
        for name in _imported(f)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, bad


def test_the_old_import_paths_are_the_layout_objects():
    from lowbit.nn import PackingFormat as A, storage_bits as a
    from lowbit.nn.quant_linear import PackingFormat as B, storage_bits as b

    assert A is B is layout.PackingFormat and a is b is layout.storage_bits
    assert not hasattr(lowbit.nn.quant_linear, "_PACK_BITS")  # moved, not copied


@pytest.mark.parametrize("kind,bits", [("uniform", b) for b in range(1, 9)] + [("ternary", 2), ("binary", 1)])
@pytest.mark.parametrize("n_in", [1, 5, 37, 64])
def test_pack_codes_round_trip_and_sizes(kind, bits, n_in):
    gen = torch.Generator().manual_seed(bits * 100 + n_in)
    codes = torch.randint(0, layout.max_code(kind, bits) + 1, (3, n_in), generator=gen)
    q = layout.pack_codes(codes, kind, bits)
    assert q.dtype == layout.STORED_DTYPES["qweight"]
    assert tuple(q.shape) == (3, layout.bytes_per_row(n_in, kind, bits))
    assert torch.equal(layout.unpack_codes(q, kind, bits, n_in), codes.to(torch.uint8))


def test_layout_facts():
    assert layout.PackingFormat.for_kind("ternary") is layout.PackingFormat.BASE3
    assert layout.PackingFormat.for_kind("binary") is layout.PackingFormat.LSB
    assert [layout.storage_bits(b) for b in range(1, 9)] == [1, 2, 3, 4, 8, 8, 8, 8]
    assert layout.bytes_per_row(10, "ternary", 2) == 2 and layout.bytes_per_row(10, "uniform", 3) == 4
    assert (layout.default_zero_const("uniform", 4, True), layout.default_zero_const("uniform", 4, False)) == (8.0, 0.0)
    assert (layout.default_zero_const("ternary", 2, True), layout.default_zero_const("binary", 1, True)) == (1.0, 0.5)
    assert (layout.max_code("uniform", 3), layout.max_code("ternary", 2), layout.max_code("binary", 1)) == (7, 2, 1)
    with pytest.raises(lowbit.UnsupportedSizeError, match="^bits: unsupported bit width 9"):
        layout.storage_bits(9)


@pytest.mark.parametrize("kind,bits", [("uniform", 2), ("uniform", 3), ("uniform", 4), ("uniform", 6), ("ternary", 2), ("binary", 1)])
def test_kernel_layout_is_built_from_the_stored_layout(kind, bits):
    """The GPU layout (built on the CPU here) decodes to the codes the stored layer holds."""
    from lowbit.grids.base import QuantizedWeight
    from lowbit.kernels.uniform import UniformGPUWeight
    from lowbit.nn import QuantLinear

    gen = torch.Generator().manual_seed(bits)
    n_in, out, g = 80, 6, 16
    codes = torch.randint(0, layout.max_code(kind, bits) + 1, (out, n_in), generator=gen)
    scales = (torch.rand(out, n_in // g, generator=gen) + 0.5).half().float()
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=None, bits=bits, group_size=g, kind=kind,
                         zero_const=layout.default_zero_const(kind, bits, True))
    m = QuantLinear.from_quantized(qw)
    w = UniformGPUWeight.from_quant_linear(m)
    assert torch.equal(w.codes(), codes.to(torch.uint8))
    torch.testing.assert_close(w.dequantize(), m.dequantize_weight(), rtol=0, atol=0)
