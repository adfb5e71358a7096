//! The reward actor: scores responses and computes the reference model's log-probs.
//!
//! For each batch from the rollout stage it runs, on its device, the reward source (reward
//! model or rule) and the frozen reference policy over prompt + response, and forwards the
//! batch with `score` and `ref_logprobs` filled in. The per-token reward
//! `-beta * KL_t (+ score at the last token)` is assembled by the learner with the KL
//! coefficient of the step that trains on the batch, so an adaptive beta is applied exactly.
//!
//! The ticket of the batch in hand is recorded in [`HeldTickets`] until the batch is handed
//! downstream, so a supervisor can reissue it if this actor fails.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::LanguageModel;

use crate::channel::{StageReceiver, StageSender};
use crate::device::Executor;
use crate::faults::Faults;
use crate::meter::{ActorMeter, ActorState};
use crate::reissue::HeldTickets;
use crate::reward_source::RewardSource;
use crate::trajectory::TrajectoryBatch;

/// Scores per row and, with a reference model, its log-probs per response token.
type ScoresAndRefs = (Vec<f32>, Option<Vec<Vec<f32>>>);

pub enum RewardMsg {
    /// Score the next batch (self-sent).
    Step,
}

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

pub struct RewardActor;

impl Actor for RewardActor {
    type Msg = RewardMsg;
    type State = RewardArgs;
    type Arguments = RewardArgs;

    async fn pre_start(&self, me: ActorRef<RewardMsg>, args: RewardArgs) -> Result<RewardArgs, ActorProcessingErr> {
        me.cast(RewardMsg::Step)?;
        Ok(args)
    }

    async fn handle(
        &self,
        me: ActorRef<RewardMsg>,
        _msg: RewardMsg,
        st: &mut RewardArgs,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.meter.time_handle();
        st.meter.set_state(ActorState::Idle);
        let Some(mut batch) = st.input.recv().await else {
            st.meter.set_state(ActorState::Stopped);
            me.stop(Some("rollout stage closed".into()));
            return Ok(());
        };
        st.held.hold(&batch.ticket);
        let source = st.source.clone();
        let reference = st.reference.clone();
        let temperature = st.temperature;
        let prompts: Vec<Vec<u32>> = batch.trajectories.iter().map(|t| t.prompt_ids.clone()).collect();
        let responses: Vec<Vec<u32>> = batch.trajectories.iter().map(|t| t.response_ids.clone()).collect();
        st.meter.set_state(ActorState::Computing);
        let (out, took) = st
            .executor
            .run(move |dev| -> Result<ScoresAndRefs, crate::error::ActorError> {
                let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                let scores = source.score(&p, &r, dev)?;
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
        let (scores, refs) = out?;
        for (i, t) in batch.trajectories.iter_mut().enumerate() {
            t.score = scores[i];
            t.ref_logprobs = match &refs {
                Some(r) => r[i][..t.response_ids.len()].to_vec(),
                None => t.full_logprobs.clone(),
            };
        }
        batch.times.reward_s = took.as_secs_f64();
        st.meter.busy(took);
        st.meter.items(batch.trajectories.len() as u64);
        st.faults.reward_batch();
        st.meter.set_state(ActorState::Blocked);
        let ticket = batch.ticket.id;
        let sent = st.out.send(batch).await;
        st.meter.set_state(ActorState::Idle);
        if let Ok(waited) = sent {
            st.held.release(ticket);
            st.meter.blocked(waited);
        } else {
            me.stop(Some("value stage gone".into()));
            return Ok(());
        }
        me.cast(RewardMsg::Step)?;
        Ok(())
    }
}
