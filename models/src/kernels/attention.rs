//! Multi-head attention read straight from a packed `qkv` projection, without a KV cache:
//! `y = softmax(q k^T * scale + bias) v` per head, for GPT-2's training and scoring forwards.
//!
//! The composition in candle splits `qkv` into three transposed copies, runs one tiny GEMM
//! per (row, head) for the scores and again for the output, and takes about ten elementwise
//! passes for scale, mask and softmax, each a tensor of its own; its backward doubles all of
//! that. Here one kernel reads `qkv (b, t, 3d)` in place and writes `y (b, t, d)` in the
//! layout the output projection wants: per (row, head), the scores `Q Kᵀ` and the output `P V`
//! are small GEMMs read through strides (the gemm crate's kernels, on the calling thread) with
//! one softmax pass between them. A forward on a graph keeps the probabilities (t x t per head
//! and row, small next to the activations) for its backward, which writes `dqkv` in the packed
//! layout with four more small GEMMs. Rows of the batch run in parallel on the current pool.
//! Keys after a query's last unmasked key (the future, under a causal mask) are not
//! exponentiated: their weight is exactly 0 as in the composition.
//!
//! Every key is scored, masked or not, exactly like the composition: a fully masked query row
//! (left padding) gets the same uniform weights in both. The decoding kernel of
//! [`crate::kv_cache`] shares [`softmax_row`], which scores one query with dot products.

#![allow(clippy::too_many_arguments)]

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

use super::{contiguous_f32, fused_applies, multiversion, simd};

/// Attention over `qkv (b, t, 3 * heads * hd)` (q, k, v concatenated on the last dimension)
/// with additive `bias (b, 1, t, t)`: `(b, t, heads * hd)`. Fused on the CPU for f32,
/// [`packed_attention_reference`] elsewhere.
pub fn packed_attention(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if fused_applies(qkv) && fused_applies(bias) {
        let (b, t, _) = qkv.dims3()?;
        if bias.dims() != [b, 1, t, t] {
            candle_core::bail!(
                "attention bias has shape {:?}, expected ({b}, 1, {t}, {t})",
                bias.dims()
            );
        }
        qkv.contiguous()?.apply_op2(
            &bias.contiguous()?,
            Attention {
                heads,
                scale: scale as f32,
                keep_probs: qkv.track_op(),
                probs: OnceLock::new(),
            },
        )
    } else {
        packed_attention_reference(qkv, bias, heads, scale)
    }
}

/// Split into heads, `softmax(q k^T * scale + bias) v`, merge the heads.
pub fn packed_attention_reference(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    let hd = d / heads;
    let split = |j: usize| -> Result<Tensor> {
        qkv.narrow(2, j * d, d)?
            .reshape((b, t, heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let y = crate::layers::attention(&split(0)?, &split(1)?, &split(2)?, bias, scale)?;
    y.transpose(1, 2)?.reshape((b, t, d))
}

struct Attention {
    heads: usize,
    scale: f32,
    /// Whether the forward keeps the probabilities for the backward: `qkv` is on a graph, so
    /// a backward may follow (without one, the op and its buffer are dropped at once).
    keep_probs: bool,
    /// `P (b, heads, t, t)` of the forward when `keep_probs`.
    probs: OnceLock<Vec<f32>>,
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// y += a * x
#[inline(always)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Below this a bias entry masks its key (the masks hold -1e9).
const MASKED_BELOW: f32 = -1.0e8;

/// `row[j] = softmax_j(q . key(j) * scale + brow[j])` for one query. A masked key gets exactly
/// the zero the composition gives it (`exp(-1e9 - max)` is 0 in f32) without computing its
/// score, unless every key of the row is masked, where the composition's uniform weights come
/// from scoring them all.
#[inline(always)]
pub(crate) fn softmax_row<'a>(q: &[f32], key: impl Fn(usize) -> &'a [f32], brow: &[f32], scale: f32, row: &mut [f32]) {
    let all_masked = brow.iter().all(|&b| b < MASKED_BELOW);
    let mut m = f32::NEG_INFINITY;
    for (j, s) in row.iter_mut().enumerate() {
        *s = if brow[j] < MASKED_BELOW && !all_masked {
            f32::NEG_INFINITY
        } else {
            dot(q, key(j)) * scale + brow[j]
        };
        m = m.max(*s);
    }
    normalise(row, m);
}

/// A row-major view of a small matrix inside a slice: element (i, j) at `off + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        Self { data, off, rs, cs }
    }

    /// Whether every element of an (r, c) matrix lies inside the slice.
    fn covers(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst (m, n) = a (m, k) · b (k, n)`, `dst` row-major with row stride `dst_rs` from `dst_off`,
/// on the calling thread with the gemm crate's kernels (the attention blocks are far too small
/// to split further; batch rows are what runs in parallel).
fn small_gemm(m: usize, n: usize, k: usize, dst: &mut [f32], dst_off: usize, dst_rs: usize, a: Mat, b: Mat) {
    assert!(Mat::new(dst, dst_off, dst_rs, 1).covers(m, n) && a.covers(m, k) && b.covers(k, n));
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assertion above keeps every element the call reads or writes inside its
    // slice; `dst` is borrowed mutably and so does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_off),
            1,
            dst_rs as isize,
            false,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Probabilities `p (t, t)` of head `h` of one batch row from its scores `S = Q Kᵀ`, with the
/// masking of [`softmax_row`].
fn head_probs(qkv: &[f32], bias: &[f32], t: usize, d: usize, hd: usize, h: usize, scale: f32, p: &mut [f32]) {
    let w = 3 * d;
    small_gemm(
        t,
        t,
        hd,
        p,
        0,
        t,
        Mat::new(qkv, h * hd, w, 1),
        Mat::new(qkv, d + h * hd, 1, w),
    );
    for (row, brow) in p.chunks_exact_mut(t).zip(bias.chunks_exact(t)) {
        softmax_scores(row, brow, scale);
    }
}

multiversion! {
    /// `row[j] = softmax_j(row[j] * scale + brow[j])` for scores already in `row`, masking as
    /// [`softmax_row`] does.
    fn softmax_scores(row: &mut [f32], brow: &[f32], scale: f32) {
        // Keys after the last unmasked one get exactly 0; skipping them halves the work of a
        // causal mask. With every key masked, all are scored.
        let (live, all_masked) = match brow.iter().rposition(|&b| b >= MASKED_BELOW) {
            Some(last) => (last + 1, false),
            None => (row.len(), true),
        };
        let (row, rest) = row.split_at_mut(live);
        rest.fill(0.0);
        for (s, &b) in row.iter_mut().zip(brow) {
            *s = if b < MASKED_BELOW && !all_masked { f32::NEG_INFINITY } else { *s * scale + b };
        }
        let m = simd::max(row);
        normalise(row, m);
    }
}

/// Exponentiates `row - m` (-inf to exactly 0) and scales it to sum 1.
#[inline(always)]
fn normalise(row: &mut [f32], m: f32) {
    for s in row.iter_mut() {
        *s = if *s == f32::NEG_INFINITY {
            0.0
        } else {
            simd::exp(*s - m)
        };
    }
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let mut sum = chunks.remainder().iter().sum::<f32>();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    sum += acc.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// `y (t, d)` of one batch row: per head, `P = softmax(Q Kᵀ)` and `Y = P V` as small GEMMs.
/// Head h's `P` is written at `probs[h * probs_stride..][..t * t]`: stride `t * t` keeps every
/// head's (heads, t, t), stride 0 reuses one (t, t) scratch.
fn forward_row(
    qkv: &[f32],
    bias: &[f32],
    t: usize,
    d: usize,
    heads: usize,
    scale: f32,
    y: &mut [f32],
    probs: &mut [f32],
    probs_stride: usize,
) {
    let (hd, w) = (d / heads, 3 * d);
    for h in 0..heads {
        let p = &mut probs[h * probs_stride..][..t * t];
        head_probs(qkv, bias, t, d, hd, h, scale, p);
        small_gemm(
            t,
            hd,
            t,
            y,
            h * hd,
            d,
            Mat::new(p, 0, t, 1),
            Mat::new(qkv, 2 * d + h * hd, w, 1),
        );
    }
}

multiversion! {
    /// `dS = P ∘ (dP - rowsum(P ∘ dP)) * scale`, in place of `dp`.
    fn score_grads(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        for (pi, dpi) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let r = dot(pi, dpi);
            for (g, &pij) in dpi.iter_mut().zip(pi) {
                *g = pij * (*g - r) * scale;
            }
        }
    }
}

/// `dqkv (t, 3d)` of one batch row from `dy (t, d)` and the forward's `probs` (heads, t, t):
/// per head, `dV = Pᵀ dY`, `dP = dY Vᵀ`, `dS` from [`score_grads`], `dQ = dS K` and
/// `dK = dSᵀ Q`.
fn backward_row(
    qkv: &[f32],
    dy: &[f32],
    probs: &[f32],
    t: usize,
    d: usize,
    heads: usize,
    scale: f32,
    dqkv: &mut [f32],
) {
    let (hd, w) = (d / heads, 3 * d);
    let mut ds = vec![0f32; t * t];
    for h in 0..heads {
        let (q0, k0, v0) = (h * hd, d + h * hd, 2 * d + h * hd);
        let p = &probs[h * t * t..][..t * t];
        let dyh = Mat::new(dy, h * hd, d, 1);
        small_gemm(t, hd, t, dqkv, v0, w, Mat::new(p, 0, 1, t), dyh);
        small_gemm(t, t, hd, &mut ds, 0, t, dyh, Mat::new(qkv, v0, 1, w));
        score_grads(p, &mut ds, t, scale);
        small_gemm(t, hd, t, dqkv, q0, w, Mat::new(&ds, 0, t, 1), Mat::new(qkv, k0, w, 1));
        small_gemm(t, hd, t, dqkv, k0, w, Mat::new(&ds, 0, 1, t), Mat::new(qkv, q0, w, 1));
    }
}

/// (b, t, d) of a packed `qkv (b, t, 3d)` of `heads` heads.
fn check(l: &Layout, heads: usize) -> Result<(usize, usize, usize)> {
    let (b, t, three_d) = l.shape().dims3()?;
    if three_d % 3 != 0 || (three_d / 3) % heads != 0 {
        candle_core::bail!("qkv width {three_d} does not split into 3 x {heads} heads");
    }
    Ok((b, t, three_d / 3))
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = check(l1, self.heads)?;
        let qkv = contiguous_f32(s1, l1, "fused-attention")?;
        let bias = contiguous_f32(s2, l2, "fused-attention")?;
        // Every element is written: each head's block of y is a whole GEMM output.
        let mut y = super::written_output(b * t * d);
        let per_row = self.heads * t * t;
        let kernel = |r: usize, y: &mut [f32], probs: &mut [f32], stride: usize| {
            let (qkv, bias) = (&qkv[r * t * 3 * d..][..t * 3 * d], &bias[r * t * t..][..t * t]);
            forward_row(qkv, bias, t, d, self.heads, self.scale, y, probs, stride)
        };
        if self.keep_probs {
            // Every element is written: head_probs fills each (t, t) block.
            let mut probs = super::written_output(b * per_row);
            y.par_chunks_mut(t * d)
                .zip(probs.par_chunks_mut(per_row))
                .enumerate()
                .for_each(|(r, (y, p))| kernel(r, y, p, t * t));
            // A second forward with the same op value does not happen (each call makes one).
            let _ = self.probs.set(probs);
        } else {
            y.par_chunks_mut(t * d)
                .enumerate()
                .for_each(|(r, y)| kernel(r, y, &mut vec![0f32; t * t], 0));
        }
        Ok((CpuStorage::F32(y), Shape::from((b, t, d))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("fused-attention: backward of a forward that kept no probabilities");
        };
        let backward = AttentionBackward {
            heads: self.heads,
            scale: self.scale,
            probs,
        };
        let dqkv = qkv.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(dqkv), None))
    }
}

/// (qkv, dy) to dqkv, with the forward's probabilities (b, heads, t, t).
struct AttentionBackward<'a> {
    heads: usize,
    scale: f32,
    probs: &'a [f32],
}

impl CustomOp2 for AttentionBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = check(l1, self.heads)?;
        let qkv = contiguous_f32(s1, l1, self.name())?;
        let dy = contiguous_f32(s2, l2, self.name())?;
        // Every element is written: each head's dQ, dK and dV blocks are whole GEMM outputs.
        let mut dqkv = super::written_output(b * t * 3 * d);
        dqkv.par_chunks_mut(t * 3 * d).enumerate().for_each(|(r, dqkv)| {
            let (qkv, dy) = (&qkv[r * t * 3 * d..][..t * 3 * d], &dy[r * t * d..][..t * d]);
            let per_row = self.heads * t * t;
            backward_row(
                qkv,
                dy,
                &self.probs[r * per_row..][..per_row],
                t,
                d,
                self.heads,
                self.scale,
                dqkv,
            )
        });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// New tokens' projections as host rows, one row per (batch row, token) in that order: the
/// queries of head h at `data[row * stride + q + h * head_dim..][..head_dim]`, the keys and
/// values of key/value head g at offsets `k` and `v` likewise.
#[derive(Debug, Clone, Copy)]
pub struct QkvRows<'a> {
    pub data: &'a [f32],
    /// Batch rows.
    pub rows: usize,
    /// New tokens per batch row.
    pub tokens: usize,
    pub stride: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

multiversion! {
    /// Batch row `r`: writes its new keys and values after the `past` cached positions of `k`,
    /// `v` (kv_heads, cap, head_dim), then `y (tokens, heads * head_dim)`.
    pub(crate) fn decode_row(x: QkvRows, r: usize, past: usize, cap: usize, k: &mut [f32], v: &mut [f32], bias: &[f32], scale: f32, y: &mut [f32]) {
        let (t, hd) = (x.tokens, x.head_dim);
        let keys = past + t;
        for tok in 0..t {
            let row = &x.data[(r * t + tok) * x.stride..][..x.stride];
            for g in 0..x.kv_heads {
                let at = (g * cap + past + tok) * hd;
                k[at..at + hd].copy_from_slice(&row[x.k + g * hd..][..hd]);
                v[at..at + hd].copy_from_slice(&row[x.v + g * hd..][..hd]);
            }
        }
        let (k, v) = (&*k, &*v);
        let group = x.heads / x.kv_heads;
        let mut p = vec![0f32; keys];
        for tok in 0..t {
            let row = &x.data[(r * t + tok) * x.stride..][..x.stride];
            let brow = &bias[tok * keys..][..keys];
            for h in 0..x.heads {
                let base = (h / group) * cap * hd;
                let q = &row[x.q + h * hd..][..hd];
                softmax_row(q, |j| &k[base + j * hd..][..hd], brow, scale, &mut p);
                let out = &mut y[(tok * x.heads + h) * hd..][..hd];
                for (j, &pj) in p.iter().enumerate() {
                    if pj != 0.0 {
                        axpy(pj, &v[base + j * hd..][..hd], out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use crate::layers::AttentionInputs;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_match_the_reference() {
        // (batch, len, heads, head dim), with left padding in some rows.
        for (i, (b, t, heads, hd)) in [(1, 1, 1, 4), (2, 5, 2, 3), (3, 17, 4, 16), (4, 48, 4, 64)]
            .into_iter()
            .enumerate()
        {
            let mask: Vec<Vec<f32>> = (0..b)
                .map(|r| (0..t).map(|j| if j < r.min(t - 1) { 0.0 } else { 1.0 }).collect())
                .collect();
            let bias = AttentionInputs::new(&mask, t, &Device::Cpu).unwrap().bias;
            let qkv = Var::from_tensor(&random(&[b, t, 3 * heads * hd], 2.0, i as u64)).unwrap();
            let up = random(&[b, t, heads * hd], 1.0, 10 + i as u64);
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = packed_attention(qkv.as_tensor(), &bias, heads, scale).unwrap();
            let reference = packed_attention_reference(qkv.as_tensor(), &bias, heads, scale).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{b} {t} {heads} {hd}");
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel_err(gf.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
            assert!(e < 1e-5, "{b} {t} {heads} {hd}: {e}");
        }
    }
}
