//! placeholder
use serde::{Deserialize, Serialize};

use crate::train_rm::NormalizeKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockLabellerConfig {
    pub pairs: usize,
    pub eval_pairs: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub normalize: NormalizeKind,
    pub min_eval_accuracy: f64,
}

impl Default for MockLabellerConfig {
    fn default() -> Self {
        Self {
            pairs: 512,
            eval_pairs: 128,
            epochs: 4,
            batch_size: 32,
            lr: 1e-3,
            normalize: NormalizeKind::GainBias,
            min_eval_accuracy: 0.0,
        }
    }
}

impl MockLabellerConfig {
    pub fn validate(&self, _cfg: &crate::Config) -> Result<(), String> {
        if self.pairs < 2 || self.eval_pairs < 1 || self.epochs == 0 || self.batch_size == 0 {
            return Err("mock_labeller: pairs >= 2, eval_pairs >= 1, epochs >= 1, batch_size >= 1".into());
        }
        Ok(())
    }
}
