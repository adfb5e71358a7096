//! `tandem node`: a worker process that joins a head and hosts the rollouts placed on it.
//!
//! The worker starts its own ractor_cluster `NodeServer` (on loopback, a free port; the
//! connection is the one it opens to the head), spawns its [`NodeHostActor`] in the process
//! group `tandem.node.<name>` and connects to the head, in TLS when it has [`ClientTls`] (see
//! [`transport`]). Then:
//!
//! - the head refusing it is an error, exit status 1, whose message says why: another cookie
//!   (the authentication fails), a head that requires TLS (it answered this plain node with a
//!   TLS alert), a failed TLS handshake (the head's certificate is not trusted, or the head does
//!   not use TLS and closed the handshake);
//! - a head whose run is over says goodbye before it closes the session (see
//!   [`super::node_host`]): the worker then exits at once with status 0;
//! - losing the head otherwise (a crash, or the network) makes it try to connect again for
//!   `reconnect_s` seconds, keeping its weights, so a head that comes back does not resend a
//!   version the node already holds; after that it exits with status 0.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::Actor;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::NodeEventSubscription;
use tandem_actors::DeviceId;
use tokio::sync::mpsc;

use super::node_host::{NodeHostActor, NodeHostArgs};
use super::node_link::node_group;
use super::transport::{self, ClientTls, ConnectError, Fault};
use crate::error::RuntimeError;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The head's `HOST:PORT`.
    pub join: String,
    pub name: String,
    pub cookie: String,
    pub devices: Vec<DeviceId>,
    pub threads_per_device: usize,
    /// Seconds to keep trying to reach the head (at start, and after losing it).
    pub reconnect_s: f64,
    /// TLS to the head (which must then have `cluster.tls_cert`); plain TCP when `None`.
    pub tls: Option<ClientTls>,
}

enum Event {
    Authenticated,
    /// The session closed; whether it had authenticated.
    Closed(bool),
}

struct WorkerEvents {
    tx: mpsc::UnboundedSender<Event>,
    authenticated: Mutex<HashSet<u64>>,
}

impl NodeEventSubscription for WorkerEvents {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_authenicated(&self, ses: NodeServerSessionInformation) {
        self.authenticated.lock().expect("events lock").insert(ses.node_id);
        let _ = self.tx.send(Event::Authenticated);
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let was = self.authenticated.lock().expect("events lock").remove(&ses.node_id);
        let _ = self.tx.send(Event::Closed(was));
    }
}

/// Runs the worker until the head refuses it, or is gone for longer than `reconnect_s`.
pub async fn run_node(opts: NodeOptions) -> Result<(), RuntimeError> {
    let (tx, mut events) = mpsc::unbounded_channel();
    let subscription = WorkerEvents {
        tx,
        authenticated: Mutex::new(HashSet::new()),
    };
    let server = super::start_server(opts.cookie.clone(), &opts.name, subscription).await?;
    let farewell = Arc::new(AtomicBool::new(false));
    let (host, _) = Actor::spawn(
        None,
        NodeHostActor,
        NodeHostArgs {
            name: opts.name.clone(),
            devices: opts.devices.clone(),
            threads_per_device: opts.threads_per_device,
            farewell: farewell.clone(),
        },
    )
    .await
    .map_err(|e| RuntimeError::Cluster(format!("cannot start the node's host actor: {e}")))?;
    ractor::pg::join(node_group(&opts.name), vec![host.get_cell()]);
    let patience = Duration::from_secs_f64(opts.reconnect_s);
    let mut joined_once = false;
    let result = 'outer: loop {
        // Connect, retrying while the head is unreachable.
        let since = Instant::now();
        let fault = loop {
            match transport::connect(&server, opts.join.as_str(), opts.tls.as_ref()).await {
                Ok(fault) => break fault,
                // After a run, a head that closes the handshake is most likely going away: wait
                // for it as for an unreachable one. Before, it is a head without TLS.
                Err(ConnectError::Tls { why, closed }) if !(closed && joined_once) => {
                    tracing::error!(head = %opts.join, "cannot join the head: {why}");
                    break 'outer Err(RuntimeError::Cluster(format!(
                        "cannot join the head at {}: {why}",
                        opts.join
                    )));
                }
                Err(e) if since.elapsed() >= patience => {
                    break 'outer if joined_once {
                        tracing::info!(head = %opts.join, "the head is gone; exiting");
                        Ok(())
                    } else {
                        let e = match e {
                            ConnectError::Unreachable(e) => e.to_string(),
                            ConnectError::Tls { why, .. } => why,
                        };
                        Err(RuntimeError::Cluster(format!(
                            "cannot reach the head at {}: {e}",
                            opts.join
                        )))
                    };
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        // Wait for the handshake, then for the session to end.
        loop {
            match events.recv().await {
                Some(Event::Authenticated) => {
                    joined_once = true;
                    tracing::info!(head = %opts.join, node = %opts.name, "joined the head");
                }
                Some(Event::Closed(true)) if farewell.load(Ordering::SeqCst) => {
                    tracing::info!(head = %opts.join, "the head finished its run; exiting");
                    break 'outer Ok(());
                }
                Some(Event::Closed(true)) => {
                    tracing::warn!(head = %opts.join, "lost the head; reconnecting");
                    break;
                }
                Some(Event::Closed(false)) => {
                    let why = match fault.get() {
                        Some(Fault::SpeaksTls) => "it requires TLS, and this node connected in plain TCP \
                                                   (start it with --tls-ca naming the head's certificate or its CA)"
                            .to_string(),
                        Some(f) => format!("{f} (is {} a tandem head?)", opts.join),
                        None => "authentication failed (is the cookie the head's?)".to_string(),
                    };
                    tracing::error!(head = %opts.join, "the head refused this node: {why}");
                    break 'outer Err(RuntimeError::Cluster(format!(
                        "the head at {} refused this node: {why}",
                        opts.join
                    )));
                }
                None => break 'outer Ok(()),
            }
        }
    };
    host.stop(None);
    server.stop(None);
    result
}
