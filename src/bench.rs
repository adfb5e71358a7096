//! `tandem bench generate`: throughput of the model code on a randomly initialised GPT-2
//! (4 layers, width 256, 4 heads, vocabulary 512, `n_positions` = max(64, prompt + new tokens)).
//!
//! - Generation: `--batch` prompts of `--prompt-len` random tokens, `--new-tokens` sampled per
//!   prompt at temperature 1 with no stop tokens, so exactly batch × new-tokens tokens are
//!   generated. Each repeat times KV-cached decoding and full recomputation back to back from
//!   the same seed, so both see the same machine conditions; reported figures are medians over
//!   `--repeats`, and `cache_speedup` is the median of the per-repeat ratios. Samplers decode
//!   from an immutable weight snapshot, so the bench does too.
//! - Training: `token_logprobs` on batch × (prompt + new tokens) tokens, summed, `backward()`;
//!   `train_tokens_per_s` counts the tokens of the batch per forward + backward (median).
//!
//! Everything runs inside a rayon pool of `--threads` threads (candle's CPU kernels use the
//! current pool). The default is 1: numbers that do not depend on the core count or on other
//! load on the machine, and the shape of one `cpu:N` executor; `--threads 0` uses every core.
//!
//! Human-readable lines come first; the last line of stdout is one JSON object.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use tandem_models::{generate, snapshot, Decoding, LanguageModel, ModelConfig, SamplingConfig, WeightInit};

use crate::error::bad_input;

const VOCAB: usize = 512;
const WIDTH: usize = 256;
const LAYERS: usize = 4;
const HEADS: usize = 4;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generation tokens/s (KV cache vs recompute) and forward+backward tokens/s.
    Generate(GenerateBench),
    /// Sync vs async PPO step time with sampling on cpu:0 and the learner on cpu:1.
    Overlap(crate::bench_overlap::OverlapBench),
    /// The off-policy correction ablation: sync, and async at staleness k with no correction,
    /// truncated IS and decoupled PPO, without and with in-flight updates; a comparison report.
    Staleness(crate::bench_staleness::StalenessBench),
    /// Weight transfer to a worker node over loopback vs a plain TCP copy of the same bytes.
    Cluster(crate::bench_cluster::ClusterBench),
    /// The whole PPO loop on the shared peer workload: episodes/s, learner GFLOP/s and its
    /// fraction of the machine's GEMM rate.
    Ppo(crate::bench_ppo::PpoBench),
}

#[derive(Debug, Args)]
pub struct GenerateBench {
    /// Timed repeats per measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Threads in the rayon pool the bench runs in; 0 means one per core.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seed for the weights, prompts and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Generate(args) => generate_bench(&args),
        BenchCommand::Overlap(args) => crate::bench_overlap::run(&args),
        BenchCommand::Staleness(args) => crate::bench_staleness::run(&args),
        BenchCommand::Cluster(args) => crate::bench_cluster::run(&args),
        BenchCommand::Ppo(args) => crate::bench_ppo::run(&args),
    }
}

fn generate_bench(args: &GenerateBench) -> anyhow::Result<()> {
    for (name, v) in [
        ("--repeats", args.repeats),
        ("--batch", args.batch),
        ("--prompt-len", args.prompt_len),
        ("--new-tokens", args.new_tokens),
    ] {
        if v == 0 {
            return bad_input!("{name} must be at least 1");
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .context("building the bench thread pool")?;
    let threads = pool.current_num_threads();
    let report = pool.install(|| measure(args))?;

    let gen_tokens = (args.batch * args.new_tokens) as f64;
    let train_tokens = (args.batch * (args.prompt_len + args.new_tokens)) as f64;
    let cached = gen_tokens / median(report.cached_s.clone());
    let recompute = gen_tokens / median(report.recompute_s.clone());
    let speedup = median(
        report
            .recompute_s
            .iter()
            .zip(&report.cached_s)
            .map(|(r, c)| r / c)
            .collect(),
    );
    let train = train_tokens / median(report.train_s.clone());

    println!(
        "gpt2 {LAYERS} layers, width {WIDTH}, {HEADS} heads, vocab {VOCAB}; batch {}, prompt {}, {} new tokens; \
         {} repeats on {threads} thread(s)",
        args.batch, args.prompt_len, args.new_tokens, args.repeats
    );
    println!("generate, KV cache:  {cached:>10.1} tokens/s");
    println!("generate, recompute: {recompute:>10.1} tokens/s");
    println!("cache speedup:       {speedup:>10.2}x");
    println!("forward+backward:    {train:>10.1} tokens/s");
    crate::print_json(&json!({
        "cached_tokens_per_s": cached,
        "recompute_tokens_per_s": recompute,
        "cache_speedup": speedup,
        "train_tokens_per_s": train,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": threads,
    }))
}

/// Seconds per timed run.
struct Timings {
    cached_s: Vec<f64>,
    recompute_s: Vec<f64>,
    train_s: Vec<f64>,
}

fn measure(args: &GenerateBench) -> anyhow::Result<Timings> {
    let dev = Device::Cpu;
    let seq = args.prompt_len + args.new_tokens;
    let config = ModelConfig::gpt2(VOCAB, WIDTH, LAYERS, HEADS, seq.max(64));
    let (trainable, varmap) = LanguageModel::trainable(&config, WeightInit::Random { seed: args.seed }, &dev)?;
    let frozen = LanguageModel::from_tensors(&config, snapshot(&varmap)?, &dev)?;

    let mut rng = StdRng::seed_from_u64(args.seed);
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.prompt_len)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: args.new_tokens,
        ..SamplingConfig::default()
    };
    let gen_once = |decoding| -> anyhow::Result<f64> {
        let mut rng = StdRng::seed_from_u64(args.seed);
        let start = Instant::now();
        let g = generate(&frozen, &prompts, &sampling, &mut rng, decoding)?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(
            g.responses.iter().all(|r| r.len() == args.new_tokens),
            "{decoding:?} decoding generated fewer than {} tokens in some row",
            args.new_tokens
        );
        Ok(secs)
    };

    let train_ids: Vec<u32> = (0..args.batch * seq)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let train_ids = Tensor::from_vec(train_ids, (args.batch, seq), &dev)?;
    let train_mask = Tensor::ones((args.batch, seq), DType::F32, &dev)?;
    let train_once = || -> anyhow::Result<f64> {
        let start = Instant::now();
        let out = trainable.token_logprobs(&train_ids, &train_mask, 0, 1.0)?;
        let grads = out.logprobs.sum_all()?.backward()?;
        let secs = start.elapsed().as_secs_f64();
        drop(grads);
        Ok(secs)
    };

    // Untimed warm-up: first-touch allocations and kernel set-up.
    gen_once(Decoding::Cached)?;
    train_once()?;

    let mut t = Timings {
        cached_s: vec![],
        recompute_s: vec![],
        train_s: vec![],
    };
    for _ in 0..args.repeats {
        t.cached_s.push(gen_once(Decoding::Cached)?);
        t.recompute_s.push(gen_once(Decoding::Recompute)?);
        t.train_s.push(train_once()?);
    }
    Ok(t)
}

/// Median of a sample (mean of the middle two for an even count; NaN when empty). The benches
/// report medians over repeats or steps.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
