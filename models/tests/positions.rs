//! Forwards that compute the last block only at the positions they return (`Positions`) give
//! the values and the gradients of the full forward read at those positions, for both families.

mod common;

use candle_core::{backprop::GradStore, Device, Tensor, D};
use candle_nn::VarMap;
use common::*;
use tandem_models::{HeadKind, LanguageModel, ModelConfig, ScalarModel};

/// Two rows, the first left-padded, seven columns.
fn batch(cfg: &ModelConfig) -> (Tensor, Tensor) {
    let v = cfg.dims().vocab_size as u32;
    left_padded(
        cfg,
        &[
            vec![5 % v, 17 % v, 42 % v, 8 % v, 61 % v],
            vec![7 % v, 3 % v, 99 % v, 11 % v, 250 % v, 31 % v, 4 % v],
        ],
    )
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(g.len(), w.len(), "{what}: sizes");
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * scale,
            "{what}[{i}]: {a} against {b} (scale {scale})"
        );
    }
}

fn assert_same_grads(what: &str, varmap: &VarMap, got: &GradStore, want: &GradStore) {
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        match (got.get(var.as_tensor()), want.get(var.as_tensor())) {
            (Some(g), Some(w)) => assert_close(&format!("{what} d{name}"), g, w),
            (g, w) => assert!(
                g.is_none() && w.is_none(),
                "{what}: {name} has a gradient on one side only"
            ),
        }
    }
}

/// Fixed per-position weights, so the loss reads every returned position differently.
fn weights(rows: usize, cols: usize) -> Tensor {
    let w: Vec<f32> = (0..rows * cols).map(|i| 0.3 + (i % 7) as f32 * 0.1).collect();
    Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn values_at_and_scores_match_the_full_forward() {
    for kind in ["gpt2", "qwen2"] {
        let w = FixtureWeights::load(kind, HeadKind::Scalar);
        let (model, varmap) = ScalarModel::trainable(&w.cfg, w.init(0), &Device::Cpu).unwrap();
        let (ids, mask) = batch(&w.cfg);
        let (start, len) = (2, 4);
        let w = weights(2, len);

        let full = model.values(&ids, &mask).unwrap();
        let got = model.values_at(&ids, &mask, start, len).unwrap();
        let want = full.narrow(1, start, len).unwrap();
        assert_close(&format!("{kind} values"), &got, &want);
        let g = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let r = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_same_grads(&format!("{kind} values_at"), &varmap, &g, &r);

        // Scores: the value at each row's last real token, which is the last column here.
        let scores = model.scores(&ids, &mask).unwrap();
        let t = ids.dim(1).unwrap();
        let want = full.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        assert_close(&format!("{kind} scores"), &scores, &want);
        let g = scores.sum_all().unwrap().backward().unwrap();
        let r = want.sum_all().unwrap().backward().unwrap();
        assert_same_grads(&format!("{kind} scores"), &varmap, &g, &r);

        assert!(
            model.values_at(&ids, &mask, 5, 3).is_err(),
            "a span past the end is an error"
        );
    }
}

#[test]
fn token_logprobs_match_the_full_logits() {
    for kind in ["gpt2", "qwen2"] {
        let w = FixtureWeights::load(kind, HeadKind::CausalLm);
        let (model, varmap) = LanguageModel::trainable(&w.cfg, w.init(0), &Device::Cpu).unwrap();
        let (ids, mask) = batch(&w.cfg);
        let t = ids.dim(1).unwrap();
        let start = 2;
        let n = t - 1 - start;
        let w = weights(2, n);

        let got = model.token_logprobs(&ids, &mask, start, 1.0).unwrap().logprobs;
        let mask_rows = mask.to_vec2::<f32>().unwrap();
        let logits = model
            .forward(&ids, &mask_rows, None)
            .unwrap()
            .narrow(1, start, n)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let targets = ids
            .narrow(1, start + 1, n)
            .unwrap()
            .contiguous()
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let want = logp.gather(&targets, 2).unwrap().squeeze(2).unwrap();
        assert_close(&format!("{kind} logprobs"), &got, &want);
        let g = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let r = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_same_grads(&format!("{kind} token_logprobs"), &varmap, &g, &r);
    }
}
