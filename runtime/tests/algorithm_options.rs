//! The algorithm options a config can switch on, end to end: PPO-ptx, the EMA of the policy,
//! running score normalisation, token-sum aggregation (Dr. GRPO) and weight decay.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptx_ema_running_normalisation_and_dr_grpo_run_from_a_config() {
    let pretrain = configs_dir().join("data/pretrain.jsonl");
    let cfg = load(
        "grpo.toml",
        &[
            "steps=3",
            "mode.max_staleness=0",
            &format!("data.pretrain=\"{}\"", pretrain.display()),
            "data.pretrain_rows=2",
            "algorithm.ptx_coef=2.0",
            "algorithm.ema_decay=0.5",
            "algorithm.weight_decay=0.01",
            "algorithm.grpo={ scale_by_std = false }",
            "algorithm.loss={ aggregation = \"token_sum\" }",
            "algorithm.reward={ normalize = \"running\" }",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let s = run_in(&cfg, dir.path()).await;
    assert_eq!(s.reports.len(), 3);
    for r in &s.reports {
        // Scores normalised by statistics that include the batch: near mean 0 for step 0.
        assert!(
            r.stats.ptx_logprob < 0.0 && r.stats.ptx_logprob.is_finite(),
            "{:?}",
            r.stats
        );
        assert!(r.stats.kl_loss >= 0.0, "{:?}", r.stats);
    }
    assert!(s.reports[0].stats.reward_mean.abs() < 1e-4, "{:?}", s.reports[0].stats);
    // The EMA sits beside the policy, loadable, and differs from it after training.
    let policy = tandem_models::load_tensors(
        &dir.path().join("policy"),
        &tandem_models::ModelConfig::from_dir(&dir.path().join("policy")).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ema_dir = dir.path().join("policy_ema");
    tandem_models::LanguageModel::load(&ema_dir, &candle_core::Device::Cpu).unwrap();
    let ema = tandem_models::load_tensors(
        &ema_dir,
        &tandem_models::ModelConfig::from_dir(&ema_dir).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let diff: f32 = policy
        .iter()
        .map(|(k, v)| {
            (v - &ema[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(diff > 0.0);
    // The metrics carry the new columns.
    let line = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in ["on_policy", "kl_loss", "behaviour_weight_mean", "ptx_logprob"] {
        assert!(first.get(key).is_some(), "metrics.jsonl lacks {key}");
    }
}
