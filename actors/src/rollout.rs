//! The rollout stage (sampler): turns work tickets into sampled responses.
//!
//! It holds a policy built over the latest [`SharedWeights`] it adopted (sharing the tensors)
//! and, in the [stage skeleton](crate::stage), loops: take a ticket from the bounded ticket
//! channel, wait until its policy is recent enough for the ticket (`ticket.step <= version +
//! max_lag`, `max_lag = max_staleness + publish_every - 1`; in sync mode with a publish every
//! step that means exactly the learner's current version), generate on its device with the
//! ticket's seed, and push the batch into the bounded channel to the reward stage — waiting
//! there when the reward stage is full. New weights are swapped in between generation batches,
//! never during one ([`Stage::adopt`]). The loop ends when the ticket channel closes or the
//! downstream channel is gone.
//!
//! Tickets are taken in the order [`TicketIntake`] defines (reissued ones first, with the
//! staleness gate), and held in the rollout's [`HeldTickets`] until their batch is handed
//! downstream; [`StageMsg::Reissued`] wakes a rollout that is waiting for a newer policy so
//! a reissued ticket never waits behind a ticket meant for a later step.

use std::sync::Arc;

use ractor::{ActorProcessingErr, ActorRef};
use rand::{rngs::StdRng, SeedableRng};
use tandem_models::{generate, Decoding, LanguageModel, ModelConfig, SamplingConfig};

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::intake::{Next, TicketIntake};
use crate::meter::ActorMeter;
use crate::reissue::{HeldTickets, ReissueQueue};
use crate::snapshot::{adopt, SnapshotMsg};
use crate::stage::{Stage, StageActor, StageCore, StageMsg, Take};
use crate::trajectory::{SharedWeights, StageTimes, Trajectory, TrajectoryBatch, WorkTicket};

/// The rollout actor: the [`RolloutStage`] in the stage skeleton.
pub type RolloutActor = StageActor<RolloutStage>;

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

pub struct RolloutStage {
    args: RolloutArgs,
    model: Option<(u64, Arc<LanguageModel>)>,
    intake: TicketIntake,
}

/// A ticket to sample, with the policy (and its version) it is sampled with.
pub struct Assigned {
    ticket: WorkTicket,
    version: u64,
    model: Arc<LanguageModel>,
}

impl Stage for RolloutStage {
    type Args = RolloutArgs;
    type In = Assigned;
    const UPSTREAM_CLOSED: &'static str = "no more tickets";
    const DOWNSTREAM_GONE: &'static str = "reward stage gone";

    fn start(args: RolloutArgs, me: &ActorRef<StageMsg>) -> Result<(Self, StageCore, bool), ActorProcessingErr> {
        args.snapshot.cast(SnapshotMsg::AddPolicyReceiver(me.get_derived()))?;
        let intake = TicketIntake::new(
            &args.name,
            args.tickets.clone(),
            args.reissued.clone(),
            args.held.clone(),
            args.max_lag,
        );
        let core = StageCore {
            out: args.out.clone(),
            meter: args.meter.clone(),
            held: args.held.clone(),
        };
        let stage = RolloutStage {
            args,
            model: None,
            intake,
        };
        // The first policy starts it.
        Ok((stage, core, false))
    }

    fn ticket(input: &Assigned) -> &WorkTicket {
        &input.ticket
    }

    async fn take(&mut self, _me: &ActorRef<StageMsg>) -> Take<Assigned> {
        let Some((version, model)) = self.model.clone() else {
            return Take::Wait;
        };
        match self.intake.next(version).await {
            Next::Sample(ticket) => Take::Item(Assigned { ticket, version, model }),
            // Too far ahead of the policy: Adopt (or Reissued) resumes us.
            Next::Wait => Take::Wait,
            Next::Closed => Take::Closed,
        }
    }

    async fn compute(&mut self, a: Assigned) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let args = &self.args;
        let batch = sample_ticket(
            &args.executor,
            a.model,
            &args.sampling,
            &a.ticket,
            a.version,
            &args.name,
        )
        .await?;
        args.meter
            .busy(std::time::Duration::from_secs_f64(batch.times.generate_s));
        args.meter.items(batch.tokens_generated as u64);
        metrics::counter!("tandem_rollout_batches_total", &args.meter.labels()).increment(1);
        args.faults.rollout_batch();
        Ok(batch)
    }

    fn adopt(&mut self, w: SharedWeights) -> Result<Option<bool>, ActorProcessingErr> {
        let (cfg, dev) = (&self.args.config, self.args.executor.device());
        let build = |t| LanguageModel::from_tensors(cfg, t, dev);
        let adopted = adopt(&mut self.model, &w, &self.args.name, &self.args.snapshot, build)?;
        if adopted.is_some() {
            self.args.meter.set_version(w.version);
        }
        Ok(adopted)
    }

    fn waiting(&self) -> bool {
        self.intake.waiting()
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
