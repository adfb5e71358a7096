//! Models with heads: [`LanguageModel`] (policy, reference) and [`ScalarModel`] (reward model,
//! critic), each over a [`Backbone`] of either family.
//!
//! Construction:
//! - [`LanguageModel::load`] / [`ScalarModel::load`] read a HF checkpoint directory into frozen
//!   tensors (inference: reference model, reward model, samplers).
//! - `from_tensors` builds a model over an existing name → tensor map without copying it; this
//!   is how samplers adopt a published policy snapshot.
//! - `trainable` builds the model over a candle `VarMap` (returned alongside) from a checkpoint
//!   or a seeded random initialisation; optimisers update the vars in place.
//!
//! Padding: every forward takes an attention mask (1 = real token, 0 = pad) and works with left
//! padding (prompts), right padding (responses) or both. Position ids count real tokens only,
//! so a padded row gives the same numbers as the same row unpadded.
//!
//! Scores: a scalar model reads its `score` projection at the last real token of each row (by
//! mask; transformers finds it from `pad_token_id`, which agrees unless a sequence contains
//! the pad id as a real token, e.g. an EOS that doubles as pad). Values are the same
//! projection at every position, which is how a critic initialised from a reward model
//! (InstructGPT) starts.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::checkpoint::load_tensors;
use crate::config::{Architecture, HeadKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gpt2::Gpt2;
use crate::kv_cache::KvCache;
use crate::layers::{AttentionInputs, Positions};
use crate::llama::Llama;

/// The transformer trunk of either family.
#[derive(Debug, Clone)]
pub enum Backbone {
    Gpt2(Gpt2),
    Llama(Llama),
}

impl Backbone {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match &config.arch {
            Architecture::Gpt2(c) => Backbone::Gpt2(Gpt2::new(c, vb)?),
            Architecture::Qwen2(c) | Architecture::Llama(c) => Backbone::Llama(Llama::new(c, vb)?),
        })
    }

    /// Final hidden states at the positions `out` selects (see [`Positions`]).
    pub fn forward(
        &self,
        ids: &Tensor,
        attn: &AttentionInputs,
        cache: Option<&mut KvCache>,
        out: Positions,
    ) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Gpt2(m) => m.forward(ids, attn, cache, out),
            Backbone::Llama(m) => m.forward(ids, attn, cache, out),
        }
    }

    fn token_embedding(&self) -> &Tensor {
        match self {
            Backbone::Gpt2(m) => m.wte(),
            Backbone::Llama(m) => m.embed_tokens(),
        }
    }
}

/// How a trainable model's parameters get their first values.
#[derive(Debug, Clone, Copy)]
pub enum WeightInit<'a> {
    /// Seeded random initialisation: matrices ~ N(0, 0.02²), norm weights 1, biases 0.
    Random { seed: u64 },
    /// Values from a loaded checkpoint. A `score` head absent from it (a critic started from a
    /// policy checkpoint) is initialised randomly with `seed`; any other absent tensor is an error.
    Checkpoint {
        tensors: &'a HashMap<String, Tensor>,
        dir: &'a Path,
        seed: u64,
    },
}

impl<'a> WeightInit<'a> {
    /// From a checkpoint's directory and tensors when one was loaded, else seeded random.
    pub fn loaded_or_random(loaded: Option<&'a (std::path::PathBuf, HashMap<String, Tensor>)>, seed: u64) -> Self {
        match loaded {
            Some((dir, tensors)) => WeightInit::Checkpoint { tensors, dir, seed },
            None => WeightInit::Random { seed },
        }
    }
}

/// Seeded initial value for the parameter `name` of `shape`.
fn init_value(name: &str, shape: &[usize], rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let last = name.rsplit('.').nth(1).unwrap_or("");
    let is_norm = last.starts_with("ln_") || last.ends_with("norm") || last.ends_with("layernorm");
    let data: Vec<f32> = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if is_norm {
        vec![1.0; n]
    } else {
        let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
        (0..n).map(|_| normal.sample(rng)).collect()
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Builds `ctor` over a fresh `VarMap` and fills every var according to `init`, in name order
/// so random initialisation is reproducible.
fn build_trainable<M>(
    config: &ModelConfig,
    init: WeightInit,
    device: &Device,
    ctor: impl FnOnce(&ModelConfig, VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, VarMap)> {
    let varmap = VarMap::new();
    let model = ctor(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    {
        let data = varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let seed = match init {
            WeightInit::Random { seed } | WeightInit::Checkpoint { seed, .. } => seed,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        for name in names {
            let var = &data[name];
            let shape = var.dims().to_vec();
            let value = match init {
                WeightInit::Checkpoint { tensors, dir, .. } => match tensors.get(name) {
                    Some(t) if t.dims() == shape.as_slice() => t.to_device(device)?,
                    Some(t) => {
                        return Err(ModelError::ShapeMismatch {
                            dir: dir.into(),
                            name: name.clone(),
                            expected: shape,
                            found: t.dims().to_vec(),
                        })
                    }
                    None if name.starts_with("score.") => init_value(name, &shape, &mut rng, device)?,
                    None => {
                        return Err(ModelError::MissingTensor {
                            dir: dir.into(),
                            name: name.clone(),
                        })
                    }
                },
                WeightInit::Random { .. } => init_value(name, &shape, &mut rng, device)?,
            };
            var.set(&value)?;
        }
    }
    Ok((model, varmap))
}

/// Frozen construction over shared tensors, with checkpoint errors that name the tensor.
fn build_frozen<M>(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    dir: &Path,
    device: &Device,
    ctor: impl FnOnce(&ModelConfig, VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    ctor(config, VarBuilder::from_tensors(tensors, DType::F32, device)).map_err(|e| match strip_backtrace(e) {
        candle_core::Error::CannotFindTensor { path } => ModelError::MissingTensor {
            dir: dir.into(),
            name: path,
        },
        e @ candle_core::Error::UnexpectedShape { .. } => {
            ModelError::InvalidArgument(format!("checkpoint {}: {e}", dir.display()))
        }
        other => ModelError::Candle(other),
    })
}

fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        other => other,
    }
}

/// Copies the current values of a `VarMap` into detached tensors: the immutable weight
/// snapshot that samplers adopt via `from_tensors`.
pub fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Per-token outputs of a language-model forward.
#[derive(Debug, Clone)]
pub struct TokenOutputs {
    /// log p(target) per position, (b, n).
    pub logprobs: Tensor,
    /// Entropy of the next-token distribution per position, (b, n).
    pub entropy: Tensor,
}

/// A causal language model: backbone plus next-token head.
#[derive(Debug, Clone)]
pub struct LanguageModel {
    config: ModelConfig,
    backbone: Backbone,
    lm_head: Tensor,
    device: Device,
}

fn check_head(config: &ModelConfig, want: HeadKind, dir: &Path) -> Result<()> {
    if config.head != want {
        return Err(ModelError::BadConfig {
            path: dir.join("config.json"),
            key: "architectures",
            msg: format!("{} is not a {:?} model", config.hf_class(), want),
        });
    }
    Ok(())
}

impl LanguageModel {
    fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let backbone = Backbone::new(config, vb.clone())?;
        let dims = config.dims();
        let lm_head = match &config.arch {
            Architecture::Qwen2(c) | Architecture::Llama(c) if !c.tie_word_embeddings => {
                vb.pp("lm_head").get((dims.vocab_size, dims.hidden), "weight")?
            }
            _ => backbone.token_embedding().clone(),
        };
        Ok(Self {
            config: config.clone().with_head(HeadKind::CausalLm),
            backbone,
            lm_head,
            device: vb.device().clone(),
        })
    }

    /// Loads a `*ForCausalLM` / `GPT2LMHeadModel` checkpoint directory, frozen.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        check_head(&config, HeadKind::CausalLm, dir)?;
        let tensors = load_tensors(dir, &config, device)?;
        build_frozen(&config, tensors, dir, device, Self::new)
    }

    /// A frozen model over `tensors` (shared, not copied).
    pub fn from_tensors(config: &ModelConfig, tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        build_frozen(config, tensors, Path::new("<in-memory weights>"), device, Self::new)
    }

    /// A trainable model and the `VarMap` holding its parameters.
    pub fn trainable(config: &ModelConfig, init: WeightInit, device: &Device) -> Result<(Self, VarMap)> {
        build_trainable(config, init, device, Self::new)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Next-token logits (b, q, V) for the new tokens `ids` (b, q). `key_mask` covers the cached
    /// positions and the new ones; with `cache = None` it covers just `ids`.
    pub fn forward(&self, ids: &Tensor, key_mask: &[Vec<f32>], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden(ids, key_mask, cache, Positions::All)?;
        Ok(self.head(&h)?)
    }

    /// Logits (b, V) of the token after the last column of `ids`; see [`Self::forward`].
    pub fn next_token_logits(
        &self,
        ids: &Tensor,
        key_mask: &[Vec<f32>],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let h = self.hidden(ids, key_mask, cache, Positions::Span { start: t - 1, len: 1 })?;
        Ok(self.head(&h)?.squeeze(1)?)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        key_mask: &[Vec<f32>],
        cache: Option<&mut KvCache>,
        out: Positions,
    ) -> Result<Tensor> {
        let (_, q) = ids.dims2()?;
        let attn = AttentionInputs::new(key_mask, q, &self.device)?;
        self.check_positions(&attn)?;
        Ok(self.backbone.forward(ids, &attn, cache, out)?)
    }

    fn head(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        h.reshape((b * t, d))?.matmul(&self.lm_head.t()?)?.reshape((b, t, ()))
    }

    fn check_positions(&self, attn: &AttentionInputs) -> Result<()> {
        let max = self.config.dims().max_positions;
        let p = attn.max_position()? as usize;
        if p >= max {
            return Err(ModelError::InvalidArgument(format!(
                "sequence needs position {p} but the model has {max} positions"
            )));
        }
        Ok(())
    }

    /// Log-probs of the given tokens under the model, and the entropy of each next-token
    /// distribution. Column j is about predicting `ids[:, start + 1 + j]` from `ids[:, ..= start + j]`,
    /// so the result has `t - 1 - start` columns; `start = 0` scores every token after the
    /// first. Logits are divided by `temperature` first (use the sampler's temperature so PPO
    /// ratios compare like with like). Differentiable.
    pub fn token_logprobs(&self, ids: &Tensor, mask: &Tensor, start: usize, temperature: f64) -> Result<TokenOutputs> {
        let (_, t) = ids.dims2()?;
        if start + 1 >= t {
            return Err(ModelError::InvalidArgument(format!(
                "start {start} leaves no target in a sequence of {t}"
            )));
        }
        let mask_rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let attn = AttentionInputs::new(&mask_rows, t, &self.device)?;
        self.check_positions(&attn)?;
        let n = t - 1 - start;
        let h = self
            .backbone
            .forward(ids, &attn, None, Positions::Span { start, len: n })?;
        let logits = self.head(&h)?;
        let targets = ids.narrow(1, start + 1, n)?;
        let (logprobs, entropy) = crate::kernels::token_logprobs_entropy(&logits, &targets, temperature)?;
        Ok(TokenOutputs { logprobs, entropy })
    }
}

/// A backbone with a scalar `score` projection: reward model (score at the last real token) or
/// critic (value at every token).
#[derive(Debug, Clone)]
pub struct ScalarModel {
    config: ModelConfig,
    backbone: Backbone,
    score: Tensor,
    device: Device,
}

impl ScalarModel {
    fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let backbone = Backbone::new(config, vb.clone())?;
        let score = vb.pp("score").get((1, config.dims().hidden), "weight")?;
        Ok(Self {
            config: config.clone().with_head(HeadKind::Scalar),
            backbone,
            score,
            device: vb.device().clone(),
        })
    }

    /// Loads a `*ForSequenceClassification` checkpoint with one label, frozen.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        check_head(&config, HeadKind::Scalar, dir)?;
        let tensors = load_tensors(dir, &config, device)?;
        build_frozen(&config, tensors, dir, device, Self::new)
    }

    pub fn from_tensors(config: &ModelConfig, tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        build_frozen(config, tensors, Path::new("<in-memory weights>"), device, Self::new)
    }

    /// A trainable scalar model. From a language-model checkpoint the `score` head is fresh.
    pub fn trainable(config: &ModelConfig, init: WeightInit, device: &Device) -> Result<(Self, VarMap)> {
        build_trainable(&config.with_head(HeadKind::Scalar), init, device, Self::new)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Per-token values (b, t). Differentiable.
    pub fn values(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask_rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        self.project(ids, &mask_rows, Positions::All)
    }

    /// Values at positions `start .. start + len` of every row (b, len): the columns of
    /// [`Self::values`], with the last block computed only there. Differentiable.
    pub fn values_at(&self, ids: &Tensor, mask: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let t = ids.dim(1)?;
        if start + len > t {
            return Err(ModelError::InvalidArgument(format!(
                "values at {start}..{} of a sequence of {t}",
                start + len
            )));
        }
        let mask_rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        self.project(ids, &mask_rows, Positions::Span { start, len })
    }

    /// The score projection of the final hidden states at `out`: (b, positions).
    fn project(&self, ids: &Tensor, mask_rows: &[Vec<f32>], out: Positions) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let attn = AttentionInputs::new(mask_rows, t, &self.device)?;
        let h = self.backbone.forward(ids, &attn, None, out)?;
        let (b, n, d) = h.dims3()?;
        Ok(h.reshape((b * n, d))?.matmul(&self.score.t()?)?.reshape((b, n))?)
    }

    /// One score per row (b,), read at the row's last real token. Differentiable.
    pub fn scores(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask_rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let last: Vec<u32> = mask_rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                row.iter()
                    .rposition(|&m| m > 0.0)
                    .map(|p| p as u32)
                    .ok_or_else(|| ModelError::InvalidArgument(format!("row {i} of the batch has no real token")))
            })
            .collect::<Result<_>>()?;
        Ok(self.project(ids, &mask_rows, Positions::PerRow(&last))?.squeeze(1)?)
    }
}
