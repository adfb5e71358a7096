//! The run configuration: one TOML file with typed sections, every key documented here.
//!
//! Unknown or mistyped keys are rejected with the file, line and key. Relative paths inside
//! the file are resolved against the directory of the config file. A path may name environment
//! variables as `${NAME}` (an error when unset) or `${NAME:-default}` (the default when unset or
//! empty); the shipped `configs/reward_model.toml` reads its checkpoints from
//! `${TANDEM_FIXTURES:-../fixtures}/hf/...`, so the repository's own fixtures are used unless
//! `TANDEM_FIXTURES` points elsewhere. `--set section.key=value`
//! overrides are applied before validation (the value is parsed as TOML, or taken as a string).
//! The resolved config (overrides applied, paths absolute) is written to the run directory.
//!
//! ```toml
//! seed = 1                 # RNG seed for initialisation, shuffling and sampling
//! steps = 40               # learner steps
//! run_dir = "runs/x"       # output directory (relative to the working directory); --run-dir wins
//!
//! [mode]
//! max_staleness = 1        # 0 = sync on-policy PPO; k = samplers may run k versions ahead
//! publish_every = 1        # learner publishes new weights every M steps (>= 1); samplers then
//!                          # lag the step they sample for by up to max_staleness + M - 1
//!                          # versions (a version counts learner steps), and the learner
//!                          # corrects that data as off-policy (see tandem_actors::learner)
//!
//! [models.policy]          # either a HF checkpoint directory ...
//! path = "../fixtures/hf/gpt2-tiny"
//! [models.policy.builtin]  # ... or a built-in tiny model with the built-in word tokenizer
//! arch = "gpt2"            # gpt2 | qwen2
//! hidden = 64
//! layers = 2
//! heads = 4
//! kv_heads = 2             # qwen2 only
//!
//! [models.critic]
//! init = "reward_model"    # reward_model (InstructGPT) | policy | path. Default: reward_model
//!                          # with reward.kind = "reward_model", else policy
//! path = "..."             # with init = "path"
//!
//! [reward]                 # see crate::reward_sources
//! kind = "positive_words"  # positive_words | reward_model | regex | exact_match | command
//! model = "path/to/rm"     # with kind = "reward_model"
//! words = ["good", ...]    # with kind = "positive_words"; default: a built-in positive list
//! pattern = "\\d+"         # with kind = "regex": searched in the response text
//! match_score = 1.0        # regex / exact_match: score on a match ...
//! miss_score = 0.0         # ... and otherwise. exact_match compares with the prompt line's
//!                          # "answer" (trimmed, whitespace collapsed, lower-cased)
//! command = ["python3", "verifier.py"]  # with kind = "command": JSONL requests on stdin,
//!                          # one score per line on stdout (see tandem_actors::command_reward)
//! cwd = "."                # the command's working directory (default: the config's directory)
//! timeout_s = 10.0         # longest wait for one score line before the command is killed
//! max_restarts = 2         # fresh processes after failures (hang, crash, garbage) per run
//! length_penalty = 0.01    # any kind: score -= length_penalty * max(0, tokens - length_target)
//! length_target = 0
//! no_stop_penalty = -1.0   # any kind: a response with no stop token (sampling.stop_tokens)
//! stop_window = 16         # in its first stop_window tokens (default: all) scores this instead
//!
//! [data]
//! prompts = "data/prompts.jsonl"   # JSONL, one {"prompt": "..."} per line
//! prompt_key = "prompt"    # the field holding the prompt (e.g. "question")
//! answer_key = "answer"    # the field holding the answer (reward.kind = "exact_match")
//! prompt_max_tokens = 64   # prompts are left-truncated to this many tokens
//! prompts_per_step = 32    # prompts per learner step
//! samples_per_prompt = 1   # responses per prompt (> 1 for GRPO / RLOO groups)
//! prompts_per_ticket = 16  # prompts per generation batch; default min(16, prompts_per_step)
//! pretrain = "data/pretrain.jsonl"  # PPO-ptx texts, one {"text": "..."} per line; needs
//!                          # algorithm.ptx_coef > 0 (and ptx_coef > 0 needs this)
//! pretrain_rows = 4        # pretraining texts added to every minibatch
//! pretrain_max_tokens = 64 # each text is cut to its first this many tokens (>= 2)
//!
//! [sampling]               # optional, every key has a default; see tandem_models::SamplingConfig
//! max_new_tokens = 32
//! temperature = 1.0        # finite, >= 0; 0 is greedy (the same as greedy = true: the
//!                          # sampler, reference and learner then all use log-probs at T = 1)
//! top_k = 0                # 0 = off
//! top_p = 1.0              # in (0, 1]; 1 = off. Truncated sampling: see tandem_actors::ppo_trainer
//! greedy = false
//! stop_tokens = [0]        # a response ends after any of these ids (kept in the response).
//!                          # Not given: the HF policy's EOS ids (eos_token_id of its
//!                          # generation_config.json, else of its config.json; a list gives
//!                          # several), none for a built-in model. An explicit [] means no stop
//!                          # token (then only max_new_tokens ends a response)
//! stop_strings = ["<|endoftext|>"]  # added to stop_tokens as ids: each string must be exactly
//!                          # one token with the policy's tokenizer (a multi-token string is
//!                          # rejected, naming its ids: stops are single tokens)
//!
//! [algorithm]              # see tandem_actors::TrainerConfig (defaults from the seed papers)
//! advantage = "gae"        # gae | grpo | rloo
//! kl_penalty = "reward"    # reward (-beta * KL_t in the rewards) | loss (beta * k3 loss term);
//!                          # default: loss for grpo, reward for gae and rloo
//! ppo_epochs = 4           # >= 1
//! minibatch_size = 16      # trajectories per minibatch, >= 1
//! policy_lr = 1e-5         # >= 0
//! critic_lr = 1e-5         # >= 0
//! weight_decay = 0.0       # AdamW, weight matrices only (not biases, norm gains, embeddings)
//! max_grad_norm = 1.0      # 0 = no clipping
//! whiten_advantages = true # GAE only
//! ema_decay = 0.992        # optional EMA of the policy weights, in [0, 1): saved as
//!                          # RUN_DIR/policy_ema beside RUN_DIR/policy, and in checkpoints
//! ptx_coef = 0.0           # PPO-ptx gamma (InstructGPT: 27.8), >= 0; needs data.pretrain
//! gae = { gamma = 1.0, lambda = 0.95 }       # both in [0, 1]
//! grpo = { scale_by_std = true, eps = 1e-6 } # scale_by_std = false: Dr. GRPO (s - mean)
//! loss = { clip_eps = 0.2, value_clip = 0.2, vf_coef = 0.5, entropy_coef = 0.0, aggregation = "token_mean", behaviour_weight_cap = 2.0 }
//!                          # clip_eps in (0, 1); aggregation: token_mean | seq_mean |
//!                          # token_sum (Dr. GRPO: each response's token sum / token_sum_norm,
//!                          # default sampling.max_new_tokens, averaged over responses);
//!                          # behaviour_weight_cap >= 1 truncates the off-policy weight (inf: off)
//! reward = { kl_estimator = "k1", normalize = "none" }  # k1 | k2 | k3; normalize: none |
//!                          # running (mean/std of every score so far); score_clip = c clips
//! kl = { kind = "adaptive", init_beta = 0.1, target = 6.0, k_beta = 0.1 }  # or { kind = "fixed", beta = 0.1 }
//!
//! [placement]              # cpu:N, or cuda:N in a tandem built with `--features cuda` (else
//!                          # a config error, exit 2)
//! rollout_devices = ["cpu:0"]
//! rollouts_per_device = 1
//! reward_device = "cpu:0"
//! value_device = "cpu:0"
//! learner_device = "cpu:1"
//! threads_per_device = 1
//!
//! [[placement.nodes]]      # rollout actors on a worker node (`tandem node --name w1 --join ...`);
//! name = "w1"              # needs [cluster]. The head runs one proxy per rollout (see crate::cluster)
//! rollouts = 2             # rollout actors (samplers) on that node
//! devices = ["cpu:0"]      # the node's devices they use, round-robin
//!
//! [cluster]                # this run is the head of worker nodes (see crate::cluster)
//! listen = "127.0.0.1:7946"  # node listener; loopback by default, port 0 picks a free port
//!                          # (the bound address is written to RUN_DIR/cluster_addr)
//! cookie_file = "cookie"   # the shared secret; else the TANDEM_CLUSTER_COOKIE environment
//!                          # variable. There is no default: a run without either is refused
//! wait_for_nodes_s = 60.0  # how long the start waits for every placed node to join (then warns)
//! chunk_bytes = 1048576    # weights travel as safetensors bytes in chunks of this size
//! sample_timeout_s = 300.0 # a remote batch not back by then fails its proxy (tickets reissued)
//! tls_cert = "head.pem"    # optional TLS for the node sessions: the head's certificate chain
//! tls_key = "head.key"     # (PEM) and private key (PEM), both or neither; workers then need
//!                          # `tandem node --tls-ca FILE`. Without them the session is plain TCP
//!
//! [metrics]
//! enabled = true           # serve Prometheus metrics while the run is live
//! addr = "127.0.0.1:9184"  # bind address (loopback by default); port 0 picks a free port.
//!                          # The bound address is written to RUN_DIR/metrics_addr.
//! sample_interval_s = 1.0  # per-actor samples (RUN_DIR/actors.jsonl, busy/rate gauges)
//! tensorboard = false      # also write each step's scalars as TensorBoard event files to
//!                          # RUN_DIR/tb/ (see crate::tensorboard); independent of `enabled`
//!
//! [channels]               # capacities of the bounded data plane, in generation batches
//! tickets = 2
//! rollout_to_reward = 2
//! reward_to_value = 2
//! value_to_replay = 2
//! replay_capacity = 64     # trajectories the replay buffer may hold (>= batch size)
//!
//! [store]                  # the trajectory store, RUN_DIR/trajectories/ (see crate::store)
//! retention = "all"        # all | every_n (the steps that are multiples of `every`) | none
//! every = 10               # with retention = "every_n"
//! segment_bytes = 67108864 # a segment file is closed and the next begun past this size
//! queue = 4                # learner steps the writer may lag behind before the learner waits
//!
//! [mock_labeller]          # optional: label policy samples, train a reward model on them,
//!                          # then run PPO against it (see crate::mock_labeller)
//! pairs = 512              # labelled training pairs sampled from the initial policy
//! eval_pairs = 128         # held-out pairs
//! words = ["good", ...]    # the programmatic preference: more of these words is better
//!                          # (default: the built-in positive list); ties are not labelled
//! epochs = 4               # reward-model training (see crate::train_rm::TrainSection)
//! batch_size = 32
//! lr = 1e-3
//! normalize = "gain_bias"  # none | reference_bias | gain_bias, on the initial policy's samples
//! min_eval_accuracy = 0.0  # fail before PPO if the reward model is worse than this
//! [checkpoint]             # RUN_DIR/checkpoints/step-K (see crate::checkpoint)
//! every = 10               # learner steps between checkpoints (0: only at the end and on stop)
//! keep = 3                 # complete checkpoints kept (oldest removed first)
//!
//! [supervision]            # see crate::supervisor
//! max_restarts = 5         # rollout/reward/value failures within window_s before the run stops
//! window_s = 60.0
//! backoff_s = 0.1          # first restart delay, doubled per earlier failure of the same actor
//! backoff_max_s = 5.0
//! max_nonfinite_steps = 3  # learner steps in a row with a NaN/Inf loss or gradient before the run stops
//!
//! [faults]                 # fault injection for tests (see tandem_actors::faults); all off by default
//! rollout_panic_every = 0
//! ```
//!
//! A minimal config needs only `steps`, `[models.policy]`, `[reward] kind` and `[data] prompts`.
//!
//! `[data] on_bad_line = "error"` (default) stops at a malformed prompts line with its number;
//! `"skip"` skips such lines, logs each with its number and counts them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_actors::{DeviceId, FaultConfig, TrainerConfig};
use tandem_models::SamplingConfig;

use crate::error::RuntimeError;

/// The most tokens `data.prompt_max_tokens` and `sampling.max_new_tokens` may each be: they
/// size position tables and key-value caches, so a huge value is refused at load (exit 2).
pub const MAX_SEQUENCE_TOKENS: usize = 1 << 17;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub steps: u64,
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    #[serde(default)]
    pub mode: ModeConfig,
    pub models: ModelsConfig,
    pub reward: RewardSourceConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub algorithm: TrainerConfig,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub channels: ChannelsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The controlled mock-labeller experiment (see [`crate::mock_labeller`]).
    #[serde(default)]
    pub mock_labeller: Option<crate::mock_labeller::MockLabellerConfig>,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub supervision: SupervisionConfig,
    #[serde(default, skip_serializing_if = "FaultConfig::is_empty")]
    pub faults: FaultConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub every: u64,
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 10, keep: 3 }
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

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModeConfig {
    pub max_staleness: u64,
    pub publish_every: u64,
}

impl ModeConfig {
    /// How many versions a sampler's policy may lag the step it samples for:
    /// `max_staleness + publish_every - 1` (the gate of samplers and the replay buffer).
    pub fn max_lag(&self) -> u64 {
        self.max_staleness + self.publish_every.max(1) - 1
    }
}

impl Default for ModeConfig {
    fn default() -> Self {
        Self {
            max_staleness: 0,
            publish_every: 1,
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
fn default_ticket() -> usize {
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

/// Whether the config file or an override sets `key` (`section.name`): defaults that depend on
/// other keys (the model's EOS as `sampling.stop_tokens`, `data.prompts_per_ticket`,
/// `models.critic.init`) apply only to keys the user left out.
fn key_given(path: &Path, overrides: &[String], key: &str) -> bool {
    let in_file = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .is_some_and(|t| {
            let mut cur = Some(&t);
            let parts: Vec<&str> = key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                cur = cur.and_then(|c| c.get(*p)).and_then(|v| v.as_table());
            }
            cur.is_some_and(|c| c.contains_key(parts[parts.len() - 1]))
        });
    in_file
        || overrides
            .iter()
            .any(|o| o.split('=').next().map(str::trim) == Some(key))
}

/// Expands `${NAME}` and `${NAME:-default}` in a config path from the environment. `$` not
/// followed by `{` is kept as it is.
pub fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad variable name {name:?} in {s:?}"));
        }
        match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} (named in {s:?}) is not set; set it or write ${{{name}:-default}}"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Config {
    /// Reads, overrides, resolves and validates a config file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        let mut cfg = Self::parse(path, overrides)?;
        cfg.apply_dependent_defaults(|key| key_given(path, overrides, key));
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base).map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        cfg.validate().map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        let given = key_given(path, overrides, "sampling.stop_tokens");
        cfg.resolve_stops(given).map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Reads a run directory's resolved `config.toml` (its paths are absolute), applies
    /// overrides and validates it: how `tandem run --resume` gets its config. The interrupted
    /// run's `[faults]` are not injected again (a resumed run would fail where it failed)
    /// unless an override names `faults`.
    pub fn load_run(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        let mut cfg = Self::parse(path, overrides)?;
        if !cfg.faults.is_empty() && !overrides.iter().any(|o| o.trim_start().starts_with("faults")) {
            tracing::warn!(
                "not injecting the interrupted run's [faults] again; inject faults with --set faults.KEY=VALUE"
            );
            cfg.faults = Default::default();
        }
        cfg.validate().map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        // The resolved config already lists its stop tokens; strings added by --set join them.
        cfg.resolve_stops(true).map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Defaults that depend on other keys, for the keys the config leaves out (`given` says
    /// which it sets): `data.prompts_per_ticket = min(16, data.prompts_per_step)`, and
    /// `models.critic.init = "reward_model"` with a reward model, else `"policy"`.
    fn apply_dependent_defaults(&mut self, given: impl Fn(&str) -> bool) {
        if !given("data.prompts_per_ticket") {
            self.data.prompts_per_ticket = default_ticket().min(self.data.prompts_per_step).max(1);
        }
        if !given("models.critic.init") {
            self.models.critic.init = if self.reward.kind == RewardKind::RewardModel {
                CriticInit::RewardModel
            } else {
                CriticInit::Policy
            };
        }
    }

    fn parse(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        read_toml(path, overrides)
    }

    /// Reads a run directory's resolved `config.toml` as it was written: no overrides and no
    /// check that the files it names still exist.
    pub fn load_resolved(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        toml::from_str(&text).map_err(|e| RuntimeError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Makes every path absolute, relative ones taken from `base` (so the run directory's copy
    /// works from any working directory).
    /// `${NAME}` / `${NAME:-default}` references are expanded first (see the module docs).
    fn resolve_paths(&mut self, base: &Path) -> Result<(), String> {
        let fix = |key: &str, p: &mut PathBuf| -> Result<(), String> {
            let expanded = expand_env(&p.to_string_lossy()).map_err(|m| format!("{key}: {m}"))?;
            let joined = base.join(expanded);
            *p = std::path::absolute(&joined).unwrap_or(joined);
            Ok(())
        };
        fix("data.prompts", &mut self.data.prompts)?;
        if let Some(p) = &mut self.data.pretrain {
            fix("data.pretrain", p)?;
        }
        if let Some(p) = &mut self.models.policy.path {
            fix("models.policy.path", p)?;
        }
        if let Some(p) = &mut self.models.critic.path {
            fix("models.critic.path", p)?;
        }
        if let Some(p) = &mut self.reward.model {
            fix("reward.model", p)?;
        }
        if let Some(c) = self.cluster.as_mut() {
            for (key, p) in [
                ("cluster.cookie_file", &mut c.cookie_file),
                ("cluster.tls_cert", &mut c.tls_cert),
                ("cluster.tls_key", &mut c.tls_key),
            ] {
                if let Some(p) = p {
                    fix(key, p)?;
                }
            }
        }
        if self.reward.kind == RewardKind::Command {
            let cwd = self.reward.cwd.get_or_insert_with(|| PathBuf::from("."));
            fix("reward.cwd", cwd)?;
        }
        Ok(())
    }

    /// Settles `sampling.stop_tokens` (see the module docs): the HF policy's EOS ids when the
    /// config names no stop tokens (`given` false), then the id of every
    /// `sampling.stop_strings` entry, each once.
    pub fn resolve_stops(&mut self, given: bool) -> Result<(), String> {
        let dir = self.models.policy.path.clone();
        if !given {
            if let Some(d) = &dir {
                self.sampling.stop_tokens = tandem_models::eos_token_ids(d)
                    .map_err(|e| format!("sampling.stop_tokens (not given, so the model's EOS): {e}"))?;
            }
        }
        if self.sampling.stop_strings.is_empty() {
            return Ok(());
        }
        let tok = match &dir {
            Some(d) => tandem_models::TextTokenizer::from_dir(d).map_err(|e| e.to_string()),
            None => crate::builtin::tokenizer().map_err(|e| e.to_string()),
        }
        .map_err(|e| format!("sampling.stop_strings: {e}"))?;
        for s in &self.sampling.stop_strings {
            let ids = tok
                .encode(s)
                .map_err(|e| format!("sampling.stop_strings: {s:?}: {e}"))?;
            match ids[..] {
                [id] => {
                    if !self.sampling.stop_tokens.contains(&id) {
                        self.sampling.stop_tokens.push(id);
                    }
                }
                [] => return Err(format!("sampling.stop_strings: {s:?} is no token at all")),
                _ => {
                    return Err(format!(
                        "sampling.stop_strings: {s:?} is {} tokens ({ids:?}) with the policy's tokenizer; \
                         a stop is one token, so give a string that is a single token (such as the EOS \
                         text) or list ids in sampling.stop_tokens",
                        ids.len()
                    ))
                }
            }
        }
        Ok(())
    }

    /// Generation batches per learner step.
    pub fn tickets_per_step(&self) -> usize {
        self.data.prompts_per_step / self.data.prompts_per_ticket
    }

    /// Trajectories per learner step.
    pub fn batch_size(&self) -> usize {
        self.data.prompts_per_step * self.data.samples_per_prompt
    }

    /// Replay capacity in trajectories (default: two learner batches).
    pub fn replay_capacity(&self) -> usize {
        if self.channels.replay_capacity == 0 {
            2 * self.batch_size()
        } else {
            self.channels.replay_capacity
        }
    }

    fn validate(&self) -> Result<(), String> {
        let m = &self.models.policy;
        if m.path.is_some() == m.builtin.is_some() {
            return Err("models.policy: set exactly one of `path` and `builtin`".into());
        }
        if let Some(p) = &m.path {
            if !p.join("config.json").is_file() {
                return Err(format!("models.policy.path: no config.json in {}", p.display()));
            }
        }
        if !self.data.prompts.is_file() {
            return Err(format!("data.prompts: file not found: {}", self.data.prompts.display()));
        }
        let d = &self.data;
        if d.prompts_per_ticket == 0
            || d.prompts_per_step == 0
            || !d.prompts_per_step.is_multiple_of(d.prompts_per_ticket)
        {
            return Err(format!(
                "data.prompts_per_step ({}) must be a positive multiple of data.prompts_per_ticket ({})",
                d.prompts_per_step, d.prompts_per_ticket
            ));
        }
        if d.samples_per_prompt == 0 {
            return Err("data.samples_per_prompt must be >= 1".into());
        }
        if self.sampling.max_new_tokens == 0 {
            return Err("sampling.max_new_tokens must be >= 1".into());
        }
        if self.steps == 0 {
            return Err("steps must be >= 1".into());
        }
        self.validate_algorithm()?;
        use tandem_actors::Advantage;
        match self.algorithm.advantage {
            Advantage::Gae => {
                let c = &self.models.critic;
                match c.init {
                    CriticInit::RewardModel if self.reward.kind != RewardKind::RewardModel => {
                        return Err("models.critic.init = \"reward_model\" needs reward.kind = \"reward_model\"; use init = \"policy\" with a rule-based reward".into())
                    }
                    CriticInit::Path if c.path.is_none() => return Err("models.critic.path is required with init = \"path\"".into()),
                    _ => {}
                }
            }
            _ if d.samples_per_prompt < 2 => {
                return Err("algorithm.advantage grpo/rloo needs data.samples_per_prompt >= 2".into())
            }
            _ => {}
        }
        match self.reward.kind {
            RewardKind::RewardModel => match &self.reward.model {
                None => return Err("reward.model is required with kind = \"reward_model\"".into()),
                Some(p) if !p.join("config.json").is_file() => {
                    return Err(format!("reward.model: no config.json in {}", p.display()))
                }
                _ => {}
            },
            RewardKind::Regex if self.reward.pattern.is_none() => {
                return Err("reward.pattern is required with kind = \"regex\"".into())
            }
            RewardKind::Command if !matches!(&self.reward.command, Some(c) if !c.is_empty()) => {
                return Err(
                    "reward.command (a non-empty list: program and arguments) is required with kind = \"command\""
                        .into(),
                )
            }
            _ => {}
        }
        if !(self.reward.timeout_s > 0.0 && self.reward.timeout_s.is_finite()) {
            return Err("reward.timeout_s must be > 0".into());
        }
        if self.reward.stop_window == Some(0) {
            return Err("reward.stop_window must be >= 1".into());
        }
        if let Some(m) = &self.mock_labeller {
            m.validate(self)?;
        }
        if self.replay_capacity() < self.batch_size() {
            return Err(format!(
                "channels.replay_capacity ({}) must hold at least one batch ({})",
                self.replay_capacity(),
                self.batch_size()
            ));
        }
        if self.metrics.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!("metrics.addr: {:?} is not HOST:PORT", self.metrics.addr));
        }
        if self.metrics.sample_interval_s.is_nan() || self.metrics.sample_interval_s <= 0.0 {
            return Err("metrics.sample_interval_s must be > 0".into());
        }
        if self.store.retention == Retention::EveryN && self.store.every == 0 {
            return Err("store.every must be >= 1 with retention = \"every_n\"".into());
        }
        if self.store.segment_bytes < 1024 || self.store.queue == 0 {
            return Err("store.segment_bytes must be >= 1024 and store.queue >= 1".into());
        }
        if self.checkpoint.keep == 0 {
            return Err("checkpoint.keep must be >= 1".into());
        }
        let sv = &self.supervision;
        if !(sv.window_s > 0.0 && sv.backoff_s >= 0.0 && sv.backoff_max_s >= sv.backoff_s) {
            return Err("supervision: need window_s > 0 and 0 <= backoff_s <= backoff_max_s".into());
        }
        if sv.max_nonfinite_steps == 0 {
            return Err("supervision.max_nonfinite_steps must be >= 1".into());
        }
        let p = &self.placement;
        let local = p.rollout_devices.iter().map(|d| ("placement.rollout_devices", d));
        let stages = [
            ("placement.reward_device", &p.reward_device),
            ("placement.value_device", &p.value_device),
            ("placement.learner_device", &p.learner_device),
        ];
        for (key, d) in local.chain(stages) {
            d.check_built().map_err(|e| format!("{key}: {e}"))?;
        }
        let remote: usize = p.nodes.iter().map(|n| n.rollouts).sum();
        if p.rollout_devices.len() * p.rollouts_per_device + remote == 0 {
            return Err("placement: at least one rollout actor is needed".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for n in &p.nodes {
            let ok = !n.name.is_empty()
                && n.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(format!(
                    "placement.nodes: name {:?} must be letters, digits, '-' or '_'",
                    n.name
                ));
            }
            if !names.insert(&n.name) {
                return Err(format!("placement.nodes: node {:?} is placed twice", n.name));
            }
            if n.rollouts == 0 || n.devices.is_empty() {
                return Err(format!(
                    "placement.nodes {:?}: needs rollouts >= 1 and a device",
                    n.name
                ));
            }
        }
        match &self.cluster {
            None if !p.nodes.is_empty() => {
                return Err("placement.nodes needs a [cluster] section (the head's listener and cookie)".into())
            }
            Some(c) => {
                if c.listen.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!("cluster.listen: {:?} is not HOST:PORT", c.listen));
                }
                if c.chunk_bytes < 1024 || c.chunk_bytes > 16 << 20 {
                    return Err("cluster.chunk_bytes must be between 1024 and 16777216".into());
                }
                if !(c.sample_timeout_s > 0.0 && c.wait_for_nodes_s >= 0.0) {
                    return Err("cluster: need sample_timeout_s > 0 and wait_for_nodes_s >= 0".into());
                }
                if c.tls_cert.is_some() != c.tls_key.is_some() {
                    return Err("cluster.tls_cert and cluster.tls_key go together: set both (TLS) or neither".into());
                }
                for (key, p) in [("tls_cert", &c.tls_cert), ("tls_key", &c.tls_key)] {
                    if let Some(p) = p.as_ref().filter(|p| !p.is_file()) {
                        return Err(format!("cluster.{key}: file not found: {}", p.display()));
                    }
                }
                if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
                    // Unreadable PEM or a key that is not the certificate's: now, not at the head's start.
                    crate::cluster::transport::server_tls(cert, key).map_err(|e| e.to_string())?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Sampling, mode and algorithm settings: each bad value names its key.
    fn validate_algorithm(&self) -> Result<(), String> {
        let bad = |key: &str, want: &str, got: &dyn std::fmt::Display| Err(format!("{key} must be {want}, got {got}"));
        let s = &self.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad(
                "sampling.temperature",
                "a finite number >= 0 (0 = greedy)",
                &s.temperature,
            );
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("sampling.top_p", "in (0, 1]", &s.top_p);
        }
        let d = &self.data;
        if d.prompt_max_tokens == 0 || d.prompt_max_tokens > MAX_SEQUENCE_TOKENS {
            return bad(
                "data.prompt_max_tokens",
                &format!("between 1 and {MAX_SEQUENCE_TOKENS}"),
                &d.prompt_max_tokens,
            );
        }
        if s.max_new_tokens > MAX_SEQUENCE_TOKENS {
            return bad(
                "sampling.max_new_tokens",
                &format!("between 1 and {MAX_SEQUENCE_TOKENS}"),
                &s.max_new_tokens,
            );
        }
        if self.mode.publish_every == 0 {
            return bad("mode.publish_every", ">= 1", &0);
        }
        let a = &self.algorithm;
        if a.ppo_epochs == 0 {
            return bad("algorithm.ppo_epochs", ">= 1", &0);
        }
        if a.minibatch_size == 0 {
            return bad("algorithm.minibatch_size", ">= 1", &0);
        }
        let nonneg = [
            ("algorithm.policy_lr", a.policy_lr),
            ("algorithm.critic_lr", a.critic_lr),
            ("algorithm.weight_decay", a.weight_decay),
            ("algorithm.max_grad_norm", a.max_grad_norm),
            ("algorithm.ptx_coef", a.ptx_coef),
            ("algorithm.grpo.eps", a.grpo.eps),
            ("algorithm.loss.vf_coef", a.loss.vf_coef),
        ];
        for (key, v) in nonneg {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, "a finite number >= 0", &v);
            }
        }
        for (key, v) in [
            ("algorithm.gae.gamma", a.gae.gamma),
            ("algorithm.gae.lambda", a.gae.lambda),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, "in [0, 1]", &v);
            }
        }
        let l = &a.loss;
        if !(l.clip_eps > 0.0 && l.clip_eps < 1.0) {
            return bad("algorithm.loss.clip_eps", "in (0, 1)", &l.clip_eps);
        }
        if let Some(c) = l.value_clip.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return bad("algorithm.loss.value_clip", "a finite number > 0", &c);
        }
        if !l.entropy_coef.is_finite() {
            return bad("algorithm.loss.entropy_coef", "finite", &l.entropy_coef);
        }
        if let Some(c) = l.behaviour_weight_cap.filter(|c| !(*c >= 1.0)) {
            return bad("algorithm.loss.behaviour_weight_cap", ">= 1 (inf: untruncated)", &c);
        }
        if let Some(n) = l.token_sum_norm.filter(|n| !(*n > 0.0 && n.is_finite())) {
            return bad("algorithm.loss.token_sum_norm", "a finite number > 0", &n);
        }
        if let Some(c) = a.reward.score_clip.filter(|c| !(*c > 0.0)) {
            return bad("algorithm.reward.score_clip", "> 0", &c);
        }
        if let Some(e) = a.ema_decay.filter(|e| !(0.0..1.0).contains(e)) {
            return bad("algorithm.ema_decay", "in [0, 1)", &e);
        }
        use tandem_models::rl::KlControllerConfig as Kl;
        match a.kl {
            Kl::Fixed { beta } if !(beta >= 0.0 && beta.is_finite()) => {
                return bad("algorithm.kl.beta", "a finite number >= 0", &beta)
            }
            Kl::Adaptive { init_beta, .. } if !(init_beta > 0.0 && init_beta.is_finite()) => {
                return bad("algorithm.kl.init_beta", "a finite number > 0", &init_beta)
            }
            Kl::Adaptive { target, .. } if !(target > 0.0 && target.is_finite()) => {
                return bad("algorithm.kl.target", "a finite number > 0", &target)
            }
            Kl::Adaptive { k_beta, .. } if !(k_beta > 0.0 && k_beta < 5.0) => {
                return bad("algorithm.kl.k_beta", "in (0, 5)", &k_beta)
            }
            _ => {}
        }
        match (&d.pretrain, a.ptx_coef > 0.0) {
            (None, true) => return Err("algorithm.ptx_coef > 0 needs data.pretrain (PPO-ptx texts)".into()),
            (Some(_), false) => {
                return Err("data.pretrain is set but algorithm.ptx_coef is 0: set a ptx_coef > 0 or remove it".into())
            }
            (Some(p), true) if !p.is_file() => return Err(format!("data.pretrain: file not found: {}", p.display())),
            _ => {}
        }
        if d.pretrain.is_some() && (d.pretrain_rows == 0 || d.pretrain_max_tokens < 2) {
            return Err("data.pretrain_rows must be >= 1 and data.pretrain_max_tokens >= 2".into());
        }
        Ok(())
    }

    /// The config as TOML (what the run directory keeps).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// A config error after `--set` overrides, as `--set KEY=VALUE: what is wrong` when the
/// error's line is a key that an override set, else the error with the line it points at.
fn override_error(e: &toml::de::Error, merged: &str, overrides: &[String]) -> String {
    let line = e.span().map(|sp| {
        let start = merged[..sp.start.min(merged.len())].rfind('\n').map_or(0, |i| i + 1);
        merged[start..].lines().next().unwrap_or("").trim().to_string()
    });
    let key = line
        .as_deref()
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"'));
    let culprit = key.and_then(|k| {
        overrides.iter().rev().find(|o| {
            o.split_once('=')
                .and_then(|(ok, _)| ok.trim().rsplit('.').next())
                .is_some_and(|last| last == k)
        })
    });
    match (culprit, line) {
        (Some(o), _) => format!("--set {o}: {}", e.message().trim()),
        (None, Some(l)) => format!("after --set overrides, at `{l}`: {}", e.message().trim()),
        (None, None) => format!("after --set overrides: {}", e.message().trim()),
    }
}

/// Sets `a.b.c = value` in a TOML table; the value is parsed as TOML or kept as a string.
/// Reads a TOML config file into `T` with `--set` overrides applied; errors name the file,
/// and an error in an overridden value names its `--set` (shared by every command's config).
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T, RuntimeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    let bad = |msg: String| RuntimeError::Config {
        path: path.to_path_buf(),
        msg,
    };
    if overrides.is_empty() {
        return toml::from_str(&text).map_err(|e| bad(e.to_string()));
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for o in overrides {
        apply_override(&mut table, o).map_err(|m| bad(format!("--set {o}: {m}")))?;
    }
    // Parsed again as text, so an error keeps its key and line, and names its --set.
    let merged = toml::to_string(&table).map_err(|e| bad(format!("after --set overrides: {e}")))?;
    toml::from_str(&merged).map_err(|e| bad(override_error(&e, &merged, overrides)))
}

pub(crate) fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec.split_once('=').ok_or("expected section.key=value")?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
