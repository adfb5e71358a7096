//! The learner actor: asks the replay buffer for a batch, runs one PPO step on its device,
//! publishes the new weights and reports the step.
//!
//! Versions: the learner trains version k on step k and then publishes version k + 1 (every
//! `publish_every` steps, and always after the last step), so samplers in sync mode wait for
//! exactly the weights the previous step produced. The step's report carries the losses,
//! the staleness of the batch, the seconds each stage spent on it and the time spent copying
//! and handing out weights.
//!
//! Trajectory store: with a `store` sender, after each step the learner sends the step's
//! [`StepRecords`] (the trajectories it trained on with their per-token rewards, advantages and
//! returns, plus those the replay buffer dropped as stale) from the device thread, right after
//! the PPO step. The channel is bounded: if the store's writer falls behind, the learner's
//! device thread waits for room (bounded memory over an unbounded backlog). If the store is
//! gone, the records are discarded and training goes on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use crate::device::Executor;
use crate::error::ActorError;
use crate::meter::{ActorMeter, ActorState};
use crate::ppo_trainer::{PpoTrainer, StepStats};
use crate::replay::ReplayMsg;
use crate::snapshot::SnapshotMsg;
use crate::trajectory::{StepRecords, WeightsSnapshot};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: u64,
    /// The version that was trained (the published one is `policy_version + 1`).
    pub policy_version: u64,
    #[serde(flatten)]
    pub stats: StepStats,
    pub staleness_mean: f64,
    pub staleness_max: u64,
    pub dropped_stale: u64,
    pub tokens_generated: usize,
    pub generate_s: f64,
    pub reward_s: f64,
    pub value_s: f64,
    pub learn_s: f64,
    pub weight_sync_s: f64,
    /// Worst publish-to-adopt latency of the previous published version.
    pub adopt_latency_s: Option<f64>,
    pub replay_buffered: usize,
    /// Seconds the learner waited for this step's batch (near 0 when sampling keeps ahead).
    pub learner_wait_s: f64,
    pub wall_s: f64,
}

pub enum LearnerMsg {
    Step,
}

pub struct LearnerArgs {
    pub executor: Arc<Executor>,
    /// Shared so the runtime can save the final weights after the run.
    pub trainer: Arc<Mutex<PpoTrainer>>,
    pub replay: ActorRef<ReplayMsg>,
    pub snapshot: ActorRef<SnapshotMsg>,
    pub steps: u64,
    pub publish_every: u64,
    /// Step reports, in order. The learner stops when the receiver is gone.
    pub reports: tokio::sync::mpsc::Sender<StepReport>,
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
        Ok(LearnerState {
            args,
            step: 0,
            version: 0,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<LearnerMsg>,
        _msg: LearnerMsg,
        st: &mut LearnerState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        if st.step >= st.args.steps {
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
        let Some(batch) = batch.success_or(ActorError::Other("replay stopped".into()))? else {
            me.stop(Some("pipeline closed before the last step".into()));
            return Ok(());
        };
        let wait = asked.elapsed();
        st.args.meter.set_state(ActorState::Computing);
        let n = batch.trajectories.len().max(1);
        let staleness: Vec<u64> = batch
            .trajectories
            .iter()
            .map(|t| version - t.policy_version.min(version))
            .collect();
        let tokens: usize = batch.trajectories.iter().map(|t| t.response_ids.len()).sum();
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
                let mut t = trainer
                    .lock()
                    .map_err(|_| ActorError::Other("trainer poisoned".into()))?;
                let (stats, outputs) = t.step_with_outputs(&trajectories, version, step)?;
                if let Some(store) = store {
                    let used = trajectories.into_iter().zip(outputs).collect();
                    if store.send(StepRecords { step, used, dropped }).is_err() {
                        tracing::warn!(step, "trajectory store is gone; step not stored");
                    }
                }
                std::thread::sleep(delay);
                let sync_start = Instant::now();
                let weights = if publish {
                    Some((t.policy_weights()?, t.critic_weights()?))
                } else {
                    None
                };
                Ok((stats, weights, sync_start.elapsed()))
            })
            .await?;
        let (stats, weights, copy_took) = out?;
        st.args.meter.busy(learn_took);
        st.args.meter.items(1);
        st.args.meter.set_state(ActorState::Idle);
        let sync_start = Instant::now();
        if let Some((policy, critic)) = weights {
            st.version += 1;
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
        let adopt_latency_s = if version > 0 {
            st.args
                .snapshot
                .call(|reply| SnapshotMsg::AdoptLatency { version, reply }, None)
                .await?
                .success_or(ActorError::Other("snapshot stopped".into()))?
        } else {
            None
        };
        metrics::counter!("tandem_learner_steps").increment(1);
        metrics::gauge!("tandem_learner_kl").set(stats.kl);
        metrics::gauge!("tandem_learner_beta").set(stats.beta);
        metrics::gauge!("tandem_learner_policy_loss").set(stats.policy_loss);
        metrics::gauge!("tandem_learner_value_loss").set(stats.value_loss);
        metrics::gauge!("tandem_learner_reward_mean").set(stats.reward_mean);
        let report = StepReport {
            step,
            policy_version: version,
            staleness_mean: staleness.iter().sum::<u64>() as f64 / n as f64,
            staleness_max: staleness.iter().copied().max().unwrap_or(0),
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
            wall_s: st.started.elapsed().as_secs_f64(),
            stats,
        };
        st.step += 1;
        if st.args.reports.send(report).await.is_err() {
            me.stop(Some("report receiver gone".into()));
            return Ok(());
        }
        me.cast(LearnerMsg::Step)?;
        Ok(())
    }
}
