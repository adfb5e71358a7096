//! What flows through the data plane: work tickets (prompts to sample) and trajectory batches.
//!
//! A [`WorkTicket`] is one generation batch: consecutive prompts, the learner step whose data
//! it is meant for, and the seed its sampling uses (so the ticket, not the sampler that
//! happens to take it, decides the samples). Each stage fills in its part of the
//! [`Trajectory`] records and forwards the whole [`TrajectoryBatch`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

/// One prompt of the data set.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prompt {
    /// Position in the prompt stream (epoch * len + shuffled index); unique per issue.
    pub index: u64,
    pub ids: Vec<u32>,
}

/// A generation batch handed to a rollout actor.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkTicket {
    pub id: u64,
    /// The learner step this ticket's trajectories are meant for.
    pub step: u64,
    pub prompts: Vec<Prompt>,
    /// Samples per prompt (GRPO/RLOO groups: consecutive rows share a prompt).
    pub samples_per_prompt: usize,
    pub seed: u64,
}

/// One sampled response and everything the pipeline learns about it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trajectory {
    pub ticket: u64,
    pub row: u32,
    pub prompt_index: u64,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    /// log q(token) under the distribution actually sampled from (after temperature/top-k/top-p).
    pub behaviour_logprobs: Vec<f32>,
    /// log softmax(logits / T)(token): what the learner recomputes for the same policy.
    pub full_logprobs: Vec<f32>,
    /// Whether the response ended with a stop token.
    pub stopped: bool,
    /// The version that sampled the first token: the oldest one in the response.
    pub policy_version: u64,
    /// The version that sampled each response token, when a policy adopted in flight sampled
    /// part of the response (non-decreasing, first entry `policy_version`); empty when every
    /// token was sampled by `policy_version`.
    pub token_versions: Vec<u64>,
    pub sampler: String,
    pub sampling_seed: u64,
    /// Reference-model log-probs of the response tokens (Reward stage).
    pub ref_logprobs: Vec<f32>,
    /// Reward-model or rule-based score of the whole response (Reward stage).
    pub score: f32,
    /// Critic values per response token (Value stage).
    pub values: Vec<f32>,
    /// When the response was sampled, in milliseconds since the Unix epoch.
    pub sampled_unix_ms: u64,
}

impl Trajectory {
    /// The version that sampled each response token (see [`Trajectory::token_versions`]).
    pub fn versions(&self) -> Vec<u64> {
        token_versions(&self.token_versions, self.policy_version, self.response_ids.len())
    }
}

/// Per-token versions of a response of `len` tokens from its compact form: `stored` when it is
/// not empty, else `len` times `policy_version`.
pub fn token_versions(stored: &[u64], policy_version: u64, len: usize) -> Vec<u64> {
    if stored.is_empty() {
        vec![policy_version; len]
    } else {
        stored.to_vec()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the learner computed for one trajectory, one entry per response token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenOutputs {
    /// `-beta * KL_t`, plus the score at the last token.
    pub rewards: Vec<f32>,
    /// The advantages the policy loss used (after whitening, if configured).
    pub advantages: Vec<f32>,
    /// GAE returns (the value targets); empty without a critic.
    pub returns: Vec<f32>,
}

/// The trajectories one learner step settled, for the trajectory store: those it trained on
/// (with what it computed for them) and those the replay buffer dropped as too stale before
/// forming the step's batch.
#[derive(Debug, Clone)]
pub struct StepRecords {
    pub step: u64,
    pub used: Vec<(Trajectory, TokenOutputs)>,
    pub dropped: Vec<Trajectory>,
}

/// Seconds each stage spent computing on one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageTimes {
    pub generate_s: f64,
    pub reward_s: f64,
    pub value_s: f64,
}

/// A batch of trajectories from one ticket, as it moves between stages (and, encoded, from a
/// worker node back to the head).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrajectoryBatch {
    pub ticket: WorkTicket,
    pub trajectories: Vec<Trajectory>,
    pub times: StageTimes,
    pub tokens_generated: usize,
}

impl TrajectoryBatch {
    /// Every row's prompt ids and response ids, owned, for a job on a device executor.
    pub fn prompts_and_responses(&self) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        self.trajectories
            .iter()
            .map(|t| (t.prompt_ids.clone(), t.response_ids.clone()))
            .unzip()
    }
}

/// Immutable, versioned weights. Receivers share the tensors (no copy per receiver).
#[derive(Debug)]
pub struct WeightsSnapshot {
    pub version: u64,
    pub tensors: HashMap<String, Tensor>,
    pub published_at: Instant,
}

pub type SharedWeights = Arc<WeightsSnapshot>;

// Compile-time: what crosses threads is Send + Sync.
const _: () = {
    const fn is<T: Send + Sync>() {}
    is::<TrajectoryBatch>();
    is::<WeightsSnapshot>();
    is::<WorkTicket>();
    is::<StepRecords>();
};
