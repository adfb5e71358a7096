//! Fused CPU kernels with a backward pass.
//!
//! candle composes attention, rotary embeddings, GELU, SwiGLU, layer norm and log-softmax from
//! many elementwise ops; each op allocates a tensor and walks memory once, and candle's backward
//! of GELU alone is a dozen of them (two `powf`, a `tanh`, ...). candle's own fused kernels
//! have no backward (DESIGN.md). Each kernel here is a candle `CustomOp` whose forward and
//! backward are one pass over the data:
//!
//! - vectorised: the row loops are compiled three times, for the baseline target, AVX2+FMA and
//!   AVX-512, and the widest copy the CPU has runs ([`multiversion!`]);
//!   transcendental functions are polynomial approximations that vectorise ([`simd`]); the
//!   attention kernel's small matrix products are written with AVX-512 intrinsics instead,
//!   with the gemm crate as the fallback;
//! - parallel within the device: large inputs are split over the threads of the rayon pool
//!   the kernel is called from, which is the calling device executor's pool, so a kernel never
//!   uses a thread outside its device ([`for_each_chunk`]).
//!
//! Every kernel keeps its plain composition of candle ops (`*_reference`), which is also what
//! runs on other devices and dtypes; tests compare values and gradients of the two on random
//! shapes.

// The kernels use `unsafe` for uninitialised output buffers and `target_feature` calls, each
// with a SAFETY comment; the rest of the crate has none (the workspace denies it).
#![allow(unsafe_code)]

pub mod attention;
pub mod bias;
pub mod gelu;
pub mod logprobs;
pub mod norm;
pub mod optim;
pub mod rotary;
pub(crate) mod simd;
pub mod swiglu;

pub use attention::{packed_attention, packed_attention_reference};
pub use bias::{add_bias, add_bias_reference, add_bias_residual, add_bias_residual_reference};
pub use gelu::{bias_gelu, bias_gelu_reference};
pub use logprobs::{token_logprobs_entropy, token_logprobs_entropy_reference};
pub use norm::{layer_norm, layer_norm_reference, rms_norm, rms_norm_reference};
pub use optim::{adamw_update, sum_squares, AdamWStep};
pub use rotary::{rotary_packed, rotary_packed_reference};
pub use swiglu::{swiglu, swiglu_reference};

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements below which a kernel runs on the calling thread alone.
const PARALLEL_MIN: usize = 32 * 1024;

pub(crate) static REFERENCE_ONLY: AtomicBool = AtomicBool::new(false);

/// Makes every kernel run its reference composition (for A/B benchmarks and for ruling the
/// kernels out when debugging). The environment variable `TANDEM_REFERENCE_KERNELS=1` sets it
/// at start-up in the `tandem` binary.
pub fn set_reference_only(on: bool) {
    REFERENCE_ONLY.store(on, Ordering::Relaxed);
}

/// True where the fused path applies: f32 on the CPU, unless [`set_reference_only`].
pub(crate) fn fused_applies(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !REFERENCE_ONLY.load(Ordering::Relaxed)
}

/// The f32 slice a contiguous layout covers.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// An output buffer of `n` elements that the kernel writes in full before anything reads it,
/// so it is not zero-filled first (a zero-fill is a full extra pass, and for fresh pages a
/// page fault per 4 KiB). Only for kernels that assign, never accumulate, every element.
// clippy's `uninit_vec` rejects the pattern itself; what makes it sound here is that no
// element is read before the kernel has written it.
#[allow(clippy::uninit_vec)]
pub(crate) fn written_output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and the caller overwrites every element before
    // reading it (see each call site).
    unsafe { v.set_len(n) };
    v
}

/// Elements per parallel chunk of `len` elements in rows of `row`: whole rows, a few chunks per
/// thread of the current rayon pool; all of `len` (one chunk, on the calling thread) when it
/// is small or the pool has one thread.
pub(crate) fn chunk_len(len: usize, row: usize) -> usize {
    let row = row.max(1);
    let threads = rayon::current_num_threads();
    if len < PARALLEL_MIN || threads <= 1 {
        return len.max(1);
    }
    (len / row).div_ceil(threads * 4).max(1) * row
}

/// Calls `f(offset, out_chunk)` for chunks of `out` that are whole multiples of `row` elements,
/// in parallel on the current rayon pool when `out` is large ([`chunk_len`]).
pub(crate) fn for_each_chunk<F>(out: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    for_each_chunk_of(out, chunk_len(out.len(), row), f)
}

/// [`for_each_chunk`] with chunks of `chunk` elements chosen by the caller, for kernels whose
/// work per output element is not what sizes the split (e.g. a row of logits read per two
/// outputs); one chunk runs on the calling thread.
pub(crate) fn for_each_chunk_of<F>(out: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    for_each_chunk_paired(out, chunk, &mut [], 0, |off, out, _| f(off, out));
}

/// [`for_each_chunk_of`] with a second output split at the same rows, `side_chunk` entries of
/// `side` to each `chunk` of `out` (e.g. per-row statistics a forward keeps for its backward):
/// `f(offset in out, out_chunk, side_chunk)`. An empty `side` gives every call an empty slice.
pub(crate) fn for_each_chunk_paired<F>(out: &mut [f32], chunk: usize, side: &mut [f32], side_chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
{
    if chunk >= out.len() {
        f(0, out, side);
    } else if side.is_empty() {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c, &mut []));
    } else {
        out.par_chunks_mut(chunk)
            .zip(side.par_chunks_mut(side_chunk))
            .enumerate()
            .for_each(|(i, (c, s))| f(i * chunk, c, s));
    }
}

/// [`for_each_chunk`] for kernels that also sum over rows: `f(offset, out_chunk, partial)`
/// adds its chunk's sums into `partial` (`sums.len()` entries, zeroed). With one chunk (small
/// `out` or a one-thread pool) `partial` is `sums` itself; otherwise there is one chunk per
/// thread, and the partials are added into `sums` in chunk order.
pub(crate) fn for_each_chunk_summing<F>(out: &mut [f32], row: usize, sums: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
{
    let threads = rayon::current_num_threads();
    if out.len() < PARALLEL_MIN || threads <= 1 {
        f(0, out, sums);
        return;
    }
    let row = row.max(1);
    let chunk = (out.len() / row).div_ceil(threads) * row;
    let partials: Vec<Vec<f32>> = out
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| {
            let mut partial = vec![0f32; sums.len()];
            f(i * chunk, c, &mut partial);
            partial
        })
        .collect();
    for p in partials {
        for (a, b) in sums.iter_mut().zip(p) {
            *a += b;
        }
    }
}

/// Defines `fn NAME(args)` whose body is compiled three times, for the baseline target, for
/// AVX2+FMA and for AVX-512; the widest copy the CPU supports runs. Helpers the body calls must
/// be `#[inline(always)]` so that they are compiled into each copy. The copies compute the same
/// operations in the same order (Rust does not contract or reassociate f32 arithmetic, and an
/// explicit `mul_add` is one rounding everywhere), so they give the same bits; the wider ones
/// do it in fewer instructions.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::kernels::simd::has_avx512() {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::kernels::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A random f32 tensor with entries in (-scale, scale).
    pub fn random(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| / max(max |b|, 1e-6): the error relative to the reference's magnitude.
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }
}
