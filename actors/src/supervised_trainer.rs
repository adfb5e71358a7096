//! What supervised fine-tuning and reward-model training share: a batch of examples from the
//! data loader, the optimiser core (AdamW on a warm-up + decay schedule with global-norm
//! clipping), and the [`SupervisedTrainer`] trait through which the one
//! [`crate::supervised_learner`] actor drives either. Each trainer supplies only its loss, its
//! statistics and its metrics line. Synchronous; the learner runs it on a device executor.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use tandem_models::adamw::ParamsAdamW;
use tandem_models::rl::{clip_scale, global_grad_norm, LrSchedule};
use tandem_models::{snapshot, AdamW};

use crate::error::ActorError;

/// A training batch from the data loader.
#[derive(Debug, Clone)]
pub struct Batch<E> {
    /// 0-based epoch the batch belongs to.
    pub epoch: usize,
    pub examples: Vec<E>,
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimSettings {
    pub schedule: LrSchedule,
    pub weight_decay: f64,
    /// Global gradient-norm clip; `<= 0` disables it.
    pub max_grad_norm: f64,
}

/// Everything a checkpoint needs to continue training exactly.
#[derive(Debug)]
pub struct TrainState {
    pub weights: HashMap<String, Tensor>,
    /// AdamW moments as `m/NAME`, `v/NAME`.
    pub optimizer: HashMap<String, Tensor>,
    pub optimizer_steps: usize,
    pub step: usize,
}

/// The trainable variables, their AdamW and the step counter.
pub struct Optimizer {
    vars: VarMap,
    opt: AdamW,
    settings: OptimSettings,
    step: usize,
}

impl Optimizer {
    pub fn new(vars: VarMap, settings: OptimSettings) -> Result<Self, ActorError> {
        settings.schedule.validate()?;
        let opt = AdamW::from_varmap(
            &vars,
            ParamsAdamW {
                lr: settings.schedule.lr_at(0),
                weight_decay: settings.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            vars,
            opt,
            settings,
            step: 0,
        })
    }

    /// Optimiser steps taken (including resumed ones).
    pub fn steps(&self) -> usize {
        self.step
    }

    #[cfg(test)]
    pub(crate) fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// Copies of the current weights, HF names.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, ActorError> {
        Ok(snapshot(&self.vars)?)
    }

    /// The weights, optimiser moments and step counters.
    pub fn state(&self) -> Result<TrainState, ActorError> {
        let (optimizer_steps, optimizer) = self.opt.state()?;
        Ok(TrainState {
            weights: self.weights()?,
            optimizer,
            optimizer_steps,
            step: self.step,
        })
    }

    /// Restores the optimiser and step counter of a checkpoint (the weights come in through
    /// the model's initialisation).
    pub fn restore(
        &mut self,
        optimizer: &HashMap<String, Tensor>,
        optimizer_steps: usize,
        step: usize,
    ) -> Result<(), ActorError> {
        self.opt.load_state(optimizer_steps, optimizer)?;
        self.step = step;
        Ok(())
    }

    /// One update from `loss` (whose host value is `loss_value`); returns the learning rate and
    /// the gradient norm before clipping. A non-finite loss or gradient norm skips the update
    /// (the norm is then NaN or the non-finite norm).
    pub fn step(&mut self, loss: &Tensor, loss_value: f64, what: &str) -> Result<(f64, f64), ActorError> {
        let lr = self.settings.schedule.lr_at(self.step);
        self.step += 1;
        if !loss_value.is_finite() {
            tracing::warn!(step = self.step, "non-finite {what} loss; update skipped");
            return Ok((lr, f64::NAN));
        }
        let grads = loss.backward()?;
        // In name order: the gradient norm sums per-tensor norms, and a HashMap's order would
        // change the rounding from run to run (and break bit-exact resume).
        let vars: Vec<Var> = {
            let data = self.vars.data().lock().expect("varmap lock");
            let mut named: Vec<(&String, &Var)> = data.iter().collect();
            named.sort_by(|a, b| a.0.cmp(b.0));
            named.into_iter().map(|(_, v)| v.clone()).collect()
        };
        let max = if self.settings.max_grad_norm > 0.0 {
            self.settings.max_grad_norm
        } else {
            f64::INFINITY
        };
        let norm = global_grad_norm(&vars, &grads)?;
        if norm.is_finite() {
            self.opt.set_learning_rate(lr);
            self.opt.step_scaled(&grads, clip_scale(norm, max)?)?;
        }
        Ok((lr, norm))
    }
}

/// The seconds and counters of one learner step, common to every metrics line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// Seconds waiting for the batch, computing the step, evaluating, and since the start
    /// (including the time before a resume).
    pub load_wait_s: f64,
    pub learn_s: f64,
    pub eval_s: f64,
    pub wall_s: f64,
}

/// A supervised objective the [`crate::supervised_learner`] actor can train.
pub trait SupervisedTrainer: Send + 'static {
    type Example: Clone + Send + Sync + 'static;
    /// What one step or one evaluation measured.
    type Stats: Copy + Send + 'static;
    /// What a checkpoint step carries to the runtime.
    type Checkpoint: Send + 'static;
    /// One metrics line.
    type Report: Send + 'static;
    /// Names the trainer in messages.
    const WHAT: &'static str;

    /// Optimiser steps taken (including resumed ones).
    fn steps(&self) -> usize;
    /// One optimiser step; the batch statistics (before the update), the learning rate and the
    /// gradient norm before clipping.
    fn step(&mut self, examples: &[Self::Example]) -> Result<(Self::Stats, f64, f64), ActorError>;
    /// Statistics over `examples` in batches of `batch_size`, without updating.
    fn evaluate(&self, examples: &[Self::Example], batch_size: usize) -> Result<Self::Stats, ActorError>;
    /// What a checkpoint needs, taken after the step.
    fn checkpoint(&self) -> Result<Self::Checkpoint, ActorError>;
    /// Examples a step's statistics cover (the meter's work items).
    fn examples(stats: &Self::Stats) -> usize;
    /// Sets the trainer's gauges from a step's statistics and evaluation.
    fn record(stats: &Self::Stats, eval: Option<&Self::Stats>);
    /// The metrics line of a step.
    fn report(
        info: StepInfo,
        stats: Self::Stats,
        eval: Option<Self::Stats>,
        checkpoint: Option<Self::Checkpoint>,
    ) -> Self::Report;
}
