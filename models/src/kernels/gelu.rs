//! GELU, tanh approximation (GPT-2's `gelu_new`): `y = x/2 (1 + tanh(c (x + 0.044715 x^3)))`,
//! `c = sqrt(2/pi)`. Backward: `dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, for_each_chunk, fused_applies, multiversion, simd};

const C: f32 = 0.797_884_56; // sqrt(2 / pi)
const A: f32 = 0.044_715;

/// GELU (tanh approximation), fused on the CPU for f32; [`gelu_reference`] elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_applies(x) {
        x.contiguous()?.apply_op1(GeluOp)
    } else {
        gelu_reference(x)
    }
}

/// candle's own GELU, whose backward is composed of elementwise ops.
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

multiversion! {
    fn forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let t = simd::tanh(C * (x + A * x * x * x));
            *y = 0.5 * x * (1.0 + t);
        }
    }
}

multiversion! {
    fn backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let x2 = x * x;
            let t = simd::tanh(C * (x + A * x2 * x));
            let d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x2);
            *dx = g * d;
        }
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut y = super::written_output(x.len()); // forward assigns every element
        for_each_chunk(&mut y, 1, |off, out| forward(&x[off..off + out.len()], out));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let mut dx = super::written_output(x.len()); // backward assigns every element
        for_each_chunk(&mut dx, 1, |off, out| {
            let r = off..off + out.len();
            backward(&x[r.clone()], &g[r], out)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
            let w = random(&shape, 1.0, 100 + i as u64);
            let fused = gelu(x.as_tensor()).unwrap();
            let reference = gelu_reference(x.as_tensor()).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape:?} values");
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gr) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(rel_err(gf, gr) < 1e-5, "{shape:?} gradients: {}", rel_err(gf, gr));
        }
    }

    #[test]
    fn runs_split_over_a_pool_with_the_same_result() {
        let x = random(&[256, 1024], 4.0, 9);
        let one = gelu(&x).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let three = pool.install(|| gelu(&x)).unwrap();
        assert_eq!(rel_err(&one, &three), 0.0);
    }
}
