//! Generation: KV cache parity with full recompute, seeded reproducibility, padding invariance,
//! stop tokens, what truncation does to behaviour log-probs, and weights adopted in flight.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use rand::{rngs::StdRng, SeedableRng};
use tandem_models::batch::{PadSide, PaddedBatch};
use tandem_models::generation::sample_token;
use tandem_models::{
    generate, generate_inflight, load_tensors, Decoding, HeadKind, Inflight, InflightKv, LanguageModel, ModelConfig,
    SamplingConfig,
};

fn lm_fixtures() -> Vec<LanguageModel> {
    checkpoints()
        .into_iter()
        .filter(|d| ModelConfig::from_dir(d).unwrap().head == HeadKind::CausalLm)
        .map(|d| LanguageModel::load(&d, &Device::Cpu).unwrap())
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![84, 258, 298],
        vec![83, 258, 265, 382, 287, 260, 329],
        vec![87],
        vec![87, 281, 259, 260, 303],
    ]
}

fn sampling() -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: 16,
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        ..Default::default()
    }
}

#[test]
fn cached_decoding_matches_full_recompute() {
    for model in lm_fixtures() {
        let cached = generate(
            &model,
            &prompts(),
            &sampling(),
            &mut StdRng::seed_from_u64(7),
            Decoding::Cached,
        )
        .unwrap();
        let full = generate(
            &model,
            &prompts(),
            &sampling(),
            &mut StdRng::seed_from_u64(7),
            Decoding::Recompute,
        )
        .unwrap();
        assert_eq!(cached.responses, full.responses);
        // One-token and whole-sequence f32 GEMMs sum in different orders (more so with the
        // AVX-512 kernels): log-probs near -5 differ by about 1e-5.
        let tol = 5e-5;
        for (a, b) in cached.full_logprobs.iter().zip(&full.full_logprobs) {
            let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert_close("cached vs recomputed logprob", &a, &b, tol);
        }
        for (a, b) in cached.logprobs.iter().zip(&full.logprobs) {
            let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert_close("cached vs recomputed behaviour logprob", &a, &b, tol);
        }
    }
}

#[test]
fn learner_recomputes_the_samplers_full_logprobs() {
    // The learner scores prompt+response in one padded forward at the sampling temperature and
    // must get back the sampler's untruncated log-probs.
    for model in lm_fixtures() {
        let cfg = SamplingConfig {
            temperature: 0.8,
            ..sampling()
        };
        let g = generate(
            &model,
            &prompts(),
            &cfg,
            &mut StdRng::seed_from_u64(1),
            Decoding::Cached,
        )
        .unwrap();
        for (i, p) in prompts().iter().enumerate() {
            let seq: Vec<u32> = p.iter().chain(&g.responses[i]).copied().collect();
            let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
            let mask = Tensor::ones((1, seq.len()), candle_core::DType::F32, &Device::Cpu).unwrap();
            let out = model.token_logprobs(&ids, &mask, p.len() - 1, 0.8).unwrap();
            let got: Vec<f64> = out
                .logprobs
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect();
            let want: Vec<f64> = g.full_logprobs[i].iter().map(|&x| x as f64).collect();
            assert_close("recomputed logprobs", &got, &want, 1e-4);
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let model = &lm_fixtures()[0];
    let run = |seed| {
        generate(
            model,
            &prompts(),
            &sampling(),
            &mut StdRng::seed_from_u64(seed),
            Decoding::Cached,
        )
        .unwrap()
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11).responses, run(12).responses);
}

#[test]
fn padding_never_changes_a_row() {
    for model in lm_fixtures() {
        let greedy = SamplingConfig::greedy(10);
        let together = generate(
            &model,
            &prompts(),
            &greedy,
            &mut StdRng::seed_from_u64(0),
            Decoding::Cached,
        )
        .unwrap();
        for (i, p) in prompts().iter().enumerate() {
            let alone = generate(
                &model,
                std::slice::from_ref(p),
                &greedy,
                &mut StdRng::seed_from_u64(0),
                Decoding::Cached,
            )
            .unwrap();
            assert_eq!(alone.responses[0], together.responses[i]);
            let a: Vec<f64> = alone.full_logprobs[0].iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = together.full_logprobs[i].iter().map(|&x| x as f64).collect();
            assert_close("padded vs alone", &a, &b, 1e-4);
        }
        // Right padding in a training forward: row results equal the unpadded row's.
        let seqs = prompts();
        let batch = PaddedBatch::new(&seqs, 0, PadSide::Right, &Device::Cpu).unwrap();
        let mask = batch.mask_tensor(&Device::Cpu).unwrap();
        let out = model
            .token_logprobs(&batch.ids, &mask, 0, 1.0)
            .unwrap()
            .logprobs
            .to_vec2::<f32>()
            .unwrap();
        for (i, s) in seqs.iter().enumerate().filter(|(_, s)| s.len() > 1) {
            let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
            let m = Tensor::ones((1, s.len()), candle_core::DType::F32, &Device::Cpu).unwrap();
            let alone = model
                .token_logprobs(&ids, &m, 0, 1.0)
                .unwrap()
                .logprobs
                .to_vec2::<f32>()
                .unwrap();
            let a: Vec<f64> = alone[0].iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = out[i][..s.len() - 1].iter().map(|&x| x as f64).collect();
            assert_close("right padded", &b, &a, 1e-4);
        }
    }
}

#[test]
fn stop_tokens_end_rows_and_are_kept() {
    let model = &lm_fixtures()[0];
    let free = generate(
        model,
        &prompts(),
        &SamplingConfig::greedy(12),
        &mut StdRng::seed_from_u64(0),
        Decoding::Cached,
    )
    .unwrap();
    // Stop on the third greedy token of row 0: that row ends there, others go on unless they hit it.
    let stop = free.responses[0][2];
    let cfg = SamplingConfig {
        stop_tokens: vec![stop],
        ..SamplingConfig::greedy(12)
    };
    let g = generate(model, &prompts(), &cfg, &mut StdRng::seed_from_u64(0), Decoding::Cached).unwrap();
    let first = free.responses[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(g.responses[0], free.responses[0][..=first].to_vec());
    assert!(g.stopped[0]);
    for (i, r) in g.responses.iter().enumerate() {
        let cut = free.responses[i].iter().position(|&t| t == stop).map_or(12, |p| p + 1);
        assert_eq!(r, &free.responses[i][..cut].to_vec(), "row {i}");
        assert_eq!(g.stopped[i], cut < 12 || free.responses[i][11] == stop);
    }
    let mask = g.response_mask();
    assert_eq!(mask[0].iter().sum::<f32>() as usize, g.responses[0].len());
    assert_eq!(g.padded_ids(0)[0].len(), g.width());
}

#[test]
fn truncation_raises_behaviour_logprobs_and_greedy_is_a_point_mass() {
    let logits: Vec<f32> = vec![2.0, 1.0, 0.5, 0.0, -1.0];
    let mut rng = StdRng::seed_from_u64(0);
    // Untruncated at T=1: behaviour and full log-probs agree.
    let plain = SamplingConfig::default();
    for _ in 0..20 {
        let (_, lp, full) = sample_token(&logits, &plain, &mut rng);
        assert!((lp - full).abs() < 1e-6);
    }
    // top_k = 2: q renormalises over {0, 1}: log q(0) = 2 - ln(e^2 + e^1).
    let k2 = SamplingConfig {
        top_k: 2,
        ..plain.clone()
    };
    for _ in 0..50 {
        let (tok, lp, full) = sample_token(&logits, &k2, &mut rng);
        assert!(tok < 2, "top-k sampled {tok}");
        let want = logits[tok as usize] as f64 - (2f64.exp() + 1f64.exp()).ln();
        assert!((lp as f64 - want).abs() < 1e-5, "{lp} vs {want}");
        assert!(lp >= full);
    }
    // top_p = 0.5: p(0) = e^2 / sum = 0.5465... >= 0.5, so only token 0 remains: log q = 0.
    let p = SamplingConfig {
        top_p: 0.5,
        ..plain.clone()
    };
    let (tok, lp, _) = sample_token(&logits, &p, &mut rng);
    assert_eq!((tok, lp), (0, 0.0));
    // Temperature 0.5 doubles the logits: full log-prob of token 1 = 2 - ln(sum e^{2 l}).
    let t = SamplingConfig {
        temperature: 0.5,
        top_k: 2,
        ..plain.clone()
    };
    let z: f64 = logits.iter().map(|&l| (2.0 * l as f64).exp()).sum();
    loop {
        let (tok, _, full) = sample_token(&logits, &t, &mut rng);
        if tok == 1 {
            assert!((full as f64 - (2.0 - z.ln())).abs() < 1e-5);
            break;
        }
    }
    let (tok, lp, full) = sample_token(&logits, &SamplingConfig::greedy(1), &mut rng);
    let z1: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    assert_eq!((tok, lp), (0, 0.0));
    assert!((full as f64 - (2.0 - z1.ln())).abs() < 1e-5);
}

#[test]
fn untruncated_sampling_draws_tokens_at_their_probabilities() {
    // Without top-k or top-p the sampler walks the weights in id order; the frequencies must
    // still be softmax(l / T), with the returned log-probs exact.
    let logits: Vec<f32> = vec![2.0, 1.0, 0.5, 0.0, -1.0, 1.5];
    for temperature in [1.0, 0.7] {
        let cfg = SamplingConfig {
            temperature,
            ..SamplingConfig::default()
        };
        let z: f64 = logits.iter().map(|&l| (l as f64 / temperature).exp()).sum();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0usize; logits.len()];
        let draws = 40_000;
        for _ in 0..draws {
            let (tok, lp, full) = sample_token(&logits, &cfg, &mut rng);
            let want = logits[tok as usize] as f64 / temperature - z.ln();
            assert!((full as f64 - want).abs() < 1e-5 && lp == full, "{lp} {full} vs {want}");
            counts[tok as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64 / temperature).exp() / z;
            let freq = c as f64 / draws as f64;
            // 5 standard errors of a binomial proportion.
            let tol = 5.0 * (p * (1.0 - p) / draws as f64).sqrt();
            assert!((freq - p).abs() < tol, "token {i} at T={temperature}: {freq} vs {p}");
        }
    }
}

#[test]
fn too_long_requests_are_refused() {
    let model = &lm_fixtures()[0];
    let max = model.config().dims().max_positions;
    let err = generate(
        model,
        &[vec![1; 4]],
        &SamplingConfig::greedy(max),
        &mut StdRng::seed_from_u64(0),
        Decoding::Cached,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("positions"), "{err}");
    assert!(generate(
        model,
        &[vec![]],
        &SamplingConfig::greedy(2),
        &mut StdRng::seed_from_u64(0),
        Decoding::Cached
    )
    .unwrap_err()
    .to_string()
    .contains("empty"));
}

/// Each fixture language model, and the same model with its weights scaled by `scale`.
fn lm_pairs(scale: f64) -> Vec<(LanguageModel, Arc<LanguageModel>)> {
    checkpoints()
        .into_iter()
        .filter(|d| ModelConfig::from_dir(d).unwrap().head == HeadKind::CausalLm)
        .map(|d| {
            let cfg = ModelConfig::from_dir(&d).unwrap();
            let tensors = load_tensors(&d, &cfg, &Device::Cpu).unwrap();
            let scaled = tensors.into_iter().map(|(k, t)| (k, (t * scale).unwrap())).collect();
            let other = LanguageModel::from_tensors(&cfg, scaled, &Device::Cpu).unwrap();
            (LanguageModel::load(&d, &Device::Cpu).unwrap(), Arc::new(other))
        })
        .collect()
}

/// Generates with `first`, adopting `second` as version 9 at step `at`.
fn switch_at(
    first: &LanguageModel,
    second: &Arc<LanguageModel>,
    at: usize,
    kv: InflightKv,
) -> tandem_models::Generation {
    let mut asked = vec![];
    let mut next = |step: usize| {
        asked.push(step);
        (step == at).then(|| (9, second.clone()))
    };
    let g = generate_inflight(
        first,
        &prompts(),
        &sampling(),
        &mut StdRng::seed_from_u64(7),
        Decoding::Cached,
        Some(Inflight { next: &mut next, kv }),
    )
    .unwrap();
    assert_eq!(
        asked,
        (1..asked.len() + 1).collect::<Vec<_>>(),
        "asked before every decode step"
    );
    g
}

#[test]
fn inflight_adoption_of_the_same_weights_changes_nothing() {
    for (model, same) in lm_pairs(1.0) {
        let plain = generate(
            &model,
            &prompts(),
            &sampling(),
            &mut StdRng::seed_from_u64(7),
            Decoding::Cached,
        )
        .unwrap();
        let kept = switch_at(&model, &same, 5, InflightKv::Keep);
        assert_eq!(kept.adopted, vec![(5, 9)]);
        assert_eq!(kept.responses, plain.responses);
        assert_eq!(kept.logprobs, plain.logprobs, "same weights, same cache: bit-exact");
        let recomputed = switch_at(&model, &same, 5, InflightKv::Recompute);
        assert_eq!(recomputed.responses, plain.responses);
        for (a, b) in recomputed.full_logprobs.iter().zip(&plain.full_logprobs) {
            let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert_close("recomputed cache vs kept", &a, &b, 5e-5);
        }
    }
}

#[test]
fn inflight_adoption_samples_later_steps_with_the_new_weights() {
    for (model, other) in lm_pairs(1.5) {
        let at = 4;
        let first = generate(
            &model,
            &prompts(),
            &sampling(),
            &mut StdRng::seed_from_u64(7),
            Decoding::Cached,
        )
        .unwrap();
        for kv in [InflightKv::Keep, InflightKv::Recompute] {
            let g = switch_at(&model, &other, at, kv);
            assert_eq!(g.adopted, vec![(at, 9)]);
            for (row, (a, b)) in g.full_logprobs.iter().zip(&first.full_logprobs).enumerate() {
                let n = at.min(a.len());
                assert_eq!(
                    a[..n],
                    b[..n],
                    "row {row}: tokens before the switch are the old policy's"
                );
            }
            let changed = g
                .full_logprobs
                .iter()
                .zip(&first.full_logprobs)
                .any(|(a, b)| a.len() > at && a[at] != b[at]);
            assert!(
                changed,
                "{kv:?}: the step after the switch is scored by the new weights"
            );
        }
        let kept = switch_at(&model, &other, at, InflightKv::Keep);
        let recomputed = switch_at(&model, &other, at, InflightKv::Recompute);
        let differ = kept
            .full_logprobs
            .iter()
            .zip(&recomputed.full_logprobs)
            .any(|(a, b)| a.len() > at && a[at] != b[at]);
        assert!(differ, "a recomputed cache is not the kept one");
    }
}
