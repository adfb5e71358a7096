//! "Your own model and data": a minimal config — a Hugging Face checkpoint, a prompts file, a
//! reward and a step count, nothing else — runs end to end on the defaults (`[sampling]`,
//! `data.prompts_per_step`, `data.prompts_per_ticket = min(16, prompts_per_step)`, a critic from
//! the policy without a reward model); prompts under another field are read with
//! `data.prompt_key`; and a `cuda:N` device in a build without the `cuda` feature is bad input
//! (exit 2, saying how to build with CUDA) from every command that takes a device.

mod common;
use common::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tandem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The repository's `fixtures/hf/NAME`, or `$TANDEM_FIXTURES/hf/NAME`.
fn fixture(name: &str) -> PathBuf {
    std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("fixtures"))
        .join("hf")
        .join(name)
}

/// A prompts file keyed `"question"` (as many data sets are), four lines.
fn write_questions(dir: &Path) -> PathBuf {
    let p = dir.join("questions.jsonl");
    let lines = [
        "the movie was",
        "i think that",
        "today the weather",
        "my favourite food",
    ]
    .map(|q| serde_json::json!({ "question": q }).to_string());
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The smallest config that names a model of one's own.
fn minimal_config(dir: &Path, model: &Path, extra_data: &str) -> PathBuf {
    let prompts = write_questions(dir);
    let text = format!(
        "steps = 2\n\n[models.policy]\npath = {model:?}\n\n[reward]\nkind = \"positive_words\"\n\n\
         [data]\nprompts = {prompts:?}\n{extra_data}",
        model = model.to_str().unwrap(),
        prompts = prompts.to_str().unwrap(),
    );
    let p = dir.join("mine.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn resolved(run_dir: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(run_dir.join("config.toml")).unwrap()).unwrap()
}

fn int(t: &toml::Table, section: &str, key: &str) -> i64 {
    t[section][key]
        .as_integer()
        .unwrap_or_else(|| panic!("{section}.{key} in {t:?}"))
}

#[test]
fn a_minimal_config_with_your_own_model_runs_end_to_end_on_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("qwen2-tiny");
    let cfg = minimal_config(dir.path(), &model, "prompt_key = \"question\"\n");
    let run_dir = dir.path().join("run");
    let out = tandem()
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--quiet",
            "--set",
            "metrics.enabled=false",
            "--run-dir",
        ])
        .arg(&run_dir)
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // The defaults it ran with, as the run directory records them.
    let t = resolved(&run_dir);
    assert_eq!(int(&t, "data", "prompts_per_step"), 32);
    assert_eq!(int(&t, "data", "prompts_per_ticket"), 16);
    assert_eq!(int(&t, "sampling", "max_new_tokens"), 32);
    assert_eq!(t["models"]["critic"]["init"].as_str(), Some("policy"));
    // The fixture's EOS (id 0) stops responses.
    assert_eq!(t["sampling"]["stop_tokens"].as_array().map(Vec::len), Some(1));

    // Two learner steps of 32 prompts each, and the trained models in HF layout.
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{metrics}");
    for l in &lines {
        assert!(l["reward_mean"].as_f64().is_some_and(f64::is_finite), "{l}");
    }
    for m in ["policy", "critic"] {
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(run_dir.join(m).join(f).is_file(), "{m}/{f} missing");
        }
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 2, "{stdout}");

    // Fewer prompts per step than a ticket holds: the ticket shrinks to fit.
    let run_dir = dir.path().join("run4");
    let out = tandem()
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--quiet",
            "--set",
            "metrics.enabled=false",
        ])
        .args(["--set", "data.prompts_per_step=4", "--set", "steps=1", "--run-dir"])
        .arg(&run_dir)
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = resolved(&run_dir);
    assert_eq!(int(&t, "data", "prompts_per_step"), 4);
    assert_eq!(int(&t, "data", "prompts_per_ticket"), 4);
}

#[test]
fn a_reward_model_still_initialises_the_critic_by_default_and_explicit_keys_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = minimal_config(dir.path(), &fixture("gpt2-tiny"), "prompt_key = \"question\"\n");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let rm = fixture("gpt2-tiny-reward");
    let with_rm = text.replace(
        "kind = \"positive_words\"",
        &format!("kind = \"reward_model\"\nmodel = {:?}", rm.to_str().unwrap()),
    );
    std::fs::write(&cfg, with_rm).unwrap();
    let run_dir = dir.path().join("run");
    let out = tandem()
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--quiet",
            "--set",
            "metrics.enabled=false",
        ])
        .args(["--set", "steps=1", "--set", "data.prompts_per_step=8"])
        .args(["--set", "data.prompts_per_ticket=2", "--run-dir"])
        .arg(&run_dir)
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = resolved(&run_dir);
    assert_eq!(t["models"]["critic"]["init"].as_str(), Some("reward_model"));
    assert_eq!(int(&t, "data", "prompts_per_ticket"), 2);
}

#[test]
fn prompts_under_another_field_name_the_field_and_the_key_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = minimal_config(dir.path(), &fixture("gpt2-tiny"), "");
    let out = tandem()
        .args(["run", cfg.to_str().unwrap(), "--run-dir"])
        .arg(dir.path().join("run"))
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in ["questions.jsonl:1", "\"prompt\"", "[\"question\"]", "data.prompt_key"] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_exits_2_from_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = minimal_config(dir.path(), &fixture("gpt2-tiny"), "prompt_key = \"question\"\n");
    let cfg = cfg.to_str().unwrap();
    let gpt2 = fixture("gpt2-tiny");
    let gpt2 = gpt2.to_str().unwrap();
    let rm_cfg = repo("configs/rm/preferences.toml");
    let rm_cfg = rm_cfg.to_str().unwrap();
    let quickstart = repo("configs/quickstart.toml");
    let run_dir = dir.path().join("r");
    let run_dir = run_dir.to_str().unwrap();
    let out_jsonl = dir.path().join("best.jsonl");
    let learner = "placement.learner_device=\"cuda:0\"";
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", cfg, "--run-dir", run_dir, "--set", learner],
        vec![
            "run",
            cfg,
            "--run-dir",
            run_dir,
            "--set",
            "placement.rollout_devices=[\"cuda:1\"]",
        ],
        vec![
            "sample",
            cfg,
            "--best-of",
            "2",
            "--out",
            out_jsonl.to_str().unwrap(),
            "--set",
            learner,
        ],
        vec![
            "train-rm",
            rm_cfg,
            "--run-dir",
            run_dir,
            "--set",
            "placement.device=\"cuda:0\"",
        ],
        vec![
            "inspect", "logprobs", "--model", gpt2, "--ids", "1,2,3", "--device", "cuda:0",
        ],
        vec![
            "inspect", "generate", "--model", gpt2, "--ids", "1,2", "--device", "cuda:0",
        ],
        vec!["node", "--join", "127.0.0.1:9", "--devices", "cuda:0"],
        vec![
            "bench",
            "overlap",
            "--config",
            quickstart.to_str().unwrap(),
            "--set",
            learner,
        ],
        vec!["bench", "ppo", "--steps", "2", "--set", learner],
    ];
    for args in cases {
        let out = tandem().args(&args).output_within();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("cuda:"), "{args:?}: {stderr}");
        assert!(stderr.contains("--features cuda"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Nothing was written for the refused run.
    assert!(!Path::new(run_dir).join("metrics.jsonl").exists());
    assert!(!out_jsonl.exists());
}
