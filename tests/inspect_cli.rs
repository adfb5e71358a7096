//! The `tandem inspect` binary against every fixture checkpoint in the repository's fixtures/hf
//! (or `$TANDEM_FIXTURES/hf`): its JSON matches the numbers transformers computed, `--text`
//! matches `--ids`, and bad input exits with status 2 and a message instead of a panic.

mod common;
use common::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures_hf() -> PathBuf {
    let root = std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    let hf = root.join("hf");
    assert!(
        hf.is_dir(),
        "fixtures not found at {} (set TANDEM_FIXTURES)",
        hf.display()
    );
    hf
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (checkpoint dir, expected.json) for every fixture checkpoint.
fn checkpoints() -> Vec<(PathBuf, Value)> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_hf())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixture checkpoints");
    dirs.into_iter()
        .map(|d| {
            let e = read_json(&d.join("expected.json"));
            (d, e)
        })
        .collect()
}

fn is_lm(expected: &Value) -> bool {
    expected["cases"][0].get("next_token_logprobs").is_some()
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem")).args(args).output_within()
}

/// Runs tandem, asserts success and parses the single JSON object on stdout.
fn tandem_json(args: &[&str]) -> Value {
    let out = tandem(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("tandem {args:?}: not JSON ({e}): {stdout}"))
}

fn ids_arg(ids: &Value) -> String {
    let ids: Vec<String> = ids.as_array().unwrap().iter().map(|v| v.to_string()).collect();
    ids.join(",")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn logprobs_and_greedy_match_transformers() {
    let mut checked = 0;
    for (dir, expected) in checkpoints().into_iter().filter(|(_, e)| is_lm(e)) {
        let model = dir.to_str().unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let ids = ids_arg(&case["input_ids"]);
            let what = format!("{model} ids {ids}");
            let got = tandem_json(&["inspect", "logprobs", "--model", model, "--ids", &ids]);
            assert_close(
                &what,
                &f64s(&got["next_token_logprobs"]),
                &f64s(&case["next_token_logprobs"]),
                1e-4,
            );
            let got = tandem_json(&[
                "inspect",
                "generate",
                "--model",
                model,
                "--ids",
                &ids,
                "--max-new-tokens",
                "12",
                "--greedy",
            ]);
            assert_eq!(got["new_ids"], case["greedy_12"], "{what}: greedy continuation");
            checked += 1;
        }
    }
    assert!(checked > 0, "no language-model fixtures");
}

#[test]
fn scores_match_transformers() {
    let mut checked = 0;
    for (dir, expected) in checkpoints().into_iter().filter(|(_, e)| !is_lm(e)) {
        let model = dir.to_str().unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let ids = ids_arg(&case["input_ids"]);
            let got = tandem_json(&["inspect", "score", "--model", model, "--ids", &ids]);
            let (g, w) = (got["score"].as_f64().unwrap(), case["score"].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-4, "{model} ids {ids}: score {g}, want {w}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no reward-model fixtures");
}

#[test]
fn text_input_is_the_tokenizers_ids() {
    let tok = read_json(&fixtures_hf().join("tokenizer-expected.json"));
    let texts = tok["texts"].as_array().unwrap();
    for (dir, expected) in checkpoints() {
        let model = dir.to_str().unwrap();
        let sub = if is_lm(&expected) { "logprobs" } else { "score" };
        for (text, ids) in texts.iter().zip(tok["ids"].as_array().unwrap()) {
            let text = text.as_str().unwrap();
            let by_text = tandem_json(&["inspect", sub, "--model", model, "--text", text]);
            assert_eq!(&by_text["input_ids"], ids, "{model}: ids of {text:?}");
            let mut by_ids = tandem_json(&["inspect", sub, "--model", model, "--ids", &ids_arg(ids)]);
            by_ids["input_ids"] = ids.clone();
            assert_eq!(by_text, by_ids, "{model}: {text:?}");
        }
    }
}

#[test]
fn generate_with_text_decodes_and_sampling_is_seeded() {
    let (dir, _) = checkpoints().into_iter().find(|(_, e)| is_lm(e)).unwrap();
    let model = dir.to_str().unwrap();
    let greedy = tandem_json(&[
        "inspect",
        "generate",
        "--model",
        model,
        "--text",
        "the movie was",
        "--max-new-tokens",
        "5",
        "--greedy",
    ]);
    assert_eq!(greedy["new_ids"].as_array().unwrap().len(), 5);
    assert!(greedy["text"].is_string(), "{greedy}");

    let sample = |seed: &str| {
        tandem_json(&[
            "inspect",
            "generate",
            "--model",
            model,
            "--ids",
            "1,2,3",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
    };
    let a = sample("7");
    assert_eq!(a, sample("7"), "same seed, same sample");
    let lps = f64s(&a["logprobs"]);
    let full = f64s(&a["full_logprobs"]);
    assert_eq!(lps.len(), 8);
    // Truncation moves mass onto kept tokens: log q >= untruncated log-prob.
    assert!(lps.iter().zip(&full).all(|(q, p)| q >= &(p - 1e-5)), "{a}");
}

/// Runs tandem expecting bad-input status 2 and a stderr message containing each of `needles`.
fn assert_bad_input(args: &[&str], needles: &[&str]) {
    let out = tandem(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "tandem {args:?}: status; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "tandem {args:?} panicked: {stderr}");
    assert!(stderr.contains("error"), "tandem {args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "tandem {args:?}: stderr lacks {n:?}: {stderr}");
    }
    assert!(out.stdout.is_empty(), "tandem {args:?} printed to stdout");
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let all = checkpoints();
    let lm = all
        .iter()
        .find(|(_, e)| is_lm(e))
        .unwrap()
        .0
        .to_str()
        .unwrap()
        .to_owned();
    let rm = all
        .iter()
        .find(|(_, e)| !is_lm(e))
        .unwrap()
        .0
        .to_str()
        .unwrap()
        .to_owned();
    let missing = fixtures_hf().join("no-such-model");
    let missing = missing.to_str().unwrap();

    assert_bad_input(
        &["inspect", "logprobs", "--model", missing, "--ids", "1,2"],
        &["no-such-model", "does not exist"],
    );
    assert_bad_input(
        &["inspect", "score", "--model", &lm, "--ids", "1,2"],
        &["language model", "score"],
    );
    assert_bad_input(
        &["inspect", "logprobs", "--model", &rm, "--ids", "1,2"],
        &["reward", "logprobs"],
    );
    assert_bad_input(
        &["inspect", "logprobs", "--model", &lm, "--ids", "1,x"],
        &["\"x\"", "--ids"],
    );
    assert_bad_input(
        &["inspect", "logprobs", "--model", &lm, "--ids", "1,99999999"],
        &["99999999", "vocabulary"],
    );
    assert_bad_input(&["inspect", "logprobs", "--model", &lm, "--ids", "5"], &["at least 2"]);
    assert_bad_input(
        &[
            "inspect",
            "generate",
            "--model",
            &lm,
            "--ids",
            "1",
            "--max-new-tokens",
            "100000",
        ],
        &["positions"],
    );
    assert_bad_input(
        &["inspect", "generate", "--model", &lm, "--ids", "1", "--top-p", "0"],
        &["top_p"],
    );
    assert_bad_input(
        &["inspect", "score", "--model", &rm, "--ids", "1", "--device", "cuda:0"],
        &["cuda"],
    );
    assert_bad_input(&["inspect", "score", "--model", &rm], &["--ids", "--text"]);
    // A directory that is not a checkpoint: the message names the missing file.
    assert_bad_input(
        &[
            "inspect",
            "score",
            "--model",
            fixtures_hf().to_str().unwrap(),
            "--ids",
            "1",
        ],
        &["config.json"],
    );
}
