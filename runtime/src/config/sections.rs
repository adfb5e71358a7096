//! The config's sections: their schema and defaults (the keys are documented in
//! [`super`]).

use std::marker::PhantomData;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_actors::DeviceId;

/// The head's side of worker nodes (see `crate::cluster`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub listen: String,
    pub cookie_file: Option<PathBuf>,
    pub wait_for_nodes_s: f64,
    pub chunk_bytes: usize,
    pub sample_timeout_s: f64,
    /// PEM certificate chain the head presents to nodes (TLS on when set, with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7946".into(),
            cookie_file: None,
            wait_for_nodes_s: 60.0,
            chunk_bytes: 1 << 20,
            sample_timeout_s: 300.0,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Rollout actors placed on one worker node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePlacement {
    pub name: String,
    pub rollouts: usize,
    #[serde(default = "default_node_devices")]
    pub devices: Vec<DeviceId>,
}

fn default_node_devices() -> Vec<DeviceId> {
    vec![DeviceId::Cpu(0)]
}

/// `[checkpoints]`, the one checkpoint section of every command: `RUN_DIR/checkpoints/step-K`
/// every `every` steps, the last `keep` kept (default 3). Only the default of `every` differs
/// by command, `D`: 10 learner steps for `tandem run` ([`RunCheckpoints`]), 0 (none until the
/// end or a stop) for `tandem sft` and `tandem train-rm` ([`SupervisedCheckpoints`]), whose
/// steps are cheap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct CheckpointConfig<D: DefaultEvery> {
    pub every: u64,
    pub keep: usize,
    #[serde(skip)]
    pub defaults: PhantomData<D>,
}

/// A command's default `checkpoints.every`.
pub trait DefaultEvery {
    const EVERY: u64;
}

/// `tandem run`'s default: every 10 learner steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EveryTenSteps;

impl DefaultEvery for EveryTenSteps {
    const EVERY: u64 = 10;
}

/// `tandem sft` and `tandem train-rm`'s default: none between the start and the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtTheEnd;

impl DefaultEvery for AtTheEnd {
    const EVERY: u64 = 0;
}

pub type RunCheckpoints = CheckpointConfig<EveryTenSteps>;
pub type SupervisedCheckpoints = CheckpointConfig<AtTheEnd>;

impl<D: DefaultEvery> Default for CheckpointConfig<D> {
    fn default() -> Self {
        Self {
            every: D::EVERY,
            keep: 3,
            defaults: PhantomData,
        }
    }
}

impl<D: DefaultEvery> CheckpointConfig<D> {
    pub fn validate(&self) -> Result<(), String> {
        if self.keep == 0 {
            return Err("checkpoints.keep must be >= 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    pub max_restarts: u64,
    pub window_s: f64,
    pub backoff_s: f64,
    pub backoff_max_s: f64,
    pub max_nonfinite_steps: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window_s: 60.0,
            backoff_s: 0.1,
            backoff_max_s: 5.0,
            max_nonfinite_steps: 3,
        }
    }
}

/// What to do with a malformed prompts line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadLinePolicy {
    #[default]
    Error,
    Skip,
}

/// Which steps' trajectories the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    #[default]
    All,
    /// Steps that are multiples of `store.every`.
    EveryN,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub retention: Retention,
    pub every: u64,
    pub segment_bytes: u64,
    pub queue: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: Retention::All,
            every: 10,
            segment_bytes: 64 << 20,
            queue: 4,
        }
    }
}

impl StoreConfig {
    /// Whether the trajectories of `step` are stored.
    pub fn keeps(&self, step: u64) -> bool {
        match self.retention {
            Retention::All => true,
            Retention::EveryN => step.is_multiple_of(self.every.max(1)),
            Retention::None => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub addr: String,
    pub sample_interval_s: f64,
    /// Per-step scalars as TensorBoard event files in `RUN_DIR/tb/` (see crate::tensorboard).
    pub tensorboard: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: "127.0.0.1:9184".into(),
            sample_interval_s: 1.0,
            tensorboard: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModeConfig {
    pub max_staleness: u64,
    pub publish_every: u64,
    /// Samplers adopt a newly published policy between two decode steps of a running batch
    /// (see `tandem_actors::rollout`); off: only between batches.
    pub inflight_updates: bool,
    /// With in-flight updates, run the prefix through the new weights into a fresh KV cache
    /// at each adoption (one prefill per adoption) instead of keeping the old weights' cache.
    pub inflight_recompute_kv: bool,
    /// What becomes of data older than the staleness bound: "drop" (the trajectory), "mask"
    /// (no loss on its older tokens) or "train" (everything, corrected off-policy); see
    /// `tandem_actors::replay::StalePolicy`.
    pub stale: tandem_actors::StalePolicy,
}

impl ModeConfig {
    /// How many versions a sampler's policy may lag the step it samples for:
    /// `max_staleness + publish_every - 1` (the gate of samplers and the replay buffer).
    pub fn max_lag(&self) -> u64 {
        self.max_staleness + self.publish_every.max(1) - 1
    }

    /// How samplers adopt weights within a batch: `None` when they do not.
    pub fn inflight(&self) -> Option<tandem_models::InflightKv> {
        self.inflight_updates.then_some(if self.inflight_recompute_kv {
            tandem_models::InflightKv::Recompute
        } else {
            tandem_models::InflightKv::Keep
        })
    }
}

impl Default for ModeConfig {
    fn default() -> Self {
        Self {
            max_staleness: 0,
            publish_every: 1,
            inflight_updates: false,
            inflight_recompute_kv: false,
            stale: tandem_actors::StalePolicy::Drop,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub policy: ModelSource,
    #[serde(default)]
    pub critic: CriticConfig,
}

/// A HF checkpoint directory or a built-in tiny model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub builtin: Option<BuiltinModel>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinModel {
    pub arch: BuiltinArch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default)]
    pub kv_heads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinArch {
    Gpt2,
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CriticInit {
    #[default]
    RewardModel,
    Policy,
    Path,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriticConfig {
    #[serde(default)]
    pub init: CriticInit,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    PositiveWords,
    RewardModel,
    Regex,
    ExactMatch,
    Command,
}

/// `[reward]`; the rule and command sources are built in [`crate::reward_sources`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSourceConfig {
    pub kind: RewardKind,
    #[serde(default)]
    pub model: Option<PathBuf>,
    #[serde(default)]
    pub words: Option<Vec<String>>,
    /// `kind = "regex"`: the pattern searched in the response text.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Rule sources: score on a match / otherwise.
    #[serde(default = "one_f32")]
    pub match_score: f32,
    #[serde(default)]
    pub miss_score: f32,
    /// `kind = "command"`: program and arguments, working directory (default: the config's).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    #[serde(default = "default_restarts")]
    pub max_restarts: u32,
    /// Any kind: `score -= length_penalty * max(0, response tokens - length_target)`.
    #[serde(default)]
    pub length_penalty: Option<f32>,
    #[serde(default)]
    pub length_target: usize,
    /// Any kind: a response with no stop token in its first `stop_window` tokens (default:
    /// all of them) scores `no_stop_penalty` instead.
    #[serde(default)]
    pub no_stop_penalty: Option<f32>,
    #[serde(default)]
    pub stop_window: Option<usize>,
}

fn one_f32() -> f32 {
    1.0
}
fn default_timeout_s() -> f64 {
    10.0
}
fn default_restarts() -> u32 {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub prompts: PathBuf,
    #[serde(default = "default_prompt_max")]
    pub prompt_max_tokens: usize,
    #[serde(default = "default_prompts_per_step")]
    pub prompts_per_step: usize,
    #[serde(default = "one")]
    pub samples_per_prompt: usize,
    #[serde(default = "default_ticket")]
    pub prompts_per_ticket: usize,
    /// The field of a prompts line that holds the prompt.
    #[serde(default = "default_prompt_key")]
    pub prompt_key: String,
    /// The field that holds the reference answer (`reward.kind = "exact_match"`).
    #[serde(default = "default_answer_key")]
    pub answer_key: String,
    #[serde(default)]
    pub on_bad_line: BadLinePolicy,
    /// PPO-ptx pretraining texts (JSONL with a "text" string per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<PathBuf>,
    #[serde(default = "default_pretrain_rows")]
    pub pretrain_rows: usize,
    #[serde(default = "default_pretrain_max_tokens")]
    pub pretrain_max_tokens: usize,
}

fn default_pretrain_rows() -> usize {
    4
}
fn default_pretrain_max_tokens() -> usize {
    64
}

fn default_prompt_max() -> usize {
    64
}
fn one() -> usize {
    1
}
pub(super) fn default_ticket() -> usize {
    16
}
fn default_prompt_key() -> String {
    "prompt".into()
}
fn default_answer_key() -> String {
    "answer".into()
}
fn default_prompts_per_step() -> usize {
    32
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    pub rollout_devices: Vec<DeviceId>,
    pub rollouts_per_device: usize,
    pub reward_device: DeviceId,
    pub value_device: DeviceId,
    pub learner_device: DeviceId,
    pub threads_per_device: usize,
    /// Pin each CPU device's threads to cores of their own (see `tandem_actors::device::core_plan`).
    pub pin_threads: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodePlacement>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            rollout_devices: vec![DeviceId::Cpu(0)],
            rollouts_per_device: 1,
            reward_device: DeviceId::Cpu(0),
            value_device: DeviceId::Cpu(0),
            learner_device: DeviceId::Cpu(1),
            threads_per_device: 1,
            pin_threads: false,
            nodes: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsConfig {
    pub tickets: usize,
    pub rollout_to_reward: usize,
    pub reward_to_value: usize,
    pub value_to_replay: usize,
    pub replay_capacity: usize,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            tickets: 2,
            rollout_to_reward: 2,
            reward_to_value: 2,
            value_to_replay: 2,
            replay_capacity: 0,
        }
    }
}

/// `[mock_labeller]`; see `crate::mock_labeller`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockLabellerConfig {
    pub pairs: usize,
    pub eval_pairs: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub normalize: NormalizeKind,
    pub min_eval_accuracy: f64,
}

impl Default for MockLabellerConfig {
    fn default() -> Self {
        Self {
            pairs: 512,
            eval_pairs: 128,
            epochs: 4,
            batch_size: 32,
            lr: 1e-3,
            normalize: NormalizeKind::GainBias,
            min_eval_accuracy: 0.0,
        }
    }
}

/// How a trained reward model's scores are shifted and scaled (see `crate::train_rm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeKind {
    #[default]
    None,
    ReferenceBias,
    GainBias,
}

/// `[eval]`: greedy evaluation on held-out prompts during a run; see `crate::pipeline::evaluator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Learner steps between evaluations (the last step is always evaluated).
    pub every: u64,
    /// Held-out prompts JSONL, read like `data.prompts` (with `data.answer_key` for exact match).
    pub prompts: PathBuf,
    /// Evaluate only the first this many prompts (0: all).
    #[serde(default)]
    pub max_prompts: usize,
}
