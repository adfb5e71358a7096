//! Starting, running and stopping one RL run.
//!
//! [`run`] builds the devices of the placement, loads or initialises the models, wires the
//! bounded channels (tickets → rollout ×N → reward → value → replay) and spawns every actor
//! under the [`RunSupervisor`]. It then appends each learner report to `RUN_DIR/metrics.jsonl`
//! until the last step, an actor failure, or Ctrl-C.
//!
//! Shutdown: the actors are killed (in-flight generation is abandoned; everything the learner
//! reported is already on disk), which drops their channel ends; blocked producers and
//! consumers then see closed channels and finish, and the feeder thread exits. The learner's
//! sender to the trajectory store goes with it, so the store's writer drains its queue, flushes
//! and fsyncs (see [`crate::store`]). Finally the trained policy (and critic) are saved in HF
//! layout under `RUN_DIR/policy` (`RUN_DIR/critic`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use ractor::{Actor, ActorCell};
use tandem_actors::channel::ChannelStats;
use tandem_actors::learner::{LearnerActor, LearnerArgs};
use tandem_actors::replay::{ReplayActor, ReplayArgs};
use tandem_actors::reward::{RewardActor, RewardArgs};
use tandem_actors::reward_source::{RewardModelSource, RewardSource, TokenSetReward};
use tandem_actors::rollout::{RolloutActor, RolloutArgs};
use tandem_actors::snapshot::{SnapshotActor, SnapshotArgs};
use tandem_actors::value::{ValueActor, ValueArgs};
use tandem_actors::{
    stage_channel, ActorMeter, Advantage, DeviceId, Executor, PpoTrainer, StepReport, TrajectoryBatch, WeightsSnapshot,
};
use tandem_models::{
    load_tensors, save_checkpoint, snapshot, HeadKind, LanguageModel, ModelConfig, ScalarModel, TextTokenizer,
    WeightInit,
};

use crate::builtin;
use crate::config::{Config, CriticInit, RewardKind};
use crate::error::RuntimeError;
use crate::prompts::{load_prompts, spawn_feeder, TicketPlan};
use crate::store::{spawn_writer, store_dir, StoreStats};
use crate::supervisor::RunSupervisor;
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
}

pub(crate) struct LoadedPolicy {
    pub(crate) config: ModelConfig,
    pub(crate) tokenizer: TextTokenizer,
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

/// Runs `cfg` to completion (or Ctrl-C) and returns the reports.
pub async fn run(cfg: &Config, opts: RunOptions) -> Result<RunSummary, RuntimeError> {
    if cfg.mock_labeller.is_some() {
        return crate::mock_labeller::run(cfg, opts).await;
    }
    let run_dir = &opts.run_dir;
    std::fs::create_dir_all(run_dir).map_err(|e| RuntimeError::io(run_dir, e))?;
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, cfg.to_toml()).map_err(|e| RuntimeError::io(&resolved, e))?;

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

    // Models.
    let policy = load_policy(cfg)?;
    let learner_exec = dev(&p.learner_device);
    let ldev = learner_exec.device().clone();
    let init = match &policy.init {
        Some((dir, t)) => WeightInit::Checkpoint {
            tensors: t,
            dir,
            seed: cfg.seed,
        },
        None => WeightInit::Random { seed: cfg.seed },
    };
    let (policy_model, policy_vars) = LanguageModel::trainable(&policy.config, init, &ldev)?;
    let initial_policy = snapshot(&policy_vars)?;
    let reference = Arc::new(LanguageModel::from_tensors(
        &policy.config,
        initial_policy.clone(),
        dev(&p.reward_device).device(),
    )?);

    let rm_tensors = match (&cfg.reward.kind, &cfg.reward.model) {
        (RewardKind::RewardModel, Some(dir)) => {
            let c = ModelConfig::from_dir(dir)?;
            Some((dir.clone(), c.clone(), load_tensors(dir, &c, &ldev)?))
        }
        _ => None,
    };
    let source = reward_source(cfg, &policy.tokenizer, dev(&p.reward_device).device())?;

    let critic = if cfg.algorithm.advantage == Advantage::Gae {
        let c = &cfg.models.critic;
        let (dir, config, tensors) = match c.init {
            CriticInit::RewardModel => {
                let (dir, config, t) = rm_tensors.clone().expect("validated");
                (dir, config, t)
            }
            CriticInit::Policy => (PathBuf::from("<policy>"), policy.config.clone(), initial_policy.clone()),
            CriticInit::Path => {
                let dir = c.path.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                let t = load_tensors(&dir, &config, &ldev)?;
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
            &ldev,
        )?)
    } else {
        None
    };
    let critic_config = critic.as_ref().map(|(m, _)| m.config().clone());
    let initial_critic = critic.as_ref().map(|(_, v)| snapshot(v)).transpose()?;
    let trainer = Arc::new(Mutex::new(PpoTrainer::new(
        cfg.algorithm.clone(),
        (policy_model, policy_vars),
        critic,
        if cfg.sampling.greedy {
            1.0
        } else {
            cfg.sampling.temperature.max(1e-6)
        },
        cfg.data.samples_per_prompt,
        cfg.seed,
        ldev.clone(),
    )?));

    // Trajectory store: its own thread, fed by the learner over a bounded channel.
    let (store_tx, store_writer) = match cfg.store.retention {
        crate::config::Retention::None => (None, None),
        _ => {
            let (tx, w) = spawn_writer(&store_dir(run_dir), &cfg.store)?;
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
    let prompts = load_prompts(&cfg.data.prompts, &policy.tokenizer, cfg.data.prompt_max_tokens)?;
    let plan = TicketPlan {
        seed: cfg.seed,
        prompts_per_ticket: cfg.data.prompts_per_ticket,
        tickets_per_step: cfg.tickets_per_step(),
        samples_per_prompt: cfg.data.samples_per_prompt,
    };
    let feeder = spawn_feeder(prompts, plan, ticket_tx);
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
    let registered = |name: &str| Some(format!("{name}#{run_no}"));
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel();
    let (root, root_handle) = Actor::spawn(registered("supervisor"), RunSupervisor, fail_tx)
        .await
        .map_err(|e| RuntimeError::Other(format!("cannot start the supervisor: {e}")))?;
    let sup: ActorCell = root.get_cell();
    let spawn_err = |e: ractor::SpawnErr| RuntimeError::ActorFailed(e.to_string());
    let now = Instant::now();
    let started = now;
    let wrap = |tensors| {
        Arc::new(WeightsSnapshot {
            version: 0,
            tensors,
            published_at: now,
        })
    };
    let snap_meter = meter("snapshot", "snapshot", p.learner_device.to_string(), None);
    meters.push(snap_meter.clone());
    let (snap, snap_h) = Actor::spawn_linked(
        registered("snapshot"),
        SnapshotActor,
        SnapshotArgs {
            meter: snap_meter,
            policy: wrap(initial_policy),
            critic: initial_critic.map(wrap),
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    let mut children = vec![(snap.get_cell(), snap_h)];
    let (val, val_h) = Actor::spawn_linked(
        registered(&format!("value/{}", p.value_device)),
        ValueActor,
        ValueArgs {
            meter: {
                let m = meter(
                    "value",
                    &format!("value/{}", p.value_device),
                    p.value_device.to_string(),
                    Some(rew_rx.stats().clone()),
                );
                meters.push(m.clone());
                m
            },
            name: format!("value/{}", p.value_device),
            executor: dev(&p.value_device),
            critic: critic_config,
            input: rew_rx,
            out: val_tx,
            snapshot: snap.clone(),
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    children.push((val.get_cell(), val_h));
    let (rew, rew_h) = Actor::spawn_linked(
        registered(&format!("reward/{}", p.reward_device)),
        RewardActor,
        RewardArgs {
            meter: {
                let m = meter(
                    "reward",
                    &format!("reward/{}", p.reward_device),
                    p.reward_device.to_string(),
                    Some(gen_rx.stats().clone()),
                );
                meters.push(m.clone());
                m
            },
            name: format!("reward/{}", p.reward_device),
            executor: dev(&p.reward_device),
            source,
            reference: Some(reference),
            temperature: if cfg.sampling.greedy {
                1.0
            } else {
                cfg.sampling.temperature.max(1e-6)
            },
            input: gen_rx,
            out: rew_tx,
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    children.push((rew.get_cell(), rew_h));
    for d in &p.rollout_devices {
        for i in 0..p.rollouts_per_device {
            let name = format!("rollout/{d}/{i}");
            let (r, r_h) = Actor::spawn_linked(
                registered(&name),
                RolloutActor,
                RolloutArgs {
                    meter: {
                        let m = meter("rollout", &name, d.to_string(), Some(ticket_rx.stats().clone()));
                        meters.push(m.clone());
                        m
                    },
                    name,
                    executor: dev(d),
                    config: policy.config.clone(),
                    sampling: cfg.sampling.clone(),
                    max_staleness: cfg.mode.max_staleness,
                    tickets: ticket_rx.clone(),
                    out: gen_tx.clone(),
                    snapshot: snap.clone(),
                },
                sup.clone(),
            )
            .await
            .map_err(spawn_err)?;
            children.push((r.get_cell(), r_h));
        }
    }
    let rollout_blocked = gen_tx.stats().clone();
    drop((ticket_rx, gen_tx));
    let replay_held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (replay, replay_h) = Actor::spawn_linked(
        registered("replay"),
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
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    children.push((replay.get_cell(), replay_h));
    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel(16);
    let (learner, learner_h) = Actor::spawn_linked(
        registered(&format!("learner/{}", p.learner_device)),
        LearnerActor,
        LearnerArgs {
            meter: {
                let m = meter(
                    "learner",
                    &format!("learner/{}", p.learner_device),
                    p.learner_device.to_string(),
                    None,
                );
                meters.push(m.clone());
                m
            },
            executor: learner_exec,
            trainer: trainer.clone(),
            replay: replay.clone(),
            snapshot: snap.clone(),
            steps: cfg.steps,
            publish_every: cfg.mode.publish_every,
            reports: report_tx,
            extra_step_delay: opts.learner_delay,
            store: store_tx,
        },
        sup.clone(),
    )
    .await
    .map_err(spawn_err)?;
    children.push((learner.get_cell(), learner_h));

    // Drive: write reports until the last step, a failure or Ctrl-C.
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| RuntimeError::io(&metrics_path, e))?;
    let bar = opts.progress.then(|| progress_bar(cfg.steps));
    let mut reports = Vec::new();
    let mut interrupted = false;
    let mut failure = None;
    let mut max_held = 0usize;
    let mut probe = tokio::time::interval(Duration::from_millis(25));
    let mut sampler = ActorSampler::new(meters, run_dir, started)?;
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
    let mut latest_version = 0u64;
    loop {
        tokio::select! {
            r = report_rx.recv() => match r {
                Some(r) => {
                    let line = crate::step_probe::merge(&r, probe_rx.as_ref());
                    writeln!(metrics, "{line}").map_err(|e| RuntimeError::io(&metrics_path, e))?;
                    metrics.flush().map_err(|e| RuntimeError::io(&metrics_path, e))?;
                    if let Some(b) = &bar {
                        b.set_position(r.step + 1);
                        b.set_message(format!("reward {:.3} kl {:.3}", r.stats.reward_mean, r.stats.kl));
                    }
                    latest_version = r.policy_version + 1;
                    reports.push(r);
                    if reports.len() as u64 == cfg.steps { break; }
                }
                None => break,
            },
            f = fail_rx.recv() => { failure = f; break; }
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
            _ = probe.tick() => {
                let held = replay_held.load(std::sync::atomic::Ordering::Relaxed);
                let in_channels: usize = depths.iter().map(|c| c.depth()).sum::<usize>();
                max_held = max_held.max(held + in_channels * per_ticket);
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
    // Kill downstream first, then wait until every actor is gone (names free for a next run).
    for (c, _) in children.iter().rev() {
        c.kill();
    }
    for (_, h) in children {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    root.stop(None);
    let _ = root_handle.await;
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
        return Err(RuntimeError::ActorFailed(f));
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

fn progress_bar(steps: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(steps);
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
