//! Best-of-N (rejection) sampling: `tandem sample CONFIG.toml --best-of N --out FILE.jsonl`.
//!
//! For every prompt of `data.prompts` (tokenised and truncated as in a run), the config's
//! policy (its initial weights, or `--policy DIR`, e.g. a run's `policy/`) samples `N`
//! responses with the config's `[sampling]` settings; the config's `[reward]` source scores
//! them and the best is kept (the first of equal scores). Each output line:
//! `{"prompt", "response", "score", "best_index", "scores": [all N], "response_ids"}`.
//! Sampling is seeded from the config's `seed`; prompts are generated in batches of
//! `data.prompts_per_ticket`, fewer when `N` is large so that one generation batch holds at
//! most [`MAX_ROWS_PER_BATCH`] sequences (at least one prompt's `N`). Compute runs on the first
//! rollout device's executor.
//!
//! `N` is bounded by [`MAX_BEST_OF`]: every sampled response and score is held until the
//! prompt's best is chosen, so an unbounded `N` would exhaust memory and abort instead of
//! failing with a message.
//!
//! [`sample_and_score`] is the shared step: the mock labeller uses it to draw and label pairs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use tandem_actors::reward_source::RewardSource;
use tandem_actors::{ActorError, Executor};
use tandem_models::{generate, Decoding, LanguageModel, SamplingConfig, TextTokenizer, WeightInit};

use crate::config::Config;
use crate::error::RuntimeError;
use crate::policy::load_policy;
use crate::prompts::load_prompts;
use crate::reward_sources::reward_source;

/// The largest `N` that best-of-N sampling accepts.
pub const MAX_BEST_OF: usize = 1024;

/// The most sequences (prompts × `n`) one generation batch holds, unless one prompt's `n`
/// alone is more.
pub const MAX_ROWS_PER_BATCH: usize = 1024;

/// `n` scored responses to one prompt.
#[derive(Debug, Clone)]
pub struct Scored {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub scores: Vec<f32>,
}

/// How [`sample_and_score`] samples: `n` responses per prompt with `sampling`, in batches of
/// `batch` prompts (fewer when `batch × n` exceeds [`MAX_ROWS_PER_BATCH`]), each batch seeded
/// by `seed` and its index.
#[derive(Debug, Clone, Copy)]
pub struct SampleSpec<'a> {
    pub n: usize,
    pub sampling: &'a SamplingConfig,
    pub seed: u64,
    pub batch: usize,
}

/// Samples responses to every prompt as `spec` says and scores them with `source`.
pub fn sample_and_score(
    model: &LanguageModel,
    prompts: &[Vec<u32>],
    spec: SampleSpec<'_>,
    source: &dyn RewardSource,
    progress: bool,
) -> Result<Vec<Scored>, ActorError> {
    let SampleSpec {
        n,
        sampling,
        seed,
        batch,
    } = spec;
    let mut out = Vec::with_capacity(prompts.len());
    let started = std::time::Instant::now();
    let per_batch = batch.max(1).min((MAX_ROWS_PER_BATCH / n.max(1)).max(1));
    for (b, chunk) in prompts.chunks(per_batch).enumerate() {
        let rows: Vec<Vec<u32>> = chunk.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect();
        let mut rng = StdRng::seed_from_u64(seed ^ (b as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let g = generate(model, &rows, sampling, &mut rng, Decoding::Cached)?;
        let p: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let r: Vec<&[u32]> = g.responses.iter().map(Vec::as_slice).collect();
        let scores = source.score(&p, &r, model.device())?;
        for (i, prompt) in chunk.iter().enumerate() {
            out.push(Scored {
                prompt: prompt.clone(),
                responses: g.responses[i * n..(i + 1) * n].to_vec(),
                scores: scores[i * n..(i + 1) * n].to_vec(),
            });
        }
        if progress {
            let (done, total) = (out.len(), prompts.len());
            let elapsed = started.elapsed().as_secs_f64();
            let eta = elapsed / done.max(1) as f64 * (total - done) as f64;
            let hms = crate::progress::hms;
            eprintln!(
                "sampled {done}/{total} prompts ({n} each) elapsed {} eta {}",
                hms(elapsed),
                hms(eta)
            );
        }
    }
    Ok(out)
}

/// What `tandem sample` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BestOfSummary {
    pub out: PathBuf,
    pub prompts: usize,
    pub best_of: usize,
    /// Mean score of the kept responses.
    pub best_score_mean: f64,
    /// Mean score of all sampled responses (what best-of-1 would give on average).
    pub all_score_mean: f64,
}

/// The policy named by `--policy DIR`, or the config's initial policy.
pub(crate) fn policy(
    cfg: &Config,
    dir: Option<&Path>,
    dev: &candle_core::Device,
) -> Result<(LanguageModel, TextTokenizer), RuntimeError> {
    Ok(match dir {
        Some(d) => (LanguageModel::load(d, dev)?, TextTokenizer::from_dir(d)?),
        None => {
            let p = load_policy(cfg)?;
            let init = WeightInit::loaded_or_random(p.init.as_ref(), cfg.seed);
            (LanguageModel::trainable(&p.config, init, dev)?.0, p.tokenizer)
        }
    })
}

/// Best-of-`n` over the config's prompts, written to `out` (see the module docs).
pub async fn best_of_n(
    cfg: &Config,
    policy_dir: Option<&Path>,
    n: usize,
    out: &Path,
    progress: bool,
) -> Result<BestOfSummary, RuntimeError> {
    if n == 0 || n > MAX_BEST_OF {
        return Err(RuntimeError::InvalidArgument(format!(
            "--best-of must be between 1 and {MAX_BEST_OF}, not {n}"
        )));
    }
    let device = *cfg.placement.rollout_devices.first().ok_or_else(|| {
        RuntimeError::InvalidArgument(
            "best-of-N samples in this process, but placement.rollout_devices is empty (every sampler is on a worker \
             node): name a local device in placement.rollout_devices"
                .into(),
        )
    })?;
    let exec = Executor::new(device, cfg.placement.threads_per_device)?;
    let (model, tokenizer) = policy(cfg, policy_dir, exec.device())?;
    let prompts = load_prompts(
        &cfg.data.prompts,
        &cfg.data.prompt_key,
        &tokenizer,
        cfg.data.prompt_max_tokens,
        cfg.data.on_bad_line,
    )?
    .prompts;
    let source: Arc<dyn RewardSource> = reward_source(cfg, &tokenizer, exec.device())?;
    let (sampling, seed, batch) = (cfg.sampling.clone(), cfg.seed, cfg.data.prompts_per_ticket);
    let ps = prompts.clone();
    let (scored, _) = exec
        .run(move |_| {
            let spec = SampleSpec {
                n,
                sampling: &sampling,
                seed,
                batch,
            };
            sample_and_score(&model, &ps, spec, source.as_ref(), progress)
        })
        .await?;
    let scored = scored?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| RuntimeError::io(out, e))?);
    let (mut best_sum, mut all_sum, mut all_n) = (0.0, 0.0, 0usize);
    for s in &scored {
        let best = (0..n).fold(0, |b, i| if s.scores[i] > s.scores[b] { i } else { b });
        best_sum += s.scores[best] as f64;
        all_sum += s.scores.iter().map(|&x| x as f64).sum::<f64>();
        all_n += n;
        let line = serde_json::json!({
            "prompt": tokenizer.decode(&s.prompt)?,
            "response": tokenizer.decode(&s.responses[best])?,
            "score": s.scores[best],
            "best_index": best,
            "scores": s.scores,
            "response_ids": s.responses[best],
        });
        writeln!(f, "{line}").map_err(|e| RuntimeError::io(out, e))?;
    }
    f.flush().map_err(|e| RuntimeError::io(out, e))?;
    Ok(BestOfSummary {
        out: out.to_path_buf(),
        prompts: scored.len(),
        best_of: n,
        best_score_mean: best_sum / scored.len().max(1) as f64,
        all_score_mean: all_sum / all_n.max(1) as f64,
    })
}
