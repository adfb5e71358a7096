//! What `tandem run` and `tandem sft` save loads in Hugging Face transformers and gives the same
//! numbers: log-probs and scores, and greedy generations token for token (`AutoTokenizer` and
//! `AutoModelForCausalLM` against `tandem sample` and `tandem eval`).
//!
//! Needs a Python with torch and transformers: `$TANDEM_PYTHON`, else `python3`. Where it is
//! missing each test prints why and passes without checking (`.ci/run` installs them where it can).

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

/// transformers' greedy continuations of `prompts` under `dir` (`scripts/transformers_generate.py`).
fn transformers_greedy(py: &str, dir: &Path, max_new_tokens: usize, prompts: &[&str]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/transformers_generate.py");
    let out = Command::new(py)
        .arg(script)
        .arg(dir)
        .arg(max_new_tokens.to_string())
        .args(prompts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "transformers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `tandem sample` (greedy, best of 1) with the model in `dir` as `config`'s policy generates the
/// token ids that transformers generates greedily from the same prompts, EOS included; with
/// `eval`, `tandem eval --model dir` (greedy by default) writes the same responses as text.
fn greedy_matches(py: &str, config: &str, dir: &Path, max_new_tokens: usize, prompts: &[&str], eval: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let prompts_file = tmp.path().join("prompts.jsonl");
    // An answer for configs that score by exact match; what is scored does not matter here.
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p, "answer": "" }).to_string())
        .collect();
    std::fs::write(&prompts_file, lines.join("\n") + "\n").unwrap();
    let (config, dir_s) = (root.join(config), dir.to_str().unwrap());
    let samples = tmp.path().join("samples.jsonl");
    let set = |k: &str, v: &str| ["--set".to_string(), format!("{k}={v}")];
    let args: Vec<String> = [
        "sample".to_string(),
        config.to_str().unwrap().into(),
        "--best-of".into(),
        "1".into(),
        "--out".into(),
        samples.to_str().unwrap().into(),
        "--quiet".into(),
    ]
    .into_iter()
    .chain(set("models.policy.path", &format!("{dir_s:?}")))
    .chain(set("data.prompts", &format!("{:?}", prompts_file.to_str().unwrap())))
    .chain(set("sampling.greedy", "true"))
    .chain(set("sampling.max_new_tokens", &max_new_tokens.to_string()))
    .collect();
    tandem(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ours = jsonl(&samples);
    let theirs = transformers_greedy(py, dir, max_new_tokens, prompts);
    assert_eq!(ours.len(), prompts.len());
    for ((p, o), t) in prompts.iter().zip(&ours).zip(&theirs) {
        assert_eq!(o["prompt"], *p);
        assert_eq!(o["response_ids"], t["response_ids"], "{dir_s}: {p:?}");
    }
    if eval {
        let out = tmp.path().join("eval.jsonl");
        tandem(&[
            "eval",
            config.to_str().unwrap(),
            "--model",
            dir_s,
            "--prompts",
            prompts_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        for ((p, e), t) in prompts.iter().zip(jsonl(&out)).zip(&theirs) {
            assert_eq!(e["response"], t["text"], "{dir_s}: {p:?}");
        }
    }
}

#[test]
fn run_exports_generate_greedily_as_in_transformers() {
    let Some(py) = python() else {
        println!("skipped: no Python with torch and transformers (set TANDEM_PYTHON)");
        return;
    };
    // The GPT-2 fixture (HF layout with its tokenizer files) trained for two PPO steps.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = "configs/reward_model.toml";
    tandem(&[
        "run",
        root.join(config).to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=2",
    ]);
    let prompts = ["her film could be", "the movie was", "a story about the"];
    greedy_matches(&py, config, &run.join("policy"), 12, &prompts, false);
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
        "train.epochs=4",
        "--set",
        "checkpoints.every=125",
    ]);
    let text = "12+39=51";
    // The final policy and the oldest checkpoint kept (`checkpoints.keep` removes earlier ones).
    let oldest = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .min()
        .expect("a kept checkpoint");
    for d in ["policy".to_string(), format!("checkpoints/step-{oldest}/policy")] {
        let dir = run_dir.join(&d);
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
    // Greedy answers stop at the Qwen2 EOS in both.
    let prompts = ["29+1=", "46+49=", "19+27=", "12+39="];
    greedy_matches(
        &py,
        "configs/pipeline/grpo.toml",
        &run_dir.join("policy"),
        6,
        &prompts,
        true,
    );
}
