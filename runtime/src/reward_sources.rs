//! Building the rule-based and external-command reward sources that `[reward]` names, and the
//! score shaping any source can get.
//!
//! [`crate::pipeline::reward_source`] calls [`rule_source`] for `kind = "regex"`,
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
use tandem_actors::reward_source::RewardSource;
use tandem_actors::rule_reward::{
    ExactMatchReward, LengthPenalty, NoStopPenalty, RegexReward, ResponseText, ShapedReward,
};
use tandem_models::TextTokenizer;

use crate::config::{Config, RewardKind};
use crate::error::RuntimeError;
use crate::prompts::read_jsonl;

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Config {
        path: "config.toml [reward]".into(),
        msg,
    }
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
