//! The SFT, evaluation and task-generation CLI on the shipped addition pipeline
//! (configs/pipeline/sft.toml, then configs/pipeline/grpo.toml from its output): `tandem sft`
//! trains and saves a causal LM, `tandem eval` measures its held-out exact-match accuracy,
//! pass@k, mean length and no-stop fraction, and GRPO from the SFT model raises its held-out
//! greedy accuracy by 10 points or more (CI-sized).
//! Bad input exits 2 naming the file and line; a second run into a run directory is refused;
//! `--resume` continues from the latest checkpoint.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::OutputWithin;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .current_dir(root())
        .args(args)
        .output_within()
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "tandem {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The first number under `key` anywhere in `v`.
fn find_key(v: &serde_json::Value, key: &str) -> Option<f64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_f64())
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn fails_with(args: &[&str], code: i32, needle: &str) {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "tandem {args:?}: {err}");
    assert!(err.contains(needle), "tandem {args:?}: {err}");
}

#[test]
fn the_addition_pipeline_trains_evaluates_and_continues_with_rl() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tmp.path().join("sft");
    let s = ok_json(&[
        "sft",
        "configs/pipeline/sft.toml",
        "--run-dir",
        sft_dir.to_str().unwrap(),
        "--quiet",
    ]);
    println!("sft: {s}");
    assert_eq!(s["steps"], s["total_steps"]);
    let (first, last) = (s["first_eval_loss"].as_f64().unwrap(), s["eval_loss"].as_f64().unwrap());
    assert!(last < first && last < 1.5, "held-out loss {first} -> {last}");
    let policy = sft_dir.join("policy");
    let p = policy.to_str().unwrap();

    // Greedy held-out accuracy of the SFT model: learnt something, far from all.
    let samples = tmp.path().join("eval.jsonl");
    let e = ok_json(&[
        "eval",
        "configs/pipeline/grpo.toml",
        "--model",
        p,
        "--prompts",
        "configs/data/addition_eval.jsonl",
        "--out",
        samples.to_str().unwrap(),
    ]);
    println!("eval greedy: {e}");
    let acc = e["accuracy"].as_f64().unwrap();
    assert!(acc > 0.02 && acc < 0.9, "SFT accuracy {acc}");
    assert_eq!(e["prompts"], 200);
    assert_eq!(e["pass_at"][0][1].as_f64().unwrap(), acc, "greedy pass@1 = accuracy");
    assert!(e["no_stop_fraction"].as_f64().unwrap() < 0.1, "{e}");
    let len = e["mean_length"].as_f64().unwrap();
    assert!((2.0..=5.0).contains(&len), "answers are 1-3 digits and EOS: {len}");
    // The samples file: one line per response, `correct` agreeing with the answer.
    let lines = std::fs::read_to_string(&samples).unwrap();
    let answers: std::collections::HashMap<String, String> =
        std::fs::read_to_string(root().join("configs/data/addition_eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["prompt"].as_str().unwrap().into(),
                    v["answer"].as_str().unwrap().into(),
                )
            })
            .collect();
    let mut right = 0;
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let want = &answers[v["prompt"].as_str().unwrap()];
        let correct = v["response"].as_str().unwrap().trim() == want;
        assert_eq!(v["correct"].as_bool().unwrap(), correct, "{l}");
        right += correct as usize;
    }
    assert_eq!(lines.lines().count(), 200);
    assert!((right as f64 / 200.0 - acc).abs() < 1e-12);

    // n samples at T = 1: pass@k for k = 1, 2, 4 and it never falls with k.
    let e4 = ok_json(&[
        "eval",
        "configs/pipeline/grpo.toml",
        "--model",
        p,
        "--prompts",
        "configs/data/addition_eval.jsonl",
        "--samples",
        "4",
        "--temperature",
        "1.0",
        "--out",
        tmp.path().join("eval4.jsonl").to_str().unwrap(),
    ]);
    println!("eval 4 samples at T=1: {e4}");
    let pass: Vec<(u64, f64)> = e4["pass_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[0].as_u64().unwrap(), x[1].as_f64().unwrap()))
        .collect();
    assert_eq!(pass.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 4]);
    assert!(
        pass[0].1 <= pass[1].1 && pass[1].1 <= pass[2].1 && pass[2].1 > 0.0,
        "{pass:?}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("eval4.jsonl"))
            .unwrap()
            .lines()
            .count(),
        800
    );
    fails_with(
        &["eval", "configs/pipeline/grpo.toml", "--model", p, "--samples", "4"],
        2,
        "--temperature",
    );

    // GRPO from the SFT model, the shipped run's 300 steps: greedy held-out accuracy,
    // evaluated by the run itself every 50 steps and at the end, rises by 15 points or more.
    // (Runs measured 20.5–28.5 points. A 200-step cut measured 7–10.5: too close to any bound
    // for a process that a change of rounding in the model sends down another path.)
    let rise = tmp.path().join("rise");
    let set_policy = format!("models.policy.path={p}");
    ok_json(&[
        "run",
        "configs/pipeline/grpo.toml",
        "--run-dir",
        rise.to_str().unwrap(),
        "--quiet",
        "--set",
        &set_policy,
        "--set",
        "checkpoint.every=0",
        "--set",
        "metrics.addr=\"127.0.0.1:0\"",
    ]);
    let curve: Vec<(u64, f64)> = std::fs::read_to_string(rise.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_accuracy")?.as_f64()?)))
        .collect();
    println!("held-out greedy accuracy: SFT {acc}, during GRPO {curve:?}");
    assert_eq!(
        curve.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![49, 99, 149, 199, 249, 299]
    );
    let after = curve[5].1;
    assert!(
        after >= acc + 0.15,
        "GRPO moved held-out greedy accuracy from {acc} to {after}"
    );

    // RL from the SFT model (CI-sized), with the SFT data as the PPO-ptx mix (InstructGPT).
    let grpo = tmp.path().join("grpo");
    let r = ok_json(&[
        "run",
        "configs/pipeline/grpo.toml",
        "--run-dir",
        grpo.to_str().unwrap(),
        "--quiet",
        "--set",
        &set_policy,
        "--set",
        "steps=4",
        "--set",
        "data.pretrain=../data/addition_train.jsonl",
        "--set",
        "algorithm.ptx_coef=1.0",
        "--set",
        "metrics.addr=\"127.0.0.1:0\"",
    ]);
    assert_eq!(r["steps"], 4);
    assert!(grpo.join("policy/model.safetensors").is_file());
    // The ptx log-likelihood of the SFT records is logged every step: negative, and near the
    // SFT model's own per-token loss (prompt tokens included, so somewhat above it).
    let metrics = std::fs::read_to_string(grpo.join("metrics.jsonl")).unwrap();
    for l in metrics.lines() {
        let ptx = find_key(&serde_json::from_str(l).unwrap(), "ptx_logprob").expect("ptx_logprob logged");
        assert!(ptx < 0.0 && ptx > -6.0, "{l}");
    }
}

/// `[eval]` in a run: every `eval.every` steps and at the end, the published weights are
/// evaluated greedily on the held-out prompts, into those steps' metrics lines, with the
/// numbers `tandem eval` gives for the same weights; the run trains exactly as without it.
#[test]
fn a_run_evaluates_held_out_prompts_without_changing_what_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tmp.path().join("sft");
    let (d, p) = (sft_dir.to_str().unwrap(), sft_dir.join("policy"));
    ok_json(&[
        "sft",
        "configs/pipeline/sft.toml",
        "--run-dir",
        d,
        "--quiet",
        "--set",
        "train.epochs=2",
    ]);
    let set_policy = format!("models.policy.path={}", p.display());
    let run = |dir: &Path, config: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            config,
            "--run-dir",
            dir.to_str().unwrap(),
            "--quiet",
            "--set",
            &set_policy,
            "--set",
            "steps=5",
            "--set",
            "metrics.addr=\"127.0.0.1:0\"",
        ];
        args.extend_from_slice(extra);
        ok_json(&args);
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let with = tmp.path().join("with");
    let lines = run(
        &with,
        "configs/pipeline/grpo.toml",
        &["--set", "eval.every=2", "--set", "eval.max_prompts=48"],
    );
    let keys = [
        "eval_accuracy",
        "eval_score_mean",
        "eval_mean_length",
        "eval_no_stop_fraction",
    ];
    for (k, l) in lines.iter().enumerate() {
        let due = k == 1 || k == 3 || k == 4;
        for key in keys {
            assert_eq!(l.get(key).is_some(), due, "step {k}: {key} in {l}");
        }
    }
    // The last step's measures are `tandem eval`'s for the saved policy.
    let last = &lines[4];
    let e = ok_json(&[
        "eval",
        "configs/pipeline/grpo.toml",
        "--model",
        with.join("policy").to_str().unwrap(),
        "--prompts",
        "configs/data/addition_eval.jsonl",
        "--limit",
        "48",
        "--out",
        tmp.path().join("e.jsonl").to_str().unwrap(),
    ]);
    for (key, want) in [
        ("eval_accuracy", "accuracy"),
        ("eval_score_mean", "score_mean"),
        ("eval_mean_length", "mean_length"),
        ("eval_no_stop_fraction", "no_stop_fraction"),
    ] {
        assert_eq!(last[key].as_f64(), e[want].as_f64(), "{key}: {last} vs {e}");
    }

    // The same run without [eval] trains the same weights, step by step.
    let text = std::fs::read_to_string(root().join("configs/pipeline/grpo.toml")).unwrap();
    let (head, tail) = text.split_once("[eval]").unwrap();
    let tail = &tail[tail.find("\n[").unwrap()..];
    let dir = root().join("configs/pipeline");
    let plain = format!("{head}{tail}").replace("\"../", &format!("\"{}/../", dir.display()));
    let plain_cfg = tmp.path().join("plain.toml");
    std::fs::write(&plain_cfg, plain).unwrap();
    let without = tmp.path().join("without");
    let plain_lines = run(&without, plain_cfg.to_str().unwrap(), &[]);
    for (a, b) in lines.iter().zip(&plain_lines) {
        for key in ["policy_loss", "kl", "score_mean", "reward_mean", "entropy"] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
        assert!(keys.iter().all(|k| b.get(k).is_none()), "{b}");
    }
    let weights = |d: &Path| std::fs::read(d.join("policy/model.safetensors")).unwrap();
    assert!(weights(&with) == weights(&without), "the trained weights differ");

    // `tandem report` plots the held-out accuracy.
    let out = tandem(&["report", with.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(with.join("report.html")).unwrap();
    assert!(html.contains("id=\"chart-eval\""), "no held-out chart");
    fails_with(
        &[
            "run",
            "configs/pipeline/grpo.toml",
            "--set",
            &set_policy,
            "--set",
            "eval.every=0",
        ],
        2,
        "eval.every",
    );
}

#[test]
fn sft_refuses_bad_input_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let good = r#"{"prompt": "1+2=", "completion": "3"}"#;
    std::fs::write(&data, format!("{good}\n{good}\n{{\"prompt\": \"1+1=\"}}\n")).unwrap();
    let cfg = tmp.path().join("sft.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"train.jsonl\"\neval_fraction = 0.0\n[train]\nepochs = 4\nbatch_size = 1\n[checkpoints]\nevery = 3\n",
        root().join("fixtures/hf/qwen2-tiny").display()
    );
    std::fs::write(&cfg, text).unwrap();
    let run = tmp.path().join("run");
    let (c, r) = (cfg.to_str().unwrap(), run.to_str().unwrap());
    fails_with(&["sft", c, "--run-dir", r], 2, "train.jsonl:3");
    fails_with(&["sft", c, "--run-dir", r, "--set", "train.nope=1"], 2, "nope");

    std::fs::write(&data, format!("{good}\n{good}\n")).unwrap();
    let s = ok_json(&["sft", c, "--run-dir", r, "--quiet"]);
    assert_eq!(s["steps"], 8);
    assert_eq!(s["checkpoints"], 2);
    // A fresh run into a run directory is refused; --overwrite replaces it.
    fails_with(&["sft", c, "--run-dir", r], 2, "--resume");
    ok_json(&["sft", c, "--run-dir", r, "--overwrite", "--quiet"]);
    // --resume continues from the latest checkpoint (step 6) to the end.
    let s = ok_json(&["sft", "--resume", r, "--quiet"]);
    assert_eq!(s["resumed_from"], 6);
    assert_eq!(s["steps"], 2);
    let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(steps, 8);
}

#[test]
fn gen_task_is_seeded_and_checks_its_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let f = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    for (name, seed) in [("a", "3"), ("b", "3"), ("c", "4")] {
        let s = ok_json(&[
            "gen-task",
            "addition",
            "--digits",
            "3",
            "--count",
            "50",
            "--seed",
            seed,
            "--reverse",
            "--out",
            &f(name),
        ]);
        assert_eq!(s["records"], 50);
    }
    let read = |n: &str| std::fs::read_to_string(tmp.path().join(n)).unwrap();
    assert_eq!(read("a"), read("b"));
    assert_ne!(read("a"), read("c"));
    for l in read("a").lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let (a, b) = v["prompt"]
            .as_str()
            .unwrap()
            .trim_end_matches('=')
            .split_once('+')
            .unwrap();
        let sum = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
        let reversed: String = sum.to_string().chars().rev().collect();
        assert_eq!(v["answer"].as_str().unwrap(), reversed);
    }
    // --exclude leaves out the problems of a held-out file (1-digit addition has 100 problems).
    let prompts = |n: &str| -> std::collections::HashSet<String> {
        read(n)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (held, rest) = (f("held"), f("rest"));
    let gen = |count: &str, seed: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "gen-task", "addition", "--digits", "1", "--count", count, "--seed", seed, "--out", out,
        ];
        args.extend_from_slice(extra);
        ok_json(&args)["records"].as_u64().unwrap()
    };
    assert_eq!(gen("50", "5", &held, &[]), 50);
    let kept = gen("300", "6", &rest, &["--exclude", &held]);
    assert!(kept > 50 && kept < 300, "{kept}");
    assert!(prompts("rest").is_disjoint(&prompts("held")));
    assert_eq!(read("rest").lines().count() as u64, kept);
    fails_with(
        &["gen-task", "addition", "--digits", "0", "--out", &f("d")],
        2,
        "--digits",
    );
}
