//! The learner's synchronous core: one PPO (or GRPO / RLOO) step over a batch of trajectories.
//!
//! A step, for a batch sampled by policy versions `<= k` and trained at version `k`:
//! 1. Lay the batch out as prompt + response rows (responses start at one column).
//! 2. `pi_prox` = the policy at the start of the step. For on-policy data (every trajectory
//!    from version k) that is the sampler's recorded log-prob; otherwise one no-grad forward
//!    recomputes it and the behaviour log-probs enter the decoupled-PPO weight
//!    `min(pi_prox / pi_behaviour, cap)`.
//! 3. Per-token rewards `-beta * KL_t` (KL estimator against the reference log-probs) plus the
//!    score at the last token, with the current beta of the KL controller.
//! 4. Advantages: GAE over the critic's values (PPO), or group-normalised / leave-one-out
//!    sequence rewards broadcast to tokens (GRPO / RLOO); whitened over the mask for PPO.
//! 5. `epochs` passes over shuffled minibatches: clipped surrogate + value loss (clipped) −
//!    entropy bonus, one backward, global-norm clipping per network, AdamW. A minibatch whose
//!    loss or gradient norm is not finite is skipped and counted.
//! 6. The KL controller sees the mean per-sequence KL of the batch.
//!
//! Shuffling uses a seeded RNG derived from the run seed and the step, so a sync run is
//! reproducible — and nothing else in a step is random, so [`TrainerState`] (weights, AdamW
//! moments and step counts, beta, completed steps) is all a checkpoint needs to repeat a step
//! exactly.
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
use tandem_models::batch::PromptResponseBatch;
use tandem_models::rl::{
    clip_grad_norm, gae, grpo_advantages, masked_whiten, ppo_loss, rloo_advantages, GaeConfig, GrpoConfig,
    KlController, KlControllerConfig, PpoInputs, PpoLossConfig, RewardConfig, ValueInputs,
};
use tandem_models::{snapshot, AdamW, LanguageModel, ScalarModel};

use crate::error::ActorError;
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

/// Learner hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    pub advantage: Advantage,
    pub ppo_epochs: usize,
    /// Trajectories per minibatch.
    pub minibatch_size: usize,
    pub policy_lr: f64,
    pub critic_lr: f64,
    /// Global gradient-norm clip per network; 0 disables.
    pub max_grad_norm: f64,
    /// Whiten GAE advantages over the batch.
    pub whiten_advantages: bool,
    pub gae: GaeConfig,
    pub loss: PpoLossConfig,
    pub reward: RewardConfig,
    pub kl: KlControllerConfig,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            advantage: Advantage::Gae,
            ppo_epochs: 4,
            minibatch_size: 16,
            policy_lr: 1e-5,
            critic_lr: 1e-5,
            max_grad_norm: 1.0,
            whiten_advantages: true,
            gae: GaeConfig::default(),
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

/// What one step measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepStats {
    pub reward_mean: f64,
    pub reward_std: f64,
    pub score_mean: f64,
    pub kl: f64,
    pub beta: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub entropy: f64,
    pub clip_frac: f64,
    pub approx_kl: f64,
    pub ratio_mean: f64,
    pub explained_var: f64,
    pub response_len_mean: f64,
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
}

/// Everything a checkpoint keeps of the learner.
#[derive(Debug, Clone)]
pub struct TrainerState {
    pub policy: HashMap<String, Tensor>,
    pub critic: Option<HashMap<String, Tensor>>,
    /// AdamW moments as `policy/m/NAME`, `policy/v/NAME`, `critic/m/NAME`, `critic/v/NAME`.
    pub optimizer: HashMap<String, Tensor>,
    pub policy_optimizer_steps: usize,
    pub critic_optimizer_steps: Option<usize>,
    pub beta: f64,
    pub completed_steps: u64,
}

/// AdamW with savable moments (for checkpoints), same arithmetic as candle's.
fn adamw(vars: &VarMap, lr: f64) -> Result<AdamW, ActorError> {
    Ok(AdamW::from_varmap(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
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
        let policy_opt = adamw(&policy.1, cfg.policy_lr)?;
        let critic = match critic {
            Some((m, v)) => {
                let opt = adamw(&v, cfg.critic_lr)?;
                Some((m, v, opt))
            }
            None => None,
        };
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
        })
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
        let sampled = rows(&|t| &t.full_logprobs)?;
        let behaviour = rows(&|t| &t.behaviour_logprobs)?;
        let ref_logp = rows(&|t| &t.ref_logprobs)?;
        let old_values = rows(&|t| &t.values)?;
        let scores = Tensor::from_vec(batch.iter().map(|t| t.score).collect::<Vec<_>>(), n, &dev)?;

        let on_policy = batch.iter().all(|t| t.policy_version == version);
        let prox = if on_policy {
            sampled.clone()
        } else {
            let out = self
                .policy
                .token_logprobs(&layout.ids, &layout.mask, start, self.temperature)?;
            out.logprobs.narrow(1, 0, width)?.detach()
        };

        // Rewards with the KL penalty against the reference, at the current beta.
        let beta = self.kl.beta();
        let tr = self
            .cfg
            .reward
            .token_rewards(&scores, &sampled, &ref_logp, mask, beta)
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
                    grpo_advantages(&seq_rewards, k, &GrpoConfig::default()).map_err(rl)?
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
        let (mut sums, mut updates, mut skipped) = (MinibatchSums::default(), 0usize, 0u64);
        let policy_vars = sorted_vars(&self.policy_vars);
        let critic_vars = self.critic.as_ref().map(|(_, v, _)| sorted_vars(v));
        for _epoch in 0..self.cfg.ppo_epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(mb) {
                let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), &dev)?;
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let (ids, full_mask, m) = (pick(&layout.ids)?, pick(&layout.mask)?, pick(mask)?);
                let out = self.policy.token_logprobs(&ids, &full_mask, start, self.temperature)?;
                let logp = out.logprobs.narrow(1, 0, width)?;
                let entropy = out.entropy.narrow(1, 0, width)?;
                let (prox_mb, adv_mb) = (pick(&prox)?, pick(&advantages)?);
                let behaviour_mb = if on_policy { None } else { Some(pick(&behaviour)?) };
                let value_parts = match (&self.critic, &returns) {
                    (Some((critic, _, _)), Some(ret)) => {
                        let v = critic.values(&ids, &full_mask)?.narrow(1, start, width)?;
                        Some((v, pick(&old_values)?, pick(ret)?))
                    }
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
                    mask: &m,
                };
                let mut out = ppo_loss(&self.cfg.loss, &inputs).map_err(rl)?;
                if self.nonfinite_steps.contains(&step) {
                    out.loss = out.loss.affine(f64::NAN, 0.0)?;
                }
                let loss_val = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_val.is_finite() {
                    skipped += 1;
                    continue;
                }
                let mut grads = out.loss.backward()?;
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
                updates += 1;
                sums.add(&out);
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
            explained_var: sums.explained_var / u,
            response_len_mean: batch.iter().map(|t| t.response_ids.len() as f64).sum::<f64>() / n as f64,
            skipped_updates: skipped,
        };
        Ok((stats, outputs))
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
    }
}
