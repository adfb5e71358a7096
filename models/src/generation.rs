//! Batched sampling with a KV cache.
//!
//! Prompts of different lengths are left-padded; every step appends one token per row. A row
//! stops at its first stop token (which is kept in the response) or after `max_new_tokens`;
//! finished rows are fed padding that no later token attends to.
//!
//! ## Which log-probs are recorded
//! Each step draws from the *sampling distribution* q: softmax(logits / temperature),
//! restricted to the `top_k` most likely tokens (if `top_k > 0`), then to the smallest set
//! whose probability reaches `top_p` (if `top_p < 1`; at least one token), renormalised.
//! `logprobs` holds log q(token) — the behaviour policy that actually produced the sample, which
//! is what off-policy corrections need. Because truncation moves mass onto kept tokens,
//! log q >= log softmax(logits / T) for every sampled token. `full_logprobs` holds the latter,
//! untruncated log-prob at the same temperature, which is what a learner recomputing
//! `token_logprobs(.., temperature)` gets back for an unchanged policy. With temperature 1 and
//! no truncation the two agree. Greedy decoding (`greedy = true`, or temperature 0, which
//! means the same thing) is a point mass: its `logprobs` are 0 and `full_logprobs` are
//! log softmax(logits), at temperature 1 — the temperature every consumer of these log-probs
//! (reference model, learner) must use too: [`SamplingConfig::logprob_temperature`].
//!
//! Sampling uses the caller's seeded RNG and walks tokens in a fixed order, so a seed gives the
//! same responses every time (and the same with or without the cache, up to float rounding).
//!
//! ## In-flight weight updates
//! [`generate_inflight`] asks an [`Inflight`] source for newer weights before every decode
//! forward after the first. When it returns a model, that model computes the logits of the
//! next step, so every row's tokens from that step on are sampled by the new policy
//! ([`Generation::adopted`] lists the step at which each version took over; row `i`'s `j`-th
//! token is always sampled at step `j`). What happens to the KV cache is the source's
//! [`InflightKv`]: `Keep` (as PipelineRL does) goes on attending over keys and values the old
//! weights computed, which costs nothing, so later tokens are sampled from a mix of the two
//! policies that the recorded log-probs describe exactly (they are what was sampled from);
//! `Recompute` runs the whole prefix (prompt and response so far) through the new weights
//! into a fresh cache, one prefill of `prompt + step` tokens per adoption, after which the
//! sampling distribution is exactly the new policy's.

use std::sync::Arc;

use candle_core::{Tensor, D};
use rand::{rngs::StdRng, Rng};
use serde::{Deserialize, Serialize};

use crate::batch::{PadSide, PaddedBatch};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::model::LanguageModel;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Upper bound on generated tokens per prompt.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Logits are divided by this before softmax; 0 means greedy (log-probs at 1).
    #[serde(default = "one")]
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 disables.
    #[serde(default)]
    pub top_k: usize,
    /// Nucleus sampling mass; 1.0 disables.
    #[serde(default = "one")]
    pub top_p: f64,
    /// Always take the most likely token.
    #[serde(default)]
    pub greedy: bool,
    /// A row finishes after emitting any of these (the token is part of the response).
    #[serde(default)]
    pub stop_tokens: Vec<u32>,
    /// Stop strings. Generation itself reads only `stop_tokens`: the runtime's config loading
    /// (`tandem_runtime::config`) turns each string into its one token id with the policy's
    /// tokenizer and adds it to `stop_tokens`.
    #[serde(default)]
    pub stop_strings: Vec<String>,
}

fn one() -> f64 {
    1.0
}

fn default_max_new_tokens() -> usize {
    32
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new_tokens(),
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            greedy: false,
            stop_tokens: vec![],
            stop_strings: vec![],
        }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            greedy: true,
            ..Self::default()
        }
    }

    /// Whether decoding is greedy: `greedy = true` or temperature 0.
    pub fn is_greedy(&self) -> bool {
        self.greedy || self.temperature == 0.0
    }

    /// The temperature of the recorded `full_logprobs`, hence the one the reference and the
    /// learner must score with: 1 when greedy, else `temperature`.
    pub fn logprob_temperature(&self) -> f64 {
        if self.is_greedy() {
            1.0
        } else {
            self.temperature
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Whether each step reuses the KV cache or recomputes the whole sequence (the reference the
/// cache is tested and benchmarked against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    Cached,
    Recompute,
}

/// The result of [`generate`]; rows are in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens per row, up to and including the stop token.
    pub responses: Vec<Vec<u32>>,
    /// log q(token) under the distribution sampled from (see module docs).
    pub logprobs: Vec<Vec<f32>>,
    /// log softmax(logits / temperature)(token), untruncated.
    pub full_logprobs: Vec<Vec<f32>>,
    /// Whether the row ended on a stop token.
    pub stopped: Vec<bool>,
    /// `(step, version)` for each policy adopted in flight: the tokens of steps `>= step` were
    /// sampled by `version` (until the next entry). Empty without in-flight updates.
    pub adopted: Vec<(usize, u64)>,
}

impl Generation {
    /// Longest response length (the padded width).
    pub fn width(&self) -> usize {
        self.responses.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Response ids right-padded with `pad_id` to `width()`, as rows.
    pub fn padded_ids(&self, pad_id: u32) -> Vec<Vec<u32>> {
        let w = self.width();
        self.responses
            .iter()
            .map(|r| r.iter().copied().chain(std::iter::repeat(pad_id)).take(w).collect())
            .collect()
    }

    /// The response mask (b, width): 1.0 for generated tokens, 0.0 for padding.
    pub fn response_mask(&self) -> Vec<Vec<f32>> {
        let w = self.width();
        self.responses
            .iter()
            .map(|r| (0..w).map(|i| if i < r.len() { 1.0 } else { 0.0 }).collect())
            .collect()
    }
}

/// Samples one token from a row of logits; returns (token, log q, full log-prob).
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> (u32, f32, f32) {
    let greedy = cfg.is_greedy();
    let t = if greedy { 1.0 } else { cfg.temperature as f32 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !greedy && cfg.top_p >= 1.0 && (cfg.top_k == 0 || cfg.top_k >= logits.len()) {
        return sample_untruncated(logits, t, max, rng);
    }
    // log-sum-exp in f64 for a stable normaliser.
    let lse = max as f64 + logits.iter().map(|&l| (((l - max) / t) as f64).exp()).sum::<f64>().ln();
    let full_lp = |i: usize| ((logits[i] / t) as f64 - (max / t) as f64 - (lse - max as f64)) as f32;
    if greedy {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return (best as u32, 0.0, full_lp(best));
    }
    // Candidates in descending probability, ties by id (stable sort keeps the order fixed).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    let probs: Vec<f64> = order.iter().map(|&i| (full_lp(i) as f64).exp()).collect();
    let mut keep = if cfg.top_k > 0 {
        cfg.top_k.min(order.len())
    } else {
        order.len()
    };
    if cfg.top_p < 1.0 {
        let z: f64 = probs[..keep].iter().sum();
        let mut cum = 0.0;
        for (j, p) in probs[..keep].iter().enumerate() {
            cum += p / z;
            if cum >= cfg.top_p {
                keep = j + 1;
                break;
            }
        }
    }
    let z: f64 = probs[..keep].iter().sum();
    let u = rng.random::<f64>() * z;
    let mut cum = 0.0;
    let mut pick = keep - 1;
    for (j, p) in probs[..keep].iter().enumerate() {
        cum += p;
        if u < cum {
            pick = j;
            break;
        }
    }
    let tok = order[pick];
    let lp = full_lp(tok);
    (tok as u32, (lp as f64 - z.ln()) as f32, lp)
}

/// [`sample_token`] from the whole distribution (no top-k or top-p): no candidate order is
/// needed, so one vectorised pass of `e^((l - max) / t)` gives both the normaliser and the
/// weights, and the draw walks them in id order. Sampling order does not change the
/// distribution; `q` is the full distribution, so both log-probs are the same.
fn sample_untruncated(logits: &[f32], t: f32, max: f32, rng: &mut StdRng) -> (u32, f32, f32) {
    let inv_t = 1.0 / t;
    let mut weights = vec![0f32; logits.len()];
    crate::kernels::logprobs::exp_shifted(logits, max, inv_t, &mut weights);
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let u = rng.random::<f64>() * total;
    let mut cum = 0.0;
    let mut pick = logits.len() - 1;
    for (i, &w) in weights.iter().enumerate() {
        cum += w as f64;
        if u < cum {
            pick = i;
            break;
        }
    }
    let lp = (((logits[pick] - max) * inv_t) as f64 - total.ln()) as f32;
    (pick as u32, lp, lp)
}

/// What happens to the KV cache when a policy is adopted in flight (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightKv {
    /// Keep the keys and values the old weights computed (free).
    Keep,
    /// Run the prefix through the new weights into a fresh cache (one prefill per adoption).
    Recompute,
}

/// Where a running generation gets newer weights: `next(step)` is asked before the forward
/// that yields the logits of `step`, and returns the newer policy's version and model, if any.
pub struct Inflight<'a> {
    pub next: &'a mut dyn FnMut(usize) -> Option<(u64, Arc<LanguageModel>)>,
    pub kv: InflightKv,
}

/// Generates a response for every prompt. See the module docs for the log-prob semantics.
pub fn generate(
    model: &LanguageModel,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    rng: &mut StdRng,
    decoding: Decoding,
) -> Result<Generation> {
    generate_inflight(model, prompts, cfg, rng, decoding, None)
}

/// [`generate`], adopting newer weights between decode steps from `inflight` (see the module
/// docs). With `None` it is exactly [`generate`].
pub fn generate_inflight(
    model: &LanguageModel,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    rng: &mut StdRng,
    decoding: Decoding,
    mut inflight: Option<Inflight<'_>>,
) -> Result<Generation> {
    cfg.validate()?;
    let dev = model.device().clone();
    let pad = model.config().pad_id();
    let batch = PaddedBatch::new(prompts, pad, PadSide::Left, &dev)?;
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_pos = model.config().dims().max_positions;
    if longest + cfg.max_new_tokens > max_pos {
        return Err(ModelError::InvalidArgument(format!(
            "prompt of {longest} tokens + {} new tokens exceeds the model's {max_pos} positions",
            cfg.max_new_tokens
        )));
    }
    let mut out = Generation {
        responses: vec![vec![]; b],
        logprobs: vec![vec![]; b],
        full_logprobs: vec![vec![]; b],
        stopped: vec![false; b],
        adopted: vec![],
    };
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut mask = batch.mask;
    let mut all_ids = batch.ids;
    let mut cache = KvCache::with_capacity(model.config().dims().layers, longest + cfg.max_new_tokens);
    // The policy adopted in flight, once there is one.
    let mut current: Option<Arc<LanguageModel>> = None;
    let mut logits = match decoding {
        Decoding::Cached => model.next_token_logits(&all_ids, &mask, Some(&mut cache))?,
        Decoding::Recompute => model.next_token_logits(&all_ids, &mask, None)?,
    };
    for step in 0..cfg.max_new_tokens {
        let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            let active = !out.stopped[i];
            mask[i].push(if active { 1.0 } else { 0.0 });
            if !active {
                next.push(pad);
                continue;
            }
            let (tok, lp, full) = sample_token(row, cfg, rng);
            out.responses[i].push(tok);
            out.logprobs[i].push(lp);
            out.full_logprobs[i].push(full);
            if cfg.stop_tokens.contains(&tok) {
                out.stopped[i] = true;
            }
            next.push(tok);
        }
        if step + 1 == cfg.max_new_tokens || out.stopped.iter().all(|&s| s) {
            break;
        }
        let next = Tensor::from_vec(next, (b, 1), &dev)?;
        let newer = inflight.as_mut().and_then(|f| (f.next)(step + 1).map(|n| (n, f.kv)));
        if let Some(((version, m), _)) = &newer {
            out.adopted.push((step + 1, *version));
            current = Some(m.clone());
        }
        let model = current.as_deref().unwrap_or(model);
        let recompute = decoding == Decoding::Recompute || matches!(newer, Some((_, InflightKv::Recompute)));
        if decoding == Decoding::Recompute || inflight.as_ref().is_some_and(|f| f.kv == InflightKv::Recompute) {
            all_ids = Tensor::cat(&[&all_ids, &next], D::Minus1)?;
        }
        logits = if !recompute {
            model.next_token_logits(&next, &mask, Some(&mut cache))?
        } else if decoding == Decoding::Recompute {
            model.next_token_logits(&all_ids, &mask, None)?
        } else {
            cache = KvCache::with_capacity(model.config().dims().layers, longest + cfg.max_new_tokens);
            model.next_token_logits(&all_ids, &mask, Some(&mut cache))?
        };
    }
    Ok(out)
}
