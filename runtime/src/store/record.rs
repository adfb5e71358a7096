//! What one store record holds, and its bincode encoding.
//!
//! A trajectory whose tokens were all sampled by one policy version is encoded as it always
//! was; one that spans versions (a policy adopted in flight) is encoded as a second variant
//! that appends the per-token versions. Records written before per-token versions existed
//! therefore decode unchanged, with every token at `policy_version`.

use serde::{Deserialize, Serialize};
use tandem_actors::{TokenOutputs, Trajectory};

/// What became of a trajectory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The learner trained on it in this step.
    Used { step: u64 },
    /// The replay buffer dropped it as too stale when forming this step's batch.
    Dropped { step: u64 },
}

impl Outcome {
    pub fn step(&self) -> u64 {
        match *self {
            Outcome::Used { step } | Outcome::Dropped { step } => step,
        }
    }

    pub fn used(&self) -> bool {
        matches!(self, Outcome::Used { .. })
    }
}

/// One trajectory with everything the pipeline learnt about it. Per-token vectors have one
/// entry per response token; `token_rewards`, `advantages` and `returns` are empty for a
/// dropped trajectory, and `returns` without a critic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTrajectory {
    pub ticket: u64,
    pub row: u32,
    pub prompt_index: u64,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    /// log-probs under the distribution actually sampled from.
    pub behaviour_logprobs: Vec<f32>,
    /// log softmax(logits / T): what the KL penalty uses.
    pub full_logprobs: Vec<f32>,
    pub ref_logprobs: Vec<f32>,
    pub stopped: bool,
    /// Reward-model (or rule) score of the whole response.
    pub score: f32,
    pub values: Vec<f32>,
    pub token_rewards: Vec<f32>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    /// The version that sampled the first (oldest) token.
    pub policy_version: u64,
    /// The version of each token when they span versions, else empty (see
    /// [`tandem_actors::Trajectory::token_versions`]); encoded by the record's variant.
    #[serde(skip)]
    pub token_versions: Vec<u64>,
    pub sampler: String,
    pub sampling_seed: u64,
    pub sampled_unix_ms: u64,
    pub stored_unix_ms: u64,
    pub outcome: Outcome,
}

impl StoredTrajectory {
    pub fn new(t: Trajectory, computed: Option<TokenOutputs>, outcome: Outcome, stored_unix_ms: u64) -> Self {
        let c = computed.unwrap_or_default();
        Self {
            ticket: t.ticket,
            row: t.row,
            prompt_index: t.prompt_index,
            prompt_ids: t.prompt_ids,
            response_ids: t.response_ids,
            behaviour_logprobs: t.behaviour_logprobs,
            full_logprobs: t.full_logprobs,
            ref_logprobs: t.ref_logprobs,
            stopped: t.stopped,
            score: t.score,
            values: t.values,
            token_rewards: c.rewards,
            advantages: c.advantages,
            returns: c.returns,
            policy_version: t.policy_version,
            token_versions: t.token_versions,
            sampler: t.sampler,
            sampling_seed: t.sampling_seed,
            sampled_unix_ms: t.sampled_unix_ms,
            stored_unix_ms,
            outcome,
        }
    }
}

impl StoredTrajectory {
    /// The version that sampled each response token.
    pub fn versions(&self) -> Vec<u64> {
        tandem_actors::trajectory::token_versions(&self.token_versions, self.policy_version, self.response_ids.len())
    }

    /// The trajectory as the learner saw it (what `tandem replay --rerun-step` trains on again).
    pub fn to_trajectory(&self) -> Trajectory {
        Trajectory {
            ticket: self.ticket,
            row: self.row,
            prompt_index: self.prompt_index,
            prompt_ids: self.prompt_ids.clone(),
            response_ids: self.response_ids.clone(),
            behaviour_logprobs: self.behaviour_logprobs.clone(),
            full_logprobs: self.full_logprobs.clone(),
            stopped: self.stopped,
            policy_version: self.policy_version,
            token_versions: self.token_versions.clone(),
            sampler: self.sampler.clone(),
            sampling_seed: self.sampling_seed,
            ref_logprobs: self.ref_logprobs.clone(),
            score: self.score,
            values: self.values.clone(),
            sampled_unix_ms: self.sampled_unix_ms,
        }
    }
}

/// A store record ([`encode`] and [`decode`] give its bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Trajectory(StoredTrajectory),
}

/// A record as encoded. New kinds are new variants (appended, so old logs still decode).
#[derive(Serialize)]
enum WireRef<'a> {
    Trajectory(&'a StoredTrajectory),
    VersionedTrajectory(&'a StoredTrajectory, &'a [u64]),
}

#[derive(Deserialize)]
enum Wire {
    /// Every token sampled by `policy_version`.
    Trajectory(StoredTrajectory),
    /// A trajectory and the version of each of its tokens.
    VersionedTrajectory(StoredTrajectory, Vec<u64>),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The payload bytes of a record.
pub fn encode(record: &Record) -> Vec<u8> {
    let wire = match record {
        Record::Trajectory(t) if t.token_versions.is_empty() => WireRef::Trajectory(t),
        Record::Trajectory(t) => WireRef::VersionedTrajectory(t, &t.token_versions),
    };
    bincode::serde::encode_to_vec(wire, config()).expect("records always encode")
}

/// Decodes a payload; trailing bytes are an error.
pub fn decode(payload: &[u8]) -> Result<Record, String> {
    let (r, used) = bincode::serde::decode_from_slice(payload, config()).map_err(|e| e.to_string())?;
    if used != payload.len() {
        return Err(format!("{} trailing bytes after the record", payload.len() - used));
    }
    Ok(match r {
        Wire::Trajectory(t) => Record::Trajectory(t),
        Wire::VersionedTrajectory(mut t, versions) => {
            if versions.len() != t.response_ids.len() {
                return Err(format!(
                    "{} token versions for {} response tokens",
                    versions.len(),
                    t.response_ids.len()
                ));
            }
            t.token_versions = versions;
            Record::Trajectory(t)
        }
    })
}
