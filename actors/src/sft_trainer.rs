//! Supervised fine-tuning arithmetic: next-token cross-entropy of a [`LanguageModel`] on the
//! completion (or assistant) tokens only, stepped with AdamW on a warm-up + decay schedule.
//! Synchronous; the [`crate::supervised_learner`] actor runs it on a device executor.
//!
//! An [`SftExample`] is one token sequence with a per-token `target` flag: token `i` counts in
//! the loss (as the prediction from tokens `..i`) exactly when `target[i]` is set, so prompt,
//! system and user tokens are context and never a target. A batch is right-padded to its
//! longest row (the data loader groups rows of similar length, so padding is small); padding
//! is masked out of attention and of the loss. The loss is the mean negative log-likelihood
//! over every target token of the batch (a token mean, as TRL's `SFTTrainer` and
//! `DataCollatorForCompletionOnlyLM` compute it), and the optimiser step uses it as is.
//!
//! Gradients flow only from target positions: a masked position's log-prob is multiplied by a
//! zero before the sum, so its derivative is exactly zero (see the tests).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;
use tandem_models::rl::masked::masked_sum;
use tandem_models::{LanguageModel, ModelConfig};

use crate::error::ActorError;
use crate::supervised_trainer::{OptimSettings, Optimizer, StepInfo, SupervisedTrainer, TrainState};

/// One training sequence and which of its tokens are targets.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    /// `target[i]`: token `i` is predicted in the loss. Same length as `ids`; `target[0]` is
    /// never used (nothing predicts the first token).
    pub target: Vec<bool>,
}

impl SftExample {
    /// Tokens that count in the loss.
    pub fn target_tokens(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// What one step or one evaluation measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SftStats {
    /// Mean negative log-likelihood per target token.
    pub loss: f64,
    /// Target tokens.
    pub tokens: usize,
    /// Tokens in the batch, padding excluded.
    pub real_tokens: usize,
    /// Tokens in the padded batch (rows x width).
    pub padded_tokens: usize,
    pub examples: usize,
}

pub struct SftTrainer {
    model: LanguageModel,
    optim: Optimizer,
    device: Device,
}

/// One line of an SFT run's metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct SftReport {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// Mean NLL per target token of the training batch, before the update.
    pub loss: f64,
    pub tokens: usize,
    pub examples: usize,
    /// Real tokens over padded tokens of the batch (1 = no padding).
    pub fill: f64,
    /// Held-out loss after this step's update, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_tokens: Option<usize>,
    /// Seconds waiting for the batch, computing the step, and evaluating.
    pub load_wait_s: f64,
    pub learn_s: f64,
    pub eval_s: f64,
    pub wall_s: f64,
    /// Training state after this step, at checkpoint steps (not written to metrics).
    #[serde(skip)]
    pub state: Option<Arc<TrainState>>,
}

/// Padded ids, attention mask and loss mask (b, t - 1) of `examples`.
pub struct SftInputs {
    pub ids: Tensor,
    pub mask: Tensor,
    pub loss_mask: Tensor,
    pub stats: SftStats,
}

/// Right-pads `examples` with `pad_id` into model inputs; the loss mask's column `j` marks
/// whether token `j + 1` is a target (matching `token_logprobs(.., start = 0, ..)`).
pub fn sft_inputs(examples: &[SftExample], pad_id: u32, device: &Device) -> Result<SftInputs, ActorError> {
    if examples.is_empty() {
        return Err(ActorError::InvalidBatch("empty SFT batch".into()));
    }
    let width = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if width < 2 {
        return Err(ActorError::InvalidBatch("SFT rows need at least 2 tokens".into()));
    }
    let b = examples.len();
    let (mut ids, mut mask, mut lmask) = (
        Vec::with_capacity(b * width),
        Vec::with_capacity(b * width),
        Vec::with_capacity(b * (width - 1)),
    );
    let mut stats = SftStats {
        padded_tokens: b * width,
        examples: b,
        ..Default::default()
    };
    for (i, e) in examples.iter().enumerate() {
        if e.ids.len() != e.target.len() {
            return Err(ActorError::InvalidBatch(format!(
                "example {i}: {} ids but {} target flags",
                e.ids.len(),
                e.target.len()
            )));
        }
        let n = e.ids.len();
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, width - n));
        mask.extend(std::iter::repeat_n(1f32, n));
        mask.extend(std::iter::repeat_n(0f32, width - n));
        lmask.extend((1..width).map(|j| if j < n && e.target[j] { 1f32 } else { 0.0 }));
        stats.tokens += e.target_tokens();
        stats.real_tokens += n;
    }
    if stats.tokens == 0 {
        return Err(ActorError::InvalidBatch("SFT batch has no target tokens".into()));
    }
    Ok(SftInputs {
        ids: Tensor::from_vec(ids, (b, width), device)?,
        mask: Tensor::from_vec(mask, (b, width), device)?,
        loss_mask: Tensor::from_vec(lmask, (b, width - 1), device)?,
        stats,
    })
}

/// Mean negative log-likelihood over the masked-in positions: `-sum(m * logp) / sum(m)`.
/// Differentiable in `token_logp`; zero derivative wherever `m = 0`.
pub fn sft_loss(token_logp: &Tensor, loss_mask: &Tensor) -> Result<Tensor, ActorError> {
    let n = loss_mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if n <= 0.0 {
        return Err(ActorError::InvalidBatch("SFT loss over no target tokens".into()));
    }
    Ok(masked_sum(token_logp, loss_mask)?.affine(-1.0 / n, 0.0)?)
}

impl SftTrainer {
    pub fn new(model: LanguageModel, vars: VarMap, settings: OptimSettings) -> Result<Self, ActorError> {
        let device = model.device().clone();
        Ok(Self {
            model,
            optim: Optimizer::new(vars, settings)?,
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

    /// The weights, optimiser moments and step counters.
    pub fn state(&self) -> Result<TrainState, ActorError> {
        self.optim.state()
    }

    /// Restores the optimiser and step counter of a checkpoint (the weights come in through
    /// the model's initialisation).
    pub fn restore(
        &mut self,
        optimizer: &HashMap<String, Tensor>,
        optimizer_steps: usize,
        step: usize,
    ) -> Result<(), ActorError> {
        self.optim.restore(optimizer, optimizer_steps, step)
    }

    /// Loss (a differentiable scalar) and statistics of `examples`.
    pub fn loss(&self, examples: &[SftExample]) -> Result<(Tensor, SftStats), ActorError> {
        let x = sft_inputs(examples, self.model.config().pad_id(), &self.device)?;
        let out = self.model.token_logprobs(&x.ids, &x.mask, 0, 1.0)?;
        let loss = sft_loss(&out.logprobs, &x.loss_mask)?;
        let mut stats = x.stats;
        stats.loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((loss, stats))
    }
}

impl SupervisedTrainer for SftTrainer {
    type Example = SftExample;
    type Stats = SftStats;
    type Checkpoint = Arc<TrainState>;
    type Report = SftReport;
    const WHAT: &'static str = "SFT";

    fn steps(&self) -> usize {
        self.optim.steps()
    }

    /// A non-finite loss or gradient skips the update.
    fn step(&mut self, examples: &[SftExample]) -> Result<(SftStats, f64, f64), ActorError> {
        let (loss, stats) = self.loss(examples)?;
        let (lr, norm) = self.optim.step(&loss, stats.loss, Self::WHAT)?;
        Ok((stats, lr, norm))
    }

    /// Token-weighted mean loss over `examples` in batches of `batch_size`, without updating.
    fn evaluate(&self, examples: &[SftExample], batch_size: usize) -> Result<SftStats, ActorError> {
        let mut acc = SftStats::default();
        let mut nll = 0.0;
        for chunk in examples.chunks(batch_size.max(1)) {
            let (_, s) = self.loss(chunk)?;
            nll += s.loss * s.tokens as f64;
            acc.tokens += s.tokens;
            acc.real_tokens += s.real_tokens;
            acc.padded_tokens += s.padded_tokens;
            acc.examples += s.examples;
        }
        acc.loss = nll / acc.tokens.max(1) as f64;
        Ok(acc)
    }

    fn checkpoint(&self) -> Result<Arc<TrainState>, ActorError> {
        Ok(Arc::new(self.state()?))
    }

    fn examples(stats: &SftStats) -> usize {
        stats.examples
    }

    fn record(stats: &SftStats, eval: Option<&SftStats>) {
        metrics::gauge!("tandem_sft_loss").set(stats.loss);
        if let Some(e) = eval {
            metrics::gauge!("tandem_sft_eval_loss").set(e.loss);
        }
    }

    fn report(i: StepInfo, stats: SftStats, eval: Option<SftStats>, state: Option<Arc<TrainState>>) -> SftReport {
        SftReport {
            step: i.step,
            epoch: i.epoch,
            lr: i.lr,
            grad_norm: i.grad_norm,
            loss: stats.loss,
            tokens: stats.tokens,
            examples: stats.examples,
            fill: stats.real_tokens as f64 / stats.padded_tokens.max(1) as f64,
            eval_loss: eval.map(|e| e.loss),
            eval_tokens: eval.map(|e| e.tokens),
            load_wait_s: i.load_wait_s,
            learn_s: i.learn_s,
            eval_s: i.eval_s,
            wall_s: i.wall_s,
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use tandem_models::rl::LrSchedule;
    use tandem_models::WeightInit;

    fn trainer() -> SftTrainer {
        let cfg = ModelConfig::gpt2(32, 16, 1, 2, 32);
        let (model, vars) = LanguageModel::trainable(&cfg, WeightInit::Random { seed: 5 }, &Device::Cpu).unwrap();
        let schedule = LrSchedule {
            peak_lr: 1e-2,
            warmup_steps: 0,
            total_steps: 40,
            decay: Default::default(),
            min_lr: 0.0,
        };
        SftTrainer::new(
            model,
            vars,
            OptimSettings {
                schedule,
                weight_decay: 0.0,
                max_grad_norm: 0.0,
            },
        )
        .unwrap()
    }

    fn grads_of(t: &SftTrainer, examples: &[SftExample]) -> Vec<(String, Vec<f32>)> {
        let (loss, _) = t.loss(examples).unwrap();
        let g = loss.backward().unwrap();
        let data = t.optim.vars().data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let v = g.get(data[n].as_tensor()).unwrap().flatten_all().unwrap();
                (n.clone(), v.to_vec1::<f32>().unwrap())
            })
            .collect()
    }

    #[test]
    fn masked_positions_get_exactly_zero_gradient() {
        let logp = Var::new(&[[-1.0f32, -2.0, -3.0], [-0.5, -0.25, -4.0]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[0f32, 1.0, 1.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let loss = sft_loss(logp.as_tensor(), &m).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - (2.0 + 3.0 + 0.5) / 3.0).abs() < 1e-6);
        let g = loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let third = -1.0 / 3.0;
        assert_eq!(g, vec![vec![0.0, third, third], vec![third, 0.0, 0.0]]);
    }

    #[test]
    fn tokens_after_the_completion_that_are_not_targets_change_no_gradient() {
        // Causal attention: a token after the last target is seen by no target position, and as
        // a non-target it is not predicted either; so the gradients must be the same. Not to the
        // bit: the products run over more rows (the extra ones contribute exact zeros), and the
        // GEMM's kernels for a different row count may add in a different order, so they agree
        // to f32 rounding (about 1e-7 relative here), far below any real leak through the mask.
        let t = trainer();
        let base = SftExample {
            ids: vec![3, 4, 5, 6, 7],
            target: vec![false, false, false, true, true],
        };
        let mut extended = base.clone();
        extended.ids.extend([9, 10, 11]);
        extended.target.extend([false, false, false]);
        let a = grads_of(&t, std::slice::from_ref(&base));
        let b = grads_of(&t, std::slice::from_ref(&extended));
        // The largest difference of each parameter's gradient, relative to its largest entry.
        let rel_diff = |a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]| -> f32 {
            a.iter()
                .zip(b)
                .map(|((na, x), (nb, y))| {
                    assert_eq!(na, nb);
                    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                    x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max) / scale
                })
                .fold(0f32, f32::max)
        };
        let same = rel_diff(&a, &b);
        assert!(same < 1e-5, "gradients differ by {same:e} (relative)");
        // Making the prompt's last token a target does change the gradient (the test can fail).
        let mut more = base.clone();
        more.target[2] = true;
        let changed = rel_diff(&a, &grads_of(&t, &[more]));
        assert!(changed > 1e-2, "a new target changed the gradients by only {changed:e}");
    }

    #[test]
    fn loss_falls_when_a_completion_is_repeated() {
        let mut t = trainer();
        let ex = vec![SftExample {
            ids: vec![1, 2, 3, 4, 5, 6],
            target: vec![false, false, false, true, true, true],
        }];
        let first = t.step(&ex).unwrap().0.loss;
        for _ in 0..29 {
            t.step(&ex).unwrap();
        }
        let last = t.evaluate(&ex, 4).unwrap().loss;
        assert!(last < first * 0.5, "loss {first} -> {last}");
        assert_eq!(t.steps(), 30);
    }
}
