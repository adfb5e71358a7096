//! Serving a running pipeline: the learner's events, the supervisor's failures, Ctrl-C (or SIGTERM) and
//! the periodic samplers, until the learner is done or the run stops.
//!
//! - Each step report is appended to `RUN_DIR/metrics.jsonl` (flushed) — a step that `[eval]`
//!   evaluates once its held-out measures are in — and with
//!   `metrics.tensorboard` to a TensorBoard event file in `RUN_DIR/tb/`, and moves the progress
//!   bar; a checkpoint the learner asks for is written ([`CheckpointWriter`]) before it goes
//!   on, so every line before a checkpoint is on disk first.
//! - A stage the supervisor gave up on, or Ctrl-C, sets the learner's stop flag and drains the
//!   replay buffer: the learner takes a final checkpoint at its next step boundary and stops. A
//!   second Ctrl-C stops at once; a learner that does not reach a boundary within 300 s is
//!   abandoned without a checkpoint.
//! - A failed learner gets a checkpoint from here when its state is still at a step boundary,
//!   with the batch it held beside the buffered trajectories.
//! - A write that fails (`metrics.jsonl` or `actors.jsonl`: a full disk, say) ends the loop at
//!   once with the error as the run's failure: nothing more is written, so what is on disk ends
//!   at the last complete checkpoint, and the run exits 1 ([`Outcome::write_failed`]).
//! - Every 25 ms the trajectories held in the channels and the replay buffer are sampled (the
//!   run's `max_held`); every `metrics.sample_interval_s` each actor's meter goes to
//!   `actors.jsonl`. The Prometheus endpoint is served for the loop's duration.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use tandem_actors::channel::ChannelStats;
use tandem_actors::learner::LearnerStart;
use tandem_actors::replay::ReplayMsg;
use tandem_actors::{ActorMeter, LearnerEvent, StepReport, Trajectory};
use tokio::sync::mpsc;

use super::checkpoints::CheckpointWriter;
use super::evaluator::EvalResults;
use crate::config::Config;
use crate::error::RuntimeError;
use crate::interrupts::Interrupts;
use crate::step_probe::ProbeResults;
use crate::supervisor::{ChildRole, RunFailure};
use crate::telemetry::{self, ActorSampler};

/// What the loop serves.
pub(super) struct Drive<'a> {
    pub cfg: &'a Config,
    pub run_dir: &'a Path,
    pub events: mpsc::Receiver<LearnerEvent>,
    pub failures: mpsc::UnboundedReceiver<RunFailure>,
    pub checkpoints: CheckpointWriter,
    pub replay: ActorRef<ReplayMsg>,
    /// The learner's stop flag.
    pub stop: Arc<AtomicBool>,
    /// The batch the learner holds during a step.
    pub in_hand: Arc<Mutex<Vec<Trajectory>>>,
    pub start: LearnerStart,
    pub started: Instant,
    pub meters: Vec<Arc<ActorMeter>>,
    pub probe: Option<ProbeResults>,
    /// The `[eval]` measures, written into the lines of the steps they evaluate.
    pub eval: Option<EvalResults>,
    pub progress: bool,
    /// Trajectories in the replay buffer.
    pub replay_held: Arc<AtomicUsize>,
    /// The data-plane channels after the samplers.
    pub depths: [Arc<ChannelStats>; 3],
    /// Trajectories per batch in those channels.
    pub per_ticket: usize,
    /// `faults.disk_full_metrics_at_step`.
    pub metrics_disk_full_at: Option<u64>,
}

/// How the loop ended.
pub(super) struct Outcome {
    pub reports: Vec<StepReport>,
    /// Steps of the checkpoints written, in order.
    pub checkpoints: Vec<u64>,
    pub interrupted: bool,
    /// Why the run stopped early.
    pub failure: Option<String>,
    /// The failure is a write that failed (metrics.jsonl or actors.jsonl).
    pub write_failed: bool,
    /// Most trajectories ever held in the channels plus the replay buffer.
    pub max_held: usize,
}

impl Drive<'_> {
    pub async fn serve(self) -> Result<Outcome, RuntimeError> {
        let Drive {
            cfg,
            run_dir,
            events: mut events_rx,
            failures: mut fail_rx,
            checkpoints,
            replay,
            stop,
            in_hand,
            start,
            started,
            meters,
            probe: probe_rx,
            mut eval,
            progress,
            replay_held,
            depths,
            per_ticket,
            metrics_disk_full_at,
        } = self;
        let metrics_path = run_dir.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| RuntimeError::io(&metrics_path, e))?;
        let mut tb = match cfg.metrics.tensorboard {
            true => Some(crate::tensorboard::EventWriter::create(
                &run_dir.join("tb"),
                (start.step > 0).then_some(start.step),
            )?),
            false => None,
        };
        // Progress on stderr: a live bar on a terminal, else one line per step (see RunOptions).
        let bar = (progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(|| crate::progress::progress_bar(cfg.steps, start.step));
        let mut pace = crate::progress::Pace::new(cfg.steps, start.step);
        let mut reports = Vec::new();
        let mut written: Vec<u64> = Vec::new();
        let mut interrupted = false;
        let mut failure: Option<String> = None;
        let mut write_failed = false;
        let mut draining_since: Option<Instant> = None;
        let mut max_held = 0usize;
        let mut probe = tokio::time::interval(Duration::from_millis(25));
        let mut sampler = ActorSampler::new(meters, run_dir, started)?;
        let mut sample_tick = tokio::time::interval(Duration::from_secs_f64(cfg.metrics.sample_interval_s));
        // An earlier session's address must not lead `tandem top` to whatever holds that port now.
        let _ = std::fs::remove_file(run_dir.join("metrics_addr"));
        let endpoint = match (cfg.metrics.enabled, telemetry::prometheus()) {
            // A taken port must not stop a training run: warn and go on without the endpoint.
            (true, Some(handle)) => match telemetry::serve(&cfg.metrics.addr, handle).await {
                Ok((addr, task)) => {
                    let path = run_dir.join("metrics_addr");
                    std::fs::write(&path, addr.to_string()).map_err(|e| RuntimeError::io(&path, e))?;
                    tracing::info!(%addr, "serving Prometheus metrics");
                    Some(task)
                }
                Err(e) => {
                    tracing::warn!("no Prometheus endpoint: {e}");
                    None
                }
            },
            (true, None) => {
                tracing::warn!("another metrics recorder is installed; no Prometheus endpoint");
                None
            }
            _ => None,
        };
        let drain = |since: &mut Option<Instant>| {
            if since.is_none() {
                stop.store(true, Ordering::Relaxed);
                let _ = replay.cast(ReplayMsg::Drain);
                *since = Some(Instant::now());
            }
        };
        let mut latest_version = start.version;
        let mut next_step = start.step;
        // When the learner stopped early: its failure report may still be on its way.
        let mut learner_gone: Option<Instant> = None;
        let mut interrupts = Interrupts::listen()?;
        loop {
            tokio::select! {
                ev = events_rx.recv(), if learner_gone.is_none() => match ev {
                    Some(LearnerEvent::Report(mut r)) => {
                        if let Some(e) = eval.as_mut() {
                            if let Some(m) = e.for_step(r.step).await {
                                r.eval = m;
                            }
                        }
                        let line = crate::step_probe::merge(&r, probe_rx.as_ref());
                        let appended = if tandem_actors::faults::disk_full_at(metrics_disk_full_at, r.step) {
                            Err(tandem_actors::faults::disk_full())
                        } else {
                            writeln!(metrics, "{line}").and_then(|()| metrics.flush())
                        };
                        if let Err(e) = appended {
                            // What is on disk ends at the last checkpoint: stop now, write nothing more.
                            failure = Some(format!(
                                "cannot append step {}'s line to {}: {e}; the run stops",
                                r.step,
                                metrics_path.display()
                            ));
                            write_failed = true;
                            break;
                        }
                        if let Some(tb) = &mut tb {
                            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                            tb.scalars(r.step, &crate::tensorboard::scalars_of(&v))?;
                        }
                        let msg = pace.message(&r);
                        // The run's position for `tandem top` (the learner's counter is this session's).
                        metrics::gauge!("tandem_run_step").set((r.step + 1) as f64);
                        metrics::gauge!("tandem_run_steps").set(cfg.steps as f64);
                        metrics::gauge!("tandem_run_eta_seconds").set(pace.eta_s);
                        metrics::gauge!("tandem_learner_score_mean").set(r.stats.score_mean);
                        if let Some(b) = &bar {
                            b.set_position(r.step + 1);
                            b.set_message(msg);
                        } else if progress {
                            eprintln!("step {}/{} {msg}", r.step + 1, cfg.steps);
                        }
                        latest_version = r.policy_version + 1;
                        next_step = r.step + 1;
                        reports.push(*r);
                    }
                    Some(LearnerEvent::Checkpoint { step, version, wall_s, reply }) => {
                        let r = checkpoints.write(step, version, wall_s, vec![]).await;
                        match &r {
                            Ok(dir) => {
                                tracing::info!(step, dir = %dir.display(), "checkpoint written");
                                written.push(step);
                            }
                            Err(e) => tracing::error!(step, "checkpoint failed: {e}"),
                        }
                        let _ = reply.send(r.map(|_| ()));
                    }
                    Some(LearnerEvent::Halted(msg)) => failure = Some(msg),
                    None if next_step >= cfg.steps || draining_since.is_some() || failure.is_some() => break,
                    None => learner_gone = Some(Instant::now()),
                },
                f = fail_rx.recv() => {
                    let Some(f) = f else { continue };
                    let what = format!("{}: {}", f.actor, f.error);
                    match f.role {
                        // The supervisor gave up on a stage: stop at the next step boundary, with a checkpoint.
                        ChildRole::Rollout | ChildRole::Stage => {
                            failure.get_or_insert(what);
                            drain(&mut draining_since);
                        }
                        ChildRole::Learner => {
                            let hand = in_hand.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
                            let note = match checkpoints.write(next_step, latest_version, started.elapsed().as_secs_f64() + start.wall_s, hand).await {
                                Ok(dir) => {
                                    written.push(next_step);
                                    format!("checkpoint written: {}", dir.display())
                                }
                                // A checkpoint that failed for the learner fails the same way here.
                                Err(e) if what.contains(&e) => "no checkpoint of its state (the same error)".to_string(),
                                Err(e) => format!("no checkpoint of its state: {e}"),
                            };
                            failure = Some(format!("{what}; {note}"));
                            break;
                        }
                        ChildRole::Essential => {
                            failure = Some(what);
                            break;
                        }
                    }
                }
                signal = interrupts.recv() => {
                    if draining_since.is_some() { break; }
                    tracing::warn!(
                        "interrupted by {}: stopping at the next step boundary with a checkpoint (Ctrl-C or SIGTERM again to stop now)",
                        signal.name()
                    );
                    interrupted = true;
                    drain(&mut draining_since);
                }
                _ = probe.tick() => {
                    let held = replay_held.load(Ordering::Relaxed);
                    let in_channels: usize = depths.iter().map(|c| c.depth()).sum::<usize>();
                    max_held = max_held.max(held + in_channels * per_ticket);
                    if learner_gone.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                        failure = Some(format!("the learner stopped after step {next_step} of {}", cfg.steps));
                        break;
                    }
                    if draining_since.is_some_and(|t| t.elapsed() > Duration::from_secs(300)) {
                        tracing::error!("the learner did not reach a step boundary within 300 s; stopping without a final checkpoint");
                        break;
                    }
                }
                _ = sample_tick.tick() => if let Err(e) = sampler.sample(latest_version) {
                    failure = Some(format!("{e}; the run stops"));
                    write_failed = true;
                    break;
                },
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        if !write_failed {
            if let Err(e) = sampler.sample(latest_version) {
                failure.get_or_insert(format!("{e}; the run stops"));
                write_failed = true;
            }
        }
        if let Some(task) = endpoint {
            task.abort();
            let _ = std::fs::remove_file(run_dir.join("metrics_addr"));
        }
        Ok(Outcome {
            reports,
            checkpoints: written,
            interrupted,
            failure,
            write_failed,
            max_held,
        })
    }
}
