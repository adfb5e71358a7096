//! The reward-model CLI: `tandem train-rm` (configs/rm/preferences.toml), the trained model read by
//! `tandem inspect score`, `tandem sample --best-of N`, and external-command reward failures
//! surfacing as actor failures of a run.

mod common;
use common::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .current_dir(repo())
        .output_within()
}

fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_rm_cli_trains_a_reward_model_that_inspect_scores() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("rm");
    let s = last_json(&tandem(&[
        "train-rm",
        "configs/rm/preferences.toml",
        "--run-dir",
        path(&run),
    ]));
    println!("{s}");
    assert_eq!(s["train_examples"], 432);
    assert_eq!(s["eval_examples"], 48);
    assert!(s["eval_accuracy"].as_f64().unwrap() >= 0.9, "{s}");
    assert!(s["normalization"]["mean_after"].as_f64().unwrap().abs() < 1e-3, "{s}");
    // 2 epochs of 14 batches; checkpoints after steps 9, 18 and 27, the last 2 kept (the
    // final model is reward_model/).
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 28);
    assert!(!run.join("checkpoints/step-9").exists());
    assert!(run.join("checkpoints/step-18/model.safetensors").is_file());
    assert!(run.join("checkpoints/step-27/model.safetensors").is_file());
    let model = run.join("reward_model");
    let score = |text: &str| {
        last_json(&tandem(&["inspect", "score", "--model", path(&model), "--text", text]))["score"]
            .as_f64()
            .unwrap()
    };
    let (hi, lo) = (
        score("the movie was great fun good love best"),
        score("the movie was dull boring sad bad it"),
    );
    assert!(hi > lo, "{hi} vs {lo}");
}

#[test]
fn train_rm_cli_names_the_bad_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(&data, "{\"prompt\":\"a\",\"chosen\":\"good\",\"rejected\":\"bad\"}\n{\"prompt\":\"a\",\"responses\":[\"x\"],\"ranking\":[0]}\n").unwrap();
    let set = format!("data.train=\"{}\"", data.display());
    let out = tandem(&[
        "train-rm",
        "configs/rm/preferences.toml",
        "--set",
        &set,
        "--run-dir",
        path(&dir.path().join("r")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("prefs.jsonl:2: \"responses\" needs 2 to 64 entries, got 1"),
        "{err}"
    );
}

#[test]
fn sample_best_of_n_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("best.jsonl");
    // A count that would size an allocation of tens of GB is refused up front, exit 2.
    for n in ["1000000", "1025", "0"] {
        let out = tandem(&[
            "sample",
            "configs/quickstart.toml",
            "--best-of",
            n,
            "--out",
            path(&out_file),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--best-of {n}: {err}");
        assert!(err.contains("--best-of must be between 1 and 1024"), "{err}");
        assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
        assert!(!out_file.exists());
    }
    // The bound itself works: two prompts at N = 1024 are generated one prompt per batch.
    let prompts = dir.path().join("two.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"the movie was\"}\n{\"prompt\": \"the film is\"}\n",
    )
    .unwrap();
    let set = format!("data.prompts=\"{}\"", prompts.display());
    let s = last_json(&tandem(&[
        "sample",
        "configs/quickstart.toml",
        "--best-of",
        "1024",
        "--set",
        &set,
        "--set",
        "sampling.max_new_tokens=4",
        "--out",
        path(&out_file),
    ]));
    assert_eq!(s["prompts"], 2);
    let rows: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["scores"].as_array().unwrap().len() == 1024));
}

#[test]
fn sample_best_of_n_keeps_the_best_scored_response() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("best.jsonl");
    let s = last_json(&tandem(&[
        "sample",
        "configs/quickstart.toml",
        "--best-of",
        "4",
        "--out",
        path(&out_file),
    ]));
    println!("{s}");
    assert_eq!(s["prompts"], 256);
    let rows: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 256);
    for r in &rows {
        let scores: Vec<f64> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), 4);
        let best = scores.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(r["score"].as_f64().unwrap(), best, "{r}");
        assert_eq!(scores[r["best_index"].as_u64().unwrap() as usize], best);
        assert!(!r["response"].as_str().unwrap().is_empty());
    }
    // Selection raises the mean: best-of-4 over the positive-words fraction vs all samples.
    let (best, all) = (
        s["best_score_mean"].as_f64().unwrap(),
        s["all_score_mean"].as_f64().unwrap(),
    );
    assert!(best > all + 0.05, "{best} vs {all}");
}

#[test]
fn a_command_reward_printing_garbage_fails_the_run_with_the_line_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let out = tandem(&[
        "run",
        "configs/quickstart.toml",
        "--run-dir",
        path(dir.path()),
        "--set",
        "steps=2",
        "--set",
        "metrics.enabled=false",
        "--set",
        "reward.kind=\"command\"",
        "--set",
        "reward.command=[\"sh\", \"-c\", \"while read l; do echo oops; done\"]",
        "--set",
        "reward.max_restarts=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("actor failed: reward/cpu:0"), "{err}");
    assert!(err.contains("printed \"oops\" for request 1 of 16"), "{err}");
}
