//! The head-side proxy of one rollout slot on a worker node.
//!
//! A [`RemoteRolloutActor`] is an ordinary child of the run's supervisor (role `Rollout`, with
//! its own [`HeldTickets`] and meter labelled with the node): to the rest of the pipeline it is
//! a sampler. It takes tickets exactly as a local rollout actor does ([`TicketIntake`]: reissued
//! ones first, and only tickets recent enough for the policy version the node holds), sends one ticket at a
//! time to the node's host actor as a ractor_cluster call, and pushes the batch that comes back
//! into the bounded `rollout_to_reward` channel, waiting there when it is full.
//!
//! Back-pressure: one call in flight per proxy is the credit. The node samples nothing it was
//! not asked for, and the head holds at most one returned batch per proxy outside the bounded
//! channels, so however fast a node samples, the head's memory stays bounded by the channel
//! capacities plus one batch per remote slot.
//!
//! Node loss: when the node disconnects, ractor_cluster stops the head's stand-in for the
//! node's actor and the pending call fails (or `cluster.sample_timeout_s` passes). The proxy
//! then fails; the supervisor moves its held ticket to the reissue queue, where the remaining
//! samplers take it, and restarts the proxy after its back-off. A restarted proxy takes no
//! ticket while its node is down: it waits on the node's [`NodeView`] and resumes when the
//! node has joined again and holds a policy.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tandem_actors::{
    ActorMeter, ActorState, HeldTickets, Next, ReissueQueue, StageReceiver, StageSender, TicketIntake, TrajectoryBatch,
    WorkTicket,
};
use tokio::sync::watch;

use super::node_host::NodeMsg;
use super::node_link::NodeView;
use super::wire::{self, SampleReply, SampleRequest};

pub enum RemoteRolloutMsg {
    /// Take the next ticket (self-sent, or when the node's view changes).
    Step,
    /// Tickets were put in the reissue queue.
    Reissued,
}

impl ractor::Message for RemoteRolloutMsg {}

#[derive(Clone)]
pub struct RemoteRolloutArgs {
    /// `rollout/<node>/<slot>`: also the `sampler` of its trajectories.
    pub name: String,
    pub node: String,
    pub slot: u32,
    pub view: watch::Receiver<NodeView>,
    pub max_lag: u64,
    pub tickets: StageReceiver<WorkTicket>,
    pub out: StageSender<TrajectoryBatch>,
    pub meter: Arc<ActorMeter>,
    pub held: HeldTickets,
    pub reissued: ReissueQueue,
    pub timeout: Duration,
}

pub struct RemoteRolloutState {
    args: RemoteRolloutArgs,
    intake: TicketIntake,
}

pub struct RemoteRolloutActor;

impl Actor for RemoteRolloutActor {
    type Msg = RemoteRolloutMsg;
    type State = RemoteRolloutState;
    type Arguments = RemoteRolloutArgs;

    async fn pre_start(
        &self,
        me: ActorRef<RemoteRolloutMsg>,
        args: RemoteRolloutArgs,
    ) -> Result<RemoteRolloutState, ActorProcessingErr> {
        me.cast(RemoteRolloutMsg::Step)?;
        let intake = TicketIntake::new(
            &args.name,
            args.tickets.clone(),
            args.reissued.clone(),
            args.held.clone(),
            args.max_lag,
        );
        Ok(RemoteRolloutState { args, intake })
    }

    async fn handle(
        &self,
        me: ActorRef<RemoteRolloutMsg>,
        msg: RemoteRolloutMsg,
        st: &mut RemoteRolloutState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        if matches!(msg, RemoteRolloutMsg::Reissued) && !st.intake.waiting() {
            return Ok(());
        }
        let view = st.args.view.borrow_and_update().clone();
        let (Some(host), Some(version)) = (view.host, view.version) else {
            // Node down or without weights: hold nothing, wait for it.
            st.intake.give_back();
            st.args.meter.set_state(ActorState::Idle);
            return self.wait_for_node(&me, st);
        };
        st.args.meter.set_version(version);
        st.args.meter.set_state(ActorState::Idle);
        let ticket = match st.intake.next(version).await {
            Next::Sample(t) => t,
            // The node's policy is too old for this ticket: wait for a newer version.
            Next::Wait => return self.wait_for_node(&me, st),
            Next::Closed => {
                st.args.meter.set_state(ActorState::Stopped);
                me.stop(Some("no more tickets".into()));
                return Ok(());
            }
        };
        st.args.meter.set_state(ActorState::Computing);
        let batch = self.sample(st, &host, &ticket).await?;
        st.args.meter.busy(Duration::from_secs_f64(batch.times.generate_s));
        st.args.meter.items(batch.tokens_generated as u64);
        st.args.meter.set_state(ActorState::Blocked);
        let sent = st.args.out.send(batch).await;
        st.args.meter.set_state(ActorState::Idle);
        match sent {
            Ok(waited) => {
                st.intake.handed_on(ticket.id);
                st.args.meter.blocked(waited);
                me.cast(RemoteRolloutMsg::Step)?;
            }
            Err(_) => me.stop(Some("reward stage gone".into())),
        }
        Ok(())
    }
}

impl RemoteRolloutActor {
    /// Casts `Step` once the node's view changes (joined, left, or a new version).
    fn wait_for_node(
        &self,
        me: &ActorRef<RemoteRolloutMsg>,
        st: &mut RemoteRolloutState,
    ) -> Result<(), ActorProcessingErr> {
        // The clone has seen what this Step saw: it wakes on the next change only.
        let mut view = st.args.view.clone();
        let me = me.clone();
        tokio::spawn(async move {
            if view.changed().await.is_ok() {
                let _ = me.cast(RemoteRolloutMsg::Step);
            }
        });
        Ok(())
    }

    async fn sample(
        &self,
        st: &RemoteRolloutState,
        host: &ActorRef<NodeMsg>,
        ticket: &WorkTicket,
    ) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let req = wire::encode(&SampleRequest {
            slot: st.args.slot,
            sampler: st.args.name.clone(),
            ticket: ticket.clone(),
        });
        let node = &st.args.node;
        let reply = match host.call(|r| NodeMsg::Sample(req, r), Some(st.args.timeout)).await {
            Ok(CallResult::Success(bytes)) => bytes,
            Ok(CallResult::Timeout) => {
                return Err(format!(
                    "node {node}: no batch for ticket {} within {:?}",
                    ticket.id, st.args.timeout
                )
                .into())
            }
            Ok(CallResult::SenderError) | Err(_) => {
                return Err(format!("node {node} went away while sampling ticket {}", ticket.id).into())
            }
        };
        let batch = wire::decode::<SampleReply>(&reply, "batch")?
            .result
            .map_err(|e| format!("node {node}: {e}"))?;
        if batch.ticket.id != ticket.id || batch.trajectories.iter().any(|t| t.ticket != ticket.id) {
            return Err(format!("node {node} answered ticket {} with another ticket's batch", ticket.id).into());
        }
        Ok(batch)
    }
}
