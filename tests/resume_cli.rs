//! `tandem run --resume` after SIGKILL: a sync run continues from its latest checkpoint and
//! writes the same metrics, trajectories and weights as a run that was never interrupted. A
//! checkpoint whose files no longer match its manifest is set aside for the previous one.

mod common;
use common::OutputWithin;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_actors::StepReport;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

const SETTINGS: [&str; 8] = [
    "--set",
    "steps=8",
    "--set",
    "checkpoints.every=2",
    "--set",
    "metrics.addr=\"127.0.0.1:0\"",
    "--set",
    "checkpoints.keep=2",
];

fn start(run_dir: &Path) -> std::process::Child {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sync.toml");
    tandem()
        .args(["run", config.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
        .args(SETTINGS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn metrics(run_dir: &Path) -> Vec<StepReport> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| StepReport::from_line(l).unwrap())
        .collect()
}

/// The part of a metrics line that does not depend on timing: the step's statistics, what it
/// trained and how much was generated.
fn learning(r: &StepReport) -> impl PartialEq + std::fmt::Debug + '_ {
    (r.step, r.policy_version, &r.stats, r.tokens_generated, r.staleness_max)
}

#[test]
fn sigkill_then_resume_matches_an_uninterrupted_sync_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let out = common::wait_output(start(&whole), common::LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let killed = dir.path().join("killed");
    let mut child = start(&killed);
    let t = Instant::now();
    while metrics(&killed).len() < 5 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let lines_at_kill = metrics(&killed).len();

    let out = tandem()
        .args(["run", "--resume", killed.to_str().unwrap()])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let from = summary["resumed_from"].as_u64().unwrap();
    assert!(
        from >= 4 && from as usize <= lines_at_kill,
        "resumed from {from}, {lines_at_kill} lines"
    );

    let (a, b) = (metrics(&whole), metrics(&killed));
    assert_eq!(b.len(), 8, "one line per step, none repeated");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(learning(x), learning(y), "step {}", x.step);
    }
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for f in ["policy/model.safetensors", "critic/model.safetensors"] {
        assert!(read(&whole, f) == read(&killed, f), "{f} differs");
    }
    // Only the last `keep` checkpoints stay, each complete.
    let mut kept: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["step-6", "step-8"]);

    // The trajectory log continues: it verifies, and holds every step once.
    let verify = tandem()
        .args(["replay", killed.to_str().unwrap(), "--verify"])
        .output_within();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&verify.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["records"], 8 * 32);
}

/// Flips one byte near the end (in the tensor data) of `file`.
fn flip_a_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let i = bytes.len() - 7;
    bytes[i] ^= 0x40;
    std::fs::write(file, bytes).unwrap();
}

fn checkpoint_names(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_damaged_checkpoint_falls_back_to_the_previous_one_or_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sync.toml");
    let out = tandem()
        .args(["run", config.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
        .args(SETTINGS)
        .args(["--set", "steps=4"])
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(checkpoint_names(&run_dir), vec!["step-2", "step-4"]);
    assert!(run_dir.join("checkpoints/step-4/manifest.json").is_file());

    // One flipped byte in the latest weights: the resume falls back to step 2 and says so.
    flip_a_byte(&run_dir.join("checkpoints/step-4/policy/model.safetensors"));
    let out = tandem()
        .args(["run", "--resume", run_dir.to_str().unwrap(), "--set", "steps=6"])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checkpoint step-4 is damaged")
            && stderr.contains("policy/model.safetensors")
            && stderr.contains("falling back to the previous complete checkpoint, step-2"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["resumed_from"], 2);
    let lines = metrics(&run_dir);
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.step, i as u64);
    }
    // The damaged checkpoint is kept aside, not deleted, and not taken for a checkpoint.
    assert!(run_dir
        .join("checkpoints/damaged-step-4/policy/model.safetensors")
        .is_file());
    assert_eq!(checkpoint_names(&run_dir), vec!["damaged-step-4", "step-4", "step-6"]);

    // Damage in every checkpoint (weights in one, optimizer state in the other): exit 2 naming
    // the files, and nothing is moved or deleted.
    flip_a_byte(&run_dir.join("checkpoints/step-6/policy/model.safetensors"));
    flip_a_byte(&run_dir.join("checkpoints/step-4/optimizer.safetensors"));
    let out = tandem()
        .args(["run", "--resume", run_dir.to_str().unwrap(), "--set", "steps=8"])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no intact checkpoint")
            && stderr.contains("step-6/policy/model.safetensors")
            && stderr.contains("step-4/optimizer.safetensors"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(checkpoint_names(&run_dir), vec!["damaged-step-4", "step-4", "step-6"]);
    assert_eq!(metrics(&run_dir).len(), 6);
}
