//! Where scores come from. The reward actor calls one [`RewardSource`] per batch.
//!
//! - [`RewardModelSource`]: a sequence-classification checkpoint scores prompt + response at
//!   the last real token.
//! - [`RetokenizedReward`]: a reward model whose tokenizer is not the policy's. The policy's
//!   ids are decoded to text and encoded again with the reward model's tokenizer (as OpenRLHF
//!   and TRL do), so the reward model never reads ids from another vocabulary.
//! - [`TokenSetReward`]: a rule in the spirit of the seed papers' mock sentiment task — the
//!   fraction of response tokens drawn from a given set (for example positive words).
//! - Regex, exact-match and score shaping (length and no-stop penalties) in
//!   [`crate::rule_reward`]; an external verifier program in [`crate::command_reward`].
//!
//! Sources that do not compute on the device ([`RewardSource::uses_device`] is false) are
//! called off the device executor, on a thread of their own.
//!
//! A source's error (a command that hangs, crashes or prints garbage; a prompt without a
//! reference answer) is returned from the reward actor's handler, which fails the actor with
//! that message; the run supervisor then stops the run with it.

use std::collections::HashSet;

use candle_core::Device;
use tandem_models::batch::PromptResponseBatch;
use tandem_models::{ScalarModel, TextTokenizer};

use crate::error::ActorError;

pub trait RewardSource: Send + Sync {
    /// One score per (prompt, response) pair.
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], device: &Device) -> Result<Vec<f32>, ActorError>;
    /// A short name for metrics and logs.
    fn name(&self) -> &str;
    /// Whether scoring computes on the device (a model). A source that does not (a rule, an
    /// external verifier) is scored by the reward actor on a thread of its own, beside the
    /// reference forward on the device, so a slow or hung verifier never holds the device
    /// executor that samplers share.
    fn uses_device(&self) -> bool {
        true
    }
}

pub struct RewardModelSource {
    model: ScalarModel,
}

impl RewardModelSource {
    pub fn new(model: ScalarModel) -> Self {
        Self { model }
    }
}

impl RewardSource for RewardModelSource {
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], device: &Device) -> Result<Vec<f32>, ActorError> {
        let b = PromptResponseBatch::new(prompts, responses, self.model.config().pad_id(), device)?;
        Ok(self.model.scores(&b.ids, &b.mask)?.to_vec1::<f32>()?)
    }

    fn name(&self) -> &str {
        "reward_model"
    }
}

/// Scores with `inner` (a source over `target`'s ids) what the policy wrote with its own
/// tokenizer: each prompt and prompt + response are decoded with `policy` (special tokens
/// skipped) and encoded with `target`; the prompt's ids are the prompt part when the full
/// text's encoding starts with them (else the whole text is the prompt). Sequences are cut
/// from the left to `max_len` tokens; text that encodes to nothing becomes `[fallback_id]`.
pub struct RetokenizedReward {
    inner: Box<dyn RewardSource>,
    policy: TextTokenizer,
    target: TextTokenizer,
    max_len: usize,
    fallback_id: u32,
}

impl RetokenizedReward {
    pub fn new(
        inner: Box<dyn RewardSource>,
        policy: TextTokenizer,
        target: TextTokenizer,
        max_len: usize,
        fallback_id: u32,
    ) -> Self {
        Self {
            inner,
            policy,
            target,
            max_len: max_len.max(1),
            fallback_id,
        }
    }

    /// The (prompt, response) ids under the target tokenizer for one pair of policy ids.
    pub fn retokenize(&self, prompt: &[u32], response: &[u32]) -> Result<(Vec<u32>, Vec<u32>), ActorError> {
        let tok_err = |e: tandem_models::ModelError| {
            ActorError::InvalidConfig(format!("re-tokenising for the reward model: {e}"))
        };
        let prompt_text = self.policy.decode(prompt).map_err(tok_err)?;
        let full: Vec<u32> = [prompt, response].concat();
        let full_text = self.policy.decode(&full).map_err(tok_err)?;
        let p = self.target.encode(&prompt_text).map_err(tok_err)?;
        let mut all = self.target.encode(&full_text).map_err(tok_err)?;
        if all.is_empty() {
            all.push(self.fallback_id);
        }
        let (mut p, mut r) = if !p.is_empty() && all.starts_with(&p) {
            let r = all.split_off(p.len());
            (all, r)
        } else {
            (all, vec![])
        };
        // Keep the end (the score is read at the last token): cut the prompt first.
        let over = (p.len() + r.len()).saturating_sub(self.max_len);
        if over > 0 && over < p.len() {
            p.drain(..over);
        } else if over > 0 {
            let mut both = [p, r].concat();
            both.drain(..over);
            (p, r) = (both, vec![]);
        }
        Ok((p, r))
    }
}

impl RewardSource for RetokenizedReward {
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], device: &Device) -> Result<Vec<f32>, ActorError> {
        let pairs = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| self.retokenize(p, r))
            .collect::<Result<Vec<_>, _>>()?;
        let p: Vec<&[u32]> = pairs.iter().map(|(p, _)| p.as_slice()).collect();
        let r: Vec<&[u32]> = pairs.iter().map(|(_, r)| r.as_slice()).collect();
        self.inner.score(&p, &r, device)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// Score = (number of response tokens in `tokens`) / (response length).
pub struct TokenSetReward {
    tokens: HashSet<u32>,
    name: String,
}

impl TokenSetReward {
    pub fn new(name: impl Into<String>, tokens: impl IntoIterator<Item = u32>) -> Self {
        Self {
            tokens: tokens.into_iter().collect(),
            name: name.into(),
        }
    }
}

impl RewardSource for TokenSetReward {
    fn score(&self, _prompts: &[&[u32]], responses: &[&[u32]], _device: &Device) -> Result<Vec<f32>, ActorError> {
        Ok(responses
            .iter()
            .map(|r| {
                let hits = r.iter().filter(|t| self.tokens.contains(t)).count();
                hits as f32 / r.len().max(1) as f32
            })
            .collect())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn uses_device(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_tokenizer(words: &[&str]) -> TextTokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        TextTokenizer::from_json(&json.to_string(), std::path::Path::new("<test>")).unwrap()
    }

    /// Scores each pair with its ids read as one base-10 number, prompt then response.
    struct Digits;
    impl RewardSource for Digits {
        fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], _: &Device) -> Result<Vec<f32>, ActorError> {
            Ok(prompts
                .iter()
                .zip(responses)
                .map(|(p, r)| {
                    p.iter().chain(r.iter()).fold(0.0, |acc, &d| acc * 10.0 + d as f32) + 0.1 * r.len() as f32
                })
                .collect())
        }
        fn name(&self) -> &str {
            "digits"
        }
    }

    #[test]
    fn retokenised_ids_are_the_target_vocabulary_cut_from_the_left() {
        let policy = word_tokenizer(&["<unk>", "a", "b", "c"]);
        let target = word_tokenizer(&["c", "b", "a", "<unk>"]);
        let r = |max_len| RetokenizedReward::new(Box::new(Digits), policy.clone(), target.clone(), max_len, 3);
        // "a b" + "c": the prompt is [2, 1] in the target's ids and the response [0].
        assert_eq!(r(8).retokenize(&[1, 2], &[3]).unwrap(), (vec![2, 1], vec![0]));
        assert_eq!(r(2).retokenize(&[1, 2], &[3]).unwrap(), (vec![1], vec![0]));
        assert_eq!(r(1).retokenize(&[1, 2], &[3]).unwrap(), (vec![0], vec![]));
        // The inner source sees the target's ids: 21 then 0, with a response of one token.
        let s = r(8).score(&[&[1, 2]], &[&[3]], &Device::Cpu).unwrap();
        assert!((s[0] - 210.1).abs() < 1e-3, "{s:?}");
    }

    #[test]
    fn token_set_reward_is_the_fraction_of_hits() {
        let r = TokenSetReward::new("positive", [3, 5]);
        let s = r
            .score(&[&[1], &[1], &[1]], &[&[3, 5, 7, 9], &[8], &[5]], &Device::Cpu)
            .unwrap();
        assert_eq!(s, vec![0.5, 0.0, 1.0]);
    }
}
