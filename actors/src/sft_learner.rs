//! The supervised fine-tuning learner actor: takes token batches from a bounded channel fed by
//! the data loader, runs one [`SftTrainer`] step per batch on its device, evaluates the
//! held-out loss every `eval_every` steps (and after the last step), and reports every step.
//!
//! Back-pressure: the loader blocks on the full channel while the learner computes, so at most
//! `capacity` batches wait in memory. The learner stops when the channel closes (the loader has
//! issued every batch) or when the report receiver is gone. At checkpoint steps the report
//! carries the full training state (weights, AdamW moments, counters), which the runtime writes
//! to disk off the device thread. Errors from the model fail the actor with their message.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use crate::channel::StageReceiver;
use crate::device::Executor;
use crate::error::ActorError;
use crate::meter::{ActorMeter, ActorState};
use crate::sft_trainer::{SftBatch, SftExample, SftState, SftStats, SftTrainer};

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
    pub state: Option<Arc<SftState>>,
}

pub enum SftLearnerMsg {
    /// Train on the next batch (self-sent).
    Step,
}

impl ractor::Message for SftLearnerMsg {}

pub struct SftLearnerArgs {
    pub executor: Arc<Executor>,
    /// Shared so the runtime can read the final weights.
    pub trainer: Arc<Mutex<SftTrainer>>,
    pub input: StageReceiver<SftBatch>,
    pub eval: Arc<Vec<SftExample>>,
    pub eval_batch_size: usize,
    /// Evaluate every N steps (0: only after the last).
    pub eval_every: usize,
    /// Attach the training state every N steps (0: never).
    pub checkpoint_every: usize,
    /// Total steps of the run (the last one is always evaluated).
    pub total_steps: usize,
    /// Wall seconds already spent before a resume.
    pub wall_offset_s: f64,
    pub reports: tokio::sync::mpsc::Sender<SftReport>,
    pub meter: Arc<ActorMeter>,
}

pub struct SftLearnerState {
    args: SftLearnerArgs,
    started: Instant,
}

pub struct SftLearnerActor;

impl Actor for SftLearnerActor {
    type Msg = SftLearnerMsg;
    type State = SftLearnerState;
    type Arguments = SftLearnerArgs;

    async fn pre_start(
        &self,
        me: ActorRef<SftLearnerMsg>,
        args: SftLearnerArgs,
    ) -> Result<SftLearnerState, ActorProcessingErr> {
        me.cast(SftLearnerMsg::Step)?;
        Ok(SftLearnerState {
            args,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SftLearnerMsg>,
        _msg: SftLearnerMsg,
        st: &mut SftLearnerState,
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
        let a = &st.args;
        let (every, ckpt_every, total) = (a.eval_every, a.checkpoint_every, a.total_steps);
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
                    .map_err(|_| ActorError::Other("SFT trainer poisoned".into()))?;
                let step = t.steps();
                let learn = Instant::now();
                let (stats, lr, norm) = t.step(&batch.examples)?;
                let learn_s = learn.elapsed().as_secs_f64();
                let done = step + 1;
                let evaluate = (every > 0 && done.is_multiple_of(every)) || done == total;
                let e = Instant::now();
                let ev: Option<SftStats> = if evaluate && !eval.is_empty() {
                    Some(t.evaluate(&eval, eval_bs)?)
                } else {
                    None
                };
                let eval_s = e.elapsed().as_secs_f64();
                let checkpoint = ckpt_every > 0 && done.is_multiple_of(ckpt_every) && done < total;
                let state = if checkpoint { Some(Arc::new(t.state()?)) } else { None };
                Ok((step, batch.epoch, stats, lr, norm, ev, state, learn_s, eval_s))
            })
            .await?;
        let (step, epoch, stats, lr, grad_norm, ev, state, learn_s, eval_s) = out?;
        st.args.meter.busy(took);
        st.args.meter.items(stats.examples as u64);
        st.args.meter.set_state(ActorState::Idle);
        metrics::gauge!("tandem_sft_loss").set(stats.loss);
        if let Some(e) = &ev {
            metrics::gauge!("tandem_sft_eval_loss").set(e.loss);
        }
        let report = SftReport {
            step,
            epoch,
            lr,
            grad_norm,
            loss: stats.loss,
            tokens: stats.tokens,
            examples: stats.examples,
            fill: stats.real_tokens as f64 / stats.padded_tokens.max(1) as f64,
            eval_loss: ev.map(|e| e.loss),
            eval_tokens: ev.map(|e| e.tokens),
            load_wait_s: load_wait.as_secs_f64(),
            learn_s,
            eval_s,
            wall_s: st.args.wall_offset_s + st.started.elapsed().as_secs_f64(),
            state,
        };
        if st.args.reports.send(report).await.is_err() {
            me.stop(Some("report receiver gone".into()));
            return Ok(());
        }
        me.cast(SftLearnerMsg::Step)?;
        Ok(())
    }
}
