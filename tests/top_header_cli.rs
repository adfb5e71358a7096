//! `tandem top` on a live run: the header shows the run's step out of its total, the ETA and
//! the score; the QUEUE column shows depth/capacity for every actor with an inbound channel;
//! and an endpoint that is not a tandem run's (another program on the port) is refused.

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

fn top(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["top", "--once"])
        .args(args)
        .output_within()
}

#[test]
fn the_header_shows_progress_and_every_inbound_queue_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let _run = Run(Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--run-dir",
            run_dir.to_str().unwrap(),
        ])
        .args(["--set", "steps=100000", "--set", "metrics.addr=\"127.0.0.1:0\""])
        .args(["--set", "metrics.sample_interval_s=0.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let start = Instant::now();
    let table = loop {
        assert!(start.elapsed() < Duration::from_secs(120), "no step reported by top");
        std::thread::sleep(Duration::from_millis(300));
        if !run_dir.join("metrics_addr").exists() {
            continue;
        }
        let out = top(&["--run-dir", run_dir.to_str().unwrap()]);
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        // Wait for two steps, so that the ETA has a pace to go by.
        let step = table
            .strip_prefix("step ")
            .and_then(|t| t.split('/').next())
            .and_then(|s| s.parse::<u64>().ok());
        if out.status.success() && step.is_some_and(|s| s >= 2) {
            break table;
        }
    };
    let header = table.lines().next().unwrap();
    assert!(header.contains("/100000 "), "{header}");
    let field = |name: &str| {
        let rest = header
            .split(&format!("{name} "))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in {header}"));
        rest.split_whitespace().next().unwrap().to_string()
    };
    let eta = field("eta");
    assert!(
        eta.ends_with('s') && eta.trim_end_matches('s').parse::<f64>().is_ok_and(|s| s > 0.0),
        "{header}"
    );
    assert!(field("score").parse::<f64>().is_ok(), "{header}");
    assert!(field("reward").parse::<f64>().is_ok(), "{header}");
    // Rollout (tickets), reward, value and replay have inbound channels: depth/capacity.
    for kind in ["rollout", "reward", "value"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} row in\n{table}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        // KIND ACTOR DEVICE STATE BUSY% QUEUE ...
        let queue = cols[5];
        let (d, c) = queue
            .split_once('/')
            .unwrap_or_else(|| panic!("{kind} QUEUE {queue:?}: {row}"));
        assert!(
            d.parse::<u32>().is_ok() && c.parse::<u32>().is_ok_and(|c| c >= 1),
            "{row}"
        );
    }
}

#[test]
fn an_endpoint_that_is_not_a_tandem_run_is_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(1) {
            let mut s = conn.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = "# another exporter\nprocess_cpu_seconds_total 12\n";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let out = top(&["--addr", &addr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not with a tandem run's metrics"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}
