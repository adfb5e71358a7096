//! Per-layer key/value cache for incremental decoding.
//!
//! Each layer keeps its keys and values as (batch, kv_heads, seq, head_dim) tensors; a decoding
//! step appends the new token's keys and values along the sequence axis. Keys are cached
//! after the rotary embedding, so cached and recomputed attention see identical inputs.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k`, `v` to layer `i` and returns the full keys and values.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[i];
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
