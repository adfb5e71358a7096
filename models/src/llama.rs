//! The Qwen2 / Llama family, following transformers' `Qwen2Model` / `LlamaModel`: RMSNorm,
//! rotary position embeddings (rotate-half convention), grouped-query attention, SwiGLU MLP
//! (down(silu(gate(x)) * up(x))), q/k/v biases for Qwen2. Weights live under `model.`; the LM
//! head is `lm_head.weight` unless `tie_word_embeddings`, in which case it is `embed_tokens`.
//!
//! Without a KV cache (training, scoring) a layer runs one product for q, k and v, the fused
//! rotary kernel over the query and key heads and the fused attention, all on the packed
//! token-major `qkv`; with a cache (decoding) it projects and rotates each head for the cache.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LlamaConfig;
use crate::kernels::packed_attention;
use crate::kv_cache::{KvCache, QkvRows};
use crate::layers::{attention, embed, repeat_kv, AttentionInputs, Positions, RmsNorm, Rotary};

/// `x W^T (+ b)` with the weight stored (out, in), as in `nn.Linear`; the bias add is the fused
/// kernel, whose backward sums rows in one pass.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let y = x.reshape((b * t, d))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(bias) => crate::kernels::add_bias(&y, bias)?,
            None => y,
        };
        y.reshape((b, t, ()))
    }
}

fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((d_out, d_in), "weight")?;
    let bias = if bias { Some(vb.get(d_out, "bias")?) } else { None };
    Ok(Linear { weight, bias })
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Layer {
    /// The q, k and v projections as one product, `(b, t, (heads + 2 kv_heads) * head_dim)`:
    /// the three weights (and biases) concatenated, which autograd splits again.
    fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (&self.q_proj, &self.k_proj, &self.v_proj);
        let weight = Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?;
        let bias = match (&q.bias, &k.bias, &v.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            _ => None,
        };
        Linear { weight, bias }.forward(x)
    }

    /// The rest of the layer after attention: the output projection of `y (b, t, heads *
    /// head_dim)` joins the residual stream `h`, then the MLP block; at the positions `at`
    /// selects (the last layer goes on only at the positions the caller reads).
    fn after_attention(&self, h: Tensor, y: &Tensor, at: Positions) -> Result<Tensor> {
        let h = (at.select(&h)? + self.o_proj.forward(&at.select(y)?)?)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let m = crate::kernels::swiglu(&self.gate_proj.forward(&x)?, &self.up_proj.forward(&x)?)?;
        h + self.down_proj.forward(&m)?
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rotary: Rotary,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Llama {
    /// `vb` is rooted at the checkpoint's top level; weights live under `model.`.
    pub fn new(c: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let vb_m = vb.pp("model");
        let d = c.hidden_size;
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        let head_dim = c.head_dim.unwrap_or(d / heads);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb_m.pp("layers").pp(i);
                let att = vb.pp("self_attn");
                let mlp = vb.pp("mlp");
                Ok(Layer {
                    input_layernorm: RmsNorm::new(d, c.rms_norm_eps, vb.pp("input_layernorm"))?,
                    q_proj: linear(d, heads * head_dim, c.attention_bias, att.pp("q_proj"))?,
                    k_proj: linear(d, kv_heads * head_dim, c.attention_bias, att.pp("k_proj"))?,
                    v_proj: linear(d, kv_heads * head_dim, c.attention_bias, att.pp("v_proj"))?,
                    o_proj: linear(heads * head_dim, d, false, att.pp("o_proj"))?,
                    post_attention_layernorm: RmsNorm::new(d, c.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
                    gate_proj: linear(d, c.intermediate_size, false, mlp.pp("gate_proj"))?,
                    up_proj: linear(d, c.intermediate_size, false, mlp.pp("up_proj"))?,
                    down_proj: linear(c.intermediate_size, d, false, mlp.pp("down_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: vb_m.pp("embed_tokens").get((c.vocab_size, d), "weight")?,
            layers,
            norm: RmsNorm::new(d, c.rms_norm_eps, vb_m.pp("norm"))?,
            rotary: Rotary::new(head_dim, c.max_position_embeddings, c.rope_theta, vb.device())?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
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
        let hd = self.head_dim;
        let mut h = embed(&self.embed_tokens, ids)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, l) in self.layers.iter().enumerate() {
            let x = l.input_layernorm.forward(&h)?;
            let Some(c) = cache.as_deref_mut() else {
                // Without a cache (training and scoring): one packed projection, rotated in
                // place, into the fused attention.
                let qkv = self
                    .rotary
                    .apply_packed(&l.qkv(&x)?, &attn.positions, self.heads, self.kv_heads)?;
                let y = packed_attention(&qkv, &attn.bias, self.heads, self.kv_heads, scale)?;
                h = l.after_attention(h, &y, out.after_attention(i, self.layers.len()))?;
                continue;
            };
            let heads = |p: &Linear, n: usize| -> Result<Tensor> {
                p.forward(&x)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = self.rotary.apply(&heads(&l.q_proj, self.heads)?, &attn.positions)?;
            let k = self.rotary.apply(&heads(&l.k_proj, self.kv_heads)?, &attn.positions)?;
            let v = heads(&l.v_proj, self.kv_heads)?;
            let n_rep = self.heads / self.kv_heads;
            let y = match c {
                c if c.host_applies(&k) => {
                    // Token rows [q | k | v] of (b, t, heads + 2 kv_heads, hd).
                    let qkv = Tensor::cat(&[&q, &k, &v], 1)?.transpose(1, 2)?.contiguous()?;
                    let data = qkv.flatten_all()?.to_vec1::<f32>()?;
                    let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
                    let rows = QkvRows {
                        data: &data,
                        rows: b,
                        tokens: t,
                        stride: qw + 2 * kw,
                        q: 0,
                        k: qw,
                        v: qw + kw,
                        heads: self.heads,
                        kv_heads: self.kv_heads,
                        head_dim: hd,
                    };
                    c.attend(i, rows, &attn.bias, scale as f32)?
                }
                c => {
                    let (k, v) = c.append(i, k, v)?;
                    let y = attention(&q, &repeat_kv(k, n_rep)?, &repeat_kv(v, n_rep)?, &attn.bias, scale)?;
                    y.transpose(1, 2)?.reshape((b, t, self.heads * hd))?
                }
            };
            h = l.after_attention(h, &y, out.after_attention(i, self.layers.len()))?;
        }
        if self.layers.is_empty() {
            h = out.select(&h)?;
        }
        self.norm.forward(&h)
    }
}
