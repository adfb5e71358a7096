//! `tandem inspect logprobs|generate|score`: one model's numbers for one token sequence, as a
//! single JSON object on stdout.
//!
//! The sequence is given either as `--ids 1,2,3` or as `--text "..."`, which is encoded with
//! `DIR/tokenizer.json` (no special tokens added); with `--text` the output also carries the
//! `input_ids` the text became. Every float is printed as the exact value the model computed
//! (f32 widened to f64, shortest round-trip form).
//!
//! - `logprobs`: `{"next_token_logprobs": [...]}`, n-1 values, log p(id[i+1] | id[..=i]).
//! - `generate`: `{"new_ids": [...], "logprobs": [...], "full_logprobs": [...], "stopped": b}`
//!   (plus the decoded `"text"` with `--text`). `logprobs` are log q under the distribution
//!   actually sampled from (0 for greedy), `full_logprobs` the untruncated log-softmax at the
//!   sampling temperature; see `tandem_models::generation`.
//! - `score`: `{"score": x}` from a `*ForSequenceClassification` checkpoint, read at the last
//!   token.
//!
//! Asking a language model for a score (or a reward model for log-probs), a token id outside the
//! vocabulary, or a model directory that does not exist is bad input: exit status 2.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Map, Value};
use tandem_models::{
    generate, Decoding, HeadKind, LanguageModel, ModelConfig, SamplingConfig, ScalarModel, TextTokenizer,
};

use crate::device::DeviceSpec;
use crate::error::bad_input;

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Log-probability of every token given the tokens before it.
    Logprobs(LogprobsArgs),
    /// Continue the sequence (greedy or sampled).
    Generate(GenerateArgs),
    /// Reward-model score of the sequence.
    Score(ScoreArgs),
}

/// The model and the token sequence every inspect subcommand takes.
#[derive(Debug, Args)]
pub struct ModelInput {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json for --text).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    tokens: TokensArg,
    /// Device to run on: cpu, or cuda:N in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceSpec,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct TokensArg {
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_name = "ID,...")]
    ids: Option<TokenIds>,
    /// Text to encode with DIR/tokenizer.json.
    #[arg(long)]
    text: Option<String>,
}

/// A comma-separated list of token ids.
#[derive(Debug, Clone)]
struct TokenIds(Vec<u32>);

impl FromStr for TokenIds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("no token ids given".into());
        }
        s.split(',')
            .map(|p| {
                let p = p.trim();
                p.parse::<u32>()
                    .map_err(|_| format!("{p:?} is not a token id (expected comma-separated non-negative integers)"))
            })
            .collect::<Result<_, _>>()
            .map(TokenIds)
    }
}

#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    input: ModelInput,
    /// Divide the logits by this before the softmax (match a sampler's temperature).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    input: ModelInput,
    /// Number of tokens to generate (fewer if a stop token comes first).
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample from the k most likely tokens only; 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after emitting this token (kept in the output); repeatable or comma-separated.
    #[arg(long = "stop-token", value_name = "ID", value_delimiter = ',')]
    stop_tokens: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    input: ModelInput,
}

pub fn run(cmd: InspectCommand) -> anyhow::Result<()> {
    let out = match cmd {
        InspectCommand::Logprobs(args) => logprobs(&args)?,
        InspectCommand::Generate(args) => generate_cmd(&args)?,
        InspectCommand::Score(args) => score(&args)?,
    };
    crate::print_json(&Value::Object(out))
}

/// A checked model directory, its config, the device and the token sequence.
struct Prepared {
    dir: PathBuf,
    config: ModelConfig,
    device: Device,
    ids: Vec<u32>,
    /// Present when the sequence came from `--text`.
    tokenizer: Option<TextTokenizer>,
}

impl Prepared {
    /// Validates `input` for a model with the `want` head, without loading weights yet.
    fn new(input: &ModelInput, want: HeadKind, what: &str) -> anyhow::Result<Self> {
        let dir = &input.model;
        if !dir.exists() {
            return bad_input!("model directory {} does not exist", dir.display());
        }
        if !dir.is_dir() {
            return bad_input!("--model {} is not a directory", dir.display());
        }
        let config = ModelConfig::from_dir(dir).with_context(|| format!("reading the model in {}", dir.display()))?;
        if config.head != want {
            let (is, needs) = match want {
                HeadKind::Scalar => (
                    "a language model",
                    "a reward model (*ForSequenceClassification) checkpoint",
                ),
                HeadKind::CausalLm => ("a reward/value model", "a language model (*ForCausalLM) checkpoint"),
            };
            return bad_input!(
                "{} holds {} ({}); `inspect {what}` needs {needs}",
                dir.display(),
                config.hf_class(),
                is
            );
        }
        let (ids, tokenizer) = match (&input.tokens.ids, &input.tokens.text) {
            (Some(TokenIds(ids)), _) => (ids.clone(), None),
            (None, Some(text)) => {
                let tok = TextTokenizer::from_dir(dir).context("--text needs the model's tokenizer")?;
                let ids = tok.encode(text).context("encoding --text")?;
                (ids, Some(tok))
            }
            (None, None) => return bad_input!("give the sequence with --ids or --text"),
        };
        if ids.is_empty() {
            return bad_input!("--text encodes to no tokens");
        }
        let vocab = config.dims().vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return bad_input!(
                "token id {id} is outside the vocabulary of {} ({vocab} tokens)",
                dir.display()
            );
        }
        let device = input.device.open()?;
        Ok(Self {
            dir: dir.clone(),
            config,
            device,
            ids,
            tokenizer,
        })
    }

    /// The sequence as a (1, n) id tensor and its all-ones mask.
    fn tensors(&self) -> anyhow::Result<(Tensor, Tensor)> {
        let n = self.ids.len();
        let ids = Tensor::from_vec(self.ids.clone(), (1, n), &self.device)?;
        let mask = Tensor::ones((1, n), DType::F32, &self.device)?;
        Ok((ids, mask))
    }

    /// A JSON object to fill, starting with the ids `--text` became.
    fn output(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if self.tokenizer.is_some() {
            out.insert("input_ids".into(), json!(self.ids));
        }
        out
    }

    fn language_model(&self) -> anyhow::Result<LanguageModel> {
        LanguageModel::load(&self.dir, &self.device).with_context(|| loading(&self.dir))
    }
}

fn loading(dir: &Path) -> String {
    format!("loading the model in {}", dir.display())
}

fn widen(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

fn logprobs(args: &LogprobsArgs) -> anyhow::Result<Map<String, Value>> {
    let p = Prepared::new(&args.input, HeadKind::CausalLm, "logprobs")?;
    if p.ids.len() < 2 {
        return bad_input!("`inspect logprobs` needs at least 2 tokens, got {}", p.ids.len());
    }
    if !(args.temperature > 0.0 && args.temperature.is_finite()) {
        return bad_input!("--temperature must be positive, got {}", args.temperature);
    }
    let model = p.language_model()?;
    let (ids, mask) = p.tensors()?;
    let lp = model
        .token_logprobs(&ids, &mask, 0, args.temperature)
        .context("computing token log-probs")?
        .logprobs
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let mut out = p.output();
    out.insert("next_token_logprobs".into(), json!(widen(&lp)));
    Ok(out)
}

fn generate_cmd(args: &GenerateArgs) -> anyhow::Result<Map<String, Value>> {
    let p = Prepared::new(&args.input, HeadKind::CausalLm, "generate")?;
    let vocab = p.config.dims().vocab_size;
    if let Some(id) = args.stop_tokens.iter().find(|&&id| id as usize >= vocab) {
        return bad_input!("--stop-token {id} is outside the vocabulary ({vocab} tokens)");
    }
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        greedy: args.greedy,
        stop_tokens: args.stop_tokens.clone(),
        stop_strings: vec![],
    };
    let model = p.language_model()?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let g = generate(&model, std::slice::from_ref(&p.ids), &cfg, &mut rng, Decoding::Cached).context("generating")?;
    let mut out = p.output();
    out.insert("new_ids".into(), json!(g.responses[0]));
    out.insert("logprobs".into(), json!(widen(&g.logprobs[0])));
    out.insert("full_logprobs".into(), json!(widen(&g.full_logprobs[0])));
    out.insert("stopped".into(), json!(g.stopped[0]));
    if let Some(tok) = &p.tokenizer {
        let text = tok.decode(&g.responses[0]).context("decoding the generated ids")?;
        out.insert("text".into(), json!(text));
    }
    Ok(out)
}

fn score(args: &ScoreArgs) -> anyhow::Result<Map<String, Value>> {
    let p = Prepared::new(&args.input, HeadKind::Scalar, "score")?;
    let model = ScalarModel::load(&p.dir, &p.device).with_context(|| loading(&p.dir))?;
    let (ids, mask) = p.tensors()?;
    let score = model.scores(&ids, &mask).context("scoring")?.to_vec1::<f32>()?[0];
    let mut out = p.output();
    out.insert("score".into(), json!(f64::from(score)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_ids() {
        assert_eq!("1,2, 3".parse::<TokenIds>().unwrap().0, vec![1, 2, 3]);
        for bad in ["", "1,x", "1,,2", "-1", "4294967296"] {
            assert!(bad.parse::<TokenIds>().is_err(), "{bad:?} parsed");
        }
    }
}
