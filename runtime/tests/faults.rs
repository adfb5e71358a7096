//! Fault tolerance on real runs: restarted actors lose no prompts, too many failures stop the
//! run with a checkpoint, a failed learner's batch is kept, non-finite steps are skipped and
//! then stop the run, and malformed prompt lines can be skipped and counted.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{load, run_in};
use tandem_runtime::checkpoint;
use tandem_runtime::store::{read_store, store_dir, ReadMode, Record};
use tandem_runtime::{run, RunOptions};

fn options(dir: &Path, resume: bool) -> RunOptions {
    RunOptions {
        run_dir: dir.into(),
        resume,
        ..Default::default()
    }
}

/// (ticket, row) of every stored trajectory, counted.
fn stored_rows(run_dir: &Path) -> BTreeMap<(u64, u32), usize> {
    let mut out = BTreeMap::new();
    for (_, _, r) in read_store(&store_dir(run_dir), ReadMode::Strict).unwrap().records {
        let Record::Trajectory(t) = r;
        *out.entry((t.ticket, t.row)).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_actor_panics_lose_no_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        "quickstart.toml",
        &[
            "steps=10",
            "checkpoints.every=100",
            "faults.rollout_panic_every=7",
            "faults.reward_panic_every=9",
            "faults.value_panic_every=11",
            "supervision.max_restarts=20",
            "supervision.backoff_s=0.01",
        ],
    );
    let s = run_in(&cfg, dir.path()).await;
    assert_eq!(s.reports.len(), 10);
    // 10 steps x 2 tickets, plus what ran ahead: at least 3 rollout, 2 reward and 1 value failure.
    assert!(s.restarts >= 6, "restarts {}", s.restarts);

    // Every ticket below the final checkpoint's watermark is accounted for exactly once: its
    // rows are stored (used or dropped as stale) or held in the checkpoint's replay buffer.
    let (last, ckdir) = checkpoint::list(dir.path()).unwrap().pop().unwrap();
    assert_eq!(last, 10);
    let ck = checkpoint::read(&ckdir, &candle_core::Device::Cpu).unwrap();
    let mut rows = stored_rows(dir.path());
    for t in &ck.replay {
        *rows.entry((t.ticket, t.row)).or_insert(0) += 1;
    }
    assert!(rows.values().all(|&n| n == 1), "a trajectory was stored twice");
    let per_ticket = (cfg.data.prompts_per_ticket * cfg.data.samples_per_prompt) as u32;
    let w = ck.meta.tickets.below;
    assert!(ck.meta.tickets.above.is_empty());
    for ticket in 0..w {
        for row in 0..per_ticket {
            assert!(rows.contains_key(&(ticket, row)), "ticket {ticket} row {row} was lost");
        }
    }
    assert_eq!(
        rows.len() as u64,
        w * per_ticket as u64,
        "only accounted tickets are stored"
    );
    let dropped: u64 = s.reports.last().unwrap().dropped_stale;
    let used = 10 * cfg.batch_size() as u64;
    assert_eq!(rows.len() as u64, used + dropped + ck.replay.len() as u64);
    // The feeder issued those tickets plus at most the in-flight window.
    assert!(s.tickets_issued >= w, "issued {} < accounted {w}", s.tickets_issued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_stop_the_run_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        "sync.toml",
        &[
            "steps=10",
            "checkpoints.every=100",
            "faults.rollout_panic_every=1",
            "supervision.max_restarts=2",
            "supervision.backoff_s=0.01",
        ],
    );
    let e = run(&cfg, options(dir.path(), false)).await.unwrap_err().to_string();
    assert!(e.contains("rollout/cpu:0/0"), "{e}");
    assert!(e.contains("injected fault: rollout batch"), "{e}");
    assert!(
        e.contains("3 actor failures within 60 s exceed supervision.max_restarts = 2"),
        "{e}"
    );
    assert!(e.contains("latest checkpoint:") && e.contains("step-0"), "{e}");
    assert_eq!(checkpoint::list(dir.path()).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_learner_keeps_its_batch_and_the_resumed_run_matches_an_uninterrupted_one() {
    let whole = tempfile::tempdir().unwrap();
    let base = ["steps=6", "checkpoints.every=100"];
    let reference = run_in(&load("sync.toml", &base), whole.path()).await;

    let dir = tempfile::tempdir().unwrap();
    let failing = load("sync.toml", &[base[0], base[1], "faults.learner_fail_at_step=3"]);
    let e = run(&failing, options(dir.path(), false)).await.unwrap_err().to_string();
    assert!(e.contains("injected fault: learner failure at step 3"), "{e}");
    assert!(e.contains("checkpoint written"), "{e}");
    let (k, ckdir) = checkpoint::list(dir.path()).unwrap().pop().unwrap();
    assert_eq!(k, 3);
    let ck = checkpoint::read(&ckdir, &candle_core::Device::Cpu).unwrap();
    // The batch the learner held when it failed is in the checkpoint.
    assert!(ck.replay.len() >= failing.batch_size(), "{}", ck.replay.len());
    assert!(ck.replay.iter().any(|t| t.policy_version == 3));

    let resumed = run(&load("sync.toml", &base), options(dir.path(), true)).await.unwrap();
    assert_eq!(resumed.resumed_from, Some(3));
    assert_eq!(resumed.reports.first().unwrap().step, 3);
    for (a, b) in reference.reports[3..].iter().zip(&resumed.reports) {
        assert_eq!((a.step, a.policy_version), (b.step, b.policy_version));
        assert_eq!(a.stats, b.stats, "step {}", a.step);
    }
    let weights = |d: &Path| std::fs::read(d.join("policy/model.safetensors")).unwrap();
    assert!(weights(whole.path()) == weights(dir.path()), "final weights differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_steps_are_skipped_then_stop_the_run_keeping_the_checkpoint_before_them() {
    // One bad step: its updates are skipped and counted, and the run goes on.
    let dir = tempfile::tempdir().unwrap();
    let s = run_in(
        &load("sync.toml", &["steps=5", "faults.nonfinite_loss_steps=[2]"]),
        dir.path(),
    )
    .await;
    let r = &s.reports;
    let updates_per_step = 4 * 2; // ppo_epochs x minibatches in configs/sync.toml
    assert_eq!(r[2].stats.skipped_updates, updates_per_step);
    assert_eq!((r[2].nonfinite_streak, r[3].nonfinite_streak), (1, 0));
    assert!(r
        .iter()
        .all(|x| x.stats.beta.is_finite() && x.stats.policy_loss.is_finite()));

    // Three in a row: the run stops after the third, and no checkpoint is taken meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        "sync.toml",
        &[
            "steps=10",
            "checkpoints.every=2",
            "faults.nonfinite_loss_steps=[3, 4, 5]",
        ],
    );
    let e = run(&cfg, options(dir.path(), false)).await.unwrap_err().to_string();
    assert!(
        e.contains("3 learner steps in a row (steps 3..=5) had a non-finite loss or gradient"),
        "{e}"
    );
    assert!(e.contains("the last checkpoint before them is step-2"), "{e}");
    let kept: Vec<u64> = checkpoint::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kept, vec![0, 2]);
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_prompt_lines_can_be_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(common::configs_dir().join("data/prompts.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(3, "{\"prompt\": unquoted}");
    lines.insert(10, "[1, 2]");
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let p = format!("data.prompts=\"{}\"", prompts.display());
    let cfg = load("sync.toml", &["steps=2", &p, "data.on_bad_line=\"skip\""]);
    let s = run_in(&cfg, &dir.path().join("run")).await;
    assert_eq!((s.prompts_skipped, s.reports.len()), (2, 2));

    let strict = load("sync.toml", &["steps=2", &p]);
    let e = run(&strict, options(&dir.path().join("run2"), false))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompts.jsonl:4: malformed JSON"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_directories_are_not_reused_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load("grpo.toml", &["steps=2"]);
    let e = run(&cfg, options(dir.path(), true)).await.unwrap_err().to_string();
    assert!(e.contains("no complete checkpoint to resume from"), "{e}");
    run_in(&cfg, dir.path()).await;
    let e = run(&cfg, options(dir.path(), false)).await.unwrap_err().to_string();
    assert!(e.contains("holds another run"), "{e}");
    let e = run(&cfg, options(dir.path(), true)).await.unwrap_err().to_string();
    assert!(e.contains("nothing to resume (raise it with --set steps=N)"), "{e}");
}

#[test]
fn a_resumed_run_does_not_inject_the_interrupted_runs_faults_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        "sync.toml",
        &["faults.learner_fail_at_step=3", "faults.rollout_panic_every=7"],
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let resumed = tandem_runtime::Config::load_run(&path, &[]).unwrap();
    assert!(resumed.faults.is_empty(), "{:?}", resumed.faults);
    assert_eq!(resumed.steps, cfg.steps);
    // Faults named on the command line are injected.
    let again = tandem_runtime::Config::load_run(&path, &["faults.rollout_panic_every=5".into()]).unwrap();
    assert_eq!(again.faults.rollout_panic_every, 5);
}
