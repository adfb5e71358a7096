//! The value actor: the critic's per-token values for each response.
//!
//! It holds a critic built over the latest critic weights the snapshot actor handed it. A batch
//! is only valued by a critic at least as new as the policy that sampled it (the learner
//! publishes policy and critic together, critic first), so in sync mode step k's data is
//! always valued by critic k. Without a critic (GRPO, RLOO) the stage passes batches through
//! with zero values.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::{ModelConfig, ScalarModel};

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::meter::{ActorMeter, ActorState};
use crate::reissue::HeldTickets;
use crate::snapshot::{adopt, SnapshotMsg};
use crate::trajectory::{SharedWeights, TrajectoryBatch};

pub enum ValueMsg {
    Step,
    Adopt(SharedWeights),
}

// Local only: never sent to another node.
impl ractor::Message for ValueMsg {}

/// New weights from the snapshot (through its [`crate::snapshot::WeightsPort`]).
impl From<SharedWeights> for ValueMsg {
    fn from(w: SharedWeights) -> Self {
        ValueMsg::Adopt(w)
    }
}

impl TryFrom<ValueMsg> for SharedWeights {
    type Error = ValueMsg;

    fn try_from(msg: ValueMsg) -> Result<Self, ValueMsg> {
        match msg {
            ValueMsg::Adopt(w) => Ok(w),
            other => Err(other),
        }
    }
}

#[derive(Clone)]
pub struct ValueArgs {
    pub name: String,
    pub executor: Arc<Executor>,
    /// The critic's config; `None` runs the stage as a pass-through (critic-free methods).
    pub critic: Option<ModelConfig>,
    pub input: StageReceiver<TrajectoryBatch>,
    pub out: StageSender<TrajectoryBatch>,
    pub snapshot: ActorRef<SnapshotMsg>,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// The ticket in hand (for its supervisor).
    pub held: HeldTickets,
    pub faults: Arc<Faults>,
}

pub struct ValueState {
    args: ValueArgs,
    model: Option<(u64, Arc<ScalarModel>)>,
    pending: Option<TrajectoryBatch>,
}

pub struct ValueActor;

impl Actor for ValueActor {
    type Msg = ValueMsg;
    type State = ValueState;
    type Arguments = ValueArgs;

    async fn pre_start(&self, me: ActorRef<ValueMsg>, args: ValueArgs) -> Result<ValueState, ActorProcessingErr> {
        if args.critic.is_some() {
            args.snapshot.cast(SnapshotMsg::SetCriticReceiver(me.get_derived()))?;
        } else {
            me.cast(ValueMsg::Step)?;
        }
        Ok(ValueState {
            args,
            model: None,
            pending: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<ValueMsg>,
        msg: ValueMsg,
        st: &mut ValueState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        match msg {
            ValueMsg::Adopt(w) => {
                let Some(cfg) = &st.args.critic else { return Ok(()) };
                let build = |t| ScalarModel::from_tensors(cfg, t, st.args.executor.device());
                let Some(first) = adopt(&mut st.model, &w, &st.args.name, &st.args.snapshot, build)? else {
                    return Ok(());
                };
                st.args.meter.set_version(w.version);
                if first || st.pending.is_some() {
                    me.cast(ValueMsg::Step)?;
                }
            }
            ValueMsg::Step => {
                st.args.meter.set_state(ActorState::Idle);
                let batch = match st.pending.take() {
                    Some(b) => b,
                    None => match st.args.input.recv().await {
                        Some(b) => b,
                        None => {
                            st.args.meter.set_state(ActorState::Stopped);
                            me.stop(Some("reward stage closed".into()));
                            return Ok(());
                        }
                    },
                };
                st.args.held.hold(&batch.ticket);
                let mut batch = match &st.model {
                    None if st.args.critic.is_none() => batch,
                    None => {
                        st.pending = Some(batch);
                        return Ok(());
                    }
                    Some((v, model)) => {
                        let needed = batch.trajectories.iter().map(|t| t.policy_version).max().unwrap_or(0);
                        if *v < needed {
                            st.pending = Some(batch);
                            return Ok(());
                        }
                        self.value(st, batch, model.clone()).await?
                    }
                };
                if st.args.critic.is_none() {
                    for t in &mut batch.trajectories {
                        t.values = vec![0.0; t.response_ids.len()];
                    }
                }
                st.args.meter.items(batch.trajectories.len() as u64);
                st.args.faults.value_batch();
                st.args.meter.set_state(ActorState::Blocked);
                let ticket = batch.ticket.id;
                let sent = st.args.out.send(batch).await;
                st.args.meter.set_state(ActorState::Idle);
                if let Ok(waited) = sent {
                    st.args.held.release(ticket);
                    st.args.meter.blocked(waited);
                } else {
                    me.stop(Some("replay gone".into()));
                    return Ok(());
                }
                me.cast(ValueMsg::Step)?;
            }
        }
        Ok(())
    }
}

impl ValueActor {
    async fn value(
        &self,
        st: &ValueState,
        mut batch: TrajectoryBatch,
        model: Arc<ScalarModel>,
    ) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let prompts: Vec<Vec<u32>> = batch.trajectories.iter().map(|t| t.prompt_ids.clone()).collect();
        let responses: Vec<Vec<u32>> = batch.trajectories.iter().map(|t| t.response_ids.clone()).collect();
        st.args.meter.set_state(ActorState::Computing);
        let (values, took) = st
            .args
            .executor
            .run(move |dev| -> Result<Vec<Vec<f32>>, crate::error::ActorError> {
                let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                let b = PromptResponseBatch::new(&p, &r, model.config().pad_id(), dev)?;
                let v = model.values(&b.ids, &b.mask)?;
                Ok(v.narrow(1, b.prompt_width - 1, b.response_width)?.to_vec2::<f32>()?)
            })
            .await?;
        let values = values?;
        for (i, t) in batch.trajectories.iter_mut().enumerate() {
            t.values = values[i][..t.response_ids.len()].to_vec();
        }
        batch.times.value_s = took.as_secs_f64();
        st.args.meter.busy(took);
        Ok(batch)
    }
}
