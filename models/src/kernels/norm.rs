//! Layer norm and RMS norm over the last dimension, with their backward.
//!
//! Per row of width `d`, with `xhat = (x - mean) * rstd` (layer norm) or `xhat = x * rstd`
//! (RMS norm) and `rstd = 1 / sqrt(var + eps)` (or `1 / sqrt(mean(x^2) + eps)`):
//!
//! ```text
//! y  = xhat * w (+ b)
//! g  = dy * w
//! dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      layer norm
//! dx = rstd * (g - xhat * mean(g * xhat))                RMS norm
//! dw = sum over rows of dy * xhat,  db = sum over rows of dy
//! ```
//!
//! A forward on a graph keeps each row's `mean` and `rstd` (two floats a row) for its
//! backward, which otherwise recomputes them from `x`: two more passes and lane reductions per
//! row, which weigh most on narrow rows (a 1 x 64 PPO learner step took 8% less time keeping
//! them). The backward returns `dx`, `dw` and `db` from one pass, packed into one buffer that is then
//! split with views.

// The backward's row loop takes the forward's statistics beside its seven inputs and outputs.
#![allow(clippy::too_many_arguments)]

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use std::sync::OnceLock;

use super::{contiguous_f32, fused_applies, multiversion, simd};

/// Layer norm of `x` over its last dimension with gain `w` and bias `b`; fused on the CPU for
/// f32, [`layer_norm_reference`] elsewhere.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_applies(x) && fused_applies(w) && fused_applies(b) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            Norm::new(eps, true, [x, w, b].iter().any(|t| t.track_op())),
        )
    } else {
        layer_norm_reference(x, w, b, eps)
    }
}

pub fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// RMS norm of `x` over its last dimension with gain `w`; fused on the CPU for f32,
/// [`rms_norm_reference`] elsewhere.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_applies(x) && fused_applies(w) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, Norm::new(eps, false, x.track_op() || w.track_op()))
    } else {
        rms_norm_reference(x, w, eps)
    }
}

pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

struct Norm {
    eps: f32,
    /// Layer norm (subtract the mean, add a bias) rather than RMS norm.
    centred: bool,
    /// Whether the forward keeps each row's (mean, rstd) for the backward: an input is on a
    /// graph, so a backward may follow.
    keep_stats: bool,
    /// `[mean, rstd]` per row of the forward's input, when `keep_stats`.
    stats: OnceLock<Vec<f32>>,
}

multiversion! {
    /// (mean, rstd) of one row; the mean is 0 for RMS norm.
    fn row_stats(x: &[f32], eps: f32, centred: bool, out: &mut (f32, f32)) {
        let d = x.len() as f32;
        let mean = if centred { simd::sum_map(x, |v| v) / d } else { 0.0 };
        let var = simd::sum_map(x, |v| (v - mean) * (v - mean)) / d;
        *out = (mean, 1.0 / (var + eps).sqrt());
    }
}

multiversion! {
    /// `y` for the rows of `x`; each row's `[mean, rstd]` goes to `stats` (two entries a row)
    /// when it is not empty.
    fn forward_rows(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, centred: bool, y: &mut [f32], stats: &mut [f32]) {
        let d = w.len();
        for (r, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let mut s = (0.0, 0.0);
            row_stats(x, eps, centred, &mut s);
            let (mean, rstd) = s;
            if !stats.is_empty() {
                stats[2 * r] = mean;
                stats[2 * r + 1] = rstd;
            }
            match b {
                Some(b) => {
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
                    }
                }
                None => {
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * rstd * w;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// dx for the rows of `x`; adds this chunk's dw into `dwb[..d]` and db into `dwb[d..]`.
    /// Each row's `[mean, rstd]` comes from `stats` (the forward's) when it is not empty, else
    /// from `x`.
    fn backward_rows(x: &[f32], w: &[f32], dy: &[f32], stats: &[f32], eps: f32, centred: bool, dx: &mut [f32], dwb: &mut [f32]) {
        let d = w.len();
        let (dw, db) = dwb.split_at_mut(d);
        for (r, ((x, dy), dx)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).enumerate() {
            let (mean, rstd) = if stats.is_empty() {
                let mut s = (0.0, 0.0);
                row_stats(x, eps, centred, &mut s);
                s
            } else {
                (stats[2 * r], stats[2 * r + 1])
            };
            let (g_sum, gx_sum) = simd::sum2_map3(x, dy, w, |x, dy, w| {
                let g = dy * w;
                (g, g * ((x - mean) * rstd))
            });
            let g_mean = if centred { g_sum / d as f32 } else { 0.0 };
            let gx_mean = gx_sum / d as f32;
            for ((((dx, &x), &dy), &w), dw) in dx.iter_mut().zip(x).zip(dy).zip(w).zip(dw.iter_mut()) {
                let xhat = (x - mean) * rstd;
                *dx = rstd * (dy * w - g_mean - xhat * gx_mean);
                *dw += dy * xhat;
            }
            if centred {
                for (db, &dy) in db.iter_mut().zip(dy) {
                    *db += dy;
                }
            }
        }
    }
}

impl Norm {
    fn new(eps: f64, centred: bool, keep_stats: bool) -> Self {
        Self {
            eps: eps as f32,
            centred,
            keep_stats,
            stats: OnceLock::new(),
        }
    }

    fn name(&self) -> &'static str {
        if self.centred {
            "fused-layer-norm"
        } else {
            "fused-rms-norm"
        }
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let d = w.len();
        if d == 0 || !x.len().is_multiple_of(d) || b.is_some_and(|b| b.len() != d) {
            candle_core::bail!("{}: gain of {d} entries for an input of shape {shape:?}", self.name());
        }
        let mut y = super::written_output(x.len()); // forward_rows assigns every element
        let (eps, centred) = (self.eps, self.centred);
        // Two entries a row, each assigned by forward_rows; none when nothing is kept.
        let mut stats = if self.keep_stats {
            super::written_output(2 * (x.len() / d))
        } else {
            vec![]
        };
        let chunk = super::chunk_len(y.len(), d);
        super::for_each_chunk_paired(&mut y, chunk, &mut stats, 2 * chunk / d, |off, out, stats| {
            forward_rows(&x[off..off + out.len()], w, b, eps, centred, out, stats)
        });
        if self.keep_stats {
            // Each call makes its own op, so this is its only forward.
            let _ = self.stats.set(stats);
        }
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// `[dx (x.len()), dw (d), db (d)]`, rows split over the current pool with one partial
    /// dw/db per chunk.
    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32]) -> Vec<f32> {
        let d = w.len();
        let stats = self
            .stats
            .get()
            .map(Vec::as_slice)
            .filter(|s| s.len() * d == 2 * x.len());
        // backward_rows assigns every element of dx; only the dw/db sums start from zero.
        let mut out = super::written_output(x.len() + 2 * d);
        let (dx, dwb) = out.split_at_mut(x.len());
        dwb.fill(0.0);
        let (eps, centred) = (self.eps, self.centred);
        super::for_each_chunk_summing(dx, d, dwb, |off, dx, dwb| {
            let r = off..off + dx.len();
            let stats = stats.map_or(&[][..], |s| &s[2 * off / d..2 * r.end / d]);
            backward_rows(&x[r.clone()], w, &dy[r], stats, eps, centred, dx, dwb)
        });
        out
    }

    /// Splits the packed backward buffer into gradients for x, w and (layer norm) b.
    fn unpack(packed: Tensor, x: &Tensor, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let n = x.elem_count();
        Ok((
            packed.narrow(0, 0, n)?.reshape(x.shape())?,
            packed.narrow(0, n, d)?,
            packed.narrow(0, n + d, d)?,
        ))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        Norm::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        self.forward(x, w, Some(b), l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBackward(self))?;
        let (dx, dw, db) = Norm::unpack(packed, x, w.dim(0)?)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        Norm::name(self)
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        self.forward(x, w, None, l1.shape())
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBackward(self))?;
        let (dx, dw, _) = Norm::unpack(packed, x, w.dim(0)?)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (x, w, dy) to the packed `[dx, dw, db]`, with the forward's row statistics where it kept
/// them.
struct NormBackward<'a>(&'a Norm);

impl CustomOp3 for NormBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let dy = contiguous_f32(s3, l3, self.name())?;
        let out = self.0.backward(x, w, dy);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::Var;

    const SHAPES: [&[usize]; 4] = [&[1, 4], &[3, 5, 33], &[16, 48, 256], &[700, 64]];

    #[test]
    fn layer_norm_matches_the_reference() {
        for (i, shape) in SHAPES.into_iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&(random(shape, 3.0, i as u64) + 0.7).unwrap()).unwrap();
            let w = Var::from_tensor(&random(&[d], 2.0, 10 + i as u64)).unwrap();
            let b = Var::from_tensor(&random(&[d], 2.0, 20 + i as u64)).unwrap();
            let up = random(shape, 1.0, 30 + i as u64);
            let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            let reference = layer_norm_reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape:?}");
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, what) in [(&x, "x"), (&w, "w"), (&b, "b")] {
                let e = rel_err(gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(e < 1e-5, "{shape:?} d{what}: {e}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_reference() {
        for (i, shape) in SHAPES.into_iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&random(shape, 3.0, i as u64)).unwrap();
            let w = Var::from_tensor(&random(&[d], 2.0, 10 + i as u64)).unwrap();
            let up = random(shape, 1.0, 30 + i as u64);
            let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
            let reference = rms_norm_reference(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape:?}");
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, what) in [(&x, "x"), (&w, "w")] {
                let e = rel_err(gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(e < 1e-5, "{shape:?} d{what}: {e}");
            }
        }
    }

    /// The backward gives the same bits from the forward's kept row statistics as from
    /// recomputing them, with the rows split over a pool or not.
    #[test]
    fn kept_row_statistics_give_the_recomputed_gradients() {
        let x = Var::from_tensor(&(random(&[700, 64], 3.0, 5) + 0.7).unwrap()).unwrap();
        let w = Var::from_tensor(&random(&[64], 2.0, 6)).unwrap();
        let b = Var::from_tensor(&random(&[64], 2.0, 7)).unwrap();
        let up = random(&[700, 64], 1.0, 8);
        let grads = |keep: bool| {
            let op = Norm::new(1e-5, true, keep);
            let y = x.as_tensor().apply_op3(w.as_tensor(), b.as_tensor(), op).unwrap();
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &w, &b].map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let recomputed = grads(false);
        assert_eq!(grads(true), recomputed);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(pool.install(|| grads(true))[0], recomputed[0]);
    }

    #[test]
    fn the_pool_split_gives_the_same_gradients() {
        let x = Var::from_tensor(&random(&[768, 256], 3.0, 1)).unwrap();
        let w = Var::from_tensor(&random(&[256], 2.0, 2)).unwrap();
        let b = Var::from_tensor(&random(&[256], 2.0, 3)).unwrap();
        let up = random(&[768, 256], 1.0, 4);
        let grads = || {
            let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone())
        };
        let one = grads();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let two = pool.install(grads);
        assert_eq!(rel_err(&one.0, &two.0), 0.0);
        assert!(rel_err(&one.1, &two.1) < 1e-6);
    }
}
