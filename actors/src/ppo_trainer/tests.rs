use super::*;
use crate::trajectory::Trajectory;
use tandem_models::batch::{PadSide, PaddedBatch, PromptResponseBatch};
use tandem_models::{ModelConfig, WeightInit};

const K: usize = 4;

fn model_config() -> ModelConfig {
    ModelConfig::gpt2(32, 16, 1, 2, 64)
}

fn trainer(cfg: TrainerConfig) -> PpoTrainer {
    let mc = model_config();
    let policy = LanguageModel::trainable(&mc, WeightInit::Random { seed: 3 }, &Device::Cpu).unwrap();
    let critic = (cfg.advantage == Advantage::Gae)
        .then(|| ScalarModel::trainable(&mc, WeightInit::Random { seed: 4 }, &Device::Cpu).unwrap());
    PpoTrainer::new(cfg, policy, critic, 1.0, K, 7, Device::Cpu).unwrap()
}

fn fixed(beta: f64) -> KlControllerConfig {
    KlControllerConfig::Fixed { beta }
}

/// The trainer's policy's own untruncated log-probs of `responses` after `prompt`.
fn own_logprobs(t: &PpoTrainer, prompt: &[u32], responses: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let prompts: Vec<&[u32]> = responses.iter().map(|_| prompt).collect();
    let resp: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
    let l = PromptResponseBatch::new(&prompts, &resp, 0, &Device::Cpu).unwrap();
    let out = t
        .policy
        .token_logprobs(&l.ids, &l.mask, l.prompt_width - 1, 1.0)
        .unwrap();
    let rows: Vec<Vec<f32>> = out.logprobs.to_vec2().unwrap();
    rows.iter()
        .zip(responses)
        .map(|(r, resp)| r[..resp.len()].to_vec())
        .collect()
}

/// One trajectory per score, all at `version`, responses of 3 or 4 tokens; full log-probs
/// are the policy's own, behaviour log-probs `full + q_shift` (a truncated q), reference
/// log-probs `full - ref_gap`.
fn batch(t: &PpoTrainer, scores: &[f32], version: u64, q_shift: f32, ref_gap: f32) -> Vec<Trajectory> {
    let prompt = vec![1u32, 2, 3];
    let responses: Vec<Vec<u32>> = (0..scores.len())
        .map(|i| (0..3 + i % 2).map(|j| 4 + ((i * 5 + j * 3) % 27) as u32).collect())
        .collect();
    let full = own_logprobs(t, &prompt, &responses);
    scores
        .iter()
        .enumerate()
        .map(|(i, &score)| Trajectory {
            ticket: 0,
            row: i as u32,
            prompt_index: (i / K) as u64,
            prompt_ids: prompt.clone(),
            response_ids: responses[i].clone(),
            behaviour_logprobs: full[i].iter().map(|l| l + q_shift).collect(),
            full_logprobs: full[i].clone(),
            stopped: false,
            policy_version: version,
            token_versions: vec![],
            sampler: "test".into(),
            sampling_seed: 0,
            ref_logprobs: full[i].iter().map(|l| l - ref_gap).collect(),
            score,
            values: vec![0.0; responses[i].len()],
            sampled_unix_ms: 0,
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b}");
}

/// GRPO advantages of a batch of 2 groups: one of equal scores, one of 0, 1, 2, 3.
const SCORES: [f32; 8] = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0];

#[test]
fn grpo_advantages_are_the_normalised_scores_whatever_beta() {
    // Sample std of 0, 1, 2, 3 (Bessel): sqrt(5/3).
    let std = (5.0f64 / 3.0).sqrt();
    for beta in [0.0, 0.5, 5.0] {
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl: fixed(beta),
            ..TrainerConfig::default()
        };
        assert_eq!(cfg.kl_penalty(), KlPenalty::Loss);
        let mut t = trainer(cfg);
        let b = batch(&t, &SCORES, 0, 0.0, 0.7);
        let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
        for (i, o) in out.iter().enumerate() {
            let want = if i < K {
                0.0
            } else {
                (SCORES[i] as f64 - 1.5) / (std + 1e-6)
            };
            assert_eq!(o.advantages.len(), b[i].response_ids.len());
            for &a in &o.advantages {
                close(a as f64, want, 1e-5);
            }
            // The reward is the score alone, at the last token.
            let last = o.rewards.len() - 1;
            assert_eq!(o.rewards[last], SCORES[i]);
            assert!(o.rewards[..last].iter().all(|&r| r == 0.0));
        }
        // The KL is a loss term: k3 of a 0.7 gap before the first update.
        assert!(stats.kl_loss > 0.0, "beta {beta}: {stats:?}");
        close(stats.kl, mean_len(&b) * 0.7, 1e-4);
    }
}

fn mean_len(b: &[Trajectory]) -> f64 {
    b.iter().map(|t| t.response_ids.len() as f64).sum::<f64>() / b.len() as f64
}

#[test]
fn kl_in_the_reward_is_the_default_for_gae_and_rloo_and_can_be_chosen_for_grpo() {
    for adv in [Advantage::Gae, Advantage::Rloo] {
        let cfg = TrainerConfig {
            advantage: adv,
            ..TrainerConfig::default()
        };
        assert_eq!(cfg.kl_penalty(), KlPenalty::Reward);
    }
    let cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        kl_penalty: Some(KlPenalty::Reward),
        kl: fixed(0.5),
        ..TrainerConfig::default()
    };
    let mut t = trainer(cfg);
    let b = batch(&t, &SCORES, 0, 0.0, 0.7);
    let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
    // Per-token reward -0.5 * 0.7 (k1), the score added at the last token.
    for (o, s) in out.iter().zip(SCORES) {
        let last = o.rewards.len() - 1;
        for &r in &o.rewards[..last] {
            close(r as f64, -0.35, 1e-5);
        }
        close(o.rewards[last] as f64, s as f64 - 0.35, 1e-5);
    }
    assert_eq!(stats.kl_loss, 0.0);
}

#[test]
fn dr_grpo_centres_without_scaling() {
    let cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        grpo: GrpoConfig {
            scale_by_std: false,
            eps: 1e-6,
        },
        kl: fixed(0.1),
        ..TrainerConfig::default()
    };
    let mut t = trainer(cfg);
    let b = batch(&t, &SCORES, 0, 0.0, 0.7);
    let (_, out) = t.step_with_outputs(&b, 0, 0).unwrap();
    for (i, o) in out.iter().enumerate() {
        let want = if i < K { 0.0 } else { SCORES[i] as f64 - 1.5 };
        assert!(
            o.advantages.iter().all(|&a| (a as f64 - want).abs() < 1e-6),
            "{i}: {o:?}"
        );
    }
}

fn tokens(b: &[Trajectory]) -> f64 {
    b.iter().map(|t| t.response_ids.len() as f64).sum()
}

#[test]
fn fresh_rows_have_weight_one_with_or_without_a_stale_row() {
    // Top-k/top-p samplers: behaviour (q) log-probs 0.3 above the untruncated ones.
    let cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        kl: fixed(0.0),
        ppo_epochs: 1,
        minibatch_size: 8,
        ..TrainerConfig::default()
    };
    let mut t = trainer(cfg.clone());
    let fresh = batch(&t, &SCORES, 5, 0.3, 0.0);
    let (stats, _) = t.step_with_outputs(&fresh, 5, 5).unwrap();
    close(stats.behaviour_weight_mean, 1.0, 1e-9);
    // The same rows with the first group from version 4, whose policy gave its tokens
    // 0.5 less log-prob than the current one: w = e^0.5 there, 1 on the fresh rows.
    let mut t = trainer(cfg);
    let mut mixed = batch(&t, &SCORES, 5, 0.3, 0.0);
    for tr in &mut mixed[..K] {
        tr.policy_version = 4;
        tr.full_logprobs.iter_mut().for_each(|l| *l -= 0.5);
        tr.behaviour_logprobs.iter_mut().for_each(|l| *l -= 0.5);
    }
    let (stats, _) = t.step_with_outputs(&mixed, 5, 5).unwrap();
    let stale = tokens(&mixed[..K]);
    let want = (stale * 0.5f64.exp() + tokens(&mixed[K..])) / tokens(&mixed);
    close(stats.behaviour_weight_mean, want, 1e-4);
}

#[test]
fn a_response_spanning_two_versions_is_weighted_per_token() {
    let cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        kl: fixed(0.0),
        ppo_epochs: 1,
        minibatch_size: 8,
        ..TrainerConfig::default()
    };
    // Row 0 adopted version 5 in flight after two tokens sampled by version 4, whose
    // policy gave them 0.5 less log-prob than the current one: w = e^0.5 on those two
    // tokens only, 1 elsewhere (pi_prox is taken per token).
    let spanning = |t: &PpoTrainer| {
        let mut b = batch(t, &SCORES, 5, 0.3, 0.0);
        let tr = &mut b[0];
        tr.policy_version = 4;
        tr.token_versions = (0..tr.response_ids.len()).map(|j| if j < 2 { 4 } else { 5 }).collect();
        for j in 0..2 {
            tr.full_logprobs[j] -= 0.5;
            tr.behaviour_logprobs[j] -= 0.5;
        }
        b
    };
    let mut t = trainer(cfg.clone());
    let b = spanning(&t);
    let (stats, _) = t.step_with_outputs(&b, 5, 5).unwrap();
    assert!(!stats.on_policy);
    let e = 0.5f64.exp();
    close(
        stats.behaviour_weight_mean,
        (2.0 * e + tokens(&b) - 2.0) / tokens(&b),
        1e-4,
    );
    close(stats.behaviour_ratio_max, e, 1e-4);
    close(stats.behaviour_ratio_min, 1.0, 1e-4);
    close(
        stats.behaviour_ratio_mean,
        (2.0 * e + tokens(&b) - 2.0) / tokens(&b),
        1e-4,
    );
    close(stats.behaviour_mismatch_kl, 2.0 * (e - 1.5) / tokens(&b), 1e-4);
    assert_eq!(stats.behaviour_ratio_trunc_frac, 0.0, "e^0.5 is under the cap of 2");
    // Masking tokens more than 0 versions old leaves only weight-1 tokens in the loss.
    let mut t = trainer(cfg);
    t.mask_stale_tokens(0);
    let b = spanning(&t);
    let (stats, _) = t.step_with_outputs(&b, 5, 5).unwrap();
    close(stats.behaviour_weight_mean, 1.0, 1e-4);
}

#[test]
fn the_kl_penalty_of_stale_rows_comes_from_pi_prox() {
    let cfg = TrainerConfig {
        advantage: Advantage::Rloo,
        kl: fixed(1.0),
        ..TrainerConfig::default()
    };
    let mut t = trainer(cfg);
    // Reference 0.2 below the current policy; the stale sampler's log-probs 0.4 above it.
    let mut b = batch(&t, &SCORES, 3, 0.0, 0.2);
    for tr in &mut b {
        tr.policy_version = 2;
        tr.full_logprobs.iter_mut().for_each(|l| *l += 0.4);
        tr.behaviour_logprobs.iter_mut().for_each(|l| *l += 0.4);
    }
    let (stats, out) = t.step_with_outputs(&b, 3, 3).unwrap();
    for o in &out {
        for &r in &o.rewards[..o.rewards.len() - 1] {
            close(r as f64, -0.2, 1e-4);
        }
    }
    close(stats.kl, mean_len(&b) * 0.2, 1e-4);
}

#[test]
fn running_score_normalisation_is_applied_and_checkpointed() {
    let mut cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        kl: fixed(0.0),
        ..TrainerConfig::default()
    };
    cfg.reward.normalize = ScoreNormalization::Running;
    let mut t = trainer(cfg.clone());
    let b = batch(&t, &SCORES, 0, 0.0, 0.0);
    let (stats, out) = t.step_with_outputs(&b, 0, 0).unwrap();
    // Mean 1.25, population variance 0.6875 over the 8 scores.
    let norm = |s: f64| (s - 1.25) / (0.6875f64 + 1e-8).sqrt();
    for (o, s) in out.iter().zip(SCORES) {
        close(*o.rewards.last().unwrap() as f64, norm(s as f64), 1e-5);
    }
    close(stats.reward_mean, 0.0, 1e-5);
    // The statistics travel with the checkpoint state.
    let state = t.state().unwrap();
    let mut resumed = trainer(cfg);
    resumed.load_state(&state).unwrap();
    assert_eq!(resumed.score_norm, t.score_norm);
    let b2 = batch(&t, &[3.0; 8], 1, 0.0, 0.0);
    let (_, o1) = t.step_with_outputs(&b2, 1, 1).unwrap();
    let (_, o2) = resumed.step_with_outputs(&b2, 1, 1).unwrap();
    // 16 scores: mean 2.125, population variance (5.5 + 8 * 0.765625) / 16.
    let var = (0.6875 * 8.0 + 8.0 * 0.875f64.powi(2) + 8.0 * 0.875f64.powi(2)) / 16.0;
    let want = (3.0 - 2.125) / (var + 1e-8).sqrt();
    close(*o1[0].rewards.last().unwrap() as f64, want, 1e-5);
    assert_eq!(o1, o2);
}

#[test]
fn the_ema_follows_each_update_and_survives_a_checkpoint() {
    let cfg = TrainerConfig {
        advantage: Advantage::Grpo,
        kl: fixed(0.0),
        ppo_epochs: 1,
        minibatch_size: 8,
        policy_lr: 1e-2,
        ema_decay: Some(0.75),
        ..TrainerConfig::default()
    };
    let mut t = trainer(cfg.clone());
    let before = t.policy_weights().unwrap();
    let b = batch(&t, &SCORES, 0, 0.0, 0.0);
    t.step(&b, 0, 0).unwrap();
    // One update: ema = 0.75 * w0 + 0.25 * w1.
    let after = t.policy_weights().unwrap();
    let ema = t.ema_weights().unwrap();
    let mut moved = 0.0f64;
    for (name, e) in &ema {
        let want = ((&before[name] * 0.75).unwrap() + (&after[name] * 0.25).unwrap()).unwrap();
        let diff = (e - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{name}: {diff}");
        moved += (&after[name] - &before[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    assert!(moved > 0.0);
    let mut resumed = trainer(cfg);
    resumed.load_state(&t.state().unwrap()).unwrap();
    let got = resumed.ema_weights().unwrap();
    for (name, e) in &ema {
        assert_eq!(
            e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn ppo_ptx_raises_the_likelihood_of_the_pretraining_texts() {
    let texts: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10], vec![11, 12, 13], vec![14, 15, 16, 17]];
    let mean_lp = |t: &PpoTrainer| -> f64 {
        let b = PaddedBatch::new(&texts, 0, PadSide::Right, &Device::Cpu).unwrap();
        let mask = b.mask_tensor(&Device::Cpu).unwrap();
        let w = mask.dim(1).unwrap();
        let out = t.policy.token_logprobs(&b.ids, &mask, 0, 1.0).unwrap();
        tandem_models::rl::masked_mean(&out.logprobs, &mask.narrow(1, 1, w - 1).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let run = |gamma: f64| -> (f64, f64, StepStats) {
        let cfg = TrainerConfig {
            advantage: Advantage::Grpo,
            kl: fixed(0.0),
            ppo_epochs: 1,
            minibatch_size: 8,
            policy_lr: 1e-2,
            ptx_coef: gamma,
            ..TrainerConfig::default()
        };
        let mut t = trainer(cfg);
        t.set_pretraining(texts.clone(), 3).unwrap();
        let start = mean_lp(&t);
        let b = batch(&t, &SCORES, 0, 0.0, 0.0);
        let stats = t.step(&b, 0, 0).unwrap();
        (start, mean_lp(&t), stats)
    };
    let (start, without, s0) = run(0.0);
    let (start2, with, s1) = run(5.0);
    assert_eq!(start, start2);
    assert_eq!(s0.ptx_logprob, 0.0);
    // The reported log-likelihood is the texts' before the (only) update.
    close(s1.ptx_logprob, start, 1e-5);
    assert!(with > without + 0.01, "ptx {start} -> {with}, without {without}");
    assert!(trainer(TrainerConfig {
        advantage: Advantage::Grpo,
        ..TrainerConfig::default()
    })
    .set_pretraining(vec![vec![1]], 1)
    .is_err());
}
