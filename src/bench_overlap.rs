//! `tandem bench overlap`: how much of the ideal overlap of generation and learning async mode
//! achieves, and what in-flight weight updates change.
//!
//! One PPO workload (the quickstart config, resized by default so both sides take similar
//! time) runs with the sampling side — rollout, reward and value — on `cpu:0` and the learner
//! on `cpu:1`, one thread each: first in sync mode (`max_staleness = 0`: generation of step
//! k+1 waits for the weights of step k), then in async mode with `max_staleness = 1`, then
//! async with in-flight updates (`mode.inflight_updates = true`: samplers adopt new weights
//! between decode steps).
//! The three runs repeat for `--rounds` rounds (default 3). Within a round, step time is the
//! median of the wall-clock time between consecutive learner steps after `--warmup` steps. `gen_s` and `learn_s` are the medians of the two sides' per-step busy
//! times (generate + reward + value seconds; learn + weight-sync seconds) in the sync run, and
//! `ideal_step_s = max(gen_s, learn_s)` is the step time of perfect overlap.
//!
//! Every figure is computed per round, and the report gives the median over the rounds of each
//! (so a ratio is the median of the rounds' ratios, each measured side by side), with the
//! rounds' own figures under `per_round`: a slow spell of a shared machine moves one round.
//!
//! The last line of stdout is one JSON object: sync_step_s, async_step_s, gen_s, learn_s,
//! ideal_step_s, async_over_ideal, speedup (= sync / async), ideal_speedup (= sync / ideal).
//! Two more fields tell why async falls short of the ideal when it does:
//! `async_learner_wait_s` (median time the learner waited for data in async mode: near zero
//! when the overlap works) and `contention` (the learner's busy time per step in async mode
//! over that in sync mode: above 1 when the two devices slow each other down, e.g. on
//! virtual CPUs that share a physical core).
//!
//! The in-flight column: `inflight_step_s`, `inflight_speedup` (= sync / in-flight step),
//! `inflight_over_async` (in-flight step over async step), and generation throughput, the
//! tokens sampled over the seconds spent generating them after the warm-up
//! (`async_gen_tokens_per_s`, `inflight_gen_tokens_per_s`, and their ratio
//! `inflight_gen_tokens_ratio`: below 1 when adopting weights mid-batch slows sampling).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tandem_actors::StepReport;
use tandem_runtime::{Config, RunOptions};

use crate::bench::median;
use crate::error::bad_input;

#[derive(Debug, Args)]
pub struct OverlapBench {
    /// The workload's config.
    #[arg(long, default_value = "configs/quickstart.toml")]
    config: PathBuf,
    /// Learner steps per mode.
    #[arg(long, default_value_t = 14)]
    steps: u64,
    /// Steps left out of the timing at the start of each run.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Rounds of the three runs (sync, async, in-flight); each figure is the median over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Extra config overrides, applied after the bench's own sizing.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// The bench's placement and sizing: sampling side on cpu:0, learner on cpu:1, one thread
/// each, and a workload where generating a step's data and learning on it take similar time
/// (about 10 and 14 ms here).
const SIZING: &[&str] = &[
    "placement.rollout_devices=[\"cpu:0\"]",
    "placement.rollouts_per_device=1",
    "placement.reward_device=\"cpu:0\"",
    "placement.value_device=\"cpu:0\"",
    "placement.learner_device=\"cpu:1\"",
    "placement.threads_per_device=1",
    "sampling.max_new_tokens=24",
    "algorithm.ppo_epochs=1",
    "algorithm.minibatch_size=32",
];

fn run_mode(args: &OverlapBench, staleness: u64, inflight: bool) -> anyhow::Result<Vec<StepReport>> {
    let mut sets: Vec<String> = SIZING.iter().map(|s| s.to_string()).collect();
    sets.push(format!("steps={}", args.steps));
    sets.push(format!("mode.max_staleness={staleness}"));
    sets.push(format!("mode.inflight_updates={inflight}"));
    sets.extend(args.set.iter().cloned());
    let cfg = Config::load(&args.config, &sets)?;
    let dir = std::env::temp_dir().join(format!(
        "tandem-bench-overlap-{}-{staleness}-{inflight}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let summary = crate::run::run_config(
        &cfg,
        RunOptions {
            run_dir: dir.clone(),
            ..Default::default()
        },
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(summary.reports)
}

fn step_time(r: &[StepReport], warmup: usize) -> f64 {
    median(r.windows(2).skip(warmup).map(|w| w[1].wall_s - w[0].wall_s).collect())
}

/// Tokens sampled over the seconds spent generating them, after `warmup` steps.
fn gen_tokens_per_s(r: &[StepReport], warmup: usize) -> f64 {
    let (tokens, secs) = r.iter().skip(warmup).fold((0.0, 0.0), |(t, s), x| {
        (t + x.tokens_generated as f64, s + x.generate_s)
    });
    tokens / secs
}

/// One round's figures, in the order they are printed.
fn round_figures(
    sync: &[StepReport],
    asyn: &[StepReport],
    inflight: &[StepReport],
    w: usize,
) -> Vec<(&'static str, f64)> {
    let gen_s = median(
        sync.iter()
            .skip(w)
            .map(|r| r.generate_s + r.reward_s + r.value_s)
            .collect(),
    );
    let learn_s = median(sync.iter().skip(w).map(|r| r.learn_s + r.weight_sync_s).collect());
    let (sync_step_s, async_step_s) = (step_time(sync, w), step_time(asyn, w));
    let ideal_step_s = gen_s.max(learn_s);
    let async_learn_s = median(asyn.iter().skip(w).map(|r| r.learn_s + r.weight_sync_s).collect());
    let async_learner_wait_s = median(asyn.iter().skip(w).map(|r| r.learner_wait_s).collect());
    let inflight_step_s = step_time(inflight, w);
    let (async_tps, inflight_tps) = (gen_tokens_per_s(asyn, w), gen_tokens_per_s(inflight, w));
    vec![
        ("sync_step_s", sync_step_s),
        ("async_step_s", async_step_s),
        ("gen_s", gen_s),
        ("learn_s", learn_s),
        ("ideal_step_s", ideal_step_s),
        ("async_over_ideal", async_step_s / ideal_step_s),
        ("speedup", sync_step_s / async_step_s),
        ("ideal_speedup", sync_step_s / ideal_step_s),
        ("async_learner_wait_s", async_learner_wait_s),
        ("contention", async_learn_s / learn_s),
        ("inflight_step_s", inflight_step_s),
        ("inflight_speedup", sync_step_s / inflight_step_s),
        ("inflight_over_async", inflight_step_s / async_step_s),
        ("async_gen_tokens_per_s", async_tps),
        ("inflight_gen_tokens_per_s", inflight_tps),
        ("inflight_gen_tokens_ratio", inflight_tps / async_tps),
    ]
}

pub fn run(args: &OverlapBench) -> anyhow::Result<()> {
    if args.steps as usize <= args.warmup + 2 {
        return bad_input!("--steps must exceed --warmup + 2");
    }
    if args.rounds == 0 {
        return bad_input!("--rounds must be at least 1");
    }
    let mut rounds = vec![];
    for _ in 0..args.rounds {
        let sync = run_mode(args, 0, false)?;
        let asyn = run_mode(args, 1, false)?;
        let inflight = run_mode(args, 1, true)?;
        rounds.push(round_figures(&sync, &asyn, &inflight, args.warmup));
    }
    // Every figure is the median of its per-round values: a round measures its modes minutes
    // apart at most, so a slow spell of a shared machine moves one round, not the result.
    let figures: Vec<(&str, f64)> = rounds[0]
        .iter()
        .enumerate()
        .map(|(i, &(k, _))| (k, median(rounds.iter().map(|r| r[i].1).collect())))
        .collect();
    let get = |k: &str| figures.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |(_, v)| *v);
    println!(
        "sync step {:.3}s, async step {:.3}s; generation side {:.3}s, learner {:.3}s per step (medians of {} round(s))",
        get("sync_step_s"),
        get("async_step_s"),
        get("gen_s"),
        get("learn_s"),
        rounds.len()
    );
    println!(
        "async over ideal {:.3}, contention {:.3}; in-flight step {:.3}s; generation {:.0} tokens/s in flight, {:.0} without",
        get("async_over_ideal"),
        get("contention"),
        get("inflight_step_s"),
        get("inflight_gen_tokens_per_s"),
        get("async_gen_tokens_per_s")
    );
    let object = |f: &[(&str, f64)]| -> serde_json::Map<String, serde_json::Value> {
        f.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()
    };
    let mut report = object(&figures);
    report.insert("rounds".into(), json!(rounds.len()));
    report.insert(
        "per_round".into(),
        json!(rounds.iter().map(|r| object(r)).collect::<Vec<_>>()),
    );
    crate::print_json(&serde_json::Value::Object(report))
}
