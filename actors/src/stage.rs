//! The one skeleton of the pipeline's stages: rollout, the head's proxy of a remote rollout,
//! reward and value.
//!
//! A [`StageActor`] runs one loop, whatever the stage: on each [`StageMsg::Step`] it
//!
//! 1. **takes** its next input from the stage's inbound side ([`Stage::take`]: a ticket for a
//!    sampler, a trajectory batch for reward and value), waiting while there is none;
//! 2. **holds** the input's ticket in its [`HeldTickets`], so a failure from then on reissues it
//!    ([`crate::reissue`]);
//! 3. **computes** on the stage's device ([`Stage::compute`]), unless the stage is not ready
//!    for the input ([`Stage::ready`]: the value stage waits for a critic as new as the
//!    policy that sampled the batch): the input is then kept and taken first once new weights
//!    arrive;
//! 4. **sends** the batch into the bounded channel downstream, waiting there while it is full
//!    (back-pressure; the wait is counted as blocked time);
//! 5. **releases** the ticket, and casts itself the next `Step`.
//!
//! Each stage supplies only where its input comes from and its compute. Messages are handled
//! one at a time, so weights that arrive as messages are adopted between batches, never during
//! one (a sampler with in-flight updates reads a shared latest-weights cell mid-batch
//! instead, see [`crate::rollout`]): [`Stage::adopt`] is the hook a stage swaps weights in ([`StageMsg::Adopt`], sent by the snapshot through its
//! [`crate::snapshot::WeightsPort`]). A stage that waits (for a newer policy, a critic, or a
//! worker node) resumes on new weights or, for samplers, on [`StageMsg::Reissued`].
//!
//! Shutdown: the actor stops when its inbound side closes (the stage upstream is done) or the
//! channel downstream is gone. Killing it drops its channel ends; a take or send in progress
//! is cancel-safe ([`crate::channel`]), and the tickets it held are reissued by its supervisor.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::channel::StageSender;
use crate::meter::{ActorMeter, ActorState};
use crate::reissue::HeldTickets;
use crate::trajectory::{SharedWeights, TrajectoryBatch, WorkTicket};

pub enum StageMsg {
    /// Take the next input (self-sent after each batch, and when a wait may be over).
    Step,
    /// New weights to swap in before the next batch.
    Adopt(SharedWeights),
    /// Tickets were put in the reissue queue.
    Reissued,
}

// Local only: never sent to another node.
impl ractor::Message for StageMsg {}

/// New weights from the snapshot (through its [`crate::snapshot::WeightsPort`]).
impl From<SharedWeights> for StageMsg {
    fn from(w: SharedWeights) -> Self {
        StageMsg::Adopt(w)
    }
}

impl TryFrom<StageMsg> for SharedWeights {
    type Error = StageMsg;

    fn try_from(msg: StageMsg) -> Result<Self, StageMsg> {
        match msg {
            StageMsg::Adopt(w) => Ok(w),
            other => Err(other),
        }
    }
}

/// What a stage's inbound side gave.
pub enum Take<T> {
    /// An input to compute.
    Item(T),
    /// Nothing to compute for now: new weights (or a wake the stage arranged) resume it.
    Wait,
    /// The inbound side is closed and drained.
    Closed,
}

/// A channel's receive: an item, or `None` once it is closed and drained.
impl<T> From<Option<T>> for Take<T> {
    fn from(received: Option<T>) -> Self {
        match received {
            Some(item) => Take::Item(item),
            None => Take::Closed,
        }
    }
}

/// The skeleton's parts of a stage: where batches go, its measurements and its tickets.
pub struct StageCore {
    pub out: StageSender<TrajectoryBatch>,
    pub meter: Arc<ActorMeter>,
    pub held: HeldTickets,
}

impl StageCore {
    /// The parts, from the handles a stage's arguments carry.
    pub fn new(out: &StageSender<TrajectoryBatch>, meter: &Arc<ActorMeter>, held: &HeldTickets) -> Self {
        Self {
            out: out.clone(),
            meter: meter.clone(),
            held: held.clone(),
        }
    }
}

/// One stage's own part: its inbound side and its compute (see the module docs).
pub trait Stage: Sized + Send + 'static {
    /// What the stage is spawned with (cloned for each restart).
    type Args: Clone + Send + Sync + 'static;
    /// One input: a ticket to sample, or a batch to score or value.
    type In: Send + 'static;
    /// The stop reason when the inbound side closes.
    const UPSTREAM_CLOSED: &'static str;
    /// The stop reason when the channel downstream is gone.
    const DOWNSTREAM_GONE: &'static str;

    /// Builds the stage and the skeleton's parts (registering for weights where it takes
    /// them); `true` takes the first input at once, else the first weights start it.
    fn start(args: Self::Args, me: &ActorRef<StageMsg>) -> Result<(Self, StageCore, bool), ActorProcessingErr>;

    /// The ticket `input` answers for.
    fn ticket(input: &Self::In) -> &WorkTicket;

    /// Takes the next input, waiting for one.
    fn take(&mut self, me: &ActorRef<StageMsg>) -> impl Future<Output = Take<Self::In>> + Send;

    /// Whether the stage can compute `input` now; if not, it is kept until new weights arrive.
    fn ready(&self, _input: &Self::In) -> bool {
        true
    }

    /// The stage's work on one input, on its device.
    fn compute(&mut self, input: Self::In) -> impl Future<Output = Result<TrajectoryBatch, ActorProcessingErr>> + Send;

    /// Swaps in new weights: `None` when nothing changed, else whether they were the first.
    fn adopt(&mut self, _weights: SharedWeights) -> Result<Option<bool>, ActorProcessingErr> {
        Ok(None)
    }

    /// Whether the stage holds an input it waits to compute (a wake then resumes it).
    fn waiting(&self) -> bool {
        false
    }
}

/// The actor that runs a [`Stage`] (see the module docs).
pub struct StageActor<S>(PhantomData<fn() -> S>);

impl<S> Default for StageActor<S> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub struct StageState<S: Stage> {
    stage: S,
    core: StageCore,
    /// An input taken but not yet computable ([`Stage::ready`]).
    pending: Option<S::In>,
}

impl<S: Stage> StageState<S> {
    fn waiting(&self) -> bool {
        self.pending.is_some() || self.stage.waiting()
    }

    /// One pass: take, hold, compute, send, release.
    async fn step(&mut self, me: &ActorRef<StageMsg>) -> Result<(), ActorProcessingErr> {
        let core = &self.core;
        core.meter.set_state(ActorState::Idle);
        let input = match self.pending.take() {
            Some(input) => input,
            None => match self.stage.take(me).await {
                Take::Item(input) => {
                    core.held.hold(S::ticket(&input));
                    input
                }
                Take::Wait => return Ok(()),
                Take::Closed => {
                    core.meter.set_state(ActorState::Stopped);
                    me.stop(Some(S::UPSTREAM_CLOSED.into()));
                    return Ok(());
                }
            },
        };
        if !self.stage.ready(&input) {
            self.pending = Some(input);
            return Ok(());
        }
        let ticket = S::ticket(&input).id;
        core.meter.set_state(ActorState::Computing);
        let batch = self.stage.compute(input).await?;
        core.meter.set_state(ActorState::Blocked);
        let sent = core.out.send(batch).await;
        core.meter.set_state(ActorState::Idle);
        match sent {
            Ok(waited) => {
                core.held.release(ticket);
                core.meter.blocked(waited);
                me.cast(StageMsg::Step)?;
            }
            Err(_) => me.stop(Some(S::DOWNSTREAM_GONE.into())),
        }
        Ok(())
    }
}

impl<S: Stage> Actor for StageActor<S> {
    type Msg = StageMsg;
    type State = StageState<S>;
    type Arguments = S::Args;

    async fn pre_start(&self, me: ActorRef<StageMsg>, args: S::Args) -> Result<StageState<S>, ActorProcessingErr> {
        let (stage, core, take_now) = S::start(args, &me)?;
        if take_now {
            me.cast(StageMsg::Step)?;
        }
        Ok(StageState {
            stage,
            core,
            pending: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<StageMsg>,
        msg: StageMsg,
        st: &mut StageState<S>,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.core.meter.time_handle();
        match msg {
            StageMsg::Adopt(w) => {
                if let Some(first) = st.stage.adopt(w)? {
                    if first || st.waiting() {
                        me.cast(StageMsg::Step)?;
                    }
                }
            }
            StageMsg::Reissued => {
                if st.waiting() {
                    me.cast(StageMsg::Step)?;
                }
            }
            StageMsg::Step => st.step(&me).await?,
        }
        Ok(())
    }
}
