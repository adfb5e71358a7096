//! The head-side proxy of one rollout slot on a worker node.
//!
//! A [`RemoteRolloutActor`] is an ordinary child of the run's supervisor (role `Rollout`, with
//! its own [`HeldTickets`] and meter labelled with the node): to the rest of the pipeline it is
//! a sampler, run by the same [stage skeleton](tandem_actors::stage) as a local one. It takes
//! tickets exactly as a local rollout actor does ([`TicketIntake`]: reissued ones first, and
//! only tickets recent enough for the policy version the node holds); its compute sends one
//! ticket at a time to the node's host actor as a ractor_cluster call, and the skeleton pushes
//! the batch that comes back into the bounded `rollout_to_reward` channel, waiting there when
//! it is full.
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
use ractor::{ActorProcessingErr, ActorRef};
use tandem_actors::stage::{Stage, StageActor, StageCore, StageMsg, Take};
use tandem_actors::{
    ActorMeter, HeldTickets, Next, ReissueQueue, StageReceiver, StageSender, TicketIntake, TrajectoryBatch, WorkTicket,
};
use tokio::sync::watch;

use super::node_host::NodeMsg;
use super::node_link::NodeView;
use super::wire::{self, SampleReply, SampleRequest};

/// The proxy actor: the [`RemoteRolloutStage`] in the stage skeleton.
pub type RemoteRolloutActor = StageActor<RemoteRolloutStage>;

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

pub struct RemoteRolloutStage {
    args: RemoteRolloutArgs,
    intake: TicketIntake,
}

impl Stage for RemoteRolloutStage {
    type Args = RemoteRolloutArgs;
    /// The ticket and the node's host actor it goes to.
    type In = (WorkTicket, ActorRef<NodeMsg>);
    const UPSTREAM_CLOSED: &'static str = "no more tickets";
    const DOWNSTREAM_GONE: &'static str = "reward stage gone";

    fn start(args: RemoteRolloutArgs, _me: &ActorRef<StageMsg>) -> Result<(Self, StageCore, bool), ActorProcessingErr> {
        let intake = TicketIntake::new(
            &args.name,
            args.tickets.clone(),
            args.reissued.clone(),
            args.held.clone(),
            args.max_lag,
        );
        let core = StageCore::new(&args.out, &args.meter, &args.held);
        Ok((RemoteRolloutStage { args, intake }, core, true))
    }

    fn ticket(input: &Self::In) -> &WorkTicket {
        &input.0
    }

    async fn take(&mut self, me: &ActorRef<StageMsg>) -> Take<Self::In> {
        let view = self.args.view.borrow_and_update().clone();
        let (Some(host), Some(version)) = (view.host, view.version) else {
            // Node down or without weights: hold nothing, wait for it.
            self.intake.give_back();
            self.wait_for_node(me);
            return Take::Wait;
        };
        self.args.meter.set_version(version);
        match self.intake.next(version).await {
            Next::Sample(t) => Take::Item((t, host)),
            // The node's policy is too old for this ticket: wait for a newer version.
            Next::Wait => {
                self.wait_for_node(me);
                Take::Wait
            }
            Next::Closed => Take::Closed,
        }
    }

    async fn compute(&mut self, (ticket, host): Self::In) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let batch = self.sample(&host, &ticket).await?;
        self.args.meter.busy(Duration::from_secs_f64(batch.times.generate_s));
        self.args.meter.items(batch.tokens_generated as u64);
        Ok(batch)
    }

    fn waiting(&self) -> bool {
        self.intake.waiting()
    }
}

impl RemoteRolloutStage {
    /// Casts `Step` once the node's view changes (joined, left, or a new version).
    fn wait_for_node(&self, me: &ActorRef<StageMsg>) {
        // The clone has seen what this Step saw: it wakes on the next change only.
        let mut view = self.args.view.clone();
        let me = me.clone();
        tokio::spawn(async move {
            if view.changed().await.is_ok() {
                let _ = me.cast(StageMsg::Step);
            }
        });
    }

    async fn sample(
        &self,
        host: &ActorRef<NodeMsg>,
        ticket: &WorkTicket,
    ) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let req = wire::encode(&SampleRequest {
            slot: self.args.slot,
            sampler: self.args.name.clone(),
            ticket: ticket.clone(),
        });
        let node = &self.args.node;
        let reply = match host.call(|r| NodeMsg::Sample(req, r), Some(self.args.timeout)).await {
            Ok(CallResult::Success(bytes)) => bytes,
            Ok(CallResult::Timeout) => {
                return Err(format!(
                    "node {node}: no batch for ticket {} within {:?}",
                    ticket.id, self.args.timeout
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
