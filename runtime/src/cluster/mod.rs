//! Worker nodes over ractor_cluster: rollout actors in other processes (or machines).
//!
//! A run with a `[cluster]` section is a **head**: it starts a ractor_cluster `NodeServer` on
//! `cluster.listen` (loopback unless configured otherwise) and places the rollouts of each
//! `[[placement.nodes]]` entry on the worker that joins under that name
//! (`tandem node --join HOST:PORT --name w1`, see [`worker`]).
//!
//! ```text
//!  head process                                             worker process "w1"
//!  ─────────────────────────────────────────────            ─────────────────────────
//!  tickets ─► RemoteRolloutActor rollout/w1/0 ──Sample──►   NodeHostActor
//!          ─► RemoteRolloutActor rollout/w1/1 ◄─batch───      (slot 0 → cpu:0,
//!               │ bounded rollout_to_reward                     slot 1 → cpu:0)
//!               ▼                                               ▲
//!             Reward ─► Value ─► Replay ◄─ Learner ─► Snapshot  │
//!                                                  │ watch      │
//!                                   NodeLinkActor w1 ──Setup, Chunk×n, Commit──┘
//! ```
//!
//! Why this shape: the head keeps one **proxy actor per remote rollout slot**
//! ([`remote_rollout`]) inside its own supervision tree, so a remote sampler is supervised,
//! metered (series labelled `node="w1"`, device `w1/cpu:0`) and accounted for (its
//! `HeldTickets`) exactly like a local one, and node loss reuses the existing
//! restart-and-reissue path instead of a second one. The worker runs one plain actor
//! ([`node_host`]) that does what it is asked and holds no pipeline state, so a worker can die
//! or restart at any time. The head's [`node_link`] (one per node) owns the weights traffic so a
//! node gets each version once, however many slots it has.
//!
//! - **Actor layer**: ractor_cluster messages (`RactorClusterMessage`) over its authenticated
//!   session; the worker's host actor is found through the process group
//!   `tandem.node.<name>`, which ractor_cluster keeps in sync on both sides (and empties on
//!   the head when the connection drops). Payloads are bincode or raw bytes ([`wire`]).
//! - **Transport** ([`transport`]): TCP, or TLS when the head has `cluster.tls_cert` and
//!   `cluster.tls_key` (PEM) and the worker `--tls-ca` (the PEM certificate it trusts for the
//!   head, `--tls-server-name` defaulting to the host of `--join`). tandem accepts and opens
//!   the connections itself and reads them through a frame check, so bytes of another protocol
//!   end a connection instead of the process. TLS on one side only is refused on both: the head
//!   logs `node connection refused: plain TCP, but this head requires TLS` (or `it opened a TLS
//!   session, but this head has no TLS`), and the worker exits with status 1 saying which side
//!   lacks it; a certificate the worker does not trust fails the handshake, logged by both.
//!   Without TLS the session is in clear, hence a loopback listener by default.
//! - **Authentication**: ractor_cluster's challenge–response on a shared cookie (never sent in
//!   clear), from `cluster.cookie_file` / `--cookie-file` or `TANDEM_CLUSTER_COOKIE`; there is
//!   no built-in default. A node with another cookie is disconnected during the handshake; the
//!   head logs `node connection refused: authentication failed` with its address and the
//!   worker exits with status 1 and `the head refused this node`. With TLS the cookie still
//!   authenticates the node (TLS authenticates only the head).
//! - **Weights**: versioned safetensors bytes, sent only when the node holds another version,
//!   in CRC32-checked chunks of `cluster.chunk_bytes` plus a checked commit ([`node_link`]);
//!   MB/s and publish-to-adopt latency per version go to metrics and `RUN_DIR/cluster.jsonl`.
//! - **Trajectories**: one ticket in flight per proxy; batches come back as the call's reply
//!   and go into the bounded `rollout_to_reward` channel ([`remote_rollout`]).
//! - **Node loss**: the proxies' calls fail, their tickets are reissued to the remaining
//!   samplers, and they wait for the node; a node that joins again is set up, sent the current
//!   weights and used again.

pub mod node_host;
pub mod node_link;
pub mod remote_rollout;
pub mod transport;
pub mod wire;
pub mod worker;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{IncomingEncryptionMode, NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::net::TcpListener;

use crate::config::ClusterConfig;
use crate::error::RuntimeError;

/// The environment variable a cookie is read from when no file is named.
pub const COOKIE_ENV: &str = "TANDEM_CLUSTER_COOKIE";

/// What the head needs before the run writes or starts anything: with `tls_cert` and
/// `tls_key`, a check that they are PEM and go together (a config error naming the file), then
/// the cookie ([`read_cookie`]).
pub fn head_credentials(cfg: &ClusterConfig) -> Result<String, RuntimeError> {
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        transport::server_tls(cert, key)?;
    }
    read_cookie(cfg.cookie_file.as_deref())
}

/// The shared secret: the file's content (trimmed), else `TANDEM_CLUSTER_COOKIE`.
pub fn read_cookie(file: Option<&Path>) -> Result<String, RuntimeError> {
    let cookie = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| RuntimeError::io(f, e))?
            .trim()
            .to_string(),
        None => std::env::var(COOKIE_ENV).unwrap_or_default().trim().to_string(),
    };
    let source = file.map_or(PathBuf::from(COOKIE_ENV), Path::to_path_buf);
    if cookie.is_empty() {
        let from = file.map_or(format!("{COOKIE_ENV} is not set"), |f| {
            format!("{} is empty", f.display())
        });
        return Err(RuntimeError::Config {
            path: source,
            msg: format!("no cluster cookie: {from}; give a cookie file or set {COOKIE_ENV} (there is no default)"),
        });
    }
    if cookie.len() < MIN_COOKIE_BYTES {
        return Err(RuntimeError::Config {
            path: source,
            msg: format!(
                "the cluster cookie has {} bytes; at least {MIN_COOKIE_BYTES} are needed (for example \
                 `head -c 32 /dev/urandom | base64`)",
                cookie.len()
            ),
        });
    }
    Ok(cookie)
}

/// The shortest cluster cookie accepted: it is the only secret between head and nodes.
pub const MIN_COOKIE_BYTES: usize = 16;

/// A `NodeServer` for the session traffic. Its own listener (ractor_cluster always opens one,
/// and respawns it when it stops) is on a free loopback port that nobody is told about, and it
/// is given [`transport::refuse_all_tls`], so nothing that connects to it becomes a node
/// session: raw node sessions read a length prefix and allocate it, and garbage there would
/// abort the process. Nodes come in through [`transport`], which checks their bytes first.
async fn start_server(
    cookie: String,
    name: &str,
    events: impl NodeEventSubscription,
) -> Result<ActorRef<NodeServerMessage>, RuntimeError> {
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let server = NodeServer::new(
        0,
        cookie,
        name.to_string(),
        loopback.to_string(),
        Some(IncomingEncryptionMode::Tls(transport::refuse_all_tls()?)),
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(loopback);
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| RuntimeError::Cluster(format!("cluster node server: {e}")))?;
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "tandem".into(),
            subscription: Box::new(events),
        })
        .map_err(|e| RuntimeError::Cluster(format!("cluster node server: {e}")))?;
    Ok(server)
}

/// The head's node server and its listener (which stops when this is dropped).
pub struct Head {
    pub server: ActorRef<NodeServerMessage>,
    /// The listener's bound address (what `RUN_DIR/cluster_addr` holds).
    pub addr: SocketAddr,
    listener: tokio::task::JoinHandle<()>,
}

impl Head {
    /// Tells every joined node that the run is over (see [`node_host`]), waiting up to 2 s for
    /// each to acknowledge, so that the nodes exit instead of waiting for the head to return.
    pub async fn goodbye(&self, nodes: &[String]) {
        for name in nodes {
            for member in ractor::pg::get_members(&node_link::node_group(name)) {
                let host: ActorRef<node_host::NodeMsg> = member.into();
                let said = host
                    .call(
                        |r| node_host::NodeMsg::Goodbye(Vec::new(), r),
                        Some(std::time::Duration::from_secs(2)),
                    )
                    .await;
                if let Err(e) = said {
                    tracing::debug!(node = %name, "goodbye not acknowledged: {e}");
                }
            }
        }
    }

    /// Closes the listener, then stops the node server (every session with it), so a node that
    /// loses its session finds no listener rather than one that is going away.
    pub async fn shutdown(mut self) {
        self.listener.abort();
        let _ = (&mut self.listener).await;
        let _ = self
            .server
            .kill_and_wait(Some(std::time::Duration::from_secs(10)))
            .await;
    }
}

impl Drop for Head {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Starts the head's listener on `cluster.listen` (TLS with `cluster.tls_cert`/`tls_key`); nodes
/// not in `expected` are logged (and never used).
pub async fn start_head(cfg: &ClusterConfig, cookie: String, expected: Vec<String>) -> Result<Head, RuntimeError> {
    let listen: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|_| RuntimeError::Cluster("cluster.listen".into()))?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(transport::server_tls(cert, key)?),
        _ => None,
    };
    let events = HeadEvents {
        expected,
        authenticated: Mutex::new(HashSet::new()),
    };
    let server = start_server(cookie, "head", events).await?;
    let (addr, listener) = match TcpListener::bind(listen).await.and_then(|l| Ok((l.local_addr()?, l))) {
        Ok(bound) => bound,
        Err(e) => {
            server.stop(None);
            return Err(RuntimeError::Cluster(format!("cluster listener {listen}: {e}")));
        }
    };
    tracing::info!(%addr, tls = tls.is_some(), "cluster head listening");
    let listener = tokio::spawn(transport::serve(listener, server.clone(), tls));
    Ok(Head { server, addr, listener })
}

/// `w1` of a ractor_cluster peer name `w1@host`.
fn node_name(ses: &NodeServerSessionInformation) -> Option<String> {
    let n = ses.peer_name.as_ref()?;
    Some(n.name.split('@').next().unwrap_or(&n.name).to_string())
}

/// Logs joins, departures and refused connections on the head.
struct HeadEvents {
    expected: Vec<String>,
    authenticated: Mutex<HashSet<u64>>,
}

impl NodeEventSubscription for HeadEvents {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        tracing::debug!(peer = %ses.peer_addr, "node connection opened");
    }

    fn node_session_authenicated(&self, ses: NodeServerSessionInformation) {
        self.authenticated.lock().expect("events lock").insert(ses.node_id);
        let name = node_name(&ses).unwrap_or_default();
        if self.expected.contains(&name) {
            tracing::info!(node = %name, peer = %ses.peer_addr, "node authenticated");
        } else {
            tracing::warn!(node = %name, peer = %ses.peer_addr, "node authenticated but not in placement.nodes; it gets no work");
        }
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let was = self.authenticated.lock().expect("events lock").remove(&ses.node_id);
        let name = node_name(&ses).unwrap_or_else(|| "?".into());
        if was {
            tracing::warn!(node = %name, peer = %ses.peer_addr, "node disconnected");
        } else {
            tracing::warn!(node = %name, peer = %ses.peer_addr, "node connection refused: authentication failed (wrong cookie?)");
        }
    }
}
