//! tandem-models: model code and RL math. Synchronous; no actors, no tokio.
pub mod rl;
