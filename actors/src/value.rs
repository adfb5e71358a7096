//! The value stage: the critic's per-token values for each response.
//!
//! It holds a critic built over the latest critic weights the snapshot actor handed it. A batch
//! is only valued by a critic at least as new as the policy that sampled it (the learner
//! publishes policy and critic together, critic first), so in sync mode step k's data is
//! always valued by critic k: a batch that is newer waits in the [stage skeleton](crate::stage)
//! ([`Stage::ready`]) until that critic arrives. Without a critic (GRPO, RLOO) the stage
//! passes batches through with zero values.

use std::sync::Arc;

use ractor::{ActorProcessingErr, ActorRef};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::{ModelConfig, ScalarModel};

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::meter::ActorMeter;
use crate::reissue::HeldTickets;
use crate::snapshot::{adopt, SnapshotMsg};
use crate::stage::{Stage, StageActor, StageCore, StageMsg, Take};
use crate::trajectory::{SharedWeights, TrajectoryBatch, WorkTicket};

/// The value actor: the [`ValueStage`] in the stage skeleton.
pub type ValueActor = StageActor<ValueStage>;

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

pub struct ValueStage {
    args: ValueArgs,
    model: Option<(u64, Arc<ScalarModel>)>,
}

impl Stage for ValueStage {
    type Args = ValueArgs;
    type In = TrajectoryBatch;
    const UPSTREAM_CLOSED: &'static str = "reward stage closed";
    const DOWNSTREAM_GONE: &'static str = "replay gone";

    fn start(args: ValueArgs, me: &ActorRef<StageMsg>) -> Result<(Self, StageCore, bool), ActorProcessingErr> {
        // With a critic, the first critic starts it.
        let take_now = args.critic.is_none();
        if !take_now {
            args.snapshot.cast(SnapshotMsg::SetCriticReceiver(me.get_derived()))?;
        }
        let core = StageCore::new(&args.out, &args.meter, &args.held);
        Ok((ValueStage { args, model: None }, core, take_now))
    }

    fn ticket(batch: &TrajectoryBatch) -> &WorkTicket {
        &batch.ticket
    }

    async fn take(&mut self, _me: &ActorRef<StageMsg>) -> Take<TrajectoryBatch> {
        self.args.input.recv().await.into()
    }

    fn ready(&self, batch: &TrajectoryBatch) -> bool {
        match &self.model {
            None => self.args.critic.is_none(),
            Some((v, _)) => {
                let needed = batch.trajectories.iter().map(|t| t.policy_version).max().unwrap_or(0);
                *v >= needed
            }
        }
    }

    async fn compute(&mut self, batch: TrajectoryBatch) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let mut batch = match self.model.clone() {
            Some((_, model)) => self.value(batch, model).await?,
            None => batch,
        };
        if self.args.critic.is_none() {
            for t in &mut batch.trajectories {
                t.values = vec![0.0; t.response_ids.len()];
            }
        }
        self.args.meter.items(batch.trajectories.len() as u64);
        self.args.faults.value_batch();
        Ok(batch)
    }

    fn adopt(&mut self, w: SharedWeights) -> Result<Option<bool>, ActorProcessingErr> {
        let Some(cfg) = &self.args.critic else { return Ok(None) };
        let build = |t| ScalarModel::from_tensors(cfg, t, self.args.executor.device());
        let adopted = adopt(&mut self.model, &w, &self.args.name, &self.args.snapshot, build)?;
        if adopted.is_some() {
            self.args.meter.set_version(w.version);
        }
        Ok(adopted)
    }
}

impl ValueStage {
    async fn value(
        &self,
        mut batch: TrajectoryBatch,
        model: Arc<ScalarModel>,
    ) -> Result<TrajectoryBatch, ActorProcessingErr> {
        let (prompts, responses) = batch.prompts_and_responses();
        let (values, took) = self
            .args
            .executor
            .run(move |dev| -> Result<Vec<Vec<f32>>, crate::error::ActorError> {
                let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                let b = PromptResponseBatch::new(&p, &r, model.config().pad_id(), dev)?;
                let v = model.values_at(&b.ids, &b.mask, b.prompt_width - 1, b.response_width)?;
                Ok(v.to_vec2::<f32>()?)
            })
            .await?;
        let values = values?;
        for (i, t) in batch.trajectories.iter_mut().enumerate() {
            t.values = values[i][..t.response_ids.len()].to_vec();
        }
        batch.times.value_s = took.as_secs_f64();
        self.args.meter.busy(took);
        Ok(batch)
    }
}
