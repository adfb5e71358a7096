//! `tandem train-rm CONFIG.toml [--run-dir DIR] [--set section.key=value ...]`: train a reward
//! model from preference data (see `tandem_runtime::train_rm` for the config and data forms).
//!
//! The run directory is `--run-dir`, else the config's `run_dir`, else `runs/<config name>`.
//! It receives `config.toml`, `metrics.jsonl` (one line per step; `eval_*` fields on
//! evaluation steps), `checkpoints/step-K/`, `normalization.json` and the final
//! `reward_model/` in HF sequence-classification layout. The last line on stdout is a JSON
//! summary. Bad config or data (a malformed line, as `FILE:LINE`; a ranked line with more than
//! 64 responses; no held-out comparisons) exits with status 2, checked before anything is
//! written.
//!
//! Like `tandem run`, the run locks `RUN_DIR/tandem.lock` for its whole life (a second run
//! into the directory exits 2 naming the holder's pid), refuses a directory that holds an
//! earlier run, and deletes one only with `--overwrite` and only if it is a tandem run
//! directory (see `tandem_runtime::run_dir`).
//!
//! After every step a progress line goes to stderr (`rm step k/N loss acc [eval_acc] elapsed
//! eta`); `--quiet` turns it off.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tandem_runtime::run_dir::refuse_earlier_run;
use tandem_runtime::train_rm::{load_inputs, train_rm_on, RmConfig};

use crate::run::RunDirArgs;

#[derive(Debug, Args)]
pub struct TrainRmArgs {
    /// The reward-model TOML config.
    config: PathBuf,
    #[command(flatten)]
    common: RunDirArgs,
}

pub fn run(args: TrainRmArgs) -> anyhow::Result<()> {
    let mut cfg = RmConfig::load(&args.config, &args.common.set)?;
    cfg.progress = !args.common.quiet;
    let run_dir = args.common.run_dir(&args.config, cfg.run_dir.as_ref(), "rm");
    // Data errors exit 2 before the directory is locked, cleared or written.
    let inputs = load_inputs(&cfg)?;
    let _lock = args.common.lock(&run_dir)?;
    if !args.common.overwrite {
        refuse_earlier_run(&run_dir)?;
    }
    let rt = crate::control_runtime("tandem-control")?;
    let out = rt.block_on(train_rm_on(&cfg, &run_dir, inputs));
    rt.shutdown_timeout(Duration::from_secs(5));
    let s = out.with_context(|| format!("train-rm {}", args.config.display()))?;
    crate::print_json(&json!({
        "run_dir": run_dir,
        "steps": s.reports.len(),
        "interrupted": s.interrupted,
        "train_examples": s.train_examples,
        "eval_examples": s.eval_examples,
        "eval_accuracy": s.eval_accuracy,
        "eval_top1": s.reports.iter().rev().find_map(|r| r.eval_top1),
        "normalization": s.normalization,
        "reward_model": s.model_dir,
        "wall_s": s.reports.last().map(|r| r.wall_s),
    }))
}
