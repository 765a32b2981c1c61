//! The Python bindings: the only file that knows about Python. Each function takes C-contiguous
//! numpy arrays of an exact dtype (the Python layer `lowbit.ops` prepares them), releases the GIL
//! around the core call through [`detached`], and returns new numpy arrays. Core errors become
//! `lowbit.errors` exceptions in [`to_pyerr`], the single conversion point.

use numpy::npyffi::{get_type_object, npy_intp, NpyTypes, PY_ARRAY_API};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;
use crate::hadamard::{self, Hadamard};
use crate::pack::{self as core_pack, TernaryForm};
use crate::real::Real;
use crate::vq::{self, e8p, Weights};

/// Map a core error to its `lowbit.errors` class (imported lazily, so the classes live — and
/// pickle — under their real module path).
fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let name = match &e {
        Error::UnsupportedSize { .. } => "UnsupportedSizeError",
        Error::Shape { .. } => "ShapeError",
        Error::Value { .. } => "ValueRangeError",
        Error::Alloc { .. } => "AllocationError",
    };
    let msg = e.to_string();
    let cls = py
        .import("lowbit.errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match cls {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(_) => PyValueError::new_err(msg),
    }
}

/// Run `f` with the GIL released; map its error.
fn detached<R: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<R> + Send) -> PyResult<R> {
    py.detach(f).map_err(|e| to_pyerr(py, e))
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray2<'_, T>,
    arg: &'static str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| {
        Python::attach(|py| {
            to_pyerr(
                py,
                Error::Shape {
                    arg,
                    detail: "must be C-contiguous".into(),
                },
            )
        })
    })
}

/// A new C-contiguous numpy array of shape `dims`, **uninitialized**, and its number of elements.
///
/// numpy's allocator (huge pages for large arrays, no zero fill) makes big outputs several times
/// cheaper than a fresh zeroed `Vec`, whose page faults dominated large calls. The shape is checked
/// first (`arg` names what sized it): one that overflows the address space is an
/// [`Error::UnsupportedSize`], one the allocator refuses an [`Error::Alloc`] — never a panic.
fn new_uninit<'py, T: numpy::Element>(
    py: Python<'py>,
    dims: &[usize],
    arg: &'static str,
) -> PyResult<(Bound<'py, PyAny>, usize)> {
    let len = dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    let bytes = len
        .and_then(|l| l.checked_mul(std::mem::size_of::<T>()))
        .filter(|&b| b <= isize::MAX as usize && dims.iter().all(|&d| d <= isize::MAX as usize));
    let (Some(len), Some(bytes)) = (len, bytes) else {
        return Err(to_pyerr(
            py,
            Error::UnsupportedSize {
                arg,
                value: dims.iter().copied().max().unwrap_or(0),
                detail: format!("an output array of shape {dims:?} does not fit the address space"),
            },
        ));
    };
    let mut shape: Vec<npy_intp> = dims.iter().map(|&d| d as npy_intp).collect();
    // SAFETY: the numpy C API with a valid type object, a dtype reference it steals, `shape` of
    // `dims.len()` valid extents, and no strides / data / base object (numpy allocates).
    let ptr = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            get_type_object(py, NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            dims.len() as std::ffi::c_int,
            shape.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    if ptr.is_null() {
        let err = PyErr::fetch(py);
        return Err(if err.is_instance_of::<PyMemoryError>(py) {
            to_pyerr(py, Error::Alloc { arg, bytes })
        } else {
            err
        });
    }
    // SAFETY: a new reference to the array numpy just created.
    Ok((unsafe { Bound::from_owned_ptr(py, ptr) }, len))
}

/// A new C-contiguous `(rows, cols)` array, **uninitialized**, with its data as a slice; see
/// [`new_uninit`]. Every caller writes every element before the array is returned.
fn new_array<'py, T: numpy::Element>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    arg: &'static str,
) -> PyResult<(Bound<'py, PyArray2<T>>, &'py mut [T])> {
    let (any, len) = new_uninit::<T>(py, &[rows, cols], arg)?;
    // SAFETY: new_uninit made a 2-D array of dtype T.
    let arr = unsafe { any.cast_into_unchecked::<PyArray2<T>>() };
    // SAFETY: the array is new, so nothing else can view its buffer; the slice lives as long as
    // the array object ('py) and is only written by this call before the array is handed out.
    let slice = unsafe { std::slice::from_raw_parts_mut(arr.data(), len) };
    Ok((arr, slice))
}

/// [`new_array`] of shape `(n,)`.
fn new_array1<'py, T: numpy::Element>(
    py: Python<'py>,
    n: usize,
    arg: &'static str,
) -> PyResult<(Bound<'py, PyArray1<T>>, &'py mut [T])> {
    let (any, len) = new_uninit::<T>(py, &[n], arg)?;
    // SAFETY: as in new_array, for a 1-D array.
    let arr = unsafe { any.cast_into_unchecked::<PyArray1<T>>() };
    let slice = unsafe { std::slice::from_raw_parts_mut(arr.data(), len) };
    Ok((arr, slice))
}

fn reshape2<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    v.into_pyarray(py).reshape([rows, cols])
}

fn prepare<T: Real>(
    py: Python<'_>,
    n: usize,
    normalize: bool,
    inverse: bool,
    strict: bool,
    signs: &Option<PyReadonlyArray1<'_, i8>>,
) -> PyResult<Hadamard<T>> {
    let signs_slice = match signs {
        Some(s) => Some(s.as_slice().map_err(|_| {
            to_pyerr(
                py,
                Error::Shape {
                    arg: "signs",
                    detail: "must be C-contiguous".into(),
                },
            )
        })?),
        None => None,
    };
    let plan = if strict {
        hadamard::plan_strict(n)
    } else {
        hadamard::plan(n)
    }
    .map_err(|e| to_pyerr(py, e))?;
    Hadamard::<T>::new(plan, normalize, inverse, signs_slice).map_err(|e| to_pyerr(py, e))
}

#[allow(clippy::too_many_arguments)]
fn hadamard_impl<'py, T: Real + numpy::Element>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, T>,
    normalize: bool,
    inverse: bool,
    strict: bool,
    signs: Option<PyReadonlyArray1<'py, i8>>,
    out: Option<Bound<'py, PyArray2<T>>>,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let [rows, n] = [x.shape()[0], x.shape()[1]];
    let xs = contiguous(&x, "x")?;
    let h = prepare::<T>(py, n, normalize, inverse, strict, &signs)?;
    match out {
        Some(o) => {
            {
                let mut rw = o.try_readwrite().map_err(|_| {
                    to_pyerr(
                        py,
                        Error::Shape {
                            arg: "out",
                            detail: "overlaps x; use the in-place form".into(),
                        },
                    )
                })?;
                let os = out_slice(py, &mut rw, rows, n)?;
                detached(py, || h.apply_rows_into(xs, os))?;
            }
            Ok(o)
        }
        None => {
            let (arr, os) = new_array::<T>(py, rows, n, "x")?;
            detached(py, || h.apply_rows_into(xs, os))?;
            Ok(arr)
        }
    }
}

fn hadamard_inplace_impl<T: Real + numpy::Element>(
    py: Python<'_>,
    mut x: numpy::PyReadwriteArray2<'_, T>,
    normalize: bool,
    inverse: bool,
    strict: bool,
    signs: Option<PyReadonlyArray1<'_, i8>>,
) -> PyResult<()> {
    let n = x.shape()[1];
    let h = prepare::<T>(py, n, normalize, inverse, strict, &signs)?;
    let xs = x.as_slice_mut().map_err(|_| {
        to_pyerr(
            py,
            Error::Shape {
                arg: "x",
                detail: "must be C-contiguous".into(),
            },
        )
    })?;
    detached(py, || h.apply_rows(xs))
}

/// The per-dtype `#[pyfunction]`s (PyO3 functions cannot be generic).
macro_rules! hadamard_bindings {
    ($t:ty, $name:ident, $inplace:ident, $dtype:literal) => {
        #[doc = concat!("Hadamard transform of every row of a ", $dtype, " (rows, n) array, into `out` if given; see `lowbit.hadamard`.")]
        #[pyfunction]
        #[pyo3(signature = (x, normalize=true, inverse=false, strict=false, signs=None, out=None))]
        fn $name<'py>(
            py: Python<'py>,
            x: PyReadonlyArray2<'py, $t>,
            normalize: bool,
            inverse: bool,
            strict: bool,
            signs: Option<PyReadonlyArray1<'py, i8>>,
            out: Option<Bound<'py, PyArray2<$t>>>,
        ) -> PyResult<Bound<'py, PyArray2<$t>>> {
            hadamard_impl(py, x, normalize, inverse, strict, signs, out)
        }

        #[doc = concat!("In-place Hadamard transform of every row of a C-contiguous ", $dtype, " (rows, n) array.")]
        #[pyfunction]
        #[pyo3(signature = (x, normalize=true, inverse=false, strict=false, signs=None))]
        fn $inplace(
            py: Python<'_>,
            x: numpy::PyReadwriteArray2<'_, $t>,
            normalize: bool,
            inverse: bool,
            strict: bool,
            signs: Option<PyReadonlyArray1<'_, i8>>,
        ) -> PyResult<()> {
            hadamard_inplace_impl(py, x, normalize, inverse, strict, signs)
        }
    };
}

hadamard_bindings!(f32, hadamard_f32, hadamard_inplace_f32, "float32");
hadamard_bindings!(f64, hadamard_f64, hadamard_inplace_f64, "float64");

/// `(offset, k, m)` of one plan block.
type PlanBlock = (usize, usize, u32);

/// The decomposition used for length n: (exact, [(offset, k, m), ...]); block size is k·2^m.
#[pyfunction]
#[pyo3(signature = (n, strict=false))]
fn hadamard_plan(py: Python<'_>, n: usize, strict: bool) -> PyResult<(bool, Vec<PlanBlock>)> {
    let plan = if strict {
        hadamard::plan_strict(n)
    } else {
        hadamard::plan(n)
    }
    .map_err(|e| to_pyerr(py, e))?;
    Ok((
        plan.is_exact(),
        plan.blocks.iter().map(|b| (b.offset, b.k, b.m)).collect(),
    ))
}

/// The K×K base matrix (int8, ±1) of a base order K.
#[pyfunction]
fn hadamard_base<'py>(py: Python<'py>, k: usize) -> PyResult<Bound<'py, PyArray2<i8>>> {
    let m = hadamard::small::base_matrix(k).ok_or_else(|| {
        to_pyerr(
            py,
            Error::UnsupportedSize {
                arg: "k",
                value: k,
                detail: format!("base orders are {:?}", hadamard::BASE_ORDERS),
            },
        )
    })?;
    reshape2(py, m.data.clone(), k, k)
}

/// The base orders K, ascending.
#[pyfunction]
fn hadamard_base_orders() -> Vec<usize> {
    hadamard::BASE_ORDERS.to_vec()
}

/// n signs (int8, ±1) from seed (SplitMix64; the stream is fixed forever); n ≤ 2^32.
#[pyfunction]
fn random_signs<'py>(py: Python<'py>, n: usize, seed: u64) -> PyResult<Bound<'py, PyArray1<i8>>> {
    Ok(detached(py, || crate::rng::random_signs(n, seed))?.into_pyarray(py))
}

/// A permutation of 0..n (uint64) from seed; n ≤ 2^32.
#[pyfunction]
fn random_permutation<'py>(
    py: Python<'py>,
    n: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    Ok(detached(py, || crate::rng::random_permutation(n, seed))?.into_pyarray(py))
}

/// Pack uint8 codes (rows, n) into (rows, ceil(n·bits/8)) bytes; see `lowbit.pack`.
#[pyfunction]
fn pack<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray2<'py, u8>,
    bits: u32,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let [rows, n] = [codes.shape()[0], codes.shape()[1]];
    let cs = contiguous(&codes, "codes")?;
    let rb = core_pack::packed_row_bytes(n, bits).map_err(|e| to_pyerr(py, e))?;
    let (out, os) = new_array::<u8>(py, rows, rb, "codes")?;
    detached(py, || core_pack::pack(cs, n, bits, os))?;
    Ok(out)
}

/// A writable, C-contiguous output array of exactly `rows × cols` (for the `out=` arguments).
fn out_slice<'a, T: numpy::Element>(
    py: Python<'_>,
    out: &'a mut numpy::PyReadwriteArray2<'_, T>,
    rows: usize,
    cols: usize,
) -> PyResult<&'a mut [T]> {
    let shape = out.shape().to_vec();
    if shape != [rows, cols] {
        return Err(to_pyerr(
            py,
            Error::Shape {
                arg: "out",
                detail: format!("has shape {shape:?}, need [{rows}, {cols}]"),
            },
        ));
    }
    out.as_slice_mut().map_err(|_| {
        to_pyerr(
            py,
            Error::Shape {
                arg: "out",
                detail: "must be C-contiguous".into(),
            },
        )
    })
}

/// `packed` rows must be exactly `rb` bytes wide (`what()` names the codes they should hold).
///
/// The row width is compared, not `rows · rb` (which wraps for absurd n), before any output is
/// allocated: the output size `rows · n` is then bounded by the input's.
fn check_row_bytes(
    py: Python<'_>,
    cols: usize,
    rb: usize,
    what: impl FnOnce() -> String,
) -> PyResult<()> {
    if cols == rb {
        return Ok(());
    }
    Err(to_pyerr(
        py,
        Error::Shape {
            arg: "packed",
            detail: format!("rows have {cols} bytes; {} take exactly {rb}", what()),
        },
    ))
}

/// Unpack (rows, ceil(n·bits/8)) bytes into uint8 codes (rows, n), into `out` if given; see
/// `lowbit.unpack`.
#[pyfunction]
#[pyo3(signature = (packed, bits, n, out=None))]
fn unpack<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, u8>,
    bits: u32,
    n: usize,
    out: Option<Bound<'py, PyArray2<u8>>>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let [rows, cols] = [packed.shape()[0], packed.shape()[1]];
    let ps = contiguous(&packed, "packed")?;
    let rb = core_pack::packed_row_bytes(n, bits).map_err(|e| to_pyerr(py, e))?;
    check_row_bytes(py, cols, rb, || format!("n = {n} {bits}-bit codes"))?;
    match out {
        Some(o) => {
            {
                let mut rw = o.try_readwrite()?;
                let os = out_slice(py, &mut rw, rows, n)?;
                detached(py, || core_pack::unpack(ps, n, bits, os))?;
            }
            Ok(o)
        }
        None => {
            let (arr, os) = new_array::<u8>(py, rows, n, "n")?;
            detached(py, || core_pack::unpack(ps, n, bits, os))?;
            Ok(arr)
        }
    }
}

fn ternary_form(py: Python<'_>, form: &str) -> PyResult<TernaryForm> {
    match form {
        "base3" => Ok(TernaryForm::Base3),
        "2bit" => Ok(TernaryForm::TwoBit),
        other => Err(to_pyerr(
            py,
            Error::Value {
                arg: "form",
                detail: format!("unknown ternary form {other:?}; use \"base3\" or \"2bit\""),
            },
        )),
    }
}

/// Pack int8 ternary values (rows, n) into bytes; see `lowbit.pack_ternary`.
#[pyfunction]
#[pyo3(signature = (values, form="base3"))]
fn pack_ternary<'py>(
    py: Python<'py>,
    values: PyReadonlyArray2<'py, i8>,
    form: &str,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let form = ternary_form(py, form)?;
    let [rows, n] = [values.shape()[0], values.shape()[1]];
    let vs = contiguous(&values, "values")?;
    let rb = core_pack::ternary_row_bytes(n, form);
    let (out, os) = new_array::<u8>(py, rows, rb, "values")?;
    detached(py, || core_pack::pack_ternary(vs, n, form, os))?;
    Ok(out)
}

/// Unpack ternary bytes into int8 values (rows, n), into `out` if given; see
/// `lowbit.unpack_ternary`.
#[pyfunction]
#[pyo3(signature = (packed, n, form="base3", out=None))]
fn unpack_ternary<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, u8>,
    n: usize,
    form: &str,
    out: Option<Bound<'py, PyArray2<i8>>>,
) -> PyResult<Bound<'py, PyArray2<i8>>> {
    let form = ternary_form(py, form)?;
    let [rows, cols] = [packed.shape()[0], packed.shape()[1]];
    let ps = contiguous(&packed, "packed")?;
    let rb = core_pack::ternary_row_bytes(n, form);
    check_row_bytes(py, cols, rb, || {
        format!("n = {n} ternary values ({form:?})")
    })?;
    match out {
        Some(o) => {
            {
                let mut rw = o.try_readwrite()?;
                let os = out_slice(py, &mut rw, rows, n)?;
                detached(py, || core_pack::unpack_ternary(ps, n, form, os))?;
            }
            Ok(o)
        }
        None => {
            let (arr, os) = new_array::<i8>(py, rows, n, "n")?;
            detached(py, || core_pack::unpack_ternary(ps, n, form, os))?;
            Ok(arr)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vector quantization

fn contiguous1<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    arg: &'static str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| {
        Python::attach(|py| {
            to_pyerr(
                py,
                Error::Shape {
                    arg,
                    detail: "must be C-contiguous".into(),
                },
            )
        })
    })
}

/// The weights argument of the VQ bindings: `(n,)` per vector, `(1, d)` per dimension, `(n, d)`
/// per element (float32, C-contiguous).
fn vq_weights<'a>(
    py: Python<'_>,
    w: &'a Option<PyReadonlyArrayDyn<'_, f32>>,
    n: usize,
    d: usize,
) -> PyResult<Weights<'a>> {
    let Some(w) = w else {
        return Ok(Weights::None);
    };
    let shape = w.shape().to_vec();
    let s = w.as_slice().map_err(|_| {
        to_pyerr(
            py,
            Error::Shape {
                arg: "weights",
                detail: "must be C-contiguous".into(),
            },
        )
    })?;
    match shape.as_slice() {
        [m] if *m == n => Ok(Weights::PerPoint(s)),
        [1, m] if *m == d => Ok(Weights::PerDim(s)),
        [r, m] if *r == n && *m == d => Ok(Weights::PerElement(s)),
        _ => Err(to_pyerr(
            py,
            Error::Shape {
                arg: "weights",
                detail: format!(
                    "has shape {shape:?}; use ({n},) per vector, (1, {d}) per dimension or ({n}, {d}) per element"
                ),
            },
        )),
    }
}

/// `(centroids, assignments, inertia)` of [`vq_kmeans`].
type KMeansArrays<'py> = (
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<f64>>,
);

/// k-means of the rows of a float32 (n, d) array: (centroids float32 (k, d), assignments uint32
/// (n,), inertia float64 (t + 1,) for the t ≤ iters iterations before convergence); see
/// `lowbit.vq.kmeans`.
#[pyfunction]
#[pyo3(signature = (x, k, iters=10, seed=0, weights=None, init=None))]
fn vq_kmeans<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    k: usize,
    iters: usize,
    seed: u64,
    weights: Option<PyReadonlyArrayDyn<'py, f32>>,
    init: Option<PyReadonlyArray2<'py, f32>>,
) -> PyResult<KMeansArrays<'py>> {
    let [n, d] = [x.shape()[0], x.shape()[1]];
    let xs = contiguous(&x, "x")?;
    let w = vq_weights(py, &weights, n, d)?;
    let r = match &init {
        None => detached(py, || vq::kmeans(xs, n, d, k, iters, seed, w))?,
        Some(c) => {
            if c.shape() != [k, d] {
                return Err(to_pyerr(
                    py,
                    Error::Shape {
                        arg: "init",
                        detail: format!("has shape {:?}, need [{k}, {d}]", c.shape()),
                    },
                ));
            }
            let cs = contiguous(c, "init")?;
            detached(py, || vq::kmeans_with_init(xs, n, d, cs, k, iters, w))?
        }
    };
    Ok((
        reshape2(py, r.centroids, k, d)?,
        r.assignments.into_pyarray(py),
        r.inertia.into_pyarray(py),
    ))
}

/// `(indices, distances)` of [`vq_assign`].
type IndicesDistances<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<f32>>);

/// Nearest row of a float32 (k, d) codebook for every row of a float32 (n, d) array:
/// (indices uint32 (n,), weighted squared distances float32 (n,)); see `lowbit.vq.assign`.
#[pyfunction]
#[pyo3(signature = (x, codebook, weights=None))]
fn vq_assign<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    codebook: PyReadonlyArray2<'py, f32>,
    weights: Option<PyReadonlyArrayDyn<'py, f32>>,
) -> PyResult<IndicesDistances<'py>> {
    let [n, d] = [x.shape()[0], x.shape()[1]];
    let [k, dc] = [codebook.shape()[0], codebook.shape()[1]];
    if dc != d {
        return Err(to_pyerr(
            py,
            Error::Shape {
                arg: "codebook",
                detail: format!("has {dc} columns but x has {d}"),
            },
        ));
    }
    let xs = contiguous(&x, "x")?;
    let cs = contiguous(&codebook, "codebook")?;
    let w = vq_weights(py, &weights, n, d)?;
    // New arrays, written in full by assign_into before they are returned.
    let (idx, is) = new_array1::<u32>(py, n, "x")?;
    let (dist, ds) = new_array1::<f32>(py, n, "x")?;
    detached(py, || vq::assign_into(xs, n, d, cs, k, w, is, ds))?;
    Ok((idx, dist))
}

/// Exact nearest E8P code (uint16 (n,)) of every row of a float32 (n, 8) array; see
/// `lowbit.vq.e8p_encode`.
#[pyfunction]
fn e8p_encode<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
) -> PyResult<Bound<'py, PyArray1<u16>>> {
    let [n, d] = [x.shape()[0], x.shape()[1]];
    if d != e8p::DIM {
        return Err(to_pyerr(
            py,
            Error::Shape {
                arg: "x",
                detail: format!("E8P encodes vectors of 8; x has {d} columns"),
            },
        ));
    }
    let xs = contiguous(&x, "x")?;
    // A new array, written in full by encode_into before it is returned.
    let (out, os) = new_array1::<u16>(py, n, "x")?;
    detached(py, || e8p::encode_into(xs, os))?;
    Ok(out)
}

/// E8P codewords (float32 (n, 8)) of uint16 codes (n,), into `out` if given, each row times
/// `row_scale[r]` when given (codes in rows of n / len(row_scale)); see `lowbit.vq.e8p_decode`.
#[pyfunction]
#[pyo3(signature = (codes, out=None, row_scale=None))]
fn e8p_decode<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u16>,
    out: Option<Bound<'py, PyArray2<f32>>>,
    row_scale: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let n = codes.len();
    let cs = contiguous1(&codes, "codes")?;
    let scale = match &row_scale {
        None => None,
        Some(s) => {
            let ss = contiguous1(s, "row_scale")?;
            if ss.is_empty() || !n.is_multiple_of(ss.len()) {
                return Err(to_pyerr(
                    py,
                    Error::Shape {
                        arg: "row_scale",
                        detail: format!(
                            "{} row scales do not divide {n} codes into rows",
                            ss.len()
                        ),
                    },
                ));
            }
            Some((ss, n / ss.len()))
        }
    };
    match out {
        Some(o) => {
            {
                let mut rw = o.try_readwrite()?;
                let os = out_slice(py, &mut rw, n, e8p::DIM)?;
                detached(py, || e8p::decode_into(cs, os, scale))?;
            }
            Ok(o)
        }
        None => {
            let (arr, os) = new_array::<f32>(py, n, e8p::DIM, "codes")?;
            detached(py, || e8p::decode_into(cs, os, scale))?;
            Ok(arr)
        }
    }
}

/// The E8P codebook: float32 (65536, 8), row c = the codeword of code c.
#[pyfunction]
fn e8p_codebook<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
    reshape2(py, e8p::codebook(), e8p::SIZE, e8p::DIM)
}

/// The E81B codebook: float32 (256, 8).
#[pyfunction]
fn e81b_codebook<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
    reshape2(py, e8p::e81b_codebook(), e8p::E81B_SIZE, e8p::DIM)
}

/// Resize the thread pool (0 = default: LOWBIT_NUM_THREADS or all cores; at most 4096).
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: usize) -> PyResult<()> {
    crate::threads::check_num_threads(n).map_err(|e| to_pyerr(py, e))?;
    crate::threads::set_num_threads(n);
    Ok(())
}

/// Threads of the pool the kernels run in.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::threads::num_threads()
}

/// The SIMD level the kernels were dispatched to ("avx512", "avx2" or "baseline").
#[pyfunction]
fn simd_level() -> &'static str {
    crate::simd::level().name()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hadamard_f32, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_f64, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_inplace_f32, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_inplace_f64, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_plan, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_base, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard_base_orders, m)?)?;
    m.add_function(wrap_pyfunction!(random_signs, m)?)?;
    m.add_function(wrap_pyfunction!(random_permutation, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(pack_ternary, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_ternary, m)?)?;
    m.add_function(wrap_pyfunction!(vq_kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(vq_assign, m)?)?;
    m.add_function(wrap_pyfunction!(e8p_encode, m)?)?;
    m.add_function(wrap_pyfunction!(e8p_decode, m)?)?;
    m.add_function(wrap_pyfunction!(e8p_codebook, m)?)?;
    m.add_function(wrap_pyfunction!(e81b_codebook, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add("MAX_N", hadamard::MAX_N)?;
    Ok(())
}
