//! `tandem node --join HOST:PORT [--name NAME] [--cookie-file F] [--devices cpu:0,...]`: a worker
//! process that joins a running head (`tandem run` with a `[cluster]` section) and hosts the
//! rollout actors the head's `[[placement.nodes]]` entry of the same name places on it.
//!
//! The cookie comes from `--cookie-file`, else `TANDEM_CLUSTER_COOKIE`; there is no default.
//! `--tls-ca FILE` joins a head that has `cluster.tls_cert` over TLS, trusting the PEM
//! certificates in FILE (the head's own, or its CA) for the name `--tls-server-name` (default:
//! the host of `--join`). The worker exits with status 1 when the head refuses it (another
//! cookie, TLS on one side only, a certificate it does not trust), and with status 0 once the
//! head has been gone for `--reconnect-s` seconds after a run. See `tandem_runtime::cluster` for
//! what travels between the two.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_actors::DeviceId;
use tandem_runtime::cluster::{read_cookie, transport, worker};

use crate::error::bad_input;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The head's cluster address (`RUN_DIR/cluster_addr` of the run).
    #[arg(long, value_name = "HOST:PORT")]
    join: String,
    /// The node's name, as in the head's `[[placement.nodes]]` (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// File holding the shared cookie (else TANDEM_CLUSTER_COOKIE).
    #[arg(long)]
    cookie_file: Option<PathBuf>,
    /// Devices this node offers to the head's placement.
    #[arg(long, value_delimiter = ',', default_value = "cpu:0")]
    devices: Vec<DeviceId>,
    /// Threads per CPU device.
    #[arg(long, default_value_t = 1)]
    threads_per_device: usize,
    /// Seconds to keep trying to reach the head, at start and after losing it.
    #[arg(long, default_value_t = 30.0)]
    reconnect_s: f64,
    /// Join over TLS, trusting the PEM certificates in this file (the head's certificate, or the
    /// CA that issued it); for a head with cluster.tls_cert.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The name the head's certificate must be for (default: the host of --join).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

fn default_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| {
            s.trim()
                .replace(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'), "-")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    if args.reconnect_s.is_nan() || args.reconnect_s < 0.0 {
        return bad_input!("--reconnect-s must be >= 0");
    }
    if args.devices.is_empty() {
        return bad_input!("--devices: name at least one device");
    }
    // An address that cannot be a HOST:PORT fails now, not after --reconnect-s of retries.
    let port_ok = args
        .join
        .rsplit_once(':')
        .is_some_and(|(host, port)| !transport::join_host(host).is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return bad_input!(
            "--join {:?}: expected HOST:PORT (for example 127.0.0.1:7946)",
            args.join
        );
    }
    if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(args.join.as_str()) {
        return bad_input!("--join {}: {e}", args.join);
    }
    for d in &args.devices {
        if let Err(e) = d.check_built() {
            return bad_input!("--devices: {e}");
        }
    }
    let cookie = match read_cookie(args.cookie_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return bad_input!("{e}"),
    };
    let tls = match &args.tls_ca {
        Some(ca) => {
            let name = args
                .tls_server_name
                .as_deref()
                .unwrap_or_else(|| transport::join_host(&args.join));
            match transport::ClientTls::new(ca, name) {
                Ok(t) => Some(t),
                Err(e) => return bad_input!("{e}"),
            }
        }
        None => None,
    };
    let opts = worker::NodeOptions {
        join: args.join,
        name: args.name.unwrap_or_else(default_name),
        cookie,
        devices: args.devices,
        threads_per_device: args.threads_per_device,
        reconnect_s: args.reconnect_s,
        tls,
    };
    let rt = crate::control_runtime("tandem-node")?;
    let name = opts.name.clone();
    let out = rt.block_on(async {
        tokio::select! {
            r = worker::run_node(opts) => r,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                Ok(())
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    out.with_context(|| format!("node {name}"))
}
