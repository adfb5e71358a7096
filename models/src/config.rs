//! Model configuration in Hugging Face's `config.json` vocabulary.
//!
//! Two families are supported: GPT-2 (`model_type = "gpt2"`) and the Qwen2/Llama family
//! (`"qwen2"`, `"llama"`). A config parses from and serialises back to the same JSON keys that
//! transformers writes, so a checkpoint saved by tandem loads in transformers and vice versa.
//! The `architectures` entry decides the head: `*ForCausalLM` / `GPT2LMHeadModel` is a language
//! model, `*ForSequenceClassification` a scalar (reward / value) model.
//!
//! Keys that change the math are honoured or refused, never ignored: honoured are the
//! dimensions, `n_inner`, `layer_norm_epsilon`, `rms_norm_eps`, `activation_function` /
//! `hidden_act` (the supported ones), `scale_attn_weights`, `rope_theta`, `head_dim`,
//! `attention_bias` (Llama; Qwen2 always has q/k/v biases) and `tie_word_embeddings`
//! (Qwen2/Llama). Refused with [`ModelError::BadConfig`] naming the key
//! ([`MATH_KEYS_REFUSED`]): `rope_scaling` (Llama-3.1-style and other scaled RoPE tables),
//! `use_sliding_window = true`, `partial_rotary_factor != 1`, `mlp_bias = true`, logit
//! soft-capping, and for GPT-2 `scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`,
//! `add_cross_attention` and `tie_word_embeddings = false`. Everything else (dropouts,
//! `initializer_range`, `use_cache`, `torch_dtype`, `max_window_layers` without a sliding
//! window, ...) is metadata and loads.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// GPT-2 hyper-parameters (HF `GPT2Config` key names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` means 4 * n_embd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_gelu_new")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
}

/// Qwen2 / Llama hyper-parameters (HF `Qwen2Config` / `LlamaConfig` key names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v projection biases. Qwen2 always has them; Llama has them when `attention_bias`.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
}

/// The architecture family and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    Gpt2(Gpt2Config),
    Qwen2(LlamaConfig),
    Llama(LlamaConfig),
}

/// Which output head a checkpoint carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Next-token logits (`GPT2LMHeadModel`, `Qwen2ForCausalLM`, ...).
    CausalLm,
    /// One scalar per position from a `score` projection (`*ForSequenceClassification`).
    Scalar,
}

/// A parsed `config.json`: family, head and the special token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub head: HeadKind,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_true() -> bool {
    true
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_silu() -> String {
    "silu".into()
}

/// Architecture-independent view of the dimensions the model code needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub mlp_hidden: usize,
    pub max_positions: usize,
}

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.into(),
            source,
        })?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::BadConfig {
                path: path.into(),
                key: "model_type",
                msg: "missing".into(),
            })?;
        refuse_math_keys(&v, model_type, path)?;
        let parse = |what| -> Result<LlamaConfig> {
            serde_json::from_value(v.clone()).map_err(|e| ModelError::BadConfig {
                path: path.into(),
                key: what,
                msg: e.to_string(),
            })
        };
        let arch = match model_type {
            "gpt2" => Architecture::Gpt2(serde_json::from_value(v.clone()).map_err(|e| ModelError::BadConfig {
                path: path.into(),
                key: "gpt2",
                msg: e.to_string(),
            })?),
            "qwen2" => Architecture::Qwen2(LlamaConfig {
                attention_bias: true,
                ..parse("qwen2")?
            }),
            "llama" => Architecture::Llama(parse("llama")?),
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.into(),
                    model_type: other.into(),
                })
            }
        };
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        let head = if archs.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            HeadKind::Scalar
        } else {
            HeadKind::CausalLm
        };
        if head == HeadKind::Scalar {
            let labels = v.get("id2label").and_then(Value::as_object).map_or(1, |m| m.len());
            let labels = v
                .get("num_labels")
                .and_then(Value::as_u64)
                .map_or(labels, |n| n as usize);
            if labels != 1 {
                return Err(ModelError::BadConfig {
                    path: path.into(),
                    key: "id2label",
                    msg: format!("a reward/value model needs exactly 1 label, found {labels}"),
                });
            }
        }
        let tok = |k: &str| v.get(k).and_then(token_id);
        let cfg = ModelConfig {
            arch,
            head,
            bos_token_id: tok("bos_token_id"),
            eos_token_id: tok("eos_token_id"),
            pad_token_id: tok("pad_token_id"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let d = self.dims();
        let bad = |key, msg: String| {
            Err(ModelError::BadConfig {
                path: path.into(),
                key,
                msg,
            })
        };
        // An explicit head_dim (Llama family) frees the head count from dividing the width.
        let explicit_head_dim =
            matches!(&self.arch, Architecture::Qwen2(c) | Architecture::Llama(c) if c.head_dim.is_some());
        if d.heads == 0 || (!d.hidden.is_multiple_of(d.heads) && !explicit_head_dim) {
            return bad(
                "num_attention_heads",
                format!("{} does not divide hidden size {}", d.heads, d.hidden),
            );
        }
        if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
            return bad(
                "num_key_value_heads",
                format!("{} does not divide {} heads", d.kv_heads, d.heads),
            );
        }
        if !d.head_dim.is_multiple_of(2) && !matches!(self.arch, Architecture::Gpt2(_)) {
            return bad(
                "head_dim",
                format!("rotary embeddings need an even head size, got {}", d.head_dim),
            );
        }
        match &self.arch {
            Architecture::Gpt2(c) if c.activation_function != "gelu_new" && c.activation_function != "gelu" => bad(
                "activation_function",
                format!("{:?} is not supported (gelu_new, gelu)", c.activation_function),
            ),
            Architecture::Qwen2(c) | Architecture::Llama(c) if c.hidden_act != "silu" => {
                bad("hidden_act", format!("{:?} is not supported (silu)", c.hidden_act))
            }
            _ => Ok(()),
        }
    }

    pub fn dims(&self) -> Dims {
        match &self.arch {
            Architecture::Gpt2(c) => Dims {
                vocab_size: c.vocab_size,
                hidden: c.n_embd,
                layers: c.n_layer,
                heads: c.n_head,
                kv_heads: c.n_head,
                head_dim: c.n_embd / c.n_head.max(1),
                mlp_hidden: c.n_inner.unwrap_or(4 * c.n_embd),
                max_positions: c.n_positions,
            },
            Architecture::Qwen2(c) | Architecture::Llama(c) => Dims {
                vocab_size: c.vocab_size,
                hidden: c.hidden_size,
                layers: c.num_hidden_layers,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
                head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
                mlp_hidden: c.intermediate_size,
                max_positions: c.max_position_embeddings,
            },
        }
    }

    /// The same model with another head (a policy's backbone as a critic, say).
    pub fn with_head(&self, head: HeadKind) -> Self {
        ModelConfig { head, ..self.clone() }
    }

    /// Token that pads batches: `pad_token_id`, else `eos_token_id`, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_id).unwrap_or(0)
    }

    /// The HF class name written to `architectures`.
    pub fn hf_class(&self) -> &'static str {
        match (&self.arch, self.head) {
            (Architecture::Gpt2(_), HeadKind::CausalLm) => "GPT2LMHeadModel",
            (Architecture::Gpt2(_), HeadKind::Scalar) => "GPT2ForSequenceClassification",
            (Architecture::Qwen2(_), HeadKind::CausalLm) => "Qwen2ForCausalLM",
            (Architecture::Qwen2(_), HeadKind::Scalar) => "Qwen2ForSequenceClassification",
            (Architecture::Llama(_), HeadKind::CausalLm) => "LlamaForCausalLM",
            (Architecture::Llama(_), HeadKind::Scalar) => "LlamaForSequenceClassification",
        }
    }

    /// config.json as transformers expects it.
    pub fn to_json(&self) -> Value {
        let (mut v, model_type) = match &self.arch {
            Architecture::Gpt2(c) => (json!(c), "gpt2"),
            Architecture::Qwen2(c) => (json!(c), "qwen2"),
            Architecture::Llama(c) => (json!(c), "llama"),
        };
        let m = v.as_object_mut().expect("config serialises to an object");
        m.insert("model_type".into(), json!(model_type));
        m.insert("architectures".into(), json!([self.hf_class()]));
        m.insert("torch_dtype".into(), json!("float32"));
        for (k, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                m.insert(k.into(), json!(id));
            }
        }
        if self.head == HeadKind::Scalar {
            m.insert("id2label".into(), json!({"0": "LABEL_0"}));
            m.insert("label2id".into(), json!({"LABEL_0": 0}));
        }
        if let Architecture::Gpt2(_) = self.arch {
            for k in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
                m.insert(k.into(), json!(0.0));
            }
            m.insert("tie_word_embeddings".into(), json!(true));
        } else {
            m.insert("attention_dropout".into(), json!(0.0));
            m.insert("use_sliding_window".into(), json!(false));
        }
        v
    }

    /// A GPT-2 config for built-in tiny models and tests.
    pub fn gpt2(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize, n_positions: usize) -> Self {
        ModelConfig {
            arch: Architecture::Gpt2(Gpt2Config {
                vocab_size,
                n_positions,
                n_embd,
                n_layer,
                n_head,
                n_inner: None,
                layer_norm_epsilon: 1e-5,
                activation_function: "gelu_new".into(),
                scale_attn_weights: true,
            }),
            head: HeadKind::CausalLm,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            pad_token_id: Some(0),
        }
    }

    /// A Qwen2 config (tied embeddings) for built-in tiny models and tests.
    pub fn qwen2(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        max_pos: usize,
    ) -> Self {
        ModelConfig {
            arch: Architecture::Qwen2(LlamaConfig {
                vocab_size,
                hidden_size: hidden,
                intermediate_size: 2 * hidden,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: Some(kv_heads),
                head_dim: None,
                max_position_embeddings: max_pos,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                tie_word_embeddings: true,
                attention_bias: true,
                hidden_act: "silu".into(),
            }),
            head: HeadKind::CausalLm,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            pad_token_id: Some(0),
        }
    }
}

/// Config keys whose non-default values tandem does not implement, per model type: the key
/// and what it would have to hold to load (see the module docs).
pub const MATH_KEYS_REFUSED: &[(&str, &str)] = &[
    ("rope_scaling", "null (scaled RoPE is not implemented)"),
    (
        "use_sliding_window",
        "false (sliding-window attention is not implemented)",
    ),
    (
        "partial_rotary_factor",
        "1.0 (partial rotary embeddings are not implemented)",
    ),
    ("mlp_bias", "false (MLP biases are not implemented)"),
    ("attn_logit_softcapping", "null (logit soft-capping is not implemented)"),
    (
        "final_logit_softcapping",
        "null (logit soft-capping is not implemented)",
    ),
    (
        "scale_attn_by_inverse_layer_idx",
        "false (GPT-2 per-layer attention scaling is not implemented)",
    ),
    (
        "reorder_and_upcast_attn",
        "false (GPT-2's reordered attention is not implemented)",
    ),
    ("add_cross_attention", "false (cross-attention is not implemented)"),
    (
        "tie_word_embeddings",
        "true for GPT-2 (its LM head is always the token embedding)",
    ),
];

/// Refuses keys that would change the math in ways tandem does not implement.
fn refuse_math_keys(v: &Value, model_type: &str, path: &Path) -> Result<()> {
    let gpt2 = model_type == "gpt2";
    for &(key, want) in MATH_KEYS_REFUSED {
        let Some(x) = v.get(key) else { continue };
        let ok = match key {
            "rope_scaling" | "attn_logit_softcapping" | "final_logit_softcapping" => x.is_null(),
            "partial_rotary_factor" => x.is_null() || x.as_f64() == Some(1.0),
            "tie_word_embeddings" => !gpt2 || x.as_bool() != Some(false),
            // Qwen2 attends over a sliding window only when use_sliding_window is true.
            _ => x.is_null() || x.as_bool() == Some(false),
        };
        if !ok {
            return Err(ModelError::BadConfig {
                path: path.into(),
                key,
                msg: format!("{x} is not supported: it must be {want}"),
            });
        }
    }
    Ok(())
}

/// The end-of-sequence ids a checkpoint directory declares: `eos_token_id` in
/// `generation_config.json` when that file names one (a number or a list of numbers, as
/// Llama 3 lists several), else `eos_token_id` in `config.json`; empty when neither does.
/// Generation config first because it is what transformers' `generate` stops on.
pub fn eos_token_ids(dir: &Path) -> Result<Vec<u32>> {
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        if name == "generation_config.json" && !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        let ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a.iter().map(|x| x.as_u64()).collect::<Option<Vec<u64>>>(),
            Some(x) => x.as_u64().map(|n| vec![n]),
        };
        let ids = ids.ok_or_else(|| ModelError::BadConfig {
            path: path.clone(),
            key: "eos_token_id",
            msg: "must be a token id or a list of token ids".into(),
        })?;
        return Ok(ids.into_iter().map(|n| n as u32).collect());
    }
    Ok(vec![])
}

fn token_id(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n as u32),
        // Some configs list several eos ids; the first is the one used for padding.
        Value::Array(a) => a.first().and_then(token_id),
        _ => None,
    }
}
