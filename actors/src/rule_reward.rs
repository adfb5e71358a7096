//! Rule-based reward sources over decoded response text, and score shaping that can wrap any
//! source.
//!
//! Text: a response is decoded with the policy's tokenizer up to (not including) its first stop
//! token, special tokens skipped. Scores are plain numbers chosen in the config.
//!
//! - [`RegexReward`]: `hit` when the pattern matches anywhere in the response text, else `miss`
//!   (defaults 1 and 0).
//! - [`ExactMatchReward`]: `hit` when the response text equals the prompt's reference answer,
//!   else `miss`. Both sides are compared after trimming, collapsing runs of whitespace to one
//!   space and lower-casing. The answers come from the prompts file (`"answer"` next to
//!   `"prompt"`) as a map keyed by the prompt's token ids exactly as the pipeline feeds them
//!   (tokenised and truncated the same way), so the [`RewardSource`] trait keeps its
//!   ids-only signature. A prompt without an answer is an error, not a silent 0.
//! - [`ShapedReward`] wraps another source and applies, in order:
//!   1. a length penalty `score -= coef * max(0, len - target)` (`len` in response tokens);
//!   2. the seed papers' fixed penalty (Ziegler et al. 2019, Stiennon et al. 2020): a response
//!      with no stop token among its first `window` tokens gets `penalty` (typically -1)
//!      *instead of* its score.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::Device;
use regex::Regex;
use tandem_models::TextTokenizer;

use crate::error::ActorError;
use crate::reward_source::RewardSource;

/// Decodes responses to text, cut at the first stop token.
#[derive(Debug, Clone)]
pub struct ResponseText {
    tokenizer: Arc<TextTokenizer>,
    stop_tokens: HashSet<u32>,
}

impl ResponseText {
    pub fn new(tokenizer: Arc<TextTokenizer>, stop_tokens: impl IntoIterator<Item = u32>) -> Self {
        Self {
            tokenizer,
            stop_tokens: stop_tokens.into_iter().collect(),
        }
    }

    /// The response's text before its first stop token.
    pub fn response(&self, ids: &[u32]) -> Result<String, ActorError> {
        let end = ids
            .iter()
            .position(|t| self.stop_tokens.contains(t))
            .unwrap_or(ids.len());
        Ok(self.tokenizer.decode(&ids[..end])?)
    }

    /// Any sequence (a prompt), decoded in full.
    pub fn text(&self, ids: &[u32]) -> Result<String, ActorError> {
        Ok(self.tokenizer.decode(ids)?)
    }
}

/// `hit` if `pattern` matches the response text, else `miss`.
pub struct RegexReward {
    pattern: Regex,
    text: ResponseText,
    hit: f32,
    miss: f32,
}

impl RegexReward {
    /// An error naming the pattern when it does not compile.
    pub fn new(pattern: &str, text: ResponseText, hit: f32, miss: f32) -> Result<Self, ActorError> {
        let pattern =
            Regex::new(pattern).map_err(|e| ActorError::InvalidConfig(format!("reward regex {pattern:?}: {e}")))?;
        Ok(Self {
            pattern,
            text,
            hit,
            miss,
        })
    }
}

impl RewardSource for RegexReward {
    fn score(&self, _prompts: &[&[u32]], responses: &[&[u32]], _device: &Device) -> Result<Vec<f32>, ActorError> {
        responses
            .iter()
            .map(|r| {
                let t = self.text.response(r)?;
                Ok(if self.pattern.is_match(&t) { self.hit } else { self.miss })
            })
            .collect()
    }

    fn name(&self) -> &str {
        "regex"
    }

    fn uses_device(&self) -> bool {
        false
    }
}

/// Trimmed, whitespace-collapsed, lower-cased text: what [`ExactMatchReward`] compares.
pub fn normalize_answer(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `hit` if the response text equals the prompt's reference answer (normalised), else `miss`.
pub struct ExactMatchReward {
    answers: HashMap<Vec<u32>, String>,
    text: ResponseText,
    hit: f32,
    miss: f32,
}

impl ExactMatchReward {
    /// `answers`: prompt ids (as the pipeline feeds them) → reference answer.
    pub fn new(answers: HashMap<Vec<u32>, String>, text: ResponseText, hit: f32, miss: f32) -> Self {
        let answers = answers.into_iter().map(|(k, v)| (k, normalize_answer(&v))).collect();
        Self {
            answers,
            text,
            hit,
            miss,
        }
    }
}

impl RewardSource for ExactMatchReward {
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], _device: &Device) -> Result<Vec<f32>, ActorError> {
        prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| {
                let Some(answer) = self.answers.get(*p) else {
                    let text = self.text.text(p).unwrap_or_default();
                    return Err(ActorError::InvalidConfig(format!(
                        "exact_match reward: no reference answer for prompt {text:?} (add \"answer\" to its line in the prompts file)"
                    )));
                };
                Ok(if normalize_answer(&self.text.response(r)?) == *answer {
                    self.hit
                } else {
                    self.miss
                })
            })
            .collect()
    }

    fn name(&self) -> &str {
        "exact_match"
    }

    fn uses_device(&self) -> bool {
        false
    }
}

/// `score -= coef * max(0, len - target)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthPenalty {
    pub coef: f32,
    pub target: usize,
}

/// A response with no stop token among its first `window` tokens scores `penalty`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoStopPenalty {
    pub window: usize,
    pub stop_tokens: HashSet<u32>,
    pub penalty: f32,
}

/// Another source with a length penalty and/or the fixed no-stop penalty applied (see the
/// module docs for the order).
pub struct ShapedReward {
    inner: Arc<dyn RewardSource>,
    length: Option<LengthPenalty>,
    no_stop: Option<NoStopPenalty>,
}

impl ShapedReward {
    pub fn new(inner: Arc<dyn RewardSource>, length: Option<LengthPenalty>, no_stop: Option<NoStopPenalty>) -> Self {
        Self { inner, length, no_stop }
    }
}

impl RewardSource for ShapedReward {
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], device: &Device) -> Result<Vec<f32>, ActorError> {
        let mut scores = self.inner.score(prompts, responses, device)?;
        for (s, r) in scores.iter_mut().zip(responses) {
            if let Some(l) = self.length {
                *s -= l.coef * r.len().saturating_sub(l.target) as f32;
            }
            if let Some(n) = &self.no_stop {
                let w = n.window.min(r.len());
                if !r[..w].iter().any(|t| n.stop_tokens.contains(t)) {
                    *s = n.penalty;
                }
            }
        }
        Ok(scores)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn uses_device(&self) -> bool {
        self.inner.uses_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_source::TokenSetReward;

    /// A word-level tokenizer: `<eos>` = 0, then `the cat sat 42 forty two`.
    fn text() -> ResponseText {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,
          "added_tokens":[{"id":0,"content":"<eos>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
          "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
          "decoder":null,
          "model":{"type":"WordLevel","vocab":{"<eos>":0,"<unk>":1,"the":2,"cat":3,"sat":4,"42":5,"forty":6,"two":7,"Two":8},"unk_token":"<unk>"}}"#;
        let tok = TextTokenizer::from_json(json, std::path::Path::new("<test>")).unwrap();
        ResponseText::new(Arc::new(tok), [0])
    }

    #[test]
    fn regex_scores_match_and_miss_on_text_before_the_stop_token() {
        let r = RegexReward::new(r"\b\d+\b", text(), 1.0, -0.5).unwrap();
        // "the 42" matches; "the cat" does not; "cat <eos> 42": the 42 is after the stop token.
        let s = r
            .score(&[&[2], &[2], &[2]], &[&[2, 5], &[2, 3], &[3, 0, 5]], &Device::Cpu)
            .unwrap();
        assert_eq!(s, vec![1.0, -0.5, -0.5]);
        let e = RegexReward::new("(", text(), 1.0, 0.0).err().unwrap().to_string();
        assert!(e.contains("reward regex \"(\""), "{e}");
    }

    #[test]
    fn exact_match_compares_normalised_text_with_the_prompts_answer() {
        let answers = HashMap::from([(vec![2, 3], "Forty   two ".to_string()), (vec![4], "42".to_string())]);
        let r = ExactMatchReward::new(answers, text(), 1.0, 0.0);
        let s = r
            .score(
                &[&[2, 3], &[2, 3], &[4], &[4]],
                &[&[6, 8, 0, 3], &[6], &[5], &[5, 5]],
                &Device::Cpu,
            )
            .unwrap();
        // "forty Two" == "forty two" after lower-casing; "forty" != ; "42" == ; "42 42" !=.
        assert_eq!(s, vec![1.0, 0.0, 1.0, 0.0]);
        let e = r.score(&[&[3]], &[&[5]], &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("no reference answer for prompt \"cat\""), "{e}");
    }

    #[test]
    fn length_and_no_stop_penalties() {
        let base: Arc<dyn RewardSource> = Arc::new(TokenSetReward::new("pos", [5]));
        let shaped = ShapedReward::new(base.clone(), Some(LengthPenalty { coef: 0.1, target: 2 }), None);
        // Base 0.5, len 4 -> 0.5 - 0.1 * 2 = 0.3; base 1.0, len 1 -> 1.0 (under target).
        let s = shaped
            .score(&[&[1], &[1]], &[&[5, 5, 3, 3], &[5]], &Device::Cpu)
            .unwrap();
        assert!((s[0] - 0.3).abs() < 1e-6 && s[1] == 1.0, "{s:?}");
        let stop = NoStopPenalty {
            window: 3,
            stop_tokens: HashSet::from([0]),
            penalty: -1.0,
        };
        let shaped = ShapedReward::new(base, None, Some(stop));
        // Stop at position 2 (inside the window): keeps 1/3; stop at position 3: -1; no stop: -1.
        let s = shaped
            .score(&[&[1], &[1], &[1]], &[&[5, 3, 0], &[5, 3, 3, 0], &[5, 5]], &Device::Cpu)
            .unwrap();
        assert!((s[0] - 1.0 / 3.0).abs() < 1e-6, "{s:?}");
        assert_eq!(&s[1..], &[-1.0, -1.0]);
    }
}
