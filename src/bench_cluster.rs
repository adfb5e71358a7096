//! `tandem bench cluster`: weight transfer to a worker node over loopback, next to a plain TCP
//! copy of the same bytes.
//!
//! The bench starts a head-side cluster listener in this process and a worker as a child
//! process (`tandem node`, a random cookie in its environment), both on 127.0.0.1. It publishes
//! `--versions` versions of a randomly initialised GPT-2 policy (`--hidden` × `--layers`, by
//! default 512 × 8 with a 512-token vocabulary: 25.6M parameters, 102 MB of f32) through the
//! same snapshot actor → node link → worker host path a run uses: safetensors bytes in
//! CRC32-checked chunks of `--chunk-bytes`, a checked commit, a model built on the worker.
//! `cluster_mb_per_s` is the median over versions of bytes / (first chunk sent → commit
//! acknowledged, less the worker's model-build time); `publish_to_adopt_s` is the median time
//! from publishing a version to the worker having adopted it (build included).
//!
//! The baseline sends the same blob over one loopback TCP connection between two threads of
//! this process (write all, the reader reads all and answers one byte), `--versions` times;
//! `tcp_mb_per_s` is the median. `ratio` = cluster / tcp. The last line of stdout is one JSON
//! object.
//!
//! With `--tls-cert FILE --tls-key FILE` (PEM; a certificate for 127.0.0.1, with CA:FALSE) the
//! head takes the worker over TLS (`cluster.tls_cert`), the worker trusting that certificate,
//! so the figures include the TLS cost; the baseline stays plain TCP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ractor::Actor;
use rand::Rng;
use serde_json::json;
use tandem_actors::snapshot::{SnapshotActor, SnapshotArgs, SnapshotMsg};
use tandem_actors::{ActorMeter, DeviceId, WeightsSnapshot};
use tandem_models::{snapshot, LanguageModel, ModelConfig, SamplingConfig, WeightInit};
use tandem_runtime::cluster::node_link::{NodeLinkActor, NodeLinkArgs, NodeView};
use tandem_runtime::cluster::wire::{self, Setup};
use tandem_runtime::cluster::{start_head, COOKIE_ENV};
use tandem_runtime::config::ClusterConfig;

use crate::bench::median;
use crate::error::bad_input;

#[derive(Debug, Args)]
pub struct ClusterBench {
    /// Policy versions sent (and TCP copies timed).
    #[arg(long, default_value_t = 5)]
    versions: u64,
    /// GPT-2 width.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// GPT-2 layers.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Bytes per weight chunk.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Send over TLS with this certificate (PEM, for 127.0.0.1), as `cluster.tls_cert`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM), as `cluster.tls_key`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// Kills the worker when the bench ends, however it ends.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &ClusterBench) -> anyhow::Result<()> {
    if args.versions == 0 || args.hidden == 0 || args.layers == 0 || !args.hidden.is_multiple_of(8) {
        return bad_input!("--versions and --layers must be >= 1 and --hidden a positive multiple of 8");
    }
    if !(1024..=16 << 20).contains(&args.chunk_bytes) {
        return bad_input!("--chunk-bytes must be between 1024 and 16777216");
    }
    let config = ModelConfig::gpt2(512, args.hidden, args.layers, 8, 64);
    let (_, vars) = LanguageModel::trainable(&config, WeightInit::Random { seed: 0 }, &candle_core::Device::Cpu)?;
    let tensors = snapshot(&vars)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let blob = wire::weights_to_bytes(&tensors).map_err(anyhow::Error::msg)?;

    let rt = crate::control_runtime("tandem-control")?;
    let dir = tempfile_dir()?;
    let cluster = rt.block_on(cluster_transfer(args, &config, tensors, &dir.0))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    let tcp: Vec<f64> = (0..args.versions)
        .map(|_| tcp_copy(&blob))
        .collect::<anyhow::Result<_>>()?;

    let cluster_mb_s = median(cluster.iter().map(|c| c.0).collect());
    let adopt_s = median(cluster.iter().map(|c| c.1).collect());
    let tcp_mb_s = median(tcp);
    let mb = blob.len() as f64 / 1e6;
    println!(
        "gpt2 {} layers, width {}: {:.1}M parameters, {mb:.1} MB of safetensors; {} versions, chunks of {} bytes",
        args.layers,
        args.hidden,
        params as f64 / 1e6,
        args.versions,
        args.chunk_bytes
    );
    let over = if args.tls_cert.is_some() { " over TLS" } else { "" };
    println!("cluster weights transfer{over}: {cluster_mb_s:>9.1} MB/s (publish to adopt {adopt_s:.3} s)");
    println!("plain TCP copy:           {tcp_mb_s:>9.1} MB/s");
    println!("ratio (cluster / tcp):    {:>9.3}", cluster_mb_s / tcp_mb_s);
    crate::print_json(&json!({
        "parameters": params,
        "bytes": blob.len(),
        "versions": args.versions,
        "chunk_bytes": args.chunk_bytes,
        "tls": args.tls_cert.is_some(),
        "cluster_mb_per_s": cluster_mb_s,
        "publish_to_adopt_s": adopt_s,
        "per_version": cluster.iter().map(|c| json!({"mb_per_s": c.0, "publish_to_adopt_s": c.1})).collect::<Vec<_>>(),
        "tcp_mb_per_s": tcp_mb_s,
        "ratio": cluster_mb_s / tcp_mb_s,
    }))
}

/// A temporary directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let d = std::env::temp_dir().join(format!("tandem-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(TempDir(d))
}

/// (MB/s, publish-to-adopt seconds) per version sent through a real head → worker link.
async fn cluster_transfer(
    args: &ClusterBench,
    config: &ModelConfig,
    tensors: HashMap<String, candle_core::Tensor>,
    dir: &Path,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let cookie: String = {
        let mut rng = rand::rng();
        (0..32).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
    };
    let cc = ClusterConfig {
        listen: "127.0.0.1:0".into(),
        chunk_bytes: args.chunk_bytes,
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        ..Default::default()
    };
    let head = match start_head(&cc, cookie.clone(), vec!["bench".into()]).await {
        Err(e @ tandem_runtime::RuntimeError::Config { .. }) => return bad_input!("{e}"),
        other => other?,
    };
    let exe = std::env::current_exe().context("cannot find the tandem binary")?;
    let _worker = Worker(
        Command::new(exe)
            .args([
                "node",
                "--join",
                &head.addr.to_string(),
                "--name",
                "bench",
                "--reconnect-s",
                "1",
            ])
            .args(
                args.tls_cert
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--tls-ca"), c.as_os_str()]),
            )
            .env(COOKIE_ENV, &cookie)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the worker")?,
    );
    let version = |v| {
        Arc::new(WeightsSnapshot {
            version: v,
            tensors: tensors.clone(),
            published_at: Instant::now(),
        })
    };
    let (snap, _) = Actor::spawn(
        None,
        SnapshotActor,
        SnapshotArgs {
            policy: version(0),
            critic: None,
            meter: Arc::new(ActorMeter::new("snapshot", "snapshot", "-")),
            latency: Default::default(),
        },
    )
    .await?;
    let (view_tx, mut view) = tokio::sync::watch::channel(NodeView::default());
    let log = dir.join("cluster.jsonl");
    let (link, _) = Actor::spawn(
        None,
        NodeLinkActor,
        NodeLinkArgs {
            node: "bench".into(),
            setup: Setup {
                node: "bench".into(),
                model_config_json: config.to_json().to_string(),
                sampling: SamplingConfig::default(),
                slots: vec![DeviceId::Cpu(0)],
            },
            snapshot: snap.clone(),
            view: view_tx,
            chunk_bytes: args.chunk_bytes,
            log: log.clone(),
            meter: Arc::new(ActorMeter::on_node("link", "link/bench", "-", "bench")),
        },
    )
    .await?;
    // Version 0 goes when the worker joins; it is the warm-up and is not timed.
    if !adopted(&mut view, 0).await {
        bail!("the worker did not join and adopt the first version within 120 s");
    }
    for v in 1..=args.versions {
        snap.cast(SnapshotMsg::Publish {
            policy: version(v),
            critic: None,
        })?;
        if !adopted(&mut view, v).await {
            bail!("version {v} was not adopted within 120 s");
        }
    }
    link.stop(None);
    snap.stop(None);
    head.shutdown().await;
    let text = std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["version"].as_u64().unwrap_or(0) >= 1 {
            out.push((
                v["mb_per_s"].as_f64().unwrap_or(f64::NAN),
                v["publish_to_adopt_s"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }
    if out.len() as u64 != args.versions {
        bail!("{} of {} versions were logged", out.len(), args.versions);
    }
    Ok(out)
}

/// Waits (at most 120 s) until the node holds version `v`.
async fn adopted(view: &mut tokio::sync::watch::Receiver<NodeView>, v: u64) -> bool {
    tokio::time::timeout(Duration::from_secs(120), view.wait_for(|n| n.version == Some(v)))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// MB/s of one copy of `blob` over a loopback TCP connection.
fn tcp_copy(blob: &[u8]) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let len = blob.len();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf)?;
        s.write_all(&[1])
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    s.write_all(blob)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    reader.join().map_err(|_| anyhow::anyhow!("TCP reader panicked"))??;
    Ok(len as f64 / 1e6 / secs)
}
