//! Evaluating a model on held-out prompts: `tandem eval CONFIG.toml --model DIR`.
//!
//! The config is a run config: its `data.prompts` (or `--prompts FILE`), `[sampling]` (stop
//! tokens, `max_new_tokens`) and `[reward]` source are used as a run would use them. Every
//! prompt gets `n` responses: greedy by default (`temperature = 0`), or sampled at a
//! temperature `T > 0` (seeded from the config's `seed`). Each response is scored by the reward
//! source. Reported, as one JSON object:
//!
//! - `score_mean`: the mean score over all responses (any reward source);
//! - `accuracy`: the fraction of responses that are correct, for the rule sources that have a
//!   notion of correct (`exact_match` against the prompt line's `"answer"`, `regex`): a
//!   response is correct when it scores `reward.match_score`;
//! - `pass_at`: pass@k for k = 1, 2, 4, ... up to `n`, the unbiased estimator of Chen et al.
//!   (2021), `1 - C(n - c, k) / C(n, k)` per prompt with `c` correct responses, averaged;
//! - `mean_length`: response tokens, the stop token included;
//! - `no_stop_fraction`: responses that reached `max_new_tokens` without a stop token.
//!
//! Every response is written to the samples JSONL (`{"prompt", "response", "score",
//! "correct", "length", "stopped", "sample"}`). Compute runs on the first rollout device's
//! executor, as for `tandem sample`.
//!
//! [`HeldOut`] is the shared core: a run's `[eval]` section evaluates the weights it publishes
//! through it as well (greedily, see `crate::pipeline`), so both report the same measures.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tandem_actors::reward_source::RewardSource;
use tandem_actors::{ActorError, Executor};
use tandem_models::{LanguageModel, SamplingConfig, TextTokenizer};

use crate::best_of::{policy, sample_and_score, SampleSpec, Scored};
use crate::config::{Config, RewardKind};
use crate::error::RuntimeError;
use crate::prompts::load_prompts;
use crate::reward_sources::reward_source;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The model (HF directory, e.g. an SFT or RL run's `policy/`); `None`: the config's policy.
    pub model: Option<PathBuf>,
    /// Responses per prompt.
    pub samples: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// The samples JSONL.
    pub out: PathBuf,
    /// Evaluate only the first this many prompts.
    pub limit: Option<usize>,
}

/// The measures of one evaluation (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct EvalScores {
    pub prompts: usize,
    pub score_mean: f64,
    pub accuracy: Option<f64>,
    /// `[k, pass@k]` pairs.
    pub pass_at: Vec<(usize, f64)>,
    pub mean_length: f64,
    pub no_stop_fraction: f64,
}

/// What `tandem eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    pub model: Option<PathBuf>,
    pub samples_per_prompt: usize,
    pub temperature: f64,
    #[serde(flatten)]
    pub scores: EvalScores,
    pub out: PathBuf,
}

/// The unbiased pass@k estimate for one prompt with `n` samples of which `c` are correct.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n || n == 0 {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // 1 - prod_{i = n - c + 1}^{n} (1 - k / i), numerically stable.
    1.0 - (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// A held-out set ready to evaluate models on: the config's prompts (tokenised as a run
/// feeds them), its reward source, and what counts as correct and as a stop. `tandem eval`
/// and a run's `[eval]` both evaluate through it.
pub struct HeldOut {
    prompts: Vec<Vec<u32>>,
    source: Arc<dyn RewardSource>,
    /// The score of a correct response, for the sources that have a notion of correct.
    correct_score: Option<f32>,
    stops: HashSet<u32>,
    sampling: SamplingConfig,
    seed: u64,
    batch: usize,
}

impl HeldOut {
    /// `cfg`'s `data.prompts` (the first `limit`), scored by `cfg`'s reward source on `device`.
    pub fn load(
        cfg: &Config,
        tokenizer: &TextTokenizer,
        device: &candle_core::Device,
        limit: Option<usize>,
    ) -> Result<Self, RuntimeError> {
        let mut prompts = load_prompts(
            &cfg.data.prompts,
            &cfg.data.prompt_key,
            tokenizer,
            cfg.data.prompt_max_tokens,
            cfg.data.on_bad_line,
        )?
        .prompts;
        if let Some(l) = limit {
            prompts.truncate(l.max(1));
        }
        Ok(Self {
            prompts,
            source: reward_source(cfg, tokenizer, device)?,
            correct_score: match cfg.reward.kind {
                RewardKind::ExactMatch | RewardKind::Regex => Some(cfg.reward.match_score),
                _ => None,
            },
            stops: cfg.sampling.stop_tokens.iter().copied().collect(),
            sampling: cfg.sampling.clone(),
            seed: cfg.seed,
            batch: cfg.data.prompts_per_ticket,
        })
    }

    /// `n` responses per prompt from `model` at `temperature` (0: greedy), each scored, and the
    /// measures over them.
    pub fn run(
        &self,
        model: &LanguageModel,
        n: usize,
        temperature: f64,
    ) -> Result<(Vec<Scored>, EvalScores), ActorError> {
        let mut sampling = self.sampling.clone();
        sampling.temperature = temperature;
        sampling.greedy = temperature == 0.0;
        let spec = SampleSpec {
            n,
            sampling: &sampling,
            seed: self.seed,
            batch: self.batch,
        };
        let scored = sample_and_score(model, &self.prompts, spec, self.source.as_ref(), false)?;
        let scores = self.measure(&scored, n);
        Ok((scored, scores))
    }

    /// Whether a response ended with a stop token.
    pub fn stopped(&self, response: &[u32]) -> bool {
        response.last().is_some_and(|t| self.stops.contains(t))
    }

    /// Whether a score is a correct response's (`None`: the source has no notion of correct).
    pub fn correct(&self, score: f32) -> Option<bool> {
        self.correct_score.map(|m| score == m)
    }

    fn measure(&self, scored: &[Scored], n: usize) -> EvalScores {
        let (mut score_sum, mut len_sum, mut no_stop, mut right, mut total) = (0.0, 0usize, 0usize, 0usize, 0usize);
        let ks: Vec<usize> = std::iter::successors(Some(1usize), |k| Some(k * 2))
            .take_while(|&k| k <= n)
            .chain((!n.is_power_of_two()).then_some(n))
            .collect();
        let mut pass_sums = vec![0.0; ks.len()];
        for s in scored {
            let mut c = 0;
            for (r, &score) in s.responses.iter().zip(&s.scores) {
                c += self.correct(score).unwrap_or(false) as usize;
                score_sum += score as f64;
                len_sum += r.len();
                no_stop += (!self.stopped(r)) as usize;
                total += 1;
            }
            right += c;
            for (p, &k) in pass_sums.iter_mut().zip(&ks) {
                *p += pass_at_k(n, c, k);
            }
        }
        let np = scored.len().max(1) as f64;
        let total_f = total.max(1) as f64;
        EvalScores {
            prompts: scored.len(),
            score_mean: score_sum / total_f,
            accuracy: self.correct_score.map(|_| right as f64 / total_f),
            pass_at: match self.correct_score {
                Some(_) => ks.iter().zip(&pass_sums).map(|(&k, &p)| (k, p / np)).collect(),
                None => vec![],
            },
            mean_length: len_sum as f64 / total_f,
            no_stop_fraction: no_stop as f64 / total_f,
        }
    }
}

/// Evaluates `opts.model` on the config's prompts (see the module docs).
pub async fn evaluate(cfg: &Config, opts: &EvalOptions) -> Result<EvalSummary, RuntimeError> {
    let bad = |msg: String| RuntimeError::Config {
        path: "tandem eval".into(),
        msg,
    };
    if opts.samples == 0 {
        return Err(bad("--samples must be >= 1".into()));
    }
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        return Err(bad(format!(
            "--temperature must be finite and >= 0, not {}",
            opts.temperature
        )));
    }
    if opts.samples > 1 && opts.temperature == 0.0 {
        return Err(bad(
            "--samples > 1 needs --temperature > 0 (greedy decoding gives the same response every time)".into(),
        ));
    }
    let device = *cfg.placement.rollout_devices.first().ok_or_else(|| {
        bad(
            "eval samples in this process, but placement.rollout_devices is empty (every sampler is on a worker \
             node): name a local device in placement.rollout_devices"
                .into(),
        )
    })?;
    let exec = Executor::new(device, cfg.placement.threads_per_device)?;
    let (model, tokenizer) = policy(cfg, opts.model.as_deref(), exec.device())?;
    let held_out = Arc::new(HeldOut::load(cfg, &tokenizer, exec.device(), opts.limit)?);
    let (n, temperature) = (opts.samples, opts.temperature);
    let h = held_out.clone();
    let (out, _) = exec.run(move |_| h.run(&model, n, temperature)).await?;
    let (scored, scores) = out?;

    let out = &opts.out;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| RuntimeError::io(parent, e))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| RuntimeError::io(out, e))?);
    for s in &scored {
        let prompt = tokenizer.decode(&s.prompt)?;
        for (j, (r, &score)) in s.responses.iter().zip(&s.scores).enumerate() {
            let stopped = held_out.stopped(r);
            let end = if stopped { r.len() - 1 } else { r.len() };
            let line = serde_json::json!({
                "prompt": prompt,
                "response": tokenizer.decode(&r[..end])?,
                "score": score,
                "correct": held_out.correct(score),
                "length": r.len(),
                "stopped": stopped,
                "sample": j,
            });
            writeln!(f, "{line}").map_err(|e| RuntimeError::io(out, e))?;
        }
    }
    f.flush().map_err(|e| RuntimeError::io(out, e))?;
    Ok(EvalSummary {
        model: opts.model.clone(),
        samples_per_prompt: n,
        temperature: opts.temperature,
        scores,
        out: out.to_path_buf(),
    })
}

/// `RUN_DIR/eval_samples.jsonl` style default for the samples file beside a model directory.
pub fn default_out(model: Option<&Path>) -> PathBuf {
    match model.and_then(Path::parent) {
        Some(p) if !p.as_os_str().is_empty() => p.join("eval_samples.jsonl"),
        _ => PathBuf::from("eval_samples.jsonl"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_combinatorial_form() {
        // 1 - C(n - c, k) / C(n, k)
        let choose = |n: u64, k: u64| -> f64 { (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product() };
        for (n, c, k) in [(4, 1, 1), (4, 1, 2), (8, 3, 4), (10, 0, 3), (5, 5, 2), (6, 2, 5)] {
            let want = 1.0 - choose((n - c) as u64, k as u64) / choose(n as u64, k as u64);
            let got = pass_at_k(n, c, k);
            assert!((got - want).abs() < 1e-12, "n={n} c={c} k={k}: {got} vs {want}");
        }
        assert_eq!(pass_at_k(4, 1, 1), 0.25);
    }
}
