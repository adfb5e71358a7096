//! Optimiser arithmetic in place: the AdamW update and the squared norm of a gradient.
//!
//! The composition of candle ops for one AdamW step allocates about ten tensors the size of
//! the parameter and then copies three of them back into the variables; the norm for gradient
//! clipping converts every gradient to f64 before squaring it. Here the moments and the
//! parameter are updated in place, in three vectorised passes that do the same f32 operations
//! in the same order as the composition (so results are bit-identical), and the norm
//! accumulates f64 sums of f32 squares without a copy.

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor};

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
    m.inplace_op2(
        g,
        &Moment {
            beta: step.beta1 as f32,
            one_minus: (1.0 - step.beta1) as f32,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: step.beta2 as f32,
            one_minus: (1.0 - step.beta2) as f32,
            square: true,
        },
    )?;
    var.inplace_op3(m, v, &Param(*step))?;
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

multiversion! {
    /// m = m * beta + g * (1 - beta), or with g^2; each product rounded as candle's affine
    /// op rounds it (`x * a + 0`).
    fn moment(m: &mut [f32], g: &[f32], beta: f32, one_minus: f32, square: bool) {
        if square {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = (*m * beta + 0.0) + ((g * g) * one_minus + 0.0);
            }
        } else {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = (*m * beta + 0.0) + (g * one_minus + 0.0);
            }
        }
    }
}

multiversion! {
    fn param(p: &mut [f32], m: &[f32], v: &[f32], sm: f32, sv: f32, eps: f32, lr: f32, decay: f32, decays: bool) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let m_hat = m * sm + 0.0;
            let v_hat = v * sv + 0.0;
            let update = m_hat / ((v_hat.sqrt()) * 1.0 + eps);
            let decayed = if decays { *p * decay + 0.0 } else { *p };
            *p = decayed - (update * lr + 0.0);
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

struct Moment {
    beta: f32,
    one_minus: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "fused-adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = contiguous_f32(s2, l2, "fused-adamw-moment")?;
        let m = slice_mut(s1, l1, "fused-adamw-moment")?;
        moment(m, g, self.beta, self.one_minus, self.square);
        Ok(())
    }
}

struct Param(AdamWStep);

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "fused-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let m = contiguous_f32(s2, l2, "fused-adamw-param")?;
        let v = contiguous_f32(s3, l3, "fused-adamw-param")?;
        let p = slice_mut(s1, l1, "fused-adamw-param")?;
        let s = &self.0;
        param(
            p,
            m,
            v,
            s.scale_m as f32,
            s.scale_v as f32,
            s.eps as f32,
            s.lr as f32,
            s.decay.unwrap_or(1.0) as f32,
            s.decay.is_some(),
        );
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
    fn the_update_is_bit_identical_to_the_composition_with_and_without_decay() {
        for decay in [None, Some(1.0 - 1e-3 * 0.1)] {
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
            assert!(adamw_update(&p2, &m2, &v2, &g, &step).unwrap());
            assert_eq!(p2.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());
            assert_eq!(m2.to_vec2::<f32>().unwrap(), next_m.to_vec2::<f32>().unwrap());
            assert_eq!(v2.to_vec2::<f32>().unwrap(), next_v.to_vec2::<f32>().unwrap());
        }
    }
}
