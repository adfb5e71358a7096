//! The learner actor: asks the replay buffer for a batch, runs one PPO step on its device,
//! publishes the new weights and reports the step.
//!
//! Versions: the learner trains version k on step k (the weights after k steps) and then
//! publishes version k + 1 every `publish_every` steps, and always after the last step. In
//! sync mode with `publish_every = 1` samplers wait for exactly the weights the previous step
//! produced; with `publish_every = M` they sample steps up to M - 1 past the newest published
//! version, so the learner sees staleness up to M - 1 in sync mode (reported, and corrected by
//! the decoupled PPO weight like any stale data). The step's report carries the losses,
//! the staleness of the batch, the seconds each stage spent on it and the time spent copying
//! and handing out weights.
//!
//! Trajectory store: with a `store` sender, after each step the learner sends the step's
//! [`StepRecords`] (the trajectories it trained on with their per-token rewards, advantages and
//! returns, plus those the replay buffer dropped as stale) from the device thread, right after
//! the PPO step. The channel is bounded: if the store's writer falls behind, the learner's
//! device thread waits for room (bounded memory over an unbounded backlog). If the store is
//! gone (its writer failed: a full disk, say), the learner reports the step and then stops the
//! run with [`LearnerEvent::Halted`]: training never goes on while trajectories are lost.
//!
//! Checkpoints: at the start of step k the learner's state is exactly "after k steps", so that
//! is where checkpoints are taken: every `checkpoint_every` steps (step 0 included), after the
//! last step, and when the run asks it to stop (the `stop` flag; the replay buffer is drained so
//! a learner waiting for data wakes up). The learner sends [`LearnerEvent::Checkpoint`] on the
//! same channel as its reports — so every report before it is written first — and waits until
//! the runtime has written it. The batch in hand during a step is kept in `in_hand`, so if the
//! learner fails mid-step a checkpoint can put it back with the buffered trajectories.
//!
//! Non-finite steps: a step in which any minibatch was skipped for a NaN or infinite loss or
//! gradient counts toward `nonfinite_streak`; no checkpoint is taken while the streak lasts (so
//! the last one is from before its first step), and after `max_nonfinite_steps` such steps in
//! a row the learner stops the run with [`LearnerEvent::Halted`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

use crate::device::Executor;
use crate::error::ActorError;
use crate::faults::Faults;
use crate::meter::{ActorMeter, ActorState};
use crate::nan_fields::{nan, nan_if_null};
use crate::ppo_trainer::{PpoTrainer, StepStats};
use crate::replay::ReplayMsg;
use crate::snapshot::{AdoptLatencies, SnapshotMsg};
use crate::trajectory::{StepRecords, Trajectory, WeightsSnapshot};

/// One line of metrics.jsonl: the file's one schema, written here and read back through
/// [`StepReport::from_line`] (see [`crate::metrics_line`] for how missing and null fields read).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    /// The version that was trained (the published one is `policy_version + 1`).
    #[serde(default)]
    pub policy_version: u64,
    #[serde(flatten)]
    pub stats: StepStats,
    /// Staleness of the trajectories (the version of their oldest token).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub staleness_mean: f64,
    #[serde(default)]
    pub staleness_max: u64,
    /// Staleness per response token (by the version that sampled it; see
    /// [`Trajectory::token_versions`]).
    #[serde(flatten)]
    pub token_staleness: TokenStaleness,
    #[serde(default)]
    pub dropped_stale: u64,
    #[serde(default)]
    pub tokens_generated: usize,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub generate_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub reward_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub value_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub learn_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub weight_sync_s: f64,
    /// Worst publish-to-adopt latency of the previous published version.
    #[serde(default)]
    pub adopt_latency_s: Option<f64>,
    #[serde(default)]
    pub replay_buffered: usize,
    /// Seconds the learner waited for this step's batch (near 0 when sampling keeps ahead).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub learner_wait_s: f64,
    /// Steps in a row (this one included) with a non-finite loss or gradient.
    #[serde(default)]
    pub nonfinite_streak: u64,
    /// Seconds spent writing the checkpoint taken before this step (0 without one).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub checkpoint_s: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub wall_s: f64,
    /// The programmatic score of the mock-labeller experiment, added to the line by its step
    /// probe (absent otherwise; the learner leaves it `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_score_mean: Option<f64>,
    /// The held-out evaluation of this step's published weights (a run's `[eval]`; absent on
    /// the steps it does not evaluate; the learner leaves it empty).
    #[serde(flatten)]
    pub eval: HeldOutEval,
}

/// Greedy held-out measures of one policy version, as `tandem eval` reports them (the names
/// carry an `eval_` prefix in `metrics.jsonl`). Each is absent when not measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutEval {
    /// Mean reward-source score of the responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_score_mean: Option<f64>,
    /// Fraction of responses scoring `reward.match_score` (exact-match and regex sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// Response tokens, the stop token included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_mean_length: Option<f64>,
    /// Responses that reached `max_new_tokens` without a stop token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_no_stop_fraction: Option<f64>,
}

/// How many versions behind the trained one the batch's tokens were sampled, token-weighted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenStaleness {
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub token_staleness_mean: f64,
    #[serde(default)]
    pub token_staleness_max: u64,
    /// Fraction of response tokens sampled by an older version than the trained one.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub off_policy_token_frac: f64,
}

impl TokenStaleness {
    /// Of `batch`, trained at `version`.
    pub fn of(batch: &[Trajectory], version: u64) -> Self {
        let (mut sum, mut max, mut off, mut n) = (0u64, 0u64, 0u64, 0u64);
        for t in batch {
            for v in t.versions() {
                let s = version - v.min(version);
                sum += s;
                max = max.max(s);
                off += u64::from(s > 0);
                n += 1;
            }
        }
        let n = n.max(1) as f64;
        Self {
            token_staleness_mean: sum as f64 / n,
            token_staleness_max: max,
            off_policy_token_frac: off as f64 / n,
        }
    }
}

/// What the learner tells the runtime, in order.
pub enum LearnerEvent {
    Report(Box<StepReport>),
    /// Write a checkpoint of the state before `step`; the learner waits for the answer.
    Checkpoint {
        step: u64,
        /// The version of the learner's weights (`step`); a resumed run publishes them as such.
        version: u64,
        wall_s: f64,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// The learner stopped the run on purpose; the message says why.
    Halted(String),
}

pub enum LearnerMsg {
    Step,
}

// Local only: never sent to another node.
impl ractor::Message for LearnerMsg {}

/// Where a learner starts (step 0, or a checkpoint's counters).
#[derive(Debug, Clone, Copy, Default)]
pub struct LearnerStart {
    pub step: u64,
    pub version: u64,
    pub wall_s: f64,
    /// Whether a checkpoint of `step` already exists (a resumed run).
    pub checkpointed: bool,
}

pub struct LearnerArgs {
    pub executor: Arc<Executor>,
    /// Shared so the runtime can save the final weights after the run.
    pub trainer: Arc<Mutex<PpoTrainer>>,
    pub replay: ActorRef<ReplayMsg>,
    pub snapshot: ActorRef<SnapshotMsg>,
    /// The snapshot's record of adoption latencies, read into each step's report.
    pub adopt_latency: AdoptLatencies,
    pub steps: u64,
    pub publish_every: u64,
    /// Reports and checkpoint requests, in order. The learner stops when the receiver is gone.
    pub events: tokio::sync::mpsc::Sender<LearnerEvent>,
    pub start: LearnerStart,
    /// Checkpoint every this many steps (0: only at the end and when stopped).
    pub checkpoint_every: u64,
    /// Set by the runtime to stop at the next step boundary (with a checkpoint).
    pub stop: Arc<AtomicBool>,
    /// The batch of the step in progress (see the module docs).
    pub in_hand: Arc<Mutex<Vec<Trajectory>>>,
    /// Stop after this many non-finite steps in a row.
    pub max_nonfinite_steps: u64,
    pub faults: Arc<Faults>,
    /// A test hook: extra seconds of (simulated) work per step.
    pub extra_step_delay: Duration,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// Where each step's trajectories go to be stored (bounded; see the module docs).
    pub store: Option<crossbeam_channel::Sender<StepRecords>>,
}

pub struct LearnerState {
    args: LearnerArgs,
    step: u64,
    version: u64,
    started: Instant,
    last_checkpoint: Option<u64>,
    checkpoint_s: f64,
    nonfinite_streak: u64,
}

pub struct LearnerActor;

impl Actor for LearnerActor {
    type Msg = LearnerMsg;
    type State = LearnerState;
    type Arguments = LearnerArgs;

    async fn pre_start(
        &self,
        me: ActorRef<LearnerMsg>,
        mut args: LearnerArgs,
    ) -> Result<LearnerState, ActorProcessingErr> {
        me.cast(LearnerMsg::Step)?;
        args.publish_every = args.publish_every.max(1);
        let start = args.start;
        Ok(LearnerState {
            args,
            step: start.step,
            version: start.version,
            started: Instant::now() - Duration::from_secs_f64(start.wall_s),
            last_checkpoint: start.checkpointed.then_some(start.step),
            checkpoint_s: 0.0,
            nonfinite_streak: 0,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<LearnerMsg>,
        _msg: LearnerMsg,
        st: &mut LearnerState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        let finishing = st.step >= st.args.steps || st.args.stop.load(Ordering::Relaxed);
        let every = st.args.checkpoint_every;
        let periodic = every > 0 && st.step.is_multiple_of(every);
        if (finishing || periodic) && st.nonfinite_streak == 0 && st.last_checkpoint != Some(st.step) {
            self.checkpoint(st).await?;
        }
        if finishing {
            st.args.meter.set_state(ActorState::Stopped);
            me.stop(Some("done".into()));
            return Ok(());
        }
        let version = st.version;
        st.args.meter.set_state(ActorState::Idle);
        let asked = Instant::now();
        let batch = st
            .args
            .replay
            .call(|reply| ReplayMsg::NextBatch { version, reply }, None)
            .await?;
        let Some(batch) = batch.success_or(ActorError::PeerGone("replay stopped".into()))? else {
            if st.args.stop.load(Ordering::Relaxed) {
                // Drained to stop: take the final checkpoint at the top of the next step.
                me.cast(LearnerMsg::Step)?;
            } else {
                me.stop(Some("pipeline closed before the last step".into()));
            }
            return Ok(());
        };
        {
            let mut hand = st
                .args
                .in_hand
                .lock()
                .map_err(|_| ActorError::Poisoned("in-hand lock"))?;
            hand.clear();
            hand.extend(batch.trajectories.iter().cloned());
            hand.extend(batch.dropped.iter().cloned());
        }
        if let Some(msg) = st.args.faults.learner_failure(st.step) {
            return Err(msg.into());
        }
        let wait = asked.elapsed();
        st.args.meter.set_state(ActorState::Computing);
        let n = batch.trajectories.len().max(1);
        let staleness: Vec<u64> = batch
            .trajectories
            .iter()
            .map(|t| version - t.policy_version.min(version))
            .collect();
        let tokens: usize = batch.trajectories.iter().map(|t| t.response_ids.len()).sum();
        let token_staleness = TokenStaleness::of(&batch.trajectories, version);
        let step = st.step;
        let publish = (step + 1).is_multiple_of(st.args.publish_every) || step + 1 == st.args.steps;
        let trainer = st.args.trainer.clone();
        let delay = st.args.extra_step_delay;
        let trajectories = batch.trajectories;
        let dropped = batch.dropped;
        let store = st.args.store.clone();
        let (out, learn_took) = st
            .args
            .executor
            .run(move |_| -> Result<_, ActorError> {
                let mut t = trainer.lock().map_err(|_| ActorError::Poisoned("trainer"))?;
                let (stats, outputs) = t.step_with_outputs(&trajectories, version, step)?;
                let mut store_lost = false;
                if let Some(store) = store {
                    let used = trajectories.into_iter().zip(outputs).collect();
                    store_lost = store.send(StepRecords { step, used, dropped }).is_err();
                }
                std::thread::sleep(delay);
                let sync_start = Instant::now();
                let weights = if publish {
                    Some((t.policy_weights()?, t.critic_weights()?))
                } else {
                    None
                };
                Ok((stats, weights, sync_start.elapsed(), store_lost))
            })
            .await?;
        let (stats, weights, copy_took, store_lost) = out?;
        if stats.skipped_updates > 0 {
            st.nonfinite_streak += 1;
            tracing::warn!(
                step,
                skipped = stats.skipped_updates,
                "non-finite loss or gradient; updates skipped"
            );
        } else {
            st.nonfinite_streak = 0;
        }
        st.args.meter.busy(learn_took);
        st.args.meter.items(1);
        st.args.meter.set_state(ActorState::Idle);
        let sync_start = Instant::now();
        // The weights now hold this step's update, published or not.
        st.version += 1;
        if let Some((policy, critic)) = weights {
            let now = Instant::now();
            let wrap = |tensors| {
                Arc::new(WeightsSnapshot {
                    version: st.version,
                    tensors,
                    published_at: now,
                })
            };
            st.args.snapshot.cast(SnapshotMsg::Publish {
                policy: wrap(policy),
                critic: critic.map(wrap),
            })?;
        }
        let adopt_latency_s = (version > 0).then(|| st.args.adopt_latency.worst(version)).flatten();
        metrics::counter!("tandem_learner_steps").increment(1);
        metrics::gauge!("tandem_learner_kl").set(stats.kl);
        metrics::gauge!("tandem_learner_beta").set(stats.beta);
        metrics::gauge!("tandem_learner_policy_loss").set(stats.policy_loss);
        metrics::gauge!("tandem_learner_value_loss").set(stats.value_loss);
        metrics::gauge!("tandem_learner_reward_mean").set(stats.reward_mean);
        metrics::gauge!("tandem_learner_token_staleness_mean").set(token_staleness.token_staleness_mean);
        metrics::gauge!("tandem_learner_token_staleness_max").set(token_staleness.token_staleness_max as f64);
        metrics::gauge!("tandem_learner_off_policy_token_frac").set(token_staleness.off_policy_token_frac);
        metrics::gauge!("tandem_learner_behaviour_ratio_mean").set(stats.behaviour_ratio_mean);
        metrics::gauge!("tandem_learner_behaviour_ratio_min").set(stats.behaviour_ratio_min);
        metrics::gauge!("tandem_learner_behaviour_ratio_max").set(stats.behaviour_ratio_max);
        metrics::gauge!("tandem_learner_behaviour_ratio_trunc_frac").set(stats.behaviour_ratio_trunc_frac);
        metrics::gauge!("tandem_learner_behaviour_mismatch_kl").set(stats.behaviour_mismatch_kl);
        let report = StepReport {
            step,
            policy_version: version,
            staleness_mean: staleness.iter().sum::<u64>() as f64 / n as f64,
            staleness_max: staleness.iter().copied().max().unwrap_or(0),
            token_staleness,
            dropped_stale: batch.dropped_stale,
            tokens_generated: tokens,
            generate_s: batch.times.generate_s,
            reward_s: batch.times.reward_s,
            value_s: batch.times.value_s,
            learn_s: (learn_took - copy_took).as_secs_f64(),
            weight_sync_s: (copy_took + sync_start.elapsed()).as_secs_f64(),
            adopt_latency_s,
            replay_buffered: batch.buffered,
            learner_wait_s: wait.as_secs_f64(),
            nonfinite_streak: st.nonfinite_streak,
            checkpoint_s: std::mem::take(&mut st.checkpoint_s),
            wall_s: st.started.elapsed().as_secs_f64(),
            true_score_mean: None,
            eval: HeldOutEval::default(),
            stats,
        };
        st.step += 1;
        if st
            .args
            .events
            .send(LearnerEvent::Report(Box::new(report)))
            .await
            .is_err()
        {
            me.stop(Some("report receiver gone".into()));
            return Ok(());
        }
        st.args
            .in_hand
            .lock()
            .map_err(|_| ActorError::Poisoned("in-hand lock"))?
            .clear();
        if store_lost {
            let last = st.last_checkpoint.map_or("none".to_string(), |k| format!("step-{k}"));
            let msg = format!(
                "the trajectory store stopped writing (its error is above), so step {step}'s trajectories \
                 were not stored; stopping after step {step}. The last checkpoint is {last}"
            );
            let _ = st.args.events.send(LearnerEvent::Halted(msg)).await;
            st.args.meter.set_state(ActorState::Stopped);
            me.stop(Some("halted".into()));
            return Ok(());
        }
        if st.nonfinite_streak >= st.args.max_nonfinite_steps.max(1) {
            let last = st.last_checkpoint.map_or("none".to_string(), |k| format!("step-{k}"));
            let msg = format!(
                "{} learner steps in a row (steps {}..={}) had a non-finite loss or gradient; stopping. \
                 Their updates were skipped; the last checkpoint before them is {last}",
                st.nonfinite_streak,
                st.step - st.nonfinite_streak,
                st.step - 1
            );
            let _ = st.args.events.send(LearnerEvent::Halted(msg)).await;
            st.args.meter.set_state(ActorState::Stopped);
            me.stop(Some("halted".into()));
            return Ok(());
        }
        me.cast(LearnerMsg::Step)?;
        Ok(())
    }
}

impl LearnerActor {
    /// Asks the runtime to write a checkpoint of the state before `st.step` and waits for it.
    async fn checkpoint(&self, st: &mut LearnerState) -> Result<(), ActorProcessingErr> {
        let started = Instant::now();
        let (reply, done) = tokio::sync::oneshot::channel();
        let event = LearnerEvent::Checkpoint {
            step: st.step,
            version: st.version,
            wall_s: st.started.elapsed().as_secs_f64(),
            reply,
        };
        if st.args.events.send(event).await.is_err() {
            return Ok(());
        }
        match done.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("checkpoint before step {} failed: {e}", st.step).into()),
            Err(_) => return Ok(()),
        }
        st.last_checkpoint = Some(st.step);
        st.checkpoint_s = started.elapsed().as_secs_f64();
        Ok(())
    }
}
