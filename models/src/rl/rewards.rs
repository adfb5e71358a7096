//! Per-token rewards for PPO and reward-model score normalisation.
//!
//! # Per-token rewards
//!
//! For response `b` with `L_b` real tokens, reward-model score `s_b` and per-token KL
//! estimate `KL_{b,t}` (see [`super::kl`]):
//!
//! ```text
//! r_{b,t} = -beta * KL_{b,t} + [t == L_b - 1] * clip(s_b, -c, c)      for t < L_b
//! r_{b,t} = 0                                                           for t >= L_b (padding)
//! ```
//!
//! The score is credited once, at the last real token; `c` is the optional score clip
//! ([`RewardConfig::score_clip`], `None` = no clipping). The pipeline order is
//! score -> normalise ([`RunningMeanStd`] or [`FixedGainBias`]) -> clip -> credit.
//!
//! # Normalisers
//!
//! - [`RunningMeanStd`] keeps the running count, mean and (population) variance of every
//!   score seen (Chan et al.'s parallel update), and maps `s -> (s - mean) / sqrt(var + eps)`.
//! - [`FixedGainBias`] is fitted once on a reference set `{s_i}` (e.g. reward-model scores of
//!   reference-policy samples) as `gain = 1 / std`, `bias = -mean / std` (population std),
//!   and maps `s -> gain * s + bias`, so the reference set scores mean 0, std 1 exactly
//!   (the normalisation of Ziegler et al. 2019 and InstructGPT).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::kl::{kl_per_token, KlEstimator};
use super::masked::{dims2, row_lengths, same_shape};
use super::{invalid, Result};

/// How the reward stage turns a score and log-probs into per-token rewards.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// KL estimator of the per-token penalty.
    pub kl_estimator: KlEstimator,
    /// Clip the (normalised) score to `[-c, c]` before crediting it; `None` keeps it.
    pub score_clip: Option<f64>,
    /// Score normalisation before the clip (none).
    pub normalize: ScoreNormalization,
}

/// How the learner normalises scores before clipping and crediting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreNormalization {
    /// Scores as the reward source gave them.
    #[default]
    None,
    /// [`RunningMeanStd`] over every score the learner has seen, the current batch included
    /// (folded in first, so the first batch is normalised by its own statistics).
    Running,
}

/// Per-token rewards and the per-token KL estimate they were made with.
#[derive(Debug, Clone)]
pub struct TokenRewards {
    /// `(batch, resp_len)` rewards, `0` at padding.
    pub rewards: Tensor,
    /// `(batch, resp_len)` KL estimate, `0` at padding.
    pub kl: Tensor,
}

impl RewardConfig {
    /// Computes the per-token KL with [`Self::kl_estimator`] and the per-token rewards.
    ///
    /// `scores: (batch,)`; `logp`, `ref_logp`, `mask: (batch, resp_len)`.
    pub fn token_rewards(
        &self,
        scores: &Tensor,
        logp: &Tensor,
        ref_logp: &Tensor,
        mask: &Tensor,
        beta: f64,
    ) -> Result<TokenRewards> {
        let kl = kl_per_token(self.kl_estimator, logp, ref_logp, mask)?;
        let rewards = per_token_rewards(scores, &kl, mask, beta, self.score_clip)?;
        Ok(TokenRewards { rewards, kl })
    }
}

/// `r_{b,t} = -beta * kl_{b,t} + [t == L_b - 1] * clip(s_b, -c, c)` on real tokens, `0` on
/// padding (see the module docs).
///
/// `scores: (batch,)`; `kl`, `mask: (batch, resp_len)`; the mask must follow the
/// right-padding convention ([`row_lengths`]).
pub fn per_token_rewards(
    scores: &Tensor,
    kl: &Tensor,
    mask: &Tensor,
    beta: f64,
    score_clip: Option<f64>,
) -> Result<Tensor> {
    same_shape("kl", kl, "mask", mask)?;
    let (batch, len) = dims2("mask", mask)?;
    if scores.dims() != [batch] {
        invalid!("scores must have shape ({batch},), got {:?}", scores.dims());
    }
    if !beta.is_finite() {
        invalid!("beta must be finite, got {beta}");
    }
    let scores = match score_clip {
        Some(c) if c > 0.0 => scores.clamp(-c, c)?,
        Some(c) => invalid!("score_clip must be > 0, got {c}"),
        None => scores.clone(),
    };
    let lens = row_lengths(mask)?;
    let mut last = vec![0f32; batch * len];
    for (b, l) in lens.iter().enumerate() {
        last[b * len + l - 1] = 1.0;
    }
    let last = Tensor::from_vec(last, (batch, len), mask.device())?.to_dtype(kl.dtype())?;
    let keep = mask.ne(0.0)?;
    let kl = keep.where_cond(kl, &kl.zeros_like()?)?;
    let credit = last.broadcast_mul(&scores.to_dtype(kl.dtype())?.unsqueeze(1)?)?;
    Ok(((kl * (-beta))? + credit)?)
}

/// Running mean and population variance of scores, for `(s - mean) / sqrt(var + eps)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningMeanStd {
    /// Number of scores seen.
    pub count: f64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean (`count * var`).
    pub m2: f64,
    /// Added to the variance before the square root.
    pub eps: f64,
}

impl Default for RunningMeanStd {
    fn default() -> Self {
        Self::new()
    }
}

impl RunningMeanStd {
    /// No score seen yet; `eps = 1e-8`.
    pub fn new() -> Self {
        Self {
            count: 0.0,
            mean: 0.0,
            m2: 0.0,
            eps: 1e-8,
        }
    }

    /// Folds a batch of scores into the running statistics (Chan et al.'s merge):
    /// `delta = mean_B - mean`, `n' = n + n_B`, `mean' = mean + delta * n_B / n'`,
    /// `m2' = m2 + m2_B + delta^2 * n * n_B / n'`.
    pub fn update(&mut self, scores: &[f64]) -> Result<()> {
        if scores.iter().any(|s| !s.is_finite()) {
            invalid!("scores must be finite");
        }
        if scores.is_empty() {
            return Ok(());
        }
        let nb = scores.len() as f64;
        let mean_b = scores.iter().sum::<f64>() / nb;
        let m2_b = scores.iter().map(|s| (s - mean_b).powi(2)).sum::<f64>();
        let delta = mean_b - self.mean;
        let total = self.count + nb;
        self.mean += delta * nb / total;
        self.m2 += m2_b + delta * delta * self.count * nb / total;
        self.count = total;
        Ok(())
    }

    /// [`Self::update`] with a `(batch,)` tensor of scores.
    pub fn update_tensor(&mut self, scores: &Tensor) -> Result<()> {
        let v = scores.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.update(&v)
    }

    /// Population variance of the scores seen (0 before any).
    pub fn var(&self) -> f64 {
        if self.count > 0.0 {
            self.m2 / self.count
        } else {
            0.0
        }
    }

    /// Population standard deviation of the scores seen.
    pub fn std(&self) -> f64 {
        self.var().sqrt()
    }

    /// `(s - mean) / sqrt(var + eps)`; an error before any score was seen.
    pub fn normalize(&self, scores: &Tensor) -> Result<Tensor> {
        if self.count <= 0.0 {
            invalid!("RunningMeanStd::normalize before any update");
        }
        let inv = 1.0 / (self.var() + self.eps).sqrt();
        Ok(scores.affine(inv, -self.mean * inv)?)
    }
}

/// Affine score normalisation `s -> gain * s + bias`, fitted so a reference set scores
/// mean 0 and (population) std 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedGainBias {
    /// Multiplier.
    pub gain: f64,
    /// Offset added after the multiplication.
    pub bias: f64,
}

impl FixedGainBias {
    /// `gain = 1 / std`, `bias = -mean / std` over `reference` (population std). An error
    /// with fewer than 2 scores, a non-finite score, or zero spread.
    pub fn fit(reference: &[f64]) -> Result<Self> {
        if reference.len() < 2 {
            invalid!(
                "FixedGainBias::fit needs at least 2 reference scores, got {}",
                reference.len()
            );
        }
        if reference.iter().any(|s| !s.is_finite()) {
            invalid!("reference scores must be finite");
        }
        let n = reference.len() as f64;
        let mean = reference.iter().sum::<f64>() / n;
        let var = reference.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        if std <= 0.0 || !std.is_finite() {
            invalid!("reference scores have zero spread");
        }
        Ok(Self {
            gain: 1.0 / std,
            bias: -mean / std,
        })
    }

    /// [`Self::fit`] on a tensor of reference scores.
    pub fn fit_tensor(reference: &Tensor) -> Result<Self> {
        let v = reference.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Self::fit(&v)
    }

    /// `gain * s + bias`, elementwise.
    pub fn apply(&self, scores: &Tensor) -> Result<Tensor> {
        Ok(scores.affine(self.gain, self.bias)?)
    }
}
