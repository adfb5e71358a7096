//! Long commands besides `run` report progress on stderr, one line per unit of work, and
//! `--quiet` turns it off: `train-rm` after every step, `sample` after every generation batch.

mod common;
use common::OutputWithin;

use std::path::Path;
use std::process::Command;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .to_string_lossy()
        .into_owned()
}

fn stderr_of(args: &[&str]) -> (String, serde_json::Value) {
    let out = tandem().args(args).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    (stderr, serde_json::from_str(stdout.lines().last().unwrap()).unwrap())
}

#[test]
fn train_rm_reports_every_step_unless_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("rm");
    let args = [
        "train-rm",
        &repo("configs/rm/preferences.toml"),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let (stderr, summary) = stderr_of(&args);
    let steps = summary["steps"].as_u64().unwrap();
    assert!(steps >= 2, "{summary}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("rm step ")).collect();
    assert_eq!(lines.len() as u64, steps, "{stderr}");
    for (k, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("rm step {}/{steps} loss ", k + 1)), "{l}");
        for field in [" acc ", " elapsed ", " eta "] {
            assert!(l.contains(field), "{field:?} not in {l:?}");
        }
    }
    assert!(lines.last().unwrap().ends_with("eta 0s"), "{stderr}");
    // The last step evaluates: its line has the held-out accuracy the summary reports.
    let acc = summary["eval_accuracy"].as_f64().unwrap();
    assert!(
        lines.last().unwrap().contains(&format!("eval_acc {acc:.3}")),
        "{stderr}"
    );

    let run = dir.path().join("rm-quiet");
    let (stderr, _) = stderr_of(&[&args[..2], &["--quiet", "--run-dir", run.to_str().unwrap()]].concat());
    assert!(!stderr.contains("rm step "), "{stderr}");
}

#[test]
fn sample_reports_every_batch_unless_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("best.jsonl");
    let args = [
        "sample",
        &repo("configs/quickstart.toml"),
        "--best-of",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let (stderr, summary) = stderr_of(&args);
    let prompts = summary["prompts"].as_u64().unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("sampled ")).collect();
    // The quickstart's generation batches: data.prompts_per_ticket = 16 prompts.
    assert_eq!(lines.len() as u64, prompts.div_ceil(16), "{stderr}");
    assert!(lines[0].starts_with("sampled 16/"), "{stderr}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with(&format!("sampled {prompts}/{prompts} prompts (2 each) elapsed ")),
        "{last}"
    );
    assert!(last.ends_with("eta 0s"), "{last}");

    let (stderr, _) = stderr_of(&[&args[..], &["--quiet"]].concat());
    assert!(!stderr.contains("sampled "), "{stderr}");
}
