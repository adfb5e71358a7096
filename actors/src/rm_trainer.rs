//! Reward-model training arithmetic: scores comparison groups with a [`ScalarModel`], takes the
//! configured loss, and steps AdamW on a warm-up + decay schedule. Synchronous; the
//! [`crate::supervised_learner`] actor runs it on a device executor.
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

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::rl::{best_of_k_loss, ranking_loss};
use tandem_models::{ModelConfig, ScalarModel};

use crate::error::ActorError;
use crate::supervised_trainer::{OptimSettings, Optimizer, StepInfo, SupervisedTrainer};

/// One prompt with `K >= 2` responses ranked best to worst (`ranking` lists response indices).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub ranking: Vec<usize>,
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
    optim: Optimizer,
    loss: RmLoss,
    device: Device,
}

/// One line of a reward-model run's metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct RmReport {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training batch statistics, before the update.
    pub loss: f64,
    pub accuracy: f64,
    pub top1: f64,
    pub examples: usize,
    /// Held-out statistics after this step's update, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_top1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_score_mean: Option<f64>,
    /// Seconds waiting for the batch, computing the step, and evaluating.
    pub load_wait_s: f64,
    pub learn_s: f64,
    pub eval_s: f64,
    pub wall_s: f64,
    /// Weights after this step, at checkpoint steps (not written to metrics).
    #[serde(skip)]
    pub weights: Option<HashMap<String, Tensor>>,
}

impl RmTrainer {
    pub fn new(model: ScalarModel, vars: VarMap, loss: RmLoss, settings: OptimSettings) -> Result<Self, ActorError> {
        let device = model.device().clone();
        Ok(Self {
            model,
            optim: Optimizer::new(vars, settings)?,
            loss,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Copies of the current weights, HF names.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, ActorError> {
        self.optim.weights()
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
                return Err(ActorError::InvalidBatch(format!(
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
            let l = match self.loss {
                RmLoss::BradleyTerry => {
                    let ranks: Vec<Vec<usize>> = members.iter().map(|&i| examples[i].ranking.clone()).collect();
                    ranking_loss(&r, &ranks)?
                }
                RmLoss::BestOfK => {
                    let best: Vec<usize> = members.iter().map(|&i| examples[i].ranking[0]).collect();
                    best_of_k_loss(&r, &best)?
                }
            };
            let l = (l * (members.len() as f64 / n))?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let loss = total.ok_or_else(|| ActorError::InvalidBatch("empty reward-model batch".into()))?;
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
}

impl SupervisedTrainer for RmTrainer {
    type Example = Comparison;
    type Stats = RmStats;
    type Checkpoint = HashMap<String, Tensor>;
    type Report = RmReport;
    const WHAT: &'static str = "reward-model";

    fn steps(&self) -> usize {
        self.optim.steps()
    }

    /// A non-finite loss or gradient skips the update.
    fn step(&mut self, examples: &[Comparison]) -> Result<(RmStats, f64, f64), ActorError> {
        let scores = self.forward(examples)?;
        let (loss, stats) = self.loss(examples, &scores)?;
        let (lr, norm) = self.optim.step(&loss, stats.loss, Self::WHAT)?;
        Ok((stats, lr, norm))
    }

    /// Statistics over `examples` in batches of `batch_size`, without updating.
    fn evaluate(&self, examples: &[Comparison], batch_size: usize) -> Result<RmStats, ActorError> {
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

    fn checkpoint(&self) -> Result<HashMap<String, Tensor>, ActorError> {
        self.weights()
    }

    fn examples(stats: &RmStats) -> usize {
        stats.examples
    }

    fn record(stats: &RmStats, eval: Option<&RmStats>) {
        metrics::gauge!("tandem_rm_loss").set(stats.loss);
        if let Some(e) = eval {
            metrics::gauge!("tandem_rm_eval_accuracy").set(e.accuracy);
        }
    }

    fn report(
        i: StepInfo,
        stats: RmStats,
        eval: Option<RmStats>,
        weights: Option<HashMap<String, Tensor>>,
    ) -> RmReport {
        RmReport {
            step: i.step,
            epoch: i.epoch,
            lr: i.lr,
            grad_norm: i.grad_norm,
            loss: stats.loss,
            accuracy: stats.accuracy,
            top1: stats.top1,
            examples: stats.examples,
            eval_loss: eval.map(|e| e.loss),
            eval_accuracy: eval.map(|e| e.accuracy),
            eval_top1: eval.map(|e| e.top1),
            eval_score_mean: eval.map(|e| e.score_mean),
            load_wait_s: i.load_wait_s,
            learn_s: i.learn_s,
            eval_s: i.eval_s,
            wall_s: i.wall_s,
            weights,
        }
    }
}
