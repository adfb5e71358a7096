//! A head whose run finishes says goodbye to its worker nodes: they exit with status 0 at once
//! instead of logging "lost the head" and waiting `--reconnect-s` for it to come back.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child whose stderr is collected by a thread; killed on drop.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.env_remove("TANDEM_CLUSTER_COOKIE").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
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

    fn wait(&mut self, limit: Duration) -> ExitStatus {
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

#[test]
fn workers_exit_at_once_when_the_head_finishes_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cookie_file = dir.path().join("cookie");
    std::fs::write(&cookie_file, "goodbye-cookie-0123456789\n").unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/cluster.toml");
    let mut head = Proc::spawn(
        &[
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--set",
            "steps=3",
            "--set",
            "metrics.enabled=false",
            "--set",
            "cluster.listen=\"127.0.0.1:0\"",
        ],
        &[("TANDEM_CLUSTER_COOKIE", "goodbye-cookie-0123456789")],
    );
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(run_dir.join("cluster_addr")) {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no cluster_addr:\n{}",
            head.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Workers that would wait a minute for a head that went away.
    let workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|name| {
            Proc::spawn(
                &[
                    "node",
                    "--join",
                    &addr,
                    "--name",
                    name,
                    "--cookie-file",
                    cookie_file.to_str().unwrap(),
                    "--reconnect-s",
                    "60",
                ],
                &[],
            )
        })
        .collect();
    let status = head.wait(Duration::from_secs(300));
    assert!(status.success(), "{}", head.log());
    let ended = Instant::now();
    for mut w in workers {
        let status = w.wait(Duration::from_secs(20));
        let log = w.log();
        assert_eq!(status.code(), Some(0), "{log}");
        assert!(log.contains("the head finished its run; exiting"), "{log}");
        assert!(!log.contains("lost the head"), "{log}");
    }
    // Far sooner than --reconnect-s.
    assert!(ended.elapsed() < Duration::from_secs(20), "{:?}", ended.elapsed());
}
