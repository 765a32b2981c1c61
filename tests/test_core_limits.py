"""Sizes and arguments at the edge of what the Rust core can do: every one is refused with a typed
``lowbit.errors`` exception in the calling process, never an abort, a panic or an untyped error.

The calls run in a subprocess, so a regression that aborts the interpreter (SIGABRT from a failed
allocation) fails its test instead of killing pytest. The child runs a list of calls, each of which
must raise the expected class (a :class:`lowbit.errors.LowbitError`) with the expected words in its
message, and exits 0 only when all did; its output says how far it got. (One child per test rather
than per call: importing torch costs seconds.)
"""

import subprocess
import sys
import textwrap

import pytest


def run_isolated(body: str, timeout: float = 300) -> str:
    """Run ``body`` in a fresh interpreter; it must exit 0. Returns its stdout."""
    code = textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit status {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr[-3000:]}"
    return r.stdout


def expect_errors(cases: list, setup: str = "") -> str:
    """Each ``(call, error, message)`` raises ``lowbit.errors.<error>`` whose message contains
    ``message``. Returns the child's output: per call its message and the exception's classes."""
    out = run_isolated(
        f"""
        import numpy as np
        import lowbit
        from lowbit import errors, vq
        try:
            import torch
        except ImportError:
            torch = None
        {textwrap.indent(textwrap.dedent(setup), " " * 8).strip()}
        for call, error, message in {cases!r}:
            print("call:", call, flush=True)
            try:
                eval(call)
            except getattr(errors, error) as e:
                assert isinstance(e, errors.LowbitError)
                assert message in str(e), f"{{call}}: {{e!r}} does not say {{message!r}}"
                print("caught:", e)
                print("classes:", [c.__name__ for c in type(e).__mro__], flush=True)
            else:
                raise SystemExit(f"{{call}}: no error raised")
        print("all caught")
        """
    )
    assert "all caught" in out, out
    return out


# --- 1. sizes that drive an allocation --------------------------------------------------------


def test_huge_random_lengths_are_refused():
    # These aborted the interpreter (Vec::with_capacity of 1 TiB / 8 TiB).
    expect_errors(
        [
            ("lowbit.random_signs(2**40, 0)", "UnsupportedSizeError", "n: unsupported size"),
            ("lowbit._core.random_signs(2**40, 0)", "UnsupportedSizeError", "at most 4294967296"),
            ("lowbit._core.random_permutation(2**40, 0)", "UnsupportedSizeError", "n: unsupported size"),
            ("lowbit._core.random_permutation(2**32 + 1, 0)", "UnsupportedSizeError", "n: unsupported size"),
            ("lowbit.random_hadamard(2**40, 0)", "UnsupportedSizeError", "n: unsupported size"),
        ]
    )


def test_refused_allocations_raise_a_memory_error_subclass():
    # Within the documented limit (2^32) but more than the address space left to the child: the
    # allocator refuses, and the core reports it instead of aborting.
    if not sys.platform.startswith("linux"):
        pytest.skip("address-space limits via /proc and RLIMIT_AS")
    setup = """
        import resource
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    """
    out = expect_errors(
        [
            # a Vec the core reserves: 4 GiB, 16 GiB
            ("lowbit.random_signs(2**32, 0)", "AllocationError", "n: cannot allocate 4294967296 bytes"),
            ("lowbit._core.random_permutation(2**31, 0)", "AllocationError", "n: cannot allocate"),
            # a numpy output the bindings allocate: (2^28, 1) bytes unpack into (2^28, 8) codes
            ("lowbit._core.unpack(np.zeros((1 << 28, 1), np.uint8), 1, 8)", "AllocationError", "n: cannot allocate"),
        ],
        setup,
    )
    assert out.count("'MemoryError'") == 3  # `except MemoryError` keeps working


def test_error_classes_stay_importable():
    # lowbit.__all__ spreads lowbit.errors.__all__: a class listed there but not imported by the
    # package would break `from lowbit import *`.
    import lowbit
    from lowbit import errors

    assert all(hasattr(lowbit, name) for name in lowbit.__all__ if name in errors.__all__)
    assert issubclass(errors.AllocationError, errors.LowbitError)
    assert issubclass(errors.AllocationError, MemoryError)


@pytest.mark.parametrize("iters", [2**40, 10**9, 2**64 - 1])
def test_kmeans_iteration_count_allocates_nothing_up_front(iters):
    # inertia used to be reserved as iters + 1 float64 values (8 GB for 10^9, an abort for 2^40);
    # now it grows as iterations run, and they stop at the fixed point with the full run's result.
    out = run_isolated(
        f"""
        import numpy as np
        from lowbit import vq
        x = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
        r = vq.kmeans(x, 4, iters={iters})
        ref = vq.kmeans(x, 4, iters=len(r.inertia) - 1)
        assert len(r.inertia) < 200, len(r.inertia)
        np.testing.assert_array_equal(r.codebook, ref.codebook)
        np.testing.assert_array_equal(r.assignments, ref.assignments)
        np.testing.assert_array_equal(r.inertia, ref.inertia)
        print("iterations:", len(r.inertia) - 1)
        """
    )
    assert "iterations:" in out


def test_core_sizes_are_checked_before_allocating():
    expect_errors(
        [
            # the row width is checked before the (rows, n) output is allocated (was a panic)
            ("lowbit._core.unpack_ternary(np.zeros((1, 1), np.uint8), 2**40)", "ShapeError", "packed: rows have 1 bytes"),
            ("lowbit._core.unpack_ternary(np.zeros((3, 1), np.uint8), 2**40, '2bit')", "ShapeError", "packed"),
            # n · bits used to wrap to rows of 0 bytes, which an empty input matched
            ("lowbit._core.unpack(np.zeros((0, 0), np.uint8), 8, 2**61)", "UnsupportedSizeError", "n: unsupported size"),
            ("lowbit._core.unpack(np.zeros((4, 0), np.uint8), 8, 2**61)", "UnsupportedSizeError", "overflow"),
            ("lowbit._core.set_num_threads(2**40)", "UnsupportedSizeError", "at most 4096 threads"),
        ]
    )


# --- 2. integers outside what the core's size type holds ---------------------------------------

OUT_OF_RANGE = [
    # (call, error class, start of the message: the argument's name)
    ("lowbit.random_signs(2**64, 0)", "UnsupportedSizeError", "n:"),
    ("lowbit.random_signs(np.uint64(2**64 - 1), 0)", "UnsupportedSizeError", "n:"),
    ("lowbit.random_signs(-1, 0)", "ShapeError", "n:"),
    ("lowbit.random_signs(4, 2**64)", "ValueRangeError", "seed:"),
    ("lowbit.random_signs(4, -1)", "ValueRangeError", "seed:"),
    ("lowbit.hadamard_plan(2**64)", "UnsupportedSizeError", "n:"),
    ("lowbit.hadamard_plan(2**30)", "UnsupportedSizeError", "n:"),
    ("lowbit.hadamard_matrix(2**64)", "UnsupportedSizeError", "n:"),
    ("lowbit.hadamard_matrix(2**40)", "UnsupportedSizeError", "n:"),
    ("lowbit.random_hadamard(2**64, 0)", "UnsupportedSizeError", "n:"),
    ("lowbit.packed_size(2**64, 4)", "UnsupportedSizeError", "n:"),
    ("lowbit.unpack(packed, 4, 2**64)", "UnsupportedSizeError", "n:"),
    ("lowbit.unpack(packed, 4, -8)", "ShapeError", "n:"),
    ("lowbit.unpack(packed, 2**64, 8)", "UnsupportedSizeError", "bits:"),
    ("lowbit.unpack_ternary(packed, 2**64)", "UnsupportedSizeError", "n:"),
    ("lowbit.hadamard(x, axis=2**64)", "ShapeError", "axis:"),
    ("lowbit.hadamard(x, perm_seed=2**64)", "ValueRangeError", "perm_seed:"),
    ("vq.kmeans(x, 2**64)", "ValueRangeError", "k:"),
    ("vq.kmeans(x, -2)", "ValueRangeError", "k:"),
    ("vq.kmeans(x, 2, iters=2**64)", "ValueRangeError", "iters:"),
    ("vq.kmeans(x, 2, iters=2**70)", "ValueRangeError", "iters:"),
    ("vq.kmeans(x, 2, iters=-1)", "ValueRangeError", "iters:"),
    ("vq.kmeans(x, 2, seed=2**64)", "ValueRangeError", "seed:"),
]


@pytest.mark.parametrize("call, error, arg", OUT_OF_RANGE, ids=[c for c, _, _ in OUT_OF_RANGE])
def test_out_of_range_ints_raise_typed_errors_naming_the_argument(call, error, arg):
    # PyO3 used to raise OverflowError for values beyond the core's usize / u64.
    import numpy as np

    import lowbit
    from lowbit import errors, vq

    x = np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32)
    packed = np.zeros((2, 4), np.uint8)
    with pytest.raises(getattr(errors, error)) as e:
        eval(call, {"lowbit": lowbit, "vq": vq, "np": np, "x": x, "packed": packed})
    assert str(e.value).startswith(arg), e.value


# --- 3. tensors without dense host data ----------------------------------------------------------

torch = pytest.importorskip("torch")

NO_DATA = [
    # (call, argument named in the message)
    ("lowbit.hadamard(meta((4, 8)))", "x"),
    ("lowbit.hadamard(meta((4, 8), torch.bfloat16))", "x"),
    ("lowbit.hadamard(x8, signs=meta((8,)))", "signs"),
    ("lowbit.pack(meta((4, 8), torch.uint8), 4)", "codes"),
    ("lowbit.unpack(meta((4, 4), torch.uint8), 4, 8)", "packed"),
    ("lowbit.pack_ternary(meta((4, 5), torch.int8))", "values"),
    ("lowbit.unpack_ternary(meta((4, 1), torch.uint8), 5)", "packed"),
    ("vq.kmeans(meta((10, 2)), 2)", "x"),
    ("vq.kmeans(x8, 2, init=meta((2, 8)))", "init"),
    ("vq.kmeans(x8, 2, weights=meta((4,)))", "weights"),
    ("vq.assign(meta((4, 8)), x8)", "x"),
    ("vq.assign(x8, meta((3, 8)))", "codebook"),
    ("vq.e8p_encode(meta((4, 8)))", "x"),
    ("vq.e8p_decode(meta((4,), torch.int64))", "codes"),
    ("vq.e8p_decode(torch.zeros(2, 3, dtype=torch.int64), row_scale=meta((2,)))", "row_scale"),
    # other tensors numpy cannot view: sparse, complex conjugate views
    ("lowbit.hadamard(torch.eye(8).to_sparse())", "x"),
    ("lowbit.hadamard(torch.eye(8).to_sparse_csr())", "x"),
    ("vq.assign(torch.eye(8).to_sparse(), x8)", "x"),
    ("lowbit.unpack(torch.zeros(4, 4, dtype=torch.uint8), 4, 8, out=torch.zeros(4, 8, dtype=torch.uint8).to_sparse())", "out"),
    ("lowbit.hadamard(torch.zeros(2, 8, dtype=torch.complex64).conj())", "x"),
    ("lowbit.hadamard(torch.zeros(2, 8, dtype=torch.complex64))", "x"),
    ("vq.assign(torch.zeros(2, 8, dtype=torch.complex64), x8)", "x"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("call, arg", NO_DATA, ids=[c for c, _ in NO_DATA])
def test_tensors_without_dense_data_raise_dtype_errors(call, arg):
    # These reached t.numpy() and raised NotImplementedError ("Cannot copy out of meta tensor"),
    # TypeError or RuntimeError from torch.
    import lowbit
    from lowbit import errors, vq

    def meta(shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    x8 = torch.randn(4, 8)
    with pytest.raises(errors.DTypeError) as e:
        eval(call, {"lowbit": lowbit, "vq": vq, "torch": torch, "meta": meta, "x8": x8})
    assert str(e.value).startswith(f"{arg}:"), e.value
    if "meta" in call:
        assert "meta tensor has no data" in str(e.value)
