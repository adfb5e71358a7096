//! The replay buffer actor: collects valued trajectories and forms learner batches.
//!
//! How this fits the runtime's ordering, blocking, dropping and restart rules: `docs/semantics.md`.
//!
//! A forwarding task pulls batches from the bounded channel of the value stage and hands each
//! one to the actor with a call that is only answered once the batch fits in the buffer of
//! `capacity` trajectories (a credit of one batch): when the buffer is full the forwarder
//! stops pulling, so the stages before it fill their channels and the samplers wait. The actor
//! itself never blocks on the channel, so a learner's request is answered as soon as the data
//! is there. The learner asks for a batch with the policy version it is
//! about to train ([`ReplayMsg::NextBatch`]); the buffer first drops — and counts — every
//! trajectory too stale for its [`StalePolicy`] (by default: whose oldest token was sampled
//! before `version - max_lag`), then answers with the `batch_size` oldest trajectories in
//! (ticket, row) order, or keeps the request until enough have arrived. That order makes a
//! sync-mode batch independent of which sampler finished first, and it never favours short
//! responses: what is served is decided by when a ticket was issued, not by when its batch
//! finished, so stale data is dropped whatever its length.
//!
//! With `keep_dropped` (a trajectory store is attached), the stale trajectories are not
//! discarded but handed to the learner with the next batch ([`LearnerBatch::dropped`]), so the
//! store can record them with the step that dropped them.
//!
//! Accounting: the buffer records the id of every ticket whose batch arrived ([`TicketSet`]);
//! a ticket that arrives twice (a retried ticket whose first batch got through after all) is
//! discarded and counted. [`ReplayMsg::Checkpoint`] answers with the buffered trajectories,
//! that set and the stale count — what a checkpoint needs so a resumed run issues exactly the
//! tickets that never arrived. [`ReplayMsg::Drain`] makes every batch request (pending or
//! later) answer `None`, which is how the run stops a learner that is waiting for data.

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::channel::StageReceiver;
use crate::meter::ActorMeter;
use crate::reissue::TicketSet;
use crate::trajectory::{StageTimes, Trajectory, TrajectoryBatch};

/// What becomes of tokens sampled more than `max_lag` versions before the one trained
/// (`mode.stale`). Without in-flight updates a trajectory's tokens share one version, so
/// `Mask` drops what `Drop` drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StalePolicy {
    /// Drop (and count) a trajectory whose oldest token is older than the bound.
    #[default]
    Drop,
    /// Train on a trajectory with at least one token within the bound, with no loss on its
    /// older tokens (they still count in its rewards and advantages); drop the others.
    Mask,
    /// Train on everything, with the off-policy correction only.
    Train,
}

impl StalePolicy {
    /// Whether `t` is kept for a learner about to train `version`.
    pub fn keeps(self, t: &Trajectory, version: u64, max_lag: u64) -> bool {
        match self {
            StalePolicy::Drop => t.policy_version + max_lag >= version,
            StalePolicy::Mask => t.token_versions.last().copied().unwrap_or(t.policy_version) + max_lag >= version,
            StalePolicy::Train => true,
        }
    }
}

/// What the learner trains on in one step.
#[derive(Debug, Clone)]
pub struct LearnerBatch {
    pub trajectories: Vec<Trajectory>,
    /// Stage compute seconds attributed to these trajectories.
    pub times: StageTimes,
    /// Trajectories dropped as too stale so far in the run.
    pub dropped_stale: u64,
    /// Trajectories held by the buffer when the batch was formed.
    pub buffered: usize,
    /// Trajectories dropped as too stale since the previous batch (only with `keep_dropped`).
    pub dropped: Vec<Trajectory>,
}

/// What a checkpoint keeps of the replay buffer.
#[derive(Debug, Clone, Default)]
pub struct ReplayCheckpoint {
    /// Unconsumed trajectories, in (ticket, row) order.
    pub buffered: Vec<Trajectory>,
    /// Every ticket whose batch arrived (consumed, dropped or buffered).
    pub arrived: TicketSet,
    /// Trajectories dropped as too stale so far in the run.
    pub dropped_stale: u64,
}

pub enum ReplayMsg {
    /// A batch from the value stage; the reply is the credit for the next one.
    Arrived(TrajectoryBatch, RpcReplyPort<()>),
    /// The value stage closed its channel.
    Closed,
    /// A batch for a learner about to train `version`; `None` once the pipeline has closed
    /// and too few trajectories remain.
    NextBatch {
        version: u64,
        reply: RpcReplyPort<Option<LearnerBatch>>,
    },
    /// The buffer's contents for a checkpoint.
    Checkpoint(RpcReplyPort<ReplayCheckpoint>),
    /// Answer every batch request with `None` from now on.
    Drain,
}

// Local only: never sent to another node.
impl ractor::Message for ReplayMsg {}

pub struct ReplayArgs {
    /// Taken by the forwarding task.
    pub input: Option<StageReceiver<TrajectoryBatch>>,
    pub capacity: usize,
    pub batch_size: usize,
    /// Trajectories whose policy lags the learner's version by more than this are stale.
    pub max_lag: u64,
    /// What is dropped of stale trajectories.
    pub stale: StalePolicy,
    /// Hand stale trajectories to the learner (for the trajectory store) instead of discarding them.
    pub keep_dropped: bool,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// Trajectories in the buffer now, readable without a message to the actor.
    pub held: Arc<AtomicUsize>,
    /// Where a resumed run starts: the checkpoint's buffer.
    pub restore: ReplayCheckpoint,
}

pub struct ReplayState {
    args: ReplayArgs,
    buffer: Vec<(Trajectory, StageTimes)>,
    pending: Option<(u64, RpcReplyPort<Option<LearnerBatch>>)>,
    /// The forwarder's credit, withheld while the buffer is full.
    credit: Option<RpcReplyPort<()>>,
    dropped_stale: u64,
    /// Stale trajectories not yet handed over (with `keep_dropped`).
    dropped: Vec<Trajectory>,
    arrived: TicketSet,
    closed: bool,
    draining: bool,
}

pub struct ReplayActor;

impl Actor for ReplayActor {
    type Msg = ReplayMsg;
    type State = ReplayState;
    type Arguments = ReplayArgs;

    async fn pre_start(
        &self,
        me: ActorRef<ReplayMsg>,
        mut args: ReplayArgs,
    ) -> Result<ReplayState, ActorProcessingErr> {
        let input = args.input.take().ok_or("replay needs an input channel")?;
        let me2 = me.clone();
        tokio::spawn(async move {
            while let Some(batch) = input.recv().await {
                // Waits for the credit: the call returns once the batch is in the buffer.
                if !matches!(
                    me2.call(|reply| ReplayMsg::Arrived(batch, reply), None).await,
                    Ok(CallResult::Success(()))
                ) {
                    return;
                }
            }
            let _ = me2.cast(ReplayMsg::Closed);
        });
        let restore = std::mem::take(&mut args.restore);
        let st = ReplayState {
            args,
            buffer: restore
                .buffered
                .into_iter()
                .map(|t| (t, StageTimes::default()))
                .collect(),
            pending: None,
            credit: None,
            dropped_stale: restore.dropped_stale,
            dropped: vec![],
            arrived: restore.arrived,
            closed: false,
            draining: false,
        };
        st.publish_held();
        Ok(st)
    }

    async fn handle(
        &self,
        _me: ActorRef<ReplayMsg>,
        msg: ReplayMsg,
        st: &mut ReplayState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        match msg {
            ReplayMsg::Arrived(batch, credit) if !st.arrived.insert(batch.ticket.id) => {
                tracing::warn!(
                    ticket = batch.ticket.id,
                    "ticket arrived twice; the second copy is discarded"
                );
                metrics::counter!("tandem_replay_duplicate_tickets").increment(1);
                st.credit = Some(credit);
            }
            ReplayMsg::Arrived(batch, credit) => {
                st.args.meter.items(batch.trajectories.len() as u64);
                let n = batch.trajectories.len().max(1) as f64;
                let share = StageTimes {
                    generate_s: batch.times.generate_s / n,
                    reward_s: batch.times.reward_s / n,
                    value_s: batch.times.value_s / n,
                };
                st.buffer.extend(batch.trajectories.into_iter().map(|t| (t, share)));
                st.publish_held();
                st.credit = Some(credit);
            }
            ReplayMsg::Closed => st.closed = true,
            ReplayMsg::NextBatch { version, reply } => st.pending = Some((version, reply)),
            ReplayMsg::Checkpoint(reply) => {
                let mut buffered: Vec<Trajectory> = st.dropped.to_vec();
                buffered.extend(st.buffer.iter().map(|(t, _)| t.clone()));
                buffered.sort_by_key(|t| (t.ticket, t.row));
                let _ = reply.send(ReplayCheckpoint {
                    buffered,
                    arrived: st.arrived.clone(),
                    dropped_stale: st.dropped_stale,
                });
            }
            ReplayMsg::Drain => st.draining = true,
        }
        self.try_serve(st);
        if st.buffer.len() < st.args.capacity {
            if let Some(c) = st.credit.take() {
                let _ = c.send(());
            }
        }
        Ok(())
    }
}

impl ReplayState {
    fn publish_held(&self) {
        self.args.held.store(self.buffer.len(), Ordering::Relaxed);
        metrics::gauge!("tandem_replay_buffered").set(self.buffer.len() as f64);
    }
}

impl ReplayActor {
    fn try_serve(&self, st: &mut ReplayState) {
        let Some((version, _)) = &st.pending else { return };
        let version = *version;
        if st.draining {
            let (_, reply) = st.pending.take().expect("checked above");
            let _ = reply.send(None);
            return;
        }
        let s = st.args.max_lag;
        let before = st.buffer.len();
        let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut st.buffer)
            .into_iter()
            .partition(|(t, _)| st.args.stale.keeps(t, version, s));
        st.buffer = keep;
        if st.args.keep_dropped {
            st.dropped.extend(stale.into_iter().map(|(t, _)| t));
        }
        let dropped = (before - st.buffer.len()) as u64;
        if dropped > 0 {
            st.dropped_stale += dropped;
            metrics::counter!("tandem_replay_dropped_stale").increment(dropped);
        }
        let n = st.args.batch_size;
        if st.buffer.len() < n && !st.closed {
            return;
        }
        let (_, reply) = st.pending.take().expect("checked above");
        if st.buffer.len() < n {
            let _ = reply.send(None);
            return;
        }
        st.buffer.sort_by_key(|(t, _)| (t.ticket, t.row));
        let buffered = st.buffer.len();
        let taken: Vec<_> = st.buffer.drain(..n).collect();
        let mut times = StageTimes::default();
        for (_, s) in &taken {
            times.generate_s += s.generate_s;
            times.reward_s += s.reward_s;
            times.value_s += s.value_s;
        }
        let batch = LearnerBatch {
            trajectories: taken.into_iter().map(|(t, _)| t).collect(),
            times,
            dropped_stale: st.dropped_stale,
            buffered,
            dropped: std::mem::take(&mut st.dropped),
        };
        let _ = reply.send(Some(batch));
        st.publish_held();
    }
}
