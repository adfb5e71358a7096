//! `tandem bench staleness`: the off-policy correction ablation. One task and seed run in sync
//! mode, then in async mode at each staleness bound k (`--staleness`, default 1 and 4) with
//! each correction (`--corrections`):
//!
//! - `none`: stale tokens get no importance weight (`algorithm.loss.off_policy_correction =
//!   false`): trained as if the policy at the start of the step had sampled them;
//! - `tis`: truncated importance sampling, the weight `min(pi_prox / pi_behaviour, 2)` (the
//!   default `behaviour_weight_cap`);
//! - `decoupled`: decoupled PPO with the untruncated weight (`behaviour_weight_cap = inf`);
//!
//! each without and with in-flight weight updates (`mode.inflight_updates`; `--no-inflight`
//! leaves those out). The trust region is always taken around the policy at the start of the
//! learner step (see `tandem_models::rl::ppo`).
//!
//! The default task is the quickstart (a tiny GPT-2 learning positive words) for 20 steps at a
//! learning rate of 1e-2 with a small fixed KL penalty (beta 0.01): sync PPO nearly saturates
//! the score by then, and at k = 4 the uncorrected runs learn visibly slower than decoupled
//! PPO (the README gives the figures). The replay buffer is made large enough that samplers
//! do run k versions ahead. Each variant
//! runs with `--seeds` seeds (default 3; the config's seed and the next ones), each a run
//! directory `OUT/NAME/seed-S` (`NAME` = `sync`, `k4-tis`, `k4-none-inflight`, ...) with its
//! own `report.html`; `OUT/report.html` compares the variants' seed means. `--out` is the
//! bench's own: the variant directories it names are replaced.
//!
//! Printed: one table row per variant with the final reward, score and KL (means over the
//! last quarter of the steps and over the seeds), the mean token staleness, the stale samples
//! dropped and the wall time. The last line of stdout is one JSON object: `{"runs": [...],
//! "report": PATH}`.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::json;
use tandem_actors::StepReport;
use tandem_runtime::{Config, RunOptions};

use crate::error::bad_input;
use crate::report::comparison::{self, ComparedRun};

#[derive(Debug, Args)]
pub struct StalenessBench {
    /// The task's config.
    #[arg(long, default_value = "configs/quickstart.toml")]
    config: PathBuf,
    /// Learner steps per run.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Staleness bounds of the async runs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    staleness: Vec<u64>,
    /// Off-policy corrections of the async runs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "none,tis,decoupled")]
    corrections: Vec<Correction>,
    /// Leave out the runs with in-flight weight updates.
    #[arg(long)]
    no_inflight: bool,
    /// Seeds per variant (the config's seed, seed + 1, ...); the table and the curves are
    /// their means.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Where the run directories and the comparison report go.
    #[arg(long, default_value = "runs/bench-staleness")]
    out: PathBuf,
    /// Extra config overrides, applied after the bench's own (e.g. a smaller
    /// `data.prompts_per_step` for a quicker bench).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// How the learner corrects stale samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Correction {
    /// No importance weight.
    None,
    /// Truncated importance sampling (weight capped at 2).
    Tis,
    /// Decoupled PPO, untruncated weight.
    Decoupled,
}

impl Correction {
    fn name(self) -> &'static str {
        match self {
            Correction::None => "none",
            Correction::Tis => "tis",
            Correction::Decoupled => "decoupled",
        }
    }

    fn overrides(self) -> &'static [&'static str] {
        match self {
            Correction::None => &["algorithm.loss.off_policy_correction=false"],
            Correction::Tis => &["algorithm.loss.behaviour_weight_cap=2.0"],
            Correction::Decoupled => &["algorithm.loss.behaviour_weight_cap=inf"],
        }
    }
}

/// The bench's sizing: a learning rate and a small fixed KL penalty at which uncorrected
/// stale data visibly slows learning, a replay buffer that lets samplers run the whole bound
/// ahead, checkpoints only at the end.
const SIZING: &[&str] = &[
    "algorithm.policy_lr=1e-2",
    "algorithm.kl={ kind = \"fixed\", beta = 0.01 }",
    "channels.replay_capacity=512",
    "checkpoint.every=0",
    "metrics.addr=\"127.0.0.1:0\"",
];

/// One run of the ablation.
struct Variant {
    name: String,
    staleness: u64,
    correction: Option<Correction>,
    inflight: bool,
}

impl Variant {
    fn list(args: &StalenessBench) -> Vec<Variant> {
        let mut out = vec![Variant {
            name: "sync".into(),
            staleness: 0,
            correction: None,
            inflight: false,
        }];
        let inflight: &[bool] = if args.no_inflight { &[false] } else { &[false, true] };
        for &k in &args.staleness {
            for &c in &args.corrections {
                for &f in inflight {
                    out.push(Variant {
                        name: format!("k{k}-{}{}", c.name(), if f { "-inflight" } else { "" }),
                        staleness: k,
                        correction: Some(c),
                        inflight: f,
                    });
                }
            }
        }
        out
    }

    fn overrides(&self, args: &StalenessBench, seed: u64) -> Vec<String> {
        let mut sets: Vec<String> = SIZING.iter().map(|s| s.to_string()).collect();
        sets.push(format!("steps={}", args.steps));
        sets.push(format!("mode.max_staleness={}", self.staleness));
        sets.push(format!("mode.inflight_updates={}", self.inflight));
        if let Some(c) = self.correction {
            sets.extend(c.overrides().iter().map(|s| s.to_string()));
        }
        sets.extend(args.set.iter().cloned());
        // After --set, which may name the first seed.
        sets.push(format!("seed={seed}"));
        sets
    }
}

/// The per-step mean over seeds of what the bench reports (the curves of one variant);
/// steps that not every seed reached are left out.
fn seed_mean(runs: &[Vec<StepReport>]) -> Vec<StepReport> {
    let steps = runs.iter().map(Vec::len).min().unwrap_or(0);
    let n = runs.len().max(1) as f64;
    (0..steps)
        .map(|i| {
            let mean = |f: fn(&StepReport) -> f64| runs.iter().map(|r| f(&r[i])).sum::<f64>() / n;
            let mut m = StepReport {
                step: runs[0][i].step,
                wall_s: mean(|r| r.wall_s),
                dropped_stale: runs.iter().map(|r| r[i].dropped_stale).sum::<u64>() / runs.len() as u64,
                ..StepReport::default()
            };
            m.stats.reward_mean = mean(|r| r.stats.reward_mean);
            m.stats.score_mean = mean(|r| r.stats.score_mean);
            m.stats.kl = mean(|r| r.stats.kl);
            m.stats.behaviour_mismatch_kl = mean(|r| r.stats.behaviour_mismatch_kl);
            m.token_staleness.token_staleness_mean = mean(|r| r.token_staleness.token_staleness_mean);
            m
        })
        .collect()
}

/// A run's final numbers: means over the last quarter of its steps.
struct Outcome {
    reward: f64,
    score: f64,
    kl: f64,
    token_staleness: f64,
    dropped: u64,
    wall_s: f64,
}

impl Outcome {
    fn of(r: &[StepReport]) -> Outcome {
        let q = (r.len() / 4).max(1);
        let tail = &r[r.len().saturating_sub(q)..];
        let mean =
            |f: fn(&StepReport) -> f64, rows: &[StepReport]| rows.iter().map(f).sum::<f64>() / rows.len().max(1) as f64;
        Outcome {
            reward: mean(|x| x.stats.reward_mean, tail),
            score: mean(|x| x.stats.score_mean, tail),
            kl: mean(|x| x.stats.kl, tail),
            token_staleness: mean(|x| x.token_staleness.token_staleness_mean, r),
            dropped: r.last().map_or(0, |x| x.dropped_stale),
            wall_s: r.last().map_or(f64::NAN, |x| x.wall_s),
        }
    }
}

pub fn run(args: &StalenessBench) -> anyhow::Result<()> {
    if args.steps == 0 || args.seeds == 0 {
        return bad_input!("--steps and --seeds must be at least 1");
    }
    if args.staleness.contains(&0) {
        return bad_input!("--staleness: the async bounds must be at least 1 (sync runs anyway)");
    }
    std::fs::create_dir_all(&args.out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.out.display()))?;
    let variants = Variant::list(args);
    let mut results: Vec<(Variant, Vec<StepReport>)> = vec![];
    let first_seed = Config::load(&args.config, &args.set)?.seed;
    for v in variants {
        let dir = args.out.join(&v.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot replace {}: {e}", dir.display()))?;
        }
        let mut per_seed = vec![];
        for seed in first_seed..first_seed + args.seeds {
            let cfg = Config::load(&args.config, &v.overrides(args, seed))?;
            let run_dir = dir.join(format!("seed-{seed}"));
            eprintln!("bench staleness: {} seed {seed} ({} steps)", v.name, args.steps);
            let summary = crate::run::run_config(
                &cfg,
                RunOptions {
                    run_dir: run_dir.clone(),
                    ..Default::default()
                },
            )?;
            crate::report::write(&run_dir, &run_dir.join("report.html"))?;
            per_seed.push(summary.reports);
        }
        results.push((v, seed_mean(&per_seed)));
    }

    let header = [
        "run",
        "staleness",
        "correction",
        "in-flight",
        "final reward",
        "final score",
        "final KL",
        "token staleness",
        "dropped",
        "wall s",
    ];
    let mut rows = vec![];
    let mut json_runs = vec![];
    for (v, reports) in &results {
        let o = Outcome::of(reports);
        let correction = v.correction.map_or("-", Correction::name);
        rows.push(vec![
            v.name.clone(),
            v.staleness.to_string(),
            correction.to_string(),
            if v.inflight { "yes" } else { "no" }.to_string(),
            format!("{:.4}", o.reward),
            format!("{:.4}", o.score),
            format!("{:.4}", o.kl),
            format!("{:.2}", o.token_staleness),
            o.dropped.to_string(),
            format!("{:.1}", o.wall_s),
        ]);
        json_runs.push(json!({
            "name": v.name,
            "staleness": v.staleness,
            "correction": v.correction.map(Correction::name),
            "inflight": v.inflight,
            "final_reward": o.reward,
            "final_score": o.score,
            "final_kl": o.kl,
            "token_staleness_mean": o.token_staleness,
            "dropped_stale": o.dropped,
            "wall_s": o.wall_s,
        }));
    }
    print!("{}", table(&header, &rows));

    let first_report = format!("seed-{first_seed}/report.html");
    let compared: Vec<ComparedRun<'_>> = results
        .iter()
        .map(|(v, r)| ComparedRun {
            name: &v.name,
            reports: r,
            report: Some(&first_report),
        })
        .collect();
    let html = comparison::render(
        "tandem bench staleness",
        &format!(
            "{} for {} steps, {} seed(s) per run from seed {first_seed}: the table and the curves are means \
             over the seeds, final values means over the last quarter of the steps. Corrections: none \
             (no importance weight), tis (weight truncated at 2), decoupled (untruncated weight). Each \
             run's name links to the report of its first seed.",
            args.config.display(),
            args.steps,
            args.seeds
        ),
        &header,
        &rows,
        &compared,
    );
    let page = args.out.join("report.html");
    std::fs::write(&page, html).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", page.display()))?;
    crate::print_json(&json!({ "runs": json_runs, "report": page }))
}

/// Rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells.zip(&width).map(|(c, &w)| format!("{c:<w$}")).collect();
        let _ = writeln!(s, "{}", parts.join("  ").trim_end());
    };
    line(&mut s, &mut header.iter().copied());
    for row in rows {
        line(&mut s, &mut row.iter().map(String::as_str));
    }
    s
}
