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
//!
//! ## In-flight updates
//! With `inflight` set (`mode.inflight_updates`), a running batch also adopts newer weights
//! between two decode steps. The actor handles one message at a time and is busy computing, so
//! a new version cannot reach it as a message mid-batch: the generation loop on the device
//! thread reads the snapshot's latest-weights `watch` cell instead ([`InflightSource`]) before
//! every decode step, builds a model over the new tensors (shared, not copied) and samples the
//! rest of the batch with it ([`tandem_models::generate_inflight`]; the KV cache is kept or
//! recomputed as `InflightKv` says). Each trajectory keeps the version of its first token as
//! `policy_version` (the oldest, which the staleness bound applies to) and, when the response
//! spans versions, every token's version in `token_versions`. The time from a version's
//! publication to the first token sampled under it is the histogram
//! `tandem_inflight_first_token_seconds`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ractor::{ActorProcessingErr, ActorRef};
use rand::{rngs::StdRng, SeedableRng};
use tandem_models::{
    generate_inflight, Decoding, Generation, Inflight, InflightKv, LanguageModel, ModelConfig, SamplingConfig,
};

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
    /// Adopt newer weights within a batch, treating the KV cache so; `None`: between batches.
    pub inflight: Option<InflightKv>,
}

pub struct RolloutStage {
    args: RolloutArgs,
    model: Option<(u64, Arc<LanguageModel>)>,
    intake: TicketIntake,
    /// The snapshot's latest-weights cell, once subscribed (with in-flight updates).
    latest: Option<tokio::sync::watch::Receiver<SharedWeights>>,
}

/// Where a running batch reads newer weights from (see the module docs).
#[derive(Clone)]
pub struct InflightSource {
    /// The latest published policy.
    pub latest: tokio::sync::watch::Receiver<SharedWeights>,
    pub config: ModelConfig,
    pub kv: InflightKv,
    /// Told of each adoption (publish-to-adopt latency), as adopting between batches does.
    pub snapshot: Option<ActorRef<SnapshotMsg>>,
    /// The newest policy adopted in flight, for the sampler to keep after the batch.
    pub adopted: Arc<Mutex<Option<AdoptedPolicy>>>,
}

/// A policy version and the model built over its weights.
pub type AdoptedPolicy = (u64, Arc<LanguageModel>);

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
        let core = StageCore::new(&args.out, &args.meter, &args.held);
        let stage = RolloutStage {
            args,
            model: None,
            intake,
            latest: None,
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
        let inflight = match self.args.inflight {
            Some(kv) => {
                if self.latest.is_none() {
                    self.latest = Some(ractor::call!(self.args.snapshot, SnapshotMsg::Subscribe)?);
                }
                self.latest.clone().map(|latest| InflightSource {
                    latest,
                    config: self.args.config.clone(),
                    kv,
                    snapshot: Some(self.args.snapshot.clone()),
                    adopted: Arc::default(),
                })
            }
            None => None,
        };
        let args = &self.args;
        let batch = sample_ticket(
            &args.executor,
            a.model,
            &args.sampling,
            &a.ticket,
            a.version,
            &args.name,
            inflight.clone(),
        )
        .await?;
        let adopted = inflight.and_then(|f| f.adopted.lock().ok().and_then(|mut a| a.take()));
        if let Some((version, model)) = adopted {
            if self.model.as_ref().is_none_or(|(v, _)| *v < version) {
                self.model = Some((version, model));
                args.meter.set_version(version);
            }
        }
        args.meter
            .busy(std::time::Duration::from_secs_f64(batch.times.generate_s));
        args.meter.items(batch.tokens_generated as u64);
        metrics::counter!("tandem_rollout_batches_total", &args.meter.labels()).increment(1);
        args.faults.rollout_batch();
        if let Some(stall) = args.faults.rollout_stall() {
            tokio::time::sleep(stall).await;
        }
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
    inflight: Option<InflightSource>,
) -> Result<TrajectoryBatch, ActorProcessingErr> {
    let n = ticket.samples_per_prompt.max(1);
    let prompts: Vec<Vec<u32>> = ticket
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.ids.clone(), n))
        .collect();
    let sampling = sampling.clone();
    let seed = ticket.seed;
    let receiver = sampler.to_string();
    let (gen, took) = executor
        .run(move |_| {
            let mut rng = StdRng::seed_from_u64(seed);
            match inflight {
                None => generate_inflight(&model, &prompts, &sampling, &mut rng, Decoding::Cached, None),
                Some(source) => generate_adopting(&model, version, &prompts, &sampling, &mut rng, source, &receiver),
            }
        })
        .await?;
    let gen = gen?;
    let adopted = gen.adopted.clone();
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
                let token_versions = row_versions(version, &adopted, response_ids.len());
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
                    token_versions,
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

/// Generates on the device thread, adopting each newer version `source` publishes between
/// decode steps (see the module docs).
fn generate_adopting(
    model: &LanguageModel,
    version: u64,
    prompts: &[Vec<u32>],
    sampling: &SamplingConfig,
    rng: &mut StdRng,
    source: InflightSource,
    receiver: &str,
) -> tandem_models::Result<Generation> {
    let mut current = version;
    // The step of the last adoption and when its version was published, until a token of that
    // step is sampled.
    let mut first_token: Option<(usize, Instant)> = None;
    let mut latest = source.latest.clone();
    let mut next = |step: usize| {
        if let Some((_, published)) = first_token.take() {
            metrics::histogram!("tandem_inflight_first_token_seconds").record(published.elapsed().as_secs_f64());
        }
        let w = latest.borrow_and_update().clone();
        if w.version <= current {
            return None;
        }
        let m = match LanguageModel::from_tensors(&source.config, w.tensors.clone(), model.device()) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::warn!(version = w.version, "cannot adopt weights in flight: {e}");
                return None;
            }
        };
        current = w.version;
        first_token = Some((step, w.published_at));
        if let Some(snapshot) = &source.snapshot {
            let _ = snapshot.cast(SnapshotMsg::Adopted {
                receiver: receiver.to_string(),
                version: w.version,
                latency: w.published_at.elapsed(),
            });
        }
        if let Ok(mut a) = source.adopted.lock() {
            *a = Some((w.version, m.clone()));
        }
        Some((w.version, m))
    };
    let inflight = Inflight {
        next: &mut next,
        kv: source.kv,
    };
    let gen = generate_inflight(model, prompts, sampling, rng, Decoding::Cached, Some(inflight))?;
    if let Some((step, published)) = first_token {
        if gen.width() > step {
            metrics::histogram!("tandem_inflight_first_token_seconds").record(published.elapsed().as_secs_f64());
        }
    }
    Ok(gen)
}

/// The versions of a row's `len` tokens, sampled from `version` on and then by each policy
/// `adopted` in flight at its step: empty when they are all `version`.
fn row_versions(version: u64, adopted: &[(usize, u64)], len: usize) -> Vec<u64> {
    if adopted.first().is_none_or(|&(step, _)| step >= len) {
        return vec![];
    }
    (0..len)
        .map(|j| {
            adopted
                .iter()
                .take_while(|&&(step, _)| step <= j)
                .last()
                .map_or(version, |&(_, v)| v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::Device;
    use tandem_models::{InflightKv, LanguageModel, ModelConfig, SamplingConfig, WeightInit};

    use super::{row_versions, sample_ticket, InflightSource};
    use crate::device::{DeviceId, Executor};
    use crate::trajectory::{Prompt, WeightsSnapshot, WorkTicket};

    #[tokio::test]
    async fn a_running_batch_adopts_a_published_version_between_decode_steps() {
        let mc = ModelConfig::gpt2(32, 16, 1, 2, 64);
        let (v0, _) = LanguageModel::trainable(&mc, WeightInit::Random { seed: 1 }, &Device::Cpu).unwrap();
        let (_, vars) = LanguageModel::trainable(&mc, WeightInit::Random { seed: 2 }, &Device::Cpu).unwrap();
        // Version 1 is already published when the batch starts with version 0: it is adopted
        // before the second decode step.
        let v1 = Arc::new(WeightsSnapshot {
            version: 1,
            tensors: tandem_models::snapshot(&vars).unwrap(),
            published_at: Instant::now(),
        });
        let (_publish, latest) = tokio::sync::watch::channel(v1);
        for kv in [InflightKv::Keep, InflightKv::Recompute] {
            let source = InflightSource {
                latest: latest.clone(),
                config: mc.clone(),
                kv,
                snapshot: None,
                adopted: Arc::default(),
            };
            let prompts = vec![
                Prompt {
                    index: 0,
                    ids: vec![1, 2, 3],
                },
                Prompt {
                    index: 1,
                    ids: vec![4, 5],
                },
            ];
            let ticket = WorkTicket {
                id: 0,
                step: 1,
                prompts,
                samples_per_prompt: 2,
                seed: 3,
            };
            let sampling = SamplingConfig {
                max_new_tokens: 6,
                ..Default::default()
            };
            let exec = Executor::new(DeviceId::Cpu(0), 1).unwrap();
            let model = Arc::new(v0.clone());
            let batch = sample_ticket(&exec, model, &sampling, &ticket, 0, "test", Some(source.clone()))
                .await
                .unwrap();
            assert_eq!(batch.trajectories.len(), 4);
            for t in &batch.trajectories {
                assert_eq!(t.policy_version, 0, "the oldest token's version");
                assert_eq!(t.versions(), vec![0, 1, 1, 1, 1, 1], "{kv:?}");
            }
            let adopted = source.adopted.lock().unwrap().as_ref().map(|(v, _)| *v);
            assert_eq!(adopted, Some(1), "the sampler keeps the adopted policy");
            // Without in-flight updates the same ticket is all version 0.
            let plain = sample_ticket(&exec, Arc::new(v0.clone()), &sampling, &ticket, 0, "test", None)
                .await
                .unwrap();
            assert!(plain.trajectories.iter().all(|t| t.token_versions.is_empty()));
            // The first token was drawn by version 0 either way.
            for (a, b) in batch.trajectories.iter().zip(&plain.trajectories) {
                assert_eq!(a.response_ids[0], b.response_ids[0]);
            }
        }
    }

    #[test]
    fn row_versions_follow_the_adoption_steps() {
        assert_eq!(row_versions(3, &[], 4), Vec::<u64>::new());
        // Adopted after the row ended: the row is all version 3.
        assert_eq!(row_versions(3, &[(4, 5)], 4), Vec::<u64>::new());
        assert_eq!(row_versions(3, &[(1, 4), (3, 6)], 5), vec![3, 4, 4, 6, 6]);
    }
}
