//! Parity with Hugging Face transformers on every checkpoint in the repository's fixtures/hf
//! (or `$TANDEM_FIXTURES/hf`).
//! Nothing here depends on the checkpoints' sizes: the tests read config.json and expected.json.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use rand::{rngs::StdRng, SeedableRng};
use tandem_models::{
    generate, Decoding, HeadKind, LanguageModel, ModelConfig, SamplingConfig, ScalarModel, TextTokenizer,
};

fn ones(n: usize) -> Tensor {
    Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap()
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap()
}

#[test]
fn language_models_match_transformers() {
    let mut checked = 0;
    for dir in checkpoints() {
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        if cfg.head != HeadKind::CausalLm {
            continue;
        }
        let model = LanguageModel::load(&dir, &Device::Cpu).unwrap();
        let expected = read_json(&dir.join("expected.json"));
        for case in expected["cases"].as_array().unwrap() {
            let ids = u32s(&case["input_ids"]);
            let name = format!("{}", dir.display());
            let out = model
                .token_logprobs(&ids_tensor(&ids), &ones(ids.len()), 0, 1.0)
                .unwrap();
            let got: Vec<f64> = out
                .logprobs
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            assert_close(
                &format!("{name} next_token_logprobs"),
                &got,
                &f64s(&case["next_token_logprobs"]),
                1e-4,
            );

            let mask = vec![vec![1.0f32; ids.len()]];
            let logits = model.forward(&ids_tensor(&ids), &mask, None).unwrap();
            let last: Vec<f64> = logits
                .get(0)
                .unwrap()
                .get(ids.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[..8]
                .iter()
                .map(|&x| x as f64)
                .collect();
            assert_close(
                &format!("{name} last_logits_first8"),
                &last,
                &f64s(&case["last_logits_first8"]),
                1e-4,
            );

            let mut rng = StdRng::seed_from_u64(0);
            let g = generate(
                &model,
                std::slice::from_ref(&ids),
                &SamplingConfig::greedy(12),
                &mut rng,
                Decoding::Cached,
            )
            .unwrap();
            assert_eq!(
                g.responses[0],
                u32s(&case["greedy_12"]),
                "{name}: greedy continuation of {ids:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} LM cases checked");
}

#[test]
fn reward_models_match_transformers() {
    let mut checked = 0;
    for dir in checkpoints() {
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        if cfg.head != HeadKind::Scalar {
            continue;
        }
        let model = ScalarModel::load(&dir, &Device::Cpu).unwrap();
        let expected = read_json(&dir.join("expected.json"));
        for case in expected["cases"].as_array().unwrap() {
            let ids = u32s(&case["input_ids"]);
            let s = model
                .scores(&ids_tensor(&ids), &ones(ids.len()))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0];
            let want = case["score"].as_f64().unwrap();
            assert!(
                (s as f64 - want).abs() <= 1e-4,
                "{}: score {s} vs {want}",
                dir.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} reward cases checked");
}

#[test]
fn tokenizer_matches_transformers() {
    let hf = fixtures_hf();
    let expected = read_json(&hf.join("tokenizer-expected.json"));
    for dir in checkpoints() {
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        for ((text, ids), decoded) in expected["texts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(expected["ids"].as_array().unwrap())
            .zip(expected["decoded"].as_array().unwrap())
        {
            let got = tok.encode(text.as_str().unwrap()).unwrap();
            assert_eq!(got, u32s(ids), "{}: encode {text}", dir.display());
            assert_eq!(tok.decode(&got).unwrap(), decoded.as_str().unwrap());
        }
    }
}
