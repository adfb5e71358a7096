//! One learner step: the batch layout, advantages, and the epochs of minibatch losses and
//! updates (see the module docs of [`super`]).

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use tandem_models::batch::{PadSide, PaddedBatch, PromptResponseBatch};
use tandem_models::rl::{
    clip_scale, gae, global_grad_norm, grpo_advantages, masked_whiten, ppo_loss, rloo_advantages, with_ptx,
    KlLossInputs, PpoInputs, ValueInputs,
};

use super::{sorted_vars, Advantage, KlPenalty, PpoTrainer, StepStats};
use crate::error::ActorError;
use crate::trajectory::{TokenOutputs, Trajectory};

impl PpoTrainer {
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
            norm.update(&raw_scores.iter().map(|&s| s as f64).collect::<Vec<_>>())?;
            scores = norm.normalize(&scores)?;
        }

        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut rng = StdRng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mb = self.cfg.minibatch_size.clamp(1, n);
        order.shuffle(&mut rng); // epoch 0's order

        let on_policy = batch.iter().all(|t| t.policy_version == version);
        // Off-policy data needs pi_prox, the current policy's log-probs before any update. The
        // first minibatch's own forward (taken with its graph, and reused for its update below)
        // gives them for its rows; only the other rows need a forward of their own.
        let mut first_forward = None;
        let prox = if on_policy {
            sampled.clone()
        } else {
            let rows = |r: &[u32]| Tensor::from_vec(r.to_vec(), r.len(), &dev);
            let forward = |r: &[u32]| -> Result<_, ActorError> {
                let idx = rows(r)?;
                let ids = layout.ids.index_select(&idx, 0)?;
                let mask = layout.mask.index_select(&idx, 0)?;
                Ok(self.policy.token_logprobs(&ids, &mask, start, self.temperature)?)
            };
            let (head, rest) = order.split_at(mb);
            let out = forward(head)?;
            let mut parts = vec![out.logprobs.narrow(1, 0, width)?.detach()];
            if !rest.is_empty() {
                parts.push(forward(rest)?.logprobs.narrow(1, 0, width)?.detach());
            }
            // Rows in `order`; put them back in batch order.
            let mut inverse = vec![0u32; n];
            for (pos, &row) in order.iter().enumerate() {
                inverse[row as usize] = pos as u32;
            }
            first_forward = Some(out);
            Tensor::cat(&parts, 0)?.index_select(&rows(&inverse)?, 0)?
        };
        let ratio = BehaviourRatio::of(&prox, &sampled, mask, self.cfg.loss.behaviour_weight_cap)?;
        let loss_mask = match self.stale_token_lag {
            Some(lag) => fresh_token_mask(batch, version, lag, mask)?,
            None => mask.clone(),
        };

        // Rewards (the KL of pi_prox against the reference, at the current beta, when the KL
        // is in the reward).
        let beta = self.kl.beta();
        let kl_penalty = self.cfg.kl_penalty();
        let reward_beta = if kl_penalty == KlPenalty::Reward { beta } else { 0.0 };
        let tr = self
            .cfg
            .reward
            .token_rewards(&scores, &prox, &ref_logp, mask, reward_beta)?;
        let seq_rewards = tr.rewards.sum(1)?;
        let seq_kl = tr.kl.sum(1)?;

        let (advantages, returns) = match self.cfg.advantage {
            Advantage::Gae => {
                let g = gae(&tr.rewards, &old_values, mask, &self.cfg.gae)?;
                let adv = if self.cfg.whiten_advantages {
                    masked_whiten(&g.advantages, mask, true)?
                } else {
                    g.advantages
                };
                (adv, Some(g.returns))
            }
            Advantage::Grpo | Advantage::Rloo => {
                let k = self.samples_per_prompt;
                let seq_adv = if self.cfg.advantage == Advantage::Grpo {
                    grpo_advantages(&seq_rewards, k, &self.cfg.grpo)?
                } else {
                    rloo_advantages(&seq_rewards, k)?
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

        let minibatches_per_step = self.cfg.ppo_epochs as u64 * n.div_ceil(mb) as u64;
        let mut minibatch = 0u64;
        let (mut sums, mut updates, mut skipped) = (MinibatchSums::default(), 0usize, 0u64);
        let policy_vars = sorted_vars(&self.policy_vars);
        let critic_vars = self.critic.as_ref().map(|(_, v, _)| sorted_vars(v));
        for epoch in 0..self.cfg.ppo_epochs {
            if epoch > 0 {
                order.shuffle(&mut rng);
            }
            for chunk in order.chunks(mb) {
                let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), &dev)?;
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let (ids, full_mask, m) = (pick(&layout.ids)?, pick(&layout.mask)?, pick(&loss_mask)?);
                // Policy and critic share no parameters: their forwards (and below, their
                // backwards) run side by side on the device's threads.
                let critic_model = match (&self.critic, &returns) {
                    (Some((critic, _, _)), Some(_)) => Some(critic),
                    _ => None,
                };
                let reused = first_forward.take();
                let (out, values) = rayon::join(
                    || match reused {
                        Some(out) => Ok(out),
                        None => self.policy.token_logprobs(&ids, &full_mask, start, self.temperature),
                    },
                    || {
                        critic_model
                            .map(|c| c.values_at(&ids, &full_mask, start, width))
                            .transpose()
                    },
                );
                let (out, values) = (out?, values?);
                let logp = out.logprobs.narrow(1, 0, width)?;
                let entropy = out.entropy.narrow(1, 0, width)?;
                let (prox_mb, adv_mb) = (pick(&prox)?, pick(&advantages)?);
                let behaviour_mb = if on_policy { None } else { Some(pick(&sampled)?) };
                let ref_mb = pick(&ref_logp)?;
                let value_parts = match (values, &returns) {
                    (Some(v), Some(ret)) => Some((v, pick(&old_values)?, pick(ret)?)),
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
                let mut out = ppo_loss(&self.cfg.loss, &inputs)?;
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
                let (grads, value_grads) = (grads?, value_grads?);
                let max = if self.cfg.max_grad_norm > 0.0 {
                    self.cfg.max_grad_norm
                } else {
                    f64::INFINITY
                };
                // The norms and the optimiser steps also run side by side: each model's norm and
                // update read only its own gradients. Clipping is a factor the update applies.
                let (pn, cn) = rayon::join(
                    || global_grad_norm(&policy_vars, &grads),
                    || match (&critic_vars, &value_grads) {
                        (Some(vars), Some(g)) => global_grad_norm(vars, g),
                        _ => Ok(0.0),
                    },
                );
                let (pn, cn) = (pn?, cn?);
                if !pn.is_finite() || !cn.is_finite() {
                    skipped += 1;
                    continue;
                }
                let policy_opt = &mut self.policy_opt;
                let critic_opt = self.critic.as_mut().map(|(_, _, opt)| opt);
                // A critic without a value term still counts the step (its moments' bias
                // correction follows the update count), with no gradient to apply.
                let critic_grads = value_grads.as_ref().unwrap_or(&grads);
                let (p_scale, c_scale) = (clip_scale(pn, max)?, clip_scale(cn, max)?);
                let (p, c) = rayon::join(
                    || policy_opt.step_scaled(&grads, p_scale),
                    || critic_opt.map(|opt| opt.step_scaled(critic_grads, c_scale)).transpose(),
                );
                p?;
                c?;
                if let Some(ema) = &mut self.ema {
                    ema.update()?;
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
            self.kl.update(mean_kl)?;
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
            behaviour_ratio_mean: ratio.mean,
            behaviour_ratio_min: ratio.min,
            behaviour_ratio_max: ratio.max,
            behaviour_ratio_trunc_frac: ratio.trunc_frac,
            behaviour_mismatch_kl: ratio.mismatch_kl,
            ptx_logprob: sums.ptx_logprob / u,
            explained_var: sums.explained_var / u,
            response_len_mean: batch.iter().map(|t| t.response_ids.len() as f64).sum::<f64>() / n as f64,
            skipped_updates: skipped,
        };
        Ok((stats, outputs))
    }

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
        let total = with_ptx(loss, &out.logprobs, &target_mask, self.cfg.ptx_coef)?;
        let mean_lp = tandem_models::rl::masked_mean(&out.logprobs.detach(), &target_mask)?
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

/// `mask` (b, width) without the tokens of `batch` sampled more than `lag` versions before
/// `version`.
fn fresh_token_mask(batch: &[Trajectory], version: u64, lag: u64, mask: &Tensor) -> Result<Tensor, ActorError> {
    if batch.iter().all(|t| t.policy_version + lag >= version) {
        return Ok(mask.clone());
    }
    let width = mask.dim(1)?;
    let fresh: Vec<f32> = batch
        .iter()
        .flat_map(|t| {
            let mut row: Vec<f32> = t
                .versions()
                .iter()
                .map(|&v| f32::from(u8::from(v + lag >= version)))
                .collect();
            row.resize(width, 0.0);
            row
        })
        .collect();
    let fresh = Tensor::from_vec(fresh, (batch.len(), width), mask.device())?.to_dtype(mask.dtype())?;
    Ok((mask * fresh)?)
}

/// The behaviour importance ratio of a batch (see [`StepStats::behaviour_ratio_mean`]).
struct BehaviourRatio {
    mean: f64,
    min: f64,
    max: f64,
    trunc_frac: f64,
    mismatch_kl: f64,
}

impl BehaviourRatio {
    /// Of `prox` against `behaviour` log-probs (b, width) over the tokens of `mask`.
    fn of(prox: &Tensor, behaviour: &Tensor, mask: &Tensor, cap: Option<f64>) -> Result<Self, ActorError> {
        let rows = |t: &Tensor| -> Result<Vec<Vec<f64>>, ActorError> { Ok(t.to_dtype(DType::F64)?.to_vec2()?) };
        let (p, b, m) = (rows(prox)?, rows(behaviour)?, rows(mask)?);
        let (mut n, mut sum, mut kl, mut over) = (0.0, 0.0, 0.0, 0.0);
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for ((p, b), m) in p.iter().zip(&b).zip(&m) {
            for ((&p, &b), &m) in p.iter().zip(b).zip(m) {
                if m == 0.0 {
                    continue;
                }
                let log_r = p - b;
                let r = log_r.exp();
                n += 1.0;
                sum += r;
                kl += r - 1.0 - log_r;
                min = min.min(r);
                max = max.max(r);
                if cap.is_some_and(|c| r > c) {
                    over += 1.0;
                }
            }
        }
        if n == 0.0 {
            return Ok(Self {
                mean: 1.0,
                min: 1.0,
                max: 1.0,
                trunc_frac: 0.0,
                mismatch_kl: 0.0,
            });
        }
        Ok(Self {
            mean: sum / n,
            min,
            max,
            trunc_frac: over / n,
            mismatch_kl: kl / n,
        })
    }
}
