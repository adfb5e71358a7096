//! GPT-2 (Radford et al. 2019), following transformers' `GPT2Model`: learned position
//! embeddings, pre-LayerNorm blocks, fused `c_attn` q/k/v projection and `Conv1D` weights
//! stored as (in, out), tanh-approximated GELU ("gelu_new"), final `ln_f`. The LM head is tied
//! to `wte`. Parameter paths mirror the checkpoint keys (`transformer.h.{i}.attn.c_attn.weight`).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::Gpt2Config;
use crate::kernels::packed_attention;
use crate::kv_cache::{KvCache, QkvRows};
use crate::layers::{attention, embed, AttentionInputs, Conv1D, LayerNorm, Positions};

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    exact_gelu: bool,
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    heads: usize,
    scale: f64,
}

impl Gpt2 {
    /// `vb` is rooted at the checkpoint's top level; weights live under `transformer.`.
    pub fn new(c: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("transformer");
        let d = c.n_embd;
        let inner = c.n_inner.unwrap_or(4 * d);
        let eps = c.layer_norm_epsilon;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let vb = vb.pp("h").pp(i);
                Ok(Block {
                    ln_1: LayerNorm::new(d, eps, vb.pp("ln_1"))?,
                    c_attn: Conv1D::new(d, 3 * d, vb.pp("attn").pp("c_attn"))?,
                    attn_proj: Conv1D::new(d, d, vb.pp("attn").pp("c_proj"))?,
                    ln_2: LayerNorm::new(d, eps, vb.pp("ln_2"))?,
                    c_fc: Conv1D::new(d, inner, vb.pp("mlp").pp("c_fc"))?,
                    mlp_proj: Conv1D::new(inner, d, vb.pp("mlp").pp("c_proj"))?,
                    exact_gelu: c.activation_function == "gelu",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_dim = d / c.n_head;
        Ok(Self {
            wte: vb.pp("wte").get((c.vocab_size, d), "weight")?,
            wpe: vb.pp("wpe").get((c.n_positions, d), "weight")?,
            blocks,
            ln_f: LayerNorm::new(d, eps, vb.pp("ln_f"))?,
            heads: c.n_head,
            scale: if c.scale_attn_weights {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            },
        })
    }

    /// The token embedding, which is also the tied LM head.
    pub fn wte(&self) -> &Tensor {
        &self.wte
    }

    /// Final hidden states for `ids` (b, t) at the positions `out` selects.
    pub fn forward(
        &self,
        ids: &Tensor,
        attn: &AttentionInputs,
        mut cache: Option<&mut KvCache>,
        out: Positions,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut h = (embed(&self.wte, ids)? + embed(&self.wpe, &attn.positions)?)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let x = blk.ln_1.forward(&h)?;
            let qkv = blk.c_attn.forward(&x)?;
            let d = qkv.dim(D::Minus1)? / 3;
            let y = match cache.as_deref_mut() {
                // Training and scoring forwards: one fused kernel reads the packed qkv.
                None => packed_attention(&qkv, &attn.bias, self.heads, self.heads, self.scale)?,
                Some(c) if c.host_applies(&qkv) => {
                    let qkv = qkv.contiguous()?;
                    let data = qkv.flatten_all()?.to_vec1::<f32>()?;
                    let rows = QkvRows {
                        data: &data,
                        rows: b,
                        tokens: t,
                        stride: 3 * d,
                        q: 0,
                        k: d,
                        v: 2 * d,
                        heads: self.heads,
                        kv_heads: self.heads,
                        head_dim: d / self.heads,
                    };
                    c.attend(i, rows, &attn.bias, self.scale as f32)?
                }
                Some(c) => {
                    let hd = d / self.heads;
                    let split = |j: usize| -> Result<Tensor> {
                        qkv.narrow(D::Minus1, j * d, d)?
                            .reshape((b, t, self.heads, hd))?
                            .transpose(1, 2)?
                            .contiguous()
                    };
                    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                    let (k, v) = c.append(i, k, v)?;
                    attention(&q, &k, &v, &attn.bias, self.scale)?
                        .transpose(1, 2)?
                        .reshape((b, t, d))?
                }
            };
            // The last block goes on only at the positions the caller reads.
            let at = out.after_attention(i, self.blocks.len());
            h = blk.attn_proj.forward_residual(&at.select(&y)?, &at.select(&h)?)?;
            let x = blk.ln_2.forward(&h)?;
            let x = if blk.exact_gelu {
                blk.c_fc.forward(&x)?.gelu_erf()?
            } else {
                blk.c_fc.forward_with(&x, crate::kernels::bias_gelu)?
            };
            h = blk.mlp_proj.forward_residual(&x, &h)?;
        }
        if self.blocks.is_empty() {
            h = out.select(&h)?;
        }
        self.ln_f.forward(&h)
    }
}
