//! The root of the supervision tree.
//!
//! Every pipeline actor is spawned linked to the [`RunSupervisor`]. A child that fails (returns
//! an error or panics) is reported to the run, which stops the pipeline and exits with the
//! actor's error; a child that stops normally (its input closed) is only logged.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

pub struct RunSupervisor;

pub enum SupervisorMsg {}

impl Actor for RunSupervisor {
    type Msg = SupervisorMsg;
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;

    async fn pre_start(
        &self,
        _me: ActorRef<SupervisorMsg>,
        failures: mpsc::UnboundedSender<String>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(failures)
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        failures: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                let name = who.get_name().unwrap_or_else(|| who.get_id().to_string());
                tracing::error!(actor = %name, error = %err, "actor failed");
                let _ = failures.send(format!("{name}: {err}"));
            }
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                let name = who.get_name().unwrap_or_else(|| who.get_id().to_string());
                tracing::debug!(actor = %name, reason = ?reason, "actor stopped");
            }
            _ => {}
        }
        Ok(())
    }
}
