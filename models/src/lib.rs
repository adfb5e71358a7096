//! tandem-models: the model code and RL math of tandem. Synchronous; no actors, no tokio.
//!
//! - [`config`]: HF `config.json` for GPT-2 and the Qwen2/Llama family.
//! - [`checkpoint`]: HF checkpoint directories (single or sharded safetensors) in and out.
//! - [`model`]: [`LanguageModel`] (policy, reference) and [`ScalarModel`] (reward, critic).
//! - [`generation`]: batched sampling with a KV cache and behaviour log-probs.
//! - [`tokenizer`]: `tokenizer.json` via the `tokenizers` crate.
//! - [`kernels`]: fused CPU kernels (GELU, ...) with a backward, beside their reference forms.
//! - [`rl`]: RL math: KL, rewards, KL control, GAE, PPO, critic-free advantages, RM losses.

pub mod adamw;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
pub mod gpt2;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod model;
pub mod rl;
pub mod score_map;
pub mod tokenizer;

pub use adamw::AdamW;
pub use checkpoint::{checkpoint_dtype, copy_side_files, load_tensors, save_checkpoint, save_checkpoint_as};
pub use config::{eos_token_ids, HeadKind, ModelConfig};
pub use error::{ModelError, Result};
pub use generation::{generate, generate_inflight, Decoding, Generation, Inflight, InflightKv, SamplingConfig};
pub use kv_cache::KvCache;
pub use model::{snapshot, LanguageModel, ScalarModel, TokenOutputs, WeightInit};
pub use tokenizer::{ChatTemplateSource, TextTokenizer};
