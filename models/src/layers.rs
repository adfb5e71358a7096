//! Differentiable building blocks shared by the architectures.
//!
//! candle-nn's fused `layer_norm`, `rms_norm`, `softmax_last_dim` and `rope*` kernels return
//! tensors without a backward pass (DESIGN.md). The norms and the bias add here run on
//! tandem's own fused kernels, which have one ([`crate::kernels`]); the rest is composed from
//! primitive ops that autograd understands. The `*_reference` tests compare these against
//! candle's fused kernels where one exists.

use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// Which positions' final hidden states a backbone forward returns.
///
/// Every block but the last runs on all positions, since later blocks attend to them. The last
/// block's attention still reads every key, but its output projection, MLP and the final norm
/// run only on the positions returned: a PPO forward needs the response positions, a reward
/// model the last real token of each row, a sampler the last position.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Every position: (b, t, d).
    All,
    /// Positions `start .. start + len` of every row: (b, len, d).
    Span { start: usize, len: usize },
    /// One position per row, `at[row]`: (b, 1, d).
    PerRow(&'a [u32]),
}

impl<'a> Positions<'a> {
    /// What layer `layer` of `layers` goes on with after its attention: `self` for the last
    /// layer, [`Positions::All`] for the others.
    pub fn after_attention(self, layer: usize, layers: usize) -> Positions<'a> {
        if layer + 1 == layers {
            self
        } else {
            Positions::All
        }
    }

    /// Selects the positions from `x` (b, t, d). Differentiable.
    pub fn select(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Positions::All => Ok(x.clone()),
            Positions::Span { start, len } => x.narrow(1, start, len),
            Positions::PerRow(at) => {
                let (b, t, d) = x.dims3()?;
                if at.len() != b {
                    candle_core::bail!("{} positions for a batch of {b} rows", at.len());
                }
                if let Some(&p) = at.iter().find(|&&p| p as usize >= t) {
                    candle_core::bail!("position {p} is past the sequence length {t}");
                }
                let flat: Vec<u32> = at.iter().enumerate().map(|(r, &p)| (r * t) as u32 + p).collect();
                let idx = Tensor::from_vec(flat, b, x.device())?;
                x.reshape((b * t, d))?.index_select(&idx, 0)?.reshape((b, 1, d))
            }
        }
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored as (in, out), y = x W + b.
#[derive(Debug, Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_in, d_out), "weight")?,
            bias: vb.get(d_out, "bias")?,
        })
    }
}

impl Conv1D {
    /// `bias_op(x W, b)`: the product with the bias applied by `bias_op`, e.g. a bias add
    /// fused with the activation that follows.
    pub fn forward_with(&self, x: &Tensor, bias_op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let y = bias_op(&x.reshape((b * t, d))?.matmul(&self.weight)?, &self.bias)?;
        y.reshape((b, t, ()))
    }

    /// `residual + (x W + b)`: the projection joining the residual stream, bias and residual
    /// added in one pass.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, t, _) = residual.dims3()?;
        let r = residual.reshape((b * t, ()))?;
        self.forward_with(x, |y, bias| crate::kernels::add_bias_residual(y, bias, &r))
    }
}

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, crate::kernels::add_bias)
    }
}

/// Positions and the additive attention bias for one forward call.
///
/// `positions[b][i]` is the position id of query token i of row b: the number of real
/// (mask = 1) tokens before it, so left padding does not shift positions. `bias` has shape
/// (batch, 1, queries, keys) and holds 0 where query i may attend key j (j is real and not in
/// the future) and a large negative number elsewhere; a finite value keeps fully padded query
/// rows free of NaN.
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    pub positions: Tensor,
    pub bias: Tensor,
}

pub(crate) const MASKED: f32 = -1.0e9;

impl AttentionInputs {
    /// `key_mask[b]` covers every key (cached and new); the last `queries` keys are the new tokens.
    pub fn new(key_mask: &[Vec<f32>], queries: usize, device: &Device) -> Result<Self> {
        let b = key_mask.len();
        let k = key_mask.first().map_or(0, Vec::len);
        if queries > k {
            candle_core::bail!("{queries} queries but only {k} keys in the mask");
        }
        let past = k - queries;
        let mut pos = Vec::with_capacity(b * queries);
        let mut bias = Vec::with_capacity(b * queries * k);
        let mut open = Vec::with_capacity(k);
        for row in key_mask {
            if row.len() != k {
                candle_core::bail!("mask rows have different lengths");
            }
            // Query i attends key j when j <= past + i and j is real: the first past + i + 1
            // entries of `open`, then masked to the end of the row.
            open.clear();
            open.extend(row.iter().map(|&m| if m > 0.0 { 0.0 } else { MASKED }));
            let mut real = row[..past].iter().filter(|&&m| m > 0.0).count() as u32;
            for i in 0..queries {
                pos.push(real);
                real += u32::from(row[past + i] > 0.0);
                bias.extend_from_slice(&open[..=past + i]);
                bias.resize(bias.len() + k - (past + i + 1), MASKED);
            }
        }
        Ok(Self {
            positions: Tensor::from_vec(pos, (b, queries), device)?,
            bias: Tensor::from_vec(bias, (b, 1, queries, k), device)?,
        })
    }

    pub fn max_position(&self) -> Result<u32> {
        self.positions.max_all()?.to_scalar::<u32>()
    }
}

/// softmax(q k^T * scale + bias) v for q (b, h, t, d), k/v (b, h, s, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.matmul(v)
}

/// Repeats grouped key/value heads: (b, kv, s, d) -> (b, kv * n_rep, s, d).
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))
}

/// Rotary position embedding tables, as HF computes them: inv_freq_i = theta^(-2i/d),
/// cos/sin of (position * inv_freq) duplicated across both halves of the head dimension.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for p in 0..max_positions {
            for _half in 0..2 {
                for &f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_positions, head_dim), device)?,
        })
    }

    /// Rotates x (b, h, t, d) by the per-row positions (b, t): x cos + rotate_half(x) sin,
    /// rotate_half(x) = [-x2, x1].
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, _h, t, d) = x.dims4()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        rotate(x, &cos, &sin)
    }

    /// Rotates the query and key heads of a packed `qkv (b, t, (heads + 2 kv_heads) * d)` by
    /// the per-row positions (b, t), as [`Rotary::apply`] rotates each head; the value heads
    /// pass through ([`crate::kernels::rotary_packed`]).
    pub fn apply_packed(&self, qkv: &Tensor, positions: &Tensor, heads: usize, kv_heads: usize) -> Result<Tensor> {
        crate::kernels::rotary_packed(qkv, &self.cos, &self.sin, positions, heads, kv_heads)
    }

    /// The cos and sin tables, (max positions, d).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }
}

/// `x cos + rotate_half(x) sin` over the last dimension, `rotate_half(x) = [-x2, x1]`, with
/// `cos` and `sin` broadcast to `x`: the composition both rotary layouts share.
pub(crate) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Embedding lookup (index_select has a backward pass: index_add).
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "max abs diff {d}");
    }

    #[test]
    fn layer_norm_matches_fused_reference() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let ours = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        }
        .forward(&x)
        .unwrap();
        close(&ours, &candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap(), 1e-5);
    }

    #[test]
    fn rms_norm_matches_fused_reference() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let ours = RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        }
        .forward(&x)
        .unwrap();
        close(&ours, &candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap(), 1e-5);
    }

    #[test]
    fn rotary_matches_candle_rope() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (1, 2, 5, 8);
        let x = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
        let rot = Rotary::new(d, 16, 10000.0, &dev).unwrap();
        let pos = Tensor::arange(0u32, t as u32, &dev).unwrap().reshape((1, t)).unwrap();
        let ours = rot.apply(&x, &pos).unwrap();
        // candle's fused rope takes contiguous (t, d/2) tables; ours store both halves.
        let half = |m: &Tensor| {
            m.narrow(0, 0, t)
                .unwrap()
                .narrow(1, 0, d / 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (cos, sin) = (half(&rot.cos), half(&rot.sin));
        let fused = candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &cos, &sin).unwrap();
        close(&ours, &fused, 1e-5);
    }

    #[test]
    fn attention_inputs_with_cached_keys_match_the_definition() {
        // Rows with left padding and holes, 3 cached keys and 4 new ones.
        let mask = vec![
            vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            vec![1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0],
            vec![0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0],
        ];
        let (k, q) = (7, 4);
        let a = AttentionInputs::new(&mask, q, &Device::Cpu).unwrap();
        let pos = a.positions.to_vec2::<u32>().unwrap();
        let bias = a.bias.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        for (r, row) in mask.iter().enumerate() {
            for i in 0..q {
                let key = k - q + i;
                let real_before = row[..key].iter().filter(|&&m| m > 0.0).count() as u32;
                assert_eq!(pos[r][i], real_before, "row {r} query {i}");
                for j in 0..k {
                    let open = j <= key && row[j] > 0.0;
                    assert_eq!(
                        bias[r][i][j],
                        if open { 0.0 } else { MASKED },
                        "row {r} query {i} key {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_inputs_left_padding() {
        let mask = vec![vec![0.0, 1.0, 1.0], vec![1.0, 1.0, 1.0]];
        let a = AttentionInputs::new(&mask, 3, &Device::Cpu).unwrap();
        assert_eq!(
            a.positions.to_vec2::<u32>().unwrap(),
            vec![vec![0, 0, 1], vec![0, 1, 2]]
        );
        let bias = a.bias.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(bias[0][2], vec![MASKED, 0.0, 0.0]);
        assert_eq!(bias[1][1], vec![0.0, 0.0, MASKED]);
    }
}
