//! The mock-labeller experiment (configs/mock_labeller.toml) end to end: labelling, reward-model
//! training on the runtime, PPO against the learned model; the programmatic ("true") score
//! recorded beside the learned one must rise.
//!
//! Margin: the true score is the fraction of positive words in 12 tokens, about 0.12 for the
//! untrained policy; a quarter of 40 steps (10 batches of 32) averages it with a standard
//! error near sqrt(0.12 * 0.88 / (320 * 12)) ≈ 0.005, so a rise of 0.05 is far outside noise.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_labeller_true_score_rises() {
    let cfg = load("mock_labeller.toml", &[]);
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let opts = tandem_runtime::RunOptions {
        run_dir: dir.path().into(),
        ..Default::default()
    };
    let s = tandem_runtime::mock_labeller::run(&cfg, opts).await.unwrap();
    assert_eq!(s.reports.len() as u64, cfg.steps);
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let rows: Vec<tandem_actors::StepReport> = lines
        .lines()
        .map(|l| tandem_actors::StepReport::from_line(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, cfg.steps);
    let truth: Vec<f64> = rows
        .iter()
        .map(|r| {
            r.true_score_mean
                .unwrap_or_else(|| panic!("step {}: no true score", r.step))
        })
        .collect();
    let learned: Vec<f64> = rows.iter().map(|r| r.stats.score_mean).collect();
    let q = truth.len() / 4;
    let m = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (t0, t1) = (m(&truth[..q]), m(&truth[truth.len() - q..]));
    let (l0, l1) = (m(&learned[..q]), m(&learned[learned.len() - q..]));
    let rm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("mock_labeller/summary.json")).unwrap()).unwrap();
    println!(
        "mock labeller in {:.1} s: reward model held-out accuracy {:.3}; true score {t0:.3} -> {t1:.3}, learned score {l0:.3} -> {l1:.3}",
        t.elapsed().as_secs_f64(),
        rm["eval_accuracy"]
    );
    assert!(rm["eval_accuracy"].as_f64().unwrap() >= 0.7, "{rm}");
    assert!(t1 > t0 + 0.05, "true score {t0:.3} -> {t1:.3}");
    assert!(l1 > l0, "learned score {l0:.3} -> {l1:.3}");
    // The learned model and its labels are in the run directory.
    for f in [
        "train.jsonl",
        "eval.jsonl",
        "reference.jsonl",
        "rm/metrics.jsonl",
        "rm/reward_model/config.json",
        "config.toml",
    ] {
        assert!(dir.path().join("mock_labeller").join(f).is_file(), "{f}");
    }
    let resolved = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    assert!(resolved.contains("kind = \"reward_model\""), "{resolved}");
}
