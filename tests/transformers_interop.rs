//! What `tandem run` saves loads in Hugging Face transformers and gives the same numbers.
//!
//! Needs a Python with torch and transformers: `$TANDEM_PYTHON`, else `python3`. Where it is
//! missing the test prints why and passes without checking (CI installs no torch).

use std::path::Path;
use std::process::Command;

fn python() -> Option<String> {
    let py = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success());
    ok.unwrap_or(false).then_some(py)
}

fn tandem(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tandem {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn transformers(py: &str, dir: &Path, text: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/transformers_check.py");
    let out = Command::new(py).arg(script).arg(dir).arg(text).output().unwrap();
    assert!(
        out.status.success(),
        "transformers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn trained_checkpoints_load_in_transformers() {
    let Some(py) = python() else {
        println!("skipped: no Python with torch and transformers (set TANDEM_PYTHON)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = tempfile::tempdir().unwrap();
    for (config, dirs) in [
        (
            "configs/quickstart.toml",
            &[
                "policy",
                "critic",
                "checkpoints/step-3/policy",
                "checkpoints/step-3/critic",
            ][..],
        ),
        ("configs/grpo.toml", &["policy", "checkpoints/step-3/policy"][..]),
    ] {
        let run_dir = run.path().join(config);
        tandem(&[
            "run",
            root.join(config).to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--set",
            "steps=3",
        ]);
        let text = "the movie was good and the plot";
        for d in dirs {
            let dir = run_dir.join(d);
            let theirs = transformers(&py, &dir, text);
            let kind = if d.ends_with("policy") { "logprobs" } else { "score" };
            let ours = tandem(&["inspect", kind, "--model", dir.to_str().unwrap(), "--text", text]);
            if kind == "logprobs" {
                let a = ours["next_token_logprobs"].as_array().unwrap();
                let b = theirs["next_token_logprobs"].as_array().unwrap();
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() < 1e-4, "{config} {d}: {x} vs {y}");
                }
            } else {
                let (x, y) = (ours["score"].as_f64().unwrap(), theirs["score"].as_f64().unwrap());
                assert!((x - y).abs() < 1e-4, "{config} {d}: score {x} vs {y}");
            }
        }
    }
}

#[test]
fn sft_output_loads_in_transformers() {
    let Some(py) = python() else {
        println!("skipped: no Python with torch and transformers (set TANDEM_PYTHON)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = tempfile::tempdir().unwrap();
    let run_dir = run.path().join("sft");
    tandem(&[
        "sft",
        root.join("configs/pipeline/sft.toml").to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.epochs=1",
        "--set",
        "checkpoints.every=50",
    ]);
    let text = "12+39=51";
    for d in ["policy", "checkpoints/step-50/policy"] {
        let dir = run_dir.join(d);
        let theirs = transformers(&py, &dir, text);
        let ours = tandem(&["inspect", "logprobs", "--model", dir.to_str().unwrap(), "--text", text]);
        let a = ours["next_token_logprobs"].as_array().unwrap();
        let b = theirs["next_token_logprobs"].as_array().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() < 1e-4, "sft {d}: {x} vs {y}");
        }
    }
}
