//! Reward-model training arithmetic: scores comparison groups with a [`ScalarModel`], takes the
//! configured loss, and steps AdamW on a warm-up + decay schedule. Synchronous; the
//! [`crate::rm_learner`] actor runs it on a device executor.
//!
//! A training example is a [`Comparison`]: one prompt, `K >= 2` responses and their ranking
//! (best first). A pairwise record is `K = 2` with ranking `[0, 1]` (chosen, rejected).
//! Every response of a batch is scored in one forward pass (prompt + response, score at the
//! last real token); the examples are then grouped by `K` and:
//!
//! - [`RmLoss::BradleyTerry`]: the InstructGPT ranking loss over all `C(K, 2)` pairs of each
//!   prompt (Bradley–Terry when `K = 2`; [`tandem_models::rl::ranking_loss`]);
//! - [`RmLoss::BestOfK`]: softmax cross-entropy of the best response among the `K`
//!   (Ziegler et al. 2019; [`tandem_models::rl::best_of_k_loss`]).
//!
//! Groups of different `K` contribute in proportion to their number of examples. Accuracy is
//! over all ranked pairs (the fraction scored in the labelled order, ties counting as wrong);
//! `top1` is the fraction of examples whose best response scores highest. Our models have no
//! dropout, so training and evaluation forwards are the same function (the papers turn
//! dropout off for reward models anyway).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tandem_models::adamw::ParamsAdamW;
use tandem_models::batch::PromptResponseBatch;
use tandem_models::rl::{best_of_k_loss, clip_grad_norm, ranking_loss, LrSchedule};
use tandem_models::{snapshot, AdamW, ModelConfig, ScalarModel};

use crate::error::ActorError;

/// One prompt with `K >= 2` responses ranked best to worst (`ranking` lists response indices).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub ranking: Vec<usize>,
}

/// A training batch from the data loader.
#[derive(Debug, Clone)]
pub struct RmBatch {
    /// 0-based epoch the batch belongs to.
    pub epoch: usize,
    pub examples: Vec<Comparison>,
}

/// Which loss trains the reward model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RmLoss {
    /// All `C(K, 2)` ranked pairs (Bradley–Terry / InstructGPT).
    #[default]
    BradleyTerry,
    /// Best-of-K softmax cross-entropy (Ziegler et al. 2019).
    BestOfK,
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmOptim {
    pub loss: RmLoss,
    pub schedule: LrSchedule,
    pub weight_decay: f64,
    /// Global gradient-norm clip; `<= 0` disables it.
    pub max_grad_norm: f64,
}

/// What one training step or one evaluation measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RmStats {
    pub loss: f64,
    pub accuracy: f64,
    pub top1: f64,
    /// Mean score of all responses.
    pub score_mean: f64,
    pub examples: usize,
}

pub struct RmTrainer {
    model: ScalarModel,
    vars: VarMap,
    opt: AdamW,
    optim: RmOptim,
    step: usize,
    device: Device,
}

fn rl(e: tandem_models::rl::RlError) -> ActorError {
    ActorError::Other(e.to_string())
}

impl RmTrainer {
    pub fn new(model: ScalarModel, vars: VarMap, optim: RmOptim) -> Result<Self, ActorError> {
        optim.schedule.validate().map_err(rl)?;
        let opt = AdamW::from_varmap(
            &vars,
            ParamsAdamW {
                lr: optim.schedule.lr_at(0),
                weight_decay: optim.weight_decay,
                ..Default::default()
            },
        )?;
        let device = model.device().clone();
        Ok(Self {
            model,
            vars,
            opt,
            optim,
            step: 0,
            device,
        })
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Copies of the current weights, HF names.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, ActorError> {
        Ok(snapshot(&self.vars)?)
    }

    /// Scores of every response of `examples`, flattened in order (differentiable).
    fn forward(&self, examples: &[Comparison]) -> Result<Tensor, ActorError> {
        let mut prompts: Vec<&[u32]> = Vec::new();
        let mut responses: Vec<&[u32]> = Vec::new();
        for e in examples {
            for r in &e.responses {
                prompts.push(&e.prompt);
                responses.push(r);
            }
        }
        let b = PromptResponseBatch::new(&prompts, &responses, self.model.config().pad_id(), &self.device)?;
        Ok(self.model.scores(&b.ids, &b.mask)?)
    }

    /// Loss over `examples` from their flattened `scores`, and the host statistics.
    fn loss(&self, examples: &[Comparison], scores: &Tensor) -> Result<(Tensor, RmStats), ActorError> {
        // Row offset of each example in the flattened scores; examples grouped by K.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut offsets = Vec::with_capacity(examples.len());
        let mut off = 0;
        for (i, e) in examples.iter().enumerate() {
            if e.responses.len() < 2 || e.ranking.len() != e.responses.len() {
                return Err(ActorError::Other(format!(
                    "example {i}: {} responses with a ranking of {}",
                    e.responses.len(),
                    e.ranking.len()
                )));
            }
            offsets.push(off);
            off += e.responses.len();
            groups.entry(e.responses.len()).or_default().push(i);
        }
        let n = examples.len() as f64;
        let mut total: Option<Tensor> = None;
        for (k, members) in &groups {
            let offsets = &offsets;
            let idx: Vec<u32> = members
                .iter()
                .flat_map(|&i| (0..*k).map(move |j| (offsets[i] + j) as u32))
                .collect();
            let idx = Tensor::from_vec(idx, members.len() * k, &self.device)?;
            let r = scores.index_select(&idx, 0)?.reshape((members.len(), *k))?;
            let l = match self.optim.loss {
                RmLoss::BradleyTerry => {
                    let ranks: Vec<Vec<usize>> = members.iter().map(|&i| examples[i].ranking.clone()).collect();
                    ranking_loss(&r, &ranks).map_err(rl)?
                }
                RmLoss::BestOfK => {
                    let best: Vec<usize> = members.iter().map(|&i| examples[i].ranking[0]).collect();
                    best_of_k_loss(&r, &best).map_err(rl)?
                }
            };
            let l = (l * (members.len() as f64 / n))?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let loss = total.ok_or_else(|| ActorError::Other("empty reward-model batch".into()))?;
        let host = scores.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (mut right, mut pairs, mut top) = (0usize, 0usize, 0usize);
        for (e, &o) in examples.iter().zip(&offsets) {
            let s = &host[o..o + e.responses.len()];
            for i in 0..e.ranking.len() {
                for j in i + 1..e.ranking.len() {
                    pairs += 1;
                    right += (s[e.ranking[i]] > s[e.ranking[j]]) as usize;
                }
            }
            let best = e.ranking[0];
            top += s.iter().enumerate().all(|(j, &x)| j == best || x < s[best]) as usize;
        }
        let stats = RmStats {
            loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            accuracy: right as f64 / pairs.max(1) as f64,
            top1: top as f64 / examples.len().max(1) as f64,
            score_mean: host.iter().map(|&x| x as f64).sum::<f64>() / host.len().max(1) as f64,
            examples: examples.len(),
        };
        Ok((loss, stats))
    }

    /// One optimiser step on `examples`; returns the batch statistics (before the update), the
    /// learning rate used and the gradient norm before clipping. A non-finite loss or gradient
    /// skips the update.
    pub fn step(&mut self, examples: &[Comparison]) -> Result<(RmStats, f64, f64), ActorError> {
        let scores = self.forward(examples)?;
        let (loss, stats) = self.loss(examples, &scores)?;
        let lr = self.optim.schedule.lr_at(self.step);
        self.step += 1;
        if !stats.loss.is_finite() {
            tracing::warn!(step = self.step, "non-finite reward-model loss; update skipped");
            return Ok((stats, lr, f64::NAN));
        }
        let mut grads = loss.backward()?;
        let vars: Vec<Var> = self.vars.all_vars();
        let max = if self.optim.max_grad_norm > 0.0 {
            self.optim.max_grad_norm
        } else {
            f64::INFINITY
        };
        let norm = clip_grad_norm(&vars, &mut grads, max).map_err(rl)?;
        if norm.is_finite() {
            self.opt.set_learning_rate(lr);
            self.opt.step(&grads)?;
        }
        Ok((stats, lr, norm))
    }

    /// Statistics over `examples` in batches of `batch_size`, without updating.
    pub fn evaluate(&self, examples: &[Comparison], batch_size: usize) -> Result<RmStats, ActorError> {
        let mut acc = RmStats::default();
        let (mut pair_w, mut n_rows) = (0.0, 0.0);
        for chunk in examples.chunks(batch_size.max(1)) {
            let scores = self.forward(chunk)?.detach();
            let (_, s) = self.loss(chunk, &scores)?;
            let w = chunk.len() as f64;
            let pw: f64 = chunk
                .iter()
                .map(|e| (e.ranking.len() * (e.ranking.len() - 1) / 2) as f64)
                .sum();
            let rows: f64 = chunk.iter().map(|e| e.responses.len() as f64).sum();
            acc.loss += s.loss * w;
            acc.top1 += s.top1 * w;
            acc.accuracy += s.accuracy * pw;
            acc.score_mean += s.score_mean * rows;
            acc.examples += chunk.len();
            pair_w += pw;
            n_rows += rows;
        }
        let n = acc.examples.max(1) as f64;
        acc.loss /= n;
        acc.top1 /= n;
        acc.accuracy /= pair_w.max(1.0);
        acc.score_mean /= n_rows.max(1.0);
        Ok(acc)
    }
}
