//! Generalised advantage estimation (Schulman et al. 2016) over masked, variable-length
//! responses, and masked advantage whitening.
//!
//! For one response with real tokens `t = 0 .. L-1`, rewards `r_t` and values `V_t`, the
//! episode ends after the last token (the value beyond it is 0):
//!
//! ```text
//! delta_t = r_t + gamma * V_{t+1} - V_t          V_L = 0
//! A_t     = delta_t + gamma * lambda * A_{t+1}   A_L = 0
//! R_t     = A_t + V_t                            (the critic's regression target)
//! ```
//!
//! Defaults `gamma = 1`, `lambda = 0.95`. With `gamma = lambda = 1`, `A_t` is the
//! reward-to-go `sum_{k >= t} r_k` minus `V_t`. Padded positions get `A = R = 0`, and
//! whatever the inputs hold there never reaches a real token. The recursion is sequential,
//! so it runs in plain Rust (f64) on the host; [`gae`] wraps it with tensors in and out.
//!
//! Whitening over the mask, with `mu`, `sigma^2` the masked mean and population variance
//! ([`super::masked`]):
//!
//! ```text
//! whiten(x)_t = (x_t - mu) / sqrt(sigma^2 + 1e-8)           shift_mean = true
//! whiten(x)_t = (x_t - mu) / sqrt(sigma^2 + 1e-8) + mu      shift_mean = false
//! ```
//!
//! and `0` at padding; with `shift_mean` the real entries have mean 0 and std 1.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::masked::{dims2, keep, masked_mean, masked_var, row_lengths, same_shape, zero_pad};
use super::{invalid, Result};

/// Added to the variance before the square root in [`masked_whiten`].
pub const WHITEN_EPS: f64 = 1e-8;

/// Discount and GAE parameter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaeConfig {
    /// Discount `gamma` in `[0, 1]`; 1 by default.
    pub gamma: f64,
    /// GAE `lambda` in `[0, 1]`; 0.95 by default.
    pub lambda: f64,
}

impl Default for GaeConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            lambda: 0.95,
        }
    }
}

impl GaeConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.gamma) {
            invalid!("gamma must lie in [0, 1], got {}", self.gamma);
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            invalid!("lambda must lie in [0, 1], got {}", self.lambda);
        }
        Ok(())
    }
}

/// Advantages and returns, both `(batch, resp_len)`, `0` at padding.
#[derive(Debug, Clone)]
pub struct GaeOutput {
    /// `A_t`.
    pub advantages: Tensor,
    /// `R_t = A_t + V_t`.
    pub returns: Tensor,
}

/// GAE over one unpadded response: returns `(advantages, returns)`, each of `rewards.len()`.
/// `values` must be at least as long as `rewards` (extra entries are ignored).
pub fn gae_row(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let len = rewards.len().min(values.len());
    let mut adv = vec![0.0; len];
    let mut next_value = 0.0;
    let mut next_adv = 0.0;
    for t in (0..len).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv;
        next_value = values[t];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// GAE over a padded batch (see the module docs). `rewards`, `values`, `mask`:
/// `(batch, resp_len)`, same dtype; the mask follows the right-padding convention.
pub fn gae(rewards: &Tensor, values: &Tensor, mask: &Tensor, cfg: &GaeConfig) -> Result<GaeOutput> {
    cfg.validate()?;
    same_shape("rewards", rewards, "mask", mask)?;
    same_shape("values", values, "mask", mask)?;
    let (batch, len) = dims2("mask", mask)?;
    let lens = row_lengths(mask)?;
    let r = rewards.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let v = values.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut adv = vec![0f64; batch * len];
    let mut ret = vec![0f64; batch * len];
    for (b, &l) in lens.iter().enumerate() {
        let (a_row, r_row) = gae_row(&r[b][..l], &v[b][..l], cfg.gamma, cfg.lambda);
        adv[b * len..b * len + l].copy_from_slice(&a_row);
        ret[b * len..b * len + l].copy_from_slice(&r_row);
    }
    let dev = mask.device();
    let dtype = rewards.dtype();
    Ok(GaeOutput {
        advantages: Tensor::from_vec(adv, (batch, len), dev)?.to_dtype(dtype)?,
        returns: Tensor::from_vec(ret, (batch, len), dev)?.to_dtype(dtype)?,
    })
}

/// Whitens `x` over the mask (see the module docs); `0` at padding.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    same_shape("x", x, "mask", mask)?;
    let keep = keep(mask)?;
    let x = zero_pad(x, &keep)?;
    let mean = masked_mean(&x, mask)?;
    let var = masked_var(&x, mask)?;
    let inv_std = (var + WHITEN_EPS)?.sqrt()?.recip()?;
    let mut w = x.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
    if !shift_mean {
        w = w.broadcast_add(&mean)?;
    }
    zero_pad(&w, &keep)
}
