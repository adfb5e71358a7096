//! Building the reward source that `[reward]` names, and the score shaping any source can get.
//!
//! [`reward_source`] builds the reward model ([`reward_model_source`]) or the positive-words
//! rule itself, calls [`rule_source`] for `kind = "regex"`,
//! `"exact_match"` and `"command"`, and wraps every source with [`shaped`] when
//! `length_penalty` or `no_stop_penalty` is set. Response text is decoded with the policy's
//! tokenizer and cut at the first of `sampling.stop_tokens`.
//!
//! Exact match learns each prompt's reference answer from the prompts file: a line may carry
//! `"answer"` beside `"prompt"`. The answers are keyed by the prompt's token ids, tokenised and
//! left-truncated exactly as the pipeline feeds prompts, so the source recognises the prompt
//! from the ids the reward stage hands it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem_actors::command_reward::{CommandReward, CommandSpec};
use tandem_actors::reward_source::{RetokenizedReward, RewardModelSource, RewardSource, TokenSetReward};
use tandem_actors::rule_reward::{
    ExactMatchReward, LengthPenalty, NoStopPenalty, RegexReward, ResponseText, ShapedReward,
};
use tandem_models::{ModelConfig, ScalarModel, TextTokenizer};

use crate::config::{builtin, Config, RewardKind};
use crate::error::RuntimeError;
use crate::prompts::read_jsonl;

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Config {
        path: "config.toml [reward]".into(),
        msg,
    }
}

/// The reward source the config names: the reward model, the positive-words rule over the
/// policy's tokenizer, or a rule/command source ([`crate::reward_sources`]), with the config's
/// score shaping. `tandem replay --rescore` builds it the same way.
pub fn reward_source(
    cfg: &Config,
    tokenizer: &TextTokenizer,
    device: &candle_core::Device,
) -> Result<Arc<dyn RewardSource>, RuntimeError> {
    let source: Arc<dyn RewardSource> = match cfg.reward.kind {
        RewardKind::RewardModel => {
            let dir = cfg.reward.model.as_ref().ok_or_else(|| RuntimeError::Config {
                path: "config.toml".into(),
                msg: "reward.model is required with kind = \"reward_model\"".into(),
            })?;
            let policy_vocab = match &cfg.models.policy.path {
                Some(policy_dir) => ModelConfig::from_dir(policy_dir)?.dims().vocab_size,
                None => tokenizer.vocab_size(),
            };
            let longest = cfg.data.prompt_max_tokens + cfg.sampling.max_new_tokens;
            reward_model_source(dir, tokenizer, policy_vocab, Some(longest), device)?
        }
        RewardKind::PositiveWords => {
            let words: Vec<String> = cfg
                .reward
                .words
                .clone()
                .unwrap_or_else(|| builtin::POSITIVE_WORDS.iter().map(|s| s.to_string()).collect());
            let ids = builtin::word_token_ids(tokenizer, &words);
            if ids.is_empty() {
                return Err(RuntimeError::InvalidArgument(
                    "reward.words: none of the words is a token of the policy's tokenizer".into(),
                ));
            }
            Arc::new(TokenSetReward::new("positive_words", ids))
        }
        _ => rule_source(cfg, tokenizer)?,
    };
    shaped(cfg, source)
}

/// The reward model in `dir` as a source over the policy's ids. When its `tokenizer.json` has
/// the policy's vocabulary (or it has none, which is taken to mean the policy's) it scores the
/// ids as they are, and its embedding table must cover the policy's `policy_vocab` ids and
/// `longest` positions, else a load-time error naming its config.json (exit 2). With another
/// tokenizer, text is decoded and re-tokenised for it ([`RetokenizedReward`]).
pub fn reward_model_source(
    dir: &Path,
    tokenizer: &TextTokenizer,
    policy_vocab: usize,
    longest: Option<usize>,
    device: &candle_core::Device,
) -> Result<Arc<dyn RewardSource>, RuntimeError> {
    let model = ScalarModel::load(dir, device)?;
    let dims = model.config().dims();
    let own = if dir.join("tokenizer.json").is_file() {
        Some(TextTokenizer::from_dir(dir)?)
    } else {
        None
    };
    if let Some(own) = own.filter(|t| !t.same_vocabulary(tokenizer)) {
        tracing::info!(
            reward_model = %dir.display(),
            "the reward model's tokenizer is not the policy's: responses are decoded and re-tokenised for it"
        );
        let pad = model.config().pad_id();
        let inner = Box::new(RewardModelSource::new(model));
        return Ok(Arc::new(RetokenizedReward::new(
            inner,
            tokenizer.clone(),
            own,
            dims.max_positions,
            pad,
        )));
    }
    let bad = |msg: String| {
        Err(RuntimeError::Config {
            path: dir.join("config.json"),
            msg,
        })
    };
    if dims.vocab_size < policy_vocab {
        return bad(format!(
            "reward.model: vocab_size is {} but the policy's vocabulary has {policy_vocab} ids, under the same \
             tokenizer: the policy can sample ids this reward model has no embedding for. Use a reward model \
             trained over the policy's vocabulary (or give it its own tokenizer.json, and text is re-tokenised)",
            dims.vocab_size
        ));
    }
    if let Some(n) = longest.filter(|&n| n > dims.max_positions) {
        return bad(format!(
            "reward.model: it reads at most {} positions, but a prompt and its response take up to {n} \
             (data.prompt_max_tokens + sampling.max_new_tokens)",
            dims.max_positions
        ));
    }
    Ok(Arc::new(RewardModelSource::new(model)))
}

/// The regex, exact-match or command source of `cfg.reward`.
pub fn rule_source(cfg: &Config, tokenizer: &TextTokenizer) -> Result<Arc<dyn RewardSource>, RuntimeError> {
    let r = &cfg.reward;
    let text = ResponseText::new(Arc::new(tokenizer.clone()), cfg.sampling.stop_tokens.iter().copied());
    Ok(match r.kind {
        RewardKind::Regex => {
            let pattern = r
                .pattern
                .as_deref()
                .ok_or_else(|| bad("reward.pattern is required with kind = \"regex\"".into()))?;
            Arc::new(
                RegexReward::new(pattern, text, r.match_score, r.miss_score)
                    .map_err(|e| bad(format!("reward.pattern: {e}")))?,
            )
        }
        RewardKind::ExactMatch => {
            let answers = load_answers(
                &cfg.data.prompts,
                (&cfg.data.prompt_key, &cfg.data.answer_key),
                tokenizer,
                cfg.data.prompt_max_tokens,
            )?;
            if answers.is_empty() {
                return Err(bad(format!(
                    "kind = \"exact_match\" needs {:?} (data.answer_key) on the lines of {}",
                    cfg.data.answer_key,
                    cfg.data.prompts.display()
                )));
            }
            Arc::new(ExactMatchReward::new(answers, text, r.match_score, r.miss_score))
        }
        RewardKind::Command => {
            let spec = CommandSpec {
                argv: r.command.clone().unwrap_or_default(),
                cwd: r.cwd.clone(),
                timeout: Duration::from_secs_f64(r.timeout_s),
                max_restarts: r.max_restarts,
            };
            Arc::new(CommandReward::new(spec, text)?)
        }
        k => {
            return Err(RuntimeError::InvalidArgument(format!(
                "{k:?} is not a rule or command reward"
            )))
        }
    })
}

/// `source` with the config's length and no-stop penalties, or `source` itself without them.
pub fn shaped(cfg: &Config, source: Arc<dyn RewardSource>) -> Result<Arc<dyn RewardSource>, RuntimeError> {
    let r = &cfg.reward;
    if r.length_penalty.is_none() && r.no_stop_penalty.is_none() {
        return Ok(source);
    }
    let length = r.length_penalty.map(|coef| LengthPenalty {
        coef,
        target: r.length_target,
    });
    let no_stop = match r.no_stop_penalty {
        Some(penalty) => {
            if cfg.sampling.stop_tokens.is_empty() {
                return Err(bad("reward.no_stop_penalty needs sampling.stop_tokens".into()));
            }
            Some(NoStopPenalty {
                window: r.stop_window.unwrap_or(cfg.sampling.max_new_tokens),
                stop_tokens: cfg.sampling.stop_tokens.iter().copied().collect::<HashSet<u32>>(),
                penalty,
            })
        }
        None => None,
    };
    Ok(Arc::new(ShapedReward::new(source, length, no_stop)))
}

/// Prompt ids (as the pipeline feeds them) → answer, for the lines that have one; `keys` are
/// the prompt and answer fields (`data.prompt_key`, `data.answer_key`).
pub fn load_answers(
    path: &Path,
    keys: (&str, &str),
    tokenizer: &TextTokenizer,
    max_tokens: usize,
) -> Result<HashMap<Vec<u32>, String>, RuntimeError> {
    let mut out = HashMap::new();
    read_jsonl(path, |v| {
        let (prompt_key, answer_key) = keys;
        let Some(answer) = v.get(answer_key) else { return Ok(()) };
        let answer = answer
            .as_str()
            .ok_or_else(|| format!("\"{answer_key}\" must be a string"))?;
        let prompt = crate::prompts::prompt_text(v, prompt_key, tokenizer)?;
        // Not `encode_prompt`: a prompt line the prompt loader skips must not fail here.
        let mut ids = tokenizer.encode(&prompt).map_err(|e| e.to_string())?;
        if ids.len() > max_tokens {
            ids.drain(..ids.len() - max_tokens);
        }
        out.insert(ids, answer.to_string());
        Ok(())
    })?;
    Ok(out)
}
