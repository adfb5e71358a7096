//! Multi-head attention read straight from a packed `qkv` projection, without a KV cache:
//! `y = softmax(q k^T * scale + bias) v` per head, for GPT-2's training and scoring forwards.
//!
//! The composition in candle splits `qkv` into three transposed copies, runs one tiny GEMM
//! per (row, head) for the scores and again for the output, and takes about ten elementwise
//! passes for scale, mask and softmax, each a tensor of its own; its backward doubles all of
//! that. Here one kernel reads `qkv (b, t, 3d)` in place and writes `y (b, t, d)` in the
//! layout the output projection wants. Per (row, head) and block of 16 queries, the scores
//! `Q Kᵀ` and the output `P V` are small products over the keys the block weighs only (the
//! keys up to its last live one: a third fewer products under a causal mask at t = 48), with
//! one vectorised softmax pass between them. The products run in a register-blocked AVX-512
//! kernel on the calling thread where the CPU has it (the gemm crate's elsewhere), reading
//! `K`, `V`, `Q` and `dY` rows in place and `Kᵀ`, `Vᵀ` from one transposed copy per head.
//! A forward on a graph keeps the probabilities (t x t per head and row, small next to the
//! activations) and each query's live keys for its backward, which writes `dqkv` in the
//! packed layout with four more blocked products (`dV` and `dK` per block of keys, over the
//! queries that weigh them). Rows of the batch run in parallel on the current pool. Keys
//! after a query's last unmasked key (the future, under a causal mask) are not exponentiated:
//! their weight is exactly 0 as in the composition.
//!
//! Every key is scored, masked or not, exactly like the composition: a fully masked query row
//! (left padding) gets the same uniform weights in both. The decoding kernel of
//! [`crate::kv_cache`] shares [`softmax_row`], which scores one query with dot products.

#![allow(clippy::too_many_arguments)]

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

use super::{contiguous_f32, fused_applies, multiversion, simd};

/// Attention over `qkv (b, t, (heads + 2 kv_heads) * hd)` (q, k, v concatenated on the last
/// dimension; query head h reads key/value head `h / (heads / kv_heads)`, grouped-query
/// attention when `kv_heads < heads`) with additive `bias (b, 1, t, t)`: `(b, t, heads * hd)`.
/// Fused on the CPU for f32, [`packed_attention_reference`] elsewhere.
pub fn packed_attention(qkv: &Tensor, bias: &Tensor, heads: usize, kv_heads: usize, scale: f64) -> Result<Tensor> {
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
                kv_heads,
                scale: scale as f32,
                keep_probs: qkv.track_op(),
                saved: OnceLock::new(),
            },
        )
    } else {
        packed_attention_reference(qkv, bias, heads, kv_heads, scale)
    }
}

/// Split into heads, repeat the key/value heads over their groups, `softmax(q k^T * scale +
/// bias) v`, merge the heads.
pub fn packed_attention_reference(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let pk = Packing::of(qkv.layout(), heads, kv_heads)?.2;
    let split = |from: usize, n: usize| -> Result<Tensor> {
        qkv.narrow(2, from * pk.hd, n * pk.hd)?
            .reshape((b, t, n, pk.hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let group = pk.group();
    let k = crate::layers::repeat_kv(split(heads, kv_heads)?, group)?;
    let v = crate::layers::repeat_kv(split(heads + kv_heads, kv_heads)?, group)?;
    let y = crate::layers::attention(&split(0, heads)?, &k, &v, bias, scale)?;
    y.transpose(1, 2)?.reshape((b, t, pk.out()))
}

/// Where each head lies in a packed `qkv` row: `heads` query heads, then `kv_heads` key heads,
/// then `kv_heads` value heads, each `hd` wide.
#[derive(Clone, Copy)]
struct Packing {
    heads: usize,
    kv_heads: usize,
    hd: usize,
}

impl Packing {
    /// (b, t, packing) of a `qkv (b, t, (heads + 2 kv_heads) * hd)` layout.
    fn of(l: &Layout, heads: usize, kv_heads: usize) -> Result<(usize, usize, Self)> {
        let (b, t, w) = l.shape().dims3()?;
        let slots = heads + 2 * kv_heads;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !w.is_multiple_of(slots) {
            candle_core::bail!(
                "qkv width {w} does not split into {heads} query heads and 2 x {kv_heads} key/value heads"
            );
        }
        Ok((
            b,
            t,
            Self {
                heads,
                kv_heads,
                hd: w / slots,
            },
        ))
    }
    /// Floats in one token's `qkv` row.
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.hd
    }
    /// Floats in one token's output row.
    fn out(&self) -> usize {
        self.heads * self.hd
    }
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q(&self, h: usize) -> usize {
        h * self.hd
    }
    fn k(&self, g: usize) -> usize {
        (self.heads + g) * self.hd
    }
    fn v(&self, g: usize) -> usize {
        (self.heads + self.kv_heads + g) * self.hd
    }
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    /// Whether the forward keeps the probabilities for the backward: `qkv` is on a graph, so
    /// a backward may follow (without one, the op and its buffer are dropped at once).
    keep_probs: bool,
    /// What the forward keeps for the backward when `keep_probs`.
    saved: OnceLock<Saved>,
}

/// The forward's probabilities `P (b, heads, t, t)` and each batch row's [`RowKeys`].
struct Saved {
    probs: Vec<f32>,
    keys: Vec<Vec<RowKeys>>,
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

/// A GEMM right-hand operand `b (k, n)` as rows `ld` floats apart from `off`, where the first
/// `16 ⌈n / 16⌉` floats of every row may be read (lanes past n feed only columns that are not
/// stored): the layout the AVX-512 product streams. `K`, `V`, `Q` and `dY` rows are read in
/// place; `Kᵀ` and `Vᵀ` are packed once per head (see [`Rows::of`]).
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    off: usize,
    ld: usize,
}

impl<'a> Rows<'a> {
    /// `b (k, n)` in place when its rows are contiguous and every 16-lane read stays inside
    /// the slice, else packed into `scratch` (rows of `n` rounded up to 16, zero-padded).
    fn of(b: Mat<'a>, k: usize, n: usize, scratch: &'a mut Vec<f32>) -> Self {
        assert!(b.covers(k, n));
        let lanes = n.div_ceil(16) * 16;
        if b.cs == 1 && (k == 0 || b.off + (k - 1) * b.rs + lanes <= b.data.len()) {
            return Self {
                data: b.data,
                off: b.off,
                ld: b.rs,
            };
        }
        scratch.clear();
        scratch.resize(k * lanes, 0.0);
        transpose_into(b, k, n, scratch, lanes);
        Self {
            data: scratch,
            off: 0,
            ld: lanes,
        }
    }
}

/// `dst[i * ld + j] = b(i, j)` for `b (k, n)` with row stride 1 (a transposed view): 16 x 16
/// blocks with AVX-512 shuffles where the CPU has them, element by element elsewhere.
fn transpose_into(b: Mat, k: usize, n: usize, dst: &mut [f32], ld: usize) {
    let (mut i0, mut j0) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() && b.rs == 1 {
        (i0, j0) = (k / 16 * 16, n / 16 * 16);
        for i in (0..i0).step_by(16) {
            for j in (0..j0).step_by(16) {
                // The block's source rows are b's columns j..j + 16, 16 floats from row i.
                assert!(b.off + i + (j + 15) * b.cs + 16 <= b.data.len() && (i + 15) * ld + j + 16 <= dst.len());
                // SAFETY: the CPU has AVX-512F; the assertion keeps the 16 loads of 16 floats
                // and the 16 stores of 16 floats inside their slices.
                unsafe {
                    avx512_gemm::transpose16(
                        b.data.as_ptr().add(b.off + i + j * b.cs),
                        b.cs,
                        dst.as_mut_ptr().add(i * ld + j),
                        ld,
                    )
                };
            }
        }
    }
    for i in 0..k {
        let cols = if i < i0 { j0..n } else { 0..n };
        for j in cols {
            dst[i * ld + j] = b.data[b.off + i * b.rs + j * b.cs];
        }
    }
}

/// `dst (m, n) = a (m, k) · b[row0..row0 + k, ..n]`: the AVX-512 kernel where the CPU has
/// it, else the gemm crate's.
fn block_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_off: usize,
    dst_rs: usize,
    a: Mat,
    b: Rows,
    row0: usize,
) {
    let b = Rows {
        off: b.off + row0 * b.ld,
        ..b
    };
    assert!(n <= b.ld && (k == 0 || b.off + (k - 1) * b.ld + n.div_ceil(16) * 16 <= b.data.len()));
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx512() && m > 0 && n > 0 {
        assert!(Mat::new(dst, dst_off, dst_rs, 1).covers(m, n) && a.covers(m, k));
        // SAFETY: the CPU has AVX-512F; the assertions keep every read of `a` and `b` and
        // every write of `dst` inside its slice (the kernel writes only columns below n).
        unsafe { avx512_gemm::product(m, n, k, dst, dst_off, dst_rs, a, &b.data[b.off..], b.ld) };
        return;
    }
    small_gemm(m, n, k, dst, dst_off, dst_rs, a, Mat::new(b.data, b.off, b.ld, 1));
}

/// The attention blocks' AVX-512 code: a register-blocked product (4 rows of `a` times a panel
/// of up to 64 columns of `b` rows, 16 zmm accumulators, one FMA per lane and term) and the
/// 16 x 16 transpose that lays out `Kᵀ` and `Vᵀ`.
#[cfg(target_arch = "x86_64")]
mod avx512_gemm {
    use super::Mat;
    use std::arch::x86_64::*;

    /// See [`super::block_gemm`]: `b` rows of `ld` floats from its first row, `ld` a multiple
    /// of 16 covering `n`; the caller checks the bounds of `a`, `b` and `dst`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        dst_off: usize,
        dst_rs: usize,
        a: Mat,
        b: &[f32],
        ld: usize,
    ) {
        for j0 in (0..n).step_by(64) {
            let cols = (n - j0).min(64);
            let mut i0 = 0;
            while i0 < m {
                let rows = (m - i0).min(4);
                let at = |r: usize| dst_off + (i0 + r) * dst_rs + j0;
                let (a0, b0) = (a.off + i0 * a.rs, &b[j0..]);
                macro_rules! go {
                    ($r:literal, $c:literal) => {
                        block::<$r, $c>(k, a.data, a0, a.rs, a.cs, b0, ld, dst, at, cols)
                    };
                }
                match (rows, cols.div_ceil(16)) {
                    (4, 4) => go!(4, 4),
                    (4, 3) => go!(4, 3),
                    (4, 2) => go!(4, 2),
                    (4, _) => go!(4, 1),
                    (_, 4) => go!(1, 4),
                    (_, 3) => go!(1, 3),
                    (_, 2) => go!(1, 2),
                    _ => go!(1, 1),
                }
                i0 += if rows == 4 { 4 } else { 1 };
            }
        }
    }

    /// Transposes the 16 x 16 block whose rows are 16 floats `ss` apart from `src` into rows
    /// `ds` apart from `dst`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ss)));
        // Pairs of rows interleaved by 32, then by 64 bits.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let base = i & !3;
            let (a, b) = (
                _mm512_castps_pd(t[base + (i & 2) / 2]),
                _mm512_castps_pd(t[base + (i & 2) / 2 + 2]),
            );
            _mm512_castpd_ps(if i % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // 128-bit lanes: rows 4 apart, then 8 apart.
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let base = (i / 8) * 8 + i % 4;
            if i % 8 < 4 {
                _mm512_shuffle_f32x4::<0x88>(u[base], u[base + 4])
            } else {
                _mm512_shuffle_f32x4::<0xdd>(u[base], u[base + 4])
            }
        });
        for i in 0..16 {
            let (a, b) = (v[i % 8], v[i % 8 + 8]);
            let o = if i < 8 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            };
            _mm512_storeu_ps(dst.add(i * ds), o);
        }
    }

    /// `R` rows (from `a0`) by `C` 16-lane chunks of columns (from `b[0]`); `cols` of the
    /// `16 C` are written at `dst[at(r)..]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const R: usize, const C: usize>(
        k: usize,
        a: &[f32],
        a0: usize,
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        ld: usize,
        dst: &mut [f32],
        at: impl Fn(usize) -> usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for kk in 0..k {
            let brow = b.as_ptr().add(kk * ld);
            let bv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(brow.add(16 * c)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.get_unchecked(a0 + r * a_rs + kk * a_cs));
                for c in 0..C {
                    acc[c] = _mm512_fmadd_ps(av, bv[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let out = dst.as_mut_ptr().add(at(r));
            for (c, &v) in acc.iter().enumerate() {
                let left = cols.saturating_sub(16 * c).min(16);
                if left == 16 {
                    _mm512_storeu_ps(out.add(16 * c), v);
                } else if left > 0 {
                    _mm512_mask_storeu_ps(out.add(16 * c), ((1u32 << left) - 1) as __mmask16, v);
                }
            }
        }
    }
}

/// Query rows per block. A block's scores and outputs run over the keys up to the block's
/// last live key only: under a causal mask, two thirds of the products at t = 48.
const QUERY_BLOCK: usize = 16;

/// The keys one query row weighs: `live` keys from the first (every key after the last
/// unmasked one has weight exactly 0), and whether every key is masked (then all `t` are live
/// and scored, as the composition scores them).
#[derive(Clone, Copy)]
struct RowKeys {
    live: usize,
    all_masked: bool,
}

/// [`RowKeys`] of each query row of one batch row's bias `(t, t)`; the same for every head.
fn row_keys(bias: &[f32], t: usize) -> Vec<RowKeys> {
    bias.chunks_exact(t)
        .map(|brow| match brow.iter().rposition(|&b| b >= MASKED_BELOW) {
            Some(last) => RowKeys {
                live: last + 1,
                all_masked: false,
            },
            None => RowKeys {
                live: t,
                all_masked: true,
            },
        })
        .collect()
}

/// Query blocks `(first row, end row, keys)`: the block's rows and the keys any of them weighs.
fn query_blocks(keys: &[RowKeys]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..keys.len()).step_by(QUERY_BLOCK).map(|i0| {
        let i1 = (i0 + QUERY_BLOCK).min(keys.len());
        (i0, i1, keys[i0..i1].iter().map(|k| k.live).max().unwrap_or(0))
    })
}

/// Key blocks `(first key, end key, first query)` on the query blocks' grid: the first query
/// row that weighs any key of the block (no earlier row does, so the sums over queries in
/// `dV` and `dK` start there), `t` when no row does.
fn key_blocks(keys: &[RowKeys]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let t = keys.len();
    (0..t).step_by(QUERY_BLOCK).map(move |j0| {
        let first = keys.iter().position(|k| k.live > j0).unwrap_or(t);
        (j0, (j0 + QUERY_BLOCK).min(t), first)
    })
}

multiversion! {
    /// Rows `p (n, t)` holding scores `Q Kᵀ` in their first `keys` columns become
    /// `softmax(s * scale + bias)`, masking as [`softmax_row`] does; every column from a row's
    /// live keys on is set to exactly 0. Rows run in 16-lane chunks whose lanes past the live
    /// keys take -inf, so no row length leaves a scalar tail (except where t is not a multiple
    /// of 16).
    fn softmax_rows(p: &mut [f32], bias: &[f32], t: usize, keys: &[RowKeys], scale: f32) {
        const L: usize = simd::LANES;
        for ((row, brow), k) in p.chunks_exact_mut(t).zip(bias.chunks_exact(t)).zip(keys) {
            let (live, all) = (k.live, k.all_masked);
            let span = live.div_ceil(L).saturating_mul(L).min(t);
            let (row, rest) = row.split_at_mut(span);
            rest.fill(0.0);
            let score = |j: usize, s: f32, b: f32| {
                if j >= live || (b < MASKED_BELOW && !all) { f32::NEG_INFINITY } else { s * scale + b }
            };
            let mut mx = [f32::NEG_INFINITY; L];
            let mut chunks = row.chunks_exact_mut(L);
            for (c, s) in (&mut chunks).enumerate() {
                let b = &brow[c * L..][..L];
                for l in 0..L {
                    s[l] = score(c * L + l, s[l], b[l]);
                    mx[l] = mx[l].max(s[l]);
                }
            }
            let tail = chunks.into_remainder();
            let base = span - tail.len();
            let mut m = simd::lane_max(mx);
            for (l, s) in tail.iter_mut().enumerate() {
                *s = score(base + l, *s, brow[base + l]);
                m = m.max(*s);
            }
            normalise(row, m);
        }
    }
}

/// Exponentiates `row - m` (-inf to exactly 0) and scales it to sum 1: one pass that
/// exponentiates and sums in 16 lanes, then one that scales.
#[inline(always)]
fn normalise(row: &mut [f32], m: f32) {
    const L: usize = simd::LANES;
    let weight = |s: f32| if s == f32::NEG_INFINITY { 0.0 } else { simd::exp(s - m) };
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for s in &mut chunks {
        for l in 0..L {
            s[l] = weight(s[l]);
            sums[l] += s[l];
        }
    }
    let mut sum = simd::lane_sum(sums);
    for s in chunks.into_remainder() {
        *s = weight(*s);
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// `y (t, d)` of one batch row: per head and query block, `P = softmax(Q Kᵀ)` and `Y = P V`
/// as small GEMMs over the block's keys. Head h's `P` is written at
/// `probs[h * probs_stride..][..t * t]`: stride `t * t` keeps every head's (heads, t, t),
/// stride 0 reuses one (t, t) scratch.
fn forward_row(
    qkv: &[f32],
    bias: &[f32],
    keys: &[RowKeys],
    pk: Packing,
    scale: f32,
    y: &mut [f32],
    probs: &mut [f32],
    probs_stride: usize,
) {
    let (t, hd, w, d) = (keys.len(), pk.hd, pk.width(), pk.out());
    let (mut kt, mut vs) = (Vec::new(), Vec::new());
    for g in 0..pk.kv_heads {
        // `Kᵀ` and `V` of a key/value head serve every query head of its group.
        let kt = Rows::of(Mat::new(qkv, pk.k(g), 1, w), hd, t, &mut kt);
        let v = Rows::of(Mat::new(qkv, pk.v(g), w, 1), t, hd, &mut vs);
        for h in g * pk.group()..(g + 1) * pk.group() {
            let p = &mut probs[h * probs_stride..][..t * t];
            for (i0, i1, n) in query_blocks(keys) {
                let q = Mat::new(qkv, i0 * w + pk.q(h), w, 1);
                block_gemm(i1 - i0, n, hd, p, i0 * t, t, q, kt, 0);
                softmax_rows(&mut p[i0 * t..i1 * t], &bias[i0 * t..i1 * t], t, &keys[i0..i1], scale);
                block_gemm(i1 - i0, hd, n, y, i0 * d + h * hd, d, Mat::new(p, i0 * t, t, 1), v, 0);
            }
        }
    }
}

multiversion! {
    /// `dS = P ∘ (dP - rowsum(P ∘ dP)) * scale` over the first `n` columns of rows of `t`, in
    /// place of `dp`; the rest of each row of `dp` is set to 0 (P is 0 there).
    fn score_grads(p: &[f32], dp: &mut [f32], t: usize, n: usize, scale: f32) {
        for (pi, dpi) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let (dpi, rest) = dpi.split_at_mut(n);
            let r = dot(&pi[..n], dpi);
            for (g, &pij) in dpi.iter_mut().zip(pi) {
                *g = pij * (*g - r) * scale;
            }
            rest.fill(0.0);
        }
    }
}

/// `dV` or `dK` of one head: for each key block, `wᵀ · rows` over the queries that weigh it,
/// with `w (t, t)` the probabilities or score gradients (0 outside those queries) and `rows`
/// the head's `dY` or `Q`, into columns `col..col + hd` of `dqkv`'s key rows; zeros for keys
/// no query weighs.
fn key_block_grads(keys: &[RowKeys], w: &[f32], rows: Rows, dqkv: &mut [f32], col: usize, hd: usize) {
    let t = keys.len();
    let stride = dqkv.len() / t;
    for (j0, j1, i0) in key_blocks(keys) {
        if i0 == t {
            for j in j0..j1 {
                dqkv[j * stride + col..][..hd].fill(0.0);
            }
            continue;
        }
        let wt = Mat::new(w, i0 * t + j0, 1, t);
        block_gemm(j1 - j0, hd, t - i0, dqkv, j0 * stride + col, stride, wt, rows, i0);
    }
}

/// `dqkv (t, width)` of one batch row from `dy (t, heads * hd)` and the forward's `probs`
/// (heads, t, t): per head, `dV = Pᵀ dY` and `dK = dSᵀ Q` per key block over the queries that
/// weigh it, `dP = dY Vᵀ`, `dS` from [`score_grads`] and `dQ = dS K` per query block over its
/// keys. `P` and `dS` are 0 outside those ranges, so the blocked sums are the full ones. Under
/// grouped-query attention a key/value head's `dK` and `dV` are the sums over its group.
fn backward_row(qkv: &[f32], dy: &[f32], probs: &[f32], keys: &[RowKeys], pk: Packing, scale: f32, dqkv: &mut [f32]) {
    let (t, hd, w, d) = (keys.len(), pk.hd, pk.width(), pk.out());
    let mut ds = vec![0f32; t * t];
    let mut scratch = Vec::new();
    // A group's heads after its first add their dK and dV through this buffer.
    let mut part = vec![0f32; if pk.group() > 1 { t * hd } else { 0 }];
    let mut key_grads = |w: &[f32], rows: Rows, col: usize, first: bool, dqkv: &mut [f32]| {
        if first {
            key_block_grads(keys, w, rows, dqkv, col, hd);
        } else {
            key_block_grads(keys, w, rows, &mut part, 0, hd);
            for (dst, src) in dqkv.chunks_exact_mut(pk.width()).zip(part.chunks_exact(hd)) {
                for (a, b) in dst[col..][..hd].iter_mut().zip(src) {
                    *a += b;
                }
            }
        }
    };
    for h in 0..pk.heads {
        let (g, first) = (h / pk.group(), h % pk.group() == 0);
        let (q0, k0, v0) = (pk.q(h), pk.k(g), pk.v(g));
        let p = &probs[h * t * t..][..t * t];
        let dyh = Rows::of(Mat::new(dy, h * hd, d, 1), t, hd, &mut scratch);
        key_grads(p, dyh, v0, first, dqkv);
        let vt = Rows::of(Mat::new(qkv, v0, 1, w), hd, t, &mut scratch);
        for (i0, i1, n) in query_blocks(keys) {
            let dyi = Mat::new(dy, i0 * d + h * hd, d, 1);
            block_gemm(i1 - i0, n, hd, &mut ds, i0 * t, t, dyi, vt, 0);
            score_grads(&p[i0 * t..i1 * t], &mut ds[i0 * t..i1 * t], t, n, scale);
        }
        let k = Rows::of(Mat::new(qkv, k0, w, 1), t, hd, &mut scratch);
        for (i0, i1, n) in query_blocks(keys) {
            block_gemm(i1 - i0, hd, n, dqkv, i0 * w + q0, w, Mat::new(&ds, i0 * t, t, 1), k, 0);
        }
        let q = Rows::of(Mat::new(qkv, q0, w, 1), t, hd, &mut scratch);
        key_grads(&ds, q, k0, first, dqkv);
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, pk) = Packing::of(l1, self.heads, self.kv_heads)?;
        let (d, w) = (pk.out(), pk.width());
        let qkv = contiguous_f32(s1, l1, "fused-attention")?;
        let bias = contiguous_f32(s2, l2, "fused-attention")?;
        // Every element is written: each head's block of y is a whole GEMM output.
        let mut y = super::written_output(b * t * d);
        let per_row = self.heads * t * t;
        let kernel = |r: usize, y: &mut [f32], probs: &mut [f32], stride: usize| {
            let (qkv, bias) = (&qkv[r * t * w..][..t * w], &bias[r * t * t..][..t * t]);
            let keys = row_keys(bias, t);
            forward_row(qkv, bias, &keys, pk, self.scale, y, probs, stride);
            keys
        };
        if self.keep_probs {
            // Every element is written: softmax_rows fills each row of each (t, t) block.
            let mut probs = super::written_output(b * per_row);
            let keys = y
                .par_chunks_mut(t * d)
                .zip(probs.par_chunks_mut(per_row))
                .enumerate()
                .map(|(r, (y, p))| kernel(r, y, p, t * t))
                .collect();
            // A second forward with the same op value does not happen (each call makes one).
            let _ = self.saved.set(Saved { probs, keys });
        } else {
            y.par_chunks_mut(t * d).enumerate().for_each(|(r, y)| {
                kernel(r, y, &mut vec![0f32; t * t], 0);
            });
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
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("fused-attention: backward of a forward that kept no probabilities");
        };
        let backward = AttentionBackward {
            heads: self.heads,
            kv_heads: self.kv_heads,
            scale: self.scale,
            saved,
        };
        let dqkv = qkv.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(dqkv), None))
    }
}

/// (qkv, dy) to dqkv, with what the forward kept.
struct AttentionBackward<'a> {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    saved: &'a Saved,
}

impl CustomOp2 for AttentionBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, pk) = Packing::of(l1, self.heads, self.kv_heads)?;
        let (d, w) = (pk.out(), pk.width());
        let qkv = contiguous_f32(s1, l1, self.name())?;
        let dy = contiguous_f32(s2, l2, self.name())?;
        // Every element is written: each head's dQ blocks and its group's first dK and dV
        // blocks are GEMM outputs or, for keys no query weighs, zero-filled.
        let mut dqkv = super::written_output(b * t * w);
        dqkv.par_chunks_mut(t * w).enumerate().for_each(|(r, dqkv)| {
            let (qkv, dy) = (&qkv[r * t * w..][..t * w], &dy[r * t * d..][..t * d]);
            let per_row = self.heads * t * t;
            backward_row(
                qkv,
                dy,
                &self.saved.probs[r * per_row..][..per_row],
                &self.saved.keys[r],
                pk,
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
        // (batch, len, heads, key/value heads, head dim), with left padding in some rows and,
        // from t = 40, right padding in others: keys no query weighs, whole query blocks of
        // them at t = 40. The last three group query heads over fewer key/value heads.
        let shapes = [
            (1, 1, 1, 1, 4),
            (2, 5, 2, 2, 3),
            (3, 17, 4, 4, 16),
            (4, 48, 4, 4, 64),
            (4, 40, 2, 2, 8),
            (2, 33, 4, 2, 16),
            (3, 48, 8, 2, 32),
            (2, 21, 3, 1, 10),
        ];
        for (i, (b, t, heads, kv_heads, hd)) in shapes.into_iter().enumerate() {
            let mask: Vec<Vec<f32>> = (0..b)
                .map(|r| {
                    let (left, right) = match t >= 40 && r % 2 == 1 {
                        true => (0, 10 + r),
                        false => (r.min(t - 1), t),
                    };
                    (0..t).map(|j| if j < left || j >= right { 0.0 } else { 1.0 }).collect()
                })
                .collect();
            let bias = AttentionInputs::new(&mask, t, &Device::Cpu).unwrap().bias;
            let width = (heads + 2 * kv_heads) * hd;
            let qkv = Var::from_tensor(&random(&[b, t, width], 2.0, i as u64)).unwrap();
            let up = random(&[b, t, heads * hd], 1.0, 10 + i as u64);
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = packed_attention(qkv.as_tensor(), &bias, heads, kv_heads, scale).unwrap();
            let reference = packed_attention_reference(qkv.as_tensor(), &bias, heads, kv_heads, scale).unwrap();
            let shape = format!("{b} {t} {heads}/{kv_heads} {hd}");
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape}");
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel_err(gf.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
            assert!(e < 1e-5, "{shape}: {e}");
        }
    }
}
