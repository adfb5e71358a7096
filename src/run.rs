//! `tandem run CONFIG.toml [--run-dir DIR] [--overwrite] [--set section.key=value ...]`: one RL
//! run; `tandem run --resume RUN_DIR [--set ...]` continues one from its latest checkpoint.
//!
//! The run directory is `--run-dir`, else the config's `run_dir` (relative to the working
//! directory), else `runs/<config name>`. It receives the resolved `config.toml`,
//! `metrics.jsonl` (one line per learner step), `checkpoints/`, the trained `policy/` and
//! `critic/`, and `sessions.jsonl` (one [`SessionRecord`] per session that ended normally). A directory that already holds a run is refused unless `--overwrite` (which
//! deletes it first) or `--resume` is given. A resumed run reads `RUN_DIR/config.toml`; `--set`
//! may change it (for example `--set steps=200` to train longer).
//!
//! The run locks `RUN_DIR/tandem.lock` for its whole life: a second `run` into the same
//! directory (`--overwrite` and `--resume` included) exits 2 naming the directory and the
//! holder's pid, and deletes nothing. `--overwrite` deletes only a tandem run directory, never
//! other files, the working directory or its parents (see `tandem_runtime::run_dir`).
//!
//! Progress goes to stderr after every learner step (step k/N, score, reward, KL, beta,
//! tokens/s, elapsed, ETA): a live bar when stderr is a terminal, else one plain line per step;
//! `--quiet` turns it off. Ctrl-C or SIGTERM stops the run at the next step boundary with a
//! checkpoint (a second signal stops at once): what was reported is on disk, the models are
//! saved, and the exit status is 0. The last line on stdout is a JSON summary; a readable one
//! goes to stderr before it (see [`summary_text`]): steps and wall time of this session and of
//! the whole run (they differ after `--resume`), score (the reward model or rule) and reward
//! (score with the KL penalty) over the first and last quarter of the run's steps, the mock
//! labeller's true score, where the trained models are and the `tandem report` command.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_actors::StepReport;
use tandem_runtime::{Config, RunDirLock, RunOptions, RunSummary};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run's TOML config.
    #[arg(required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "run_dir", "overwrite"])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    common: RunDirArgs,
}

/// The options `run`, `sft` and `train-rm` share: where the run writes, whether it may replace
/// an earlier run, config overrides and quiet.
#[derive(Debug, Args)]
pub struct RunDirArgs {
    /// Where the run writes its outputs (overrides the config's `run_dir`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Delete the run directory first if it holds an earlier run.
    #[arg(long)]
    pub overwrite: bool,
    /// Override a config key, e.g. `--set steps=10` or `--set train.lr=1e-3`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// No progress output on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl RunDirArgs {
    /// `--run-dir`, else the config's `run_dir`, else `runs/<config file stem>` (`fallback`
    /// when the path has no stem).
    pub fn run_dir(&self, config: &Path, from_config: Option<&PathBuf>, fallback: &str) -> PathBuf {
        self.run_dir
            .clone()
            .or_else(|| from_config.cloned())
            .unwrap_or_else(|| {
                let stem = config
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| fallback.into());
                PathBuf::from("runs").join(stem)
            })
    }

    /// Locks `run_dir` for the run's life, clearing an earlier run first with `--overwrite`.
    pub fn lock(&self, run_dir: &Path) -> anyhow::Result<RunDirLock> {
        Ok(if self.overwrite {
            RunDirLock::acquire_for_overwrite(run_dir)?
        } else {
            RunDirLock::acquire(run_dir)?
        })
    }
}

/// Runs `cfg` on a fresh tokio runtime (control plane only: compute runs on device executors):
/// the mock-labeller recipe for a config with `[mock_labeller]` (it ends with the PPO
/// pipeline), else the PPO pipeline.
pub fn run_config(cfg: &Config, opts: RunOptions) -> anyhow::Result<RunSummary> {
    let rt = crate::control_runtime("tandem-control")?;
    let out = rt.block_on(async {
        if cfg.mock_labeller.is_some() {
            tandem_runtime::mock_labeller::run(cfg, opts).await
        } else {
            tandem_runtime::run(cfg, opts).await
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(out?)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (cfg, run_dir, label) = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let cfg = Config::load_run(&dir.join("config.toml"), &args.common.set)?;
            (cfg, dir.clone(), dir.clone())
        }
        (None, Some(config)) => {
            let cfg = Config::load(config, &args.common.set)?;
            let run_dir = args.common.run_dir(config, cfg.run_dir.as_ref(), "run");
            (cfg, run_dir, config.clone())
        }
        (None, None) => unreachable!("clap requires a config without --resume"),
    };
    // Held until the run is over: a second run into this directory is refused meanwhile.
    let _lock = args.common.lock(&run_dir)?;
    let progress = !args.common.quiet;
    let session_started = Instant::now();
    let summary = run_config(
        &cfg,
        RunOptions {
            run_dir: run_dir.clone(),
            progress,
            resume: args.resume.is_some(),
            ..Default::default()
        },
    )
    .with_context(|| format!("run {}", label.display()))?;
    let session_wall_s = session_started.elapsed().as_secs_f64();
    SessionRecord {
        first_step: summary.resumed_from.unwrap_or(0),
        steps: summary.reports.len(),
        resumed_from: summary.resumed_from,
        wall_s: session_wall_s,
        interrupted: summary.interrupted,
    }
    .append(&run_dir);
    let r = &summary.reports;
    let q = (r.len() / 4).max(1);
    let mean = |xs: &[StepReport]| xs.iter().map(|x| x.stats.reward_mean).sum::<f64>() / xs.len().max(1) as f64;
    let whole = RunTotals::read(&run_dir);
    eprint!("{}", summary_text(&run_dir, &summary, &whole, session_wall_s));
    let policy = run_dir.join("policy");
    crate::print_json(&json!({
        "run_dir": run_dir,
        "steps": r.len(),
        "run_steps": whole.steps,
        "session_wall_s": session_wall_s,
        "score_first_quarter": whole.first_quarter(|r| Some(r.stats.score_mean)),
        "score_last_quarter": whole.last_quarter(|r| Some(r.stats.score_mean)),
        "policy": policy.is_dir().then_some(policy),
        "interrupted": summary.interrupted,
        "reward_first_quarter": if r.is_empty() { None } else { Some(mean(&r[..q.min(r.len())])) },
        "reward_last_quarter": if r.is_empty() { None } else { Some(mean(&r[r.len().saturating_sub(q)..])) },
        "wall_s": r.last().map(|x| x.wall_s),
        "resumed_from": summary.resumed_from,
        "checkpoints": summary.checkpoints,
        "restarts": summary.restarts,
        "prompts_skipped": summary.prompts_skipped,
        "stored_trajectories": summary.store.map(|s| s.trajectories),
        "store_bytes_per_trajectory": summary.store.map(|s| s.bytes_per_trajectory()),
    }))
}

/// One line of `RUN_DIR/sessions.jsonl`, appended when a `tandem run` session ends (finished
/// or stopped; a killed session leaves none): where it began and how far it got. `tandem
/// report` marks the steps at which resumed sessions began.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The first step this session ran (the checkpoint it resumed from, or 0).
    pub first_step: u64,
    /// Steps it ran.
    pub steps: usize,
    /// The checkpoint step it resumed from (`None` for a fresh run).
    pub resumed_from: Option<u64>,
    pub wall_s: f64,
    pub interrupted: bool,
}

impl SessionRecord {
    /// The file's name inside a run directory.
    pub const FILE: &'static str = "sessions.jsonl";

    /// Appends the record; a failure is only warned about (the run itself is done).
    fn append(&self, run_dir: &Path) {
        use std::io::Write as _;
        let path = run_dir.join(Self::FILE);
        let line = serde_json::to_string(self).expect("a session record serialises");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!("cannot append to {}: {e}", path.display());
        }
    }
}

/// The whole run's numbers, from `RUN_DIR/metrics.jsonl` (every session's steps; lines a
/// resumed run set aside are not in it).
pub struct RunTotals {
    lines: Vec<StepReport>,
    pub steps: usize,
    /// The last step's wall time (it counts earlier sessions too).
    pub wall_s: Option<f64>,
}

/// One number of a metrics line, if the line has it.
pub type Metric = fn(&StepReport) -> Option<f64>;

impl RunTotals {
    pub fn read(run_dir: &Path) -> Self {
        let lines: Vec<StepReport> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| StepReport::from_line(l).ok())
            .collect();
        let wall_s = lines.last().map(|l| l.wall_s).filter(|w| w.is_finite());
        RunTotals {
            steps: lines.len(),
            wall_s,
            lines,
        }
    }

    fn quarter_mean(&self, metric: Metric, last: bool) -> Option<f64> {
        let q = (self.lines.len() / 4).max(1).min(self.lines.len());
        let part = if last {
            &self.lines[self.lines.len() - q..]
        } else {
            &self.lines[..q]
        };
        let xs: Vec<f64> = part.iter().filter_map(metric).filter(|x| x.is_finite()).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    }

    /// The mean of `metric` over the first quarter of the run's steps (at least one step).
    pub fn first_quarter(&self, metric: Metric) -> Option<f64> {
        self.quarter_mean(metric, false)
    }

    /// The mean of `metric` over the last quarter of the run's steps.
    pub fn last_quarter(&self, metric: Metric) -> Option<f64> {
        self.quarter_mean(metric, true)
    }
}

/// The readable end-of-run summary (several lines, each ending in a newline).
pub fn summary_text(run_dir: &Path, summary: &RunSummary, whole: &RunTotals, session_wall_s: f64) -> String {
    use std::fmt::Write as _;
    let secs = |s: f64| format!("{s:.1}s");
    let mut out = String::new();
    let state = if summary.interrupted { "stopped" } else { "finished" };
    let _ = writeln!(
        out,
        "run {state}: {} steps in {} ({})",
        whole.steps,
        whole.wall_s.map(secs).unwrap_or_else(|| "-".into()),
        run_dir.display()
    );
    let (Some(first), Some(last)) = (summary.reports.first(), summary.reports.last()) else {
        let _ = writeln!(out, "  this session: no step ({})", secs(session_wall_s));
        return out;
    };
    if summary.resumed_from.is_some() {
        let _ = writeln!(
            out,
            "  this session: {} steps ({}-{}) in {}, resumed from checkpoint step {}",
            summary.reports.len(),
            first.step + 1,
            last.step + 1,
            secs(session_wall_s),
            summary.resumed_from.unwrap_or(0)
        );
    }
    let row = |metric: Metric, name: &str, what: &str| -> Option<String> {
        let (a, b) = (whole.first_quarter(metric)?, whole.last_quarter(metric)?);
        Some(format!("  {name:<12}{a:>9.4} -> {b:<9.4} {what}\n"))
    };
    let _ = writeln!(
        out,
        "  {:<12}{:>9} -> {:<9} (means over the first and last quarter of the steps)",
        "", "first", "last"
    );
    let metrics: [(Metric, &str, &str); 4] = [
        (
            |r| Some(r.stats.score_mean),
            "score",
            "the reward model's or rule's score",
        ),
        (|r| r.true_score_mean, "true score", "the programmatic labeller's score"),
        (|r| Some(r.stats.reward_mean), "reward", "score with the KL penalty"),
        (|r| Some(r.stats.kl), "kl", "to the reference policy"),
    ];
    for (metric, name, what) in metrics {
        out.push_str(&row(metric, name, what).unwrap_or_default());
    }
    for m in ["policy", "critic", "policy_ema"] {
        let dir = run_dir.join(m);
        if dir.is_dir() {
            let _ = writeln!(out, "  {:<12}{}", format!("{m}:"), dir.display());
        }
    }
    let _ = writeln!(out, "  {:<12}tandem report {}", "report:", run_dir.display());
    out
}
