//! Live telemetry of a run: the Prometheus endpoint and the per-actor sampler.
//!
//! The `metrics` facade gets a Prometheus recorder once per process (a second run in the same
//! process shares it). While a run is live, a small HTTP server on `metrics.addr` (loopback by
//! default) answers every request with the current exposition text; the address it bound is
//! written to `RUN_DIR/metrics_addr` so `tandem top --run-dir` finds it even with port 0.
//!
//! Every `metrics.sample_interval_s` the sampler reads each actor's meter and derives, per
//! actor: the busy fraction of the interval, the item rate (tokens/s for rollout actors, items/s
//! for the others), the policy-version lag behind the latest published version, and the
//! inbound queue depth. It sets the gauges `tandem_actor_busy_fraction`, `tandem_actor_rate`
//! and `tandem_actor_version_lag`, and appends one JSON line per actor to `RUN_DIR/actors.jsonl`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tandem_actors::{ActorMeter, MeterReading};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::RuntimeError;

/// The process-wide Prometheus recorder; `None` if another recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let b = PrometheusBuilder::new()
                .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .expect("non-empty buckets");
            b.install_recorder().ok()
        })
        .clone()
}

/// Serves `handle.render()` over HTTP on `addr` until the task is aborted; returns the bound address.
pub async fn serve(
    addr: &str,
    handle: PrometheusHandle,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), RuntimeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RuntimeError::Metrics(format!("metrics.addr {addr}: cannot listen: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| RuntimeError::Metrics(format!("metrics.addr {addr}: {e}")))?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                // Read the request head (any path answers with the metrics).
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let body = handle.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}

/// Turns meter readings into rates and fractions.
pub struct ActorSampler {
    meters: Vec<Arc<ActorMeter>>,
    last: Vec<MeterReading>,
    last_at: Instant,
    started: Instant,
    out: std::fs::File,
    path: std::path::PathBuf,
}

impl ActorSampler {
    pub fn new(meters: Vec<Arc<ActorMeter>>, run_dir: &Path, started: Instant) -> Result<Self, RuntimeError> {
        let path = run_dir.join("actors.jsonl");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| RuntimeError::io(&path, e))?;
        let last = meters.iter().map(|m| m.read()).collect();
        Ok(Self {
            meters,
            last,
            last_at: Instant::now(),
            started,
            out,
            path,
        })
    }

    /// One sample of every actor; `latest_version` is the newest published policy version.
    pub fn sample(&mut self, latest_version: u64) -> Result<(), RuntimeError> {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        let t = now.duration_since(self.started).as_secs_f64();
        let mut lines = String::new();
        for (m, last) in self.meters.iter().zip(self.last.iter_mut()) {
            let r = m.read();
            let busy = ((r.busy - last.busy).as_secs_f64() / dt).clamp(0.0, 1.0);
            let rate = (r.items - last.items) as f64 / dt;
            let lag = r.version.map(|v| latest_version.saturating_sub(v));
            let l = m.labels();
            metrics::gauge!("tandem_actor_busy_fraction", &l).set(busy);
            metrics::gauge!("tandem_actor_rate", &l).set(rate);
            if let Some(lag) = lag {
                metrics::gauge!("tandem_actor_version_lag", &l).set(lag as f64);
            }
            let line = json!({
                "t": t, "actor": m.name, "kind": m.kind, "device": m.device, "node": m.node, "state": r.state.name(),
                "busy_frac": busy, "messages": r.messages, "queue_depth": r.queue_depth,
                "queue_capacity": r.queue_capacity, "rate": rate, "version_lag": lag,
                "blocked_s": r.blocked.as_secs_f64(), "restarts": r.restarts,
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
            *last = r;
        }
        self.last_at = now;
        self.out
            .write_all(lines.as_bytes())
            .map_err(|e| RuntimeError::io(&self.path, e))?;
        if let Some(h) = prometheus() {
            h.run_upkeep();
        }
        Ok(())
    }
}
