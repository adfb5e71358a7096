//! Adding a bias row to every row of a matrix: `y[r, c] = x[r, c] + b[c]`, and the same with a
//! residual added in the same pass: `y = (x + b) + r` (a projection's output joining the
//! residual stream).
//!
//! candle's `broadcast_add` computes the bias gradient with a generic reduction that divides
//! indices for every element; here the backward is `dx = dy` (and `dr = dy`) and
//! `db = sum over rows of dy`, one vectorised pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::{contiguous_f32, for_each_chunk, fused_applies, multiversion};

/// `x + bias` with `bias` broadcast over every dimension of `x` but the last; fused on the CPU
/// for f32, [`add_bias_reference`] elsewhere.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_applies(x) && fused_applies(bias) && bias.rank() == 1 && x.dim(D::Minus1)? == bias.dim(0)? {
        x.contiguous()?.apply_op2(&bias.contiguous()?, BiasOp)
    } else {
        add_bias_reference(x, bias)
    }
}

pub fn add_bias_reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)
}

/// `(x + bias) + residual`, `bias` broadcast as in [`add_bias`] and `residual` of `x`'s shape;
/// fused on the CPU for f32, [`add_bias_residual_reference`] elsewhere.
pub fn add_bias_residual(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    if fused_applies(x)
        && fused_applies(bias)
        && fused_applies(residual)
        && bias.rank() == 1
        && x.dim(D::Minus1)? == bias.dim(0)?
        && residual.dims() == x.dims()
    {
        x.contiguous()?
            .apply_op3(&bias.contiguous()?, &residual.contiguous()?, BiasResidualOp)
    } else {
        add_bias_residual_reference(x, bias, residual)
    }
}

pub fn add_bias_residual_reference(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)? + residual
}

multiversion! {
    fn add_rows(x: &[f32], b: &[f32], y: &mut [f32]) {
        for (y, x) in y.chunks_exact_mut(b.len()).zip(x.chunks_exact(b.len())) {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = x + b;
            }
        }
    }
}

multiversion! {
    fn add_rows_residual(x: &[f32], b: &[f32], r: &[f32], y: &mut [f32]) {
        let n = b.len();
        for ((y, x), r) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(r.chunks_exact(n)) {
            for (((y, &x), &b), &r) in y.iter_mut().zip(x).zip(b).zip(r) {
                *y = (x + b) + r;
            }
        }
    }
}

multiversion! {
    fn sum_rows(g: &[f32], out: &mut [f32]) {
        for row in g.chunks_exact(out.len()) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
    }
}

struct BiasOp;

impl CustomOp2 for BiasOp {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let mut y = super::written_output(x.len()); // add_rows assigns every element
        for_each_chunk(&mut y, b.len(), |off, out| add_rows(&x[off..off + out.len()], b, out));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSums(bias.dim(0)?))?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

struct BiasResidualOp;

impl CustomOp3 for BiasResidualOp {
    fn name(&self) -> &'static str {
        "fused-add-bias-residual"
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
        let b = contiguous_f32(s2, l2, self.name())?;
        let r = contiguous_f32(s3, l3, self.name())?;
        if b.is_empty() || x.len() % b.len() != 0 || r.len() != x.len() {
            candle_core::bail!(
                "{}: shapes {:?}, {:?}, {:?}",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut y = super::written_output(x.len()); // add_rows_residual assigns every element
        for_each_chunk(&mut y, b.len(), |off, out| {
            let n = out.len();
            add_rows_residual(&x[off..off + n], b, &r[off..off + n], out)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSums(bias.dim(0)?))?;
        Ok((Some(grad.clone()), Some(db), Some(grad.clone())))
    }
}

/// Sums a (rows, n) matrix over its rows.
struct ColumnSums(usize);

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "fused-add-bias-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        let mut out = vec![0f32; self.0];
        sum_rows(g, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::Var;

    #[test]
    fn values_and_gradients_match_the_reference() {
        for (i, (rows, cols)) in [(1, 3), (5, 17), (768, 256), (3 * 48, 1024)].into_iter().enumerate() {
            let x = Var::from_tensor(&random(&[rows, cols], 2.0, i as u64)).unwrap();
            let b = Var::from_tensor(&random(&[cols], 2.0, 50 + i as u64)).unwrap();
            let w = random(&[rows, cols], 1.0, 100 + i as u64);
            let fused = add_bias(x.as_tensor(), b.as_tensor()).unwrap();
            let reference = add_bias_reference(x.as_tensor(), b.as_tensor()).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-6);
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(rel_err(gf.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-6);
            assert!(rel_err(gf.get(&b).unwrap(), gr.get(&b).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn with_a_residual_values_and_gradients_match_the_reference() {
        for (i, (rows, cols)) in [(1, 3), (5, 17), (768, 256), (3 * 48, 1024)].into_iter().enumerate() {
            let x = Var::from_tensor(&random(&[rows, cols], 2.0, i as u64)).unwrap();
            let b = Var::from_tensor(&random(&[cols], 2.0, 50 + i as u64)).unwrap();
            let r = Var::from_tensor(&random(&[rows, cols], 2.0, 70 + i as u64)).unwrap();
            let w = random(&[rows, cols], 1.0, 100 + i as u64);
            let fused = add_bias_residual(x.as_tensor(), b.as_tensor(), r.as_tensor()).unwrap();
            let reference = add_bias_residual_reference(x.as_tensor(), b.as_tensor(), r.as_tensor()).unwrap();
            // The same additions in the same order.
            assert_eq!(rel_err(&fused, &reference), 0.0);
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(rel_err(gf.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-6);
            assert!(rel_err(gf.get(&r).unwrap(), gr.get(&r).unwrap()) < 1e-6);
            assert!(rel_err(gf.get(&b).unwrap(), gr.get(&b).unwrap()) < 1e-5);
        }
    }
}
