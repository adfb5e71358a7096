//! Optimiser arithmetic in place: the AdamW update and the squared norm of a gradient.
//!
//! The composition of candle ops for one AdamW step allocates about ten tensors the size of
//! the parameter and then copies three of them back into the variables; the norm for gradient
//! clipping converts every gradient to f64 before squaring it. Here the moments and the
//! parameter are updated in place, in one vectorised pass that does the same f32 operations
//! in the same order as the composition (so results are bit-identical), and the norm
//! accumulates f64 sums of f32 squares without a copy.
//!
//! candle lends one tensor's storage mutably per in-place op, so the pass runs innermost in
//! three nested ops: the parameter's, then the first moment's, then the second's, each
//! handing its slice inward.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, multiversion, REFERENCE_ONLY};

/// The scalars of one AdamW step for one parameter, as candle's composition rounds them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub lr: f64,
    /// `1 / (1 - beta1^t)` and `1 / (1 - beta2^t)`.
    pub scale_m: f64,
    pub scale_v: f64,
    /// `1 - lr * weight_decay`, or `None` where the parameter is not decayed.
    pub decay: Option<f64>,
    /// The gradient is used as `g * grad_scale` (rounded as candle's affine op rounds it);
    /// 1 leaves it as it is.
    pub grad_scale: f64,
}

/// Updates `m`, `v` and `var` in place with gradient `g`; `false` (nothing done) where the
/// fused path does not apply (not f32 on the CPU, or a non-contiguous tensor), and the caller
/// runs the composition.
pub fn adamw_update(var: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, step: &AdamWStep) -> Result<bool> {
    let all = [var, m, v, g];
    if REFERENCE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
        || !all
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        || !all.iter().all(|t| t.dims() == var.dims())
    {
        return Ok(false);
    }
    var.inplace_op2(g, &OnParam { m, v, step: *step })?;
    Ok(true)
}

/// `sum(g^2)` accumulated in f64; the composition converts `g` to f64 first.
pub fn sum_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 && !REFERENCE_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        g.contiguous()?.apply_op1_no_bwd(&SumSquares)?.to_scalar::<f64>()
    } else {
        g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: tensor must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: expected f32"),
    }
}

/// The scalars of [`AdamWStep`] in f32, as the kernel uses them.
#[derive(Clone, Copy)]
struct Scalars {
    beta1: f32,
    one_minus1: f32,
    beta2: f32,
    one_minus2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
    lr: f32,
    decay: f32,
    decays: bool,
    grad_scale: f32,
    scales: bool,
}

impl From<&AdamWStep> for Scalars {
    fn from(s: &AdamWStep) -> Self {
        Scalars {
            beta1: s.beta1 as f32,
            one_minus1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus2: (1.0 - s.beta2) as f32,
            scale_m: s.scale_m as f32,
            scale_v: s.scale_v as f32,
            eps: s.eps as f32,
            lr: s.lr as f32,
            decay: s.decay.unwrap_or(1.0) as f32,
            decays: s.decay.is_some(),
            grad_scale: s.grad_scale as f32,
            scales: s.grad_scale != 1.0,
        }
    }
}

multiversion! {
    /// One AdamW step per element, each product rounded as candle's affine op rounds it
    /// (`x * a + 0`): m = m b1 + g (1 - b1), v = v b2 + g² (1 - b2), then the parameter.
    fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: Scalars) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = if s.scales { g * s.grad_scale + 0.0 } else { g };
            *m = (*m * s.beta1 + 0.0) + (g * s.one_minus1 + 0.0);
            *v = (*v * s.beta2 + 0.0) + ((g * g) * s.one_minus2 + 0.0);
            let m_hat = *m * s.scale_m + 0.0;
            let v_hat = *v * s.scale_v + 0.0;
            let update = m_hat / ((v_hat.sqrt()) * 1.0 + s.eps);
            let decayed = if s.decays { *p * s.decay + 0.0 } else { *p };
            *p = decayed - (update * s.lr + 0.0);
        }
    }
}

multiversion! {
    fn squares(g: &[f32], out: &mut f64) {
        let mut acc = [0f64; 4];
        let chunks = g.chunks_exact(4);
        let mut s = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        for c in chunks {
            for k in 0..4 {
                acc[k] += (c[k] as f64) * (c[k] as f64);
            }
        }
        s += acc.iter().sum::<f64>();
        *out = s;
    }
}

/// Outermost: the parameter's storage, with the gradient.
struct OnParam<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    step: AdamWStep,
}

impl InplaceOp2 for OnParam<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let p = RefCell::new(slice_mut(s1, l1, self.name())?);
        let g = contiguous_f32(s2, l2, self.name())?;
        self.m.inplace_op1(&OnFirstMoment {
            p: &p,
            g,
            v: self.v,
            step: &self.step,
        })
    }
}

/// Then the first moment's storage.
struct OnFirstMoment<'a, 'b> {
    p: &'a RefCell<&'b mut [f32]>,
    g: &'a [f32],
    v: &'a Tensor,
    step: &'a AdamWStep,
}

impl InplaceOp1 for OnFirstMoment<'_, '_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let m = RefCell::new(slice_mut(s, l, self.name())?);
        self.v.inplace_op1(&OnSecondMoment {
            p: self.p,
            m: &m,
            g: self.g,
            step: self.step,
        })
    }
}

/// Innermost: the second moment's storage; runs the pass.
struct OnSecondMoment<'a, 'p, 'm> {
    p: &'a RefCell<&'p mut [f32]>,
    m: &'a RefCell<&'m mut [f32]>,
    g: &'a [f32],
    step: &'a AdamWStep,
}

impl InplaceOp1 for OnSecondMoment<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let v = slice_mut(s, l, self.name())?;
        let (mut p, mut m) = (self.p.borrow_mut(), self.m.borrow_mut());
        adamw(&mut p, &mut m, v, self.g, Scalars::from(self.step));
        Ok(())
    }
}

struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "fused-sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = 0f64;
        squares(contiguous_f32(s, l, self.name())?, &mut out);
        Ok((CpuStorage::F64(vec![out]), Shape::from(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    #[test]
    fn sum_squares_matches_the_f64_composition() {
        for (i, n) in [1usize, 7, 4096, 100_003].into_iter().enumerate() {
            let g = random(&[n], 3.0, i as u64);
            let reference = g
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let fused = sum_squares(&g).unwrap();
            assert!(
                (fused - reference).abs() <= 1e-12 * reference,
                "{n}: {fused} vs {reference}"
            );
        }
    }

    #[test]
    fn the_update_is_bit_identical_to_the_composition_with_and_without_decay_and_clipping() {
        for (decay, grad_scale) in [
            (None, 1.0),
            (Some(1.0 - 1e-3 * 0.1), 1.0),
            (Some(1.0 - 1e-3 * 0.1), 0.37),
        ] {
            let (p, m, v, g) = (
                random(&[33, 17], 1.0, 1),
                random(&[33, 17], 0.1, 2),
                random(&[33, 17], 0.1, 3).abs().unwrap(),
                random(&[33, 17], 1.0, 4),
            );
            let step = AdamWStep {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                lr: 1e-3,
                scale_m: 1.0 / (1.0 - 0.9f64.powi(3)),
                scale_v: 1.0 / (1.0 - 0.999f64.powi(3)),
                decay,
                grad_scale,
            };
            // The composition: clip_grad_norm's scaled copy, then the AdamW ops.
            let raw = g.clone();
            let g = if grad_scale == 1.0 {
                g
            } else {
                (&g * grad_scale).unwrap()
            };
            let next_m = ((&m * step.beta1).unwrap() + (&g * (1.0 - step.beta1)).unwrap()).unwrap();
            let next_v = ((&v * step.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - step.beta2)).unwrap()).unwrap();
            let update = ((&next_m * step.scale_m).unwrap()
                / ((&next_v * step.scale_v).unwrap().sqrt().unwrap() + step.eps).unwrap())
            .unwrap();
            let decayed = match decay {
                Some(d) => (&p * d).unwrap(),
                None => p.clone(),
            };
            let expected = (decayed - (update * step.lr).unwrap()).unwrap();
            let (p2, m2, v2) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
            assert!(adamw_update(&p2, &m2, &v2, &raw, &step).unwrap());
            assert_eq!(p2.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());
            assert_eq!(m2.to_vec2::<f32>().unwrap(), next_m.to_vec2::<f32>().unwrap());
            assert_eq!(v2.to_vec2::<f32>().unwrap(), next_v.to_vec2::<f32>().unwrap());
        }
    }
}
