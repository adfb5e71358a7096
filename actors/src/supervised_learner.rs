//! The supervised learner actor, for fine-tuning and reward-model training alike: takes batches
//! from a bounded channel fed by the data loader, runs one [`SupervisedTrainer`] step per batch
//! on its device, evaluates on the held-out set every `eval_every` steps (and after the last
//! step), and reports every step.
//!
//! Back-pressure: the loader blocks on the full channel while the learner computes, so at most
//! `capacity` batches wait in memory. The learner stops when the channel closes (the loader has
//! issued every batch) or when the report receiver is gone. At checkpoint steps the report
//! carries what the trainer's checkpoint needs, which the runtime writes to disk off the device
//! thread. Errors from the model (a bad batch, a device failure) fail the actor with their
//! message. See `docs/semantics.md` for what blocks and what restarts.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::channel::StageReceiver;
use crate::device::Executor;
use crate::error::ActorError;
use crate::meter::{ActorMeter, ActorState};
use crate::supervised_trainer::{Batch, StepInfo, SupervisedTrainer};

pub enum LearnerStep {
    /// Train on the next batch (self-sent).
    Next,
}

impl ractor::Message for LearnerStep {}

pub struct SupervisedLearnerArgs<T: SupervisedTrainer> {
    pub executor: Arc<Executor>,
    /// Shared so the runtime can read the final weights.
    pub trainer: Arc<Mutex<T>>,
    pub input: StageReceiver<Batch<T::Example>>,
    pub eval: Arc<Vec<T::Example>>,
    pub eval_batch_size: usize,
    /// Evaluate every N steps (0: only after the last).
    pub eval_every: usize,
    /// Attach the checkpoint every N steps (0: never), except after the last step.
    pub checkpoint_every: usize,
    /// Total steps of the run (the last one is always evaluated).
    pub total_steps: usize,
    /// Wall seconds already spent before a resume.
    pub wall_offset_s: f64,
    pub reports: tokio::sync::mpsc::Sender<T::Report>,
    pub meter: Arc<ActorMeter>,
}

pub struct SupervisedLearnerState<T: SupervisedTrainer> {
    args: SupervisedLearnerArgs<T>,
    started: Instant,
}

pub struct SupervisedLearnerActor<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for SupervisedLearnerActor<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T: SupervisedTrainer> Actor for SupervisedLearnerActor<T> {
    type Msg = LearnerStep;
    type State = SupervisedLearnerState<T>;
    type Arguments = SupervisedLearnerArgs<T>;

    async fn pre_start(
        &self,
        me: ActorRef<LearnerStep>,
        args: SupervisedLearnerArgs<T>,
    ) -> Result<SupervisedLearnerState<T>, ActorProcessingErr> {
        me.cast(LearnerStep::Next)?;
        Ok(SupervisedLearnerState {
            args,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<LearnerStep>,
        _msg: LearnerStep,
        st: &mut SupervisedLearnerState<T>,
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
                let mut t = trainer.lock().map_err(|_| ActorError::Poisoned(T::WHAT))?;
                let step = t.steps();
                let learn = Instant::now();
                let (stats, lr, norm) = t.step(&batch.examples)?;
                let learn_s = learn.elapsed().as_secs_f64();
                let done = step + 1;
                let evaluate = (every > 0 && done.is_multiple_of(every)) || done == total;
                let e = Instant::now();
                let ev = if evaluate && !eval.is_empty() {
                    Some(t.evaluate(&eval, eval_bs)?)
                } else {
                    None
                };
                let eval_s = e.elapsed().as_secs_f64();
                let checkpoint = ckpt_every > 0 && done.is_multiple_of(ckpt_every) && done < total;
                let ckpt = if checkpoint { Some(t.checkpoint()?) } else { None };
                Ok((step, batch.epoch, stats, lr, norm, ev, ckpt, learn_s, eval_s))
            })
            .await?;
        let (step, epoch, stats, lr, grad_norm, ev, ckpt, learn_s, eval_s) = out?;
        st.args.meter.busy(took);
        st.args.meter.items(T::examples(&stats) as u64);
        st.args.meter.set_state(ActorState::Idle);
        T::record(&stats, ev.as_ref());
        let info = StepInfo {
            step,
            epoch,
            lr,
            grad_norm,
            load_wait_s: load_wait.as_secs_f64(),
            learn_s,
            eval_s,
            wall_s: st.args.wall_offset_s + st.started.elapsed().as_secs_f64(),
        };
        if st.args.reports.send(T::report(info, stats, ev, ckpt)).await.is_err() {
            me.stop(Some("report receiver gone".into()));
            return Ok(());
        }
        me.cast(LearnerStep::Next)?;
        Ok(())
    }
}
