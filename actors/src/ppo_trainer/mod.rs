//! The learner's synchronous core: one PPO (or GRPO / RLOO) step over a batch of trajectories.
//!
//! A step, for a batch sampled by policy versions `<= k` and trained at version `k` (the
//! weights after `k` learner steps):
//! 1. Lay the batch out as prompt + response rows (responses start at one column).
//! 2. `pi_prox` = the policy at the start of the step. For on-policy data (every trajectory
//!    from version k) that is the sampler's recorded untruncated log-prob (`full_logprobs`);
//!    otherwise the policy recomputes it: epoch 0's first minibatch's forward (kept for that
//!    minibatch's update, so it is not run twice) gives its rows, one no-grad forward the
//!    other rows. The decoupled-PPO weight
//!    `min(pi_prox / pi_behaviour, cap)` corrects the version drift (cap 2 by default, see
//!    [`tandem_models::rl::ppo`]).
//! 3. Scores, normalised when `reward.normalize = "running"` ([`RunningMeanStd`], kept in
//!    the checkpoint). Per-token rewards: the score at the last token, and with
//!    `kl_penalty = "reward"` also `-beta * KL_t` (KL estimator of `pi_prox` against the
//!    reference, at the current beta of the KL controller).
//! 4. Advantages: GAE over the critic's values (PPO), or group-normalised / leave-one-out
//!    sequence rewards broadcast to tokens (GRPO / RLOO); whitened over the mask for PPO.
//!    GRPO's advantage is `(s - mean) / (std + eps)` over the prompt's group (DeepSeekMath
//!    eq. 3), or `s - mean` with `grpo.scale_by_std = false` (Dr. GRPO).
//! 5. `epochs` passes over shuffled minibatches: clipped surrogate + value loss (clipped) +
//!    `beta * k3(pi_theta, pi_ref)` with `kl_penalty = "loss"` − entropy bonus
//!    (+ the PPO-ptx term `-gamma * mean log pi(pretraining text)` when `ptx_coef > 0`),
//!    global-norm clipping per network, AdamW (decay on matrices only). Policy and critic share
//!    no parameters, so their forwards, and the backward passes of the policy terms and of the
//!    value term, run side by side on the device's threads (`rayon::join`). After
//!    each update the EMA of the policy weights moves (`ema_decay`). A minibatch whose loss or
//!    gradient norm is not finite is skipped and counted.
//! 6. The KL controller sees the mean per-sequence KL of the batch.
//!
//! # Where the KL goes (`kl_penalty`)
//!
//! `"reward"` (Ziegler et al., InstructGPT): `-beta * KL_t` is part of every token's reward,
//! so it flows into the returns and advantages. `"loss"` (DeepSeekMath's GRPO): rewards are
//! the scores alone and the loss gains `beta * k3`, aggregated like the policy loss. The
//! default is `"loss"` for GRPO — group normalisation would otherwise rescale the KL with the
//! scores and, in a group of equal scores, turn the KL alone into unit-variance advantages
//! whatever beta is — and `"reward"` for GAE and RLOO (RLOO's leave-one-out baseline does not
//! rescale, and Ahmadian et al. and TRL put the KL in its reward).
//!
//! # Truncated sampling (`top_k`, `top_p`)
//!
//! Samplers record `behaviour_logprobs` = log q (the truncated, renormalised distribution they
//! drew from) and `full_logprobs` = the untruncated log-prob at the same temperature. The
//! learner uses `full_logprobs` for `pi_prox` of on-policy data *and* for the version-drift
//! weight of stale data, so a fresh row has `w = 1` whether or not the batch holds a stale
//! row. The truncation itself (q versus the untruncated policy) is not corrected, as in TRL
//! and OpenRLHF; `behaviour_logprobs` stay in the trajectory store for inspection.
//!
//! Shuffling uses a seeded RNG derived from the run seed and the step, so a sync run is
//! reproducible — and nothing else in a step is random, so [`TrainerState`] (weights, AdamW
//! moments and step counts, beta, EMA weights, score statistics, completed steps) is all a
//! checkpoint needs to repeat a step exactly.
//!
//! Non-finite values: a minibatch whose loss or gradient norm is NaN or infinite is skipped
//! (no optimiser step) and counted in [`StepStats::skipped_updates`]; a non-finite batch KL
//! leaves beta unchanged.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tandem_models::adamw::ParamsAdamW;
use tandem_models::rl::{
    Ema, GaeConfig, GrpoConfig, KlController, KlControllerConfig, PpoLossConfig, RewardConfig, RunningMeanStd,
    ScoreNormalization,
};
use tandem_models::{snapshot, AdamW, LanguageModel, ScalarModel};

use crate::error::ActorError;
use crate::nan_fields::{nan, nan_if_null};

mod state;
mod step;
#[cfg(test)]
mod tests;

pub use state::TrainerState;

/// How advantages are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Advantage {
    /// GAE over a learned critic (PPO as in Ziegler et al. / InstructGPT).
    #[default]
    Gae,
    /// Scores normalised within each prompt's group of samples (no critic).
    Grpo,
    /// Leave-one-out baseline within each prompt's group (no critic).
    Rloo,
}

/// Where the KL penalty against the reference enters (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPenalty {
    /// `-beta * KL_t` in every token's reward.
    Reward,
    /// `beta * k3(pi_theta, pi_ref)` as a loss term.
    Loss,
}

/// Learner hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    pub advantage: Advantage,
    /// Where the KL goes; `None` = by advantage (loss for GRPO, reward for GAE and RLOO).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_penalty: Option<KlPenalty>,
    pub ppo_epochs: usize,
    /// Trajectories per minibatch.
    pub minibatch_size: usize,
    pub policy_lr: f64,
    pub critic_lr: f64,
    /// AdamW weight decay of both networks, on weight matrices only (0).
    pub weight_decay: f64,
    /// Global gradient-norm clip per network; 0 disables.
    pub max_grad_norm: f64,
    /// Whiten GAE advantages over the batch.
    pub whiten_advantages: bool,
    /// Decay of an exponential moving average of the policy weights, updated after every
    /// optimiser step and saved as `policy_ema/` beside `policy/` (InstructGPT: 0.992).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    /// PPO-ptx coefficient gamma of the pretraining log-likelihood term (InstructGPT: 27.8);
    /// 0 disables. Needs pretraining texts ([`PpoTrainer::set_pretraining`]).
    pub ptx_coef: f64,
    pub gae: GaeConfig,
    pub grpo: GrpoConfig,
    pub loss: PpoLossConfig,
    pub reward: RewardConfig,
    pub kl: KlControllerConfig,
}

impl TrainerConfig {
    /// The configured KL placement, or the advantage's default.
    pub fn kl_penalty(&self) -> KlPenalty {
        self.kl_penalty.unwrap_or(match self.advantage {
            Advantage::Grpo => KlPenalty::Loss,
            Advantage::Gae | Advantage::Rloo => KlPenalty::Reward,
        })
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            advantage: Advantage::Gae,
            kl_penalty: None,
            ppo_epochs: 4,
            minibatch_size: 16,
            policy_lr: 1e-5,
            critic_lr: 1e-5,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            whiten_advantages: true,
            ema_decay: None,
            ptx_coef: 0.0,
            gae: GaeConfig::default(),
            grpo: GrpoConfig::default(),
            loss: PpoLossConfig::default(),
            reward: RewardConfig::default(),
            kl: KlControllerConfig::Adaptive {
                init_beta: 0.1,
                target: 6.0,
                k_beta: 0.1,
            },
        }
    }
}

/// What one step measured (flattened into [`StepReport`](crate::learner::StepReport)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Every trajectory came from the trained version (pi_prox = the samplers' log-probs).
    #[serde(default)]
    pub on_policy: bool,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub reward_mean: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub reward_std: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub score_mean: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub kl: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub beta: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub policy_loss: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub value_loss: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub entropy: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub clip_frac: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub approx_kl: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub ratio_mean: f64,
    /// Mean k3 KL to the reference of the loss term (`kl_penalty = "loss"`; 0 otherwise).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub kl_loss: f64,
    /// Mean truncated behaviour weight (1 for an on-policy batch).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_weight_mean: f64,
    /// The behaviour importance ratio `pi_prox / behaviour` per response token (untruncated,
    /// before any update of the step): mean, min, max, and the fraction of tokens above the
    /// cap (1, 1, 1 and 0 on policy).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_ratio_mean: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_ratio_min: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_ratio_max: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_ratio_trunc_frac: f64,
    /// Mismatch KL(behaviour || pi_prox) per token (k3 estimate over the sampled tokens).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub behaviour_mismatch_kl: f64,
    /// Mean PPO-ptx log-likelihood of the pretraining rows (0 without ptx).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub ptx_logprob: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub explained_var: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub response_len_mean: f64,
    #[serde(default)]
    pub skipped_updates: u64,
}

pub struct PpoTrainer {
    cfg: TrainerConfig,
    policy: LanguageModel,
    policy_vars: VarMap,
    policy_opt: AdamW,
    critic: Option<(ScalarModel, VarMap, AdamW)>,
    kl: KlController,
    temperature: f64,
    samples_per_prompt: usize,
    seed: u64,
    device: Device,
    completed_steps: u64,
    /// Steps whose every loss is made NaN (fault injection).
    nonfinite_steps: Vec<u64>,
    /// EMA of the policy weights (with `ema_decay`), over `sorted_vars(policy_vars)`.
    ema: Option<Ema>,
    /// Score statistics (with `reward.normalize = "running"`).
    score_norm: Option<RunningMeanStd>,
    /// Tokenised pretraining texts for PPO-ptx and the rows per minibatch.
    pretraining: Option<(Vec<Vec<u32>>, usize)>,
    /// With `mode.stale = "mask"`: tokens sampled more than this many versions before the
    /// trained one get no policy loss ([`PpoTrainer::mask_stale_tokens`]).
    stale_token_lag: Option<u64>,
}

/// AdamW with savable moments (for checkpoints), same arithmetic as candle's; decay on
/// weight matrices only ([`tandem_models::adamw::decays`]).
fn adamw(vars: &VarMap, lr: f64, weight_decay: f64) -> Result<AdamW, ActorError> {
    Ok(AdamW::from_varmap(
        vars,
        ParamsAdamW {
            lr,
            weight_decay,
            ..Default::default()
        },
    )?)
}

fn sorted_names(vars: &VarMap) -> Vec<String> {
    let data = vars.data().lock().expect("varmap lock");
    let mut v: Vec<String> = data.keys().cloned().collect();
    v.sort();
    v
}

fn sorted_vars(vars: &VarMap) -> Vec<Var> {
    let data = vars.data().lock().expect("varmap lock");
    let mut v: Vec<(&String, &Var)> = data.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, v)| v.clone()).collect()
}

impl PpoTrainer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: TrainerConfig,
        policy: (LanguageModel, VarMap),
        critic: Option<(ScalarModel, VarMap)>,
        temperature: f64,
        samples_per_prompt: usize,
        seed: u64,
        device: Device,
    ) -> Result<Self, ActorError> {
        cfg.loss.validate()?;
        if cfg.advantage == Advantage::Gae && critic.is_none() {
            return Err(ActorError::InvalidConfig("GAE advantages need a critic".into()));
        }
        let kl = KlController::new(cfg.kl)?;
        let policy_opt = adamw(&policy.1, cfg.policy_lr, cfg.weight_decay)?;
        let critic = match critic {
            Some((m, v)) => {
                let opt = adamw(&v, cfg.critic_lr, cfg.weight_decay)?;
                Some((m, v, opt))
            }
            None => None,
        };
        let ema = cfg
            .ema_decay
            .map(|d| Ema::new(&sorted_vars(&policy.1), d))
            .transpose()?;
        let score_norm = (cfg.reward.normalize == ScoreNormalization::Running).then(RunningMeanStd::new);
        Ok(Self {
            cfg,
            policy: policy.0,
            policy_vars: policy.1,
            policy_opt,
            critic,
            kl,
            temperature,
            samples_per_prompt,
            seed,
            device,
            completed_steps: 0,
            nonfinite_steps: vec![],
            ema,
            score_norm,
            pretraining: None,
            stale_token_lag: None,
        })
    }

    /// Gives no loss to the tokens sampled more than `max_lag` versions before the version a
    /// step trains (`mode.stale = "mask"`); their rewards and advantages are kept.
    pub fn mask_stale_tokens(&mut self, max_lag: u64) {
        self.stale_token_lag = Some(max_lag);
    }

    /// The PPO-ptx pretraining texts (token ids, each at least 2 tokens) and how many of them
    /// each minibatch adds; used when `ptx_coef > 0`. Minibatch `j` of step `k` takes the
    /// next `rows` texts cyclically from `(k * minibatches_per_step + j) * rows`, so a resumed
    /// run sees the same texts.
    pub fn set_pretraining(&mut self, texts: Vec<Vec<u32>>, rows: usize) -> Result<(), ActorError> {
        if texts.is_empty() || rows == 0 || texts.iter().any(|t| t.len() < 2) {
            return Err(ActorError::InvalidConfig(
                "PPO-ptx needs rows >= 1 and pretraining texts of at least 2 tokens".into(),
            ));
        }
        self.pretraining = Some((texts, rows));
        Ok(())
    }

    /// The EMA of the policy weights (with `ema_decay`), by name.
    pub fn ema_weights(&self) -> Option<HashMap<String, Tensor>> {
        let ema = self.ema.as_ref()?;
        Some(
            sorted_names(&self.policy_vars)
                .into_iter()
                .zip(ema.shadow().iter().cloned())
                .collect(),
        )
    }

    /// Makes every loss of these steps NaN (fault injection for the non-finite guard).
    pub fn inject_nonfinite_loss(&mut self, steps: Vec<u64>) {
        self.nonfinite_steps = steps;
    }

    /// Learner steps completed (including those before a resume).
    pub fn completed_steps(&self) -> u64 {
        self.completed_steps
    }

    pub fn beta(&self) -> f64 {
        self.kl.beta()
    }

    pub fn policy_weights(&self) -> Result<HashMap<String, Tensor>, ActorError> {
        Ok(snapshot(&self.policy_vars)?)
    }

    pub fn critic_config(&self) -> Option<tandem_models::ModelConfig> {
        self.critic.as_ref().map(|(m, _, _)| m.config().clone())
    }

    pub fn critic_weights(&self) -> Result<Option<HashMap<String, Tensor>>, ActorError> {
        self.critic
            .as_ref()
            .map(|(_, v, _)| snapshot(v))
            .transpose()
            .map_err(Into::into)
    }
}
