//! The rollout actor (sampler): turns work tickets into sampled responses.
//!
//! It holds a policy built over the latest [`SharedWeights`] it adopted (sharing the tensors)
//! and loops: take a ticket from the bounded ticket channel, wait until its policy is recent
//! enough for the ticket (`ticket.step <= version + max_lag`, `max_lag = max_staleness +
//! publish_every - 1`; in sync mode with a publish every step that means exactly the
//! learner's current version), generate on its device with the ticket's seed,
//! and push the batch into the bounded channel to the reward stage — waiting there when the
//! reward stage is full. New weights are swapped in between generation batches, never during
//! one. The loop ends when the ticket channel closes or the downstream channel is gone.
//!
//! Tickets are taken in the order [`TicketIntake`] defines (reissued ones first, with the
//! staleness gate), and held in the rollout's [`HeldTickets`] until their batch is handed
//! downstream; [`RolloutMsg::Reissued`] wakes a rollout that is waiting for a newer policy so
//! a reissued ticket never waits behind a ticket meant for a later step.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::{rngs::StdRng, SeedableRng};
use tandem_models::{generate, Decoding, LanguageModel, ModelConfig, SamplingConfig};

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::intake::{Next, TicketIntake};
use crate::meter::{ActorMeter, ActorState};
use crate::reissue::{HeldTickets, ReissueQueue};
use crate::snapshot::{adopt, SnapshotMsg};
use crate::trajectory::{SharedWeights, StageTimes, Trajectory, TrajectoryBatch, WorkTicket};

pub enum RolloutMsg {
    /// Take the next ticket (self-sent after each batch).
    Step,
    /// Swap in a new policy version before the next batch.
    Adopt(SharedWeights),
    /// Tickets were put in the reissue queue.
    Reissued,
}

// Local only: never sent to another node.
impl ractor::Message for RolloutMsg {}

/// New weights from the snapshot (through its [`crate::snapshot::WeightsPort`]).
impl From<SharedWeights> for RolloutMsg {
    fn from(w: SharedWeights) -> Self {
        RolloutMsg::Adopt(w)
    }
}

impl TryFrom<RolloutMsg> for SharedWeights {
    type Error = RolloutMsg;

    fn try_from(msg: RolloutMsg) -> Result<Self, RolloutMsg> {
        match msg {
            RolloutMsg::Adopt(w) => Ok(w),
            other => Err(other),
        }
    }
}

#[derive(Clone)]
pub struct RolloutArgs {
    pub name: String,
    pub executor: Arc<Executor>,
    pub config: ModelConfig,
    pub sampling: SamplingConfig,
    /// How many versions a policy may lag the ticket's step (see the module docs).
    pub max_lag: u64,
    pub tickets: StageReceiver<WorkTicket>,
    pub out: StageSender<TrajectoryBatch>,
    pub snapshot: ActorRef<SnapshotMsg>,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// Tickets this actor holds (for its supervisor).
    pub held: HeldTickets,
    /// Tickets to sample again, taken before new ones.
    pub reissued: ReissueQueue,
    pub faults: Arc<Faults>,
}

pub struct RolloutState {
    args: RolloutArgs,
    model: Option<(u64, Arc<LanguageModel>)>,
    intake: TicketIntake,
}

pub struct RolloutActor;

impl Actor for RolloutActor {
    type Msg = RolloutMsg;
    type State = RolloutState;
    type Arguments = RolloutArgs;

    async fn pre_start(&self, me: ActorRef<RolloutMsg>, args: RolloutArgs) -> Result<RolloutState, ActorProcessingErr> {
        args.snapshot.cast(SnapshotMsg::AddPolicyReceiver(me.get_derived()))?;
        let intake = TicketIntake::new(
            &args.name,
            args.tickets.clone(),
            args.reissued.clone(),
            args.held.clone(),
            args.max_lag,
        );
        Ok(RolloutState {
            args,
            model: None,
            intake,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<RolloutMsg>,
        msg: RolloutMsg,
        st: &mut RolloutState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        match msg {
            RolloutMsg::Adopt(w) => {
                let (cfg, dev) = (&st.args.config, st.args.executor.device());
                let build = |t| LanguageModel::from_tensors(cfg, t, dev);
                let Some(first) = adopt(&mut st.model, &w, &st.args.name, &st.args.snapshot, build)? else {
                    return Ok(());
                };
                st.args.meter.set_version(w.version);
                if first || st.intake.waiting() {
                    me.cast(RolloutMsg::Step)?;
                }
            }
            RolloutMsg::Reissued => {
                if st.intake.waiting() {
                    me.cast(RolloutMsg::Step)?;
                }
            }
            RolloutMsg::Step => {
                let Some((version, model)) = st.model.clone() else {
                    return Ok(());
                };
                st.args.meter.set_state(ActorState::Idle);
                let ticket = match st.intake.next(version).await {
                    Next::Sample(t) => t,
                    // Too far ahead of the policy: Adopt (or Reissued) resumes us.
                    Next::Wait => return Ok(()),
                    Next::Closed => {
                        st.args.meter.set_state(ActorState::Stopped);
                        me.stop(Some("no more tickets".into()));
                        return Ok(());
                    }
                };
                st.args.meter.set_state(ActorState::Computing);
                let batch = self.sample(st, &ticket, version, model).await?;
                st.args.faults.rollout_batch();
                st.args.meter.set_state(ActorState::Blocked);
                let sent = st.args.out.send(batch).await;
                st.args.meter.set_state(ActorState::Idle);
                if let Ok(waited) = sent {
                    st.intake.handed_on(ticket.id);
                    st.args.meter.blocked(waited);
                } else {
                    me.stop(Some("reward stage gone".into()));
                    return Ok(());
                }
                me.cast(RolloutMsg::Step)?;
            }
        }
        Ok(())
    }
}

impl RolloutActor {
    async fn sample(
        &self,
        st: &RolloutState,
        ticket: &WorkTicket,
        version: u64,
        model: Arc<LanguageModel>,
    ) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let batch = sample_ticket(
            &st.args.executor,
            model,
            &st.args.sampling,
            ticket,
            version,
            &st.args.name,
        )
        .await?;
        st.args
            .meter
            .busy(std::time::Duration::from_secs_f64(batch.times.generate_s));
        st.args.meter.items(batch.tokens_generated as u64);
        metrics::counter!("tandem_rollout_batches_total", &st.args.meter.labels()).increment(1);
        Ok(batch)
    }
}

/// Samples one ticket with `model` (policy `version`) on `executor`, seeded by the ticket: the
/// work of a rollout actor, shared with the samplers of worker nodes.
pub async fn sample_ticket(
    executor: &Arc<Executor>,
    model: Arc<LanguageModel>,
    sampling: &SamplingConfig,
    ticket: &WorkTicket,
    version: u64,
    sampler: &str,
) -> Result<TrajectoryBatch, ActorProcessingErr> {
    let n = ticket.samples_per_prompt.max(1);
    let prompts: Vec<Vec<u32>> = ticket
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.ids.clone(), n))
        .collect();
    let sampling = sampling.clone();
    let seed = ticket.seed;
    let (gen, took) = executor
        .run(move |_| {
            let mut rng = StdRng::seed_from_u64(seed);
            generate(&model, &prompts, &sampling, &mut rng, Decoding::Cached)
        })
        .await?;
    let gen = gen?;
    let sampled_at = crate::trajectory::unix_ms();
    let tokens: usize = gen.responses.iter().map(Vec::len).sum();
    let trajectories = gen
        .responses
        .into_iter()
        .zip(gen.logprobs)
        .zip(gen.full_logprobs)
        .zip(gen.stopped)
        .enumerate()
        .map(
            |(row, (((response_ids, behaviour_logprobs), full_logprobs), stopped))| {
                let prompt = &ticket.prompts[row / n];
                Trajectory {
                    ticket: ticket.id,
                    row: row as u32,
                    prompt_index: prompt.index,
                    prompt_ids: prompt.ids.clone(),
                    response_ids,
                    behaviour_logprobs,
                    full_logprobs,
                    stopped,
                    policy_version: version,
                    sampler: sampler.to_string(),
                    sampling_seed: seed,
                    ref_logprobs: vec![],
                    score: 0.0,
                    values: vec![],
                    sampled_unix_ms: sampled_at,
                }
            },
        )
        .collect();
    Ok(TrajectoryBatch {
        ticket: ticket.clone(),
        trajectories,
        times: StageTimes {
            generate_s: took.as_secs_f64(),
            ..Default::default()
        },
        tokens_generated: tokens,
    })
}
