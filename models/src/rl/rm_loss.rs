//! Reward-model losses over scalar rewards `r` produced by a reward head.
//!
//! - Pairwise Bradley–Terry (Christiano et al. 2017; Stiennon et al. 2020), over a batch of
//!   `B` preference pairs:
//!   `loss = (1/B) sum_b -log sigmoid(r_chosen_b - r_rejected_b)`.
//! - Best-of-K (Ziegler et al. 2019): a labeller picks the best of `K` responses; softmax
//!   cross-entropy over the `K` rewards of each prompt, rewards `(B, K)`, chosen index `c_b`:
//!   `loss = (1/B) sum_b [log sum_k exp(r_{b,k}) - r_{b,c_b}]`.
//! - Ranking (InstructGPT, Ouyang et al. 2022): a labeller ranks `K` responses; all `C(K,2)`
//!   pairs of one prompt stay together in one batch element, and each prompt weighs the
//!   same:
//!   `loss = (1/B) sum_b (1/C(K,2)) sum_{(w,l)} -log sigmoid(r_{b,w} - r_{b,l})`,
//!   summing over the pairs where `w` is ranked above `l`. With `K = 2` this is
//!   Bradley–Terry.
//!
//! `-log sigmoid(x) = softplus(-x)` is computed as `m + log(exp(-m) + exp(-x - m))` with the
//! constant shift `m = max(-x, 0)`: no overflow, and the exact gradient `-sigmoid(-x)`
//! everywhere, including `x = 0` (where a `relu`/`abs` form would give 0, stalling a reward
//! head initialised to output equal rewards).

use candle_core::{DType, Tensor};

use super::logprob::log_softmax;
use super::{invalid, scalar_f64, Result};

/// Elementwise `-log sigmoid(x)`, stable and with exact gradients (see the module docs).
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let m = x.neg()?.relu()?.detach();
    let a = m.neg()?.exp()?;
    let b = (x.neg()? - &m)?.exp()?;
    Ok(((a + b)?.log()? + m)?)
}

fn check_pairs(chosen: &Tensor, rejected: &Tensor) -> Result<()> {
    match (chosen.dims(), rejected.dims()) {
        ([b1], [b2]) if b1 == b2 && *b1 > 0 => Ok(()),
        (c, r) => {
            invalid!("chosen and rejected rewards must both have shape (batch,) with batch > 0, got {c:?} and {r:?}")
        }
    }
}

/// Bradley–Terry loss, mean over the batch of `-log sigmoid(r_chosen - r_rejected)`.
/// `chosen`, `rejected`: `(batch,)`.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    check_pairs(chosen, rejected)?;
    Ok(neg_log_sigmoid(&(chosen - rejected)?)?.mean_all()?)
}

/// Fraction of pairs with `r_chosen > r_rejected`.
pub fn pairwise_accuracy(chosen: &Tensor, rejected: &Tensor) -> Result<f32> {
    check_pairs(chosen, rejected)?;
    let hits = chosen.gt(rejected)?.to_dtype(DType::F64)?.mean_all()?;
    Ok(scalar_f64(&hits)? as f32)
}

fn check_k(rewards: &Tensor) -> Result<(usize, usize)> {
    match rewards.dims() {
        [b, k] if *b > 0 && *k >= 2 => Ok((*b, *k)),
        d => invalid!("rewards must have shape (batch, K) with batch > 0 and K >= 2, got {d:?}"),
    }
}

/// Best-of-K softmax cross-entropy. `rewards: (batch, K)`, `best[b]` the index in `0..K` of
/// the response the labeller picked.
pub fn best_of_k_loss(rewards: &Tensor, best: &[usize]) -> Result<Tensor> {
    let (b, k) = check_k(rewards)?;
    if best.len() != b {
        invalid!("{} best indices for a batch of {b}", best.len());
    }
    if let Some(i) = best.iter().find(|&&i| i >= k) {
        invalid!("best index {i} out of range for K = {k}");
    }
    let idx: Vec<u32> = best.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, (b, 1), rewards.device())?;
    let logp = log_softmax(rewards)?;
    Ok(logp.gather(&idx, 1)?.mean_all()?.neg()?)
}

/// InstructGPT ranking loss over all `C(K,2)` pairs per prompt. `rewards: (batch, K)`;
/// `ranking[b]` lists the `K` response indices of prompt `b` from best to worst (a
/// permutation of `0..K`).
pub fn ranking_loss(rewards: &Tensor, ranking: &[Vec<usize>]) -> Result<Tensor> {
    let (b, k) = check_k(rewards)?;
    if ranking.len() != b {
        invalid!("{} rankings for a batch of {b}", ranking.len());
    }
    let pairs = k * (k - 1) / 2;
    let mut win = Vec::with_capacity(b * pairs);
    let mut lose = Vec::with_capacity(b * pairs);
    for (row, order) in ranking.iter().enumerate() {
        let mut seen = vec![false; k];
        if order.len() != k {
            invalid!("ranking {row} has {} entries, expected K = {k}", order.len());
        }
        for &i in order {
            if i >= k || std::mem::replace(&mut seen[i], true) {
                invalid!("ranking {row} is not a permutation of 0..{k}: {order:?}");
            }
        }
        for i in 0..k {
            for j in i + 1..k {
                win.push(order[i] as u32);
                lose.push(order[j] as u32);
            }
        }
    }
    let dev = rewards.device();
    let win = Tensor::from_vec(win, (b, pairs), dev)?;
    let lose = Tensor::from_vec(lose, (b, pairs), dev)?;
    let diff = (rewards.gather(&win, 1)? - rewards.gather(&lose, 1)?)?;
    // Every row has C(K,2) pairs, so the mean over all entries is the mean over prompts of
    // the per-prompt mean over pairs.
    Ok(neg_log_sigmoid(&diff)?.mean_all()?)
}
