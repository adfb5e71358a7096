//! The SwiGLU gate of Qwen2 / Llama MLPs: `y = silu(g) * u = g sigmoid(g) u`.
//! Backward, with `s = sigmoid(g)`: `dg = dy u s (1 + g (1 - s))`, `du = dy g s`; both come
//! from one pass, packed into one buffer that is split with views.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, for_each_chunk, fused_applies, multiversion, simd};

/// `silu(gate) * up`, fused on the CPU for f32, [`swiglu_reference`] elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_applies(gate) && fused_applies(up) && gate.dims() == up.dims() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        swiglu_reference(gate, up)
    }
}

pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + simd::exp(-x))
}

multiversion! {
    fn forward(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = sigmoid(g);
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * g * s;
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        let mut y = super::written_output(g.len()); // forward assigns every element
        for_each_chunk(&mut y, 1, |off, out| {
            let r = off..off + out.len();
            forward(&g[r.clone()], &u[r], out)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluBackward)?;
        let n = g.elem_count();
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(g.shape())?),
            Some(packed.narrow(0, n, n)?.reshape(g.shape())?),
        ))
    }
}

/// (gate, up, dy) to the packed `[dgate, dup]`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
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
        let g = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        let dy = contiguous_f32(s3, l3, self.name())?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        backward(g, u, dy, dg, du);
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::Var;

    #[test]
    fn values_and_gradients_match_the_reference() {
        for (i, shape) in [vec![5], vec![3, 7, 11], vec![96, 688]].into_iter().enumerate() {
            let g = Var::from_tensor(&random(&shape, 6.0, i as u64)).unwrap();
            let u = Var::from_tensor(&random(&shape, 2.0, 10 + i as u64)).unwrap();
            let w = random(&shape, 1.0, 20 + i as u64);
            let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let reference = swiglu_reference(g.as_tensor(), u.as_tensor()).unwrap();
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape:?}");
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&g, &u] {
                let e = rel_err(gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(e < 1e-5, "{shape:?}: {e}");
            }
        }
    }
}
