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
