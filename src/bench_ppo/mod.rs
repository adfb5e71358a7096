//! `tandem bench ppo`: the whole PPO loop on the shared peer workload, and how close the
//! learner runs to the machine's f32 GEMM rate.
//!
//! # The workload
//!
//! By default the shapes of the peer workload (the project workshop's `peers/trl_match.toml`,
//! outside this repository and not needed by it; the
//! same work as TRL's `PPOTrainer` in `trl_ppo_bench.py`): a GPT-2 of 4 layers × 256 wide with 4
//! heads and a vocabulary of 512; 64 prompts of 16 tokens a step, 32 new tokens each at
//! temperature 1 with no stop token; 4 PPO epochs × 4 minibatches of 16; the critic
//! initialised from the reward model; a fixed KL coefficient of 0.05; learning rates 1e-5; sync
//! mode (`max_staleness = 0`); every stage on the one device `cpu:0` with `--threads` threads.
//!
//! - `--model DIR --reward DIR`: HF checkpoint directories (as made by
//!   the workshop's `peers/make_tiny_models.py`: `policy/`, `reward/`, `prompts.jsonl`); the prompts
//!   default to `prompts.jsonl` beside the policy directory. This is exactly the peer workload.
//! - Built-in (neither flag): nothing outside the repository is read. The bench writes a
//!   randomly initialised GPT-2 policy and a randomly initialised GPT-2 reward model of the same
//!   shape (`--layers`, `--hidden`, `--heads`, `--vocab`; default the peer's 4 × 256, 4 heads,
//!   vocabulary 512), each in HF layout with a word-level tokenizer of `--vocab` tokens, and a
//!   prompts file of random `--prompt-len`-word prompts, into a temporary directory. Of what
//!   the built-in configs offer (a critic started from the policy with a rule-based reward, or
//!   a reward model), this is the closest to the peer: the same reward-model forward on the
//!   sampling side, the critic started from the reward model, and the vocabulary of the peer
//!   (the built-in word tokenizer of `runtime::builtin` has only ~114 tokens). Every prompt is
//!   exactly `--prompt-len` tokens.
//!
//! The pipeline runs in-process (`tandem_runtime::run`, like `tandem run`) with metrics,
//! checkpoints between steps and the trajectory store off (`store.retention = "none"`; the
//! peer persists nothing either). `--set KEY=VALUE` overrides are applied last.
//!
//! # What is measured
//!
//! `--steps` learner steps run (default 7); the first `--warmup` (default 1) are left out,
//! since the first step also pays for start-up (loading, first-touch allocations). Every
//! per-step figure is the median over the remaining steps, so one step slowed by other load on
//! the machine does not move it:
//!
//! - `step_s`: wall-clock time between consecutive learner steps (sync mode: generation,
//!   reward, value and learning of one step, back to back);
//! - `episodes_per_s` = prompts_per_step × samples_per_prompt / `step_s`;
//! - `learner_s_per_step`: time of the learner's PPO step (`StepReport::learn_s`: all
//!   epochs and minibatches, optimiser steps included; the weight publication after it is
//!   `weight_sync_s`, reported apart);
//! - `learner_tokens_per_s` = ppo_epochs × B × T / `learner_s_per_step`: token positions pushed
//!   forward and backward through policy and critic per second, with B = episodes per step and
//!   T = prompt + response tokens (the padded length the learner computes on: the longest
//!   prompt after truncation plus `--new-tokens`, which every response reaches with no stop);
//! - `learner_gflops` = learner FLOPs per step / `learner_s_per_step` / 1e9, the FLOPs counted
//!   from the model shapes:
//!
//!   ```text
//!   fwd(model) = 2·P_mm + 4·L·T·H·h_d       per token
//!     P_mm  = L·(d·H·h_d + 2·d·K·h_d + H·h_d·d + M·d·f) + head
//!             (Q, K and V projections, attention output, MLP with M = 2 matrices for GPT-2,
//!              3 for gated SiLU; head = d·V for the policy's LM head, d for the critic's score)
//!     4·L·T·H·h_d: attention scores Q·Kᵀ and the weighted sum of V over all T positions
//!   learner FLOPs per step = 3 · ppo_epochs · B · T · (fwd(policy) + fwd(critic))
//!   ```
//!
//!   (×3: the backward pass costs two forwards). d = hidden, L = layers, H = heads, K = key/value
//!   heads, h_d = head dim, f = MLP width, V = vocabulary. Norms, activations, softmax, the
//!   loss and the optimiser are not counted, nor any extra forward pass the learner makes
//!   (e.g. recomputing log-probs at the start of the step), so a faster learner for the same
//!   shapes always shows a higher figure. Every position counts through every weight (the
//!   usual per-token convention), although the learner runs the last block after attention
//!   and the LM head only at the response positions it reads (`layers::Positions`): about 7%
//!   of the counted FLOPs at the peer shape.
//! - `matmul_gflops`: the machine's f32 GEMM rate at the learner's dominant shapes, measured in
//!   the same process, with candle's `Tensor::matmul` inside a rayon pool of the learner's
//!   thread count (the same way a device executor runs it): (mb·T, d)×(d, qkv), (mb·T, d)×(d, f)
//!   and (mb·T, f)×(f, d), mb = minibatch size, T as above. After one untimed product per
//!   shape, three rounds over the shapes run just before the run and three just after it, each
//!   repeating a shape for a third of `--matmul-secs`. A shape's rate is its median round, and
//!   `matmul_gflops` is the rate of one product of each shape: their FLOPs over their summed
//!   median times. Both sides of the ratio are medians over repeats, the reference's rounds
//!   bracketing the learner's steps, so a slow spell of this shared machine enters both (a
//!   best round against a mean step, as this bench first took, put the machine's noise into
//!   the ratio: within one run learner steps ranged over 1.40–2.13 s, reference rounds over
//!   300–420 GFLOP/s).
//!   `learner_fraction_of_matmul` = `learner_gflops` / `matmul_gflops`.
//! - `matmul_gflops_before`, `matmul_gflops_after`: the same rate from the rounds on each side
//!   of the run alone. When they differ by more than a tenth, the machine's load changed while
//!   the bench ran, and it prints a warning that the run's fraction is unreliable.
//! - `peak_rss_mb`: the process's peak resident set (`VmHWM` in `/proc/self/status`), in MiB.
//!
//! Human-readable lines come first; the last line of stdout is one JSON object.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use tandem_actors::StepReport;
use tandem_models::config::Architecture;
use tandem_models::{save_checkpoint, snapshot, LanguageModel, ModelConfig, ScalarModel, TextTokenizer, WeightInit};
use tandem_runtime::config::BadLinePolicy;
use tandem_runtime::{Config, RunOptions};

use crate::error::{bad_input, BadInput};

#[derive(Debug, Args)]
pub struct PpoBench {
    /// Policy checkpoint directory (HF layout); needs --reward. Without both, built-in
    /// randomly initialised models of the peer shapes are used.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Reward-model checkpoint directory (HF layout); the critic starts from it. Needs --model.
    #[arg(long, value_name = "DIR")]
    reward: Option<PathBuf>,
    /// Prompts JSONL. Default with --model: `prompts.jsonl` beside the policy directory;
    /// built-in: random prompts of --prompt-len words.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Learner steps to run.
    #[arg(long, default_value_t = 7)]
    steps: u64,
    /// Steps left out of the figures at the start.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Threads of the one device (cpu:0) every stage runs on; also the GEMM reference's pool.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompts per learner step.
    #[arg(long, default_value_t = 64)]
    prompts_per_step: usize,
    /// Prompt tokens (prompts are left-truncated to this; built-in prompts have exactly this).
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Tokens generated per prompt (no stop token, so always this many).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// PPO epochs per step.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Trajectories per minibatch.
    #[arg(long, default_value_t = 16)]
    minibatch: usize,
    /// Built-in models: transformer layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Built-in models: hidden width.
    #[arg(long)]
    hidden: Option<usize>,
    /// Built-in models: attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Built-in models: vocabulary size (word-level tokenizer).
    #[arg(long)]
    vocab: Option<usize>,
    /// Seconds of timed GEMM per reference shape, on each side of the run.
    #[arg(long, default_value_t = 0.5)]
    matmul_secs: f64,
    /// Seed for the run (and the built-in weights and prompts).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Extra config overrides, applied after the bench's own settings.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

mod rates;
mod workload;

use crate::bench::median;
use rates::{mean, peak_rss_mb, GemmRate, GemmReference, Shape, GEMM_ROUNDS};
use workload::{canonical, config_text, validate, write_builtin};

/// Built-in defaults: the peer's GPT-2.
const LAYERS: usize = 4;
const HIDDEN: usize = 256;
const HEADS: usize = 4;
const VOCAB: usize = 512;
/// A change of the GEMM rate across the run, as a fraction, above which the bench warns that
/// the machine's load changed while it ran.
const DRIFT_WARNING: f64 = 0.1;
/// Position table of the built-in models (the peer's `n_positions`).
const POSITIONS: usize = 256;

/// Where the models and prompts come from, resolved.
struct Workload {
    policy: PathBuf,
    reward: PathBuf,
    prompts: PathBuf,
    builtin: bool,
}

pub fn run(args: &PpoBench) -> anyhow::Result<()> {
    validate(args)?;
    let dir = std::env::temp_dir().join(format!("tandem-bench-ppo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn run_in(args: &PpoBench, dir: &Path) -> anyhow::Result<()> {
    let work = match (&args.model, &args.reward) {
        (Some(model), Some(reward)) => {
            let prompts = match &args.prompts {
                Some(p) => p.clone(),
                None => {
                    let p = model.parent().unwrap_or(Path::new(".")).join("prompts.jsonl");
                    if !p.is_file() {
                        return bad_input!(
                            "no --prompts given and {} does not exist (the default beside --model)",
                            p.display()
                        );
                    }
                    p
                }
            };
            Workload {
                policy: canonical(model, "--model")?,
                reward: canonical(reward, "--reward")?,
                prompts: canonical(&prompts, "--prompts")?,
                builtin: false,
            }
        }
        _ => {
            let mut w = write_builtin(args, &dir.join("models"))?;
            if let Some(p) = &args.prompts {
                w.prompts = canonical(p, "--prompts")?;
            }
            w
        }
    };

    let policy_cfg = ModelConfig::from_dir(&work.policy)?;
    let critic_cfg = ModelConfig::from_dir(&work.reward)?;
    let (policy, critic) = (Shape::of(&policy_cfg), Shape::of(&critic_cfg));
    // The learner's padded length: the longest prompt after truncation, plus the response.
    let tokenizer = TextTokenizer::from_dir(&work.policy)?;
    let prompt_set = tandem_runtime::prompts::load_prompts(
        &work.prompts,
        "prompt",
        &tokenizer,
        args.prompt_len,
        BadLinePolicy::Error,
    )?;
    let prompt_tokens = prompt_set.prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prompt_tokens_mean = mean(prompt_set.prompts.iter().map(|p| p.len() as f64));

    let config_path = dir.join("bench_ppo.toml");
    std::fs::write(&config_path, config_text(args, &work)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let cfg = Config::load(&config_path, &args.set)?;
    let episodes = cfg.data.prompts_per_step * cfg.data.samples_per_prompt;
    let epochs = cfg.algorithm.ppo_epochs;
    let minibatch = cfg.algorithm.minibatch_size;
    let threads = cfg.placement.threads_per_device;
    let t = prompt_tokens + cfg.sampling.max_new_tokens;

    println!(
        "{} policy {}x{} ({} heads, vocab {}), critic from the reward model {}x{}; {episodes} episodes of \
         {prompt_tokens}+{} tokens a step, {epochs} epochs x minibatches of {minibatch}; cpu:0 with {threads} thread(s)",
        if work.builtin { "built-in" } else { "checkpoint" },
        policy.layers,
        policy.hidden,
        policy.heads,
        policy.vocab,
        critic.layers,
        critic.hidden,
        cfg.sampling.max_new_tokens,
    );

    // The GEMM reference, at the policy's shapes for one minibatch, on the learner's threads.
    let rows = minibatch * t;
    let shapes = [
        ("qkv", rows, policy.hidden, policy.qkv()),
        ("mlp_up", rows, policy.hidden, policy.mlp_hidden),
        ("mlp_down", rows, policy.mlp_hidden, policy.hidden),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the GEMM reference's thread pool")?;
    let mut reference = GemmReference::new(&shapes);
    pool.install(|| reference.rounds(args.matmul_secs))?;

    let summary = crate::run::run_config(
        &cfg,
        RunOptions {
            run_dir: dir.join("run"),
            ..Default::default()
        },
    )?;
    let reports: &[StepReport] = &summary.reports;
    let warmup = args.warmup as usize;
    if reports.len() <= warmup {
        anyhow::bail!(
            "the run ended after {} of {} steps{}",
            reports.len(),
            args.steps,
            if summary.interrupted { " (interrupted)" } else { "" }
        );
    }
    let timed = &reports[warmup..];
    // Step k's time is the wall clock from the end of step k-1 to the end of step k.
    let step_s = median(
        reports
            .windows(2)
            .skip(warmup.saturating_sub(1))
            .map(|w| w[1].wall_s - w[0].wall_s)
            .collect(),
    );
    let per_step = |f: fn(&StepReport) -> f64| timed.iter().map(f).collect::<Vec<f64>>();
    let learner_steps = per_step(|r| r.learn_s);
    let learner_s = median(learner_steps.clone());
    let generate_s = median(per_step(|r| r.generate_s));
    let reward_s = median(per_step(|r| r.reward_s));
    let value_s = median(per_step(|r| r.value_s));
    let weight_sync_s = median(per_step(|r| r.weight_sync_s));

    let tokens_per_step = (epochs * episodes * t) as f64;
    let flops_per_token = 3.0
        * (policy.forward_flops_per_token(t, (policy.hidden * policy.vocab) as f64)
            + critic.forward_flops_per_token(t, critic.hidden as f64));
    let learner_flop_per_step = tokens_per_step * flops_per_token;
    let learner_gflops = learner_flop_per_step / learner_s / 1e9;
    let learner_tokens_per_s = tokens_per_step / learner_s;
    let episodes_per_s = episodes as f64 / step_s;

    // The GEMM reference's rounds after the run; with those before it, they bracket the run.
    pool.install(|| reference.rounds(args.matmul_secs))?;
    let gemm = &reference.shapes;
    // The rate of the three products done once each, at a per-shape rate `rate`: their FLOPs
    // over their summed times.
    let gemm_flops: Vec<f64> = gemm.iter().map(|g| 2.0 * (g.m * g.k * g.n) as f64).collect();
    let combined = |rate: &dyn Fn(&GemmRate) -> f64| {
        gemm_flops.iter().sum::<f64>() / gemm.iter().zip(&gemm_flops).map(|(g, f)| f / rate(g)).sum::<f64>()
    };
    let matmul_gflops = combined(&GemmRate::gflops);
    let matmul_before = combined(&|g| median(g.rounds[..GEMM_ROUNDS].to_vec()));
    let matmul_after = combined(&|g| median(g.rounds[GEMM_ROUNDS..].to_vec()));
    let fraction = learner_gflops / matmul_gflops;
    let rss = peak_rss_mb();

    let n = timed.len();
    println!(
        "step {step_s:.3}s over {n} step(s) after {warmup} warm-up: {episodes_per_s:.2} episodes/s; \
         generate {generate_s:.3}s, reward {reward_s:.3}s, value {value_s:.3}s, learner {learner_s:.3}s, weight sync {weight_sync_s:.3}s"
    );
    let shown: Vec<String> = learner_steps.iter().map(|s| format!("{s:.3}")).collect();
    println!("learner per step (s): {}", shown.join(" "));
    println!(
        "learner: {:.1} GFLOP a step (policy + critic, fwd + bwd), {learner_tokens_per_s:.0} tokens/s, {learner_gflops:.1} GFLOP/s",
        learner_flop_per_step / 1e9
    );
    for g in gemm {
        println!(
            "gemm {:<8} ({}x{})x({}x{}): {:.1} GFLOP/s",
            g.name,
            g.m,
            g.k,
            g.k,
            g.n,
            g.gflops()
        );
    }
    println!("gemm before the run {matmul_before:.1} GFLOP/s, after it {matmul_after:.1}");
    let drift = matmul_after / matmul_before - 1.0;
    if drift.abs() > DRIFT_WARNING {
        println!(
            "warning: the GEMM rate moved by {:+.0}% across the run, so other load on the machine changed while \
             it ran and this run's fraction is unreliable; rerun it",
            100.0 * drift
        );
    }
    println!(
        "learner at {:.0}% of the GEMM rate ({matmul_gflops:.1} GFLOP/s on {threads} thread(s), medians of {} rounds \
         before and after the run); peak RSS {}",
        100.0 * fraction,
        2 * GEMM_ROUNDS,
        rss.map_or("unknown".into(), |r| format!("{r:.0} MiB"))
    );
    let gemm_json: Vec<_> = gemm
        .iter()
        .map(|g| json!({"name": g.name, "m": g.m, "k": g.k, "n": g.n, "gflops": g.gflops(), "rounds": g.rounds}))
        .collect();
    crate::print_json(&json!({
        "episodes_per_s": episodes_per_s,
        "learner_tokens_per_s": learner_tokens_per_s,
        "learner_gflops": learner_gflops,
        "matmul_gflops": matmul_gflops,
        "matmul_gflops_before": matmul_before,
        "matmul_gflops_after": matmul_after,
        "learner_fraction_of_matmul": fraction,
        "peak_rss_mb": rss,
        "step_s": step_s,
        "learner_s_per_step": learner_s,
        "learner_s_steps": learner_steps,
        "generate_s": generate_s,
        "reward_s": reward_s,
        "value_s": value_s,
        "weight_sync_s": weight_sync_s,
        "learner_gflop_per_step": learner_flop_per_step / 1e9,
        "matmul_shapes": gemm_json,
        "workload": if work.builtin { "builtin" } else { "checkpoint" },
        "layers": policy.layers,
        "hidden": policy.hidden,
        "heads": policy.heads,
        "vocab": policy.vocab,
        "critic_layers": critic.layers,
        "critic_hidden": critic.hidden,
        "episodes_per_step": episodes,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_mean": prompt_tokens_mean,
        "new_tokens": cfg.sampling.max_new_tokens,
        "seq_len": t,
        "ppo_epochs": epochs,
        "minibatch_size": minibatch,
        "threads": threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "timed_steps": n,
    }))
}
