//! The live view of a run: the Prometheus endpoint answers while a run is live with series for
//! every actor kind, and `tandem top --once` prints one row per actor.

mod common;
use common::OutputWithin;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn a_live_run_serves_metrics_and_top_shows_every_actor() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    // Two rollout actors, a free port, frequent samples.
    let _run = Run(Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", config.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
        .args(["--set", "steps=100000", "--set", "metrics.addr=\"127.0.0.1:0\""])
        .args([
            "--set",
            "metrics.sample_interval_s=0.2",
            "--set",
            "placement.rollouts_per_device=2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let start = Instant::now();
    let kinds = ["rollout", "reward", "value", "replay", "learner", "snapshot"];
    let (addr, text) = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no complete metrics from the run"
        );
        std::thread::sleep(Duration::from_millis(200));
        let Ok(addr) = std::fs::read_to_string(run_dir.join("metrics_addr")) else {
            continue;
        };
        let text = scrape(addr.trim());
        let complete = kinds
            .iter()
            .all(|k| text.contains(&format!("tandem_actor_busy_fraction{{kind=\"{k}\"")))
            && text.contains("tandem_learner_steps");
        if complete {
            break (addr.trim().to_string(), text);
        }
    };
    for series in [
        "tandem_actor_messages_total",
        "tandem_actor_handle_seconds_bucket",
        "tandem_actor_queue_depth",
        "tandem_actor_rate",
        "tandem_channel_depth",
        "tandem_weight_adopt_seconds",
        "tandem_replay_buffered",
    ] {
        assert!(text.contains(series), "{series} missing");
    }

    for args in [
        vec!["--addr", addr.as_str()],
        vec!["--run-dir", run_dir.to_str().unwrap()],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["top", "--once"])
            .args(&args)
            .output_within();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let table = String::from_utf8(out.stdout).unwrap();
        let rows: Vec<&str> = table.lines().skip(2).collect();
        // 2 rollout actors + reward + value + replay + learner + snapshot.
        assert_eq!(rows.len(), 7, "{table}");
        for k in kinds {
            assert!(rows.iter().any(|r| r.starts_with(k)), "no {k} row in\n{table}");
        }
        assert_eq!(rows.iter().filter(|r| r.starts_with("rollout")).count(), 2, "{table}");
    }
    // actors.jsonl gets a line per actor per sample.
    let samples = std::fs::read_to_string(run_dir.join("actors.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    for key in [
        "t",
        "actor",
        "kind",
        "device",
        "busy_frac",
        "queue_depth",
        "rate",
        "version_lag",
        "state",
    ] {
        assert!(first.get(key).is_some(), "actors.jsonl lacks {key}");
    }
}

#[test]
fn top_without_a_run_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["top", "--once", "--addr", "127.0.0.1:1"])
        .output_within();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tandem metrics endpoint at 127.0.0.1:1"));
}
