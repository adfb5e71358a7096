//! `tandem sft CONFIG.toml [--run-dir DIR] [--overwrite] [--set section.key=value ...]`:
//! supervised fine-tuning on prompt/completion or chat JSONL (see `tandem_runtime::sft` for the
//! config, data forms and batching); `tandem sft --resume RUN_DIR [--set ...]` continues one
//! from its latest checkpoint, bit-exactly.
//!
//! The run directory is `--run-dir`, else the config's `run_dir`, else `runs/<config name>`. It
//! receives `config.toml`, `metrics.jsonl` (one line per step; `eval_loss` on evaluation
//! steps), `checkpoints/step-K/` and the trained `policy/` in HF layout, which `tandem run`,
//! `tandem eval` and transformers load. The run locks the directory (`tandem.lock`) as `tandem
//! run` does. One progress line per step goes to stderr unless `--quiet`; Ctrl-C or SIGTERM
//! stops at a step boundary with a checkpoint. The last line on stdout is a JSON summary. Bad
//! config or data (a malformed line, as `FILE:LINE`) exits with status 2.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tandem_runtime::sft::{sft, SftConfig, SftOptions};

use crate::run::RunDirArgs;

#[derive(Debug, Args)]
pub struct SftArgs {
    /// The SFT TOML config.
    #[arg(required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "run_dir", "overwrite"])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    common: RunDirArgs,
}

pub fn run(args: SftArgs) -> anyhow::Result<()> {
    let (cfg, run_dir, label) = match (&args.resume, &args.config) {
        (Some(dir), _) => (
            SftConfig::load(&dir.join("config.toml"), &args.common.set)?,
            dir.clone(),
            dir.clone(),
        ),
        (None, Some(config)) => {
            let cfg = SftConfig::load(config, &args.common.set)?;
            let run_dir = args.common.run_dir(config, cfg.run_dir.as_ref(), "sft");
            (cfg, run_dir, config.clone())
        }
        (None, None) => unreachable!("clap requires a config without --resume"),
    };
    let _lock = args.common.lock(&run_dir)?;
    let rt = crate::control_runtime("tandem-control")?;
    let opts = SftOptions {
        run_dir: run_dir.clone(),
        resume: args.resume.is_some(),
        progress: !args.common.quiet,
    };
    let out = rt.block_on(sft(&cfg, opts));
    rt.shutdown_timeout(Duration::from_secs(5));
    let s = out.with_context(|| format!("sft {}", label.display()))?;
    let r = &s.reports;
    crate::print_json(&json!({
        "run_dir": run_dir,
        "steps": r.len(),
        "total_steps": s.total_steps,
        "interrupted": s.interrupted,
        "resumed_from": s.resumed_from,
        "train_examples": s.train_examples,
        "eval_examples": s.eval_examples,
        "first_loss": r.first().map(|x| x.loss),
        "last_loss": r.last().map(|x| x.loss),
        "first_eval_loss": s.first_eval_loss,
        "eval_loss": s.eval_loss,
        "checkpoints": s.checkpoints,
        "policy": s.model_dir,
        "wall_s": r.last().map(|x| x.wall_s),
    }))
}
