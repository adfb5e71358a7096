//! Per-token estimators of `KL(pi || pi_ref)` from the log-probabilities of sampled tokens.
//!
//! With `logp = log pi(y_t | x, y_<t)` of the sampled token under the policy and
//! `ref_logp` the same under the reference model, let `d = logp - ref_logp`:
//!
//! | estimator | per-token value | notes |
//! |---|---|---|
//! | `k1` | `d` | unbiased, can be negative, high variance |
//! | `k2` | `0.5 * d^2` | biased, always `>= 0`, low variance |
//! | `k3` | `(r - 1) - log r`, `r = p_ref / p = exp(-d)` | unbiased, always `>= 0` |
//!
//! (Schulman, "Approximating KL divergence", 2020.) All three are differentiable in both
//! inputs. [`kl_per_token`] returns `0` at padded positions.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masked::{keep, same_shape, zero_pad};
use super::Result;

/// Which per-token KL estimator to use; named `"k1"`, `"k2"`, `"k3"` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - ref_logp`.
    #[default]
    K1,
    /// `0.5 * (logp - ref_logp)^2`.
    K2,
    /// `(r - 1) - log r` with `r = exp(ref_logp - logp)`.
    K3,
}

impl KlEstimator {
    /// The estimator on plain numbers (the reference the tensor version is tested against).
    pub fn value(self, logp: f64, ref_logp: f64) -> f64 {
        let d = logp - ref_logp;
        match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => (-d).exp() - 1.0 + d,
        }
    }

    /// The estimator elementwise on tensors of the same shape (no mask).
    pub fn apply(self, logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
        same_shape("logp", logp, "ref_logp", ref_logp)?;
        let d = (logp - ref_logp)?;
        Ok(match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => (d.sqr()? * 0.5)?,
            // log r = -d, so (r - 1) - log r = exp(-d) - 1 + d.
            KlEstimator::K3 => ((d.neg()?.exp()? + d)? - 1.0)?,
        })
    }
}

/// Per-token KL estimate, shape `(batch, resp_len)`, `0` at padded positions (whatever the
/// inputs hold there).
pub fn kl_per_token(estimator: KlEstimator, logp: &Tensor, ref_logp: &Tensor, mask: &Tensor) -> Result<Tensor> {
    same_shape("logp", logp, "mask", mask)?;
    same_shape("ref_logp", ref_logp, "mask", mask)?;
    let keep = keep(mask)?;
    let logp = zero_pad(logp, &keep)?;
    let ref_logp = zero_pad(ref_logp, &keep)?;
    zero_pad(&estimator.apply(&logp, &ref_logp)?, &keep)
}

/// Summed KL of each response, `sum_t m_{b,t} KL_{b,t}`, shape `(batch,)`; the batch mean
/// of this is the `KL_t` an adaptive KL controller observes.
pub fn sequence_kl(kl: &Tensor, mask: &Tensor) -> Result<Tensor> {
    same_shape("kl", kl, "mask", mask)?;
    Ok(zero_pad(kl, &keep(mask)?)?.sum(1)?)
}
