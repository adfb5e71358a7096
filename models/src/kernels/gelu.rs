//! GELU, tanh approximation (GPT-2's `gelu_new`), of a projection plus its bias:
//! `y = u/2 (1 + tanh(c (u + 0.044715 u^3)))` with `u = x + b` (b broadcast over rows),
//! `c = sqrt(2/pi)`. Backward: `du = dy * gelu'(u)`,
//! `gelu'(u) = (1 + t)/2 + u/2 (1 - t^2) c (1 + 3 * 0.044715 u^2)`, `dx = du` and
//! `db = sum over rows of du`.
//!
//! The MLP's first projection, its bias and the activation are one pass here instead of two
//! (bias add, GELU), and a forward on a graph stores `gelu'(u)` as it goes (the tanh is
//! already at hand), so the backward is one streaming pass that multiplies and sums columns,
//! with no tanh of its own.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{chunk_len, contiguous_f32, for_each_chunk, fused_applies, multiversion, simd};

const C: f32 = 0.797_884_6; // sqrt(2 / pi)
const A: f32 = 0.044_715;

/// `gelu(x + bias)` with `bias` broadcast over every dimension of `x` but the last; fused on the
/// CPU for f32, [`bias_gelu_reference`] elsewhere.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_applies(x) && fused_applies(bias) && bias.rank() == 1 && x.dim(D::Minus1)? == bias.dim(0)? {
        let keep = x.track_op() || bias.track_op();
        x.contiguous()?.apply_op2(
            &bias.contiguous()?,
            BiasGelu {
                keep_slope: keep,
                slope: OnceLock::new(),
            },
        )
    } else {
        bias_gelu_reference(x, bias)
    }
}

/// candle's bias add and GELU, whose backward is composed of elementwise ops.
pub fn bias_gelu_reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)?.gelu()
}

multiversion! {
    /// Rows of `x` (width `b.len()`): `y = gelu(x + b)`, and `gelu'(x + b)` into `slope` when
    /// it is not empty.
    fn forward(x: &[f32], b: &[f32], y: &mut [f32], slope: &mut [f32]) {
        let n = b.len();
        if slope.is_empty() {
            for (y, x) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                    let u = x + b;
                    let t = simd::tanh(C * (A * u * u).mul_add(u, u));
                    *y = 0.5 * u * (1.0 + t);
                }
            }
        } else {
            for ((y, s), x) in y.chunks_exact_mut(n).zip(slope.chunks_exact_mut(n)).zip(x.chunks_exact(n)) {
                for (((y, s), &x), &b) in y.iter_mut().zip(s.iter_mut()).zip(x).zip(b) {
                    let u = x + b;
                    let u2 = u * u;
                    let t = simd::tanh(C * (A * u2).mul_add(u, u));
                    *y = 0.5 * u * (1.0 + t);
                    *s = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * C * (1.0 + 3.0 * A * u2);
                }
            }
        }
    }
}

multiversion! {
    /// Rows of `du = g * slope`; adds their column sums into `db`.
    fn backward(slope: &[f32], g: &[f32], du: &mut [f32], db: &mut [f32]) {
        let n = db.len();
        for ((du, s), g) in du.chunks_exact_mut(n).zip(slope.chunks_exact(n)).zip(g.chunks_exact(n)) {
            for (((du, &s), &g), db) in du.iter_mut().zip(s).zip(g).zip(db.iter_mut()) {
                *du = g * s;
                *db += *du;
            }
        }
    }
}

struct BiasGelu {
    /// Whether the forward stores `gelu'(x + b)` for a backward (the input is on a graph;
    /// without one, the op and its buffer are dropped at once).
    keep_slope: bool,
    slope: OnceLock<Vec<f32>>,
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let n = b.len();
        if n == 0 || x.len() % n != 0 {
            candle_core::bail!(
                "{}: bias of {n} entries for an input of shape {:?}",
                self.name(),
                l1.shape()
            );
        }
        // forward assigns every element of y, and of slope when it is kept.
        let mut y = super::written_output(x.len());
        let mut slope = super::written_output(if self.keep_slope { x.len() } else { 0 });
        if self.keep_slope {
            let chunk = chunk_len(x.len(), n);
            y.par_chunks_mut(chunk)
                .zip(slope.par_chunks_mut(chunk))
                .enumerate()
                .for_each(|(i, (y, s))| forward(&x[i * chunk..][..y.len()], b, y, s));
            let _ = self.slope.set(slope);
        } else {
            for_each_chunk(&mut y, n, |off, y| forward(&x[off..][..y.len()], b, y, &mut []));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(slope) = self.slope.get() else {
            candle_core::bail!("{}: backward of a forward that kept no slope", self.name());
        };
        let n = bias.dim(0)?;
        let packed = grad.contiguous()?.apply_op1_no_bwd(&BiasGeluBackward { slope, n })?;
        let len = x.elem_count();
        Ok((
            Some(packed.narrow(0, 0, len)?.reshape(x.shape())?),
            Some(packed.narrow(0, len, n)?),
        ))
    }
}

/// dy to `[du (rows * n), db (n)]` in one buffer, rows split over the current pool
/// ([`super::for_each_chunk_summing`]).
struct BiasGeluBackward<'a> {
    slope: &'a [f32],
    n: usize,
}

impl CustomOp1 for BiasGeluBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        let (n, len) = (self.n, g.len());
        if len != self.slope.len() {
            candle_core::bail!(
                "{}: gradient of {len} elements for a slope of {}",
                self.name(),
                self.slope.len()
            );
        }
        let mut out = super::written_output(len + n); // du below, db zeroed and summed into
        let (du, db) = out.split_at_mut(len);
        db.fill(0.0);
        super::for_each_chunk_summing(du, n, db, |off, du, db| {
            let r = off..off + du.len();
            backward(&self.slope[r.clone()], &g[r], du, db)
        });
        Ok((CpuStorage::F32(out), Shape::from(len + n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::Var;

    #[test]
    fn values_and_gradients_match_the_reference() {
        for (i, shape) in [vec![7], vec![3, 5, 33], vec![64, 1024], vec![2, 96, 700]]
            .into_iter()
            .enumerate()
        {
            let x = Var::from_tensor(&random(&shape, 6.0, i as u64)).unwrap();
            let b = Var::from_tensor(&random(&[*shape.last().unwrap()], 1.0, 50 + i as u64)).unwrap();
            let w = random(&shape, 1.0, 100 + i as u64);
            let fused = bias_gelu(x.as_tensor(), b.as_tensor()).unwrap();
            let reference = bias_gelu_reference(x.as_tensor(), b.as_tensor()).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape:?} values");
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("x", &x), ("bias", &b)] {
                let (gf, gr) = (gf.get(var).unwrap(), gr.get(var).unwrap());
                assert!(
                    rel_err(gf, gr) < 1e-5,
                    "{shape:?} {name} gradients: {}",
                    rel_err(gf, gr)
                );
            }
        }
    }

    #[test]
    fn a_forward_off_the_graph_matches_and_keeps_nothing() {
        let (x, b) = (random(&[48, 1024], 4.0, 7), random(&[1024], 1.0, 8));
        let fused = bias_gelu(&x, &b).unwrap();
        assert!(!fused.track_op());
        assert!(rel_err(&fused, &bias_gelu_reference(&x, &b).unwrap()) < 1e-5);
    }

    #[test]
    fn runs_split_over_a_pool_with_the_same_result() {
        let x = Var::from_tensor(&random(&[256, 1024], 4.0, 9)).unwrap();
        let b = random(&[1024], 1.0, 10);
        let run = || {
            let y = bias_gelu(x.as_tensor(), &b).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let (y1, g1) = run();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let (y3, g3) = pool.install(run);
        assert_eq!(rel_err(&y1, &y3), 0.0);
        assert_eq!(rel_err(&g1, &g3), 0.0);
    }
}
