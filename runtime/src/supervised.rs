//! The skeleton that `tandem sft` and `tandem train-rm` share: a supervised learner on one
//! device, fed by a data-loader thread over a bounded channel, under the run supervisor.
//!
//! [`drive`] starts the loader (every epoch's batches in a seeded order, skipping those a
//! resumed run already trained), the supervisor and the [`SupervisedLearnerActor`], appends
//! each step's report to `RUN_DIR/metrics.jsonl`, hands it to the recipe (progress line,
//! checkpoint) and returns when the loader has issued every batch and the learner has trained
//! it, when the learner fails (its error), or at Ctrl-C / SIGTERM (`interrupted`, at a step
//! boundary). The recipes ([`crate::sft`], [`crate::train_rm`]) supply only their data, their
//! trainer ([`SupervisedTrainer`]) and what they save. Blocking, restarts and checkpoints follow
//! `docs/semantics.md`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use ractor::Actor;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_actors::rm_trainer::RmLoss;
use tandem_actors::supervised_learner::{SupervisedLearnerActor, SupervisedLearnerArgs};
use tandem_actors::supervised_trainer::{Batch, OptimSettings, SupervisedTrainer};
use tandem_actors::{stage_channel, ActorMeter, DeviceId, Executor, StageSender};
use tandem_models::rl::{LrDecay, LrSchedule};
use tandem_models::{load_tensors, HeadKind, ModelConfig, TextTokenizer};

use crate::config::builtin;
use crate::config::{ModelSource, SupervisedCheckpoints};
use crate::error::RuntimeError;
use crate::supervisor::{ChildRole, RunSupervisor, SupervisorArgs, SupervisorMsg};

/// ractor's registry is process-wide: names carry the run's number.
static NEXT_RUN: AtomicU64 = AtomicU64::new(1);

/// Reads a `tandem sft` / `tandem train-rm` config: `path` with `--set section.key=value`
/// overrides, paths resolved against the file's directory, then validated (an invalid value is
/// a config error naming the file).
pub fn load_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    overrides: &[String],
    resolve_paths: fn(&mut T, &Path),
    validate: fn(&T) -> Result<(), String>,
) -> Result<T, RuntimeError> {
    let mut cfg: T = crate::config::read_toml(path, overrides)?;
    resolve_paths(&mut cfg, path.parent().unwrap_or(Path::new(".")));
    validate(&cfg).map_err(|msg| RuntimeError::Config {
        path: path.to_path_buf(),
        msg,
    })?;
    Ok(cfg)
}

/// `[train]` of both recipes: the optimiser, the schedule and the held-out evaluation, plus
/// one field of each recipe's own (the other recipe refuses it, see [`TrainSection::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup_steps: usize,
    pub decay: LrDecay,
    pub min_lr: f64,
    pub weight_decay: f64,
    /// `<= 0` disables clipping.
    pub max_grad_norm: f64,
    /// Steps between held-out evaluations; 0 = only after the last step (always evaluated).
    pub eval_every: usize,
    pub eval_batch_size: usize,
    /// `tandem sft` only: the length-bucketing window, in batches (1 = off; default 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_batches: Option<usize>,
    /// `tandem train-rm` only: the ranking loss (default `bradley_terry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<RmLoss>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            lr: 1e-4,
            warmup_steps: 0,
            decay: LrDecay::Cosine,
            min_lr: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_every: 10,
            eval_batch_size: 32,
            bucket_batches: None,
            loss: None,
        }
    }
}

/// Which recipe a config is for: each accepts only its own recipe-specific `[train]` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    Sft,
    RewardModel,
}

impl TrainSection {
    /// The length-bucketing window of `tandem sft`.
    pub fn bucket_batches(&self) -> usize {
        self.bucket_batches.unwrap_or(8)
    }

    /// The ranking loss of `tandem train-rm`.
    pub fn loss(&self) -> RmLoss {
        self.loss.unwrap_or(RmLoss::BradleyTerry)
    }

    /// Steps of a run over `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        self.epochs * n.div_ceil(self.batch_size)
    }

    /// The optimiser settings of a run of `total_steps` steps (warm-up capped at the run).
    pub fn optim(&self, total_steps: usize) -> OptimSettings {
        OptimSettings {
            schedule: LrSchedule {
                peak_lr: self.lr,
                warmup_steps: self.warmup_steps.min(total_steps),
                total_steps,
                decay: self.decay,
                min_lr: self.min_lr,
            },
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
        }
    }

    pub fn validate(&self, recipe: Recipe) -> Result<(), String> {
        match recipe {
            Recipe::Sft if self.loss.is_some() => {
                return Err("train.loss is the reward-model loss of train-rm; sft has none".into())
            }
            Recipe::RewardModel if self.bucket_batches.is_some() => {
                return Err("train.bucket_batches is for sft; train-rm does not bucket by length".into())
            }
            _ => {}
        }
        if self.epochs == 0 || self.batch_size == 0 || self.eval_batch_size == 0 || self.bucket_batches == Some(0) {
            return Err(
                "train.epochs, train.batch_size, train.bucket_batches and train.eval_batch_size must be >= 1".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr)) {
            return Err("train.lr must be > 0 and train.min_lr in [0, lr]".into());
        }
        Ok(())
    }
}

/// `[placement]`: the learner's device and its threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerPlacement {
    pub device: DeviceId,
    pub threads: usize,
}

impl Default for LearnerPlacement {
    fn default() -> Self {
        Self {
            device: DeviceId::Cpu(0),
            threads: 1,
        }
    }
}

/// `[channels]`: the loader → learner channel's capacity, in batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerChannels {
    pub batches: usize,
}

impl Default for LearnerChannels {
    fn default() -> Self {
        Self { batches: 2 }
    }
}

/// The checks on the sections both recipes share, for `recipe`'s `validate`.
pub fn validate_sections(
    recipe: Recipe,
    train: &TrainSection,
    placement: &LearnerPlacement,
    channels: &LearnerChannels,
    checkpoints: &SupervisedCheckpoints,
) -> Result<(), String> {
    train.validate(recipe)?;
    checkpoints.validate()?;
    placement
        .device
        .check_built()
        .map_err(|e| format!("placement.device: {e}"))?;
    if channels.batches == 0 || placement.threads == 0 {
        return Err("channels.batches and placement.threads must be >= 1".into());
    }
    Ok(())
}

/// The `[model]` checks shared by both recipes.
pub fn validate_model(m: &ModelSource) -> Result<(), String> {
    if m.path.is_some() == m.builtin.is_some() {
        return Err("model: set exactly one of `path` and `builtin`".into());
    }
    if let Some(p) = &m.path {
        if !p.join("config.json").is_file() {
            return Err(format!("model.path: no config.json in {}", p.display()));
        }
    }
    Ok(())
}

/// The model a recipe starts from: its config (with the recipe's head), tokenizer and, for a
/// checkpoint, its directory and weights (a built-in model is initialised from the seed).
pub struct Backbone {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub init: Option<(PathBuf, HashMap<String, Tensor>)>,
}

/// Loads `[model]`: a HF checkpoint, or the built-in tiny model with `max_positions`.
pub fn load_backbone(model: &ModelSource, head: HeadKind, max_positions: usize) -> Result<Backbone, RuntimeError> {
    if let Some(dir) = &model.path {
        let config = ModelConfig::from_dir(dir)?;
        let tensors = load_tensors(dir, &config, &Device::Cpu)?;
        Ok(Backbone {
            config: config.with_head(head),
            tokenizer: TextTokenizer::from_dir(dir)?,
            init: Some((dir.clone(), tensors)),
        })
    } else {
        let spec = model.builtin.as_ref().ok_or_else(|| RuntimeError::Config {
            path: PathBuf::from("[model]"),
            msg: "set exactly one of `path` and `builtin`".into(),
        })?;
        Ok(Backbone {
            config: builtin::model_config(spec, max_positions).with_head(head),
            tokenizer: builtin::tokenizer()?,
            init: None,
        })
    }
}

/// Holds out a seeded `fraction` of `train` (at least one example stays for training).
pub fn split_eval<E>(train: &mut Vec<E>, fraction: f64, seed: u64) -> Vec<E> {
    train.shuffle(&mut StdRng::seed_from_u64(seed ^ 0xE7A1));
    let n = (train.len() as f64 * fraction).round() as usize;
    train.split_off(train.len() - n.min(train.len().saturating_sub(1)))
}

/// `RUN_DIR/metrics.jsonl`, new, keeping the lines of steps before `keep_before` (a resumed
/// run keeps the lines of the steps its checkpoint covers).
pub fn open_metrics(path: &Path, keep_before: Option<usize>) -> Result<std::fs::File, RuntimeError> {
    let kept: Vec<String> = match keep_before {
        Some(start) => std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| (s as usize) < start)
            })
            .map(String::from)
            .collect(),
        None => vec![],
    };
    let mut metrics = std::fs::File::create(path).map_err(|e| RuntimeError::io(path, e))?;
    for l in &kept {
        writeln!(metrics, "{l}").map_err(|e| RuntimeError::io(path, e))?;
    }
    Ok(metrics)
}

/// Which examples each batch of an epoch holds, in order.
pub type EpochPlan = Box<dyn FnMut(usize) -> Vec<Vec<usize>> + Send>;

/// What the learner of one run is given.
pub struct LearnerSetup<T: SupervisedTrainer> {
    /// Names the supervisor and the loader thread (`sft`, `rm`).
    pub kind: &'static str,
    /// The learner's meter kind (`sft_learner`) and the loader channel's name (`sft_batches`).
    pub learner: &'static str,
    pub channel: &'static str,
    pub executor: Arc<Executor>,
    pub placement: LearnerPlacement,
    pub trainer: Arc<Mutex<T>>,
    pub train: Vec<T::Example>,
    pub eval: Arc<Vec<T::Example>>,
    pub eval_batch_size: usize,
    pub eval_every: usize,
    /// `checkpoints.every`.
    pub checkpoint_every: u64,
    pub epochs: usize,
    pub total_steps: usize,
    /// Batches already trained before a resume: the loader skips them.
    pub skip: usize,
    pub wall_offset_s: f64,
    pub channel_capacity: usize,
}

/// How a driven run ended: every report, and whether Ctrl-C or SIGTERM stopped it.
pub struct Driven<R> {
    pub reports: Vec<R>,
    pub interrupted: bool,
}

/// Trains to the end (see the module docs). `plan` orders each epoch; `on_report` runs after
/// the report's line is on disk (progress, checkpoints).
pub async fn drive<T>(
    setup: LearnerSetup<T>,
    plan: EpochPlan,
    metrics: (&mut std::fs::File, &Path),
    mut on_report: impl FnMut(&mut T::Report) -> Result<(), RuntimeError>,
) -> Result<Driven<T::Report>, RuntimeError>
where
    T: SupervisedTrainer,
    T::Report: Serialize,
{
    let (metrics, metrics_path) = metrics;
    let kind = setup.kind;
    let device = setup.placement.device;
    let (tx, rx) = stage_channel::<Batch<T::Example>>(setup.channel, setup.channel_capacity);
    let depth = rx.stats().clone();
    let meter = Arc::new(
        ActorMeter::new(setup.learner, format!("{}/{device}", setup.learner), device.to_string())
            .with_inbound(move || depth.depth(), setup.channel_capacity),
    );
    let loader = spawn_loader(kind, setup.train, setup.epochs, setup.skip, plan, tx);

    let run_no = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel();
    let supervision = SupervisorArgs {
        config: Default::default(),
        reissued: Default::default(),
        failures: fail_tx,
    };
    let (root, root_handle) = Actor::spawn(Some(format!("{kind}-supervisor#{run_no}")), RunSupervisor, supervision)
        .await
        .map_err(|e| RuntimeError::Supervisor(format!("cannot start: {e}")))?;
    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel(16);
    let (learner, learner_h) = Actor::spawn_linked(
        Some(format!("{}/{device}#{run_no}", setup.learner)),
        SupervisedLearnerActor::<T>::default(),
        SupervisedLearnerArgs {
            executor: setup.executor,
            trainer: setup.trainer,
            input: rx,
            eval: setup.eval,
            eval_batch_size: setup.eval_batch_size,
            eval_every: setup.eval_every,
            checkpoint_every: usize::try_from(setup.checkpoint_every).unwrap_or(usize::MAX),
            total_steps: setup.total_steps,
            wall_offset_s: setup.wall_offset_s,
            reports: report_tx,
            meter,
        },
        root.get_cell(),
    )
    .await
    .map_err(|e| RuntimeError::ActorFailed(e.to_string()))?;
    root.cast(SupervisorMsg::Watch {
        name: setup.learner.into(),
        role: ChildRole::Learner,
        cell: learner.get_cell(),
    })
    .map_err(|e| RuntimeError::Supervisor(e.to_string()))?;

    let mut reports = Vec::new();
    let mut failure = None;
    let mut interrupted = false;
    let mut interrupts = crate::interrupts::Interrupts::listen()?;
    loop {
        tokio::select! {
            r = report_rx.recv() => match r {
                Some(mut r) => {
                    let line = serde_json::to_string(&r).expect("report serialises");
                    writeln!(metrics, "{line}").map_err(|e| RuntimeError::io(metrics_path, e))?;
                    metrics.flush().map_err(|e| RuntimeError::io(metrics_path, e))?;
                    on_report(&mut r)?;
                    reports.push(r);
                }
                None => break,
            },
            f = fail_rx.recv() => { failure = f.map(|f| format!("{}: {}", f.actor, f.error)); break; }
            _ = interrupts.recv() => { interrupted = true; break; }
        }
    }
    metrics.flush().map_err(|e| RuntimeError::io(metrics_path, e))?;
    learner.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), learner_h).await;
    root.stop(None);
    let _ = root_handle.await;
    drop(report_rx);
    let _ = tokio::task::spawn_blocking(move || loader.join()).await;
    if let Some(f) = failure {
        return Err(RuntimeError::ActorFailed(f));
    }
    Ok(Driven { reports, interrupted })
}

/// Feeds every epoch's batches in the order `plan` gives, skipping the first `skip` (already
/// trained before a resume); stops early when the learner is gone.
fn spawn_loader<E: Clone + Send + Sync + 'static>(
    kind: &str,
    train: Vec<E>,
    epochs: usize,
    skip: usize,
    mut plan: EpochPlan,
    tx: StageSender<Batch<E>>,
) -> std::thread::JoinHandle<usize> {
    std::thread::Builder::new()
        .name(format!("tandem-{kind}-loader"))
        .spawn(move || {
            let mut sent = 0;
            let mut index = 0;
            for epoch in 0..epochs {
                for b in plan(epoch) {
                    index += 1;
                    if index <= skip {
                        continue;
                    }
                    let batch = Batch {
                        epoch,
                        examples: b.iter().map(|&i| train[i].clone()).collect(),
                    };
                    if tx.send_blocking(batch).is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
            sent
        })
        .expect("spawn the loader thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(text: &str) -> TrainSection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn each_recipe_refuses_the_other_recipes_train_field() {
        let sft = train("bucket_batches = 4");
        assert_eq!(sft.bucket_batches(), 4);
        sft.validate(Recipe::Sft).unwrap();
        let e = sft.validate(Recipe::RewardModel).unwrap_err();
        assert!(e.contains("train.bucket_batches"), "{e}");

        let rm = train("loss = \"best_of_k\"");
        assert_eq!(rm.loss(), RmLoss::BestOfK);
        rm.validate(Recipe::RewardModel).unwrap();
        let e = rm.validate(Recipe::Sft).unwrap_err();
        assert!(e.contains("train.loss"), "{e}");

        // Unset, each recipe's own field takes its default, and both recipes accept it.
        let plain = train("epochs = 2");
        assert_eq!((plain.bucket_batches(), plain.loss()), (8, RmLoss::BradleyTerry));
        plain.validate(Recipe::Sft).unwrap();
        plain.validate(Recipe::RewardModel).unwrap();
        assert!(train("bucket_batches = 0").validate(Recipe::Sft).is_err());
        assert!(toml::from_str::<TrainSection>("nope = 1").is_err());
    }

    #[test]
    fn the_schedule_spans_the_run_and_caps_the_warm_up() {
        let t = train("epochs = 3\nbatch_size = 4\nwarmup_steps = 100\nlr = 0.01");
        let steps = t.total_steps(10);
        assert_eq!(steps, 9, "3 epochs of ceil(10 / 4) batches");
        let o = t.optim(steps);
        assert_eq!((o.schedule.total_steps, o.schedule.warmup_steps), (9, 9));
        assert_eq!(o.schedule.peak_lr, 0.01);
    }
}
