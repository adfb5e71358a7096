//! tandem-runtime: config, placement, the supervision tree and the run directory.
//!
//! A run directory holds the resolved `config.toml`, `metrics.jsonl` (one JSON object per
//! learner step), `actors.jsonl` (per-actor samples), `metrics_addr` (the live Prometheus
//! endpoint), the trajectory store `trajectories/` ([`store`]) and, at the end, the trained
//! `policy/` (and `critic/`) in HF layout. `checkpoints/step-K/` hold what a resumed run
//! continues from ([`checkpoint`]). With `[cluster]`, rollouts also run on worker nodes
//! ([`cluster`]); `cluster_addr` then holds the head's listener and `cluster.jsonl` one line per
//! policy version sent to each node. With `[metrics] tensorboard = true`, `tb/` holds
//! TensorBoard event files ([`tensorboard`]). `tandem.lock` is held by the live run ([`run_dir`]).
//!
//! Besides PPO runs ([`pipeline`]): reward-model training from preferences ([`train_rm`]),
//! best-of-N sampling ([`best_of`]), the mock-labeller experiment ([`mock_labeller`]) and the
//! rule/command reward sources a config can name ([`reward_sources`]).
//!
//! The modules form layers, each using only those below it: [`config`] (a leaf: the schema,
//! its checks and the built-in models); setup ([`policy`], [`reward_sources`], [`prompts`],
//! [`cluster`], [`supervisor`]); the PPO [`pipeline`]; and the recipes above it
//! ([`mock_labeller`], [`best_of`], [`train_rm`], [`sft`], [`eval`]), which the binary
//! chooses among.

#![forbid(unsafe_code)]

pub mod best_of;
pub mod chat;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod error;
pub mod eval;
pub mod interrupts;
pub mod mock_labeller;
pub mod pipeline;
pub mod policy;
pub mod progress;
pub mod prompts;
pub mod reward_sources;
pub mod run_dir;
pub mod sft;
pub mod step_probe;
pub mod store;
pub mod supervised;
pub mod supervisor;
pub mod tasks;
pub mod telemetry;
pub mod tensorboard;
pub mod train_rm;

/// The built-in tiny models (`[models.policy.builtin]`), a part of the config.
pub use config::builtin;
pub use config::{Config, Retention, StoreConfig};
pub use error::RuntimeError;
pub use pipeline::{run, RunOptions, RunSummary};
pub use run_dir::RunDirLock;
