//! What the CLI tests share: every wait on a `tandem` process has a deadline, so a run that
//! hangs fails its test with its stderr instead of stalling the whole suite.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The longest any single command of the CLI tests may take.
pub const LIMIT: Duration = Duration::from_secs(600);

/// Waits for `child` (stdout and stderr piped) for at most `limit`; past it the child is killed
/// and the test fails with the tail of what it printed.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for the child"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let out = rx.recv().expect("the waiting thread").expect("waiting for the child");
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!("the command did not finish within {limit:?} and was killed; its stderr ended:\n{tail}");
        }
    }
}

pub trait OutputWithin {
    /// `Command::output` with a deadline of [`LIMIT`].
    fn output_within(&mut self) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self) -> Output {
        let child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the command");
        wait_output(child, LIMIT)
    }
}
