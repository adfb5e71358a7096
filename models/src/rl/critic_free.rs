//! Critic-free advantages from the scores of `n` samples of the same prompt.
//!
//! Scores have shape `(batch,)` with `batch = groups * n`, laid out as consecutive groups:
//! samples `g*n .. g*n + n - 1` answer prompt `g`. Within a group with mean `mu_g`:
//!
//! - GRPO (Shao et al. 2024, DeepSeekMath):
//!   `A_i = (s_i - mu_g) / (sigma_g + eps)`, `sigma_g` the sample standard deviation
//!   (Bessel-corrected, `n - 1`, as `torch.std`); with `scale_by_std = false` (Dr. GRPO)
//!   `A_i = s_i - mu_g`.
//! - RLOO (Ahmadian et al. 2024, after Kool et al. 2019): the baseline of sample `i` is the
//!   mean of the *other* samples, `A_i = s_i - (1/(n-1)) sum_{j != i} s_j
//!   = n/(n-1) * (s_i - mu_g)`.
//!
//! Both need `n >= 2`. The per-response advantage is then given to every real token of the
//! response with [`broadcast_to_tokens`].

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masked::{dims2, keep, zero_pad};
use super::{invalid, Result};

/// GRPO normalisation options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Divide by the group's standard deviation (true; false is Dr. GRPO).
    pub scale_by_std: bool,
    /// Added to the standard deviation (1e-6).
    pub eps: f64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            scale_by_std: true,
            eps: 1e-6,
        }
    }
}

/// Checks the layout and returns `scores` as `(groups, n)` and its group means `(groups, 1)`.
fn grouped(scores: &Tensor, group_size: usize) -> Result<(Tensor, Tensor)> {
    let batch = match scores.dims() {
        [b] => *b,
        d => invalid!("scores must have shape (batch,), got {d:?}"),
    };
    if group_size < 2 {
        invalid!("group size must be >= 2, got {group_size}");
    }
    if batch == 0 || batch % group_size != 0 {
        invalid!("group size {group_size} does not divide the batch of {batch} scores");
    }
    let g = scores.reshape((batch / group_size, group_size))?;
    let mean = (g.sum_keepdim(1)? / group_size as f64)?;
    Ok((g, mean))
}

/// GRPO advantages, shape `(batch,)` (see the module docs).
pub fn grpo_advantages(scores: &Tensor, group_size: usize, cfg: &GrpoConfig) -> Result<Tensor> {
    if !(cfg.eps >= 0.0 && cfg.eps.is_finite()) {
        invalid!("GRPO eps must be finite and >= 0, got {}", cfg.eps);
    }
    let (g, mean) = grouped(scores, group_size)?;
    let centred = g.broadcast_sub(&mean)?;
    let adv = if cfg.scale_by_std {
        let var = (centred.sqr()?.sum_keepdim(1)? / (group_size - 1) as f64)?;
        let std = (var.sqrt()? + cfg.eps)?;
        centred.broadcast_div(&std)?
    } else {
        centred
    };
    Ok(adv.flatten_all()?)
}

/// RLOO advantages, shape `(batch,)` (see the module docs).
pub fn rloo_advantages(scores: &Tensor, group_size: usize) -> Result<Tensor> {
    let (g, mean) = grouped(scores, group_size)?;
    let n = group_size as f64;
    Ok((g.broadcast_sub(&mean)? * (n / (n - 1.0)))?.flatten_all()?)
}

/// Gives each response's advantage `(batch,)` to all its real tokens: `(batch, resp_len)`,
/// `0` at padding.
pub fn broadcast_to_tokens(adv: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (batch, _) = dims2("mask", mask)?;
    if adv.dims() != [batch] {
        invalid!("advantages must have shape ({batch},), got {:?}", adv.dims());
    }
    let full = adv.unsqueeze(1)?.broadcast_as(mask.shape())?.contiguous()?;
    zero_pad(&full, &keep(mask)?)
}
