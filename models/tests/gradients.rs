//! Every trainable tensor receives a non-zero gradient, for both families and both heads.
//! This guards against candle's fused kernels, which silently drop gradients (DESIGN.md).

mod common;

use candle_core::{backprop::GradStore, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use tandem_models::{HeadKind, LanguageModel, ModelConfig, ScalarModel};

fn batch(cfg: &ModelConfig) -> (Tensor, Tensor) {
    let v = cfg.dims().vocab_size as u32;
    // Left padding on the first row so padded positions are exercised too.
    left_padded(
        cfg,
        &[vec![5 % v, 17 % v, 42 % v], vec![7 % v, 3 % v, 99 % v, 11 % v, 250 % v]],
    )
}

fn assert_all_vars_have_grad(what: &str, varmap: &VarMap, grads: &GradStore) {
    let data = varmap.data().lock().unwrap();
    assert!(!data.is_empty());
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name} has no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{what}: {name} gradient norm {norm}");
    }
}

#[test]
fn language_model_gradients_reach_every_parameter() {
    for kind in ["gpt2", "qwen2"] {
        let w = FixtureWeights::load(kind, HeadKind::CausalLm);
        let (model, varmap) = LanguageModel::trainable(&w.cfg, w.init(0), &Device::Cpu).unwrap();
        let (ids, mask) = batch(&w.cfg);
        let out = model.token_logprobs(&ids, &mask, 0, 0.7).unwrap();
        let target_mask = mask.narrow(1, 1, mask.dim(1).unwrap() - 1).unwrap();
        let loss = ((out.logprobs * &target_mask).unwrap().sum_all().unwrap()
            + (out.entropy * &target_mask).unwrap().sum_all().unwrap())
        .unwrap();
        assert_all_vars_have_grad(kind, &varmap, &loss.backward().unwrap());
    }
}

#[test]
fn scalar_heads_gradients_reach_every_parameter() {
    for kind in ["gpt2", "qwen2"] {
        let w = FixtureWeights::load(kind, HeadKind::Scalar);
        let (ids, mask) = batch(&w.cfg);
        // Reward head: score at the last real token.
        let (model, varmap) = ScalarModel::trainable(&w.cfg, w.init(0), &Device::Cpu).unwrap();
        let loss = model.scores(&ids, &mask).unwrap().sum_all().unwrap();
        assert_all_vars_have_grad(&format!("{kind} score"), &varmap, &loss.backward().unwrap());
        // Value head: every real token.
        let (model, varmap) = ScalarModel::trainable(&w.cfg, w.init(0), &Device::Cpu).unwrap();
        let loss = (model.values(&ids, &mask).unwrap() * &mask)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_all_vars_have_grad(&format!("{kind} value"), &varmap, &loss.backward().unwrap());
    }
}

#[test]
fn critic_from_policy_checkpoint_gets_a_fresh_score_head() {
    let w = FixtureWeights::load("gpt2", HeadKind::CausalLm);
    let (model, varmap) = ScalarModel::trainable(&w.cfg, w.init(3), &Device::Cpu).unwrap();
    assert!(varmap.data().lock().unwrap().contains_key("score.weight"));
    let (ids, mask) = batch(&w.cfg);
    let loss = model.values(&ids, &mask).unwrap().sum_all().unwrap();
    assert_all_vars_have_grad("critic from policy", &varmap, &loss.backward().unwrap());
}
