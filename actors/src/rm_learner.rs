//! The reward-model learner actor: takes comparison batches from a bounded channel fed by the
//! data loader, runs one [`RmTrainer`] step per batch on its device, evaluates on the held-out
//! set every `eval_every` steps (and after the last step), and reports every step.
//!
//! Back-pressure: the loader blocks on the full channel while the learner computes, so at most
//! `capacity` batches wait in memory. The learner stops when the channel closes (the loader
//! has issued every epoch) or when the report receiver is gone. At checkpoint steps the report
//! carries a copy of the weights, which the runtime writes to disk off the device thread.
//! Errors from the model (a bad batch, a device failure) fail the actor with their message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use crate::channel::StageReceiver;
use crate::device::Executor;
use crate::error::ActorError;
use crate::meter::{ActorMeter, ActorState};
use crate::rm_trainer::{Comparison, RmBatch, RmStats, RmTrainer};

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

pub enum RmLearnerMsg {
    /// Train on the next batch (self-sent).
    Step,
}

impl ractor::Message for RmLearnerMsg {}

pub struct RmLearnerArgs {
    pub executor: Arc<Executor>,
    /// Shared so the runtime can read the final weights.
    pub trainer: Arc<Mutex<RmTrainer>>,
    pub input: StageReceiver<RmBatch>,
    pub eval: Arc<Vec<Comparison>>,
    pub eval_batch_size: usize,
    /// Evaluate every N steps (0: only after the last).
    pub eval_every: usize,
    /// Attach weights every N steps (0: never).
    pub checkpoint_every: usize,
    /// Steps the loader will issue (the last one is always evaluated).
    pub total_steps: usize,
    pub reports: tokio::sync::mpsc::Sender<RmReport>,
    pub meter: Arc<ActorMeter>,
}

pub struct RmLearnerState {
    args: RmLearnerArgs,
    step: usize,
    started: Instant,
}

pub struct RmLearnerActor;

impl Actor for RmLearnerActor {
    type Msg = RmLearnerMsg;
    type State = RmLearnerState;
    type Arguments = RmLearnerArgs;

    async fn pre_start(
        &self,
        me: ActorRef<RmLearnerMsg>,
        args: RmLearnerArgs,
    ) -> Result<RmLearnerState, ActorProcessingErr> {
        me.cast(RmLearnerMsg::Step)?;
        Ok(RmLearnerState {
            args,
            step: 0,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<RmLearnerMsg>,
        _msg: RmLearnerMsg,
        st: &mut RmLearnerState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        st.args.meter.set_state(ActorState::Idle);
        let asked = Instant::now();
        let Some(batch) = st.args.input.recv().await else {
            st.args.meter.set_state(ActorState::Stopped);
            me.stop(Some("data loader finished".into()));
            return Ok(());
        };
        let load_wait = asked.elapsed();
        let step = st.step;
        let a = &st.args;
        let evaluate = (a.eval_every > 0 && (step + 1).is_multiple_of(a.eval_every)) || step + 1 == a.total_steps;
        let checkpoint =
            a.checkpoint_every > 0 && (step + 1).is_multiple_of(a.checkpoint_every) && step + 1 < a.total_steps;
        let trainer = a.trainer.clone();
        let eval = a.eval.clone();
        let eval_bs = a.eval_batch_size;
        st.args.meter.set_state(ActorState::Computing);
        let (out, took) = st
            .args
            .executor
            .run(move |_| -> Result<_, ActorError> {
                let mut t = trainer
                    .lock()
                    .map_err(|_| ActorError::Other("reward-model trainer poisoned".into()))?;
                let learn = Instant::now();
                let (stats, lr, norm) = t.step(&batch.examples)?;
                let learn_s = learn.elapsed().as_secs_f64();
                let e = Instant::now();
                let ev: Option<RmStats> = if evaluate && !eval.is_empty() {
                    Some(t.evaluate(&eval, eval_bs)?)
                } else {
                    None
                };
                let eval_s = e.elapsed().as_secs_f64();
                let weights = if checkpoint { Some(t.weights()?) } else { None };
                Ok((batch.epoch, stats, lr, norm, ev, weights, learn_s, eval_s))
            })
            .await?;
        let (epoch, stats, lr, grad_norm, ev, weights, learn_s, eval_s) = out?;
        st.args.meter.busy(took);
        st.args.meter.items(stats.examples as u64);
        st.args.meter.set_state(ActorState::Idle);
        metrics::gauge!("tandem_rm_loss").set(stats.loss);
        if let Some(e) = &ev {
            metrics::gauge!("tandem_rm_eval_accuracy").set(e.accuracy);
        }
        let report = RmReport {
            step,
            epoch,
            lr,
            grad_norm,
            loss: stats.loss,
            accuracy: stats.accuracy,
            top1: stats.top1,
            examples: stats.examples,
            eval_loss: ev.map(|e| e.loss),
            eval_accuracy: ev.map(|e| e.accuracy),
            eval_top1: ev.map(|e| e.top1),
            eval_score_mean: ev.map(|e| e.score_mean),
            load_wait_s: load_wait.as_secs_f64(),
            learn_s,
            eval_s,
            wall_s: st.started.elapsed().as_secs_f64(),
            weights,
        };
        st.step += 1;
        if st.args.reports.send(report).await.is_err() {
            me.stop(Some("report receiver gone".into()));
            return Ok(());
        }
        me.cast(RmLearnerMsg::Step)?;
        Ok(())
    }
}
