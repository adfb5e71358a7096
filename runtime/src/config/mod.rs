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
//! inflight_updates = false # samplers adopt new weights between decode steps of a running
//!                          # batch, keeping the KV cache (each token records its version)
//! inflight_recompute_kv = false # ... and recompute the cache under the new weights (one
//!                          # prefill of prompt + response so far per adoption)
//! stale = "drop"           # data older than the bound: "drop" the trajectory (counted in
//!                          # dropped_stale), "mask" its older tokens out of the loss (drops
//!                          # only trajectories with no token within the bound), or "train"
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
//!                          # behaviour_weight_cap >= 1 truncates the off-policy weight (inf: off);
//!                          # off_policy_correction = false drops the weight (w = 1: no correction)
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
//! pin_threads = false      # pin each CPU device's threads to cores of their own (cpu:0 ->
//!                          # core 0, cpu:1 -> core 1, ... of the usable cores), so the OS never
//!                          # runs two devices on one core while another idles; off when they
//!                          # need more cores than this process may use (a warning says so).
//!                          # Best on a machine the run has to itself.
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
//! [eval]                   # optional: greedy held-out evaluation during the run
//! every = 10               # learner steps between evaluations (>= 1, a multiple of
//!                          # mode.publish_every); the last step is always evaluated
//! prompts = "data/eval.jsonl"  # held-out prompts, read like data.prompts (data.prompt_key,
//!                          # data.answer_key, data.prompt_max_tokens)
//! max_prompts = 0          # evaluate only the first N prompts (0: all)
//!                          # Each evaluated step's metrics.jsonl line gets eval_score_mean,
//!                          # eval_accuracy (exact_match / regex), eval_mean_length and
//!                          # eval_no_stop_fraction: the weights published after that step,
//!                          # decoded greedily with [sampling]'s limits and stop tokens on the
//!                          # first rollout device, scored by [reward] as `tandem eval` does.
//!                          # It reads the published weights only: what the run trains on is
//!                          # the same with or without it
//! [checkpoints]            # RUN_DIR/checkpoints/step-K (see crate::checkpoint); the section
//!                          # of sft and train-rm too. `[checkpoint]`, its older name, still reads
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
//! rollout_stall_every = 0  # every Nth generation batch is held rollout_stall_s seconds (a straggler)
//! rollout_stall_s = 0.0
//! ```
//!
//! A minimal config needs only `steps`, `[models.policy]`, `[reward] kind` and `[data] prompts`.
//!
//! `[data] on_bad_line = "error"` (default) stops at a malformed prompts line with its number;
//! `"skip"` skips such lines, logs each with its number and counts them.
//!
//! The parts: `sections` (every section's schema and defaults), `validate` (the checks
//! `load` runs), `toml_file` (reading, `--set` overrides, `${NAME}` expansion) and
//! [`builtin`] (the built-in tiny models a config can name). It imports nothing of the crate
//! but its error type: what runs a config (pipeline, recipes, cluster) sits above it.

pub mod builtin;
mod sections;
mod toml_file;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_actors::{FaultConfig, TrainerConfig};
use tandem_models::SamplingConfig;

use crate::error::RuntimeError;
pub use sections::*;
pub use toml_file::expand_env;
use toml_file::key_given;
pub(crate) use toml_file::read_toml;

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
    pub mock_labeller: Option<MockLabellerConfig>,
    /// `[checkpoints]`; `[checkpoint]`, its older name, is read as the same section.
    #[serde(default, alias = "checkpoint")]
    pub checkpoints: RunCheckpoints,
    #[serde(default)]
    pub supervision: SupervisionConfig,
    #[serde(default, skip_serializing_if = "FaultConfig::is_empty")]
    pub faults: FaultConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Greedy held-out evaluation during the run (see [`crate::pipeline`]'s evaluator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalConfig>,
}

fn default_seed() -> u64 {
    1
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
        if let Some(e) = &mut self.eval {
            fix("eval.prompts", &mut e.prompts)?;
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
            None => builtin::tokenizer().map_err(|e| e.to_string()),
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

    /// The config as TOML (what the run directory keeps).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}
