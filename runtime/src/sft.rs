//! Supervised fine-tuning: `tandem sft CONFIG.toml`, the first step of the InstructGPT
//! pipeline (SFT, reward model, RL), on the same runtime as the rest.
//!
//! A data-loader thread cuts every epoch into length-bucketed batches (seeded) and feeds them
//! through a bounded channel to the supervised learner on its device executor, under the run
//! supervisor ([`crate::supervised`]). This recipe writes `RUN_DIR/config.toml`, one `RUN_DIR/metrics.jsonl` line per
//! step (the held-out loss on evaluation steps), checkpoints, and finally the model in HF
//! causal-LM layout under `RUN_DIR/policy/` (weights in the input checkpoint's dtype, its
//! tokenizer and its `tokenizer_config.json` / `generation_config.json`, as `tandem run` saves
//! its policy), ready to be the `models.policy.path` of an RL run.
//!
//! # Data
//!
//! JSONL, one record per line:
//! - `{"prompt": P, "completion": C}`: the tokens of `P` then of `C`, then the model's EOS
//!   token (`data.append_eos`); the loss is on `C` and the EOS only. `P` is left-truncated to
//!   `data.prompt_max_tokens`.
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template
//!   ([`crate::chat`]); the loss is on the assistant turns only (each turn's text as the
//!   template renders it, its end-of-turn token included).
//!
//! A sequence is right-truncated to `data.max_tokens`. A malformed line is an error naming
//! `FILE:LINE` (exit 2). Without `data.eval`, a seeded `data.eval_fraction` of the training
//! file is held out.
//!
//! # Batching
//!
//! Each epoch the examples are shuffled with a seed of (seed, epoch), cut into windows of
//! `train.bucket_batches` batches, each window sorted by length and cut into batches, and the
//! batches shuffled again: rows of a batch have similar lengths, so little compute goes to
//! padding (`fill` in the metrics is real tokens over padded tokens), while the order stays
//! random across the epoch. `bucket_batches = 1` turns bucketing off.
//!
//! # Config
//!
//! ```toml
//! seed = 1
//! run_dir = "runs/sft"         # --run-dir wins
//! [model]                      # path = HF checkpoint dir, or [model.builtin] as in `tandem run`
//! path = "../fixtures/hf/qwen2-tiny"
//! [data]
//! train = "data/sft.jsonl"
//! eval = "data/sft_eval.jsonl" # optional
//! eval_fraction = 0.1          # held out of `train` when `eval` is absent
//! prompt_max_tokens = 128
//! max_tokens = 256             # whole sequence
//! append_eos = true            # prompt/completion records end with the model's EOS
//! [train]                      # shared with train-rm (crate::supervised::TrainSection)
//! epochs = 1
//! batch_size = 16
//! bucket_batches = 8           # length-bucketing window, in batches (1 = off)
//! lr = 1e-4                    # peak learning rate
//! warmup_steps = 0
//! decay = "cosine"             # constant | linear | cosine
//! min_lr = 0.0
//! weight_decay = 0.0
//! max_grad_norm = 1.0          # <= 0 disables clipping
//! eval_every = 10              # steps; 0 = only after the last step (always evaluated)
//! eval_batch_size = 32
//! [checkpoints]                # as in `tandem run`, with every = 0 by default
//! every = 0                    # RUN_DIR/checkpoints/step-K every K steps (0 = never)
//! keep = 3
//! [placement]
//! device = "cpu:0"
//! threads = 1
//! [channels]
//! batches = 2                  # loader -> learner channel capacity
//! ```
//!
//! # Checkpoints and resume
//!
//! `checkpoints/step-K/` (written atomically with a manifest, as `tandem run` writes its own;
//! [`crate::checkpoint::write_atomically`]) holds the state after K steps: `policy/` (f32
//! weights in HF layout with the tokenizer), `optimizer.safetensors` (AdamW moments),
//! `state.json` (step, optimiser steps, wall seconds) and `config.toml`. Ctrl-C or SIGTERM
//! stops at the next step boundary and writes one. `tandem sft --resume RUN_DIR` continues
//! from the latest intact checkpoint: the loader regenerates the same epochs and skips the K
//! batches already trained, the learning-rate schedule continues at step K, and the result is
//! bit-identical to an uninterrupted run (see the tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_actors::sft_trainer::{SftExample, SftReport, SftTrainer};
use tandem_actors::supervised_trainer::{SupervisedTrainer, TrainState};
use tandem_actors::Executor;
use tandem_models::{load_tensors, save_checkpoint, HeadKind, LanguageModel, ModelConfig, TextTokenizer, WeightInit};

use crate::chat::{assistant_segments, parse_messages, ChatTemplate};
use crate::config::{ModelSource, SupervisedCheckpoints};
use crate::error::RuntimeError;
use crate::prompts::read_jsonl;
use crate::supervised::{
    drive, load_backbone, open_metrics, split_eval, validate_model, validate_sections, LearnerChannels,
    LearnerPlacement, LearnerSetup, Recipe, TrainSection,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    pub model: ModelSource,
    pub data: SftData,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub checkpoints: SupervisedCheckpoints,
    #[serde(default)]
    pub placement: LearnerPlacement,
    #[serde(default)]
    pub channels: LearnerChannels,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftData {
    pub train: PathBuf,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default = "default_prompt_max")]
    pub prompt_max_tokens: usize,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "default_true")]
    pub append_eos: bool,
}

fn default_eval_fraction() -> f64 {
    0.1
}
fn default_prompt_max() -> usize {
    128
}
fn default_max_tokens() -> usize {
    256
}
fn default_true() -> bool {
    true
}

impl SftConfig {
    /// Reads, overrides (`--set section.key=value`), resolves paths against the file's
    /// directory (to absolute paths, so a run directory's copy reads the same) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RuntimeError> {
        crate::supervised::load_config(path, overrides, Self::resolve_paths, Self::validate)
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
            if let Ok(abs) = std::fs::canonicalize(&*p) {
                *p = abs;
            }
        };
        fix(&mut self.data.train);
        for p in [&mut self.data.eval, &mut self.model.path].into_iter().flatten() {
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
        let d = &self.data;
        if d.eval.is_none() && !(0.0..1.0).contains(&d.eval_fraction) {
            return Err("data.eval_fraction must lie in [0, 1)".into());
        }
        if d.max_tokens < 2 || d.prompt_max_tokens == 0 || d.prompt_max_tokens >= d.max_tokens {
            return Err("data.max_tokens must be >= 2 and data.prompt_max_tokens in [1, max_tokens)".into());
        }
        validate_sections(
            Recipe::Sft,
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

/// The model an SFT run trains: its config, tokenizer, stop id and initial weights.
pub struct SftModel {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    /// The id appended after completions (the first EOS id), if the model has one.
    pub eos: Option<u32>,
    pub init: Option<(PathBuf, HashMap<String, Tensor>)>,
}

/// Loads the configured model (a HF causal LM, or the built-in tiny model).
pub fn load_model(cfg: &SftConfig) -> Result<SftModel, RuntimeError> {
    let max_pos = cfg.data.max_tokens.next_power_of_two().max(64);
    let b = load_backbone(&cfg.model, HeadKind::CausalLm, max_pos)?;
    let eos = match &cfg.model.path {
        Some(dir) => tandem_models::eos_token_ids(dir)?.first().copied(),
        // `<|endoftext|>`: the built-in models' stop token.
        None => Some(0),
    };
    Ok(SftModel {
        config: b.config,
        tokenizer: b.tokenizer,
        eos,
        init: b.init,
    })
}

/// Tokenised SFT records of a JSONL file (see the module docs for the forms).
pub fn load_examples(path: &Path, model: &SftModel, data: &SftData) -> Result<Vec<SftExample>, RuntimeError> {
    let tok = &model.tokenizer;
    let template = ChatTemplate::of(tok).map_err(|msg| RuntimeError::Config { path: path.into(), msg })?;
    let encode = |s: &str| tok.encode(s).map_err(|e| e.to_string());
    let mut out = Vec::new();
    read_jsonl(path, |v| {
        if !v.is_object() {
            return Err("expected a JSON object".into());
        }
        let (mut ids, mut target) = (Vec::new(), Vec::new());
        if let Some(m) = v.get("messages") {
            let msgs = parse_messages(m)?;
            let t = template
                .as_ref()
                .ok_or("a {\"messages\": ...} record needs a model whose tokenizer_config.json has a chat_template")?;
            for (text, assistant) in assistant_segments(t, &msgs)? {
                let seg = encode(&text)?;
                target.extend(std::iter::repeat_n(assistant, seg.len()));
                ids.extend(seg);
            }
        } else {
            let s = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| format!("expected {{\"prompt\", \"completion\"}} strings or a \"messages\" array; \"{k}\" is missing or not a string"))
            };
            let mut p = encode(s("prompt")?)?;
            if p.len() > data.prompt_max_tokens {
                p.drain(..p.len() - data.prompt_max_tokens);
            }
            let mut c = encode(s("completion")?)?;
            if data.append_eos {
                c.extend(model.eos);
            }
            if c.is_empty() {
                return Err("the completion tokenises to nothing".into());
            }
            target.extend(std::iter::repeat_n(false, p.len()));
            target.extend(std::iter::repeat_n(true, c.len()));
            ids.extend(p);
            ids.extend(c);
        }
        ids.truncate(data.max_tokens);
        target.truncate(data.max_tokens);
        let ex = SftExample { ids, target };
        if ex.target_tokens() == 0 {
            return Err(format!(
                "no target tokens left within data.max_tokens = {} (the prompt fills it)",
                data.max_tokens
            ));
        }
        out.push(ex);
        Ok(())
    })?;
    if out.is_empty() {
        return Err(RuntimeError::Prompts {
            path: path.into(),
            line: 0,
            msg: "no SFT records".into(),
        });
    }
    Ok(out)
}

/// The batches of `epoch` as index lists (see "Batching" in the module docs).
pub fn epoch_batches(
    lengths: &[usize],
    epoch: usize,
    batch_size: usize,
    bucket_batches: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add((epoch as u64).wrapping_mul(0x9E37_79B9)));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch_size * bucket_batches) {
        let mut w = window.to_vec();
        if bucket_batches > 1 {
            // Stable: ties keep the shuffled order.
            w.sort_by_key(|&i| lengths[i]);
        }
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    if bucket_batches > 1 {
        batches.shuffle(&mut rng);
    }
    batches
}

/// `state.json` of an SFT checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftCheckpointMeta {
    pub kind: String,
    /// Steps completed; the next step to run.
    pub step: usize,
    pub optimizer_steps: usize,
    pub seed: u64,
    pub wall_s: f64,
}

/// Options of one SFT run.
#[derive(Debug, Clone, Default)]
pub struct SftOptions {
    pub run_dir: PathBuf,
    /// Continue from the latest checkpoint in `run_dir`.
    pub resume: bool,
    /// One progress line per step on stderr.
    pub progress: bool,
}

/// What a finished SFT run reports back.
#[derive(Debug, Clone)]
pub struct SftSummary {
    pub reports: Vec<SftReport>,
    pub interrupted: bool,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub total_steps: usize,
    /// The step the run continued from.
    pub resumed_from: Option<usize>,
    pub first_eval_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub checkpoints: usize,
    /// `RUN_DIR/policy`.
    pub model_dir: PathBuf,
}

/// The latest intact checkpoint of `run_dir` (damaged ones are skipped with a warning).
fn latest_checkpoint(run_dir: &Path) -> Result<Option<(SftCheckpointMeta, PathBuf)>, RuntimeError> {
    for (_, dir) in crate::checkpoint::list(run_dir)?.into_iter().rev() {
        if let Err(e) = crate::checkpoint::verify(&dir) {
            tracing::warn!("skipping a damaged SFT checkpoint: {e}");
            continue;
        }
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
        let meta: SftCheckpointMeta = serde_json::from_str(&text).map_err(|e| RuntimeError::Config {
            path: path.clone(),
            msg: format!("not an SFT checkpoint: {e}"),
        })?;
        return Ok(Some((meta, dir)));
    }
    Ok(None)
}

fn write_checkpoint(
    run_dir: &Path,
    cfg: &SftConfig,
    model: &SftModel,
    state: &TrainState,
    wall_s: f64,
) -> Result<(), RuntimeError> {
    crate::checkpoint::write_atomically(run_dir, state.step as u64, cfg.checkpoints.keep, |tmp| {
        let policy = tmp.join("policy");
        save_checkpoint(&policy, &model.config, &state.weights, None)?;
        model.tokenizer.save_to_dir(&policy)?;
        if let Some(src) = &cfg.model.path {
            tandem_models::copy_side_files(src, &policy)?;
        }
        let opt: HashMap<String, Tensor> = state
            .optimizer
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors"))?;
        let meta = SftCheckpointMeta {
            kind: "sft".into(),
            step: state.step,
            optimizer_steps: state.optimizer_steps,
            seed: cfg.seed,
            wall_s,
        };
        let path = tmp.join("state.json");
        std::fs::write(&path, serde_json::to_string_pretty(&meta).expect("json"))
            .map_err(|e| RuntimeError::io(&path, e))?;
        let path = tmp.join("config.toml");
        std::fs::write(&path, cfg.to_toml()).map_err(|e| RuntimeError::io(&path, e))
    })?;
    Ok(())
}

/// Trains on the files the config names; see the module docs.
pub async fn sft(cfg: &SftConfig, opts: SftOptions) -> Result<SftSummary, RuntimeError> {
    let run_dir = opts.run_dir.as_path();
    let model = load_model(cfg)?;
    let d = &cfg.data;
    let mut train = load_examples(&d.train, &model, d)?;
    let eval = match &d.eval {
        Some(p) => load_examples(p, &model, d)?,
        None => split_eval(&mut train, d.eval_fraction, cfg.seed),
    };
    crate::checkpoint::remove_partial(run_dir)?;
    let resume = if opts.resume {
        let found = latest_checkpoint(run_dir)?;
        if found.is_none() {
            return Err(RuntimeError::Config {
                path: run_dir.to_path_buf(),
                msg: "--resume: no intact SFT checkpoint under checkpoints/".into(),
            });
        }
        found
    } else {
        if run_dir.join("metrics.jsonl").exists() || run_dir.join("checkpoints").exists() {
            return Err(RuntimeError::Config {
                path: run_dir.to_path_buf(),
                msg: "this directory already holds a run: pass --resume to continue it or --overwrite to replace it"
                    .into(),
            });
        }
        None
    };
    std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, cfg.to_toml()).map_err(|e| RuntimeError::io(&resolved, e))?;

    let t = &cfg.train;
    let steps = t.total_steps(train.len());
    let exec = Executor::new(cfg.placement.device, cfg.placement.threads)?;
    let resumed_tensors = match &resume {
        Some((_, dir)) => Some((
            dir.join("policy"),
            load_tensors(&dir.join("policy"), &model.config, &Device::Cpu)?,
        )),
        None => None,
    };
    let init = WeightInit::loaded_or_random(resumed_tensors.as_ref().or(model.init.as_ref()), cfg.seed);
    let (lm, vars) = LanguageModel::trainable(&model.config, init, exec.device())?;
    let mut trainer = SftTrainer::new(lm, vars, t.optim(steps))?;
    let (start, wall_offset) = match &resume {
        Some((meta, dir)) => {
            let path = dir.join("optimizer.safetensors");
            let opt = candle_core::safetensors::load(&path, exec.device())?;
            trainer.restore(&opt, meta.optimizer_steps, meta.step)?;
            tracing::info!(step = meta.step, dir = %dir.display(), "resuming SFT");
            (meta.step, meta.wall_s)
        }
        None => (0, 0.0),
    };
    drop(resumed_tensors);
    let trainer = Arc::new(Mutex::new(trainer));

    // Metrics: a resumed run keeps the lines of the steps its checkpoint covers.
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, resume.as_ref().map(|_| start))?;
    let (train_n, eval_n) = (train.len(), eval.len());
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let (batch_size, bucket_batches, seed) = (t.batch_size, t.bucket_batches(), cfg.seed);
    let setup = LearnerSetup {
        kind: "sft",
        learner: "sft_learner",
        channel: "sft_batches",
        executor: exec.clone(),
        placement: cfg.placement.clone(),
        trainer: trainer.clone(),
        train,
        eval: Arc::new(eval),
        eval_batch_size: t.eval_batch_size,
        eval_every: t.eval_every,
        checkpoint_every: cfg.checkpoints.every,
        epochs: t.epochs,
        total_steps: steps,
        skip: start,
        wall_offset_s: wall_offset,
        channel_capacity: cfg.channels.batches,
    };
    let plan = Box::new(move |epoch| epoch_batches(&lengths, epoch, batch_size, bucket_batches, seed));
    let mut checkpoints = 0;
    let driven = drive(setup, plan, (&mut metrics, &metrics_path), |r: &mut SftReport| {
        if opts.progress {
            let ev = r.eval_loss.map(|e| format!(" eval_loss {e:.4}")).unwrap_or_default();
            eprintln!(
                "sft step {}/{steps} loss {:.4}{ev} lr {:.2e} fill {:.2} elapsed {:.1}s",
                r.step + 1,
                r.loss,
                r.lr,
                r.fill,
                r.wall_s
            );
        }
        if let Some(s) = r.state.take() {
            write_checkpoint(run_dir, cfg, &model, &s, r.wall_s)?;
            checkpoints += 1;
        }
        Ok(())
    })
    .await?;
    let (reports, interrupted) = (driven.reports, driven.interrupted);
    let (weights, state) = {
        let t = trainer.lock().map_err(|_| RuntimeError::Poisoned("SFT trainer"))?;
        let state = if interrupted && t.steps() < steps {
            Some(t.state()?)
        } else {
            None
        };
        (t.weights()?, state)
    };
    if let Some(s) = state {
        // Interrupted: checkpoint the step boundary reached, so --resume continues from it.
        let wall = reports.last().map(|r: &SftReport| r.wall_s).unwrap_or(wall_offset);
        write_checkpoint(run_dir, cfg, &model, &s, wall)?;
        checkpoints += 1;
    }
    let model_dir = run_dir.join("policy");
    save_policy(&model_dir, cfg, &model, &weights)?;
    let evals: Vec<f64> = reports.iter().filter_map(|r| r.eval_loss).collect();
    Ok(SftSummary {
        first_eval_loss: evals.first().copied(),
        eval_loss: evals.last().copied(),
        reports,
        interrupted,
        train_examples: train_n,
        eval_examples: eval_n,
        total_steps: steps,
        resumed_from: resume.map(|(m, _)| m.step),
        checkpoints,
        model_dir,
    })
}

/// The trained model in HF layout as `tandem run` saves its policy: the input checkpoint's
/// dtype and side files (`tokenizer_config.json` with its chat template,
/// `generation_config.json`), f32 and the tokenizer alone for built-in models.
fn save_policy(
    dir: &Path,
    cfg: &SftConfig,
    model: &SftModel,
    weights: &HashMap<String, Tensor>,
) -> Result<(), RuntimeError> {
    let src = cfg.model.path.as_deref();
    let dtype = match src {
        Some(s) => tandem_models::checkpoint_dtype(s)?,
        None => candle_core::DType::F32,
    };
    tandem_models::save_checkpoint_as(dir, &model.config, weights, None, dtype)?;
    model.tokenizer.save_to_dir(dir)?;
    if let Some(s) = src {
        tandem_models::copy_side_files(s, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketed_batches_cover_each_example_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 50 + 2).collect();
        let b = epoch_batches(&lengths, 0, 8, 4, 7);
        assert_eq!(b.len(), 13);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let waste = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|x| {
                    let m = x.iter().map(|&i| lengths[i]).max().unwrap();
                    x.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let unbucketed = epoch_batches(&lengths, 0, 8, 1, 7);
        assert!(
            waste(&b) * 3 < waste(&unbucketed),
            "{} vs {}",
            waste(&b),
            waste(&unbucketed)
        );
        // Seeded: same epoch, same batches; another epoch, another order.
        assert_eq!(b, epoch_batches(&lengths, 0, 8, 4, 7));
        assert_ne!(b, epoch_batches(&lengths, 1, 8, 4, 7));
    }
}
