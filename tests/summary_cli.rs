//! What a person reads at the end of a run and when something is wrong: the readable run
//! summary (this session and the whole run after a resume, score apart from reward, where the
//! models are, the report command), and error lines that say what is wrong once.

mod common;
use common::OutputWithin;

use std::path::Path;
use std::process::{Command, Output};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn quickstart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/quickstart.toml")
        .to_string_lossy()
        .into_owned()
}

fn ok(out: Output) -> (String, serde_json::Value) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    (stderr, json)
}

fn line_with<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{text}"))
}

#[test]
fn the_end_of_run_summary_reads_well_and_counts_the_session_and_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run_dir_s = run_dir.to_str().unwrap();
    let (stderr, json) = ok(tandem()
        .args(["run", &quickstart(), "--quiet", "--run-dir", run_dir_s])
        .args(["--set", "steps=4", "--set", "metrics.enabled=false"])
        .output_within());
    assert!(line_with(&stderr, "run finished:").contains("4 steps"), "{stderr}");
    assert!(!stderr.contains("this session"), "not resumed: {stderr}");
    // Score and reward apart, each with its first- and last-quarter means, as the JSON has them.
    let score = line_with(&stderr, "score ");
    let first = json["score_first_quarter"].as_f64().unwrap();
    let last = json["score_last_quarter"].as_f64().unwrap();
    assert!(score.contains(&format!("{first:.4} -> {last:.4}")), "{score} vs {json}");
    let reward = line_with(&stderr, "reward ");
    let first = json["reward_first_quarter"].as_f64().unwrap();
    assert!(reward.contains(&format!("{first:.4} ->")), "{reward} vs {json}");
    assert!(reward.contains("KL penalty"), "{reward}");
    // Where the models are, and how to see the report.
    let policy = run_dir.join("policy");
    assert!(
        line_with(&stderr, "policy:").ends_with(policy.to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(json["policy"], policy.to_str().unwrap());
    assert!(line_with(&stderr, "critic:").ends_with(run_dir.join("critic").to_str().unwrap()));
    assert!(
        line_with(&stderr, "report:").ends_with(&format!("tandem report {run_dir_s}")),
        "{stderr}"
    );
    assert_eq!(json["steps"], 4);
    assert_eq!(json["run_steps"], 4);

    // Resumed to 6 steps: this session's 2 steps and the whole run's 6.
    let (stderr, json) = ok(tandem()
        .args(["run", "--quiet", "--resume", run_dir_s, "--set", "steps=6"])
        .output_within());
    assert!(line_with(&stderr, "run finished:").contains("6 steps"), "{stderr}");
    let session = line_with(&stderr, "this session:");
    assert!(session.contains("2 steps (5-6)"), "{session}");
    assert!(session.contains("resumed from checkpoint step 4"), "{session}");
    assert_eq!(json["steps"], 2);
    assert_eq!(json["run_steps"], 6);
    let wall = json["wall_s"].as_f64().unwrap();
    assert!(json["session_wall_s"].as_f64().unwrap() > 0.0);
    assert!(
        line_with(&stderr, "run finished:").contains(&format!("{wall:.1}s")),
        "{stderr}"
    );
}

#[test]
fn errors_say_what_is_wrong_once() {
    // A missing file: the OS reason once, not twice.
    let out = tandem().args(["run", "/no/such/config.toml"]).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");

    // replay on a directory that does not exist says so; on one without a store, that.
    let out = tandem().args(["replay", "/no/such/run"]).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/no/such/run: no such directory"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let out = tandem().arg("replay").arg(dir.path()).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no trajectory store"), "{stderr}");

    // `tandem --help` describes bench as what it is: more than the model code.
    let out = tandem().arg("--help").output_within();
    let help = String::from_utf8_lossy(&out.stdout);
    let bench = line_with(&help, "bench");
    assert!(
        bench.contains("weight transfer") && bench.contains("PPO loop"),
        "{bench}"
    );

    // A reward command out of restarts stops the run with one report, not one per supervisor
    // restart of the reward actor (each of which would fail the same way at once).
    let dir = tempfile::tempdir().unwrap();
    let out = tandem()
        .args(["run", &quickstart(), "--quiet", "--run-dir"])
        .arg(dir.path().join("run"))
        .args(["--set", "steps=2", "--set", "metrics.enabled=false"])
        .args(["--set", "reward.kind=\"command\"", "--set", "reward.max_restarts=1"])
        .args([
            "--set",
            "reward.command=[\"sh\", \"-c\", \"while read l; do echo oops; done\"]",
        ])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failed = stderr
        .lines()
        .filter(|l| l.contains("actor failed actor=reward"))
        .count();
    assert_eq!(failed, 1, "{stderr}");
    // The log line and the final error line.
    assert_eq!(stderr.matches("no restarts left").count(), 2, "{stderr}");
    assert!(
        line_with(&stderr, "error:").contains("(no restarts left: max_restarts = 1)"),
        "{stderr}"
    );
}
