//! `tandem run CONFIG.toml [--run-dir DIR] [--overwrite] [--set section.key=value ...]`: one RL
//! run; `tandem run --resume RUN_DIR [--set ...]` continues one from its latest checkpoint.
//!
//! The run directory is `--run-dir`, else the config's `run_dir` (relative to the working
//! directory), else `runs/<config name>`. It receives the resolved `config.toml`,
//! `metrics.jsonl` (one line per learner step), `checkpoints/` and the trained `policy/` and
//! `critic/`. A directory that already holds a run is refused unless `--overwrite` (which
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
//! saved, and the exit status is 0. The last line on stdout is a JSON summary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tandem_runtime::{Config, RunDirLock, RunOptions, RunSummary};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run's TOML config.
    #[arg(required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "run_dir", "overwrite"])]
    resume: Option<PathBuf>,
    /// Where the run writes its outputs (overrides the config's `run_dir`).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Delete the run directory first if it holds an earlier run.
    #[arg(long)]
    overwrite: bool,
    /// Override a config key, e.g. `--set steps=10 --set mode.max_staleness=0`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress output on stderr (neither the bar nor the per-step lines).
    #[arg(long, short)]
    quiet: bool,
}

/// Runs `cfg` on a fresh tokio runtime (control plane only: compute runs on device executors).
pub fn run_config(cfg: &Config, opts: RunOptions) -> anyhow::Result<RunSummary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tandem-control")
        .build()
        .context("cannot start the async runtime")?;
    let out = rt.block_on(tandem_runtime::run(cfg, opts));
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(out?)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (cfg, run_dir, label) = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let cfg = Config::load_run(&dir.join("config.toml"), &args.set)?;
            (cfg, dir.clone(), dir.clone())
        }
        (None, Some(config)) => {
            let cfg = Config::load(config, &args.set)?;
            let run_dir = args.run_dir.clone().or_else(|| cfg.run_dir.clone()).unwrap_or_else(|| {
                let stem = config
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into());
                PathBuf::from("runs").join(stem)
            });
            (cfg, run_dir, config.clone())
        }
        (None, None) => unreachable!("clap requires a config without --resume"),
    };
    // Held until the run is over: a second run into this directory is refused meanwhile.
    let _lock = if args.overwrite {
        RunDirLock::acquire_for_overwrite(&run_dir)?
    } else {
        RunDirLock::acquire(&run_dir)?
    };
    let progress = !args.quiet;
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
    let r = &summary.reports;
    let q = (r.len() / 4).max(1);
    let mean =
        |xs: &[tandem_actors::StepReport]| xs.iter().map(|x| x.stats.reward_mean).sum::<f64>() / xs.len().max(1) as f64;
    crate::print_json(&json!({
        "run_dir": run_dir,
        "steps": r.len(),
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
