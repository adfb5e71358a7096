//! Training a reward model from preferences: `tandem train-rm CONFIG.toml`.
//!
//! The model is a language-model backbone (a HF checkpoint, or the built-in tiny model with a
//! seeded random initialisation) with a freshly initialised scalar `score` head (a checkpoint
//! that is already a sequence-classification model keeps its head). It runs on the runtime:
//! a data-loader thread shuffles the training set every epoch (seeded) and feeds batches
//! through a bounded channel to the [`RmLearnerActor`] on its device executor, under the
//! run supervisor; this driver writes `RUN_DIR/config.toml`, one `RUN_DIR/metrics.jsonl`
//! line per step (held-out loss/accuracy on evaluation steps), intermediate checkpoints, and
//! finally the normalised model in HF sequence-classification layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`) under `RUN_DIR/reward_model/`, readable by
//! `tandem inspect score` and by transformers.
//!
//! # Data
//!
//! JSONL, one record per line, in any of these forms:
//! - `{"prompt": P, "chosen": A, "rejected": B}`;
//! - `{"chosen": A, "rejected": B}` (HH-RLHF): the prompt is the longest common prefix of the
//!   two texts, cut back to just after its last whitespace so no word is split;
//! - `{"prompt": P, "responses": [R0, R1, ...], "ranking": [i, j, ...]}`: `2 <= K <=`
//!   [`MAX_RANKED_RESPONSES`] responses, `ranking` lists their indices from best to worst (a
//!   permutation of `0..K`). More responses are refused naming `FILE:LINE` (the pairwise loss
//!   takes all C(K,2) pairs, so K sizes the work per line).
//! - conversational (TRL's form), for a model with a chat template:
//!   `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, or
//!   `{"chosen": [conversation], "rejected": [conversation]}` whose shared leading turns are the
//!   prompt; rendered with the template ([`crate::chat::preference_as_text`]).
//!
//! Prompts are left-truncated to `data.prompt_max_tokens`, responses right-truncated to
//! `data.response_max_tokens`. A malformed line is an error naming `FILE:LINE` (exit 2).
//! Without `data.eval`, a seeded `data.eval_fraction` of the training file is held out. The
//! held-out set must not be empty: that is checked before anything is trained or written
//! ([`load_inputs`]), so 2 records or `eval_fraction = 0` without `data.eval` exit 2 at once.
//!
//! # Config
//!
//! ```toml
//! seed = 1
//! run_dir = "runs/rm"          # --run-dir wins
//! [model]                      # path = HF checkpoint dir, or [model.builtin] as in `tandem run`
//! path = "../fixtures/hf/gpt2-tiny"
//! [data]
//! train = "data/prefs.jsonl"
//! eval = "data/prefs_eval.jsonl"  # optional
//! eval_fraction = 0.1          # held out of `train` when `eval` is absent
//! prompt_max_tokens = 64
//! response_max_tokens = 64
//! [train]                      # defaults from the papers: one epoch, cosine decay
//! loss = "bradley_terry"       # bradley_terry (all C(K,2) ranked pairs) | best_of_k
//! epochs = 1
//! batch_size = 16
//! lr = 1e-4                    # peak learning rate
//! warmup_steps = 0
//! decay = "cosine"             # constant | linear | cosine
//! min_lr = 0.0
//! weight_decay = 0.0
//! max_grad_norm = 1.0          # <= 0 disables clipping
//! eval_every = 10              # steps; 0 = only after the last step (always evaluated)
//! eval_batch_size = 64
//! [normalize]
//! kind = "none"                # none | reference_bias | gain_bias (see below)
//! reference = "samples.jsonl"  # {"prompt", "response"} lines; default: the held-out responses
//! [checkpoints]
//! every = 0                    # save RUN_DIR/checkpoints/step-K every K steps (0 = never)
//! keep = 2                     # keep the last N
//! [placement]
//! device = "cpu:0"
//! threads = 1
//! [channels]
//! batches = 2                  # loader -> learner channel capacity
//! ```
//!
//! There is no dropout anywhere in tandem's models, so nothing needs turning off.
//!
//! # Normalisation
//!
//! After training, the reference set is scored and the model is changed so that it scores
//! `gain * s + bias`: `reference_bias` (InstructGPT) sets `gain = 1`, `bias = -mean`, so the
//! reference set scores mean 0; `gain_bias` (Ziegler et al. 2019) sets `gain = 1 / std`,
//! `bias = -mean / std`, so it scores mean 0, std 1 (pass samples of the policy to be trained
//! as `reference`). The HF layout has no bias on the score head, so the gain multiplies
//! `score.weight` and the bias is folded into the final layer norm's bias, the only input of
//! the head: `ln_f.bias += bias * w / |w|^2` for the new head `w`. That is exact for GPT-2;
//! the RMSNorm of Qwen2/Llama has no bias, so those models accept `none` or a gain only (an
//! error otherwise). `RUN_DIR/normalization.json` records the fit and the reference set's mean
//! and std before and after.
//!
//! Checkpoints are written to `checkpoints/.tmp-step-K` and renamed to `checkpoints/step-K`,
//! so a crash never leaves a half-written `step-K`; older ones beyond `keep` are removed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use ractor::Actor;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_actors::rm_learner::{RmLearnerActor, RmLearnerArgs, RmReport};
use tandem_actors::rm_trainer::{Comparison, RmBatch, RmLoss, RmOptim, RmTrainer};
use tandem_actors::{stage_channel, ActorMeter, DeviceId, Executor, StageSender};
use tandem_models::batch::PromptResponseBatch;
use tandem_models::rl::{FixedGainBias, LrDecay, LrSchedule};
use tandem_models::{load_tensors, save_checkpoint, HeadKind, ModelConfig, ScalarModel, TextTokenizer, WeightInit};

use crate::config::builtin;
use crate::config::ModelSource;
pub use crate::config::NormalizeKind;
use crate::error::RuntimeError;
use crate::prompts::{encode_prompt, read_jsonl};
use crate::supervisor::{ChildRole, RunSupervisor, SupervisorArgs, SupervisorMsg};

static NEXT_RM_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    pub model: ModelSource,
    pub data: RmData,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub normalize: NormalizeSection,
    #[serde(default)]
    pub checkpoints: CheckpointSection,
    #[serde(default)]
    pub placement: RmPlacement,
    #[serde(default)]
    pub channels: RmChannels,
    /// A progress line on stderr after every step (set by the command line, not the file).
    #[serde(skip)]
    pub progress: bool,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmData {
    pub train: PathBuf,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default = "default_max_tokens")]
    pub prompt_max_tokens: usize,
    #[serde(default = "default_max_tokens")]
    pub response_max_tokens: usize,
}

fn default_eval_fraction() -> f64 {
    0.1
}
fn default_max_tokens() -> usize {
    64
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub loss: RmLoss,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub decay: LrDecay,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub eval_every: usize,
    pub eval_batch_size: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            loss: RmLoss::BradleyTerry,
            epochs: 1,
            batch_size: 16,
            lr: 1e-4,
            warmup_steps: 0,
            decay: LrDecay::Cosine,
            min_lr: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_every: 10,
            eval_batch_size: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizeSection {
    pub kind: NormalizeKind,
    pub reference: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    pub every: usize,
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { every: 0, keep: 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmPlacement {
    pub device: DeviceId,
    pub threads: usize,
}

impl Default for RmPlacement {
    fn default() -> Self {
        Self {
            device: DeviceId::Cpu(0),
            threads: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmChannels {
    pub batches: usize,
}

impl Default for RmChannels {
    fn default() -> Self {
        Self { batches: 2 }
    }
}

impl RmConfig {
    /// Reads, overrides (`--set section.key=value`), resolves paths against the file's
    /// directory and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        let mut cfg: RmConfig = crate::config::read_toml(path, overrides)?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate().map_err(|msg| RuntimeError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data.train);
        for p in [&mut self.data.eval, &mut self.normalize.reference, &mut self.model.path]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let m = &self.model;
        if m.path.is_some() == m.builtin.is_some() {
            return Err("model: set exactly one of `path` and `builtin`".into());
        }
        if let Some(p) = &m.path {
            if !p.join("config.json").is_file() {
                return Err(format!("model.path: no config.json in {}", p.display()));
            }
        }
        for (key, p) in [
            ("data.train", Some(&self.data.train)),
            ("data.eval", self.data.eval.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(format!("{key}: file not found: {}", p.display()));
                }
            }
        }
        if let Some(p) = &self.normalize.reference {
            if !p.is_file() {
                return Err(format!("normalize.reference: file not found: {}", p.display()));
            }
        }
        if self.data.eval.is_none() && !(0.0..1.0).contains(&self.data.eval_fraction) {
            return Err("data.eval_fraction must lie in [0, 1)".into());
        }
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 || t.eval_batch_size == 0 {
            return Err("train.epochs, train.batch_size and train.eval_batch_size must be >= 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite() && (0.0..=t.lr).contains(&t.min_lr)) {
            return Err("train.lr must be > 0 and train.min_lr in [0, lr]".into());
        }
        self.placement
            .device
            .check_built()
            .map_err(|e| format!("placement.device: {e}"))?;
        if self.channels.batches == 0 || self.placement.threads == 0 {
            return Err("channels.batches and placement.threads must be >= 1".into());
        }
        if self.checkpoints.every > 0 && self.checkpoints.keep == 0 {
            return Err("checkpoints.keep must be >= 1".into());
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// What a finished reward-model run reports back.
#[derive(Debug, Clone)]
pub struct RmSummary {
    pub reports: Vec<RmReport>,
    pub interrupted: bool,
    pub train_examples: usize,
    pub eval_examples: usize,
    /// The last held-out accuracy (after normalisation it is unchanged: the map is monotone).
    pub eval_accuracy: Option<f64>,
    pub normalization: Option<Normalization>,
    /// `RUN_DIR/reward_model`.
    pub model_dir: PathBuf,
}

/// The fitted score map and the reference set's statistics before and after it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Normalization {
    pub kind: NormalizeKind,
    pub gain: f64,
    pub bias: f64,
    pub reference_size: usize,
    pub mean_before: f64,
    pub std_before: f64,
    pub mean_after: f64,
    pub std_after: f64,
}

/// Tokenised preference data from a JSONL file (see the module docs for the forms).
pub fn load_comparisons(
    path: &Path,
    tokenizer: &TextTokenizer,
    prompt_max: usize,
    response_max: usize,
) -> Result<Vec<Comparison>, RuntimeError> {
    let mut out = Vec::new();
    read_jsonl(path, |v| {
        // Conversational records ({"chosen": [messages], ...}) through the chat template.
        let text = crate::chat::preference_as_text(tokenizer, v)?;
        let (prompt, responses, ranking) = parse_record(text.as_ref().unwrap_or(v))?;
        let p = encode_prompt(tokenizer, &prompt, prompt_max)?;
        let mut rs = Vec::with_capacity(responses.len());
        for (j, r) in responses.iter().enumerate() {
            let mut ids = tokenizer.encode(r).map_err(|e| e.to_string())?;
            if ids.is_empty() {
                return Err(format!("response {j} tokenises to nothing"));
            }
            ids.truncate(response_max);
            rs.push(ids);
        }
        out.push(Comparison {
            prompt: p,
            responses: rs,
            ranking,
        });
        Ok(())
    })?;
    if out.is_empty() {
        return Err(RuntimeError::Prompts {
            path: path.into(),
            line: 0,
            msg: "no preference records".into(),
        });
    }
    Ok(out)
}

type Record = (String, Vec<String>, Vec<usize>);

/// The most responses a ranked record may have.
pub const MAX_RANKED_RESPONSES: usize = 64;

fn parse_record(v: &serde_json::Value) -> Result<Record, String> {
    let s = |key: &str| -> Result<Option<String>, String> {
        match v.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(x)) => Ok(Some(x.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    };
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    if let Some(resp) = v.get("responses") {
        let prompt = s("prompt")?.ok_or("a ranked record needs a \"prompt\" string")?;
        let responses: Vec<String> = resp
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
            .ok_or("\"responses\" must be an array of strings")?;
        if responses.len() < 2 || responses.len() > MAX_RANKED_RESPONSES {
            return Err(format!(
                "\"responses\" needs 2 to {MAX_RANKED_RESPONSES} entries, got {}",
                responses.len()
            ));
        }
        let ranking: Vec<usize> = v
            .get("ranking")
            .and_then(|r| r.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
            .ok_or("a ranked record needs \"ranking\": response indices from best to worst")?;
        let mut seen = vec![false; responses.len()];
        if ranking.len() != responses.len()
            || ranking
                .iter()
                .any(|&i| i >= responses.len() || std::mem::replace(&mut seen[i], true))
        {
            return Err(format!(
                "\"ranking\" {ranking:?} is not a permutation of 0..{}",
                responses.len()
            ));
        }
        return Ok((prompt, responses, ranking));
    }
    let (Some(chosen), Some(rejected)) = (s("chosen")?, s("rejected")?) else {
        return Err(
            "expected {\"prompt\",\"chosen\",\"rejected\"}, {\"chosen\",\"rejected\"} or {\"prompt\",\"responses\",\"ranking\"}"
                .into(),
        );
    };
    if chosen == rejected {
        return Err("\"chosen\" and \"rejected\" are the same text".into());
    }
    let (prompt, chosen, rejected) = match s("prompt")? {
        Some(p) => (p, chosen, rejected),
        None => {
            let cut = common_prompt_len(&chosen, &rejected);
            if cut == 0 {
                return Err("\"chosen\" and \"rejected\" share no prefix ending in whitespace to use as the prompt (or give \"prompt\")".into());
            }
            (
                chosen[..cut].to_string(),
                chosen[cut..].to_string(),
                rejected[cut..].to_string(),
            )
        }
    };
    Ok((prompt, vec![chosen, rejected], vec![0, 1]))
}

/// Byte length of the HH-RLHF prompt: the longest common prefix of `a` and `b`, cut back to
/// just after its last whitespace character.
pub fn common_prompt_len(a: &str, b: &str) -> usize {
    let mut lcp = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            break;
        }
        lcp = i + ca.len_utf8();
    }
    a[..lcp]
        .char_indices()
        .rfind(|(_, c)| c.is_whitespace())
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or(0)
}

/// `{"prompt", "response"}` lines for the normalisation reference set.
fn load_reference(path: &Path, tokenizer: &TextTokenizer, data: &RmData) -> Result<Vec<PromptResponse>, RuntimeError> {
    let mut out = Vec::new();
    read_jsonl(path, |v| {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .ok_or_else(|| format!("expected {{\"prompt\", \"response\"}} strings; no \"{k}\""))
        };
        let (prompt, response) = (get("prompt")?, get("response")?);
        let p = encode_prompt(tokenizer, prompt, data.prompt_max_tokens)?;
        let mut r = tokenizer.encode(response).map_err(|e| e.to_string())?;
        r.truncate(data.response_max_tokens);
        out.push((p, r));
        Ok(())
    })?;
    Ok(out)
}

/// Starts the loader thread: every epoch a seeded shuffle cut into batches, sent through the
/// bounded channel; it stops early when the learner is gone.
fn spawn_loader(
    train: Vec<Comparison>,
    epochs: usize,
    batch_size: usize,
    seed: u64,
    tx: StageSender<RmBatch>,
) -> std::thread::JoinHandle<usize> {
    std::thread::Builder::new()
        .name("tandem-rm-loader".into())
        .spawn(move || {
            let mut sent = 0;
            let mut order: Vec<usize> = (0..train.len()).collect();
            for epoch in 0..epochs {
                order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37)));
                for chunk in order.chunks(batch_size) {
                    let batch = RmBatch {
                        epoch,
                        examples: chunk.iter().map(|&i| train[i].clone()).collect(),
                    };
                    if tx.send_blocking(batch).is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
            sent
        })
        .expect("spawn loader thread")
}

struct Backbone {
    config: ModelConfig,
    tokenizer: TextTokenizer,
    init: Option<(PathBuf, HashMap<String, Tensor>)>,
}

fn load_backbone(cfg: &RmConfig) -> Result<Backbone, RuntimeError> {
    if let Some(dir) = &cfg.model.path {
        let config = ModelConfig::from_dir(dir)?;
        let tensors = load_tensors(dir, &config, &Device::Cpu)?;
        Ok(Backbone {
            config: config.with_head(HeadKind::Scalar),
            tokenizer: TextTokenizer::from_dir(dir)?,
            init: Some((dir.clone(), tensors)),
        })
    } else {
        let spec = cfg.model.builtin.as_ref().expect("validated: path or builtin");
        let max_pos = (cfg.data.prompt_max_tokens + cfg.data.response_max_tokens)
            .next_power_of_two()
            .max(64);
        Ok(Backbone {
            config: builtin::model_config(spec, max_pos).with_head(HeadKind::Scalar),
            tokenizer: builtin::tokenizer()?,
            init: None,
        })
    }
}

/// Prompt and response ids.
pub type PromptResponse = (Vec<u32>, Vec<u32>);

/// Tokenised data handed to [`train_rm_on`] directly (the mock labeller's path).
#[derive(Debug, Clone)]
pub struct RmInputs {
    pub train: Vec<Comparison>,
    pub eval: Vec<Comparison>,
    /// Normalisation reference (prompt, response) ids; `None`: the held-out responses.
    pub reference: Option<Vec<PromptResponse>>,
}

/// Trains, normalises and saves a reward model on the files the config names; see the
/// module docs.
pub async fn train_rm(cfg: &RmConfig, run_dir: &Path) -> Result<RmSummary, RuntimeError> {
    let inputs = load_inputs(cfg)?;
    train_rm_on(cfg, run_dir, inputs).await
}

/// Loads, tokenises and splits the config's data, and checks that training and held-out
/// sets are both non-empty, before anything is trained or written.
pub fn load_inputs(cfg: &RmConfig) -> Result<RmInputs, RuntimeError> {
    let backbone = load_backbone(cfg)?;
    let tok = &backbone.tokenizer;
    let d = &cfg.data;
    let mut train = load_comparisons(&d.train, tok, d.prompt_max_tokens, d.response_max_tokens)?;
    let eval = match &d.eval {
        Some(p) => load_comparisons(p, tok, d.prompt_max_tokens, d.response_max_tokens)?,
        None => {
            train.shuffle(&mut StdRng::seed_from_u64(cfg.seed ^ 0xE7A1));
            let n = (train.len() as f64 * d.eval_fraction).round() as usize;
            train.split_off(train.len() - n.min(train.len() - 1))
        }
    };
    let reference = match &cfg.normalize.reference {
        Some(p) if cfg.normalize.kind != NormalizeKind::None => Some(load_reference(p, tok, d)?),
        _ => None,
    };
    if eval.is_empty() {
        return Err(RuntimeError::Config {
            path: d.train.clone(),
            msg: format!(
                "no held-out comparisons: {} records with data.eval_fraction = {} hold out none, and the \
                 run would fail after training. Give data.eval, raise data.eval_fraction or add records",
                train.len(),
                d.eval_fraction
            ),
        });
    }
    Ok(RmInputs { train, eval, reference })
}

/// [`train_rm`] on already tokenised data (the config's data paths are only recorded).
pub async fn train_rm_on(cfg: &RmConfig, run_dir: &Path, data: RmInputs) -> Result<RmSummary, RuntimeError> {
    std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, cfg.to_toml()).map_err(|e| RuntimeError::io(&resolved, e))?;
    let backbone = load_backbone(cfg)?;
    let tok = &backbone.tokenizer;
    let RmInputs { train, eval, reference } = data;
    if train.is_empty() {
        return Err(RuntimeError::Other("no training comparisons".into()));
    }
    let t = &cfg.train;
    let total_steps = t.epochs * train.len().div_ceil(t.batch_size);
    let exec = Executor::new(cfg.placement.device, cfg.placement.threads)?;
    let init = WeightInit::loaded_or_random(backbone.init.as_ref(), cfg.seed);
    let (model, vars) = ScalarModel::trainable(&backbone.config, init, exec.device())?;
    let optim = RmOptim {
        loss: t.loss,
        schedule: LrSchedule {
            peak_lr: t.lr,
            warmup_steps: t.warmup_steps.min(total_steps),
            total_steps,
            decay: t.decay,
            min_lr: t.min_lr,
        },
        weight_decay: t.weight_decay,
        max_grad_norm: t.max_grad_norm,
    };
    let trainer = Arc::new(Mutex::new(RmTrainer::new(model, vars, optim)?));
    let (tx, rx) = stage_channel::<RmBatch>("rm_batches", cfg.channels.batches);
    let depth = rx.stats().clone();
    let meter = Arc::new(
        ActorMeter::new(
            "rm_learner",
            format!("rm_learner/{}", cfg.placement.device),
            cfg.placement.device.to_string(),
        )
        .with_inbound(move || depth.depth(), cfg.channels.batches),
    );
    let (train_n, eval_n) = (train.len(), eval.len());
    let eval = Arc::new(eval);
    let loader = spawn_loader(train, t.epochs, t.batch_size, cfg.seed, tx);

    let run_no = NEXT_RM_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel();
    let supervision = SupervisorArgs {
        config: Default::default(),
        reissued: Default::default(),
        failures: fail_tx,
    };
    let (root, root_handle) = Actor::spawn(Some(format!("rm-supervisor#{run_no}")), RunSupervisor, supervision)
        .await
        .map_err(|e| RuntimeError::Other(format!("cannot start the supervisor: {e}")))?;
    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel(16);
    let (learner, learner_h) = Actor::spawn_linked(
        Some(format!("rm_learner/{}#{run_no}", cfg.placement.device)),
        RmLearnerActor,
        RmLearnerArgs {
            executor: exec.clone(),
            trainer: trainer.clone(),
            input: rx,
            eval: eval.clone(),
            eval_batch_size: t.eval_batch_size,
            eval_every: t.eval_every,
            checkpoint_every: cfg.checkpoints.every,
            total_steps,
            reports: report_tx,
            meter,
        },
        root.get_cell(),
    )
    .await
    .map_err(|e| RuntimeError::ActorFailed(e.to_string()))?;
    root.cast(SupervisorMsg::Watch {
        name: "rm_learner".into(),
        role: ChildRole::Learner,
        cell: learner.get_cell(),
    })
    .map_err(|e| RuntimeError::Other(format!("supervisor: {e}")))?;

    let started = std::time::Instant::now();
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| RuntimeError::io(&metrics_path, e))?;
    let mut reports = Vec::new();
    let mut failure = None;
    let mut interrupted = false;
    let mut interrupts = crate::interrupts::Interrupts::listen()?;
    loop {
        tokio::select! {
            r = report_rx.recv() => match r {
                Some(mut r) => {
                    let line = serde_json::to_string(&r).expect("report serialises");
                    writeln!(metrics, "{line}").map_err(|e| RuntimeError::io(&metrics_path, e))?;
                    if cfg.progress {
                        eprintln!("{}", progress_line(&r, total_steps, started.elapsed().as_secs_f64()));
                    }
                    if let Some(w) = r.weights.take() {
                        save_step_checkpoint(run_dir, r.step + 1, &backbone, &w, cfg.checkpoints.keep)?;
                    }
                    reports.push(r);
                }
                None => break,
            },
            f = fail_rx.recv() => { failure = f.map(|f| format!("{}: {}", f.actor, f.error)); break; }
            _ = interrupts.recv() => { interrupted = true; break; }
        }
    }
    metrics.flush().map_err(|e| RuntimeError::io(&metrics_path, e))?;
    learner.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), learner_h).await;
    root.stop(None);
    let _ = root_handle.await;
    let _ = tokio::task::spawn_blocking(move || loader.join()).await;
    if let Some(f) = failure {
        return Err(RuntimeError::ActorFailed(f));
    }

    // Normalise on the device thread, then save.
    let weights = trainer
        .lock()
        .map_err(|_| RuntimeError::Other("reward-model trainer poisoned".into()))?
        .weights()?;
    let reference: Vec<PromptResponse> = match reference {
        Some(r) => r,
        None => eval
            .iter()
            .flat_map(|e| e.responses.iter().map(|r| (e.prompt.clone(), r.clone())))
            .collect(),
    };
    let (weights, normalization) = match cfg.normalize.kind {
        NormalizeKind::None => (weights, None),
        kind => {
            let config = backbone.config.clone();
            let (out, _) = exec
                .run(move |dev| normalize(&config, weights, &reference, kind, dev))
                .await?;
            let (w, n) = out?;
            (w, Some(n))
        }
    };
    let model_dir = run_dir.join("reward_model");
    save_checkpoint(&model_dir, &backbone.config, &weights, None)?;
    tok.save_to_dir(&model_dir)?;
    if let Some(n) = &normalization {
        let path = run_dir.join("normalization.json");
        std::fs::write(&path, serde_json::to_string_pretty(n).expect("json"))
            .map_err(|e| RuntimeError::io(&path, e))?;
    }
    Ok(RmSummary {
        eval_accuracy: reports.iter().rev().find_map(|r| r.eval_accuracy),
        reports,
        interrupted,
        train_examples: train_n,
        eval_examples: eval_n,
        normalization,
        model_dir,
    })
}

/// `rm step K/N loss L acc A [eval_acc E] elapsed T eta T'` after the report of step K - 1.
fn progress_line(r: &tandem_actors::rm_learner::RmReport, total: usize, elapsed_s: f64) -> String {
    use crate::progress::hms;
    let done = r.step + 1;
    let eta = elapsed_s / done as f64 * total.saturating_sub(done) as f64;
    let eval = r.eval_accuracy.map(|a| format!(" eval_acc {a:.3}")).unwrap_or_default();
    format!(
        "rm step {done}/{total} loss {:.4} acc {:.3}{eval} elapsed {} eta {}",
        r.loss,
        r.accuracy,
        hms(elapsed_s),
        hms(eta)
    )
}

/// `checkpoints/.tmp-step-K` then renamed to `checkpoints/step-K`; keeps the last `keep`.
fn save_step_checkpoint(
    run_dir: &Path,
    step: usize,
    backbone: &Backbone,
    weights: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<(), RuntimeError> {
    crate::checkpoint::write_atomically(run_dir, step as u64, keep, |tmp| {
        save_checkpoint(tmp, &backbone.config, weights, None)?;
        Ok(backbone.tokenizer.save_to_dir(tmp)?)
    })?;
    Ok(())
}

/// Scores of `pairs` under `weights`, in batches.
pub fn score_pairs(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    pairs: &[PromptResponse],
    device: &Device,
) -> Result<Vec<f64>, tandem_actors::ActorError> {
    let model = ScalarModel::from_tensors(config, weights.clone(), device)?;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(64) {
        let p: Vec<&[u32]> = chunk.iter().map(|(p, _)| p.as_slice()).collect();
        let r: Vec<&[u32]> = chunk.iter().map(|(_, r)| r.as_slice()).collect();
        let b = PromptResponseBatch::new(&p, &r, config.pad_id(), device)?;
        out.extend(
            model
                .scores(&b.ids, &b.mask)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from),
        );
    }
    Ok(out)
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    (m, (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

/// Fits `gain`, `bias` on the reference scores and folds them into the weights (see the module
/// docs); returns the new weights and what was done.
fn normalize(
    config: &ModelConfig,
    mut weights: HashMap<String, Tensor>,
    reference: &[PromptResponse],
    kind: NormalizeKind,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Normalization), tandem_actors::ActorError> {
    use tandem_actors::ActorError;
    if reference.len() < 2 {
        return Err(ActorError::Other(format!(
            "normalize: the reference set has {} responses; at least 2 are needed",
            reference.len()
        )));
    }
    let before = score_pairs(config, &weights, reference, device)?;
    let (mean_before, std_before) = mean_std(&before);
    let (gain, bias) = match kind {
        NormalizeKind::None => (1.0, 0.0),
        NormalizeKind::ReferenceBias => (1.0, -mean_before),
        NormalizeKind::GainBias => {
            let f = FixedGainBias::fit(&before).map_err(|e| ActorError::Other(format!("normalize: {e}")))?;
            (f.gain, f.bias)
        }
    };
    let w = weights
        .get("score.weight")
        .ok_or_else(|| ActorError::Other("normalize: no score.weight".into()))?
        .affine(gain, 0.0)?;
    if bias != 0.0 {
        let key = "transformer.ln_f.bias";
        let b = weights.get(key).ok_or_else(|| {
            ActorError::Other(format!(
                "normalize = {kind:?} needs a bias in the final norm to fold the score bias into; {} has none (use \"none\", or a GPT-2 backbone)",
                config.hf_class()
            ))
        })?;
        let w_row = w.squeeze(0)?;
        let norm2 = w_row.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        if norm2 <= 0.0 {
            return Err(ActorError::Other("normalize: the score head is all zeros".into()));
        }
        let nb = (b + w_row.affine(bias / norm2, 0.0)?)?;
        weights.insert(key.to_string(), nb);
    }
    weights.insert("score.weight".to_string(), w);
    let after = score_pairs(config, &weights, reference, device)?;
    let (mean_after, std_after) = mean_std(&after);
    Ok((
        weights,
        Normalization {
            kind,
            gain,
            bias,
            reference_size: reference.len(),
            mean_before,
            std_before,
            mean_after,
            std_after,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_prompt_is_the_common_prefix_up_to_whitespace() {
        let a = "\n\nHuman: hi\n\nAssistant: good day";
        let b = "\n\nHuman: hi\n\nAssistant: great day";
        let n = common_prompt_len(a, b);
        assert_eq!(&a[..n], "\n\nHuman: hi\n\nAssistant: ");
        assert_eq!(common_prompt_len("abc", "xyz"), 0);
    }

    #[test]
    fn records_of_every_form_parse_and_bad_ones_say_why() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let (p, r, k) = parse_record(&v(r#"{"prompt":"q","chosen":"a","rejected":"b"}"#)).unwrap();
        assert_eq!(
            (p.as_str(), r, k),
            ("q", vec!["a".to_string(), "b".to_string()], vec![0, 1])
        );
        let (p, r, _) = parse_record(&v(r#"{"chosen":"the movie was good","rejected":"the movie was bad"}"#)).unwrap();
        assert_eq!(
            (p.as_str(), r[0].as_str(), r[1].as_str()),
            ("the movie was ", "good", "bad")
        );
        let (_, r, k) = parse_record(&v(r#"{"prompt":"q","responses":["a","b","c"],"ranking":[2,0,1]}"#)).unwrap();
        assert_eq!((r.len(), k), (3, vec![2, 0, 1]));
        for (line, want) in [
            (
                r#"{"prompt":"q","responses":["a","b"],"ranking":[0,0]}"#,
                "not a permutation",
            ),
            (r#"{"prompt":"q","chosen":"a"}"#, "expected {"),
            (r#"{"chosen":"x a","rejected":"x a"}"#, "same text"),
            (r#"{"chosen":"abc","rejected":"abd"}"#, "share no prefix"),
            (
                r#"{"prompt":1,"chosen":"a","rejected":"b"}"#,
                "\"prompt\" must be a string",
            ),
        ] {
            let e = parse_record(&v(line)).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
