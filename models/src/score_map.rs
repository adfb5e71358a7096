//! Weight surgery on a reward model: scoring (prompt, response) pairs, and folding an affine map
//! `gain * s + bias` of its scores into its weights, so that the saved model scores
//! normalised values by itself.
//!
//! The HF sequence-classification layout has no bias on the score head, so the gain multiplies
//! `score.weight` and the bias is folded into the final layer norm's bias, the only input of
//! the head: `ln_f.bias += bias * w / |w|^2` for the new head `w`. That is exact for GPT-2; the
//! RMSNorm of Qwen2/Llama has no bias, so those models take a gain only (an error otherwise).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::batch::PromptResponseBatch;
use crate::error::{ModelError, Result};
use crate::{ModelConfig, ScalarModel};

/// Scores of `pairs` (prompt ids, response ids) under `weights`, in batches of 64.
pub fn score_pairs(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    pairs: &[(Vec<u32>, Vec<u32>)],
    device: &Device,
) -> Result<Vec<f64>> {
    let model = ScalarModel::from_tensors(config, weights.clone(), device)?;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(64) {
        let p: Vec<&[u32]> = chunk.iter().map(|(p, _)| p.as_slice()).collect();
        let r: Vec<&[u32]> = chunk.iter().map(|(_, r)| r.as_slice()).collect();
        let b = PromptResponseBatch::new(&p, &r, config.pad_id(), device)?;
        out.extend(
            model
                .scores(&b.ids, &b.mask)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from),
        );
    }
    Ok(out)
}

/// Changes `weights` so that the model scores `gain * s + bias` (see the module docs).
pub fn fold_score_map(config: &ModelConfig, weights: &mut HashMap<String, Tensor>, gain: f64, bias: f64) -> Result<()> {
    let w = weights
        .get("score.weight")
        .ok_or_else(|| ModelError::InvalidArgument("normalize: no score.weight".into()))?
        .affine(gain, 0.0)?;
    if bias != 0.0 {
        let key = "transformer.ln_f.bias";
        let b = weights.get(key).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "a score bias needs a bias in the final norm to fold it into; {} has none (normalise with \"none\", or use a GPT-2 backbone)",
                config.hf_class()
            ))
        })?;
        let w_row = w.squeeze(0)?;
        let norm2 = w_row.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        if norm2 <= 0.0 {
            return Err(ModelError::InvalidArgument(
                "normalize: the score head is all zeros".into(),
            ));
        }
        let nb = (b + w_row.affine(bias / norm2, 0.0)?)?;
        weights.insert(key.to_string(), nb);
    }
    weights.insert("score.weight".to_string(), w);
    Ok(())
}
