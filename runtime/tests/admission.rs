//! Admission of stale data: dropping at the staleness bound does not favour short responses,
//! and no staleness setting deadlocks, whatever the number of samplers, with a slow learner.

mod common;

use std::time::Duration;

use common::load;
use proptest::prelude::*;
use tandem_runtime::store::{read_store, store_dir, ReadMode, Record};
use tandem_runtime::{run, RunOptions};

/// Mean and sample variance.
fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (m, xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_stale_data_keeps_the_length_distribution() {
    // Twenty stop tokens out of ~110 words end a response after ~5 tokens on average, so
    // lengths spread over 1..=12. The policy does not learn (lr 0), so every step samples the
    // same length distribution. The learner is slow, so samplers run the whole bound ahead,
    // and every fourth generation batch is a straggler held 1.5 s: the learner goes on with
    // the other sampler's batches, and the straggler arrives too stale and is dropped.
    let stops: Vec<String> = (2..22).map(|i| i.to_string()).collect();
    let cfg = load(
        "quickstart.toml",
        &[
            "steps=14",
            "mode.max_staleness=1",
            "placement.rollouts_per_device=2",
            &format!("sampling.stop_tokens=[{}]", stops.join(",")),
            "algorithm.ppo_epochs=1",
            "algorithm.policy_lr=0.0",
            "algorithm.critic_lr=0.0",
            "faults.rollout_stall_every=4",
            "faults.rollout_stall_s=1.5",
            "checkpoint.every=100",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let s = tokio::time::timeout(
        Duration::from_secs(600),
        run(
            &cfg,
            RunOptions {
                run_dir: dir.path().into(),
                learner_delay: Duration::from_millis(200),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("the run hung")
    .unwrap();
    assert_eq!(s.reports.len(), 14);

    let (mut used, mut dropped, mut sampled) = (vec![], vec![], vec![]);
    for (_, _, r) in read_store(&store_dir(dir.path()), ReadMode::Strict).unwrap().records {
        let Record::Trajectory(t) = r;
        let len = t.response_ids.len() as f64;
        sampled.push(len);
        if t.outcome.used() {
            used.push(len);
        } else {
            dropped.push(len);
        }
    }
    assert_eq!(used.len(), 14 * cfg.batch_size());
    assert!(
        dropped.len() >= 16,
        "only {} trajectories were dropped: the test needs drops",
        dropped.len()
    );
    let (lo, hi) = (
        sampled.iter().cloned().fold(f64::INFINITY, f64::min),
        sampled.iter().cloned().fold(0.0, f64::max),
    );
    assert!(hi - lo >= 8.0, "lengths span only {lo}..={hi}");

    // Trained and dropped are disjoint parts of sampled, so compare the two (independent
    // samples of one distribution when admission ignores length): the difference of their
    // means has standard error sd * sqrt(1/n_trained + 1/n_dropped). Allow 4 of them (a false
    // alarm about once in 16 000 runs); a buffer that served short responses first would
    // drop the longest of each batch and miss by several tokens.
    let (nu, nd) = (used.len() as f64, dropped.len() as f64);
    let (mu, vu) = mean_var(&used);
    let (md, vd) = mean_var(&dropped);
    let (ms, _) = mean_var(&sampled);
    let se = (vu / nu + vd / nd).sqrt();
    eprintln!(
        "lengths: {nu} trained (mean {mu:.2}), {nd} dropped (mean {md:.2}), {} sampled (mean {ms:.2})",
        sampled.len()
    );
    assert!(
        (mu - md).abs() <= 4.0 * se,
        "mean length: trained {mu:.2}, dropped {md:.2}, sampled {ms:.2} (4 se = {:.2})",
        4.0 * se
    );
    // The same for the histogram, bin by bin (short 1-3, middle 4-8, long 9-12 tokens):
    // binomial standard errors of the two fractions.
    for (a, b) in [(1.0, 3.0), (4.0, 8.0), (9.0, 12.0)] {
        let frac = |xs: &[f64]| xs.iter().filter(|&&x| x >= a && x <= b).count() as f64 / xs.len() as f64;
        let (fu, fd, fs) = (frac(&used), frac(&dropped), frac(&sampled));
        let se = (fs * (1.0 - fs) * (1.0 / nu + 1.0 / nd)).sqrt();
        assert!(
            (fu - fd).abs() <= 4.0 * se.max(1e-3),
            "lengths {a}-{b}: {fu:.3} of trained, {fd:.3} of dropped, {fs:.3} of sampled (4 se = {:.3})",
            4.0 * se
        );
    }
}

proptest! {
    // Each case is a whole (tiny) run: few cases, and no shrinking runs beyond them.
    #![proptest_config(ProptestConfig {
        cases: 8,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_staleness_setting_deadlocks_with_a_slow_learner(
        staleness in 0u64..=4,
        samplers in 1usize..=4,
        publish_every in 1u64..=2,
        inflight in any::<bool>(),
        stale in prop::sample::select(vec!["drop", "mask", "train"]),
        delay_ms in 0u64..=150,
    ) {
        let cfg = load(
            "quickstart.toml",
            &[
                "steps=4",
                "data.prompts_per_step=8",
                "data.prompts_per_ticket=4",
                "sampling.max_new_tokens=6",
                "algorithm.ppo_epochs=1",
                "algorithm.minibatch_size=8",
                "channels.rollout_to_reward=1",
                "channels.reward_to_value=1",
                "channels.value_to_replay=1",
                &format!("mode.max_staleness={staleness}"),
                &format!("mode.publish_every={publish_every}"),
                &format!("mode.inflight_updates={inflight}"),
                &format!("mode.stale=\"{stale}\""),
                &format!("placement.rollouts_per_device={samplers}"),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let summary = rt.block_on(async {
            let opts = RunOptions {
                run_dir: dir.path().into(),
                learner_delay: Duration::from_millis(delay_ms),
                ..Default::default()
            };
            tokio::time::timeout(Duration::from_secs(120), run(&cfg, opts)).await
        });
        let summary = summary
            .unwrap_or_else(|_| panic!("deadlock: staleness {staleness}, {samplers} samplers"))
            .unwrap();
        prop_assert_eq!(summary.reports.len(), 4);
        for r in &summary.reports {
            prop_assert!(r.staleness_max <= cfg.mode.max_lag() || stale != "drop");
        }
    }
}
