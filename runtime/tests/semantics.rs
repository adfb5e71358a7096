//! Sync determinism, the staleness bound and back-pressure.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tandem_runtime::{run, RunOptions};

/// metrics.jsonl without the fields that measure time.
fn metrics_without_timings(dir: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            for k in [
                "generate_s",
                "reward_s",
                "value_s",
                "learn_s",
                "weight_sync_s",
                "learner_wait_s",
                "checkpoint_s",
                "adopt_latency_s",
                "wall_s",
            ] {
                assert!(
                    m.remove(k).is_some() || k == "adopt_latency_s" || k == "checkpoint_s",
                    "missing {k}"
                );
            }
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_are_deterministic() {
    // Two rollout actors on different devices race for tickets; the metrics must not care.
    let cfg = load(
        "sync.toml",
        &[
            "steps=6",
            "placement.rollout_devices=[\"cpu:0\", \"cpu:2\"]",
            "placement.rollouts_per_device=2",
        ],
    );
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ra = run_in(&cfg, a.path()).await;
    run_in(&cfg, b.path()).await;
    let (ma, mb) = (metrics_without_timings(a.path()), metrics_without_timings(b.path()));
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb);
    assert!(ra.reports.iter().all(|r| r.staleness_max == 0 && r.dropped_stale == 0));
    // The trained weights are identical too.
    let wa = std::fs::read(a.path().join("policy/model.safetensors")).unwrap();
    let wb = std::fs::read(b.path().join("policy/model.safetensors")).unwrap();
    assert!(wa == wb, "sync runs trained different weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_trajectory_is_staler_than_the_bound() {
    for s in [1u64, 2] {
        let cfg = load(
            "quickstart.toml",
            &[
                "steps=8",
                &format!("mode.max_staleness={s}"),
                "placement.rollouts_per_device=2",
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let r = run_in(&cfg, dir.path()).await;
        for x in &r.reports {
            assert!(
                x.staleness_max <= s,
                "max_staleness {s}: step {} used staleness {}",
                x.step,
                x.staleness_max
            );
        }
        // Samplers do run ahead: some trajectory was produced by an older policy.
        assert!(
            r.reports.iter().any(|x| x.staleness_max >= 1),
            "async mode never ran ahead"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_learner_bounds_memory_and_blocks_the_samplers() {
    // Samplers may run far ahead (staleness 100), so only the channels hold them back.
    let cfg = load(
        "quickstart.toml",
        &[
            "steps=5",
            "mode.max_staleness=100",
            "channels.rollout_to_reward=1",
            "channels.reward_to_value=1",
            "channels.value_to_replay=1",
            "channels.replay_capacity=32",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        &cfg,
        RunOptions {
            run_dir: dir.path().into(),
            learner_delay: Duration::from_millis(600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.reports.len(), 5);
    assert!(
        s.max_held <= s.held_bound,
        "held {} > bound {}",
        s.max_held,
        s.held_bound
    );
    assert!(
        s.max_held >= 32,
        "the buffer never filled ({}), the test did not exercise back-pressure",
        s.max_held
    );
    assert!(
        s.rollout_blocked_s > 0.5,
        "rollout actors blocked only {:.3}s",
        s.rollout_blocked_s
    );
    // The feeder is bounded too: it cannot have issued more than what the pipeline holds.
    let per_ticket = 16;
    assert!(
        s.tickets_issued as usize * per_ticket <= 5 * 32 + s.held_bound + 8 * per_ticket,
        "{} tickets",
        s.tickets_issued
    );
}

/// Runs `cfg` with a time limit (a hang is a failure, not a stuck test).
async fn run_within(cfg: &tandem_runtime::Config, dir: &std::path::Path) -> tandem_runtime::RunSummary {
    tokio::time::timeout(Duration::from_secs(300), run_in(cfg, dir))
        .await
        .expect("the run hung")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_every_2_finishes_and_reports_its_staleness_in_sync_mode() {
    let cfg = load("sync.toml", &["steps=5", "mode.publish_every=2"]);
    let dir = tempfile::tempdir().unwrap();
    let r = run_within(&cfg, dir.path()).await;
    assert_eq!(r.reports.len(), 5);
    for x in &r.reports {
        // Versions 0, 2, 4 are published: step k samples with version k - k % 2.
        let lag = x.step % 2;
        assert_eq!(x.policy_version, x.step);
        assert_eq!(
            (x.staleness_max, x.staleness_mean),
            (lag, lag as f64),
            "step {}",
            x.step
        );
        assert_eq!(x.stats.on_policy, lag == 0, "step {}", x.step);
        assert_eq!(x.dropped_stale, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_every_2_finishes_within_its_lag_in_async_mode() {
    let cfg = load(
        "quickstart.toml",
        &["steps=6", "mode.publish_every=2", "mode.max_staleness=1"],
    );
    assert_eq!(cfg.mode.max_lag(), 2);
    let dir = tempfile::tempdir().unwrap();
    let r = run_within(&cfg, dir.path()).await;
    assert_eq!(r.reports.len(), 6);
    for x in &r.reports {
        assert!(x.staleness_max <= 2, "step {}: staleness {}", x.step, x.staleness_max);
        assert_eq!(x.stats.on_policy, x.staleness_max == 0, "step {}", x.step);
        // Odd steps train a version that was never published: nothing sampled can be fresh.
        if x.step % 2 == 1 {
            assert!(x.staleness_mean >= 1.0, "step {}: {}", x.step, x.staleness_mean);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temperature_0_is_greedy_for_the_sampler_the_reference_and_the_learner() {
    let cfg = load("sync.toml", &["steps=1", "sampling.temperature=0"]);
    let dir = tempfile::tempdir().unwrap();
    let r = run_within(&cfg, dir.path()).await;
    let s = &r.reports[0].stats;
    // Step 0: policy = reference and the data is on-policy, so the KL is 0 and the first
    // minibatch's ratio 1 (later ones move a little with the updates).
    assert!(s.on_policy);
    assert!(s.kl.abs() < 1e-4, "kl {}", s.kl);
    assert!((s.ratio_mean - 1.0).abs() < 0.2, "ratio_mean {}", s.ratio_mean);
    assert!((s.reward_mean - s.score_mean).abs() < 1e-3, "{s:?}");
}
