//! The root of the supervision tree: restarts with back-off, and when to give up.
//!
//! How this fits the runtime's ordering, blocking, dropping and restart rules: `docs/semantics.md`.
//!
//! Every pipeline actor is linked to the [`RunSupervisor`]. What a failure (an error or a
//! panic) leads to depends on the actor's [`ChildRole`]:
//!
//! - **Rollout, reward and value actors** (and the head-side proxies of worker nodes' rollouts,
//!   see [`crate::cluster`]) are restarted. The tickets the failed actor held are
//!   put in the [`ReissueQueue`] at once (and every live child with a
//!   [`ChildSpec::wake_on_reissue`] hook — the samplers — is woken to take them); the
//!   actor is spawned again after a back-off of `backoff_s`, doubled for each earlier failure of
//!   the same actor within `window_s`, at most `backoff_max_s`. Its meter counts the restart.
//! - When more than `max_restarts` failures (of all such actors) fall within `window_s`, the
//!   run is told to stop ([`RunFailure`]); it then takes a final checkpoint and exits with the
//!   error.
//! - **The learner, replay and snapshot actors** are not restarted: their failure is reported
//!   to the run at once (a learner failure still gets a checkpoint when its state allows).
//!
//! A child that stops normally (its input closed) is only logged. [`SupervisorMsg::Shutdown`]
//! turns restarts off and kills every child.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};
use tandem_actors::{ActorMeter, HeldTickets, ReissueQueue};
use tokio::sync::mpsc;

use crate::config::SupervisionConfig;

/// Spawns one instance of a child, linked to the given supervisor.
pub type SpawnFn =
    Arc<dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>> + Send + Sync>;

/// Tells one live instance of a child (its cell) that tickets were reissued.
pub type WakeFn = Arc<dyn Fn(&ActorCell) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// A sampler: restarted, and stopped last at shutdown.
    Rollout,
    /// Reward or value: restarted.
    Stage,
    /// Learner: not restarted; the run checkpoints (when it can) and stops.
    Learner,
    /// Replay or snapshot: not restarted; the run stops.
    Essential,
}

/// A restartable child: how to spawn it and what it holds.
pub struct ChildSpec {
    pub name: String,
    pub role: ChildRole,
    pub spawn: SpawnFn,
    pub held: HeldTickets,
    pub meter: Arc<ActorMeter>,
    /// How to wake the child when tickets are reissued (samplers take them); `None` for
    /// children that take no tickets.
    pub wake_on_reissue: Option<WakeFn>,
}

/// Why the run must stop.
#[derive(Debug, Clone)]
pub struct RunFailure {
    pub actor: String,
    pub error: String,
    pub role: ChildRole,
}

pub enum SupervisorMsg {
    /// Spawn a restartable child now.
    Start(ChildSpec, RpcReplyPort<Result<(), String>>),
    /// Watch a child spawned (linked) elsewhere; it is not restarted.
    Watch {
        name: String,
        role: ChildRole,
        cell: ActorCell,
    },
    /// Spawn `name` again (after its back-off).
    Restart(String),
    /// Stop restarting and kill every child.
    Shutdown(RpcReplyPort<()>),
}

// Local only: never sent to another node.
impl ractor::Message for SupervisorMsg {}

pub struct SupervisorArgs {
    pub config: SupervisionConfig,
    pub reissued: ReissueQueue,
    pub failures: mpsc::UnboundedSender<RunFailure>,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    specs: HashMap<String, ChildSpec>,
    live: HashMap<ActorId, (String, ChildRole, ActorCell)>,
    /// Recent failures of restartable children (time, name).
    recent: VecDeque<(Instant, String)>,
    shutting_down: bool,
    gave_up: bool,
}

pub struct RunSupervisor;

impl Actor for RunSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            specs: HashMap::new(),
            live: HashMap::new(),
            recent: VecDeque::new(),
            shutting_down: false,
            gave_up: false,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start(spec, reply) => {
                let r = match (spec.spawn)(me.get_cell()).await {
                    Ok(cell) => {
                        st.live.insert(cell.get_id(), (spec.name.clone(), spec.role, cell));
                        st.specs.insert(spec.name.clone(), spec);
                        Ok(())
                    }
                    Err(e) => Err(format!("cannot start {}: {e}", spec.name)),
                };
                let _ = reply.send(r);
            }
            SupervisorMsg::Watch { name, role, cell } => {
                st.live.insert(cell.get_id(), (name, role, cell));
            }
            SupervisorMsg::Restart(name) => {
                if st.shutting_down || st.gave_up {
                    return Ok(());
                }
                let Some(spec) = st.specs.get(&name) else { return Ok(()) };
                match (spec.spawn)(me.get_cell()).await {
                    Ok(cell) => {
                        spec.meter.restarted();
                        tracing::info!(actor = %name, "restarted");
                        st.live.insert(cell.get_id(), (name, spec.role, cell));
                    }
                    Err(e) => {
                        st.gave_up = true;
                        let _ = st.args.failures.send(RunFailure {
                            actor: name.clone(),
                            error: format!("restart failed: {e}"),
                            role: spec.role,
                        });
                    }
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                st.shutting_down = true;
                // Downstream first, so nothing is handed to an actor that is about to go.
                let mut cells: Vec<(ChildRole, ActorCell)> =
                    st.live.drain().map(|(_, (_, role, cell))| (role, cell)).collect();
                cells.sort_by_key(|(role, _)| match role {
                    ChildRole::Learner => 0,
                    ChildRole::Essential => 1,
                    ChildRole::Stage => 2,
                    ChildRole::Rollout => 3,
                });
                for (_, cell) in cells {
                    let _ = cell.kill_and_wait(Some(Duration::from_secs(10))).await;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                let Some((name, role, _)) = st.live.remove(&who.get_id()) else {
                    return Ok(());
                };
                if st.shutting_down {
                    return Ok(());
                }
                tracing::error!(actor = %name, error = %err, "actor failed");
                let fatal = tandem_actors::ActorError::is_fatal(err.as_ref());
                match role {
                    ChildRole::Rollout | ChildRole::Stage if fatal => {
                        // Restarting cannot mend it: stop the run with this error, without
                        // restarting the actor to fail (and be logged) again.
                        st.gave_up = true;
                        let _ = st.args.failures.send(RunFailure {
                            actor: name,
                            error: err.to_string(),
                            role,
                        });
                    }
                    ChildRole::Rollout | ChildRole::Stage => self.restart_later(&me, st, name, err.to_string()),
                    ChildRole::Learner | ChildRole::Essential => {
                        let _ = st.args.failures.send(RunFailure {
                            actor: name,
                            error: err.to_string(),
                            role,
                        });
                    }
                }
            }
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                if let Some((name, _, _)) = st.live.remove(&who.get_id()) {
                    tracing::debug!(actor = %name, reason = ?reason, "actor stopped");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RunSupervisor {
    fn restart_later(&self, me: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, name: String, error: String) {
        let c = &st.args.config;
        let Some(spec) = st.specs.get(&name) else { return };
        // Its tickets go back to the samplers now, whatever happens to the actor.
        let held = spec.held.take_all();
        if !held.is_empty() {
            tracing::info!(actor = %name, tickets = ?held.iter().map(|t| t.id).collect::<Vec<_>>(), "reissuing held tickets");
            st.args.reissued.push(held);
            for (child, _, cell) in st.live.values() {
                if let Some(wake) = st.specs.get(child).and_then(|s| s.wake_on_reissue.as_ref()) {
                    wake(cell);
                }
            }
        }
        let now = Instant::now();
        let window = Duration::from_secs_f64(c.window_s);
        while st.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
            st.recent.pop_front();
        }
        st.recent.push_back((now, name.clone()));
        if st.recent.len() as u64 > c.max_restarts {
            st.gave_up = true;
            let _ = st.args.failures.send(RunFailure {
                actor: name,
                error: format!(
                    "{error} ({} actor failures within {} s exceed supervision.max_restarts = {})",
                    st.recent.len(),
                    c.window_s,
                    c.max_restarts
                ),
                role: spec.role,
            });
            return;
        }
        let earlier = st.recent.iter().filter(|(_, n)| *n == name).count() as i32 - 1;
        let delay = (c.backoff_s * 2f64.powi(earlier)).min(c.backoff_max_s);
        tracing::warn!(actor = %name, delay_s = delay, "restarting after back-off");
        let me = me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(delay)).await;
            let _ = me.cast(SupervisorMsg::Restart(name));
        });
    }
}
