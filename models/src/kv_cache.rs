//! Per-layer key/value cache for incremental decoding.
//!
//! Keys are cached after the rotary embedding, so cached and recomputed attention see identical
//! inputs. Two forms, chosen per call by the device and dtype of the new keys:
//!
//! - **Host buffers** (f32 on the CPU, the fused-kernel condition of [`crate::kernels`]): each
//!   layer's keys and values live in buffers laid out (batch, kv_heads, capacity, head_dim),
//!   sized once for the whole generation ([`KvCache::with_capacity`]; they grow by doubling if
//!   a caller goes past it). A decoding step writes the new tokens' keys and values in place and
//!   one kernel attends the new queries over all cached keys ([`KvCache::attend`]): no
//!   concatenation copying the whole cache at every token, no per-head batched GEMMs of one
//!   row, no softmax tensors.
//! - **Tensors** elsewhere (CUDA, bf16, or reference kernels): (batch, kv_heads, seq, head_dim)
//!   tensors that a step extends along the sequence axis ([`KvCache::append`]), for candle's
//!   composed attention.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::kernels::attention::decode_row;
pub use crate::kernels::attention::QkvRows;

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Layer>,
    /// Positions to allocate host buffers for (at least).
    capacity: usize,
}

#[derive(Debug, Clone, Default)]
enum Layer {
    #[default]
    Empty,
    Tensors(Tensor, Tensor),
    Host(HostLayer),
}

/// One layer's keys and values, (rows, kv_heads, cap, head_dim) each, `len` positions filled.
#[derive(Debug, Clone)]
struct HostLayer {
    rows: usize,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self::with_capacity(layers, 0)
    }

    /// A cache whose host buffers hold `positions` positions (prompt plus new tokens) without
    /// growing.
    pub fn with_capacity(layers: usize, positions: usize) -> Self {
        Self {
            layers: vec![Layer::Empty; layers],
            capacity: positions,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Layer::Tensors(k, _)) => k.dims()[2],
            Some(Layer::Host(h)) => h.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`Self::attend`] serves new keys like `k`: f32 on the CPU with the fused kernels
    /// on, and this cache not already holding tensors.
    pub fn host_applies(&self, k: &Tensor) -> bool {
        crate::kernels::fused_applies(k) && !self.layers.iter().any(|l| matches!(l, Layer::Tensors(..)))
    }

    /// Appends `k`, `v` (batch, kv_heads, new, head_dim) to layer `i` and returns the full keys
    /// and values.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[i];
        let (k, v) = match std::mem::take(slot) {
            Layer::Empty => (k, v),
            Layer::Tensors(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            Layer::Host(_) => candle_core::bail!("KV cache layer {i} holds host buffers, not tensors"),
        };
        *slot = Layer::Tensors(k.clone(), v.clone());
        Ok((k, v))
    }

    /// Writes the new tokens' keys and values into layer `i` and attends each new query over
    /// every cached key with additive `bias (rows, 1, tokens, keys)`, `keys` = cached + new:
    /// `y (rows, tokens, heads * head_dim)` on the CPU. Query head h reads key/value head
    /// `h / (heads / kv_heads)` (grouped-query attention). Batch rows run in parallel on the
    /// current pool.
    pub fn attend(&mut self, i: usize, x: QkvRows, bias: &Tensor, scale: f32) -> Result<Tensor> {
        let (b, t, hd) = (x.rows, x.tokens, x.head_dim);
        if x.heads == 0 || x.kv_heads == 0 || !x.heads.is_multiple_of(x.kv_heads) {
            candle_core::bail!(
                "{} query heads do not group over {} key/value heads",
                x.heads,
                x.kv_heads
            );
        }
        if x.data.len() < b * t * x.stride {
            candle_core::bail!("qkv rows hold {} values, expected {}", x.data.len(), b * t * x.stride);
        }
        let capacity = self.capacity;
        let layer = match &mut self.layers[i] {
            slot @ Layer::Empty => {
                let cap = capacity.max(t);
                let n = b * x.kv_heads * cap * hd;
                *slot = Layer::Host(HostLayer {
                    rows: b,
                    kv_heads: x.kv_heads,
                    head_dim: hd,
                    cap,
                    len: 0,
                    k: vec![0.0; n],
                    v: vec![0.0; n],
                });
                let Layer::Host(h) = slot else { unreachable!() };
                h
            }
            Layer::Host(h) => h,
            Layer::Tensors(..) => candle_core::bail!("KV cache layer {i} holds tensors, not host buffers"),
        };
        if (layer.rows, layer.kv_heads, layer.head_dim) != (b, x.kv_heads, hd) {
            candle_core::bail!(
                "KV cache layer {i} holds ({}, {}, _, {}), new keys are ({b}, {}, _, {hd})",
                layer.rows,
                layer.kv_heads,
                layer.head_dim,
                x.kv_heads
            );
        }
        layer.reserve(layer.len + t);
        let keys = layer.len + t;
        let bias = bias.flatten_all()?.to_vec1::<f32>()?;
        if bias.len() != b * t * keys {
            candle_core::bail!(
                "attention bias holds {} values, expected ({b}, 1, {t}, {keys})",
                bias.len()
            );
        }
        let (cap, past) = (layer.cap, layer.len);
        let per_row = x.kv_heads * cap * hd;
        let mut y = vec![0f32; b * t * x.heads * hd];
        (
            layer.k.par_chunks_mut(per_row),
            layer.v.par_chunks_mut(per_row),
            y.par_chunks_mut(t * x.heads * hd),
        )
            .into_par_iter()
            .enumerate()
            .for_each(|(r, (k, v, y))| {
                let bias = &bias[r * t * keys..][..t * keys];
                decode_row(x, r, past, cap, k, v, bias, scale, y)
            });
        layer.len = keys;
        Tensor::from_vec(y, (b, t, x.heads * hd), &candle_core::Device::Cpu)
    }
}

impl HostLayer {
    /// Grows the buffers to hold `positions` positions (doubling), keeping what is cached.
    fn reserve(&mut self, positions: usize) {
        if positions <= self.cap {
            return;
        }
        let cap = positions.max(2 * self.cap);
        let (hd, old) = (self.head_dim, self.cap);
        let grow = |buf: &Vec<f32>| {
            let mut out = vec![0f32; self.rows * self.kv_heads * cap * hd];
            for (dst, src) in out.chunks_mut(cap * hd).zip(buf.chunks(old * hd)) {
                dst[..self.len * hd].copy_from_slice(&src[..self.len * hd]);
            }
            out
        };
        self.k = grow(&self.k);
        self.v = grow(&self.v);
        self.cap = cap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use crate::layers::{attention, repeat_kv, AttentionInputs};
    use candle_core::Device;

    /// Three decoding calls (a prompt of 5, then single tokens) with left padding and grouped
    /// heads: host buffers, started too small so that they grow, against the tensor cache and
    /// candle's composed attention.
    #[test]
    fn host_buffers_attend_like_the_tensor_cache() {
        let (b, heads, kv, hd) = (3, 4, 2, 8);
        let (mut host, mut tensors) = (KvCache::with_capacity(1, 2), KvCache::new(1));
        let mut mask: Vec<Vec<f32>> = vec![Vec::new(); b];
        for (step, t) in [5usize, 1, 1].into_iter().enumerate() {
            for (r, row) in mask.iter_mut().enumerate() {
                for j in 0..t {
                    // Row 1 is left-padded by two positions.
                    row.push(if r == 1 && step == 0 && j < 2 { 0.0 } else { 1.0 });
                }
            }
            let bias = AttentionInputs::new(&mask, t, &Device::Cpu).unwrap().bias;
            let q = random(&[b, heads, t, hd], 1.0, 3 * step as u64);
            let k = random(&[b, kv, t, hd], 1.0, 3 * step as u64 + 1);
            let v = random(&[b, kv, t, hd], 1.0, 3 * step as u64 + 2);
            let scale = 1.0 / (hd as f64).sqrt();
            let (fk, fv) = tensors.append(0, k.clone(), v.clone()).unwrap();
            let want = attention(
                &q,
                &repeat_kv(fk, heads / kv).unwrap(),
                &repeat_kv(fv, heads / kv).unwrap(),
                &bias,
                scale,
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * hd))
            .unwrap();
            let rows = Tensor::cat(&[&q, &k, &v], 1)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let data = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let x = QkvRows {
                data: &data,
                rows: b,
                tokens: t,
                stride: (heads + 2 * kv) * hd,
                q: 0,
                k: heads * hd,
                v: (heads + kv) * hd,
                heads,
                kv_heads: kv,
                head_dim: hd,
            };
            assert!(host.host_applies(&k));
            let got = host.attend(0, x, &bias, scale as f32).unwrap();
            assert!(rel_err(&got, &want) < 1e-5, "step {step}");
            assert_eq!(host.len(), tensors.len());
        }
        assert!(!tensors.host_applies(&random(&[1, 1, 1, 1], 1.0, 0)));
    }
}
