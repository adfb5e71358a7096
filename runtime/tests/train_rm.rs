//! Reward models learn a synthetic preference (more positive words is better) through the
//! runtime's train-rm path: pairwise, HH-RLHF form, ranked (K choose 2) and best-of-K.
//!
//! The data: prompts from a few templates; responses of 8 words from the built-in vocabulary,
//! each positive with probability 0.3, so comparisons differ in their positive-word counts
//! (ties are never generated). A random-initialised built-in GPT-2 (2 layers, width 64) must
//! reach at least 90% held-out pairwise accuracy; guessing gives 50%.

use std::io::Write;
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_runtime::train_rm::{train_rm, NormalizeKind, RmConfig};

const PLAIN: &[&str] = &[
    "the", "movie", "was", "very", "really", "just", "story", "plot", "acting", "film", "it", "and", "bad", "dull",
    "boring", "sad",
];
const POSITIVE: &[&str] = &["good", "great", "wonderful", "happy", "love", "best", "nice", "fun"];
const PROMPTS: &[&str] = &["the movie was", "this film is", "the story", "i think the acting was"];

fn response(rng: &mut StdRng) -> (String, usize) {
    let mut n = 0;
    let words: Vec<&str> = (0..8)
        .map(|_| {
            if rng.random_bool(0.3) {
                n += 1;
                POSITIVE[rng.random_range(0..POSITIVE.len())]
            } else {
                PLAIN[rng.random_range(0..PLAIN.len())]
            }
        })
        .collect();
    (words.join(" "), n)
}

/// `k` responses with distinct positive counts, best first.
fn ranked(rng: &mut StdRng, k: usize) -> (String, Vec<(String, usize)>) {
    let prompt = PROMPTS[rng.random_range(0..PROMPTS.len())].to_string();
    loop {
        let rs: Vec<(String, usize)> = (0..k).map(|_| response(rng)).collect();
        let mut counts: Vec<usize> = rs.iter().map(|r| r.1).collect();
        counts.sort_unstable();
        counts.dedup();
        if counts.len() == k {
            return (prompt, rs);
        }
    }
}

#[derive(Clone, Copy)]
enum Form {
    Pairwise,
    Hh,
    Ranked(usize),
}

fn write_data(path: &Path, n: usize, form: Form, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap();
    for _ in 0..n {
        let line = match form {
            Form::Pairwise | Form::Hh => {
                let (p, rs) = ranked(&mut rng, 2);
                let (c, r) = if rs[0].1 > rs[1].1 {
                    (&rs[0].0, &rs[1].0)
                } else {
                    (&rs[1].0, &rs[0].0)
                };
                match form {
                    Form::Pairwise => serde_json::json!({"prompt": p, "chosen": c, "rejected": r}),
                    // The prompt is recovered as the common prefix (it may absorb shared first words).
                    _ => serde_json::json!({"chosen": format!("{p} {c}"), "rejected": format!("{p} {r}")}),
                }
            }
            Form::Ranked(k) => {
                let (p, rs) = ranked(&mut rng, k);
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(rs[i].1));
                let texts: Vec<&String> = rs.iter().map(|r| &r.0).collect();
                serde_json::json!({"prompt": p, "responses": texts, "ranking": order})
            }
        };
        writeln!(f, "{line}").unwrap();
    }
}

fn config(dir: &Path, form: Form, loss: &str, extra: &str) -> RmConfig {
    write_data(&dir.join("train.jsonl"), 640, form, 1);
    write_data(&dir.join("eval.jsonl"), 200, form, 2);
    let text = format!(
        r#"
seed = 3
[model.builtin]
arch = "gpt2"
hidden = 64
layers = 2
heads = 4
[data]
train = "train.jsonl"
eval = "eval.jsonl"
prompt_max_tokens = 8
response_max_tokens = 10
[train]
loss = "{loss}"
epochs = 2
batch_size = 32
lr = 3e-3
warmup_steps = 4
eval_every = 20
{extra}
"#
    );
    let path = dir.join("rm.toml");
    std::fs::write(&path, text).unwrap();
    RmConfig::load(&path, &[]).unwrap()
}

/// Trains and checks; returns the summary and the directory holding the run.
async fn check(form: Form, loss: &str, extra: &str) -> (tandem_runtime::train_rm::RmSummary, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), form, loss, extra);
    let run = dir.path().join("run");
    let t = std::time::Instant::now();
    let s = train_rm(&cfg, &run).await.unwrap();
    let acc = s.eval_accuracy.unwrap();
    let first = s.reports.iter().find_map(|r| r.eval_accuracy).unwrap();
    println!(
        "{loss}: {} steps in {:.1} s, held-out accuracy {first:.3} at the first eval -> {acc:.3}",
        s.reports.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(acc >= 0.9, "{loss}: held-out accuracy {acc:.3}");
    // One metrics line per step (2 epochs of 20 batches), evaluations every 20 steps.
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 40);
    let evals = lines.lines().filter(|l| l.contains("\"eval_accuracy\"")).count();
    assert_eq!(evals, 2);
    assert!(run.join("config.toml").is_file());
    // HF sequence-classification layout, loadable as a scalar model with the tokenizer.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architectures"][0], "GPT2ForSequenceClassification");
    assert!(s.model_dir.join("tokenizer.json").is_file());
    tandem_models::ScalarModel::load(&s.model_dir, &candle_core::Device::Cpu).unwrap();
    (s, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairwise_reward_model_learns_the_preference() {
    let (s, _dir) = check(
        Form::Pairwise,
        "bradley_terry",
        "[normalize]\nkind = \"reference_bias\"\n[checkpoints]\nevery = 15\nkeep = 1",
    )
    .await;
    // Normalised on the held-out responses: mean 0 exactly (up to f32), spread unchanged.
    let n = s.normalization.unwrap();
    assert_eq!(n.kind, NormalizeKind::ReferenceBias);
    assert!(n.mean_after.abs() < 1e-3, "{n:?}");
    assert!(
        (n.std_after - n.std_before).abs() < 1e-3 * n.std_before.max(1.0),
        "{n:?}"
    );
    // Checkpoints after steps 15 and 30 (the final model is the run's output); the last is kept.
    let ck: Vec<String> = std::fs::read_dir(s.model_dir.parent().unwrap().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ck, vec!["step-30".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hh_form_reward_model_learns_the_preference() {
    let (s, _dir) = check(Form::Hh, "bradley_terry", "[normalize]\nkind = \"gain_bias\"").await;
    let n = s.normalization.unwrap();
    assert!(n.mean_after.abs() < 1e-3 && (n.std_after - 1.0).abs() < 1e-3, "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranked_k_choose_2_reward_model_learns_the_preference() {
    let (s, _dir) = check(Form::Ranked(4), "bradley_terry", "").await;
    assert!(s.normalization.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_k_reward_model_learns_the_preference() {
    let (s, _dir) = check(Form::Ranked(4), "best_of_k", "").await;
    let top1 = s.reports.iter().rev().find_map(|r| r.eval_top1).unwrap();
    println!("best_of_k: held-out top-1 {top1:.3} (chance 0.25)");
    assert!(top1 >= 0.7, "top-1 {top1}");
}

#[tokio::test]
async fn a_bad_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Form::Pairwise, "bradley_terry", "");
    let mut text = std::fs::read_to_string(&cfg.data.train).unwrap();
    text.push_str("{\"prompt\": \"the movie\", \"chosen\": \"good\"}\n");
    std::fs::write(&cfg.data.train, text).unwrap();
    let e = train_rm(&cfg, &dir.path().join("run")).await.unwrap_err().to_string();
    assert!(e.contains("train.jsonl:641: expected {"), "{e}");
}
