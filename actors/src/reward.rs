//! The reward stage: scores responses and computes the reference model's log-probs.
//!
//! For each batch from the rollout stage it runs the reward source and, on its device, the
//! frozen reference policy over prompt + response, and forwards the batch with `score` and
//! `ref_logprobs` filled in. A reward model scores on the device too; a rule or an external
//! verifier scores on a thread of its own meanwhile, so a slow verifier never holds the
//! device executor that the samplers share. The per-token reward
//! `-beta * KL_t (+ score at the last token)` is assembled by the learner with the KL
//! coefficient of the step that trains on the batch, so an adaptive beta is applied exactly.
//!
//! It runs in the [stage skeleton](crate::stage): the ticket of the batch in hand is recorded
//! in [`HeldTickets`] until the batch is handed downstream, so a supervisor can reissue it if
//! this actor fails.

use std::sync::Arc;

use ractor::{ActorProcessingErr, ActorRef};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::LanguageModel;

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::meter::ActorMeter;
use crate::reissue::HeldTickets;
use crate::reward_source::RewardSource;
use crate::stage::{Stage, StageActor, StageCore, StageMsg, Take};
use crate::trajectory::{TrajectoryBatch, WorkTicket};

/// Scores per row and, with a reference model, its log-probs per response token.
type ScoresAndRefs = (Vec<f32>, Option<Vec<Vec<f32>>>);

/// The reward actor: the [`RewardStage`] in the stage skeleton.
pub type RewardActor = StageActor<RewardStage>;

#[derive(Clone)]
pub struct RewardArgs {
    pub name: String,
    pub executor: Arc<Executor>,
    pub source: Arc<dyn RewardSource>,
    /// The frozen reference policy; `None` when the KL penalty is off.
    pub reference: Option<Arc<LanguageModel>>,
    /// Sampling temperature, so reference log-probs match the sampler's scale.
    pub temperature: f64,
    pub input: StageReceiver<TrajectoryBatch>,
    pub out: StageSender<TrajectoryBatch>,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// The ticket in hand (for its supervisor).
    pub held: HeldTickets,
    pub faults: Arc<Faults>,
}

pub struct RewardStage {
    args: RewardArgs,
}

impl Stage for RewardStage {
    type Args = RewardArgs;
    type In = TrajectoryBatch;
    const UPSTREAM_CLOSED: &'static str = "rollout stage closed";
    const DOWNSTREAM_GONE: &'static str = "value stage gone";

    fn start(args: RewardArgs, _me: &ActorRef<StageMsg>) -> Result<(Self, StageCore, bool), ActorProcessingErr> {
        let core = StageCore::new(&args.out, &args.meter, &args.held);
        Ok((RewardStage { args }, core, true))
    }

    fn ticket(batch: &TrajectoryBatch) -> &WorkTicket {
        &batch.ticket
    }

    async fn take(&mut self, _me: &ActorRef<StageMsg>) -> Take<TrajectoryBatch> {
        self.args.input.recv().await.into()
    }

    async fn compute(&mut self, mut batch: TrajectoryBatch) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let st = &self.args;
        let source = st.source.clone();
        let reference = st.reference.clone();
        let temperature = st.temperature;
        let (prompts, responses) = batch.prompts_and_responses();
        // A source that does not use the device (a rule, an external verifier) scores on a
        // thread of its own while the reference runs on the device.
        let off_device = (!source.uses_device()).then(|| {
            let (source, prompts, responses) = (source.clone(), prompts.clone(), responses.clone());
            tokio::task::spawn_blocking(move || {
                let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                let started = std::time::Instant::now();
                (source.score(&p, &r, &candle_core::Device::Cpu), started.elapsed())
            })
        });
        let on_device = off_device.is_none();
        let (out, took) = st
            .executor
            .run(move |dev| -> Result<ScoresAndRefs, crate::error::ActorError> {
                let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                let scores = if on_device { source.score(&p, &r, dev)? } else { vec![] };
                let refs = match reference {
                    Some(m) => {
                        let b = PromptResponseBatch::new(&p, &r, m.config().pad_id(), dev)?;
                        let lp = m.token_logprobs(&b.ids, &b.mask, b.prompt_width - 1, temperature)?;
                        Some(lp.logprobs.narrow(1, 0, b.response_width)?.to_vec2::<f32>()?)
                    }
                    None => None,
                };
                Ok((scores, refs))
            })
            .await?;
        let (mut scores, refs) = out?;
        // The stage's time: the device's, or the scoring thread's where that took longer.
        let mut stage_time = took;
        if let Some(scoring) = off_device {
            let (scored, scoring_time) = scoring
                .await
                .map_err(|e| crate::error::ActorError::PeerGone(format!("reward scoring thread failed: {e}")))?;
            scores = scored?;
            stage_time = stage_time.max(scoring_time);
        }
        for (i, t) in batch.trajectories.iter_mut().enumerate() {
            t.score = scores[i];
            t.ref_logprobs = match &refs {
                Some(r) => r[i][..t.response_ids.len()].to_vec(),
                None => t.full_logprobs.clone(),
            };
        }
        batch.times.reward_s = stage_time.as_secs_f64();
        st.meter.busy(took);
        st.meter.items(batch.trajectories.len() as u64);
        st.faults.reward_batch();
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use candle_core::Device;
    use ractor::Actor;

    use super::*;
    use crate::channel::stage_channel;
    use crate::device::DeviceId;
    use crate::error::ActorError;
    use crate::trajectory::{Trajectory, WorkTicket};

    /// A verifier that takes `delay` per batch and scores each response by its length.
    struct SlowVerifier {
        delay: Duration,
        on_device: bool,
    }

    impl RewardSource for SlowVerifier {
        fn score(&self, _p: &[&[u32]], responses: &[&[u32]], _d: &Device) -> Result<Vec<f32>, ActorError> {
            std::thread::sleep(self.delay);
            Ok(responses.iter().map(|r| r.len() as f32).collect())
        }
        fn name(&self) -> &str {
            "slow"
        }
        fn uses_device(&self) -> bool {
            self.on_device
        }
    }

    fn batch() -> TrajectoryBatch {
        let t = Trajectory {
            ticket: 0,
            row: 0,
            prompt_index: 0,
            prompt_ids: vec![1, 2],
            response_ids: vec![3, 4, 5],
            behaviour_logprobs: vec![-1.0; 3],
            full_logprobs: vec![-1.0; 3],
            stopped: true,
            policy_version: 0,
            token_versions: vec![],
            sampler: "test".into(),
            sampling_seed: 0,
            ref_logprobs: vec![],
            score: 0.0,
            values: vec![],
            sampled_unix_ms: 0,
        };
        TrajectoryBatch {
            ticket: WorkTicket {
                id: 0,
                step: 0,
                prompts: vec![],
                samples_per_prompt: 1,
                seed: 0,
            },
            trajectories: vec![t],
            times: Default::default(),
            tokens_generated: 3,
        }
    }

    /// How long a job submitted to the device waits while the reward actor scores a batch with
    /// a verifier that takes 600 ms.
    async fn device_wait_while_scoring(on_device: bool) -> (Duration, TrajectoryBatch) {
        let executor = Executor::new(DeviceId::Cpu(0), 1).unwrap();
        let (in_tx, in_rx) = stage_channel("in", 1);
        let (out_tx, out_rx) = stage_channel("out", 1);
        let args = RewardArgs {
            name: "reward-test".into(),
            executor: executor.clone(),
            source: Arc::new(SlowVerifier {
                delay: Duration::from_millis(600),
                on_device,
            }),
            reference: None,
            temperature: 1.0,
            input: in_rx,
            out: out_tx,
            meter: Arc::new(ActorMeter::new("reward", "reward-test", "cpu:0")),
            held: HeldTickets::default(),
            faults: Arc::new(Faults::default()),
        };
        let (actor, handle) = Actor::spawn(None, RewardActor::default(), args).await.unwrap();
        in_tx.send(batch()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let asked = Instant::now();
        executor.run(|_| ()).await.unwrap();
        let waited = asked.elapsed();
        let scored = out_rx.recv().await.unwrap();
        // Closing the input stops the actor at its next receive.
        drop(in_tx);
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .unwrap()
            .unwrap();
        drop(actor);
        (waited, scored)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_verifier_does_not_hold_the_device() {
        let (waited, scored) = device_wait_while_scoring(false).await;
        assert!(
            waited < Duration::from_millis(200),
            "the device waited {waited:?} for the verifier"
        );
        assert_eq!(scored.trajectories[0].score, 3.0);
        assert!(scored.times.reward_s >= 0.6, "reward_s {}", scored.times.reward_s);
        // The contrast: a source that computes on the device holds it while it scores.
        let (waited, _) = device_wait_while_scoring(true).await;
        assert!(
            waited >= Duration::from_millis(300),
            "the device waited only {waited:?}"
        );
    }
}
