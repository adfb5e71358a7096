//! Worker nodes over loopback: a head (`tandem run configs/cluster.toml`) and two `tandem node`
//! processes. A worker SIGKILLed mid-run loses no prompts (its tickets are reissued to the other
//! worker), comes back under the same name and samples again; the run finishes with every
//! ticket accounted for, and the policy learns. A worker with another cookie is refused, and both sides log it.
//! A TLS head (a self-signed certificate made here) runs with a TLS worker and refuses plain and
//! untrusting ones; a plain head refuses a TLS worker (and stray bytes) and stays up.

mod common;
use common::OutputWithin;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_runtime::checkpoint;
use tandem_runtime::store::{read_store, store_dir, ReadMode, Record};

fn tandem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.env_remove("TANDEM_CLUSTER_COOKIE");
    c
}

fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/cluster.toml")
}

/// A child whose stderr is collected by a thread; killed on drop.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, log) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Self { child, stderr }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the stderr thread finish
                return s;
            }
            assert!(t.elapsed() < limit, "still running after {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn head(run_dir: &Path, cookie: &str, extra: &[&str]) -> Proc {
    let mut c = tandem();
    c.args([
        "run",
        config().to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ])
    .args([
        "--set",
        "metrics.addr=\"127.0.0.1:0\"",
        "--set",
        "cluster.listen=\"127.0.0.1:0\"",
    ])
    .args(["--set", "checkpoints.every=100"])
    .env("TANDEM_CLUSTER_COOKIE", cookie);
    for e in extra {
        c.args(["--set", e]);
    }
    Proc::spawn(c)
}

fn worker(addr: &str, name: &str, cookie_file: &Path) -> Proc {
    worker_with(addr, name, cookie_file, &[])
}

fn worker_with(addr: &str, name: &str, cookie_file: &Path, extra: &[&str]) -> Proc {
    let mut c = tandem();
    c.args([
        "node",
        "--join",
        addr,
        "--name",
        name,
        "--cookie-file",
        cookie_file.to_str().unwrap(),
    ])
    .args(["--reconnect-s", "3"])
    .args(extra);
    Proc::spawn(c)
}

/// A self-signed certificate for `names`, written as `STEM.pem` (certificate) and `STEM.key`.
fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn path_value(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

fn wait_for<T>(what: &str, head: &mut Proc, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if let Some(s) = head.child.try_wait().unwrap() {
            panic!("the head exited ({s}) while waiting for {what}:\n{}", head.log());
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no {what} after 180 s:\n{}",
            head.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric_lines(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |s| s.lines().count())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_killed_worker_loses_no_prompts_and_is_used_again_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cookie_file = dir.path().join("cookie");
    std::fs::write(&cookie_file, "s3cret-cookie-0123456789\n").unwrap();
    // The shipped config as it is (step count included), but for the listener and endpoint.
    let steps = 30u64;
    let mut head = head(&run_dir, "s3cret-cookie-0123456789", &[]);
    let addr = wait_for("cluster_addr", &mut head, || {
        std::fs::read_to_string(run_dir.join("cluster_addr")).ok()
    });
    let mut w1 = worker(&addr, "w1", &cookie_file);
    let _w2 = worker(&addr, "w2", &cookie_file);

    wait_for("3 steps", &mut head, || (metric_lines(&run_dir) >= 3).then_some(()));
    // Live: the remote samplers are in `tandem top`, labelled with their node.
    let metrics_addr = std::fs::read_to_string(run_dir.join("metrics_addr")).unwrap();
    let top = tandem()
        .args(["top", "--once", "--addr", &metrics_addr])
        .output_within();
    let table = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{}", String::from_utf8_lossy(&top.stderr));
    for d in ["w1/cpu:0", "w2/cpu:0"] {
        assert!(table.contains(d), "no {d} row in\n{table}");
    }

    // SIGKILL w1 mid-run, while its sampler waits for a batch from it (when we can catch that).
    let computing = "tandem_actor_state{kind=\"rollout\",actor=\"rollout/w1/0\",device=\"w1/cpu:0\",node=\"w1\"} 1";
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) && !scrape(&metrics_addr).contains(computing) {
        std::thread::sleep(Duration::from_millis(2));
    }
    w1.child.kill().unwrap();
    w1.child.wait().unwrap();
    let killed_at = metric_lines(&run_dir);
    let head_log = head.stderr.clone();
    wait_for("the head to notice", &mut head, || log_has(&head_log, "node left"));
    // The run goes on with w2 alone.
    wait_for("2 more steps", &mut head, || {
        (metric_lines(&run_dir) >= killed_at + 2).then_some(())
    });
    assert!(
        metric_lines(&run_dir) < steps as usize,
        "the run ended before w1 could come back"
    );
    let back_at = unix_ms();
    let _w1 = worker(&addr, "w1", &cookie_file);

    let status = head.wait(Duration::from_secs(300));
    let log = head.log();
    assert!(status.success(), "{log}");
    assert_eq!(metric_lines(&run_dir), steps as usize);

    // Every ticket below the final checkpoint's watermark is accounted for exactly once: stored
    // (used, or dropped as stale) or in the checkpoint's replay buffer.
    let (last, ckdir) = checkpoint::list(&run_dir).unwrap().pop().unwrap();
    assert_eq!(last, steps);
    let ck = checkpoint::read(&ckdir, &candle_core::Device::Cpu).unwrap();
    let mut rows: BTreeMap<(u64, u32), usize> = BTreeMap::new();
    let mut samplers: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, _, r) in read_store(&store_dir(&run_dir), ReadMode::Strict).unwrap().records {
        let Record::Trajectory(t) = r;
        *rows.entry((t.ticket, t.row)).or_insert(0) += 1;
        samplers.entry(t.sampler.clone()).or_default().push(t.sampled_unix_ms);
    }
    for t in &ck.replay {
        *rows.entry((t.ticket, t.row)).or_insert(0) += 1;
    }
    assert!(rows.values().all(|&n| n == 1), "a trajectory was stored twice");
    let per_ticket = 16u32;
    let w = ck.meta.tickets.below;
    assert!(ck.meta.tickets.above.is_empty());
    for ticket in 0..w {
        for row in 0..per_ticket {
            assert!(rows.contains_key(&(ticket, row)), "ticket {ticket} row {row} was lost");
        }
    }
    assert_eq!(
        rows.len() as u64,
        w * per_ticket as u64,
        "only accounted tickets are stored"
    );
    let summary: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&{
            let mut s = Vec::new();
            std::io::Read::read_to_end(head.child.stdout.as_mut().unwrap(), &mut s).unwrap();
            s
        })
        .lines()
        .last()
        .unwrap(),
    )
    .unwrap();
    let last_report: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let dropped = last_report["dropped_stale"].as_u64().unwrap();
    assert_eq!(rows.len() as u64, steps * 32 + dropped + ck.replay.len() as u64);
    assert_eq!(summary["steps"], steps);
    // And it learns, as the quickstart does (the margin of runtime/tests/configs.rs).
    let rewards: Vec<f64> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward_mean"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let q = rewards.len() / 4;
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&rewards[..q]), mean(&rewards[rewards.len() - q..]));
    assert!(last > first + 0.05, "reward {first:.3} -> {last:.3}");

    // Only the workers sampled, and w1 sampled again after it came back.
    assert_eq!(samplers.keys().collect::<Vec<_>>(), ["rollout/w1/0", "rollout/w2/0"]);
    assert!(
        samplers["rollout/w1/0"].iter().any(|&t| t >= back_at),
        "w1 sampled nothing after it came back"
    );
    assert!(log.contains("node left"), "{log}");
    // What w1 held went to w2.
    assert!(log.contains("sampling a reissued ticket"), "{log}");
    eprintln!(
        "w1's proxy failed and was restarted: {}",
        log.contains("reissuing held tickets") && log.contains("restarted")
    );

    // Weights went to each node per version, checked, with rates and publish-to-adopt latency.
    let sent: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("cluster.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for node in ["w1", "w2"] {
        let mine: Vec<&serde_json::Value> = sent.iter().filter(|v| v["node"] == node).collect();
        assert!(mine.len() >= 2, "{node}: {mine:?}");
        for v in &mine {
            assert!(v["mb_per_s"].as_f64().unwrap() > 0.0 && v["publish_to_adopt_s"].as_f64().unwrap() >= 0.0);
            assert!(v["bytes"].as_u64().unwrap() > 100_000);
        }
    }
    // w1 was sent the policy again after it came back (a new process holds none).
    let w1_versions: Vec<u64> = sent
        .iter()
        .filter(|v| v["node"] == "w1")
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert!(
        w1_versions.windows(2).any(|p| p[1] > p[0] + 1),
        "w1 versions {w1_versions:?}"
    );
    // actors.jsonl labels the remote samplers with their node.
    let actors = std::fs::read_to_string(run_dir.join("actors.jsonl")).unwrap();
    assert!(actors
        .lines()
        .any(|l| l.contains("\"node\":\"w2\"") && l.contains("\"device\":\"w2/cpu:0\"")));
}

/// The head's Prometheus exposition text.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn log_has(log: &Mutex<String>, needle: &str) -> Option<()> {
    log.lock().unwrap().contains(needle).then_some(())
}

#[test]
fn a_worker_with_another_cookie_is_refused_and_both_sides_log_it() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let wrong = dir.path().join("wrong-cookie");
    std::fs::write(&wrong, "not-the-cookie-0123456789").unwrap();
    let mut head = head(&run_dir, "the-cookie-0123456789", &["steps=1000"]);
    let addr = wait_for("cluster_addr", &mut head, || {
        std::fs::read_to_string(run_dir.join("cluster_addr")).ok()
    });
    let mut w = worker(&addr, "w1", &wrong);
    let status = w.wait(Duration::from_secs(60));
    let wlog = w.log();
    assert_eq!(status.code(), Some(1), "{wlog}");
    assert!(wlog.contains("refused this node: authentication failed"), "{wlog}");
    let head_log = head.stderr.clone();
    wait_for("the refusal in the head's log", &mut head, || {
        log_has(&head_log, "node connection refused: authentication failed")
    });
    // Nothing was placed on the refused worker: the head has no step yet.
    assert_eq!(metric_lines(&run_dir), 0);
    let _ = Command::new("kill")
        .args(["-INT", &head.child.id().to_string()])
        .status();
    head.wait(Duration::from_secs(120));

    // A head without any cookie does not start.
    let out = tandem()
        .args([
            "run",
            config().to_str().unwrap(),
            "--run-dir",
            dir.path().join("nocookie").to_str().unwrap(),
        ])
        .args([
            "--set",
            "cluster.listen=\"127.0.0.1:0\"",
            "--set",
            "metrics.enabled=false",
        ])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no cluster cookie") && stderr.contains("TANDEM_CLUSTER_COOKIE"),
        "{stderr}"
    );
}

#[test]
fn a_tls_head_runs_with_a_tls_worker_and_refuses_plain_and_untrusting_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cookie_file = dir.path().join("cookie");
    std::fs::write(&cookie_file, "tls-cookie-0123456789").unwrap();
    let (cert, key) = self_signed(dir.path(), "head", &["localhost", "127.0.0.1"]);
    let (other, _) = self_signed(dir.path(), "other", &["localhost", "127.0.0.1"]);
    let steps = 3;
    let sets = [
        format!("cluster.tls_cert={}", path_value(&cert)),
        format!("cluster.tls_key={}", path_value(&key)),
        "placement.nodes=[{name=\"w1\", rollouts=1}]".to_string(),
        format!("steps={steps}"),
    ];
    let mut head = head(
        &run_dir,
        "tls-cookie-0123456789",
        &sets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let addr = wait_for("cluster_addr", &mut head, || {
        std::fs::read_to_string(run_dir.join("cluster_addr")).ok()
    });
    let head_log = head.stderr.clone();

    // A plain worker is refused, and told that the head requires TLS.
    let mut plain = worker(&addr, "w1", &cookie_file);
    let status = plain.wait(Duration::from_secs(60));
    let wlog = plain.log();
    assert_eq!(status.code(), Some(1), "{wlog}");
    assert!(
        wlog.contains("refused this node: it requires TLS") && wlog.contains("--tls-ca"),
        "{wlog}"
    );
    wait_for("the plain worker's refusal in the head's log", &mut head, || {
        log_has(
            &head_log,
            "node connection refused: plain TCP, but this head requires TLS",
        )
    });

    // A worker that trusts another certificate, and one that expects another name, fail the
    // handshake, and the head logs each.
    let other_ca = other.to_str().unwrap();
    let head_ca = cert.to_str().unwrap();
    for extra in [
        vec!["--tls-ca", other_ca],
        vec!["--tls-ca", head_ca, "--tls-server-name", "elsewhere.example"],
    ] {
        let mut w = worker_with(&addr, "w1", &cookie_file, &extra);
        let status = w.wait(Duration::from_secs(60));
        let wlog = w.log();
        assert_eq!(status.code(), Some(1), "{extra:?}: {wlog}");
        assert!(
            wlog.contains("the head's certificate is not trusted"),
            "{extra:?}: {wlog}"
        );
    }
    wait_for("the failed handshakes in the head's log", &mut head, || {
        let n = head_log
            .lock()
            .unwrap()
            .matches("node connection refused: TLS handshake failed")
            .count();
        (n >= 2).then_some(())
    });
    assert_eq!(metric_lines(&run_dir), 0, "a refused worker got work");

    // A worker that trusts the head's certificate (for its IP address, the host of --join) runs the job.
    let _w1 = worker_with(&addr, "w1", &cookie_file, &["--tls-ca", head_ca]);
    let status = head.wait(Duration::from_secs(120));
    let log = head.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("node authenticated"), "{log}");
    assert_eq!(metric_lines(&run_dir), steps);
    let mut samplers = std::collections::BTreeSet::new();
    for (_, _, r) in read_store(&store_dir(&run_dir), ReadMode::Strict).unwrap().records {
        let Record::Trajectory(t) = r;
        samplers.insert(t.sampler);
    }
    assert_eq!(samplers.into_iter().collect::<Vec<_>>(), ["rollout/w1/0"]);
}

/// The TCP ports that process `pid` listens on: its socket inodes (`/proc/PID/fd`) matched
/// against the LISTEN rows of `/proc/net/tcp` and `/proc/net/tcp6`.
#[cfg(target_os = "linux")]
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (the 10th field); st 0A is LISTEN.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn a_plain_head_refuses_a_tls_worker_and_stray_bytes_and_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cookie_file = dir.path().join("cookie");
    std::fs::write(&cookie_file, "plain-cookie-0123456789").unwrap();
    let (cert, _) = self_signed(dir.path(), "head", &["127.0.0.1"]);
    let mut head = head(&run_dir, "plain-cookie-0123456789", &["steps=1000"]);
    let addr = wait_for("cluster_addr", &mut head, || {
        std::fs::read_to_string(run_dir.join("cluster_addr")).ok()
    });
    let head_log = head.stderr.clone();

    let mut w = worker_with(&addr, "w1", &cookie_file, &["--tls-ca", cert.to_str().unwrap()]);
    let status = w.wait(Duration::from_secs(60));
    let wlog = w.log();
    assert_eq!(status.code(), Some(1), "{wlog}");
    assert!(
        wlog.contains("closed the connection during the TLS handshake") && wlog.contains("does not use TLS"),
        "{wlog}"
    );
    wait_for("the TLS worker's refusal in the head's log", &mut head, || {
        log_has(
            &head_log,
            "node connection refused: it opened a TLS session, but this head has no TLS",
        )
    });

    // Bytes of another protocol, and a frame header announcing exabytes: each connection is
    // closed, the head goes on.
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(bytes).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.read_to_end(&mut Vec::new()); // the head closes it
    }
    wait_for("the stray bytes in the head's log", &mut head, || {
        let l = head_log.lock().unwrap();
        (l.contains("node connection refused: not a tandem node") && l.contains("over the limit")).then_some(())
    });
    assert!(
        head.child.try_wait().unwrap().is_none(),
        "the head died:\n{}",
        head.log()
    );

    // A plain worker still joins.
    let mut w1 = worker(&addr, "w1", &cookie_file);
    wait_for("the plain worker to join", &mut head, || {
        log_has(&head_log, "node authenticated")
    });

    // The same bytes to every port that the head and the worker listen on, ractor_cluster's own
    // listeners included: both stay up.
    #[cfg(target_os = "linux")]
    {
        let head_ports = listening_ports(head.child.id());
        let worker_ports = listening_ports(w1.child.id());
        // The head: its cluster listener and ractor_cluster's own; the worker: ractor_cluster's own.
        let cluster_port: u16 = addr.trim().rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            head_ports.contains(&cluster_port),
            "head ports {head_ports:?}, cluster at {addr}"
        );
        assert!(head_ports.len() >= 2, "head ports {head_ports:?}");
        assert!(!worker_ports.is_empty(), "worker ports {worker_ports:?}");
        for port in head_ports.iter().chain(&worker_ports) {
            for bytes in [
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                &[0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            ] {
                use std::io::{Read, Write};
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", *port)) else {
                    continue;
                };
                let _ = s.write_all(bytes);
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            head.child.try_wait().unwrap().is_none(),
            "the head died:\n{}",
            head.log()
        );
        assert!(w1.child.try_wait().unwrap().is_none(), "the worker died:\n{}", w1.log());
    }
    let _ = Command::new("kill")
        .args(["-INT", &head.child.id().to_string()])
        .status();
    head.wait(Duration::from_secs(120));
}

#[test]
fn cluster_keys_are_checked() {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    for (set, needle) in [
        (
            "placement.nodes=[{name=\"w1\", rollouts=1}]",
            "placement.nodes needs a [cluster] section",
        ),
        (
            "cluster.listen=\"nowhere\"",
            "cluster.listen: \"nowhere\" is not HOST:PORT",
        ),
        ("cluster.chunk_bytes=16", "cluster.chunk_bytes must be between"),
        (
            "cluster.tls_cert=\"/nonexistent/head.pem\"",
            "cluster.tls_cert and cluster.tls_key go together",
        ),
        (
            "cluster={tls_cert=\"/nonexistent/head.pem\", tls_key=\"/nonexistent/head.key\"}",
            "cluster.tls_cert: file not found: /nonexistent/head.pem",
        ),
        (
            // A file that holds no certificate (the config itself), named in the message.
            format!("cluster={{tls_cert={0}, tls_key={0}}}", path_value(&quickstart)).as_str(),
            format!("{}: cluster.tls_cert: no CERTIFICATE", quickstart.display()).as_str(),
        ),
    ] {
        let out = tandem()
            .args(["run", quickstart.to_str().unwrap(), "--set", set])
            .output_within();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {stderr}");
        assert!(stderr.contains(needle), "{set}: {stderr}");
    }
    let out = tandem()
        .args([
            "run",
            config().to_str().unwrap(),
            "--set",
            "placement.nodes=[{name=\"w 1\", rollouts=1}]",
        ])
        .output_within();
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be letters, digits"));
    // A worker without a cookie does not start.
    let out = tandem()
        .args(["node", "--join", "127.0.0.1:1", "--name", "w1"])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no cluster cookie"), "{stderr}");
    // Nor one whose --tls-ca cannot be read, nor --tls-server-name without --tls-ca.
    for args in [
        &["--tls-ca", "/nonexistent/ca.pem"][..],
        &["--tls-server-name", "head.example"],
    ] {
        let out = tandem()
            .args(["node", "--join", "127.0.0.1:1", "--name", "w1"])
            .args(args)
            .env("TANDEM_CLUSTER_COOKIE", "c-0123456789abcdef")
            .output_within();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--tls-ca"), "{args:?}: {stderr}");
    }
}
