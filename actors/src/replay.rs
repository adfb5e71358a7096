//! The replay buffer actor: collects valued trajectories and forms learner batches.
//!
//! It pulls from the bounded channel of the value stage into a buffer of at most `capacity`
//! trajectories; when the buffer is full it stops pulling, so the stages before it fill their
//! channels and the samplers wait. The learner asks for a batch with the policy version it is
//! about to train ([`ReplayMsg::NextBatch`]); the buffer first drops — and counts — every
//! trajectory older than `version - max_staleness`, then answers with the `batch_size` oldest
//! trajectories in (ticket, row) order, or keeps the request until enough have arrived. That
//! order makes a sync-mode batch independent of which sampler finished first.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::channel::StageReceiver;
use crate::trajectory::{StageTimes, Trajectory, TrajectoryBatch};

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
}

pub enum ReplayMsg {
    Pump,
    /// A batch for a learner about to train `version`; `None` once the pipeline has closed
    /// and too few trajectories remain.
    NextBatch { version: u64, reply: RpcReplyPort<Option<LearnerBatch>> },
    /// Number of trajectories currently held.
    Held(RpcReplyPort<usize>),
}

pub struct ReplayArgs {
    pub input: StageReceiver<TrajectoryBatch>,
    pub capacity: usize,
    pub batch_size: usize,
    pub max_staleness: u64,
}

pub struct ReplayState {
    args: ReplayArgs,
    buffer: Vec<(Trajectory, StageTimes)>,
    pending: Option<(u64, RpcReplyPort<Option<LearnerBatch>>)>,
    dropped_stale: u64,
    pumping: bool,
    closed: bool,
}

pub struct ReplayActor;

impl Actor for ReplayActor {
    type Msg = ReplayMsg;
    type State = ReplayState;
    type Arguments = ReplayArgs;

    async fn pre_start(&self, me: ActorRef<ReplayMsg>, args: ReplayArgs) -> Result<ReplayState, ActorProcessingErr> {
        me.cast(ReplayMsg::Pump)?;
        Ok(ReplayState { args, buffer: vec![], pending: None, dropped_stale: 0, pumping: true, closed: false })
    }

    async fn handle(&self, me: ActorRef<ReplayMsg>, msg: ReplayMsg, st: &mut ReplayState) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplayMsg::Pump => {
                if st.buffer.len() >= st.args.capacity {
                    st.pumping = false;
                    return Ok(());
                }
                match st.args.input.recv().await {
                    Some(batch) => {
                        let n = batch.trajectories.len().max(1) as f64;
                        let share = StageTimes {
                            generate_s: batch.times.generate_s / n,
                            reward_s: batch.times.reward_s / n,
                            value_s: batch.times.value_s / n,
                        };
                        st.buffer.extend(batch.trajectories.into_iter().map(|t| (t, share)));
                        metrics::gauge!("tandem_replay_buffered").set(st.buffer.len() as f64);
                        me.cast(ReplayMsg::Pump)?;
                    }
                    None => {
                        st.closed = true;
                        st.pumping = false;
                    }
                }
                self.try_serve(&me, st)?;
            }
            ReplayMsg::NextBatch { version, reply } => {
                st.pending = Some((version, reply));
                self.try_serve(&me, st)?;
            }
            ReplayMsg::Held(reply) => {
                let _ = reply.send(st.buffer.len());
            }
        }
        Ok(())
    }
}

impl ReplayActor {
    fn try_serve(&self, me: &ActorRef<ReplayMsg>, st: &mut ReplayState) -> Result<(), ActorProcessingErr> {
        let Some((version, _)) = &st.pending else { return Ok(()) };
        let version = *version;
        let s = st.args.max_staleness;
        let before = st.buffer.len();
        st.buffer.retain(|(t, _)| t.policy_version + s >= version);
        let dropped = (before - st.buffer.len()) as u64;
        if dropped > 0 {
            st.dropped_stale += dropped;
            metrics::counter!("tandem_replay_dropped_stale").increment(dropped);
        }
        let n = st.args.batch_size;
        if st.buffer.len() < n && !st.closed {
            if !st.pumping {
                st.pumping = true;
                me.cast(ReplayMsg::Pump)?;
            }
            return Ok(());
        }
        let (_, reply) = st.pending.take().expect("checked above");
        if st.buffer.len() < n {
            let _ = reply.send(None);
            return Ok(());
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
        };
        let _ = reply.send(Some(batch));
        metrics::gauge!("tandem_replay_buffered").set(st.buffer.len() as f64);
        if !st.pumping && !st.closed {
            st.pumping = true;
            me.cast(ReplayMsg::Pump)?;
        }
        Ok(())
    }
}
