//! Checkpoints round-trip through tandem's writer in the same HF layout they were read from,
//! single-file or sharded, and bad checkpoints fail with errors that name what is wrong.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use tandem_models::{
    load_tensors, save_checkpoint, snapshot, HeadKind, LanguageModel, ModelConfig, ScalarModel, TextTokenizer,
    WeightInit,
};

/// name -> shape from a safetensors header.
fn header(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(
        h["__metadata__"]["format"],
        "pt",
        "{}: transformers needs format=pt",
        path.display()
    );
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            (
                k.clone(),
                v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect()
}

fn outputs(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let m = Tensor::ones((1, ids.len()), candle_core::DType::F32, &Device::Cpu).unwrap();
    match ModelConfig::from_dir(dir).unwrap().head {
        HeadKind::CausalLm => {
            LanguageModel::load(dir, &Device::Cpu)
                .unwrap()
                .token_logprobs(&x, &m, 0, 1.0)
                .unwrap()
                .logprobs
        }
        HeadKind::Scalar => ScalarModel::load(dir, &Device::Cpu).unwrap().values(&x, &m).unwrap(),
    }
    .flatten_all()
    .unwrap()
    .to_vec1()
    .unwrap()
}

fn resave(src: &Path, dst: &Path, shard: Option<usize>) {
    let cfg = ModelConfig::from_dir(src).unwrap();
    let tensors = load_tensors(src, &cfg, &Device::Cpu).unwrap();
    let init = WeightInit::Checkpoint {
        tensors: &tensors,
        dir: src,
        seed: 0,
    };
    let varmap = match cfg.head {
        HeadKind::CausalLm => LanguageModel::trainable(&cfg, init, &Device::Cpu).unwrap().1,
        HeadKind::Scalar => ScalarModel::trainable(&cfg, init, &Device::Cpu).unwrap().1,
    };
    save_checkpoint(dst, &cfg, &snapshot(&varmap).unwrap(), shard).unwrap();
    TextTokenizer::from_dir(src).unwrap().save_to_dir(dst).unwrap();
}

#[test]
fn saved_checkpoints_match_the_original_layout_and_numbers() {
    let ids = [84u32, 258, 298, 361, 260];
    for src in checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        resave(&src, tmp.path(), None);
        assert_eq!(
            header(&tmp.path().join("model.safetensors")),
            header(&src.join("model.safetensors")),
            "{}",
            src.display()
        );
        let (a, b) = (
            read_json(&src.join("config.json")),
            read_json(&tmp.path().join("config.json")),
        );
        for key in [
            "model_type",
            "architectures",
            "vocab_size",
            "n_embd",
            "n_layer",
            "n_head",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "tie_word_embeddings",
            "rope_theta",
            "id2label",
        ] {
            // Versions of transformers differ in which defaults they write; every key the
            // original has must come back with its value.
            if a.get(key).is_some() {
                assert_eq!(a.get(key), b.get(key), "{}: config key {key}", src.display());
            }
        }
        assert_eq!(
            ModelConfig::from_dir(&src).unwrap(),
            ModelConfig::from_dir(tmp.path()).unwrap()
        );
        assert_eq!(outputs(&src, &ids), outputs(tmp.path(), &ids), "{}", src.display());
        let tok = TextTokenizer::from_dir(tmp.path()).unwrap();
        assert_eq!(
            tok.encode("the movie was good").unwrap(),
            vec![84, 258, 298, 361, 260, 329, 362]
        );
    }
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let src = &checkpoints()[0];
    let tmp = tempfile::tempdir().unwrap();
    resave(src, tmp.path(), Some(40_000));
    let index = read_json(&tmp.path().join("model.safetensors.index.json"));
    let files: std::collections::BTreeSet<_> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert!(files.len() > 1, "expected several shards, got {files:?}");
    assert!(!tmp.path().join("model.safetensors").exists());
    let ids = [84u32, 258, 298, 361, 260];
    assert_eq!(outputs(src, &ids), outputs(tmp.path(), &ids));
}

#[test]
fn random_initialisation_is_seeded() {
    let cfg = ModelConfig::qwen2(64, 32, 2, 4, 2, 64);
    let a = snapshot(
        &LanguageModel::trainable(&cfg, WeightInit::Random { seed: 5 }, &Device::Cpu)
            .unwrap()
            .1,
    )
    .unwrap();
    let b = snapshot(
        &LanguageModel::trainable(&cfg, WeightInit::Random { seed: 5 }, &Device::Cpu)
            .unwrap()
            .1,
    )
    .unwrap();
    let c = snapshot(
        &LanguageModel::trainable(&cfg, WeightInit::Random { seed: 6 }, &Device::Cpu)
            .unwrap()
            .1,
    )
    .unwrap();
    let flat =
        |m: &std::collections::HashMap<String, Tensor>, k: &str| m[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let k = "model.layers.1.self_attn.q_proj.weight";
    assert_eq!(flat(&a, k), flat(&b, k));
    assert_ne!(flat(&a, k), flat(&c, k));
    assert!(flat(&a, "model.norm.weight").iter().all(|&x| x == 1.0));
    assert!(flat(&a, "model.layers.0.self_attn.q_proj.bias")
        .iter()
        .all(|&x| x == 0.0));
}

fn copy_fixture(kind_lm: bool) -> (tempfile::TempDir, ModelConfig) {
    let src = checkpoints()
        .into_iter()
        .find(|d| (ModelConfig::from_dir(d).unwrap().head == HeadKind::CausalLm) == kind_lm)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let cfg = ModelConfig::from_dir(&src).unwrap();
    (tmp, cfg)
}

#[test]
fn bad_checkpoints_name_what_is_wrong() {
    let missing = LanguageModel::load(Path::new("/nonexistent/model"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/model"), "{missing}");

    // A tensor removed from the weights: the error names it.
    let (tmp, cfg) = copy_fixture(true);
    let mut tensors = load_tensors(tmp.path(), &cfg, &Device::Cpu).unwrap();
    let victim = tensors
        .keys()
        .find(|k| k.contains("layers.1.") || k.contains("h.1."))
        .unwrap()
        .clone();
    tensors.remove(&victim);
    save_checkpoint(tmp.path(), &cfg, &tensors, None).unwrap();
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains(&victim) && err.contains("missing"), "{err}");

    // A config whose sizes disagree with the weights: the error names a tensor and both shapes.
    let (tmp, _) = copy_fixture(true);
    let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = "vocab_size";
    v[key] = serde_json::json!(v[key].as_u64().unwrap() + 1);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("shape") && err.contains(tmp.path().to_str().unwrap()),
        "{err}"
    );

    // Unsupported architecture and a missing config key name the file and key.
    let (tmp, _) = copy_fixture(true);
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("bert"), "{err}");
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "gpt2", "n_embd": 8}"#).unwrap();
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("missing field"), "{err}");

    // A reward model is not a language model.
    let (tmp, _) = copy_fixture(false);
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("ForSequenceClassification"), "{err}");

    // Garbage weights file.
    let (tmp, _) = copy_fixture(true);
    std::fs::write(tmp.path().join("model.safetensors"), b"not safetensors").unwrap();
    let err = LanguageModel::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}
