//! Optimiser helpers candle-nn lacks: global-norm gradient clipping, learning-rate
//! schedules, gradient accumulation over micro-batches and an exponential moving average of
//! weights. They work on `Var`s and `GradStore`s, so they compose with any
//! `candle_nn::Optimizer` (`opt.set_learning_rate(schedule.lr_at(step)); opt.step(&grads)`).
//!
//! - Global-norm clipping (Pascanu et al. 2013; `torch.nn.utils.clip_grad_norm_`):
//!   `N = sqrt(sum_v ||g_v||^2)`; if `N > max_norm`, every `g_v <- g_v * max_norm / (N + 1e-6)`.
//!   A non-finite `N` is returned with the gradients untouched: the caller should skip the
//!   step.
//! - Schedule, `w` warm-up steps, `T` total steps, peak `eta`, floor `eta_min`:
//!   `lr(s) = eta * (s + 1) / w` for `s < w`; then with `p = min((s - w) / max(T - w, 1), 1)`:
//!   constant `eta`; linear `eta_min + (eta - eta_min) (1 - p)`;
//!   cosine `eta_min + (eta - eta_min) (1 + cos(pi p)) / 2`.
//! - Accumulation: `G = sum_i c_i g_i` over micro-batches `i` with weights `c_i`, handed out
//!   as `scale * G`; [`GradAccumulator::finish_mean`] uses `scale = 1 / sum_i c_i`. With
//!   token-mean micro-batch losses and `c_i` = real tokens of micro-batch `i`, this is exactly
//!   the gradient of the token mean over the whole batch.
//! - EMA (InstructGPT uses decay 0.992): `theta_ema <- d * theta_ema + (1 - d) * theta`.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{invalid, Result};

/// `sqrt(sum_v ||g_v||^2)` over the vars that have a gradient in `grads`.
pub fn global_grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut sq = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += crate::kernels::sum_squares(g)?;
        }
    }
    Ok(sq.sqrt())
}

/// The factor global-norm clipping applies to gradients of global norm `norm`:
/// `max_norm / (norm + 1e-6)` above `max_norm`, else (or for a non-finite norm) 1.
pub fn clip_scale(norm: f64, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        invalid!("max_norm must be > 0, got {max_norm}");
    }
    Ok(if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    })
}

/// Rescales the gradients of `vars` so their global norm is at most `max_norm`; returns the
/// norm before clipping (see the module docs). An optimiser that can apply the factor as it
/// reads the gradients takes [`clip_scale`] instead (e.g. [`crate::AdamW::step_scaled`]),
/// which saves writing scaled copies.
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(vars, grads)?;
    let scale = clip_scale(norm, max_norm)?;
    if scale != 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * scale)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

/// Shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    /// Stay at the peak.
    Constant,
    /// Straight line from the peak to `min_lr` at `total_steps`.
    Linear,
    /// Half cosine from the peak to `min_lr` at `total_steps`.
    #[default]
    Cosine,
}

/// Linear warm-up then decay (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub peak_lr: f64,
    /// Warm-up steps (0 = none).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Total optimiser steps of the run.
    pub total_steps: usize,
    /// Decay after warm-up (cosine).
    #[serde(default)]
    pub decay: LrDecay,
    /// Floor of the decay (0).
    #[serde(default)]
    pub min_lr: f64,
}

impl LrSchedule {
    /// Checks `0 <= min_lr <= peak_lr`, `peak_lr > 0`, `warmup_steps <= total_steps`,
    /// `total_steps > 0`.
    pub fn validate(&self) -> Result<()> {
        if !(self.peak_lr > 0.0 && self.peak_lr.is_finite()) {
            invalid!("peak_lr must be finite and > 0, got {}", self.peak_lr);
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.peak_lr) {
            invalid!("min_lr must lie in [0, peak_lr], got {}", self.min_lr);
        }
        if self.total_steps == 0 {
            invalid!("total_steps must be > 0");
        }
        if self.warmup_steps > self.total_steps {
            invalid!(
                "warmup_steps ({}) exceeds total_steps ({})",
                self.warmup_steps,
                self.total_steps
            );
        }
        Ok(())
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let (eta, eta_min) = (self.peak_lr, self.min_lr);
        let w = self.warmup_steps;
        if step < w {
            return eta * (step + 1) as f64 / w as f64;
        }
        let span = self.total_steps.saturating_sub(w).max(1) as f64;
        let p = ((step - w) as f64 / span).min(1.0);
        match self.decay {
            LrDecay::Constant => eta,
            LrDecay::Linear => eta_min + (eta - eta_min) * (1.0 - p),
            LrDecay::Cosine => eta_min + (eta - eta_min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }
}

/// Sums the gradients of a fixed set of vars over micro-batches.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
    total_weight: f64,
}

impl GradAccumulator {
    /// Accumulates gradients of `vars` (other entries of a `GradStore` are ignored).
    pub fn new(vars: Vec<Var>) -> Self {
        let sums = vec![None; vars.len()];
        Self {
            vars,
            sums,
            micro_batches: 0,
            total_weight: 0.0,
        }
    }

    /// Adds one micro-batch's gradients with weight 1.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        self.add_weighted(grads, 1.0)
    }

    /// Adds `weight * g` for one micro-batch's gradients `g`; `weight > 0`.
    pub fn add_weighted(&mut self, grads: &GradStore, weight: f64) -> Result<()> {
        if !(weight > 0.0 && weight.is_finite()) {
            invalid!("micro-batch weight must be finite and > 0, got {weight}");
        }
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(v) {
                let g = if weight == 1.0 {
                    g.detach()
                } else {
                    (g.detach() * weight)?
                };
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.micro_batches += 1;
        self.total_weight += weight;
        Ok(())
    }

    /// Micro-batches added since the last finish.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Sum of the weights added since the last finish.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// `scale * sum_i c_i g_i` as a `GradStore` for `Optimizer::step`; resets the sums.
    pub fn finish(&mut self, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                let g = if scale == 1.0 { s } else { (s * scale)? };
                out.insert(v, g);
            }
        }
        self.micro_batches = 0;
        self.total_weight = 0.0;
        Ok(out)
    }

    /// The weighted mean `sum_i c_i g_i / sum_i c_i`; an error when nothing was added.
    pub fn finish_mean(&mut self) -> Result<GradStore> {
        if self.micro_batches == 0 {
            invalid!("GradAccumulator::finish_mean with no micro-batch added");
        }
        let scale = 1.0 / self.total_weight;
        self.finish(scale)
    }
}

/// Exponential moving average of a set of vars.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    sources: Vec<Var>,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current values; `decay` in `[0, 1)` (0.992 in InstructGPT).
    pub fn new(vars: &[Var], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            invalid!("EMA decay must lie in [0, 1), got {decay}");
        }
        let shadow = vars
            .iter()
            .map(|v| v.as_detached_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            decay,
            sources: vars.to_vec(),
            shadow,
        })
    }

    /// `shadow <- decay * shadow + (1 - decay) * var`, for every var.
    pub fn update(&mut self) -> Result<()> {
        let d = self.decay;
        for (s, v) in self.shadow.iter_mut().zip(&self.sources) {
            *s = ((&*s * d)? + (v.as_detached_tensor() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// The decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// The averaged values, in the order of the vars given to [`Self::new`].
    pub fn shadow(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the averaged values (a restored checkpoint); same count and shapes as the vars.
    pub fn set_shadow(&mut self, shadow: Vec<Tensor>) -> Result<()> {
        if shadow.len() != self.sources.len() || shadow.iter().zip(&self.sources).any(|(s, v)| s.dims() != v.dims()) {
            invalid!("EMA state does not match the parameters (count or shapes)");
        }
        self.shadow = shadow
            .into_iter()
            .zip(&self.sources)
            .map(|(s, v)| s.to_dtype(v.dtype()))
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    /// Writes the averaged values into `targets` (same order and shapes as the source vars),
    /// e.g. an evaluation copy of the model.
    pub fn copy_to(&self, targets: &[Var]) -> Result<()> {
        if targets.len() != self.shadow.len() {
            invalid!(
                "EMA holds {} tensors, {} targets given",
                self.shadow.len(),
                targets.len()
            );
        }
        for (t, s) in targets.iter().zip(&self.shadow) {
            t.set(s)?;
        }
        Ok(())
    }
}
