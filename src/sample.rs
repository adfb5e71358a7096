//! `tandem sample CONFIG.toml --best-of N --out FILE.jsonl [--policy DIR] [--set k=v ...]`:
//! best-of-N (rejection) sampling with the config's policy, sampling settings and reward
//! source (see `tandem_runtime::best_of`). The last line on stdout is a JSON summary with the
//! mean score of the kept responses beside the mean over all samples. After each generation
//! batch a progress line goes to stderr (prompts done out of all, elapsed, ETA); `--quiet`
//! turns it off.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_runtime::best_of::MAX_BEST_OF;
use tandem_runtime::Config;

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A run config: its policy, [sampling], [reward] and data.prompts are used.
    config: PathBuf,
    /// Responses sampled per prompt (1 to 1024); the best-scored one is kept.
    #[arg(long, default_value_t = 1)]
    best_of: usize,
    /// Output JSONL: prompt, response, score, best_index, scores, response_ids.
    #[arg(long)]
    out: PathBuf,
    /// A HF causal-LM checkpoint to sample from instead of the config's initial policy
    /// (e.g. RUN_DIR/policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Override a config key.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    if args.best_of == 0 || args.best_of > MAX_BEST_OF {
        return crate::error::bad_input!(
            "--best-of must be between 1 and {MAX_BEST_OF}, not {} (every sampled response is held until the best is chosen)",
            args.best_of
        );
    }
    crate::error::check_output_path(&args.out)?;
    let cfg = Config::load(&args.config, &args.set)?;
    let rt = crate::control_runtime("tandem-control")?;
    let out = rt.block_on(tandem_runtime::best_of::best_of_n(
        &cfg,
        args.policy.as_deref(),
        args.best_of,
        &args.out,
        !args.quiet,
    ));
    rt.shutdown_timeout(Duration::from_secs(5));
    let s = out.with_context(|| format!("sample {}", args.config.display()))?;
    crate::print_json(&serde_json::to_value(&s)?)
}
