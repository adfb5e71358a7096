//! Masked reductions over `(batch, resp_len)` tensors and the loss aggregation modes.
//!
//! A mask holds `1.0` on real response tokens and `0.0` on padding. Reductions select with
//! the mask (`where`), they do not multiply by it, so a padded position holding `inf` or
//! `NaN` never leaks into a result. With `n = sum_{b,t} m_{b,t}` real tokens and `L_b` real
//! tokens in row `b`:
//!
//! - `masked_sum(x)  = sum_{b,t} m_{b,t} x_{b,t}`
//! - `masked_mean(x) = masked_sum(x) / n`
//! - `masked_var(x)  = masked_mean((x - masked_mean(x))^2)` (population variance, no Bessel
//!   correction, so whitening with it gives exactly unit standard deviation over the mask)
//! - `masked_row_mean(x)_b = (sum_t m_{b,t} x_{b,t}) / L_b`
//!
//! Loss aggregation ([`Aggregation`]):
//!
//! - `TokenMean`: `masked_mean(x)`: every real token of the batch weighs the same, so long
//!   responses weigh more.
//! - `SeqMean`: `(1/B) sum_b masked_row_mean(x)_b`: every response weighs the same.
//! - `TokenSum`: `(1/B) sum_b (sum_t m_{b,t} x_{b,t}) / L` with a constant `L` (Dr. GRPO,
//!   Liu et al. 2025: no length bias, every token of the batch weighs the same whatever the
//!   response lengths). The PPO loss takes `L` from its config; [`aggregate`] refuses it.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, scalar_f64, Result};

/// How per-token losses are reduced to one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over all real tokens of the batch.
    #[default]
    TokenMean,
    /// Mean over real tokens within each response, then mean over responses.
    SeqMean,
    /// Sum over real tokens within each response divided by a constant, then mean over
    /// responses (Dr. GRPO).
    TokenSum,
}

/// Checks that `t` is 2-D and returns its dims.
pub(crate) fn dims2(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        [b, l] => Ok((*b, *l)),
        d => invalid!("{name} must have shape (batch, resp_len), got {d:?}"),
    }
}

/// Checks that `t` has the same shape as `reference`.
pub(crate) fn same_shape(name: &str, t: &Tensor, ref_name: &str, reference: &Tensor) -> Result<()> {
    if t.dims() != reference.dims() {
        invalid!(
            "{name} has shape {:?} but {ref_name} has shape {:?}",
            t.dims(),
            reference.dims()
        );
    }
    Ok(())
}

/// The boolean (u8) form of a mask: `1` where the mask is non-zero.
pub(crate) fn keep(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.ne(0.0)?)
}

/// `x` where the mask keeps, `0` elsewhere. Differentiable in `x` (zero gradient at padding).
pub(crate) fn zero_pad(x: &Tensor, keep: &Tensor) -> Result<Tensor> {
    Ok(keep.where_cond(x, &x.zeros_like()?)?)
}

/// Lengths of the real part of each mask row, checking the mask convention: 2-D, entries
/// exactly `0.0` or `1.0`, each row a prefix of ones (right padding) of length at least 1.
pub fn row_lengths(mask: &Tensor) -> Result<Vec<usize>> {
    dims2("mask", mask)?;
    let rows = mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut lens = Vec::with_capacity(rows.len());
    for (b, row) in rows.iter().enumerate() {
        let len = row.iter().take_while(|&&m| m == 1.0).count();
        if let Some(t) = row[len..].iter().position(|&m| m != 0.0) {
            invalid!(
                "mask row {b} is not a right-padded prefix of ones: entry {} is {} after {len} ones",
                len + t,
                row[len + t]
            );
        }
        if len == 0 {
            invalid!("mask row {b} has no real token");
        }
        lens.push(len);
    }
    Ok(lens)
}

/// Number of real tokens (non-zero mask entries); an error when there is none.
pub fn mask_count(mask: &Tensor) -> Result<f64> {
    let n = scalar_f64(&keep(mask)?.to_dtype(DType::F64)?.sum_all()?)?;
    if n <= 0.0 {
        invalid!("mask selects no token");
    }
    Ok(n)
}

/// `sum_{b,t} m x` as a scalar tensor of `x`'s dtype.
pub fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    same_shape("x", x, "mask", mask)?;
    Ok(zero_pad(x, &keep(mask)?)?.sum_all()?)
}

/// Mean of `x` over the real tokens, a scalar tensor; an error when the mask is empty.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask_count(mask)?;
    Ok(masked_sum(x, mask)?.affine(1.0 / n, 0.0)?)
}

/// Population variance of `x` over the real tokens, a scalar tensor.
pub fn masked_var(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let centred = x.broadcast_sub(&mean)?;
    masked_mean(&centred.sqr()?, mask)
}

/// Per-row mean of `x` over the real tokens, shape `(batch,)`; an error when a row is empty.
pub fn masked_row_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    same_shape("x", x, "mask", mask)?;
    dims2("x", x)?;
    let keep = keep(mask)?;
    let lens = keep.to_dtype(x.dtype())?.sum(1)?;
    let min_len = scalar_f64(&lens.min(0)?)?;
    if min_len <= 0.0 {
        invalid!("a mask row has no real token");
    }
    Ok(zero_pad(x, &keep)?.sum(1)?.div(&lens)?)
}

/// Reduces per-token values `x` to a scalar with the given aggregation (see module docs).
pub fn aggregate(x: &Tensor, mask: &Tensor, aggregation: Aggregation) -> Result<Tensor> {
    match aggregation {
        Aggregation::TokenMean => masked_mean(x, mask),
        Aggregation::SeqMean => Ok(masked_row_mean(x, mask)?.mean_all()?),
        Aggregation::TokenSum => {
            invalid!("token_sum aggregation needs its constant normaliser (PpoLossConfig::token_sum_norm)")
        }
    }
}
