//! PPO losses (Schulman et al. 2017) with value clipping, an entropy bonus, configurable
//! aggregation, the decoupled off-policy correction for asynchronous rollouts, and the
//! statistics users watch.
//!
//! # Policy loss
//!
//! Per real token, with `logp = log pi_theta` (differentiable), `prox_logp = log pi_prox`
//! (the policy at the start of the learner step, i.e. "old" in on-policy PPO) and advantage
//! `A`:
//!
//! ```text
//! ratio = exp(logp - prox_logp)
//! w     = min(exp(prox_logp - behaviour_logp), cap)   (1 without behaviour log-probs)
//! pg_t  = -w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
//! ```
//!
//! `w` is the truncated importance weight of decoupled PPO (Hilton et al. 2021; AReaL): the
//! sample came from a behaviour policy `pi_behaviour` (a sampler a few versions stale); the
//! trust region is taken around `pi_prox` and `w` corrects `pi_behaviour -> pi_prox`. It is
//! treated as a constant. The cap defaults to 2 (truncated importance sampling, as in TIS,
//! Yao et al. 2025, and IMPALA's truncated weights): one token whose behaviour probability
//! was tiny cannot dominate a minibatch. `cap = None` (or `inf`) leaves it untruncated; a cap
//! must be `>= 1`, so that on-policy samples (`behaviour_logp == prox_logp`, hence `w = 1`
//! exactly) give exactly the standard PPO loss. `off_policy_correction = false` sets `w = 1`
//! on every token (no correction: stale tokens are trained as if `pi_prox` had sampled them),
//! the baseline a staleness ablation compares the correction against.
//!
//! # KL loss term
//!
//! With [`KlLossInputs`] (GRPO's KL, `kl_penalty = "loss"`), the loss gains
//! `beta * agg(k3_t)`, `k3_t = exp(ref_logp - logp) - 1 - (ref_logp - logp)` (the unbiased,
//! non-negative estimator of `KL(pi_theta || pi_ref)`, DeepSeekMath eq. 4), differentiable
//! in `logp` and aggregated like the policy loss.
//!
//! # Value loss
//!
//! With critic values `V` (differentiable), rollout values `V_old`, returns `R` and value
//! clip `c`:
//!
//! ```text
//! vf_t = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)     (c = Some)
//! vf_t = 0.5 * (V - R)^2                                                   (c = None)
//! ```
//!
//! # Total
//!
//! Each of `pg_t`, `vf_t`, `k3_t` and the per-token entropy `H_t` is reduced with the
//! configured [`Aggregation`] (token mean, sequence mean, or the token sum over a constant
//! `token_sum_norm` of Dr. GRPO), then
//!
//! ```text
//! loss = policy_loss + vf_coef * value_loss + beta * kl_loss - entropy_coef * entropy
//! ```
//!
//! The value part is optional (critic-free GRPO/RLOO), as is the entropy (an error if
//! `entropy_coef != 0` and no entropy is given).
//!
//! # Statistics
//!
//! Always token means over the mask, whatever the aggregation, and computed on detached
//! values (on the host, in f64):
//!
//! - `approx_kl = mean((ratio - 1) - log ratio)`: the k3 estimate of `KL(pi_prox || pi_theta)`
//!   (tokens are sampled from `pi_prox`, up to the behaviour correction), `>= 0`;
//! - `clip_frac`: fraction of tokens where the clipped term is strictly smaller,
//!   `clip(ratio) * A < ratio * A`, i.e. the clip removed the token's gradient;
//! - `ratio_mean`, `ratio_var`: mean and population variance of `ratio`;
//! - `explained_var = 1 - Var[R - V] / Var[R]` (NaN when `Var[R] = 0`);
//! - `value_clip_frac`: fraction of tokens where the clipped value error is strictly larger;
//! - `behaviour_weight_mean`, `behaviour_weight_trunc_frac`: mean of `w` and the fraction of
//!   tokens where the cap bound.
//!
//! The mask may be any 0/1 mask (holes allowed, e.g. masked-out tool output), but with
//! [`Aggregation::SeqMean`] every row needs a real token.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::kl::{kl_per_token, KlEstimator};
use super::masked::{aggregate, dims2, keep, masked_sum, same_shape, zero_pad, Aggregation};
use super::{invalid, scalar_f64, Result};

/// Hyper-parameters of the PPO loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoLossConfig {
    /// Ratio clip `eps` (0.2).
    pub clip_eps: f64,
    /// Value clip `c` around the rollout values; `None` disables value clipping (0.2).
    pub value_clip: Option<f64>,
    /// Weight of the value loss (0.5).
    pub vf_coef: f64,
    /// Weight of the entropy bonus (0).
    pub entropy_coef: f64,
    /// Token mean, sequence mean or token sum (token mean).
    pub aggregation: Aggregation,
    /// The constant `L` of [`Aggregation::TokenSum`]: each row's token sum is divided by `L`
    /// (Dr. GRPO uses the generation budget, `max_new_tokens`); unused otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sum_norm: Option<f64>,
    /// Truncation `cap >= 1` of the behaviour importance weight; `None` = untruncated (2).
    pub behaviour_weight_cap: Option<f64>,
    /// Weight stale tokens by the behaviour importance weight (true). False gives every token
    /// `w = 1`, training stale data as if `pi_prox` had sampled it: no off-policy correction,
    /// the baseline of the staleness ablation (`tandem bench staleness`).
    pub off_policy_correction: bool,
}

/// The default truncation of the behaviour importance weight (see the module docs).
pub const DEFAULT_BEHAVIOUR_WEIGHT_CAP: f64 = 2.0;

impl Default for PpoLossConfig {
    fn default() -> Self {
        Self {
            clip_eps: 0.2,
            value_clip: Some(0.2),
            vf_coef: 0.5,
            entropy_coef: 0.0,
            aggregation: Aggregation::TokenMean,
            token_sum_norm: None,
            behaviour_weight_cap: Some(DEFAULT_BEHAVIOUR_WEIGHT_CAP),
            off_policy_correction: true,
        }
    }
}

impl PpoLossConfig {
    /// Checks the ranges of the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip_eps > 0.0 && self.clip_eps < 1.0) {
            invalid!("clip_eps must lie in (0, 1), got {}", self.clip_eps);
        }
        if let Some(c) = self.value_clip {
            if !(c > 0.0 && c.is_finite()) {
                invalid!("value_clip must be finite and > 0, got {c}");
            }
        }
        if !(self.vf_coef >= 0.0 && self.vf_coef.is_finite()) {
            invalid!("vf_coef must be finite and >= 0, got {}", self.vf_coef);
        }
        if !self.entropy_coef.is_finite() {
            invalid!("entropy_coef must be finite, got {}", self.entropy_coef);
        }
        if let Some(cap) = self.behaviour_weight_cap {
            if cap.is_nan() || cap < 1.0 {
                invalid!("behaviour_weight_cap must be >= 1, got {cap}");
            }
        }
        match (self.aggregation, self.token_sum_norm) {
            (Aggregation::TokenSum, Some(l)) if !(l > 0.0 && l.is_finite()) => {
                invalid!("token_sum_norm must be finite and > 0, got {l}")
            }
            (Aggregation::TokenSum, None) => invalid!("aggregation = \"token_sum\" needs token_sum_norm"),
            _ => {}
        }
        Ok(())
    }
}

/// Critic inputs of the value loss, all `(batch, resp_len)`.
#[derive(Debug, Clone, Copy)]
pub struct ValueInputs<'a> {
    /// Current critic values `V` (differentiable).
    pub values: &'a Tensor,
    /// Values recorded at rollout time `V_old`.
    pub old_values: &'a Tensor,
    /// Regression targets `R` (e.g. GAE returns).
    pub returns: &'a Tensor,
}

/// The KL loss term `beta * agg(k3(logp, ref_logp))` (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct KlLossInputs<'a> {
    /// `log pi_ref` of the sampled tokens, `(batch, resp_len)`.
    pub ref_logp: &'a Tensor,
    /// Its coefficient.
    pub beta: f64,
}

/// Inputs of [`ppo_loss`], all `(batch, resp_len)` and of one dtype.
#[derive(Debug, Clone, Copy)]
pub struct PpoInputs<'a> {
    /// `log pi_theta` of the sampled tokens (differentiable).
    pub logp: &'a Tensor,
    /// `log pi_prox`: the policy at the start of the learner step (PPO's "old" policy).
    pub prox_logp: &'a Tensor,
    /// `log pi_behaviour`: the policy that sampled the tokens, when it differs from
    /// `pi_prox` (asynchronous rollouts); `None` for on-policy data.
    pub behaviour_logp: Option<&'a Tensor>,
    /// Advantages `A` (treated as constants).
    pub advantages: &'a Tensor,
    /// Per-token policy entropy `H_t` (differentiable), for the entropy bonus.
    pub entropy: Option<&'a Tensor>,
    /// The critic part; `None` for critic-free methods.
    pub value: Option<ValueInputs<'a>>,
    /// The KL loss term against the reference; `None` when the KL is in the reward.
    pub kl: Option<KlLossInputs<'a>>,
    /// 1 on real tokens, 0 on padding.
    pub mask: &'a Tensor,
}

/// What users watch during PPO (see the module docs for definitions).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PpoStats {
    /// k3 estimate of `KL(pi_prox || pi_theta)`.
    pub approx_kl: f32,
    /// Fraction of tokens whose ratio clip was active.
    pub clip_frac: f32,
    /// Mean of `pi_theta / pi_prox`.
    pub ratio_mean: f32,
    /// Population variance of `pi_theta / pi_prox`.
    pub ratio_var: f32,
    /// `1 - Var[R - V] / Var[R]`, with a critic.
    pub explained_var: Option<f32>,
    /// Fraction of tokens whose value clip was active, with a critic and a value clip.
    pub value_clip_frac: Option<f32>,
    /// Mean behaviour weight `w`, with behaviour log-probs.
    pub behaviour_weight_mean: Option<f32>,
    /// Fraction of tokens where `w` hit the cap, with behaviour log-probs and a cap.
    pub behaviour_weight_trunc_frac: Option<f32>,
}

/// The differentiable total loss and its parts.
#[derive(Debug, Clone)]
pub struct PpoLossOutput {
    /// `policy_loss + vf_coef * value_loss - entropy_coef * entropy (+ beta * kl)`, a scalar
    /// tensor: `policy_terms + value_term`.
    pub loss: Tensor,
    /// The terms that depend on the policy alone: the loss without the value term.
    pub policy_terms: Tensor,
    /// `vf_coef * value_loss`, with a critic. The two parts have disjoint parameters, so each
    /// can be differentiated on its own (the learner runs the two backward passes in parallel).
    pub value_term: Option<Tensor>,
    /// Aggregated clipped-surrogate loss.
    pub policy_loss: f32,
    /// Aggregated (clipped) value loss, with a critic.
    pub value_loss: Option<f32>,
    /// Aggregated entropy, when given.
    pub entropy: Option<f32>,
    /// Aggregated k3 KL to the reference (before `beta`), with a KL loss term.
    pub kl_loss: Option<f32>,
    /// Statistics.
    pub stats: PpoStats,
}

/// Truncated behaviour weight `min(exp(prox_logp - behaviour_logp), cap)`, detached, `1` at
/// padding. Elementwise; `cap = None` leaves it untruncated.
pub fn behaviour_weight(
    prox_logp: &Tensor,
    behaviour_logp: &Tensor,
    mask: &Tensor,
    cap: Option<f64>,
) -> Result<Tensor> {
    same_shape("prox_logp", prox_logp, "mask", mask)?;
    same_shape("behaviour_logp", behaviour_logp, "mask", mask)?;
    let keep = keep(mask)?;
    let log_w = zero_pad(&(prox_logp.detach() - behaviour_logp.detach())?, &keep)?;
    let w = log_w.exp()?;
    Ok(match cap {
        Some(cap) => w.minimum(cap)?,
        None => w,
    })
}

/// Per-token clipped surrogate `-w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`,
/// `ratio = exp(logp - prox_logp)`; `0` at padding. Differentiable in `logp` only.
/// `weight = None` means `w = 1`.
pub fn policy_loss_per_token(
    logp: &Tensor,
    prox_logp: &Tensor,
    advantages: &Tensor,
    weight: Option<&Tensor>,
    mask: &Tensor,
    clip_eps: f64,
) -> Result<Tensor> {
    same_shape("logp", logp, "mask", mask)?;
    same_shape("prox_logp", prox_logp, "mask", mask)?;
    same_shape("advantages", advantages, "mask", mask)?;
    let keep = keep(mask)?;
    let log_ratio = zero_pad(&(logp - prox_logp.detach())?, &keep)?;
    let adv = zero_pad(&advantages.detach(), &keep)?;
    let ratio = log_ratio.exp()?;
    let surr1 = (&ratio * &adv)?;
    let surr2 = (ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)? * &adv)?;
    let mut pg = surr1.minimum(&surr2)?.neg()?;
    if let Some(w) = weight {
        same_shape("weight", w, "mask", mask)?;
        pg = (pg * zero_pad(&w.detach(), &keep)?)?;
    }
    zero_pad(&pg, &keep)
}

/// Per-token value loss `0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`
/// (`0.5 * (V - R)^2` without a clip); `0` at padding. Differentiable in `values` only.
pub fn value_loss_per_token(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    value_clip: Option<f64>,
) -> Result<Tensor> {
    same_shape("values", values, "mask", mask)?;
    same_shape("old_values", old_values, "mask", mask)?;
    same_shape("returns", returns, "mask", mask)?;
    let keep = keep(mask)?;
    let v = zero_pad(values, &keep)?;
    let ret = zero_pad(&returns.detach(), &keep)?;
    let err = (&v - &ret)?.sqr()?;
    let per = match value_clip {
        Some(c) => {
            let v_old = zero_pad(&old_values.detach(), &keep)?;
            let v_clip = v.maximum(&(&v_old - c)?)?.minimum(&(&v_old + c)?)?;
            let err_clip = (v_clip - &ret)?.sqr()?;
            err.maximum(&err_clip)?
        }
        None => err,
    };
    zero_pad(&(per * 0.5)?, &keep)
}

fn f32_of(t: &Tensor) -> Result<f32> {
    Ok(scalar_f64(t)? as f32)
}

/// A detached tensor's entries in row-major order, as f64 on the host.
fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The flat indices of the mask's real (non-zero) entries, read on the host.
fn real_tokens(mask: &Tensor) -> Result<Vec<usize>> {
    Ok(host(mask)?
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0.0)
        .map(|(i, _)| i)
        .collect())
}

/// The number of real tokens, as `masked::mask_count` gives it; an error when there is none.
fn token_count(real: &[usize]) -> Result<f64> {
    if real.is_empty() {
        invalid!("mask selects no token");
    }
    Ok(real.len() as f64)
}

/// [`PpoStats`] over the real tokens (`real`, from [`real_tokens`]), from host copies of the
/// detached inputs, in f64. A minibatch has a few hundred response tokens; as tensor ops (a
/// select, a sum and a count per mean) these reductions took dozens of small ops a minibatch,
/// several percent of a small model's learner step, for numbers that only go to the metrics.
fn host_stats(
    cfg: &PpoLossConfig,
    inputs: &PpoInputs<'_>,
    real: &[usize],
    raw_weight: Option<&Tensor>,
    weight: Option<&Tensor>,
) -> Result<PpoStats> {
    let n = token_count(real)?;
    let mean = |f: &dyn Fn(usize) -> f64| real.iter().map(|&i| f(i)).sum::<f64>() / n;
    // Population variance, as `masked_var`.
    let var = |f: &dyn Fn(usize) -> f64| {
        let m = mean(f);
        mean(&|i| (f(i) - m).powi(2))
    };
    let frac = |f: &dyn Fn(usize) -> bool| mean(&|i| f(i) as u8 as f64) as f32;

    let (logp, prox, adv) = (host(inputs.logp)?, host(inputs.prox_logp)?, host(inputs.advantages)?);
    let log_ratio = |i: usize| logp[i] - prox[i];
    let ratio = |i: usize| log_ratio(i).exp();
    let (lo, hi) = (1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps);

    let (mut explained_var, mut value_clip_frac) = (None, None);
    if let Some(v) = &inputs.value {
        let (values, returns) = (host(v.values)?, host(v.returns)?);
        let var_r = var(&|i| returns[i]);
        let var_err = var(&|i| returns[i] - values[i]);
        explained_var = Some(if var_r > 0.0 {
            (1.0 - var_err / var_r) as f32
        } else {
            f32::NAN
        });
        if let Some(c) = cfg.value_clip {
            let old = host(v.old_values)?;
            value_clip_frac = Some(frac(&|i| {
                let clipped = values[i].max(old[i] - c).min(old[i] + c);
                (clipped - returns[i]).powi(2) > (values[i] - returns[i]).powi(2)
            }));
        }
    }
    let (behaviour_weight_mean, behaviour_weight_trunc_frac) = match (raw_weight, weight) {
        (Some(raw), Some(w)) => {
            let w = host(w)?;
            let trunc = match cfg.behaviour_weight_cap {
                Some(cap) => {
                    let raw = host(raw)?;
                    Some(frac(&|i| raw[i] > cap))
                }
                None => None,
            };
            (Some(mean(&|i| w[i]) as f32), trunc)
        }
        _ => (None, None),
    };
    Ok(PpoStats {
        approx_kl: mean(&|i| (ratio(i) - 1.0) - log_ratio(i)) as f32,
        clip_frac: frac(&|i| {
            let r = ratio(i);
            r.clamp(lo, hi) * adv[i] < r * adv[i]
        }),
        ratio_mean: mean(&ratio) as f32,
        ratio_var: var(&ratio) as f32,
        explained_var,
        value_clip_frac,
        behaviour_weight_mean,
        behaviour_weight_trunc_frac,
    })
}

/// The PPO loss and statistics (see the module docs).
pub fn ppo_loss(cfg: &PpoLossConfig, inputs: &PpoInputs<'_>) -> Result<PpoLossOutput> {
    cfg.validate()?;
    let mask = inputs.mask;
    dims2("mask", mask)?;
    let keep = keep(mask)?;

    // Untruncated behaviour weight (for the statistics) and the truncated one (for the loss).
    let (raw_weight, weight) = match inputs.behaviour_logp.filter(|_| cfg.off_policy_correction) {
        Some(b) => {
            let raw = behaviour_weight(inputs.prox_logp, b, mask, None)?;
            let w = match cfg.behaviour_weight_cap {
                Some(cap) => raw.minimum(cap)?,
                None => raw.clone(),
            };
            (Some(raw), Some(w))
        }
        None => (None, None),
    };
    let pg = policy_loss_per_token(
        inputs.logp,
        inputs.prox_logp,
        inputs.advantages,
        weight.as_ref(),
        mask,
        cfg.clip_eps,
    )?;
    // The real tokens, read once: the token-mean terms' count and the statistics.
    let real = real_tokens(mask)?;
    let count = match cfg.aggregation {
        Aggregation::TokenMean => Some(token_count(&real)?),
        _ => None,
    };
    let agg = |x: &Tensor| -> Result<Tensor> {
        match (cfg.aggregation, cfg.token_sum_norm, count) {
            (Aggregation::TokenSum, Some(l), _) => {
                let rows = mask.dim(0)? as f64;
                Ok(masked_sum(x, mask)?.affine(1.0 / (rows * l), 0.0)?)
            }
            // `masked_mean` with the count and the mask's selector computed once.
            (Aggregation::TokenMean, _, Some(n)) => {
                same_shape("x", x, "mask", mask)?;
                Ok(zero_pad(x, &keep)?.sum_all()?.affine(1.0 / n, 0.0)?)
            }
            (a, _, _) => aggregate(x, mask, a),
        }
    };
    let policy_loss = agg(&pg)?;
    let mut loss = policy_loss.clone();
    let mut value_term = None;

    let mut value_loss_f = None;
    if let Some(v) = inputs.value {
        let vf = value_loss_per_token(v.values, v.old_values, v.returns, mask, cfg.value_clip)?;
        let value_loss = agg(&vf)?;
        value_term = Some((&value_loss * cfg.vf_coef)?);
        value_loss_f = Some(f32_of(&value_loss)?);
    }

    let entropy_f = match inputs.entropy {
        Some(h) => {
            same_shape("entropy", h, "mask", mask)?;
            let ent = agg(&zero_pad(h, &keep)?)?;
            if cfg.entropy_coef != 0.0 {
                loss = (loss - (&ent * cfg.entropy_coef)?)?;
            }
            Some(f32_of(&ent)?)
        }
        None if cfg.entropy_coef != 0.0 => {
            invalid!("entropy_coef is {} but no entropy was given", cfg.entropy_coef)
        }
        None => None,
    };

    let kl_loss_f = match inputs.kl {
        Some(k) => {
            if !k.beta.is_finite() {
                invalid!("KL loss beta must be finite, got {}", k.beta);
            }
            let kl = agg(&kl_per_token(KlEstimator::K3, inputs.logp, &k.ref_logp.detach(), mask)?)?;
            if k.beta != 0.0 {
                loss = (loss + (&kl * k.beta)?)?;
            }
            Some(f32_of(&kl)?)
        }
        None => None,
    };

    let stats = host_stats(cfg, inputs, &real, raw_weight.as_ref(), weight.as_ref())?;
    Ok(PpoLossOutput {
        loss: match &value_term {
            Some(v) => (&loss + v)?,
            None => loss.clone(),
        },
        policy_terms: loss,
        value_term,
        policy_loss: f32_of(&policy_loss)?,
        value_loss: value_loss_f,
        entropy: entropy_f,
        kl_loss: kl_loss_f,
        stats,
    })
}
