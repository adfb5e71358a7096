//! Every config in configs/ runs end to end (CI-sized step counts) and learns (the cluster
//! config with its worker processes, in tests/cluster_cli.rs).
//!
//! Margins: the positive-words reward is the fraction of positive words in a 12-token response,
//! about 0.12 for the untrained policy; one step's batch mean has a standard error near
//! sqrt(0.12 * 0.88 / (32 * 12)) ≈ 0.017, so a quarter of the steps averages to ≈ 0.006 and a
//! rise of 0.05 is far outside noise. The reward-model scores of the fixture reward model vary
//! by about 1 between responses, so one step's mean of 32 has a standard error near 0.18 and a
//! quarter of 100 steps near 0.036; the required rise of 0.25 is five standard errors of the
//! difference.

mod common;

use common::*;
use tandem_actors::Advantage;
use tandem_runtime::config::RewardKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_config_learns() {
    let mut names: Vec<String> = std::fs::read_dir(configs_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        // Runs labelling, reward-model training and PPO; tests/mock_labeller.rs runs it and
        // checks the true score.
        .filter(|n| n != "mock_labeller.toml")
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for name in names {
        let cfg = load(&name, &[]);
        if cfg.cluster.is_some() {
            // Needs worker processes: tests/cluster_cli.rs runs it with two `tandem node`s.
            println!("{name}: run by tests/cluster_cli.rs");
            continue;
        }
        // The shipped step counts are CI-sized already (each config finishes in under a minute).
        let dir = tempfile::tempdir().unwrap();
        let s = run_in(&cfg, dir.path()).await;
        let r = &s.reports;
        assert_eq!(r.len() as u64, cfg.steps, "{name}");
        let (first, last) = first_last(r, |x| x.stats.reward_mean);
        let margin = match cfg.reward.kind {
            RewardKind::RewardModel => 0.25,
            // Rule rewards score in [0, 1] like the positive-words fraction.
            _ => 0.05,
        };
        println!("{name}: reward first quarter {first:.3}, last quarter {last:.3}");
        assert!(
            last > first + margin,
            "{name}: reward {first:.3} -> {last:.3}, want a rise > {margin}"
        );
        for x in r {
            assert!(
                x.stats.kl.is_finite() && x.stats.policy_loss.is_finite(),
                "{name} step {}: {x:?}",
                x.step
            );
            assert!(
                x.staleness_max <= cfg.mode.max_lag(),
                "{name} step {}: staleness {}",
                x.step,
                x.staleness_max
            );
        }
        if let tandem_models::rl::KlControllerConfig::Adaptive { target, .. } = cfg.algorithm.kl {
            let kl = mean(r[r.len() / 2..].iter().map(|x| x.stats.kl));
            assert!(kl < 3.0 * target, "{name}: KL {kl:.2} far above target {target}");
        }
        if cfg.algorithm.advantage == Advantage::Gae {
            assert!(dir.path().join("critic/model.safetensors").is_file());
        }
        // The run directory: resolved config, one metrics line per step, the trained policy.
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count() as u64, cfg.steps);
        // Every field of the schema is written, and the line reads back as the step's report.
        let first_line: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        let schema = serde_json::to_value(tandem_actors::StepReport::default()).unwrap();
        for key in schema.as_object().unwrap().keys() {
            assert!(first_line.get(key).is_some(), "{name}: metrics.jsonl lacks {key}");
        }
        // Through the same text form and parser on both sides (serde_json's parser may land one
        // ulp from the written number).
        let read = |line: &str| tandem_actors::StepReport::from_line(line).unwrap();
        let (line, report) = (
            read(lines.lines().next().unwrap()),
            read(&serde_json::to_string(&r[0]).unwrap()),
        );
        assert_eq!((line.step, &line.stats), (report.step, &report.stats), "{name}");
        assert!(dir.path().join("config.toml").is_file());
        tandem_models::LanguageModel::load(&dir.path().join("policy"), &candle_core::Device::Cpu).unwrap();
    }
}
