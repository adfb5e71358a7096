//! The worker node's actor: hosts the rollout slots the head placed on this node.
//!
//! `tandem node` spawns one [`NodeHostActor`] and joins it to the process group
//! `tandem.node.<name>`; ractor_cluster mirrors that group on the head, where the node's
//! [`super::node_link::NodeLinkActor`] and rollout proxies find it. Everything it is sent comes
//! from the head over the authenticated ractor_cluster session ([`NodeMsg`] is a
//! `RactorClusterMessage` whose payloads are [`super::wire`] bytes):
//!
//! - `Setup`: the policy's config, the sampling settings and one device per rollout slot.
//!   Sent on every (re)connection; the reply says which policy version the node still holds,
//!   so a node that reconnects is not sent weights it already has.
//! - `Chunk` / `Commit`: one policy version's safetensors blob in chunks. Chunks must arrive
//!   in order and pass their CRC32; the commit's length and CRC32 of the whole blob are checked
//!   before a model is built on each slot device (on the device's executor, not on a tokio
//!   worker). Only then is the version adopted, and the reply is the head's publish-to-adopt
//!   signal. A chunk of a newer version abandons an unfinished older one.
//! - `Sample`: one ticket for one slot. The batch is generated on the slot's device in a task
//!   of its own (the actor stays free for chunks and other slots) and is the call's reply. The
//!   head's proxies keep at most one `Sample` in flight per slot, so the node never holds more
//!   than one batch per slot and its memory does not grow with the sampling speed.
//! - `Goodbye`: the head's run is over (it finished, or was stopped in order). The host raises
//!   [`NodeHostArgs::farewell`] before it replies, so when the session then closes the worker
//!   exits at once with status 0 instead of waiting for the head to come back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use tandem_actors::rollout::sample_ticket;
use tandem_actors::{DeviceId, Executor};
use tandem_models::{LanguageModel, ModelConfig, SamplingConfig};

use super::wire::{self, Commit, CommitReply, SampleReply, SampleRequest, Setup, SetupReply, WeightChunk};

#[derive(RactorClusterMessage)]
pub enum NodeMsg {
    /// [`Setup`] → [`SetupReply`].
    #[rpc]
    Setup(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// An encoded [`WeightChunk`].
    Chunk(Vec<u8>),
    /// [`Commit`] → [`CommitReply`].
    #[rpc]
    Commit(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// [`SampleRequest`] → [`SampleReply`].
    #[rpc]
    Sample(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// The head's run is over; the reply (empty) says the node heard it.
    #[rpc]
    Goodbye(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

#[derive(Clone)]
pub struct NodeHostArgs {
    pub name: String,
    pub devices: Vec<DeviceId>,
    pub threads_per_device: usize,
    /// Raised when the head says goodbye (see the module docs).
    pub farewell: Arc<std::sync::atomic::AtomicBool>,
}

struct Hosted {
    config: ModelConfig,
    config_json: String,
    sampling: SamplingConfig,
    slots: Vec<DeviceId>,
}

/// A version being received.
struct Incoming {
    version: u64,
    next: u32,
    total: u32,
    bytes: Vec<u8>,
    error: Option<String>,
}

pub struct NodeHostState {
    args: NodeHostArgs,
    executors: BTreeMap<DeviceId, Arc<Executor>>,
    hosted: Option<Hosted>,
    incoming: Option<Incoming>,
    /// The adopted version and its model on each slot device.
    models: Option<(u64, BTreeMap<DeviceId, Arc<LanguageModel>>)>,
}

pub struct NodeHostActor;

impl Actor for NodeHostActor {
    type Msg = NodeMsg;
    type State = NodeHostState;
    type Arguments = NodeHostArgs;

    async fn pre_start(&self, _me: ActorRef<NodeMsg>, args: NodeHostArgs) -> Result<NodeHostState, ActorProcessingErr> {
        let mut executors = BTreeMap::new();
        for d in &args.devices {
            executors.insert(*d, Executor::new(*d, args.threads_per_device)?);
        }
        Ok(NodeHostState {
            args,
            executors,
            hosted: None,
            incoming: None,
            models: None,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeHostState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Setup(bytes, reply) => {
                let result = self.setup(st, &bytes);
                match &result {
                    Ok(v) => tracing::info!(node = %st.args.name, holds_version = ?v, "set up by the head"),
                    Err(e) => tracing::error!(node = %st.args.name, "cannot host what the head asks: {e}"),
                }
                let _ = reply.send(wire::encode(&SetupReply { result }));
            }
            NodeMsg::Chunk(bytes) => self.chunk(st, bytes),
            NodeMsg::Goodbye(_, reply) => {
                st.args.farewell.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(node = %st.args.name, "the head's run is over");
                let _ = reply.send(Vec::new());
            }
            NodeMsg::Commit(bytes, reply) => {
                let result = self.commit(st, &bytes).await;
                if let Err(e) = &result {
                    tracing::error!(node = %st.args.name, "weights rejected: {e}");
                }
                let _ = reply.send(wire::encode(&CommitReply { result }));
            }
            NodeMsg::Sample(bytes, reply) => {
                let req: SampleRequest = match wire::decode(&bytes, "sample request") {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(wire::encode(&SampleReply { result: Err(e) }));
                        return Ok(());
                    }
                };
                let job = self.sample_job(st, &req);
                tokio::spawn(async move {
                    let result = match job {
                        Ok((exec, model, version, sampling)) => {
                            sample_ticket(&exec, model, &sampling, &req.ticket, version, &req.sampler, None)
                                .await
                                .map_err(|e| format!("sampling failed: {e}"))
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(wire::encode(&SampleReply { result }));
                });
            }
        }
        Ok(())
    }
}

type SampleJob = (Arc<Executor>, Arc<LanguageModel>, u64, SamplingConfig);

impl NodeHostActor {
    fn setup(&self, st: &mut NodeHostState, bytes: &[u8]) -> Result<Option<u64>, String> {
        let s: Setup = wire::decode(bytes, "setup")?;
        if s.node != st.args.name {
            return Err(format!(
                "the head placed node {:?} here, but this node is {:?}",
                s.node, st.args.name
            ));
        }
        if let Some(d) = s.slots.iter().find(|d| !st.executors.contains_key(d)) {
            return Err(format!(
                "the head placed a rollout on {d}, which this node does not offer (--devices {})",
                st.args
                    .devices
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        let same = st
            .hosted
            .as_ref()
            .is_some_and(|h| h.config_json == s.model_config_json && h.slots == s.slots);
        if !same {
            st.models = None;
        }
        let config = ModelConfig::from_json_str(&s.model_config_json, std::path::Path::new("<head>"))
            .map_err(|e| format!("policy config: {e}"))?;
        st.hosted = Some(Hosted {
            config,
            config_json: s.model_config_json,
            sampling: s.sampling,
            slots: s.slots,
        });
        st.incoming = None;
        Ok(st.models.as_ref().map(|(v, _)| *v))
    }

    fn chunk(&self, st: &mut NodeHostState, bytes: Vec<u8>) {
        let c = match WeightChunk::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                if let Some(i) = &mut st.incoming {
                    i.error.get_or_insert(e);
                }
                return;
            }
        };
        if c.index == 0 {
            st.incoming = Some(Incoming {
                // A capacity hint only; the head is authenticated, but keep the hint sane.
                bytes: Vec::with_capacity(c.data().len().saturating_mul(c.total as usize).min(1 << 30)),
                version: c.version,
                next: 0,
                total: c.total,
                error: None,
            });
        }
        let Some(i) = st.incoming.as_mut().filter(|i| i.version == c.version) else {
            return; // the rest of an abandoned version
        };
        if i.error.is_some() {
            return;
        }
        if c.index != i.next || c.total != i.total {
            i.error = Some(format!(
                "chunk {}/{} arrived when {}/{} was expected",
                c.index, c.total, i.next, i.total
            ));
            return;
        }
        i.bytes.extend_from_slice(c.data());
        i.next += 1;
    }

    async fn commit(&self, st: &mut NodeHostState, bytes: &[u8]) -> Result<f64, String> {
        let c: Commit = wire::decode(bytes, "commit")?;
        let hosted = st.hosted.as_ref().ok_or("weights before setup")?;
        let inc = st
            .incoming
            .take()
            .filter(|i| i.version == c.version)
            .ok_or_else(|| format!("commit of version {} without its chunks", c.version))?;
        if let Some(e) = inc.error {
            return Err(e);
        }
        if inc.next != c.chunks || inc.bytes.len() as u64 != c.bytes {
            return Err(format!(
                "version {}: got {} chunks / {} bytes, the head sent {} / {}",
                c.version,
                inc.next,
                inc.bytes.len(),
                c.chunks,
                c.bytes
            ));
        }
        if crc32fast::hash(&inc.bytes) != c.crc32 {
            return Err(format!("version {}: CRC32 of the weights does not match", c.version));
        }
        let started = Instant::now();
        let blob = Arc::new(inc.bytes);
        let mut models = BTreeMap::new();
        let mut devices = hosted.slots.clone();
        devices.sort();
        devices.dedup();
        for d in devices {
            let (blob, config) = (blob.clone(), hosted.config.clone());
            let (model, _) = st.executors[&d]
                .run(move |dev| -> Result<LanguageModel, String> {
                    let tensors = wire::weights_from_bytes(&blob, dev)?;
                    LanguageModel::from_tensors(&config, tensors, dev)
                        .map_err(|e| format!("cannot build the policy: {e}"))
                })
                .await
                .map_err(|e| e.to_string())?;
            models.insert(d, Arc::new(model?));
        }
        st.models = Some((c.version, models));
        tracing::info!(node = %st.args.name, version = c.version, bytes = c.bytes, "adopted policy version");
        Ok(started.elapsed().as_secs_f64())
    }

    fn sample_job(&self, st: &NodeHostState, req: &SampleRequest) -> Result<SampleJob, String> {
        let hosted = st.hosted.as_ref().ok_or("sample before setup")?;
        let d = *hosted
            .slots
            .get(req.slot as usize)
            .ok_or_else(|| format!("no rollout slot {}", req.slot))?;
        let (version, models) = st.models.as_ref().ok_or("no policy weights yet")?;
        Ok((
            st.executors[&d].clone(),
            models[&d].clone(),
            *version,
            hosted.sampling.clone(),
        ))
    }
}
