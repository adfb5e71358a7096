//! `tandem eval CONFIG.toml [--model DIR] [--prompts FILE] [--samples N] [--temperature T]
//! [--out FILE] [--limit N] [--set k=v ...]`: generates on held-out prompts and scores the
//! responses with the config's reward source (see `tandem_runtime::eval`): exact-match
//! accuracy, pass@k, mean score, mean length and the no-stop fraction, printed as one JSON line
//! on stdout; every response goes to the samples JSONL (`--out`, default `eval_samples.jsonl`
//! beside the model directory). Greedy unless `--temperature` is above 0. The prompts are
//! `--prompts`, else the config's `[eval]` prompts, else its `data.prompts`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_runtime::eval::{default_out, evaluate, EvalOptions};
use tandem_runtime::Config;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run config: its [sampling] (stop tokens, max_new_tokens), [reward] and data.prompts.
    config: PathBuf,
    /// The model to evaluate (HF causal-LM directory, e.g. RUN_DIR/policy); default: the
    /// config's policy.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out prompts JSONL (with "answer" for exact match); default: the config's
    /// `[eval] prompts` (and its `max_prompts`), else its data.prompts.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Responses per prompt (pass@k is reported for k = 1, 2, 4, ... up to it).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Samples JSONL.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Evaluate only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Override a config key.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let mut set = args.set.clone();
    if let Some(p) = &args.prompts {
        // Resolved against the working directory, not the config's.
        let abs = std::path::absolute(p).with_context(|| format!("--prompts {}", p.display()))?;
        set.push(format!("data.prompts={}", abs.display()));
    }
    if let Some(m) = &args.model {
        // The model evaluated is the config's policy (so its checks apply to it, and a config
        // whose own policy does not exist yet, like a pipeline's RL stage, still loads).
        let abs = std::path::absolute(m).with_context(|| format!("--model {}", m.display()))?;
        set.push(format!("models.policy.path={}", abs.display()));
    }
    let mut cfg = Config::load(&args.config, &set)?;
    // Without --prompts, a config's [eval] section names the held-out prompts.
    let mut limit = args.limit;
    if let (None, Some(e)) = (&args.prompts, &cfg.eval) {
        cfg.data.prompts = e.prompts.clone();
        limit = limit.or((e.max_prompts > 0).then_some(e.max_prompts));
    }
    let opts = EvalOptions {
        out: args.out.clone().unwrap_or_else(|| default_out(args.model.as_deref())),
        model: args.model.clone(),
        samples: args.samples,
        temperature: args.temperature,
        limit,
    };
    let rt = crate::control_runtime("tandem-control")?;
    let out = rt.block_on(evaluate(&cfg, &opts));
    rt.shutdown_timeout(Duration::from_secs(5));
    let s = out.with_context(|| format!("eval {}", args.config.display()))?;
    crate::print_json(&serde_json::to_value(&s)?)
}
