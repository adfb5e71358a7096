//! The evaluator actor: greedy held-out evaluation of the weights a run publishes (`[eval]`).
//!
//! It registers with the snapshot as a policy receiver, as a sampler does, so it gets every
//! published version in order. Version `k + 1` holds the update of learner step `k`; when step
//! `k` is due (every `eval.every` steps, and the last step) the evaluator builds the model from
//! the shared tensors on the first rollout device's executor, decodes the held-out prompts
//! greedily and scores them with the run's reward source ([`HeldOut`], the code path of
//! `tandem eval`). The measures go to the run loop over [`EvalResults`]; the loop writes them
//! into step `k`'s `metrics.jsonl` line, waiting for them before it writes that line (the
//! learner goes on meanwhile). Versions that are not due are dropped on arrival, and so is the
//! first version received: the weights the run started or resumed from.
//!
//! It only reads published weights and draws no random numbers, so what the run trains on is
//! the same with or without it. Its compute shares the rollout device with the samplers (one
//! evaluation delays their next batch) and leaves the learner's device alone. A failed
//! evaluation is logged and leaves the step's line without the measures; it does not stop the
//! run.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tandem_actors::snapshot::SnapshotMsg;
use tandem_actors::{ActorMeter, Executor, HeldOutEval, SharedWeights};
use tandem_models::{LanguageModel, ModelConfig};
use tokio::sync::mpsc;

use crate::eval::HeldOut;

/// A published policy version, as the snapshot delivers it.
pub struct EvaluatorMsg(SharedWeights);

impl ractor::Message for EvaluatorMsg {}

impl From<SharedWeights> for EvaluatorMsg {
    fn from(w: SharedWeights) -> Self {
        EvaluatorMsg(w)
    }
}

impl TryFrom<EvaluatorMsg> for SharedWeights {
    type Error = EvaluatorMsg;

    fn try_from(m: EvaluatorMsg) -> Result<Self, EvaluatorMsg> {
        Ok(m.0)
    }
}

/// Which learner steps are evaluated.
#[derive(Debug, Clone, Copy)]
pub struct EvalSchedule {
    pub every: u64,
    pub steps: u64,
}

impl EvalSchedule {
    pub fn due(&self, step: u64) -> bool {
        (step + 1).is_multiple_of(self.every.max(1)) || step + 1 == self.steps
    }
}

pub struct EvaluatorArgs {
    pub meter: Arc<ActorMeter>,
    pub executor: Arc<Executor>,
    pub config: ModelConfig,
    pub held_out: Arc<HeldOut>,
    pub schedule: EvalSchedule,
    pub snapshot: ActorRef<SnapshotMsg>,
    /// Each due step and its measures (`None`: the evaluation failed).
    pub results: mpsc::UnboundedSender<(u64, Option<HeldOutEval>)>,
}

pub struct EvaluatorState {
    args: EvaluatorArgs,
    /// The version the run started from, once received (not evaluated).
    first: Option<u64>,
}

pub struct EvaluatorActor;

impl Actor for EvaluatorActor {
    type Msg = EvaluatorMsg;
    type State = EvaluatorState;
    type Arguments = EvaluatorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<EvaluatorMsg>,
        args: EvaluatorArgs,
    ) -> Result<EvaluatorState, ActorProcessingErr> {
        args.snapshot.cast(SnapshotMsg::AddPolicyReceiver(me.get_derived()))?;
        Ok(EvaluatorState { args, first: None })
    }

    async fn handle(
        &self,
        _me: ActorRef<EvaluatorMsg>,
        EvaluatorMsg(w): EvaluatorMsg,
        st: &mut EvaluatorState,
    ) -> Result<(), ActorProcessingErr> {
        let first = *st.first.get_or_insert(w.version);
        if w.version <= first || !st.args.schedule.due(w.version - 1) {
            return Ok(());
        }
        let (step, version) = (w.version - 1, w.version);
        let _timer = st.args.meter.time_handle();
        let (config, held_out) = (st.args.config.clone(), st.args.held_out.clone());
        let run = st
            .args
            .executor
            .run(move |dev| -> Result<HeldOutEval, String> {
                let model = LanguageModel::from_tensors(&config, w.tensors.clone(), dev).map_err(|e| e.to_string())?;
                let (_, s) = held_out.run(&model, 1, 0.0).map_err(|e| e.to_string())?;
                Ok(HeldOutEval {
                    eval_score_mean: Some(s.score_mean),
                    eval_accuracy: s.accuracy,
                    eval_mean_length: Some(s.mean_length),
                    eval_no_stop_fraction: Some(s.no_stop_fraction),
                })
            })
            .await;
        let measured = match run.map_err(|e| e.to_string()).and_then(|(r, took)| Ok((r?, took))) {
            Ok((m, took)) => {
                st.args.meter.busy(took);
                st.args.meter.set_version(version);
                Some(m)
            }
            Err(e) => {
                tracing::warn!(step, "held-out evaluation failed: {e}");
                None
            }
        };
        let _ = st.args.results.send((step, measured));
        Ok(())
    }
}

/// The run loop's end of the evaluator: the measures of each due step, in step order.
pub struct EvalResults {
    pub schedule: EvalSchedule,
    pub rx: mpsc::UnboundedReceiver<(u64, Option<HeldOutEval>)>,
}

impl EvalResults {
    /// The measures of `step` when it is due: waits for the evaluation of its weights. `None`
    /// when it is not due, or its evaluation failed, or the evaluator is gone.
    pub async fn for_step(&mut self, step: u64) -> Option<HeldOutEval> {
        if !self.schedule.due(step) {
            return None;
        }
        while let Some((s, m)) = self.rx.recv().await {
            if s == step {
                return m;
            }
            if s > step {
                return None;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_step_and_the_last_are_due() {
        let s = EvalSchedule { every: 4, steps: 10 };
        let due: Vec<u64> = (0..10).filter(|&k| s.due(k)).collect();
        assert_eq!(due, vec![3, 7, 9]);
    }
}
