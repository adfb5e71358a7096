//! The run's side of checkpoints: deciding where a run starts ([`resume_point`]), restoring a
//! checkpoint over the freshly built models ([`restore`]), and writing the checkpoints the
//! learner asks for ([`CheckpointWriter`]); the on-disk format is [`crate::checkpoint`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use tandem_actors::learner::LearnerStart;
use tandem_actors::replay::{ReplayCheckpoint, ReplayMsg};
use tandem_actors::{ActorError, PpoTrainer, Trajectory};
use tandem_models::{ModelConfig, TextTokenizer};

use crate::checkpoint::{self, Checkpoint, CheckpointMeta, ModelLayout};
use crate::config::Config;
use crate::error::RuntimeError;
use crate::store::{set_aside_from_step, store_dir};

/// The checkpoint a run continues from: the latest complete one that matches its manifest with
/// `resume` (an error when there is none), `None` for a fresh run. Damaged checkpoints newer
/// than it are set aside as `checkpoints/damaged-step-K` with a warning naming the damaged file
/// and the step the run falls back to. A fresh run into a directory that holds another run is
/// refused. Checkpoints a crash left half-written are removed first.
pub(super) fn resume_point(run_dir: &Path, resume: bool) -> Result<Option<(u64, PathBuf)>, RuntimeError> {
    checkpoint::remove_partial(run_dir)?;
    let existing = checkpoint::list(run_dir)?;
    match (resume, existing.last()) {
        (true, Some(_)) => latest_intact(run_dir, &existing).map(Some),
        (true, None) => Err(RuntimeError::InvalidArgument(format!(
            "{}: no complete checkpoint to resume from",
            checkpoint::checkpoints_dir(run_dir).display()
        ))),
        (false, Some(_)) => Err(RuntimeError::Config {
            path: run_dir.to_path_buf(),
            msg: "this run directory holds another run (it has checkpoints); continue it with `tandem run --resume`, replace it with --overwrite or choose another --run-dir".into(),
        }),
        (false, None) if std::fs::metadata(run_dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0) => {
            Err(RuntimeError::Config {
                path: run_dir.to_path_buf(),
                msg: "this run directory holds another run (it has metrics.jsonl); replace it with --overwrite or choose another --run-dir".into(),
            })
        }
        (false, None) => Ok(None),
    }
}

/// The newest of `existing` (sorted by step) that passes [`checkpoint::verify`]; newer damaged
/// ones are set aside. An error naming every damaged file when none is intact.
fn latest_intact(run_dir: &Path, existing: &[(u64, PathBuf)]) -> Result<(u64, PathBuf), RuntimeError> {
    let mut damaged: Vec<(u64, PathBuf, RuntimeError)> = Vec::new();
    for (step, dir) in existing.iter().rev() {
        match checkpoint::verify(dir) {
            Ok(_) => {
                for (k, bad, e) in &damaged {
                    let aside = checkpoint::checkpoints_dir(run_dir).join(format!("damaged-step-{k}"));
                    std::fs::rename(bad, &aside).map_err(|e| RuntimeError::io(bad, e))?;
                    tracing::warn!(
                        "checkpoint step-{k} is damaged ({e}); set aside as {}; falling back to the previous complete checkpoint, step-{step}",
                        aside.display()
                    );
                }
                return Ok((*step, dir.clone()));
            }
            Err(e) => damaged.push((*step, dir.clone(), e)),
        }
    }
    let what: Vec<String> = damaged.iter().map(|(k, _, e)| format!("step-{k}: {e}")).collect();
    Err(RuntimeError::Config {
        path: checkpoint::checkpoints_dir(run_dir),
        msg: format!("no intact checkpoint to resume from; {}", what.join("; ")),
    })
}

/// Restores the checkpoint `dir` (of `step`) over `trainer` and sets aside the metrics lines
/// and stored trajectories of the steps the resumed run redoes. Returns where the learner and
/// the replay buffer start.
pub(super) fn restore(
    cfg: &Config,
    run_dir: &Path,
    (step, dir): &(u64, PathBuf),
    trainer: &mut PpoTrainer,
    device: &candle_core::Device,
) -> Result<(LearnerStart, ReplayCheckpoint), RuntimeError> {
    let c = checkpoint::read(dir, device)?;
    if c.meta.step >= cfg.steps {
        return Err(RuntimeError::Config {
            path: run_dir.join("config.toml"),
            msg: format!(
                "the latest checkpoint is at step {step} and the run has steps = {}; nothing to resume (raise it with --set steps=N)",
                cfg.steps
            ),
        });
    }
    trainer
        .load_state(&c.trainer)
        .map_err(|e| RuntimeError::Checkpoint(format!("{}: {e}", dir.display())))?;
    set_aside_metrics(&run_dir.join("metrics.jsonl"), c.meta.step)?;
    if store_dir(run_dir).exists() {
        set_aside_from_step(&store_dir(run_dir), c.meta.step)?;
    }
    tracing::info!(step = c.meta.step, dir = %dir.display(), "resuming from checkpoint");
    let start = LearnerStart {
        step: c.meta.step,
        version: c.meta.version,
        wall_s: c.meta.wall_s,
        checkpointed: true,
    };
    let replay = ReplayCheckpoint {
        buffered: c.replay,
        arrived: c.meta.tickets,
        dropped_stale: c.meta.dropped_stale,
    };
    Ok((start, replay))
}

/// What writing a checkpoint needs.
pub(super) struct CheckpointWriter {
    pub run_dir: PathBuf,
    pub trainer: Arc<Mutex<PpoTrainer>>,
    pub replay: ActorRef<ReplayMsg>,
    /// The store's progress: checkpoints wait until every earlier step is written.
    pub store_written: Option<Arc<AtomicU64>>,
    /// The store's error once its writer has failed: a checkpoint then fails at once.
    pub store_failed: Option<crate::store::StoreFailure>,
    /// `faults.disk_full_checkpoint_at_step`.
    pub disk_full_at: Option<u64>,
    pub policy_config: ModelConfig,
    pub critic_config: Option<ModelConfig>,
    pub tokenizer: TextTokenizer,
    pub config_toml: String,
    pub keep: usize,
    pub seed: u64,
}

impl CheckpointWriter {
    /// Writes the checkpoint before `step`; `extra` are trajectories to keep beside the replay
    /// buffer's (a failed learner's batch). The trainer must have completed exactly `step` steps
    /// and not have failed inside one.
    pub async fn write(&self, step: u64, version: u64, wall_s: f64, extra: Vec<Trajectory>) -> Result<PathBuf, String> {
        if let Some(w) = &self.store_written {
            let waiting = Instant::now();
            while w.load(Ordering::Acquire) < step {
                if let Some(e) = self.store_failed.as_ref().and_then(|f| f.get()) {
                    return Err(format!(
                        "the trajectory store failed, so the steps before it are not all stored: {e}"
                    ));
                }
                if waiting.elapsed() > Duration::from_secs(120) {
                    return Err("the trajectory store has not written the steps before it for 120 s".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let replay = self
            .replay
            .call(ReplayMsg::Checkpoint, Some(Duration::from_secs(60)))
            .await
            .map_err(|e| format!("replay buffer: {e}"))?
            .success_or(ActorError::PeerGone("replay buffer did not answer".into()))
            .map_err(|e| e.to_string())?;
        let trainer = self.trainer.clone();
        let run_dir = self.run_dir.clone();
        let (policy_config, critic_config) = (self.policy_config.clone(), self.critic_config.clone());
        let (tokenizer, config_toml, keep, seed) =
            (self.tokenizer.clone(), self.config_toml.clone(), self.keep, self.seed);
        let disk_full = tandem_actors::faults::disk_full_at(self.disk_full_at, step);
        tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
            if disk_full {
                let dir = checkpoint::checkpoints_dir(&run_dir).join(format!("step-{step}"));
                return Err(format!("{}: {}", dir.display(), tandem_actors::faults::disk_full()));
            }
            let state = {
                let t = trainer
                    .lock()
                    .map_err(|_| "the learner failed inside a step, so its weights may be half-updated".to_string())?;
                if t.completed_steps() != step {
                    return Err(format!(
                        "the learner completed {} steps, not {step} (a step's report was lost)",
                        t.completed_steps()
                    ));
                }
                t.state().map_err(|e| e.to_string())?
            };
            let mut buffered = replay.buffered;
            buffered.extend(extra);
            buffered.sort_by_key(|t| (t.ticket, t.row));
            let meta = CheckpointMeta {
                format: checkpoint::FORMAT,
                step,
                version,
                policy_optimizer_steps: state.policy_optimizer_steps,
                critic_optimizer_steps: state.critic_optimizer_steps,
                beta: state.beta,
                beta_bits: state.beta.to_bits(),
                tickets: replay.arrived,
                dropped_stale: replay.dropped_stale,
                replay_trajectories: buffered.len(),
                wall_s,
                seed,
                written_unix_ms: tandem_actors::trajectory::unix_ms(),
            };
            let ckpt = Checkpoint {
                meta,
                trainer: state,
                replay: buffered,
            };
            let layout = ModelLayout {
                policy: &policy_config,
                critic: critic_config.as_ref(),
                tokenizer: &tokenizer,
            };
            checkpoint::write(&run_dir, &ckpt, &layout, &config_toml, keep).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("checkpoint writer: {e}"))?
    }
}

/// Keeps the metrics.jsonl lines of steps before `step`; later lines (steps a resumed run
/// redoes) are appended to `metrics.jsonl.superseded`.
fn set_aside_metrics(path: &Path, step: u64) -> Result<(), RuntimeError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let (mut keep, mut aside) = (String::new(), String::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let s = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        let out = if s.is_some_and(|s| s < step) {
            &mut keep
        } else {
            &mut aside
        };
        out.push_str(line);
        out.push('\n');
    }
    if !aside.is_empty() {
        let sup = path.with_extension("jsonl.superseded");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&sup)
            .map_err(|e| RuntimeError::io(&sup, e))?;
        f.write_all(aside.as_bytes()).map_err(|e| RuntimeError::io(&sup, e))?;
    }
    std::fs::write(path, keep).map_err(|e| RuntimeError::io(path, e))
}
