//! The head's link to one worker node: finds it, sets it up and keeps its weights current.
//!
//! One [`NodeLinkActor`] per `[[placement.nodes]]` entry. It monitors the process group
//! `tandem.node.<name>`, in which ractor_cluster places the node's host actor once the node has
//! joined with the right cookie (and from which it removes it when the connection drops). On a
//! join it sends the node its [`Setup`]; from then on it keeps the node on the latest policy:
//!
//! - **Versioned, only on change**: it watches the snapshot actor's latest weights and sends a
//!   version only when it differs from the one the node holds (a reconnecting node reports what
//!   it still holds). Versions published while a transfer runs are skipped, not queued: the
//!   next transfer sends the newest.
//! - **Chunked and checked**: the safetensors blob goes as casts of at most
//!   `cluster.chunk_bytes` (each with its CRC32), then a `Commit` call with the blob's length and
//!   CRC32. ractor_cluster frames each message whole (a u64 length, then the protobuf), so small
//!   chunks bound the frame a reader allocates and let tickets and batches interleave with a
//!   transfer on the shared connection.
//! - **Measured**: when the commit returns, the node has checked and adopted the version. The
//!   transfer rate (`tandem_cluster_weights_mb_per_s{node}`) and publish-to-adopt latency
//!   (reported to the snapshot actor as receiver `node/<name>`, like any sampler's) are recorded,
//!   and one line per version goes to `RUN_DIR/cluster.jsonl`.
//!
//! The node's state is published on a `watch` ([`NodeView`]): the host actor once set up, and
//! the policy version it holds. The rollout proxies read it to know whether they can send
//! tickets and which tickets are recent enough. A failed setup or transfer is retried after a
//! second; a node that leaves the group is marked down until it joins again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::pg::GroupChangeMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde_json::json;
use tandem_actors::snapshot::SnapshotMsg;
use tandem_actors::{ActorMeter, SharedWeights};
use tokio::sync::watch;

use super::node_host::NodeMsg;
use super::wire::{self, Commit, CommitReply, Setup, SetupReply};

/// What the head knows about one node.
#[derive(Clone, Default)]
pub struct NodeView {
    /// The node's host actor, once it is set up.
    pub host: Option<ActorRef<NodeMsg>>,
    /// The policy version the node holds.
    pub version: Option<u64>,
}

pub enum LinkMsg {
    /// A newer policy was published.
    Publish(SharedWeights),
    /// Try the setup or transfer again.
    Retry,
}

impl ractor::Message for LinkMsg {}

pub struct NodeLinkArgs {
    pub node: String,
    pub setup: Setup,
    pub snapshot: ActorRef<SnapshotMsg>,
    pub view: watch::Sender<NodeView>,
    pub chunk_bytes: usize,
    /// `RUN_DIR/cluster.jsonl`.
    pub log: PathBuf,
    pub meter: Arc<ActorMeter>,
}

pub struct NodeLinkState {
    args: NodeLinkArgs,
    group: String,
    /// The node's host actor, joined but maybe not yet set up.
    joined: Option<ActorRef<NodeMsg>>,
    set_up: bool,
    version: Option<u64>,
    latest: SharedWeights,
    /// The latest version's blob and its CRC32.
    encoded: Option<(u64, Arc<Vec<u8>>, u32)>,
    retry_pending: bool,
}

pub struct NodeLinkActor;

/// The process group a node's host actor joins.
pub fn node_group(node: &str) -> String {
    format!("tandem.node.{node}")
}

impl Actor for NodeLinkActor {
    type Msg = LinkMsg;
    type State = NodeLinkState;
    type Arguments = NodeLinkArgs;

    async fn pre_start(&self, me: ActorRef<LinkMsg>, args: NodeLinkArgs) -> Result<NodeLinkState, ActorProcessingErr> {
        let group = node_group(&args.node);
        ractor::pg::monitor(group.clone(), me.get_cell());
        let mut rx = args
            .snapshot
            .call(SnapshotMsg::Subscribe, Some(Duration::from_secs(10)))
            .await?
            .success_or(ActorProcessingErr::from("snapshot actor did not answer"))?;
        let latest = rx.borrow_and_update().clone();
        // Forward each newer version; the watch keeps only the latest, so nothing piles up.
        let fwd = me.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let w = rx.borrow_and_update().clone();
                if fwd.cast(LinkMsg::Publish(w)).is_err() {
                    break;
                }
            }
        });
        let joined = ractor::pg::get_members(&group).into_iter().next().map(Into::into);
        let st = NodeLinkState {
            args,
            group,
            joined,
            set_up: false,
            version: None,
            latest,
            encoded: None,
            retry_pending: false,
        };
        if st.joined.is_some() {
            me.cast(LinkMsg::Retry)?;
        }
        Ok(st)
    }

    async fn post_stop(&self, me: ActorRef<LinkMsg>, st: &mut NodeLinkState) -> Result<(), ActorProcessingErr> {
        ractor::pg::demonitor(st.group.clone(), me.get_id());
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<LinkMsg>,
        msg: LinkMsg,
        st: &mut NodeLinkState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.args.meter.time_handle();
        match msg {
            LinkMsg::Publish(w) => {
                if w.version > st.latest.version {
                    st.latest = w;
                }
            }
            LinkMsg::Retry => st.retry_pending = false,
        }
        self.sync(&me, st).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<LinkMsg>,
        evt: SupervisionEvent,
        st: &mut NodeLinkState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(change) = evt {
            match change {
                GroupChangeMessage::Join(_, group, cells) if group == st.group => {
                    if let Some(cell) = cells.into_iter().next() {
                        tracing::info!(node = %st.args.node, "node joined");
                        st.joined = Some(cell.into());
                        st.set_up = false;
                        st.version = None;
                        self.sync(&me, st).await;
                    }
                }
                GroupChangeMessage::Leave(_, group, cells) if group == st.group => {
                    let left = st
                        .joined
                        .as_ref()
                        .is_some_and(|h| cells.iter().any(|c| c.get_id() == h.get_id()));
                    if left {
                        tracing::warn!(node = %st.args.node, "node left; its samplers wait for it to come back");
                        self.down(st);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl NodeLinkActor {
    fn down(&self, st: &mut NodeLinkState) {
        st.joined = None;
        st.set_up = false;
        st.version = None;
        st.args.view.send_replace(NodeView::default());
    }

    fn publish_view(&self, st: &NodeLinkState) {
        st.args.view.send_replace(NodeView {
            host: st.joined.clone().filter(|_| st.set_up),
            version: st.version,
        });
    }

    fn retry_later(&self, me: &ActorRef<LinkMsg>, st: &mut NodeLinkState) {
        if !st.retry_pending {
            st.retry_pending = true;
            me.send_after(Duration::from_secs(1), || LinkMsg::Retry);
        }
    }

    /// Sets the node up if needed, then sends it the latest version if it holds another.
    async fn sync(&self, me: &ActorRef<LinkMsg>, st: &mut NodeLinkState) {
        let Some(host) = st.joined.clone() else { return };
        if !st.set_up {
            match self.setup(&host, st).await {
                Ok(v) => {
                    st.set_up = true;
                    st.version = v;
                    tracing::info!(node = %st.args.node, holds_version = ?v, "node set up");
                    self.publish_view(st);
                }
                Err(e) => {
                    tracing::error!(node = %st.args.node, "node setup failed: {e}");
                    return self.retry_later(me, st);
                }
            }
        }
        if st.version == Some(st.latest.version) {
            return;
        }
        match self.transfer(&host, st).await {
            Ok(()) => self.publish_view(st),
            Err(e) => {
                tracing::warn!(node = %st.args.node, version = st.latest.version, "weights transfer failed: {e}");
                self.retry_later(me, st);
            }
        }
    }

    async fn setup(&self, host: &ActorRef<NodeMsg>, st: &NodeLinkState) -> Result<Option<u64>, String> {
        let bytes = wire::encode(&st.args.setup);
        let reply = host
            .call(|r| NodeMsg::Setup(bytes, r), Some(Duration::from_secs(30)))
            .await
            .map_err(|e| e.to_string())?
            .success_or(ActorProcessingErr::from("no reply"))
            .map_err(|e| e.to_string())?;
        wire::decode::<SetupReply>(&reply, "setup reply")?.result
    }

    async fn transfer(&self, host: &ActorRef<NodeMsg>, st: &mut NodeLinkState) -> Result<(), String> {
        let w = st.latest.clone();
        if st.encoded.as_ref().is_none_or(|(v, _, _)| *v != w.version) {
            let tensors = w.tensors.clone();
            let blob = tokio::task::spawn_blocking(move || wire::weights_to_bytes(&tensors))
                .await
                .map_err(|e| e.to_string())??;
            let crc = crc32fast::hash(&blob);
            st.encoded = Some((w.version, Arc::new(blob), crc));
        }
        let (_, blob, crc) = st.encoded.clone().expect("just encoded");
        let started = Instant::now();
        let mut n = 0u32;
        for c in wire::chunks(w.version, &blob, st.args.chunk_bytes) {
            host.cast(NodeMsg::Chunk(c.encode())).map_err(|e| e.to_string())?;
            n += 1;
        }
        let commit = wire::encode(&Commit {
            version: w.version,
            chunks: n,
            bytes: blob.len() as u64,
            crc32: crc,
        });
        let reply = host
            .call(|r| NodeMsg::Commit(commit, r), Some(Duration::from_secs(300)))
            .await
            .map_err(|e| e.to_string())?
            .success_or(ActorProcessingErr::from(
                "no reply to the commit (node gone or timed out)",
            ))
            .map_err(|e| e.to_string())?;
        let build_s = wire::decode::<CommitReply>(&reply, "commit reply")?.result?;
        let secs = started.elapsed().as_secs_f64();
        let adopt = w.published_at.elapsed();
        let mb_per_s = blob.len() as f64 / 1e6 / (secs - build_s).max(1e-9);
        st.version = Some(w.version);
        st.args.meter.set_version(w.version);
        st.args.meter.items(blob.len() as u64);
        let node = st.args.node.clone();
        metrics::gauge!("tandem_cluster_weights_mb_per_s", "node" => node.clone()).set(mb_per_s);
        metrics::counter!("tandem_cluster_weights_bytes_total", "node" => node.clone()).increment(blob.len() as u64);
        let _ = st.args.snapshot.cast(SnapshotMsg::Adopted {
            receiver: format!("node/{node}"),
            version: w.version,
            latency: adopt,
        });
        tracing::info!(%node, version = w.version, bytes = blob.len(), mb_per_s, publish_to_adopt_s = adopt.as_secs_f64(), "weights sent");
        let line = json!({
            "node": node, "version": w.version, "bytes": blob.len(), "chunks": n,
            "transfer_s": secs - build_s, "build_s": build_s, "mb_per_s": mb_per_s,
            "publish_to_adopt_s": adopt.as_secs_f64(),
        });
        // One write of the whole line: every node's link appends to this file, and O_APPEND
        // keeps a single write whole (Display for a JSON value would write it piece by piece).
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&st.args.log) {
            let _ = f.write_all(&bytes);
        }
        Ok(())
    }
}
