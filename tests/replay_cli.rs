//! `tandem replay` on a real run: summary, show, filters, export, verify, rescore, rerun-step; and a run
//! killed with SIGKILL mid-write leaves a store that verifies (after its torn tail, if any, is
//! cut) and reopens. A run with in-flight weight updates stores, shows and exports the version
//! of every token.

mod common;
use common::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn quickstart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/quickstart.toml")
        .to_string_lossy()
        .into_owned()
}

fn replay(run_dir: &Path, args: &[&str]) -> Output {
    tandem().arg("replay").arg(run_dir).args(args).output_within()
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// One 4-step quickstart run shared by the tests (each copies it before damaging it).
fn run_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let out = tandem()
            .args(["run", &quickstart(), "--run-dir", run.to_str().unwrap()])
            .args(["--set", "steps=4", "--set", "metrics.addr=\"127.0.0.1:0\""])
            .output_within();
        let summary = last_json(&out);
        assert_eq!(summary["stored_trajectories"], 128);
        (dir, run)
    })
    .1
}

/// Offsets of the records in one segment.
fn offsets(seg: &Path) -> Vec<u64> {
    let bytes = std::fs::read(seg).unwrap();
    let (mut at, mut out) = (0usize, vec![]);
    while at + 8 <= bytes.len() {
        out.push(at as u64);
        at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    out
}

#[test]
fn summary_show_filters_and_export() {
    let run = run_dir();
    let s = last_json(&replay(run, &[]));
    assert_eq!((s["steps"].as_u64(), s["trajectories"].as_u64()), (Some(4), Some(128)));
    assert_eq!(s["used"].as_u64().unwrap() + s["dropped"].as_u64().unwrap(), 128);
    assert!(s["bytes_per_trajectory"].as_f64().unwrap() > 100.0);

    let out = replay(run, &["--show", "2", "--step", "1"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("== step 1 ").count(), 2, "{text}");
    assert!(
        text.contains("prompt:") && text.contains("response:") && text.contains("adv"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.jsonl");
    let out = replay(run, &["--export-jsonl", file.to_str().unwrap()]);
    let stored = last_json(&out)["stored"].as_u64().unwrap();
    // Progress while exporting (a small store: only the line after the last), none with --quiet.
    let progress = format!("exported {stored}/{stored} elapsed ");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&progress),
        "no progress line"
    );
    let quiet = replay(run, &["--export-jsonl", file.to_str().unwrap(), "--quiet"]);
    last_json(&quiet);
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("exported "),
        "progress with --quiet"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, stored);
    let t = &lines[0];
    let n = t["response_ids"].as_array().unwrap().len();
    for key in [
        "logprobs",
        "ref_logprobs",
        "kl",
        "values",
        "token_rewards",
        "advantages",
        "returns",
    ] {
        assert_eq!(t[key].as_array().unwrap().len(), n, "{key}");
    }
    // Without in-flight updates every token has the trajectory's version.
    for t in &lines {
        let versions = t["token_versions"].as_array().unwrap();
        assert_eq!(versions.len(), t["response_ids"].as_array().unwrap().len());
        assert!(versions.iter().all(|v| *v == t["policy_version"]));
    }

    // Filters: by step, by version, by score.
    let count = |args: &[&str]| last_json(&replay(run, args))["trajectories"].as_u64().unwrap();
    assert_eq!(
        count(&["--step", "2"]),
        lines.iter().filter(|t| t["step"] == 2).count() as u64
    );
    assert_eq!(
        count(&["--version", "0"]),
        lines.iter().filter(|t| t["policy_version"] == 0).count() as u64
    );
    let high = lines.iter().filter(|t| t["score"].as_f64().unwrap() >= 0.2).count() as u64;
    assert_eq!(count(&["--reward-min", "0.2"]), high);
    assert_eq!(count(&["--reward-max", "0.19999"]), stored - high);
}

#[test]
fn inflight_updates_store_show_and_export_per_token_versions() {
    // With in-flight updates on, every exported trajectory has one version per token, non-
    // decreasing from its `policy_version`; `--show` prints a version per token line and
    // metrics.jsonl the token-weighted staleness and behaviour-ratio statistics. (Whether a
    // publish lands mid-batch depends on timing: on the tiny model the learner step is the
    // slow stage. The rollout's unit tests adopt a version mid-batch deterministically.)
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = tandem()
        .args(["run", &quickstart(), "--run-dir", run.to_str().unwrap()])
        .args(["--set", "steps=4", "--set", "metrics.addr=\"127.0.0.1:0\""])
        .args([
            "--set",
            "mode.inflight_updates=true",
            "--set",
            "sampling.max_new_tokens=48",
        ])
        .args(["--set", "sampling.stop_tokens=[]", "--set", "algorithm.ppo_epochs=1"])
        .output_within();
    last_json(&out);
    let file = dir.path().join("all.jsonl");
    last_json(&replay(&run, &["--export-jsonl", file.to_str().unwrap()]));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 128);
    for t in &lines {
        let versions: Vec<u64> = t["token_versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(versions.len(), 48);
        assert_eq!(
            versions.first().copied(),
            t["policy_version"].as_u64(),
            "the first token is the oldest"
        );
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "versions go back: {versions:?}"
        );
    }
    let t = &lines[0];
    let out = replay(&run, &["--show", "1", "--step", &t["step"].to_string()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let token_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  ") && !l.contains("token"))
        .collect();
    assert_eq!(token_lines.len(), 48, "{text}");
    assert!(text.lines().any(|l| l.trim_end().ends_with("version")), "{text}");
    for l in token_lines {
        let v: u64 = l.split_whitespace().last().unwrap().parse().unwrap();
        assert!(v >= t["policy_version"].as_u64().unwrap(), "{l}");
    }
    // Without stop tokens every response has the same length, so the token-weighted
    // staleness is at most the trajectories' (that of their first token).
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for l in metrics.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let (token, traj) = (
            r["token_staleness_mean"].as_f64().unwrap(),
            r["staleness_mean"].as_f64().unwrap(),
        );
        assert!(token <= traj + 1e-9, "{r}");
        assert!(r["off_policy_token_frac"].as_f64().unwrap() <= 1.0);
        assert!(r["behaviour_ratio_min"].as_f64().unwrap() <= r["behaviour_ratio_max"].as_f64().unwrap());
        assert!(r["behaviour_mismatch_kl"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn verify_ok_and_rescore_reproduces_the_rule() {
    let run = run_dir();
    let v = last_json(&replay(run, &["--verify"]));
    assert_eq!((v["ok"].as_bool(), v["records"].as_u64()), (Some(true), Some(128)));
    let r = last_json(&replay(run, &["--rescore"]));
    assert_eq!(r["rescored"], 128);
    assert_eq!(r["differing"], 0);
    assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0));
}

#[test]
fn verify_names_the_segment_and_offset_of_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("trajectories");
    std::fs::create_dir_all(&store).unwrap();
    let seg = store.join("seg-000001.log");
    std::fs::copy(run_dir().join("trajectories/seg-000001.log"), &seg).unwrap();
    let at = offsets(&seg)[17];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at as usize + 30] ^= 1;
    std::fs::write(&seg, bytes).unwrap();
    let out = replay(dir.path(), &["--verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("seg-000001.log at byte {at}: checksum mismatch")),
        "{stderr}"
    );
}

#[test]
fn sigkill_mid_run_leaves_a_store_that_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = tandem()
        .args(["run", &quickstart(), "--run-dir", run.to_str().unwrap()])
        .args(["--set", "steps=100000", "--set", "metrics.addr=\"127.0.0.1:0\""])
        .args(["--set", "store.segment_bytes=20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = run.join("trajectories");
    let start = Instant::now();
    // Kill while steps are being written: once a few segments exist.
    while tandem_runtime::store::list_segments(&store).unwrap().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no trajectories stored");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();

    // Tolerant reading works straight away; whole records only.
    let before = last_json(&replay(&run, &[]))["stored"].as_u64().unwrap();
    assert!(before > 0);
    // Reopening (here via --repair) cuts a torn tail if there is one; then everything verifies.
    let repaired = last_json(&replay(&run, &["--repair"]));
    let v = last_json(&replay(&run, &["--verify"]));
    assert_eq!(v["records"].as_u64(), Some(before), "{repaired}");
    // And the store reopens for appending.
    let (mut w, cut) = tandem_runtime::store::SegmentWriter::open(&store, 20000).unwrap();
    assert_eq!(cut, None);
    w.sync().unwrap();
}

#[test]
fn rerun_step_reproduces_recorded_steps_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("sync");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sync.toml");
    let out = tandem()
        .args(["run", config.to_str().unwrap(), "--run-dir", run.to_str().unwrap()])
        .args(["--set", "steps=4", "--set", "metrics.addr=\"127.0.0.1:0\""])
        .args(["--set", "checkpoints.every=1", "--set", "checkpoints.keep=10"])
        .output_within();
    last_json(&out);

    // A sync step: losses, per-token outputs and the next checkpoint's weights all identical.
    let v = last_json(&replay(&run, &["--rerun-step", "2"]));
    assert_eq!(v["identical"], true, "{v}");
    assert_eq!(v["trajectories"], 32);
    assert_eq!(v["stats"]["policy_loss"]["abs_diff"], 0.0);
    assert_eq!(v["token_outputs_max_abs_diff"], 0.0);
    assert!(v["weights"]["compared_with"].as_str().unwrap().ends_with("step-3"));
    assert_eq!(v["weights"]["policy_max_abs_diff"], 0.0);
    assert_eq!(v["weights"]["critic_max_abs_diff"], 0.0);

    // An async step (the shared quickstart run) reruns identically too; with no checkpoint
    // after it, the weights are not compared and that is said.
    let v = last_json(&replay(run_dir(), &["--rerun-step", "0"]));
    assert_eq!(v["identical"], true, "{v}");
    assert!(v["weights"]["note"]
        .as_str()
        .unwrap()
        .contains("no checkpoint of step 1"));

    // A recorded loss that does not match: exit 1, and the field shows the difference.
    let metrics = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    lines[2]["policy_loss"] = serde_json::json!(lines[2]["policy_loss"].as_f64().unwrap() + 0.5);
    let edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&metrics, edited.join("\n")).unwrap();
    let out = replay(&run, &["--rerun-step", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert!((v["stats"]["policy_loss"]["abs_diff"].as_f64().unwrap() - 0.5).abs() < 1e-9);

    // No checkpoint before the step: a clear error, exit 2.
    let out = replay(&run, &["--rerun-step", "7"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint of step 7"));
}
