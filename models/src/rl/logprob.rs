//! Token log-probabilities and entropies from logits, differentiable (no fused kernels).
//!
//! For logits `z` over a vocabulary of `V` entries (last dimension):
//!
//! ```text
//! log_softmax(z)_v = z_v - m - log sum_u exp(z_u - m)      m = max_u z_u (a constant)
//! token_logprob    = log_softmax(z)_{y}                     y the target token
//! entropy          = -sum_v p_v log p_v,  p = softmax(z)
//! ```
//!
//! The shift `m` is detached: the expression does not depend on it mathematically, so this
//! keeps the exact gradient while avoiding overflow.

use candle_core::{DType, Tensor, D};

use super::{invalid, Result};

/// `log_softmax` over the last dimension, with gradients.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `log p(y_{b,t})` from logits `(batch, len, vocab)` and integer targets `(batch, len)`
/// (u32 or i64): shape `(batch, len)`. Differentiable in the logits.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, l) = match logits.dims() {
        [b, l, _] => (*b, *l),
        d => invalid!("logits must have shape (batch, len, vocab), got {d:?}"),
    };
    if targets.dims() != [b, l] {
        invalid!("targets must have shape ({b}, {l}), got {:?}", targets.dims());
    }
    if !matches!(targets.dtype(), DType::U32 | DType::I64 | DType::U8) {
        invalid!("targets must be integer token ids, got {:?}", targets.dtype());
    }
    let logp = log_softmax(logits)?;
    let idx = targets.unsqueeze(D::Minus1)?.contiguous()?;
    Ok(logp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?)
}

/// Entropy `-sum_v p_v log p_v` of each position of logits `(..., vocab)`: shape `(...)`.
/// Differentiable in the logits.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    if logits.rank() == 0 {
        invalid!("logits must have a vocabulary dimension");
    }
    let logp = log_softmax(logits)?;
    Ok((logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?)
}
