//! Spawning a run's actors under its [`RunSupervisor`], in dependency order: snapshot, value,
//! reward, local rollouts, the cluster's node links and remote-rollout proxies, replay, the
//! `[eval]` evaluator, learner.
//!
//! Stage actors (rollout, reward, value, remote rollout) are restartable [`ChildSpec`]s: the
//! supervisor spawns them and, when one fails, reissues the tickets in its [`HeldTickets`] and
//! spawns it again. A sampler's spec carries its wake hook ([`ChildSpec::wake_on_reissue`]):
//! reissued tickets wake the samplers that wait for a newer policy. The snapshot, replay,
//! node-link, evaluator and learner actors are linked and watched:
//! their failure ends the run. Every actor gets an [`ActorMeter`] (kept in
//! [`ActorTree::meters`] for `actors.jsonl` and `tandem top`); a stage's meter also watches the
//! depth of its inbound channel. ractor's registry is process-wide, so registered names carry
//! the run's number.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorRef};
use tandem_actors::channel::ChannelStats;
use tandem_actors::learner::{LearnerActor, LearnerArgs, LearnerMsg};
use tandem_actors::replay::{ReplayActor, ReplayArgs, ReplayMsg};
use tandem_actors::reward::{RewardActor, RewardArgs};
use tandem_actors::reward_source::RewardSource;
use tandem_actors::rollout::{RolloutActor, RolloutArgs};
use tandem_actors::snapshot::{AdoptLatencies, SnapshotActor, SnapshotArgs, SnapshotMsg};
use tandem_actors::value::{ValueActor, ValueArgs};
use tandem_actors::{
    ActorError, ActorMeter, DeviceId, Executor, Faults, HeldTickets, ReissueQueue, StageMsg, StageReceiver,
    StageSender, TrajectoryBatch, WeightsSnapshot, WorkTicket,
};
use tandem_models::{LanguageModel, ModelConfig};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::evaluator::{EvalResults, EvalSchedule, EvaluatorActor, EvaluatorArgs};
use crate::cluster::node_link::{NodeLinkActor, NodeLinkArgs, NodeView};
use crate::cluster::remote_rollout::{RemoteRolloutActor, RemoteRolloutArgs};
use crate::cluster::wire::Setup;
use crate::config::Config;
use crate::error::RuntimeError;
use crate::supervisor::{
    ChildRole, ChildSpec, RunFailure, RunSupervisor, SpawnFn, SupervisorArgs, SupervisorMsg, WakeFn,
};

static NEXT_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A run's supervisor and what is needed to add actors under it.
pub(super) struct ActorTree<'a> {
    cfg: &'a Config,
    pub root: ActorRef<SupervisorMsg>,
    pub root_handle: JoinHandle<()>,
    run_no: u64,
    /// One meter per actor, in spawn order.
    pub meters: Vec<Arc<ActorMeter>>,
}

impl<'a> ActorTree<'a> {
    /// Starts the supervisor; failures it gives up on arrive on `failures`.
    pub async fn start(
        cfg: &'a Config,
        reissued: ReissueQueue,
        failures: mpsc::UnboundedSender<RunFailure>,
    ) -> Result<Self, RuntimeError> {
        let run_no = NEXT_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (root, root_handle) = Actor::spawn(
            Some(format!("supervisor#{run_no}")),
            RunSupervisor,
            SupervisorArgs {
                config: cfg.supervision.clone(),
                reissued,
                failures,
            },
        )
        .await
        .map_err(|e| RuntimeError::Supervisor(format!("cannot start: {e}")))?;
        Ok(Self {
            cfg,
            root,
            root_handle,
            run_no,
            meters: Vec::new(),
        })
    }

    fn registered(&self, name: &str) -> String {
        format!("{name}#{}", self.run_no)
    }

    /// A new meter (kept in `meters`), watching `inbound`'s depth when given.
    fn meter(
        &mut self,
        kind: &'static str,
        name: &str,
        device: String,
        inbound: Option<&Arc<ChannelStats>>,
    ) -> Arc<ActorMeter> {
        let m = ActorMeter::new(kind, name, device);
        let m = Arc::new(match inbound.cloned() {
            Some(ch) => {
                let cap = ch.capacity;
                m.with_inbound(move || ch.depth(), cap)
            }
            None => m,
        });
        self.meters.push(m.clone());
        m
    }

    /// Spawns an actor linked to the supervisor, which stops the run when it fails.
    async fn spawn_watched<A: Actor>(
        &self,
        name: &str,
        actor: A,
        args: A::Arguments,
        role: ChildRole,
    ) -> Result<ActorRef<A::Msg>, RuntimeError> {
        let (r, _) = Actor::spawn_linked(Some(self.registered(name)), actor, args, self.root.get_cell())
            .await
            .map_err(|e| RuntimeError::ActorFailed(e.to_string()))?;
        self.root
            .cast(SupervisorMsg::Watch {
                name: name.to_string(),
                role,
                cell: r.get_cell(),
            })
            .map_err(|e| RuntimeError::Supervisor(e.to_string()))?;
        Ok(r)
    }

    /// Has the supervisor spawn a restartable stage actor.
    #[allow(clippy::too_many_arguments)]
    async fn start_child<A>(
        &self,
        name: String,
        make: fn() -> A,
        args: A::Arguments,
        role: ChildRole,
        held: HeldTickets,
        meter: Arc<ActorMeter>,
        wake_on_reissue: Option<WakeFn>,
    ) -> Result<(), RuntimeError>
    where
        A: Actor,
        A::Arguments: Clone + Sync,
    {
        let spec = ChildSpec {
            spawn: spawner(self.registered(&name), make, args),
            name,
            role,
            held,
            meter,
            wake_on_reissue,
        };
        self.root
            .call(|r| SupervisorMsg::Start(spec, r), None)
            .await
            .map_err(|e| RuntimeError::Supervisor(e.to_string()))?
            .success_or(ActorError::PeerGone("supervisor stopped".into()))?
            .map_err(RuntimeError::ActorFailed)
    }

    /// The snapshot actor, holding the first published weights and recording adoption
    /// latencies into `latency`.
    pub async fn snapshot(
        &mut self,
        policy: Arc<WeightsSnapshot>,
        critic: Option<Arc<WeightsSnapshot>>,
        latency: AdoptLatencies,
    ) -> Result<ActorRef<SnapshotMsg>, RuntimeError> {
        let meter = self.meter(
            "snapshot",
            "snapshot",
            self.cfg.placement.learner_device.to_string(),
            None,
        );
        let args = SnapshotArgs {
            meter,
            policy,
            critic,
            latency,
        };
        self.spawn_watched("snapshot", SnapshotActor, args, ChildRole::Essential)
            .await
    }

    /// The `[eval]` evaluator on the first rollout device, watched like the snapshot.
    pub async fn evaluator(
        &mut self,
        executor: Arc<Executor>,
        config: ModelConfig,
        held_out: Arc<crate::eval::HeldOut>,
        schedule: EvalSchedule,
        snapshot: &ActorRef<SnapshotMsg>,
    ) -> Result<EvalResults, RuntimeError> {
        let device = self
            .cfg
            .placement
            .rollout_devices
            .first()
            .map(|d| d.to_string())
            .unwrap_or_default();
        let meter = self.meter("evaluator", "evaluator", device, None);
        let (results, rx) = mpsc::unbounded_channel();
        let args = EvaluatorArgs {
            meter,
            executor,
            config,
            held_out,
            schedule,
            snapshot: snapshot.clone(),
            results,
        };
        self.spawn_watched("evaluator", EvaluatorActor, args, ChildRole::Essential)
            .await?;
        Ok(EvalResults { schedule, rx })
    }

    /// The value stage: critic values and advantages on its device.
    pub async fn value(
        &mut self,
        executor: Arc<Executor>,
        critic: Option<ModelConfig>,
        input: StageReceiver<TrajectoryBatch>,
        out: StageSender<TrajectoryBatch>,
        snapshot: &ActorRef<SnapshotMsg>,
        faults: &Arc<Faults>,
    ) -> Result<(), RuntimeError> {
        let device = self.cfg.placement.value_device;
        let name = format!("value/{device}");
        let meter = self.meter("value", &name, device.to_string(), Some(input.stats()));
        let held = HeldTickets::default();
        let args = ValueArgs {
            meter: meter.clone(),
            name: name.clone(),
            executor,
            critic,
            input,
            out,
            snapshot: snapshot.clone(),
            held: held.clone(),
            faults: faults.clone(),
        };
        self.start_child(name, ValueActor::default, args, ChildRole::Stage, held, meter, None)
            .await
    }

    /// The reward stage: scores and the KL against the frozen reference.
    #[allow(clippy::too_many_arguments)]
    pub async fn reward(
        &mut self,
        executor: Arc<Executor>,
        source: Arc<dyn RewardSource>,
        reference: Arc<LanguageModel>,
        temperature: f64,
        input: StageReceiver<TrajectoryBatch>,
        out: StageSender<TrajectoryBatch>,
        faults: &Arc<Faults>,
    ) -> Result<(), RuntimeError> {
        let device = self.cfg.placement.reward_device;
        let name = format!("reward/{device}");
        let meter = self.meter("reward", &name, device.to_string(), Some(input.stats()));
        let held = HeldTickets::default();
        let args = RewardArgs {
            meter: meter.clone(),
            name: name.clone(),
            executor,
            source,
            reference: Some(reference),
            temperature,
            input,
            out,
            held: held.clone(),
            faults: faults.clone(),
        };
        self.start_child(name, RewardActor::default, args, ChildRole::Stage, held, meter, None)
            .await
    }

    /// `placement.rollouts_per_device` samplers on each rollout device.
    #[allow(clippy::too_many_arguments)]
    pub async fn rollouts(
        &mut self,
        devices: &BTreeMap<DeviceId, Arc<Executor>>,
        policy: &ModelConfig,
        tickets: &StageReceiver<WorkTicket>,
        out: &StageSender<TrajectoryBatch>,
        snapshot: &ActorRef<SnapshotMsg>,
        reissued: &ReissueQueue,
        faults: &Arc<Faults>,
    ) -> Result<(), RuntimeError> {
        let p = &self.cfg.placement;
        for d in &p.rollout_devices {
            for i in 0..p.rollouts_per_device {
                let name = format!("rollout/{d}/{i}");
                let meter = self.meter("rollout", &name, d.to_string(), Some(tickets.stats()));
                let held = HeldTickets::default();
                let args = RolloutArgs {
                    meter: meter.clone(),
                    name: name.clone(),
                    executor: devices[d].clone(),
                    config: policy.clone(),
                    sampling: self.cfg.sampling.clone(),
                    max_lag: self.cfg.mode.max_lag(),
                    tickets: tickets.clone(),
                    out: out.clone(),
                    snapshot: snapshot.clone(),
                    held: held.clone(),
                    reissued: reissued.clone(),
                    faults: faults.clone(),
                    inflight: self.cfg.mode.inflight(),
                };
                let wake = waker(|| StageMsg::Reissued);
                self.start_child(
                    name,
                    RolloutActor::default,
                    args,
                    ChildRole::Rollout,
                    held,
                    meter,
                    Some(wake),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// For each `[[placement.nodes]]` entry: its node link (weights to the worker) and one
    /// remote-rollout proxy per slot. Then waits up to `cluster.wait_for_nodes_s` for the
    /// nodes to join and hold the policy; proxies of late nodes wait for them anyway.
    pub async fn nodes(
        &mut self,
        run_dir: &Path,
        policy: &ModelConfig,
        tickets: &StageReceiver<WorkTicket>,
        out: &StageSender<TrajectoryBatch>,
        snapshot: &ActorRef<SnapshotMsg>,
        reissued: &ReissueQueue,
    ) -> Result<(), RuntimeError> {
        let cfg = self.cfg;
        let Some(cc) = cfg.cluster.as_ref() else {
            return Ok(());
        };
        let mut views = Vec::new();
        for n in &cfg.placement.nodes {
            let slots: Vec<DeviceId> = (0..n.rollouts).map(|i| n.devices[i % n.devices.len()]).collect();
            let (view_tx, view_rx) = watch::channel(NodeView::default());
            let link_name = format!("link/{}", n.name);
            let meter = Arc::new(ActorMeter::on_node("link", &link_name, "-", &n.name));
            self.meters.push(meter.clone());
            let args = NodeLinkArgs {
                node: n.name.clone(),
                setup: Setup {
                    node: n.name.clone(),
                    model_config_json: policy.to_json().to_string(),
                    sampling: cfg.sampling.clone(),
                    slots: slots.clone(),
                },
                snapshot: snapshot.clone(),
                view: view_tx,
                chunk_bytes: cc.chunk_bytes,
                log: run_dir.join("cluster.jsonl"),
                meter,
            };
            self.spawn_watched(&link_name, NodeLinkActor, args, ChildRole::Essential)
                .await?;
            for (i, d) in slots.iter().enumerate() {
                let name = format!("rollout/{}/{i}", n.name);
                let ch = tickets.stats().clone();
                let meter = ActorMeter::on_node("rollout", &name, format!("{}/{d}", n.name), &n.name)
                    .with_inbound(move || ch.depth(), cfg.channels.tickets);
                let meter = Arc::new(meter);
                self.meters.push(meter.clone());
                let held = HeldTickets::default();
                let args = RemoteRolloutArgs {
                    name: name.clone(),
                    node: n.name.clone(),
                    slot: i as u32,
                    view: view_rx.clone(),
                    max_lag: cfg.mode.max_lag(),
                    tickets: tickets.clone(),
                    out: out.clone(),
                    meter: meter.clone(),
                    held: held.clone(),
                    reissued: reissued.clone(),
                    timeout: Duration::from_secs_f64(cc.sample_timeout_s),
                };
                let wake = waker(|| StageMsg::Reissued);
                self.start_child(
                    name,
                    RemoteRolloutActor::default,
                    args,
                    ChildRole::Rollout,
                    held,
                    meter,
                    Some(wake),
                )
                .await?;
            }
            views.push((n.name.clone(), view_rx));
        }
        if views.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs_f64(cc.wait_for_nodes_s);
        loop {
            let missing: Vec<&str> = views
                .iter()
                .filter(|(_, v)| v.borrow().version.is_none())
                .map(|(n, _)| n.as_str())
                .collect();
            if missing.is_empty() {
                tracing::info!("every placed node has joined and holds the policy");
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    ?missing,
                    "starting without every placed node; their samplers begin when they join"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The replay buffer, fed by the value stage.
    pub async fn replay(&mut self, args: ReplayArgs) -> Result<ActorRef<ReplayMsg>, RuntimeError> {
        self.spawn_watched("replay", ReplayActor, args, ChildRole::Essential)
            .await
    }

    /// A meter for the replay buffer (its args need it before [`Self::replay`]).
    pub fn replay_meter(&mut self, input: &StageReceiver<TrajectoryBatch>) -> Arc<ActorMeter> {
        self.meter("replay", "replay", "-".into(), Some(input.stats()))
    }

    /// A meter for the learner (its args need it before [`Self::learner`]).
    pub fn learner_meter(&mut self) -> Arc<ActorMeter> {
        let device = self.cfg.placement.learner_device;
        self.meter("learner", &format!("learner/{device}"), device.to_string(), None)
    }

    /// The learner; its failure is reported with the learner role (checkpoint, then stop).
    pub async fn learner(&mut self, args: LearnerArgs) -> Result<ActorRef<LearnerMsg>, RuntimeError> {
        let name = format!("learner/{}", self.cfg.placement.learner_device);
        self.spawn_watched(&name, LearnerActor, args, ChildRole::Learner).await
    }
}

/// Makes a [`WakeFn`] that casts `msg()` to the child.
fn waker<M: ractor::Message>(msg: fn() -> M) -> WakeFn {
    Arc::new(move |cell: &ActorCell| {
        let _ = cell.send_message(msg());
    })
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
