//! Starting, running, checkpointing and stopping one RL run.
//!
//! [`run`] builds the devices of the placement, loads or initialises the models (and, with
//! [`RunOptions::resume`], restores the latest checkpoint over them), wires the bounded
//! channels (tickets → rollout ×N → reward → value → replay) and spawns every actor under the
//! [`RunSupervisor`]. It then serves the learner's events — appending each step report to
//! `RUN_DIR/metrics.jsonl` and writing the checkpoints the learner asks for — until the learner
//! is done, a failure, or Ctrl-C / SIGTERM ([`crate::interrupts`]).
//!
//! Stopping (Ctrl-C, SIGTERM, the supervisor giving up, a failed learner), what a checkpoint
//! holds and the shutdown order are described once, in `docs/semantics.md` (§5 to §7). A run
//! that stops for too many non-finite steps keeps the last checkpoint from before them.
//!
//! Failing writes: a failed append to `metrics.jsonl`, a trajectory store whose writer failed
//! (the learner stops after the step it could not store) and a checkpoint that cannot be
//! written all stop the run with [`RuntimeError::Stopped`] or [`RuntimeError::ActorFailed`]
//! (exit 1), naming the file and the system's error. The message ends with the latest complete
//! checkpoint to `--resume` from, or says that there is none and the run must start again.
//!
//! Resuming: `metrics.jsonl` lines and stored trajectories of steps at or after the checkpoint
//! are set aside (the resumed run redoes those steps), the replay buffer is refilled from the
//! checkpoint and the feeder issues every ticket the checkpoint does not account for.
//!
//! After the shutdown (`docs/semantics.md` §6) the trained policy (and critic) are saved
//! in HF layout under `RUN_DIR/policy` (`RUN_DIR/critic`).
//!
//! With `[eval]`, an evaluator actor evaluates the published weights greedily on held-out
//! prompts every `eval.every` steps and at the end; the measures join those steps'
//! `metrics.jsonl` lines (see `evaluator`).
//!
//! The parts: `models` (what a run starts from), `checkpoints` (resume point, restore,
//! writing), `actor_tree` (spawning under the supervisor), `evaluator` (`[eval]`) and `drive`
//! (the event loop).

mod actor_tree;
mod checkpoints;
mod drive;
mod evaluator;
mod models;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_actors::learner::{LearnerArgs, LearnerStart};
use tandem_actors::replay::{ReplayArgs, ReplayCheckpoint};
use tandem_actors::snapshot::AdoptLatencies;
use tandem_actors::{
    stage_channel, DeviceId, Executor, Faults, PpoTrainer, ReissueQueue, StepReport, TrajectoryBatch, WeightsSnapshot,
};
use tandem_models::{LanguageModel, ModelConfig, TextTokenizer};

use crate::checkpoint;
use crate::config::Config;
use crate::error::RuntimeError;
use crate::eval::HeldOut;
use crate::prompts::{load_prompts, spawn_feeder, TicketPlan};
use crate::reward_sources::reward_source;
use crate::store::{spawn_writer_with_fault, store_dir, StoreStats};
use crate::supervisor::SupervisorMsg;
use actor_tree::ActorTree;
use checkpoints::CheckpointWriter;
use drive::{Drive, Outcome};
use evaluator::EvalSchedule;
pub(crate) use models::sampling_temperature;
pub use models::{build_learner, BuiltLearner};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Report progress on stderr after every learner step: step k/N, score, reward, KL, beta,
    /// generated tokens/s, elapsed time and ETA (both for this session). A live bar when
    /// stderr is a terminal, else one plain line per step.
    pub progress: bool,
    /// Test hook: extra seconds per learner step (a deliberately slow learner).
    pub learner_delay: Duration,
    /// Extra fields for each step's metrics line ([`crate::step_probe`]).
    pub step_probe: Option<crate::step_probe::StepProbe>,
    /// Continue from the latest complete checkpoint in `run_dir`.
    pub resume: bool,
}

/// What a finished run reports back.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub reports: Vec<StepReport>,
    pub interrupted: bool,
    /// Most trajectories ever held in the data-plane channels plus the replay buffer.
    pub max_held: usize,
    /// Upper bound on `max_held` implied by the configured capacities.
    pub held_bound: usize,
    /// Total seconds rollout actors spent blocked on a full reward channel.
    pub rollout_blocked_s: f64,
    /// Tickets the feeder issued.
    pub tickets_issued: u64,
    /// What the trajectory store wrote (`None` with `store.retention = "none"`).
    pub store: Option<StoreStats>,
    /// The checkpoint step the run resumed from.
    pub resumed_from: Option<u64>,
    /// Steps of the checkpoints this run wrote, in order.
    pub checkpoints: Vec<u64>,
    /// Actor restarts by the supervisor.
    pub restarts: u64,
    /// Malformed prompt lines skipped (`data.on_bad_line = "skip"`).
    pub prompts_skipped: usize,
}

/// Runs `cfg` to completion (or a stop) and returns the reports.
pub async fn run(cfg: &Config, opts: RunOptions) -> Result<RunSummary, RuntimeError> {
    if cfg.mock_labeller.is_some() {
        return Err(RuntimeError::InvalidArgument(
            "a config with [mock_labeller] runs through crate::mock_labeller::run, which runs PPO after labelling"
                .into(),
        ));
    }
    if cfg.metrics.enabled {
        // Before any actor exists: series set before the recorder is installed (each actor's
        // queue capacity, its zeroed counters) would be lost.
        let _ = crate::telemetry::prometheus();
    }
    let run_dir = &opts.run_dir;
    // The cluster cookie is checked before anything is written or started.
    let cookie = match &cfg.cluster {
        Some(cc) => Some(crate::cluster::head_credentials(cc)?),
        None => None,
    };
    std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
    let resume_from = checkpoints::resume_point(run_dir, opts.resume)?;
    let config_toml = cfg.to_toml();
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, &config_toml).map_err(|e| RuntimeError::io(&resolved, e))?;

    // Devices.
    let p = &cfg.placement;
    let mut devices: BTreeMap<DeviceId, Arc<Executor>> = BTreeMap::new();
    let placed: Vec<DeviceId> = p
        .rollout_devices
        .iter()
        .chain([&p.reward_device, &p.value_device, &p.learner_device])
        .copied()
        .collect();
    let mut cores = BTreeMap::new();
    if p.pin_threads {
        match tandem_actors::device::core_plan(&placed, p.threads_per_device) {
            Ok(plan) => cores = plan,
            Err(why) => tracing::warn!("placement.pin_threads: threads left unpinned: {why}"),
        }
    }
    for d in &placed {
        if !devices.contains_key(d) {
            devices.insert(*d, Executor::start(*d, p.threads_per_device, cores.remove(d))?);
        }
    }
    let dev = |d: &DeviceId| devices[d].clone();

    // Models, and the checkpoint over them when resuming.
    let learner_exec = dev(&p.learner_device);
    let BuiltLearner {
        mut trainer,
        policy,
        critic_config,
        initial_policy,
    } = build_learner(cfg, learner_exec.device())?;
    let (start, restore) = match &resume_from {
        Some(point) => checkpoints::restore(cfg, run_dir, point, &mut trainer, learner_exec.device())?,
        None => (LearnerStart::default(), ReplayCheckpoint::default()),
    };
    let reward_dev = dev(&p.reward_device);
    let reference = Arc::new(LanguageModel::from_tensors(
        &policy.config,
        initial_policy,
        reward_dev.device(),
    )?);
    let source = reward_source(cfg, &policy.tokenizer, reward_dev.device())?;
    let wrap = |tensors| {
        Arc::new(WeightsSnapshot {
            version: start.version,
            tensors,
            published_at: Instant::now(),
        })
    };
    let first_policy = wrap(trainer.policy_weights()?);
    let first_critic = trainer.critic_weights()?.map(wrap);
    let trainer = Arc::new(Mutex::new(trainer));

    // Trajectory store: its own thread, fed by the learner over a bounded channel.
    let (store_tx, store_writer) = match cfg.store.retention {
        crate::config::Retention::None => (None, None),
        _ => {
            let dir = store_dir(run_dir);
            let (tx, w) = spawn_writer_with_fault(&dir, &cfg.store, start.step, cfg.faults.disk_full_store_at_step)?;
            (Some(tx), Some(w))
        }
    };
    let (store_tx, probe_rx) = crate::step_probe::tap(store_tx, opts.step_probe.clone(), cfg.store.queue);

    // Data plane.
    let c = &cfg.channels;
    let (ticket_tx, ticket_rx) = stage_channel("tickets", c.tickets);
    let (gen_tx, gen_rx) = stage_channel::<TrajectoryBatch>("rollout_to_reward", c.rollout_to_reward);
    let (rew_tx, rew_rx) = stage_channel::<TrajectoryBatch>("reward_to_value", c.reward_to_value);
    let (val_tx, val_rx) = stage_channel::<TrajectoryBatch>("value_to_replay", c.value_to_replay);
    let per_ticket = cfg.data.prompts_per_ticket * cfg.data.samples_per_prompt;
    let held_bound = (c.rollout_to_reward + c.reward_to_value + c.value_to_replay) * per_ticket + cfg.replay_capacity();
    let prompts = load_prompts(
        &cfg.data.prompts,
        &cfg.data.prompt_key,
        &policy.tokenizer,
        cfg.data.prompt_max_tokens,
        cfg.data.on_bad_line,
    )?;
    let plan = TicketPlan {
        seed: cfg.seed,
        prompts_per_ticket: cfg.data.prompts_per_ticket,
        tickets_per_step: cfg.tickets_per_step(),
        samples_per_prompt: cfg.data.samples_per_prompt,
    };
    let feeder = spawn_feeder(prompts.prompts, plan, ticket_tx, restore.arrived.clone());
    let depths = [gen_rx.stats().clone(), rew_rx.stats().clone(), val_rx.stats().clone()];

    // The [eval] held-out set (the evaluator actor is spawned with the others).
    let held_out = match &cfg.eval {
        Some(e) => {
            let exec = dev(&p.rollout_devices[0]);
            let mut view = cfg.clone();
            view.data.prompts = e.prompts.clone();
            let limit = (e.max_prompts > 0).then_some(e.max_prompts);
            let held_out = Arc::new(HeldOut::load(&view, &policy.tokenizer, exec.device(), limit)?);
            let schedule = EvalSchedule {
                every: e.every,
                steps: cfg.steps,
            };
            Some((exec, held_out, schedule))
        }
        None => None,
    };

    // Actors.
    let (fail_tx, fail_rx) = tokio::sync::mpsc::unbounded_channel();
    let reissued = ReissueQueue::default();
    let faults = Arc::new(Faults::new(cfg.faults.clone()));
    let started = Instant::now();
    let mut tree = ActorTree::start(cfg, reissued.clone(), fail_tx).await?;
    let adopt_latency = AdoptLatencies::default();
    let snap = tree.snapshot(first_policy, first_critic, adopt_latency.clone()).await?;
    tree.value(
        dev(&p.value_device),
        critic_config.clone(),
        rew_rx,
        val_tx,
        &snap,
        &faults,
    )
    .await?;
    let temperature = sampling_temperature(cfg);
    tree.reward(reward_dev, source, reference, temperature, gen_rx, rew_tx, &faults)
        .await?;
    tree.rollouts(&devices, &policy.config, &ticket_rx, &gen_tx, &snap, &reissued, &faults)
        .await?;
    let head = match (&cfg.cluster, cookie) {
        (Some(cc), Some(cookie)) => {
            let head = crate::cluster::start_head(cc, cookie, p.nodes.iter().map(|n| n.name.clone()).collect()).await?;
            let path = run_dir.join("cluster_addr");
            std::fs::write(&path, head.addr.to_string()).map_err(|e| RuntimeError::io(&path, e))?;
            Some(head)
        }
        _ => None,
    };
    tree.nodes(run_dir, &policy.config, &ticket_rx, &gen_tx, &snap, &reissued)
        .await?;
    let rollout_blocked = gen_tx.stats().clone();
    drop((ticket_rx, gen_tx));
    let replay_held = Arc::new(AtomicUsize::new(0));
    let replay_args = ReplayArgs {
        meter: tree.replay_meter(&val_rx),
        input: Some(val_rx),
        capacity: cfg.replay_capacity(),
        batch_size: cfg.batch_size(),
        max_lag: cfg.mode.max_lag(),
        stale: cfg.mode.stale,
        keep_dropped: store_tx.is_some(),
        held: replay_held.clone(),
        restore,
    };
    let replay = tree.replay(replay_args).await?;
    let eval = match held_out {
        Some((exec, held_out, schedule)) => Some(
            tree.evaluator(exec, policy.config.clone(), held_out, schedule, &snap)
                .await?,
        ),
        None => None,
    };
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(16);
    let stop = Arc::new(AtomicBool::new(false));
    let in_hand = Arc::new(Mutex::new(Vec::new()));
    let learner_args = LearnerArgs {
        meter: tree.learner_meter(),
        executor: learner_exec,
        trainer: trainer.clone(),
        replay: replay.clone(),
        snapshot: snap.clone(),
        adopt_latency,
        steps: cfg.steps,
        publish_every: cfg.mode.publish_every,
        events: events_tx,
        extra_step_delay: opts.learner_delay,
        store: store_tx,
        start,
        checkpoint_every: cfg.checkpoints.every,
        stop: stop.clone(),
        in_hand: in_hand.clone(),
        max_nonfinite_steps: cfg.supervision.max_nonfinite_steps,
        faults,
    };
    tree.learner(learner_args).await?;
    let checkpoints = CheckpointWriter {
        run_dir: run_dir.clone(),
        trainer: trainer.clone(),
        replay: replay.clone(),
        store_written: store_writer.as_ref().map(|w| w.steps_written()),
        store_failed: store_writer.as_ref().map(|w| w.failure()),
        disk_full_at: cfg.faults.disk_full_checkpoint_at_step,
        policy_config: policy.config.clone(),
        critic_config,
        tokenizer: policy.tokenizer.clone(),
        config_toml,
        keep: cfg.checkpoints.keep,
        seed: cfg.seed,
    };

    let Outcome {
        reports,
        checkpoints: written,
        interrupted,
        failure,
        write_failed,
        max_held,
    } = Drive {
        cfg,
        run_dir,
        events: events_rx,
        failures: fail_rx,
        checkpoints,
        replay,
        stop,
        in_hand,
        start,
        started,
        meters: tree.meters.clone(),
        probe: probe_rx,
        eval,
        progress: opts.progress,
        replay_held,
        depths,
        per_ticket,
        metrics_disk_full_at: cfg.faults.disk_full_metrics_at_step,
    }
    .serve()
    .await?;

    // Kill every actor and wait until they are gone (names free for a next run).
    let _ = tree
        .root
        .call(SupervisorMsg::Shutdown, Some(Duration::from_secs(120)))
        .await;
    tree.root.stop(None);
    let _ = tree.root_handle.await;
    if let Some(h) = head {
        // An orderly end (finished, stopped, or a stage given up on): the nodes may go.
        h.goodbye(&p.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>())
            .await;
        h.shutdown().await;
    }
    let tickets_issued = tokio::task::spawn_blocking(move || feeder.join().unwrap_or(0))
        .await
        .unwrap_or(0);
    // The learner (and its sender) is gone: the writer drains, flushes and fsyncs.
    let store = match store_writer {
        Some(w) => Some(
            tokio::task::spawn_blocking(move || w.finish())
                .await
                .map_err(|e| RuntimeError::Store(e.to_string()))?,
        ),
        None => None,
    };
    let store_error = store
        .as_ref()
        .and_then(|s| s.as_ref().err())
        .map(|e| format!("trajectory store: {e}"));
    if failure.is_some() || store_error.is_some() {
        let what: Vec<String> = failure.into_iter().chain(store_error.clone()).collect();
        let next = match checkpoint::list(run_dir).unwrap_or_default().last() {
            Some((_, d)) => format!(
                "latest checkpoint: {} (continue with `tandem run --resume {}`{})",
                d.display(),
                run_dir.display(),
                if write_failed || store_error.is_some() {
                    " once the disk has room"
                } else {
                    ""
                }
            ),
            None => format!(
                "no complete checkpoint was written, so there is nothing to resume: start the run again \
                 (with --overwrite to replace {})",
                run_dir.display()
            ),
        };
        let msg = format!("{}\n{next}", what.join("\n"));
        return Err(if write_failed || store_error.is_some() {
            RuntimeError::Stopped(msg)
        } else {
            RuntimeError::ActorFailed(msg)
        });
    }
    save_models(cfg, run_dir, &policy.tokenizer, &trainer, &policy.config)
        .map_err(|e| RuntimeError::Stopped(format!("saving the trained models: {e}")))?;
    let store = store.transpose()?;
    Ok(RunSummary {
        reports,
        interrupted,
        max_held,
        held_bound,
        rollout_blocked_s: rollout_blocked.blocked().as_secs_f64(),
        tickets_issued,
        store,
        resumed_from: resume_from.map(|(k, _)| k),
        checkpoints: written,
        restarts: tree.meters.iter().map(|m| m.read().restarts).sum(),
        prompts_skipped: prompts.skipped,
    })
}

/// Saves the trained policy (and critic, and the policy's EMA as `policy_ema/`) in HF layout
/// with the tokenizer. Each export keeps what its input checkpoint had: the weights in the
/// input's dtype (training runs in f32; a bf16 checkpoint comes back as bf16) and the input's
/// `tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`. The
/// critic's input is the checkpoint it was initialised from (`models.critic.init`); built-in
/// models are saved as f32 with only `tokenizer.json`.
fn save_models(
    cfg: &Config,
    run_dir: &Path,
    tokenizer: &TextTokenizer,
    trainer: &Arc<Mutex<PpoTrainer>>,
    policy_config: &ModelConfig,
) -> Result<(), RuntimeError> {
    use crate::config::CriticInit;
    let t = trainer.lock().map_err(|_| RuntimeError::Poisoned("PPO trainer"))?;
    let policy_src = cfg.models.policy.path.as_deref();
    let critic_src = match cfg.models.critic.init {
        CriticInit::RewardModel => cfg.reward.model.as_deref(),
        CriticInit::Policy => policy_src,
        CriticInit::Path => cfg.models.critic.path.as_deref(),
    };
    let save = |dir: &Path,
                model_cfg: &ModelConfig,
                w: &std::collections::HashMap<String, candle_core::Tensor>,
                src: Option<&Path>|
     -> Result<(), RuntimeError> {
        let dtype = match src {
            Some(s) => tandem_models::checkpoint_dtype(s)?,
            None => candle_core::DType::F32,
        };
        tandem_models::save_checkpoint_as(dir, model_cfg, w, None, dtype)?;
        tokenizer.save_to_dir(dir)?;
        if let Some(s) = src {
            tandem_models::copy_side_files(s, dir)?;
        }
        Ok(())
    };
    save(&run_dir.join("policy"), policy_config, &t.policy_weights()?, policy_src)?;
    if let Some(ema) = t.ema_weights() {
        save(&run_dir.join("policy_ema"), policy_config, &ema, policy_src)?;
    }
    if let (Some(w), Some(critic_cfg)) = (t.critic_weights()?, t.critic_config()) {
        save(&run_dir.join("critic"), &critic_cfg, &w, critic_src)?;
    }
    Ok(())
}
