//! Where scores come from. The reward actor calls one [`RewardSource`] per batch.
//!
//! - [`RewardModelSource`]: a sequence-classification checkpoint scores prompt + response at
//!   the last real token.
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
use tandem_models::ScalarModel;

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

    #[test]
    fn token_set_reward_is_the_fraction_of_hits() {
        let r = TokenSetReward::new("positive", [3, 5]);
        let s = r
            .score(&[&[1], &[1], &[1]], &[&[3, 5, 7, 9], &[8], &[5]], &Device::Cpu)
            .unwrap();
        assert_eq!(s, vec![0.5, 0.0, 1.0]);
    }
}
