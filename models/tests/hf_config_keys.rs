//! HF config keys that change the math are honoured or refused with an error naming the key;
//! the transformers-made fixture configs (full of metadata keys) still load.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};
use tandem_models::{ModelConfig, ModelError};

fn with(dir: &str, key: &str, value: Value) -> Result<ModelConfig, ModelError> {
    let mut v = read_json(&fixtures_hf().join(dir).join("config.json"));
    v.as_object_mut().unwrap().insert(key.into(), value);
    ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
}

fn refused(dir: &str, key: &str, value: Value) {
    match with(dir, key, value.clone()) {
        Err(ModelError::BadConfig { key: k, msg, .. }) => {
            assert_eq!(k, key, "{dir} {key}={value}: {msg}");
            assert!(msg.contains("not supported"), "{msg}");
        }
        other => panic!("{dir}: {key} = {value} loaded: {other:?}"),
    }
}

#[test]
fn the_fixture_configs_load() {
    for dir in ["gpt2-tiny", "gpt2-tiny-reward", "qwen2-tiny", "qwen2-tiny-reward"] {
        ModelConfig::from_dir(&fixtures_hf().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
}

#[test]
fn keys_that_change_the_math_are_refused() {
    let llama_scaling = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    refused("qwen2-tiny", "rope_scaling", llama_scaling.clone());
    refused("qwen2-tiny", "rope_scaling", json!({"type": "linear", "factor": 2.0}));
    refused("qwen2-tiny", "use_sliding_window", json!(true));
    refused("qwen2-tiny", "partial_rotary_factor", json!(0.5));
    refused("qwen2-tiny", "mlp_bias", json!(true));
    refused("qwen2-tiny", "final_logit_softcapping", json!(30.0));
    refused("gpt2-tiny", "scale_attn_by_inverse_layer_idx", json!(true));
    refused("gpt2-tiny", "reorder_and_upcast_attn", json!(true));
    refused("gpt2-tiny", "add_cross_attention", json!(true));
    refused("gpt2-tiny", "tie_word_embeddings", json!(false));
    // A Llama config with Llama-3.1 scaling is refused too.
    let mut v = read_json(&fixtures_hf().join("qwen2-tiny/config.json"));
    let m = v.as_object_mut().unwrap();
    m.insert("model_type".into(), json!("llama"));
    m.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    m.insert("rope_scaling".into(), llama_scaling);
    let e = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap_err();
    assert!(e.to_string().contains("rope_scaling"), "{e}");
}

#[test]
fn default_values_of_those_keys_and_honoured_keys_load() {
    for (dir, key, value) in [
        ("qwen2-tiny", "rope_scaling", json!(null)),
        ("qwen2-tiny", "use_sliding_window", json!(false)),
        ("qwen2-tiny", "sliding_window", json!(4096)),
        ("qwen2-tiny", "partial_rotary_factor", json!(1.0)),
        ("qwen2-tiny", "mlp_bias", json!(false)),
        ("qwen2-tiny", "tie_word_embeddings", json!(false)),
        ("gpt2-tiny", "tie_word_embeddings", json!(true)),
        ("gpt2-tiny", "scale_attn_by_inverse_layer_idx", json!(false)),
        ("gpt2-tiny", "summary_type", json!("cls_index")),
    ] {
        with(dir, key, value.clone()).unwrap_or_else(|e| panic!("{dir} {key}={value}: {e}"));
    }
    // Honoured: an untied Qwen2 head and a Llama without attention biases.
    let untied = with("qwen2-tiny", "tie_word_embeddings", json!(false)).unwrap();
    match untied.arch {
        tandem_models::config::Architecture::Qwen2(c) => assert!(!c.tie_word_embeddings),
        other => panic!("{other:?}"),
    }
}
