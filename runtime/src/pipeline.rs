//! Starting, running, checkpointing and stopping one RL run.
//!
//! [`run`] builds the devices of the placement, loads or initialises the models (and, with
//! [`RunOptions::resume`], restores the latest checkpoint over them), wires the bounded
//! channels (tickets → rollout ×N → reward → value → replay) and spawns every actor under the
//! [`RunSupervisor`]. It then serves the learner's events — appending each step report to
//! `RUN_DIR/metrics.jsonl` and writing the checkpoints the learner asks for — until the learner
//! is done, a failure, or Ctrl-C.
//!
//! Stopping on purpose (Ctrl-C, or the supervisor giving up on failing actors): the run sets
//! the learner's stop flag and drains the replay buffer, so the learner takes a final
//! checkpoint at its next step boundary and stops; a second Ctrl-C stops at once. A learner
//! that fails gets a checkpoint from here when its state is still at a step boundary (the
//! batch it held goes back with the buffered trajectories). A run that stops for too many
//! non-finite steps keeps the last checkpoint from before them.
//!
//! Resuming: `metrics.jsonl` lines and stored trajectories of steps at or after the checkpoint
//! are set aside (the resumed run redoes those steps), the replay buffer is refilled from the
//! checkpoint and the feeder issues every ticket the checkpoint does not account for.
//!
//! Shutdown: the supervisor kills the actors (in-flight generation is abandoned; everything
//! the learner reported is on disk), which drops their channel ends; blocked producers and
//! consumers then see closed channels and finish, and the feeder thread exits. The learner's
//! sender to the trajectory store goes with it, so the store's writer drains its queue,
//! flushes and fsyncs (see [`crate::store`]). Finally the trained policy (and critic) are saved
//! in HF layout under `RUN_DIR/policy` (`RUN_DIR/critic`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use ractor::{Actor, ActorCell, ActorRef};
use tandem_actors::channel::ChannelStats;
use tandem_actors::learner::{LearnerActor, LearnerArgs, LearnerStart};
use tandem_actors::replay::{ReplayActor, ReplayArgs, ReplayCheckpoint, ReplayMsg};
use tandem_actors::reward::{RewardActor, RewardArgs};
use tandem_actors::reward_source::{RewardModelSource, RewardSource, TokenSetReward};
use tandem_actors::rollout::{RolloutActor, RolloutArgs};
use tandem_actors::snapshot::{SnapshotActor, SnapshotArgs};
use tandem_actors::value::{ValueActor, ValueArgs};
use tandem_actors::{
    stage_channel, ActorError, ActorMeter, Advantage, DeviceId, Executor, Faults, HeldTickets, LearnerEvent,
    PpoTrainer, ReissueQueue, StepReport, Trajectory, TrajectoryBatch, WeightsSnapshot,
};
use tandem_models::{
    load_tensors, save_checkpoint, snapshot, HeadKind, LanguageModel, ModelConfig, ScalarModel, TextTokenizer,
    WeightInit,
};

use crate::builtin;
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, ModelLayout};
use crate::cluster::node_link::{NodeLinkActor, NodeLinkArgs, NodeView};
use crate::cluster::remote_rollout::{RemoteRolloutActor, RemoteRolloutArgs};
use crate::cluster::wire::Setup;
use crate::config::{Config, CriticInit, RewardKind};
use crate::error::RuntimeError;
use crate::interrupts::Interrupts;
use crate::prompts::{load_prompts, spawn_feeder, TicketPlan};
use crate::store::{set_aside_from_step, spawn_writer, store_dir, StoreStats};
use crate::supervisor::{ChildRole, ChildSpec, RunSupervisor, SpawnFn, SupervisorArgs, SupervisorMsg};
use crate::telemetry::{self, ActorSampler};

static NEXT_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Show a progress bar (when stdout is a terminal).
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

pub struct LoadedPolicy {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub(crate) init: Option<(PathBuf, std::collections::HashMap<String, Tensor>)>,
}

pub(crate) fn load_policy(cfg: &Config) -> Result<LoadedPolicy, RuntimeError> {
    let m = &cfg.models.policy;
    if let Some(dir) = &m.path {
        let config = ModelConfig::from_dir(dir)?;
        if config.head != HeadKind::CausalLm {
            return Err(RuntimeError::Config {
                path: dir.join("config.json"),
                msg: format!("models.policy must be a causal LM, found {}", config.hf_class()),
            });
        }
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let tensors = load_tensors(dir, &config, &candle_core::Device::Cpu)?;
        Ok(LoadedPolicy {
            config,
            tokenizer,
            init: Some((dir.clone(), tensors)),
        })
    } else {
        let spec = m.builtin.as_ref().expect("validated: path or builtin");
        let max_pos = (cfg.data.prompt_max_tokens + cfg.sampling.max_new_tokens)
            .next_power_of_two()
            .max(64);
        Ok(LoadedPolicy {
            config: builtin::model_config(spec, max_pos),
            tokenizer: builtin::tokenizer()?,
            init: None,
        })
    }
}

/// A run's learner as the config initialises it (before any checkpoint is restored).
pub struct BuiltLearner {
    pub trainer: PpoTrainer,
    pub policy: LoadedPolicy,
    pub critic_config: Option<ModelConfig>,
    /// The initial policy weights: the frozen reference model.
    pub initial_policy: std::collections::HashMap<String, Tensor>,
}

/// Builds the policy, critic and trainer the config describes on `device`. `tandem replay
/// --rerun-step` builds them the same way before restoring a checkpoint.
pub fn build_learner(cfg: &Config, device: &candle_core::Device) -> Result<BuiltLearner, RuntimeError> {
    let policy = load_policy(cfg)?;
    let init = match &policy.init {
        Some((dir, t)) => WeightInit::Checkpoint {
            tensors: t,
            dir,
            seed: cfg.seed,
        },
        None => WeightInit::Random { seed: cfg.seed },
    };
    let (policy_model, policy_vars) = LanguageModel::trainable(&policy.config, init, device)?;
    let initial_policy = snapshot(&policy_vars)?;
    let critic = if cfg.algorithm.advantage == Advantage::Gae {
        let c = &cfg.models.critic;
        let (dir, config, tensors) = match c.init {
            CriticInit::RewardModel => {
                let dir = cfg.reward.model.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                let t = load_tensors(&dir, &config, device)?;
                (dir, config, t)
            }
            CriticInit::Policy => (PathBuf::from("<policy>"), policy.config.clone(), initial_policy.clone()),
            CriticInit::Path => {
                let dir = c.path.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                let t = load_tensors(&dir, &config, device)?;
                (dir, config, t)
            }
        };
        let init = WeightInit::Checkpoint {
            tensors: &tensors,
            dir: &dir,
            seed: cfg.seed.wrapping_add(1),
        };
        Some(ScalarModel::trainable(
            &config.with_head(HeadKind::Scalar),
            init,
            device,
        )?)
    } else {
        None
    };
    let critic_config = critic.as_ref().map(|(m, _)| m.config().clone());
    let mut trainer = PpoTrainer::new(
        cfg.algorithm.clone(),
        (policy_model, policy_vars),
        critic,
        sampling_temperature(cfg),
        cfg.data.samples_per_prompt,
        cfg.seed,
        device.clone(),
    )?;
    trainer.inject_nonfinite_loss(cfg.faults.nonfinite_loss_steps.clone());
    Ok(BuiltLearner {
        trainer,
        policy,
        critic_config,
        initial_policy,
    })
}

fn sampling_temperature(cfg: &Config) -> f64 {
    if cfg.sampling.greedy {
        1.0
    } else {
        cfg.sampling.temperature.max(1e-6)
    }
}

/// What writing a checkpoint needs.
struct CheckpointWriter {
    run_dir: PathBuf,
    trainer: Arc<Mutex<PpoTrainer>>,
    replay: ActorRef<ReplayMsg>,
    /// The store's progress: checkpoints wait until every earlier step is written.
    store_written: Option<Arc<AtomicU64>>,
    policy_config: ModelConfig,
    critic_config: Option<ModelConfig>,
    tokenizer: TextTokenizer,
    config_toml: String,
    keep: usize,
    seed: u64,
}

impl CheckpointWriter {
    /// Writes the checkpoint before `step`; `extra` are trajectories to keep beside the replay
    /// buffer's (a failed learner's batch). The trainer must have completed exactly `step` steps
    /// and not have failed inside one.
    async fn write(&self, step: u64, version: u64, wall_s: f64, extra: Vec<Trajectory>) -> Result<PathBuf, String> {
        if let Some(w) = &self.store_written {
            let waiting = Instant::now();
            while w.load(Ordering::Acquire) < step {
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
            .success_or(ActorError::Other("replay buffer did not answer".into()))
            .map_err(|e| e.to_string())?;
        let trainer = self.trainer.clone();
        let run_dir = self.run_dir.clone();
        let (policy_config, critic_config) = (self.policy_config.clone(), self.critic_config.clone());
        let (tokenizer, config_toml, keep, seed) =
            (self.tokenizer.clone(), self.config_toml.clone(), self.keep, self.seed);
        tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
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

/// Makes a [`SpawnFn`] for a restartable actor.
fn spawner<A>(name: String, make: fn() -> A, args: A::Arguments) -> SpawnFn
where
    A: Actor,
    A::Arguments: Clone + Sync,
{
    Arc::new(move |sup: ActorCell| {
        let (name, args) = (name.clone(), args.clone());
        Box::pin(async move {
            Actor::spawn_linked(Some(name), make(), args, sup)
                .await
                .map(|(r, _)| r.get_cell())
        })
    })
}

/// Runs `cfg` to completion (or a stop) and returns the reports.
pub async fn run(cfg: &Config, opts: RunOptions) -> Result<RunSummary, RuntimeError> {
    if cfg.mock_labeller.is_some() {
        return crate::mock_labeller::run(cfg, opts).await;
    }
    let run_dir = &opts.run_dir;
    std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
    checkpoint::remove_partial(run_dir)?;
    let existing = checkpoint::list(run_dir)?;
    let resume_from = match (opts.resume, existing.last()) {
        (true, Some(last)) => Some(last.clone()),
        (true, None) => {
            return Err(RuntimeError::Other(format!(
                "{}: no complete checkpoint to resume from",
                checkpoint::checkpoints_dir(run_dir).display()
            )))
        }
        (false, Some(_)) => {
            return Err(RuntimeError::Config {
                path: run_dir.clone(),
                msg: "this run directory holds another run (it has checkpoints); continue it with `tandem run --resume`, replace it with --overwrite or choose another --run-dir".into(),
            })
        }
        (false, None) if std::fs::metadata(run_dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0) => {
            return Err(RuntimeError::Config {
                path: run_dir.clone(),
                msg: "this run directory holds another run (it has metrics.jsonl); replace it with --overwrite or choose another --run-dir".into(),
            })
        }
        (false, None) => None,
    };
    let config_toml = cfg.to_toml();
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, &config_toml).map_err(|e| RuntimeError::io(&resolved, e))?;

    // Devices.
    let p = &cfg.placement;
    let mut devices: BTreeMap<DeviceId, Arc<Executor>> = BTreeMap::new();
    for d in p
        .rollout_devices
        .iter()
        .chain([&p.reward_device, &p.value_device, &p.learner_device])
    {
        if !devices.contains_key(d) {
            devices.insert(*d, Executor::new(*d, p.threads_per_device)?);
        }
    }
    let dev = |d: &DeviceId| devices[d].clone();

    // Models, and the checkpoint over them when resuming.
    let learner_exec = dev(&p.learner_device);
    let ldev = learner_exec.device().clone();
    let BuiltLearner {
        mut trainer,
        policy,
        critic_config,
        initial_policy,
    } = build_learner(cfg, &ldev)?;
    let mut start = LearnerStart::default();
    let mut restore = ReplayCheckpoint::default();
    if let Some((step, dir)) = &resume_from {
        let c = checkpoint::read(dir, &ldev)?;
        if c.meta.step >= cfg.steps {
            return Err(RuntimeError::Config {
                path: resolved.clone(),
                msg: format!(
                    "the latest checkpoint is at step {step} and the run has steps = {}; nothing to resume (raise it with --set steps=N)",
                    cfg.steps
                ),
            });
        }
        trainer
            .load_state(&c.trainer)
            .map_err(|e| RuntimeError::Other(format!("{}: {e}", dir.display())))?;
        start = LearnerStart {
            step: c.meta.step,
            version: c.meta.version,
            wall_s: c.meta.wall_s,
            checkpointed: true,
        };
        restore = ReplayCheckpoint {
            buffered: c.replay,
            arrived: c.meta.tickets,
            dropped_stale: c.meta.dropped_stale,
        };
        set_aside_metrics(&run_dir.join("metrics.jsonl"), c.meta.step)?;
        if store_dir(run_dir).exists() {
            set_aside_from_step(&store_dir(run_dir), c.meta.step)?;
        }
        tracing::info!(step = c.meta.step, dir = %dir.display(), "resuming from checkpoint");
    }
    let reference = Arc::new(LanguageModel::from_tensors(
        &policy.config,
        initial_policy,
        dev(&p.reward_device).device(),
    )?);
    let source = reward_source(cfg, &policy.tokenizer, dev(&p.reward_device).device())?;
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
            let (tx, w) = spawn_writer(&store_dir(run_dir), &cfg.store, start.step)?;
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

    // Meters, one per actor, each watching its inbound channel.
    let meter = |kind: &'static str, name: &str, device: String, inbound: Option<Arc<ChannelStats>>| {
        let m = ActorMeter::new(kind, name, device);
        Arc::new(match inbound {
            Some(ch) => {
                let cap = ch.capacity;
                m.with_inbound(move || ch.depth(), cap)
            }
            None => m,
        })
    };
    let mut meters: Vec<Arc<ActorMeter>> = Vec::new();

    // Actors. ractor's registry is process-wide, so names carry the run's number.
    let run_no = NEXT_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let registered = |name: &str| format!("{name}#{run_no}");
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel();
    let reissued = ReissueQueue::default();
    let faults = Arc::new(Faults::new(cfg.faults.clone()));
    let (root, root_handle) = Actor::spawn(
        Some(registered("supervisor")),
        RunSupervisor,
        SupervisorArgs {
            config: cfg.supervision.clone(),
            reissued: reissued.clone(),
            failures: fail_tx,
        },
    )
    .await
    .map_err(|e| RuntimeError::Other(format!("cannot start the supervisor: {e}")))?;
    let sup: ActorCell = root.get_cell();
    let spawn_err = |e: ractor::SpawnErr| RuntimeError::ActorFailed(e.to_string());
    let started = Instant::now();
    let watch = |name: &str, role: ChildRole, cell: ActorCell| {
        root.cast(SupervisorMsg::Watch {
            name: name.to_string(),
            role,
            cell,
        })
        .map_err(|e| RuntimeError::Other(format!("supervisor: {e}")))
    };
    let start_child = |spec: ChildSpec| {
        let root = root.clone();
        async move {
            root.call(|r| SupervisorMsg::Start(spec, r), None)
                .await
                .map_err(|e| RuntimeError::Other(format!("supervisor: {e}")))?
                .success_or(ActorError::Other("supervisor stopped".into()))?
                .map_err(RuntimeError::ActorFailed)
        }
    };

    let snap_meter = meter("snapshot", "snapshot", p.learner_device.to_string(), None);
    meters.push(snap_meter.clone());
    let (snap, _) = Actor::spawn_linked(
        Some(registered("snapshot")),
        SnapshotActor,
        SnapshotArgs {
            meter: snap_meter,
            policy: first_policy,
            critic: first_critic,
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    watch("snapshot", ChildRole::Essential, snap.get_cell())?;

    let name = format!("value/{}", p.value_device);
    let m = meter("value", &name, p.value_device.to_string(), Some(rew_rx.stats().clone()));
    meters.push(m.clone());
    let held = HeldTickets::default();
    let args = ValueArgs {
        meter: m.clone(),
        name: name.clone(),
        executor: dev(&p.value_device),
        critic: critic_config.clone(),
        input: rew_rx,
        out: val_tx,
        snapshot: snap.clone(),
        held: held.clone(),
        faults: faults.clone(),
    };
    start_child(ChildSpec {
        spawn: spawner(registered(&name), || ValueActor, args),
        name,
        role: ChildRole::Stage,
        held,
        meter: m,
    })
    .await?;

    let name = format!("reward/{}", p.reward_device);
    let m = meter(
        "reward",
        &name,
        p.reward_device.to_string(),
        Some(gen_rx.stats().clone()),
    );
    meters.push(m.clone());
    let held = HeldTickets::default();
    let args = RewardArgs {
        meter: m.clone(),
        name: name.clone(),
        executor: dev(&p.reward_device),
        source,
        reference: Some(reference),
        temperature: sampling_temperature(cfg),
        input: gen_rx,
        out: rew_tx,
        held: held.clone(),
        faults: faults.clone(),
    };
    start_child(ChildSpec {
        spawn: spawner(registered(&name), || RewardActor, args),
        name,
        role: ChildRole::Stage,
        held,
        meter: m,
    })
    .await?;

    for d in &p.rollout_devices {
        for i in 0..p.rollouts_per_device {
            let name = format!("rollout/{d}/{i}");
            let m = meter("rollout", &name, d.to_string(), Some(ticket_rx.stats().clone()));
            meters.push(m.clone());
            let held = HeldTickets::default();
            let args = RolloutArgs {
                meter: m.clone(),
                name: name.clone(),
                executor: dev(d),
                config: policy.config.clone(),
                sampling: cfg.sampling.clone(),
                max_staleness: cfg.mode.max_staleness,
                tickets: ticket_rx.clone(),
                out: gen_tx.clone(),
                snapshot: snap.clone(),
                held: held.clone(),
                reissued: reissued.clone(),
                faults: faults.clone(),
            };
            start_child(ChildSpec {
                spawn: spawner(registered(&name), || RolloutActor, args),
                name,
                role: ChildRole::Rollout,
                held,
                meter: m,
            })
            .await?;
        }
    }
    let head = match &cfg.cluster {
        Some(cc) => {
            let cookie = crate::cluster::read_cookie(cc.cookie_file.as_deref())?;
            let head = crate::cluster::start_head(cc, cookie, p.nodes.iter().map(|n| n.name.clone()).collect()).await?;
            let path = run_dir.join("cluster_addr");
            std::fs::write(&path, head.addr.to_string()).map_err(|e| RuntimeError::io(&path, e))?;
            Some(head)
        }
        None => None,
    };
    let mut node_views = Vec::new();
    for n in &p.nodes {
        let cc = cfg.cluster.as_ref().expect("validated: nodes need [cluster]");
        let slots: Vec<DeviceId> = (0..n.rollouts).map(|i| n.devices[i % n.devices.len()]).collect();
        let (view_tx, view_rx) = tokio::sync::watch::channel(NodeView::default());
        let link_name = format!("link/{}", n.name);
        let m = Arc::new(ActorMeter::on_node("link", &link_name, "-", &n.name));
        meters.push(m.clone());
        let (link, _) = Actor::spawn_linked(
            Some(registered(&link_name)),
            NodeLinkActor,
            NodeLinkArgs {
                node: n.name.clone(),
                setup: Setup {
                    node: n.name.clone(),
                    model_config_json: policy.config.to_json().to_string(),
                    sampling: cfg.sampling.clone(),
                    slots: slots.clone(),
                },
                snapshot: snap.clone(),
                view: view_tx,
                chunk_bytes: cc.chunk_bytes,
                log: run_dir.join("cluster.jsonl"),
                meter: m,
            },
            sup.clone(),
        )
        .await
        .map_err(spawn_err)?;
        watch(&link_name, ChildRole::Essential, link.get_cell())?;
        for (i, d) in slots.iter().enumerate() {
            let name = format!("rollout/{}/{i}", n.name);
            let m = ActorMeter::on_node("rollout", &name, format!("{}/{d}", n.name), &n.name);
            let ch = ticket_rx.stats().clone();
            let m = Arc::new(m.with_inbound(move || ch.depth(), c.tickets));
            meters.push(m.clone());
            let held = HeldTickets::default();
            let args = RemoteRolloutArgs {
                name: name.clone(),
                node: n.name.clone(),
                slot: i as u32,
                view: view_rx.clone(),
                max_staleness: cfg.mode.max_staleness,
                tickets: ticket_rx.clone(),
                out: gen_tx.clone(),
                meter: m.clone(),
                held: held.clone(),
                reissued: reissued.clone(),
                timeout: Duration::from_secs_f64(cc.sample_timeout_s),
            };
            start_child(ChildSpec {
                spawn: spawner(registered(&name), || RemoteRolloutActor, args),
                name,
                role: ChildRole::Rollout,
                held,
                meter: m,
            })
            .await?;
        }
        node_views.push((n.name.clone(), view_rx));
    }
    if let Some(cc) = cfg.cluster.as_ref().filter(|_| !node_views.is_empty()) {
        // Give the placed nodes a moment to join; proxies of late nodes wait for them anyway.
        let deadline = Instant::now() + Duration::from_secs_f64(cc.wait_for_nodes_s);
        loop {
            let missing: Vec<&str> = node_views
                .iter()
                .filter(|(_, v)| v.borrow().version.is_none())
                .map(|(n, _)| n.as_str())
                .collect();
            if missing.is_empty() {
                tracing::info!("every placed node has joined and holds the policy");
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    ?missing,
                    "starting without every placed node; their samplers begin when they join"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let rollout_blocked = gen_tx.stats().clone();
    drop((ticket_rx, gen_tx));
    let replay_held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (replay, _) = Actor::spawn_linked(
        Some(registered("replay")),
        ReplayActor,
        ReplayArgs {
            meter: {
                let m = meter("replay", "replay", "-".into(), Some(val_rx.stats().clone()));
                meters.push(m.clone());
                m
            },
            input: Some(val_rx),
            capacity: cfg.replay_capacity(),
            batch_size: cfg.batch_size(),
            max_staleness: cfg.mode.max_staleness,
            keep_dropped: store_tx.is_some(),
            held: replay_held.clone(),
            restore,
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    watch("replay", ChildRole::Essential, replay.get_cell())?;
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(16);
    let stop = Arc::new(AtomicBool::new(false));
    let in_hand = Arc::new(Mutex::new(Vec::new()));
    let learner_name = format!("learner/{}", p.learner_device);
    let (learner, _) = Actor::spawn_linked(
        Some(registered(&learner_name)),
        LearnerActor,
        LearnerArgs {
            meter: {
                let m = meter("learner", &learner_name, p.learner_device.to_string(), None);
                meters.push(m.clone());
                m
            },
            executor: learner_exec,
            trainer: trainer.clone(),
            replay: replay.clone(),
            snapshot: snap.clone(),
            steps: cfg.steps,
            publish_every: cfg.mode.publish_every,
            events: events_tx,
            extra_step_delay: opts.learner_delay,
            store: store_tx,
            start,
            checkpoint_every: cfg.checkpoint.every,
            stop: stop.clone(),
            in_hand: in_hand.clone(),
            max_nonfinite_steps: cfg.supervision.max_nonfinite_steps,
            faults,
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    watch(&learner_name, ChildRole::Learner, learner.get_cell())?;
    let checkpoints = CheckpointWriter {
        run_dir: run_dir.clone(),
        trainer: trainer.clone(),
        replay: replay.clone(),
        store_written: store_writer.as_ref().map(|w| w.steps_written()),
        policy_config: policy.config.clone(),
        critic_config: critic_config.clone(),
        tokenizer: policy.tokenizer.clone(),
        config_toml,
        keep: cfg.checkpoint.keep,
        seed: cfg.seed,
    };

    // Drive: serve the learner's events until it stops, a failure or Ctrl-C.
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| RuntimeError::io(&metrics_path, e))?;
    let bar = opts.progress.then(|| progress_bar(cfg.steps, start.step));
    let mut reports = Vec::new();
    let mut written: Vec<u64> = Vec::new();
    let mut interrupted = false;
    let mut failure: Option<String> = None;
    let mut draining_since: Option<Instant> = None;
    let mut max_held = 0usize;
    let mut probe = tokio::time::interval(Duration::from_millis(25));
    let mut sampler = ActorSampler::new(meters.clone(), run_dir, started)?;
    let mut sample_tick = tokio::time::interval(Duration::from_secs_f64(cfg.metrics.sample_interval_s));
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
                Some(LearnerEvent::Report(r)) => {
                    let line = crate::step_probe::merge(&r, probe_rx.as_ref());
                    writeln!(metrics, "{line}").map_err(|e| RuntimeError::io(&metrics_path, e))?;
                    metrics.flush().map_err(|e| RuntimeError::io(&metrics_path, e))?;
                    if let Some(b) = &bar {
                        b.set_position(r.step + 1);
                        b.set_message(format!("reward {:.3} kl {:.3}", r.stats.reward_mean, r.stats.kl));
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
            _ = interrupts.recv() => {
                if draining_since.is_some() { break; }
                tracing::warn!("interrupted: stopping at the next step boundary with a checkpoint (Ctrl-C again to stop now)");
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
            _ = sample_tick.tick() => sampler.sample(latest_version)?,
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    sampler.sample(latest_version)?;
    if let Some(task) = endpoint {
        task.abort();
        let _ = std::fs::remove_file(run_dir.join("metrics_addr"));
    }
    // Kill every actor and wait until they are gone (names free for a next run).
    let _ = root.call(SupervisorMsg::Shutdown, Some(Duration::from_secs(120))).await;
    root.stop(None);
    let _ = root_handle.await;
    if let Some(h) = head {
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
                .map_err(|e| RuntimeError::Other(format!("trajectory store: {e}")))?,
        ),
        None => None,
    };
    if let Some(f) = failure {
        let last = checkpoint::list(run_dir)?
            .last()
            .map_or("none".to_string(), |(_, d)| d.display().to_string());
        return Err(RuntimeError::ActorFailed(format!(
            "{f}\nlatest checkpoint: {last} (continue with `tandem run --resume {}`)",
            run_dir.display()
        )));
    }
    save_models(run_dir, &policy.tokenizer, &trainer, &policy.config)?;
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
        restarts: meters.iter().map(|m| m.read().restarts).sum(),
        prompts_skipped: prompts.skipped,
    })
}

/// The reward source the config names: the reward model, the positive-words rule over the
/// policy's tokenizer, or a rule/command source ([`crate::reward_sources`]), with the config's
/// score shaping. `tandem replay --rescore` builds it the same way.
pub fn reward_source(
    cfg: &Config,
    tokenizer: &TextTokenizer,
    device: &candle_core::Device,
) -> Result<Arc<dyn RewardSource>, RuntimeError> {
    let source: Arc<dyn RewardSource> = match cfg.reward.kind {
        RewardKind::RewardModel => {
            let dir = cfg.reward.model.as_ref().ok_or_else(|| RuntimeError::Config {
                path: "config.toml".into(),
                msg: "reward.model is required with kind = \"reward_model\"".into(),
            })?;
            Arc::new(RewardModelSource::new(ScalarModel::load(dir, device)?))
        }
        RewardKind::PositiveWords => {
            let words: Vec<String> = cfg
                .reward
                .words
                .clone()
                .unwrap_or_else(|| builtin::POSITIVE_WORDS.iter().map(|s| s.to_string()).collect());
            let ids = builtin::word_token_ids(tokenizer, &words);
            if ids.is_empty() {
                return Err(RuntimeError::Other(
                    "reward.words: none of the words is a token of the policy's tokenizer".into(),
                ));
            }
            Arc::new(TokenSetReward::new("positive_words", ids))
        }
        _ => crate::reward_sources::rule_source(cfg, tokenizer)?,
    };
    crate::reward_sources::shaped(cfg, source)
}

fn progress_bar(steps: u64, from: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(steps);
    b.set_position(from);
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

/// Saves the trained policy (and critic) in HF layout with the tokenizer.
fn save_models(
    run_dir: &Path,
    tokenizer: &TextTokenizer,
    trainer: &Arc<Mutex<PpoTrainer>>,
    policy_config: &ModelConfig,
) -> Result<(), RuntimeError> {
    let t = trainer
        .lock()
        .map_err(|_| RuntimeError::Other("trainer poisoned".into()))?;
    let dir = run_dir.join("policy");
    save_checkpoint(&dir, policy_config, &t.policy_weights()?, None)?;
    tokenizer.save_to_dir(&dir)?;
    if let (Some(w), Some(cfg)) = (t.critic_weights()?, t.critic_config()) {
        let dir = run_dir.join("critic");
        save_checkpoint(&dir, &cfg, &w, None)?;
        tokenizer.save_to_dir(&dir)?;
    }
    Ok(())
}
