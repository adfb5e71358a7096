//! PPO-ptx (InstructGPT, Ouyang et al. 2022): mix pretraining gradients into PPO to limit
//! regressions on public NLP tasks.
//!
//! The objective maximised is
//! `E_{(x,y) ~ pi}[r(x,y) - beta log(pi(y|x) / pi_SFT(y|x))] + gamma E_{x ~ D_pretrain}[log pi(x)]`,
//! so with token log-probs `log pi(x_t | x_<t)` of a pretraining batch and its mask,
//!
//! ```text
//! ptx_loss = -gamma * (1/n) sum_{b,t} m_{b,t} log pi(x_{b,t} | x_{b,<t})       (token mean)
//! total    = ppo_loss + ptx_loss
//! ```
//!
//! One backward pass of `total` accumulates both gradients into the same parameters
//! (gradients add). The mask may have holes (e.g. left and right padding).

use candle_core::Tensor;

use super::masked::masked_mean;
use super::{invalid, Result};

/// `-gamma * masked_mean(token_logp)`, a scalar tensor, differentiable in `token_logp`.
/// `token_logp`, `mask`: `(batch, len)`; `gamma >= 0`.
pub fn ptx_loss(token_logp: &Tensor, mask: &Tensor, gamma: f64) -> Result<Tensor> {
    if !(gamma >= 0.0 && gamma.is_finite()) {
        invalid!("ptx gamma must be finite and >= 0, got {gamma}");
    }
    Ok((masked_mean(token_logp, mask)? * (-gamma))?)
}

/// `ppo_loss + ptx_loss(token_logp, mask, gamma)`: a single scalar whose backward pass
/// accumulates the PPO and pretraining gradients together.
pub fn with_ptx(ppo_loss: &Tensor, token_logp: &Tensor, mask: &Tensor, gamma: f64) -> Result<Tensor> {
    if ppo_loss.rank() != 0 {
        invalid!("ppo_loss must be a scalar, got shape {:?}", ppo_loss.dims());
    }
    Ok((ppo_loss + ptx_loss(token_logp, mask, gamma)?)?)
}
