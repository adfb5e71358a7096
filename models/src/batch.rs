//! Padding variable-length token sequences into batches.
//!
//! Prompts are left-padded (so every row's last prompt token sits at the same column and
//! generation appends in lockstep); responses are right-padded. The mask marks real tokens
//! with 1.0 and padding with 0.0; position ids are derived from it by the model.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Token ids (b, t) and the matching 0/1 mask rows.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    pub ids: Tensor,
    pub mask: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSide {
    Left,
    Right,
}

impl PaddedBatch {
    pub fn new(seqs: &[Vec<u32>], pad_id: u32, side: PadSide, device: &Device) -> Result<Self> {
        if seqs.is_empty() {
            return Err(ModelError::InvalidArgument("empty batch".into()));
        }
        if let Some(i) = seqs.iter().position(Vec::is_empty) {
            return Err(ModelError::InvalidArgument(format!(
                "sequence {i} of the batch is empty"
            )));
        }
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len());
        for s in seqs {
            let pad = t - s.len();
            let mut m = vec![0.0f32; t];
            match side {
                PadSide::Left => {
                    ids.extend(std::iter::repeat_n(pad_id, pad));
                    ids.extend_from_slice(s);
                    m[pad..].fill(1.0);
                }
                PadSide::Right => {
                    ids.extend_from_slice(s);
                    ids.extend(std::iter::repeat_n(pad_id, pad));
                    m[..s.len()].fill(1.0);
                }
            }
            mask.push(m);
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
            mask,
        })
    }

    /// The mask as an f32 tensor (b, t).
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.mask.len(), self.mask.first().map_or(0, Vec::len));
        Ok(Tensor::from_vec(self.mask.concat(), (b, t), device)?)
    }
}

/// Prompt + response rows laid out for scoring: prompts left-padded to a common width `P`,
/// responses right-padded after them, so response token j of every row sits at column P + j
/// and its log-prob comes from column P - 1 + j (`token_logprobs(.., start = P - 1, ..)`).
#[derive(Debug, Clone)]
pub struct PromptResponseBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    /// Common prompt width P.
    pub prompt_width: usize,
    /// Common response width R.
    pub response_width: usize,
    /// (b, R) mask of real response tokens.
    pub response_mask: Tensor,
}

impl PromptResponseBatch {
    pub fn new(prompts: &[&[u32]], responses: &[&[u32]], pad_id: u32, device: &Device) -> Result<Self> {
        if prompts.len() != responses.len() || prompts.is_empty() {
            return Err(ModelError::InvalidArgument(format!(
                "{} prompts for {} responses",
                prompts.len(),
                responses.len()
            )));
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(ModelError::InvalidArgument(format!("prompt {i} of the batch is empty")));
        }
        let p_w = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let r_w = responses.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let b = prompts.len();
        let (mut ids, mut mask, mut rmask) = (Vec::new(), Vec::new(), Vec::new());
        for (p, r) in prompts.iter().zip(responses) {
            ids.extend(std::iter::repeat_n(pad_id, p_w - p.len()));
            ids.extend_from_slice(p);
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad_id, r_w - r.len()));
            mask.extend(std::iter::repeat_n(0f32, p_w - p.len()));
            mask.extend(std::iter::repeat_n(1f32, p.len() + r.len()));
            mask.extend(std::iter::repeat_n(0f32, r_w - r.len()));
            rmask.extend((0..r_w).map(|j| if j < r.len() { 1f32 } else { 0.0 }));
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, p_w + r_w), device)?,
            mask: Tensor::from_vec(mask, (b, p_w + r_w), device)?,
            prompt_width: p_w,
            response_width: r_w,
            response_mask: Tensor::from_vec(rmask, (b, r_w), device)?,
        })
    }

    /// Right-pads per-row values (log-probs, values) to (b, R) with zeros.
    pub fn pad_rows(&self, rows: &[&[f32]], device: &Device) -> Result<Tensor> {
        let w = self.response_width;
        let mut out = Vec::with_capacity(rows.len() * w);
        for r in rows {
            out.extend(r.iter().copied().chain(std::iter::repeat(0.0)).take(w));
        }
        Ok(Tensor::from_vec(out, (rows.len(), w), device)?)
    }
}
