//! Training a reward model from preferences: `tandem train-rm CONFIG.toml`.
//!
//! The model is a language-model backbone (a HF checkpoint, or the built-in tiny model with a
//! seeded random initialisation) with a freshly initialised scalar `score` head (a checkpoint
//! that is already a sequence-classification model keeps its head). It runs on the runtime:
//! a data-loader thread shuffles the training set every epoch (seeded) and feeds batches
//! through a bounded channel to the supervised learner on its device executor, under the
//! run supervisor ([`crate::supervised`]); this recipe writes `RUN_DIR/config.toml`, one `RUN_DIR/metrics.jsonl`
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
//! [train]                      # shared with sft (crate::supervised::TrainSection); defaults
//!                              # from the papers: one epoch, cosine decay
//! loss = "bradley_terry"       # train-rm only: bradley_terry (all C(K,2) ranked pairs) | best_of_k
//! epochs = 1
//! batch_size = 16
//! lr = 1e-4                    # peak learning rate
//! warmup_steps = 0
//! decay = "cosine"             # constant | linear | cosine
//! min_lr = 0.0
//! weight_decay = 0.0
//! max_grad_norm = 1.0          # <= 0 disables clipping
//! eval_every = 10              # steps; 0 = only after the last step (always evaluated)
//! eval_batch_size = 32
//! [normalize]
//! kind = "none"                # none | reference_bias | gain_bias (see below)
//! reference = "samples.jsonl"  # {"prompt", "response"} lines; default: the held-out responses
//! [checkpoints]                # as in `tandem run`, with every = 0 by default
//! every = 0                    # save RUN_DIR/checkpoints/step-K every K steps (0 = never)
//! keep = 3                     # keep the last N
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
//! as `reference`). The map is folded into the weights ([`tandem_models::score_map`]): exact
//! for GPT-2; the RMSNorm of Qwen2/Llama has no bias, so those models accept `none` or a gain
//! only (an error otherwise). `RUN_DIR/normalization.json` records the fit and the reference set's mean
//! and std before and after.
//!
//! Checkpoints are written to `checkpoints/.tmp-step-K` and renamed to `checkpoints/step-K`,
//! so a crash never leaves a half-written `step-K`; older ones beyond `keep` are removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_actors::rm_trainer::{Comparison, RmReport, RmTrainer};
use tandem_actors::Executor;
use tandem_models::rl::FixedGainBias;
use tandem_models::score_map::{fold_score_map, score_pairs};
use tandem_models::{save_checkpoint, HeadKind, ModelConfig, ScalarModel, WeightInit};

use crate::config::ModelSource;
pub use crate::config::{NormalizeKind, SupervisedCheckpoints};
use crate::error::RuntimeError;
use crate::supervised::{
    drive, load_backbone, open_metrics, split_eval, validate_model, validate_sections, Backbone, LearnerSetup, Recipe,
};
pub use crate::supervised::{LearnerChannels as RmChannels, LearnerPlacement as RmPlacement, TrainSection};

mod data;
pub use data::{common_prompt_len, load_comparisons, PromptResponse, MAX_RANKED_RESPONSES};

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
    pub checkpoints: SupervisedCheckpoints,
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

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizeSection {
    pub kind: NormalizeKind,
    pub reference: Option<PathBuf>,
}

impl RmConfig {
    /// Reads, overrides (`--set section.key=value`), resolves paths against the file's
    /// directory and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        crate::supervised::load_config(path, overrides, Self::resolve_paths, Self::validate)
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
        validate_model(&self.model)?;
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
        validate_sections(
            Recipe::RewardModel,
            &self.train,
            &self.placement,
            &self.channels,
            &self.checkpoints,
        )
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

fn rm_backbone(cfg: &RmConfig) -> Result<Backbone, RuntimeError> {
    let max_pos = (cfg.data.prompt_max_tokens + cfg.data.response_max_tokens)
        .next_power_of_two()
        .max(64);
    load_backbone(&cfg.model, HeadKind::Scalar, max_pos)
}

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
    let backbone = rm_backbone(cfg)?;
    let tok = &backbone.tokenizer;
    let d = &cfg.data;
    let mut train = load_comparisons(&d.train, tok, d.prompt_max_tokens, d.response_max_tokens)?;
    let eval = match &d.eval {
        Some(p) => load_comparisons(p, tok, d.prompt_max_tokens, d.response_max_tokens)?,
        None => split_eval(&mut train, d.eval_fraction, cfg.seed),
    };
    let reference = match &cfg.normalize.reference {
        Some(p) if cfg.normalize.kind != NormalizeKind::None => Some(data::load_reference(p, tok, d)?),
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
    let backbone = rm_backbone(cfg)?;
    let tok = &backbone.tokenizer;
    let RmInputs { train, eval, reference } = data;
    if train.is_empty() {
        return Err(RuntimeError::InvalidArgument("no training comparisons".into()));
    }
    let t = &cfg.train;
    let total_steps = t.total_steps(train.len());
    let exec = Executor::new(cfg.placement.device, cfg.placement.threads)?;
    let init = WeightInit::loaded_or_random(backbone.init.as_ref(), cfg.seed);
    let (model, vars) = ScalarModel::trainable(&backbone.config, init, exec.device())?;
    let trainer = Arc::new(Mutex::new(RmTrainer::new(model, vars, t.loss(), t.optim(total_steps))?));
    let (train_n, eval_n) = (train.len(), eval.len());
    let eval = Arc::new(eval);
    let setup = LearnerSetup {
        kind: "rm",
        learner: "rm_learner",
        channel: "rm_batches",
        executor: exec.clone(),
        placement: cfg.placement.clone(),
        trainer: trainer.clone(),
        train,
        eval: eval.clone(),
        eval_batch_size: t.eval_batch_size,
        eval_every: t.eval_every,
        checkpoint_every: cfg.checkpoints.every,
        epochs: t.epochs,
        total_steps,
        skip: 0,
        wall_offset_s: 0.0,
        channel_capacity: cfg.channels.batches,
    };
    // Every epoch reshuffles the previous epoch's order (seeded).
    let (n, batch_size, seed) = (setup.train.len(), t.batch_size, cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let plan = Box::new(move |epoch: usize| {
        order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37)));
        order.chunks(batch_size).map(<[usize]>::to_vec).collect()
    });
    let started = std::time::Instant::now();
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, None)?;
    let driven = drive(setup, plan, (&mut metrics, &metrics_path), |r: &mut RmReport| {
        if cfg.progress {
            eprintln!("{}", progress_line(r, total_steps, started.elapsed().as_secs_f64()));
        }
        if let Some(w) = r.weights.take() {
            save_step_checkpoint(run_dir, r.step + 1, &backbone, &w, cfg.checkpoints.keep)?;
        }
        Ok(())
    })
    .await?;
    let (reports, interrupted) = (driven.reports, driven.interrupted);

    // Normalise on the device thread, then save.
    let weights = trainer
        .lock()
        .map_err(|_| RuntimeError::Poisoned("reward-model trainer"))?
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
fn progress_line(r: &RmReport, total: usize, elapsed_s: f64) -> String {
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
        return Err(ActorError::InvalidConfig(format!(
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
            let f = FixedGainBias::fit(&before).map_err(|e| ActorError::InvalidConfig(format!("normalize: {e}")))?;
            (f.gain, f.bias)
        }
    };
    fold_score_map(config, &mut weights, gain, bias)
        .map_err(|e| ActorError::InvalidConfig(format!("normalize = {kind:?}: {e}")))?;
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
