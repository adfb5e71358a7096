//! The learner's synchronous core: one PPO (or GRPO / RLOO) step over a batch of trajectories.
//!
//! A step, for a batch sampled by policy versions `<= k` and trained at version `k` (the
//! weights after `k` learner steps):
//! 1. Lay the batch out as prompt + response rows (responses start at one column).
//! 2. `pi_prox` = the policy at the start of the step. For on-policy data (every trajectory
//!    from version k) that is the sampler's recorded untruncated log-prob (`full_logprobs`);
//!    otherwise one no-grad forward recomputes it and the decoupled-PPO weight
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
//! 5. `epochs` passes over shuffled minibatches: clipped surrogate + value loss (clipped)
//!    + `beta * k3(pi_theta, pi_ref)` with `kl_penalty = "loss"` − entropy bonus
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

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_models::adamw::ParamsAdamW;
use tandem_models::batch::{PadSide, PaddedBatch, PromptResponseBatch};
use tandem_models::rl::{
    clip_grad_norm, gae, grpo_advantages, masked_whiten, ppo_loss, rloo_advantages, with_ptx, Ema, GaeConfig,
    GrpoConfig, KlController, KlControllerConfig, KlLossInputs, PpoInputs, PpoLossConfig, RewardConfig, RunningMeanStd,
    ScoreNormalization, ValueInputs,
};
use tandem_models::{snapshot, AdamW, LanguageModel, ScalarModel};

use crate::error::ActorError;
use crate::metrics_line::{nan, nan_if_null};
use crate::trajectory::{TokenOutputs, Trajectory};

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
}

/// Everything a checkpoint keeps of the learner.
#[derive(Debug, Clone)]
pub struct TrainerState {
    pub policy: HashMap<String, Tensor>,
    pub critic: Option<HashMap<String, Tensor>>,
    /// AdamW moments as `policy/m/NAME`, `policy/v/NAME`, `critic/m/NAME`, `critic/v/NAME`;
    /// with an EMA its weights as `ema/NAME`; with running score normalisation its
    /// `[count, mean, m2]` (f64) as `score_norm`.
    pub optimizer: HashMap<String, Tensor>,
    pub policy_optimizer_steps: usize,
    pub critic_optimizer_steps: Option<usize>,
    pub beta: f64,
    pub completed_steps: u64,
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

/// Sets every variable of `vars` from `tensors` (same names and shapes).
fn load_vars(vars: &VarMap, tensors: &HashMap<String, Tensor>, what: &str) -> Result<(), ActorError> {
    let data = vars.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| ActorError::Other(format!("{what} checkpoint lacks tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(ActorError::Other(format!(
                "{what} checkpoint tensor {name} has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn sorted_vars(vars: &VarMap) -> Vec<Var> {
    let data = vars.data().lock().expect("varmap lock");
    let mut v: Vec<(&String, &Var)> = data.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, v)| v.clone()).collect()
}

fn rl(e: tandem_models::rl::RlError) -> ActorError {
    ActorError::Other(e.to_string())
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
        cfg.loss.validate().map_err(rl)?;
        if cfg.advantage == Advantage::Gae && critic.is_none() {
            return Err(ActorError::Other("GAE advantages need a critic".into()));
        }
        let kl = KlController::new(cfg.kl).map_err(rl)?;
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
            .transpose()
            .map_err(rl)?;
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
        })
    }

    /// The PPO-ptx pretraining texts (token ids, each at least 2 tokens) and how many of them
    /// each minibatch adds; used when `ptx_coef > 0`. Minibatch `j` of step `k` takes the
    /// next `rows` texts cyclically from `(k * minibatches_per_step + j) * rows`, so a resumed
    /// run sees the same texts.
    pub fn set_pretraining(&mut self, texts: Vec<Vec<u32>>, rows: usize) -> Result<(), ActorError> {
        if texts.is_empty() || rows == 0 || texts.iter().any(|t| t.len() < 2) {
            return Err(ActorError::Other(
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

    /// A copy of the learner's state for a checkpoint.
    pub fn state(&self) -> Result<TrainerState, ActorError> {
        let mut optimizer = HashMap::new();
        let (policy_optimizer_steps, m) = self.policy_opt.state()?;
        optimizer.extend(m.into_iter().map(|(k, v)| (format!("policy/{k}"), v)));
        let critic_optimizer_steps = match &self.critic {
            Some((_, _, opt)) => {
                let (n, m) = opt.state()?;
                optimizer.extend(m.into_iter().map(|(k, v)| (format!("critic/{k}"), v)));
                Some(n)
            }
            None => None,
        };
        if let Some(ema) = self.ema_weights() {
            optimizer.extend(ema.into_iter().map(|(k, v)| (format!("ema/{k}"), v)));
        }
        if let Some(n) = &self.score_norm {
            optimizer.insert(
                "score_norm".into(),
                Tensor::new(&[n.count, n.mean, n.m2], &Device::Cpu)?,
            );
        }
        Ok(TrainerState {
            policy: self.policy_weights()?,
            critic: self.critic_weights()?,
            optimizer,
            policy_optimizer_steps,
            critic_optimizer_steps,
            beta: self.kl.beta(),
            completed_steps: self.completed_steps,
        })
    }

    /// Restores a [`TrainerState`]; every tensor must be present with its shape.
    pub fn load_state(&mut self, s: &TrainerState) -> Result<(), ActorError> {
        let prefixed = |p: &str| -> HashMap<String, Tensor> {
            s.optimizer
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(p).map(|k| (k.to_string(), v.clone())))
                .collect()
        };
        load_vars(&self.policy_vars, &s.policy, "policy")?;
        self.policy_opt
            .load_state(s.policy_optimizer_steps, &prefixed("policy/"))?;
        match (&mut self.critic, &s.critic, s.critic_optimizer_steps) {
            (Some((_, vars, opt)), Some(w), Some(n)) => {
                load_vars(vars, w, "critic")?;
                opt.load_state(n, &prefixed("critic/"))?;
            }
            (None, None, None) => {}
            _ => {
                return Err(ActorError::Other(
                    "checkpoint and run disagree on having a critic".into(),
                ))
            }
        }
        if let Some(ema) = &mut self.ema {
            // A checkpoint without EMA weights starts the average at its policy weights.
            *ema = Ema::new(&sorted_vars(&self.policy_vars), ema.decay()).map_err(rl)?;
            let saved = prefixed("ema/");
            if !saved.is_empty() {
                let shadow = sorted_names(&self.policy_vars)
                    .iter()
                    .map(|n| {
                        let t = saved
                            .get(n)
                            .ok_or_else(|| ActorError::Other(format!("checkpoint lacks EMA tensor {n}")))?;
                        Ok(t.to_device(&self.device)?)
                    })
                    .collect::<Result<Vec<_>, ActorError>>()?;
                ema.set_shadow(shadow).map_err(rl)?;
            }
        }
        if let Some(n) = &mut self.score_norm {
            if let Some(t) = s.optimizer.get("score_norm") {
                let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                if let [count, mean, m2] = v[..] {
                    (n.count, n.mean, n.m2) = (count, mean, m2);
                }
            }
        }
        self.kl.restore_beta(s.beta).map_err(rl)?;
        self.completed_steps = s.completed_steps;
        Ok(())
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

    /// One learner step at policy version `version` (see the module docs).
    pub fn step(&mut self, batch: &[Trajectory], version: u64, step: u64) -> Result<StepStats, ActorError> {
        Ok(self.step_with_outputs(batch, version, step)?.0)
    }

    /// [`PpoTrainer::step`], also returning the per-token rewards, advantages and returns it
    /// computed for each trajectory (in batch order, cut to each response's length).
    pub fn step_with_outputs(
        &mut self,
        batch: &[Trajectory],
        version: u64,
        step: u64,
    ) -> Result<(StepStats, Vec<TokenOutputs>), ActorError> {
        let dev = self.device.clone();
        let n = batch.len();
        let prompts: Vec<&[u32]> = batch.iter().map(|t| t.prompt_ids.as_slice()).collect();
        let responses: Vec<&[u32]> = batch.iter().map(|t| t.response_ids.as_slice()).collect();
        let layout = PromptResponseBatch::new(&prompts, &responses, self.policy.config().pad_id(), &dev)?;
        let (start, width) = (layout.prompt_width - 1, layout.response_width);
        let mask = &layout.response_mask;
        let rows = |f: &dyn Fn(&Trajectory) -> &[f32]| -> Result<Tensor, ActorError> {
            let r: Vec<&[f32]> = batch.iter().map(f).collect();
            Ok(layout.pad_rows(&r, &dev)?)
        };
        // The untruncated behaviour log-probs: pi_prox of on-policy data and the denominator of
        // the version-drift weight (see "Truncated sampling" in the module docs).
        let sampled = rows(&|t| &t.full_logprobs)?;
        let ref_logp = rows(&|t| &t.ref_logprobs)?;
        let old_values = rows(&|t| &t.values)?;
        let raw_scores: Vec<f32> = batch.iter().map(|t| t.score).collect();
        let mut scores = Tensor::from_vec(raw_scores.clone(), n, &dev)?;
        if let Some(norm) = &mut self.score_norm {
            norm.update(&raw_scores.iter().map(|&s| s as f64).collect::<Vec<_>>())
                .map_err(rl)?;
            scores = norm.normalize(&scores).map_err(rl)?;
        }

        let on_policy = batch.iter().all(|t| t.policy_version == version);
        let prox = if on_policy {
            sampled.clone()
        } else {
            let out = self
                .policy
                .token_logprobs(&layout.ids, &layout.mask, start, self.temperature)?;
            out.logprobs.narrow(1, 0, width)?.detach()
        };

        // Rewards (the KL of pi_prox against the reference, at the current beta, when the KL
        // is in the reward).
        let beta = self.kl.beta();
        let kl_penalty = self.cfg.kl_penalty();
        let reward_beta = if kl_penalty == KlPenalty::Reward { beta } else { 0.0 };
        let tr = self
            .cfg
            .reward
            .token_rewards(&scores, &prox, &ref_logp, mask, reward_beta)
            .map_err(rl)?;
        let seq_rewards = tr.rewards.sum(1)?;
        let seq_kl = tr.kl.sum(1)?;

        let (advantages, returns) = match self.cfg.advantage {
            Advantage::Gae => {
                let g = gae(&tr.rewards, &old_values, mask, &self.cfg.gae).map_err(rl)?;
                let adv = if self.cfg.whiten_advantages {
                    masked_whiten(&g.advantages, mask, true).map_err(rl)?
                } else {
                    g.advantages
                };
                (adv, Some(g.returns))
            }
            Advantage::Grpo | Advantage::Rloo => {
                let k = self.samples_per_prompt;
                let seq_adv = if self.cfg.advantage == Advantage::Grpo {
                    grpo_advantages(&seq_rewards, k, &self.cfg.grpo).map_err(rl)?
                } else {
                    rloo_advantages(&seq_rewards, k).map_err(rl)?
                };
                (seq_adv.unsqueeze(1)?.broadcast_mul(mask)?, None)
            }
        };

        let per_row = |t: &Tensor| -> Result<Vec<Vec<f32>>, ActorError> { Ok(t.to_dtype(DType::F32)?.to_vec2()?) };
        let (rew_rows, adv_rows) = (per_row(&tr.rewards)?, per_row(&advantages)?);
        let ret_rows = returns.as_ref().map(per_row).transpose()?;
        let outputs: Vec<TokenOutputs> = batch
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let len = t.response_ids.len();
                let cut = |rows: &[Vec<f32>]| rows[i][..len.min(rows[i].len())].to_vec();
                TokenOutputs {
                    rewards: cut(&rew_rows),
                    advantages: cut(&adv_rows),
                    returns: ret_rows.as_deref().map(cut).unwrap_or_default(),
                }
            })
            .collect();

        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut rng = StdRng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mb = self.cfg.minibatch_size.clamp(1, n);
        let minibatches_per_step = self.cfg.ppo_epochs as u64 * n.div_ceil(mb) as u64;
        let mut minibatch = 0u64;
        let (mut sums, mut updates, mut skipped) = (MinibatchSums::default(), 0usize, 0u64);
        let policy_vars = sorted_vars(&self.policy_vars);
        let critic_vars = self.critic.as_ref().map(|(_, v, _)| sorted_vars(v));
        for _epoch in 0..self.cfg.ppo_epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(mb) {
                let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), &dev)?;
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let (ids, full_mask, m) = (pick(&layout.ids)?, pick(&layout.mask)?, pick(mask)?);
                // Policy and critic share no parameters: their forwards (and below, their
                // backwards) run side by side on the device's threads.
                let critic_model = match (&self.critic, &returns) {
                    (Some((critic, _, _)), Some(_)) => Some(critic),
                    _ => None,
                };
                let (out, values) = rayon::join(
                    || self.policy.token_logprobs(&ids, &full_mask, start, self.temperature),
                    || critic_model.map(|c| c.values(&ids, &full_mask)).transpose(),
                );
                let (out, values) = (out?, values?);
                let logp = out.logprobs.narrow(1, 0, width)?;
                let entropy = out.entropy.narrow(1, 0, width)?;
                let (prox_mb, adv_mb) = (pick(&prox)?, pick(&advantages)?);
                let behaviour_mb = if on_policy { None } else { Some(pick(&sampled)?) };
                let ref_mb = pick(&ref_logp)?;
                let value_parts = match (values, &returns) {
                    (Some(v), Some(ret)) => Some((v.narrow(1, start, width)?, pick(&old_values)?, pick(ret)?)),
                    _ => None,
                };
                let inputs = PpoInputs {
                    logp: &logp,
                    prox_logp: &prox_mb,
                    behaviour_logp: behaviour_mb.as_ref(),
                    advantages: &adv_mb,
                    entropy: Some(&entropy),
                    value: value_parts.as_ref().map(|(v, o, r)| ValueInputs {
                        values: v,
                        old_values: o,
                        returns: r,
                    }),
                    kl: (kl_penalty == KlPenalty::Loss).then_some(KlLossInputs {
                        ref_logp: &ref_mb,
                        beta,
                    }),
                    mask: &m,
                };
                let mut out = ppo_loss(&self.cfg.loss, &inputs).map_err(rl)?;
                let ptx_rows = self.ptx_rows(step * minibatches_per_step + minibatch);
                minibatch += 1;
                let mut ptx_logprob = 0.0;
                if let Some(texts) = ptx_rows {
                    let (terms, lp) = self.ptx_term(&out.policy_terms, &texts)?;
                    out.loss = match &out.value_term {
                        Some(v) => (&terms + v)?,
                        None => terms.clone(),
                    };
                    out.policy_terms = terms;
                    ptx_logprob = lp;
                }
                if self.nonfinite_steps.contains(&step) {
                    out.loss = out.loss.affine(f64::NAN, 0.0)?;
                }
                let loss_val = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_val.is_finite() {
                    skipped += 1;
                    continue;
                }
                let (grads, value_grads) = rayon::join(
                    || out.policy_terms.backward(),
                    || out.value_term.as_ref().map(|v| v.backward()).transpose(),
                );
                let mut grads = grads?;
                if let (Some(value_grads), Some(vars)) = (value_grads?, &critic_vars) {
                    for var in vars {
                        if let Some(g) = value_grads.get(var) {
                            grads.insert(var, g.clone());
                        }
                    }
                }
                let max = if self.cfg.max_grad_norm > 0.0 {
                    self.cfg.max_grad_norm
                } else {
                    f64::INFINITY
                };
                let pn = clip_grad_norm(&policy_vars, &mut grads, max).map_err(rl)?;
                let cn = match &critic_vars {
                    Some(v) => clip_grad_norm(v, &mut grads, max).map_err(rl)?,
                    None => 0.0,
                };
                if !pn.is_finite() || !cn.is_finite() {
                    skipped += 1;
                    continue;
                }
                self.policy_opt.step(&grads)?;
                if let Some((_, _, opt)) = &mut self.critic {
                    opt.step(&grads)?;
                }
                if let Some(ema) = &mut self.ema {
                    ema.update().map_err(rl)?;
                }
                updates += 1;
                sums.add(&out);
                sums.ptx_logprob += ptx_logprob;
            }
        }
        if skipped > 0 {
            metrics::counter!("tandem_learner_skipped_updates").increment(skipped);
        }
        let mean_kl = seq_kl.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if mean_kl.is_finite() {
            self.kl.update(mean_kl).map_err(rl)?;
        }
        self.completed_steps = step + 1;
        let rewards: Vec<f64> = seq_rewards.to_dtype(DType::F64)?.to_vec1()?;
        let r_mean = rewards.iter().sum::<f64>() / n as f64;
        let r_std = (rewards.iter().map(|r| (r - r_mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let u = updates.max(1) as f64;
        let stats = StepStats {
            on_policy,
            reward_mean: r_mean,
            reward_std: r_std,
            score_mean: batch.iter().map(|t| t.score as f64).sum::<f64>() / n as f64,
            kl: mean_kl,
            beta,
            policy_loss: sums.policy_loss / u,
            value_loss: sums.value_loss / u,
            entropy: sums.entropy / u,
            clip_frac: sums.clip_frac / u,
            approx_kl: sums.approx_kl / u,
            ratio_mean: sums.ratio_mean / u,
            kl_loss: sums.kl_loss / u,
            behaviour_weight_mean: sums.behaviour_weight_mean / u,
            ptx_logprob: sums.ptx_logprob / u,
            explained_var: sums.explained_var / u,
            response_len_mean: batch.iter().map(|t| t.response_ids.len() as f64).sum::<f64>() / n as f64,
            skipped_updates: skipped,
        };
        Ok((stats, outputs))
    }
}

impl PpoTrainer {
    /// The pretraining texts of global minibatch `u` (see [`PpoTrainer::set_pretraining`]).
    fn ptx_rows(&self, u: u64) -> Option<Vec<Vec<u32>>> {
        if self.cfg.ptx_coef <= 0.0 {
            return None;
        }
        let (texts, rows) = self.pretraining.as_ref()?;
        let first = (u as usize).wrapping_mul(*rows);
        Some((0..*rows).map(|i| texts[(first + i) % texts.len()].clone()).collect())
    }

    /// `loss + ptx_loss` over `texts` (right-padded, temperature 1) and the texts' mean token
    /// log-likelihood.
    fn ptx_term(&self, loss: &Tensor, texts: &[Vec<u32>]) -> Result<(Tensor, f64), ActorError> {
        let dev = &self.device;
        let b = PaddedBatch::new(texts, self.policy.config().pad_id(), PadSide::Right, dev)?;
        let mask = b.mask_tensor(dev)?;
        let t = mask.dim(1)?;
        let out = self.policy.token_logprobs(&b.ids, &mask, 0, 1.0)?;
        let target_mask = mask.narrow(1, 1, t - 1)?.to_dtype(out.logprobs.dtype())?;
        let total = with_ptx(loss, &out.logprobs, &target_mask, self.cfg.ptx_coef).map_err(rl)?;
        let mean_lp = tandem_models::rl::masked_mean(&out.logprobs.detach(), &target_mask)
            .map_err(rl)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok((total, mean_lp))
    }
}

#[derive(Default)]
struct MinibatchSums {
    policy_loss: f64,
    value_loss: f64,
    clip_frac: f64,
    approx_kl: f64,
    ratio_mean: f64,
    explained_var: f64,
    entropy: f64,
    kl_loss: f64,
    behaviour_weight_mean: f64,
    ptx_logprob: f64,
}

impl MinibatchSums {
    fn add(&mut self, o: &tandem_models::rl::PpoLossOutput) {
        self.policy_loss += o.policy_loss as f64;
        self.value_loss += o.value_loss.unwrap_or(0.0) as f64;
        self.clip_frac += o.stats.clip_frac as f64;
        self.approx_kl += o.stats.approx_kl as f64;
        self.ratio_mean += o.stats.ratio_mean as f64;
        self.explained_var += o.stats.explained_var.unwrap_or(0.0) as f64;
        self.entropy += o.entropy.unwrap_or(0.0) as f64;
        self.kl_loss += o.kl_loss.unwrap_or(0.0) as f64;
        self.behaviour_weight_mean += o.stats.behaviour_weight_mean.unwrap_or(1.0) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_models::{ModelConfig, WeightInit};

    const K: usize = 4;

    fn model_config() -> ModelConfig {
        ModelConfig::gpt2(32, 16, 1, 2, 64)
    }

    fn trainer(cfg: TrainerConfig) -> PpoTrainer {
        let mc = model_config();
        let policy = LanguageModel::trainable(&mc, WeightInit::Random { seed: 3 }, &Device::Cpu).unwrap();
        let critic = (cfg.advantage == Advantage::Gae)
            .then(|| ScalarModel::trainable(&mc, WeightInit::Random { seed: 4 }, &Device::Cpu).unwrap());
        PpoTrainer::new(cfg, policy, critic, 1.0, K, 7, Device::Cpu).unwrap()
    }

    fn fixed(beta: f64) -> KlControllerConfig {
        KlControllerConfig::Fixed { beta }
    }

    /// The trainer's policy's own untruncated log-probs of `responses` after `prompt`.
    fn own_logprobs(t: &PpoTrainer, prompt: &[u32], responses: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let prompts: Vec<&[u32]> = responses.iter().map(|_| prompt).collect();
        let resp: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
        let l = PromptResponseBatch::new(&prompts, &resp, 0, &Device::Cpu).unwrap();
        let out = t
            .policy
            .token_logprobs(&l.ids, &l.mask, l.prompt_width - 1, 1.0)
            .unwrap();
        let rows: Vec<Vec<f32>> = out.logprobs.to_vec2().unwrap();
        rows.iter()
            .zip(responses)
            .map(|(r, resp)| r[..resp.len()].to_vec())
            .collect()
    }

    /// One trajectory per score, all at `version`, responses of 3 or 4 tokens; full log-probs
    /// are the policy's own, behaviour log-probs `full + q_shift` (a truncated q), reference
    /// log-probs `full - ref_gap`.
    fn batch(t: &PpoTrainer, scores: &[f32], version: u64, q_shift: f32, ref_gap: f32) -> Vec<Trajectory> {
        let prompt = vec![1u32, 2, 3];
        let responses: Vec<Vec<u32>> = (0..scores.len())
            .map(|i| (0..3 + i % 2).map(|j| 4 + ((i * 5 + j * 3) % 27) as u32).collect())
            .collect();
        let full = own_logprobs(t, &prompt, &responses);
        scores
            .iter()
            .enumerate()
            .map(|(i, &score)| Trajectory {
                ticket: 0,
                row: i as u32,
                prompt_index: (i / K) as u64,
                prompt_ids: prompt.clone(),
                response_ids: responses[i].clone(),
                behaviour_logprobs: full[i].iter().map(|l| l + q_shift).collect(),
                full_logprobs: full[i].clone(),
                stopped: false,
                policy_version: version,
                sampler: "test".into(),
                sampling_seed: 0,
                ref_logprobs: full[i].iter().map(|l| l - ref_gap).collect(),
                score,
                values: vec![0.0; responses[i].len()],
                sampled_unix_ms: 0,
            })
            .collect()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    /// GRPO advantages of a batch of 2 groups: one of equal scores, one of 0, 1, 2, 3.
    const SCORES: [f32; 8] = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0];

    #[test]
    fn grpo_advantages_are_the_normalised_scores_whatever_beta() {
        // Sample std of 0, 1, 2, 3 (Bessel): sqrt(5/3).
        let std = (5.0f64 / 3.0).sqrt();
        for beta in [0.0, 0.5, 5.0] {
            let cfg = TrainerConfig {
                advantage: Advantage::Grpo,
                kl: fixed(beta),
                ..TrainerConfig::default()
            };
            assert_eq!(cfg.kl_penalty(), KlPenalty::Loss);
            let mut t = trainer(cfg);
            let b = batch(&t, &SCORES, 0, 0.0, 0.7);
            let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
            for (i, o) in out.iter().enumerate() {
                let want = if i < K {
                    0.0
                } else {
                    (SCORES[i] as f64 - 1.5) / (std + 1e-6)
                };
                assert_eq!(o.advantages.len(), b[i].response_ids.len());
                for &a in &o.advantages {
                    close(a as f64, want, 1e-5);
                }
                // The reward is the score alone, at the last token.
                let last = o.rewards.len() - 1;
                assert_eq!(o.rewards[last], SCORES[i]);
                assert!(o.rewards[..last].iter().all(|&r| r == 0.0));
            }
            // The KL is a loss term: k3 of a 0.7 gap before the first update.
            assert!(stats.kl_loss > 0.0, "beta {beta}: {stats:?}");
            close(stats.kl, mean_len(&b) * 0.7, 1e-4);
        }
    }

    fn mean_len(b: &[Trajectory]) -> f64 {
        b.iter().map(|t| t.response_ids.len() as f64).sum::<f64>() / b.len() as f64
    }

    #[test]
    fn kl_in_the_reward_is_the_default_for_gae_and_rloo_and_can_be_chosen_for_grpo() {
        for adv in [Advantage::Gae, Advantage::Rloo] {
            let cfg = TrainerConfig {
                advantage: adv,
                ..TrainerConfig::default()
            };
            assert_eq!(cfg.kl_penalty(), KlPenalty::Reward);
        }
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl_penalty: Some(KlPenalty::Reward),
            kl: fixed(0.5),
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg);
        let b = batch(&t, &SCORES, 0, 0.0, 0.7);
        let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
        // Per-token reward -0.5 * 0.7 (k1), the score added at the last token.
        for (o, s) in out.iter().zip(SCORES) {
            let last = o.rewards.len() - 1;
            for &r in &o.rewards[..last] {
                close(r as f64, -0.35, 1e-5);
            }
            close(o.rewards[last] as f64, s as f64 - 0.35, 1e-5);
        }
        assert_eq!(stats.kl_loss, 0.0);
    }

    #[test]
    fn dr_grpo_centres_without_scaling() {
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            grpo: GrpoConfig {
                scale_by_std: false,
                eps: 1e-6,
            },
            kl: fixed(0.1),
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg);
        let b = batch(&t, &SCORES, 0, 0.0, 0.7);
        let (_, out) = t.step_with_outputs(&b, 0, 0).unwrap();
        for (i, o) in out.iter().enumerate() {
            let want = if i < K { 0.0 } else { SCORES[i] as f64 - 1.5 };
            assert!(
                o.advantages.iter().all(|&a| (a as f64 - want).abs() < 1e-6),
                "{i}: {o:?}"
            );
        }
    }

    fn tokens(b: &[Trajectory]) -> f64 {
        b.iter().map(|t| t.response_ids.len() as f64).sum()
    }

    #[test]
    fn fresh_rows_have_weight_one_with_or_without_a_stale_row() {
        // Top-k/top-p samplers: behaviour (q) log-probs 0.3 above the untruncated ones.
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl: fixed(0.0),
            ppo_epochs: 1,
            minibatch_size: 8,
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg.clone());
        let fresh = batch(&t, &SCORES, 5, 0.3, 0.0);
        let (stats, _) = t.step_with_outputs(&fresh, 5, 5).unwrap();
        close(stats.behaviour_weight_mean, 1.0, 1e-9);
        // The same rows with the first group from version 4, whose policy gave its tokens
        // 0.5 less log-prob than the current one: w = e^0.5 there, 1 on the fresh rows.
        let mut t = trainer(cfg);
        let mut mixed = batch(&t, &SCORES, 5, 0.3, 0.0);
        for tr in &mut mixed[..K] {
            tr.policy_version = 4;
            tr.full_logprobs.iter_mut().for_each(|l| *l -= 0.5);
            tr.behaviour_logprobs.iter_mut().for_each(|l| *l -= 0.5);
        }
        let (stats, _) = t.step_with_outputs(&mixed, 5, 5).unwrap();
        let stale = tokens(&mixed[..K]);
        let want = (stale * 0.5f64.exp() + tokens(&mixed[K..])) / tokens(&mixed);
        close(stats.behaviour_weight_mean, want, 1e-4);
    }

    #[test]
    fn the_kl_penalty_of_stale_rows_comes_from_pi_prox() {
        let cfg = TrainerConfig {
            advantage: Advantage::Rloo,
            kl: fixed(1.0),
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg);
        // Reference 0.2 below the current policy; the stale sampler's log-probs 0.4 above it.
        let mut b = batch(&t, &SCORES, 3, 0.0, 0.2);
        for tr in &mut b {
            tr.policy_version = 2;
            tr.full_logprobs.iter_mut().for_each(|l| *l += 0.4);
            tr.behaviour_logprobs.iter_mut().for_each(|l| *l += 0.4);
        }
        let (stats, out) = t.step_with_outputs(&b, 3, 3).unwrap();
        for o in &out {
            for &r in &o.rewards[..o.rewards.len() - 1] {
                close(r as f64, -0.2, 1e-4);
            }
        }
        close(stats.kl, mean_len(&b) * 0.2, 1e-4);
    }

    #[test]
    fn running_score_normalisation_is_applied_and_checkpointed() {
        let mut cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl: fixed(0.0),
            ..TrainerConfig::default()
        };
        cfg.reward.normalize = ScoreNormalization::Running;
        let mut t = trainer(cfg.clone());
        let b = batch(&t, &SCORES, 0, 0.0, 0.0);
        let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
        // Mean 1.25, population variance 0.6875 over the 8 scores.
        let norm = |s: f64| (s - 1.25) / (0.6875f64 + 1e-8).sqrt();
        for (o, s) in out.iter().zip(SCORES) {
            close(*o.rewards.last().unwrap() as f64, norm(s as f64), 1e-5);
        }
        close(stats.reward_mean, 0.0, 1e-5);
        // The statistics travel with the checkpoint state.
        let state = t.state().unwrap();
        let mut resumed = trainer(cfg);
        resumed.load_state(&state).unwrap();
        assert_eq!(resumed.score_norm, t.score_norm);
        let b2 = batch(&t, &[3.0; 8], 1, 0.0, 0.0);
        let (_, o1) = t.step_with_outputs(&b2, 1, 1).unwrap();
        let (_, o2) = resumed.step_with_outputs(&b2, 1, 1).unwrap();
        // 16 scores: mean 2.125, population variance (5.5 + 8 * 0.765625) / 16.
        let var = (0.6875 * 8.0 + 8.0 * 0.875f64.powi(2) + 8.0 * 0.875f64.powi(2)) / 16.0;
        let want = (3.0 - 2.125) / (var + 1e-8).sqrt();
        close(*o1[0].rewards.last().unwrap() as f64, want, 1e-5);
        assert_eq!(o1, o2);
    }

    #[test]
    fn the_ema_follows_each_update_and_survives_a_checkpoint() {
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl: fixed(0.0),
            ppo_epochs: 1,
            minibatch_size: 8,
            policy_lr: 1e-2,
            ema_decay: Some(0.75),
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg.clone());
        let before = t.policy_weights().unwrap();
        let b = batch(&t, &SCORES, 0, 0.0, 0.0);
        t.step(&b, 0, 0).unwrap();
        // One update: ema = 0.75 * w0 + 0.25 * w1.
        let after = t.policy_weights().unwrap();
        let ema = t.ema_weights().unwrap();
        let mut moved = 0.0f64;
        for (name, e) in &ema {
            let want = ((&before[name] * 0.75).unwrap() + (&after[name] * 0.25).unwrap()).unwrap();
            let diff = (e - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{name}: {diff}");
            moved += (&after[name] - &before[name])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        assert!(moved > 0.0);
        let mut resumed = trainer(cfg);
        resumed.load_state(&t.state().unwrap()).unwrap();
        let got = resumed.ema_weights().unwrap();
        for (name, e) in &ema {
            assert_eq!(
                e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn ppo_ptx_raises_the_likelihood_of_the_pretraining_texts() {
        let texts: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10], vec![11, 12, 13], vec![14, 15, 16, 17]];
        let mean_lp = |t: &PpoTrainer| -> f64 {
            let b = PaddedBatch::new(&texts, 0, PadSide::Right, &Device::Cpu).unwrap();
            let mask = b.mask_tensor(&Device::Cpu).unwrap();
            let w = mask.dim(1).unwrap();
            let out = t.policy.token_logprobs(&b.ids, &mask, 0, 1.0).unwrap();
            tandem_models::rl::masked_mean(&out.logprobs, &mask.narrow(1, 1, w - 1).unwrap())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let run = |gamma: f64| -> (f64, f64, StepStats) {
            let cfg = TrainerConfig {
                advantage: Advantage::Grpo,
                kl: fixed(0.0),
                ppo_epochs: 1,
                minibatch_size: 8,
                policy_lr: 1e-2,
                ptx_coef: gamma,
                ..TrainerConfig::default()
            };
            let mut t = trainer(cfg);
            t.set_pretraining(texts.clone(), 3).unwrap();
            let start = mean_lp(&t);
            let b = batch(&t, &SCORES, 0, 0.0, 0.0);
            let stats = t.step(&b, 0, 0).unwrap();
            (start, mean_lp(&t), stats)
        };
        let (start, without, s0) = run(0.0);
        let (start2, with, s1) = run(5.0);
        assert_eq!(start, start2);
        assert_eq!(s0.ptx_logprob, 0.0);
        // The reported log-likelihood is the texts' before the (only) update.
        close(s1.ptx_logprob, start, 1e-5);
        assert!(with > without + 0.01, "ptx {start} -> {with}, without {without}");
        assert!(trainer(TrainerConfig {
            advantage: Advantage::Grpo,
            ..TrainerConfig::default()
        })
        .set_pretraining(vec![vec![1]], 1)
        .is_err());
    }
}
