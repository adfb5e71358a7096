//! KL estimators, per-token rewards, score normalisers and KL controllers.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl_common;

mod rl {
    use super::rl_common::*;
    use proptest::prelude::*;
    use tandem_models::rl::kl::sequence_kl;
    use tandem_models::rl::kl_controller::adaptive_beta_step;
    use tandem_models::rl::*;

    // ---------- KL estimators ----------

    #[test]
    fn kl_estimators_hand_computed() {
        // d = logp - ref_logp = [-1 - (-1.5), -2 - (-1)] = [0.5, -1.0]
        let logp = t2(&[&[-1.0, -2.0]]);
        let ref_logp = t2(&[&[-1.5, -1.0]]);
        let mask = mask_of(&[2], 2);
        let k = |e| v2(&kl_per_token(e, &logp, &ref_logp, &mask).unwrap())[0].clone();
        close_v(&k(KlEstimator::K1), &[0.5, -1.0], 1e-12);
        // k2 = 0.5 d^2 = [0.5 * 0.25, 0.5 * 1.0]
        close_v(&k(KlEstimator::K2), &[0.125, 0.5], 1e-12);
        // k3 = exp(-d) - 1 + d = [exp(-0.5) - 0.5, exp(1) - 2]
        //    = [0.6065306597 - 0.5, 2.7182818285 - 2]
        close_v(&k(KlEstimator::K3), &[0.1065306597, 0.7182818285], 1e-9);
    }

    #[test]
    fn kl_is_zero_on_padding_even_with_garbage() {
        let logp = t2(&[&[-1.0, f64::NAN, f64::INFINITY]]);
        let ref_logp = t2(&[&[-1.5, 3.0, f64::NEG_INFINITY]]);
        let mask = mask_of(&[1], 3);
        for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let k = v2(&kl_per_token(e, &logp, &ref_logp, &mask).unwrap());
            assert_eq!(k[0][1..], [0.0, 0.0]);
            close(k[0][0], e.value(-1.0, -1.5), 1e-12);
        }
    }

    #[test]
    fn kl_estimator_names_in_configs() {
        let e: KlEstimator = serde_json::from_str("\"k3\"").unwrap();
        assert_eq!(e, KlEstimator::K3);
        let e: KlEstimator = serde_json::from_str("\"k1\"").unwrap();
        assert_eq!(e, KlEstimator::K1);
        assert!(serde_json::from_str::<KlEstimator>("\"K2\"").is_err());
        assert!(serde_json::from_str::<KlEstimator>("\"k4\"").is_err());
        assert_eq!(serde_json::to_string(&KlEstimator::K2).unwrap(), "\"k2\"");
    }

    #[test]
    fn kl_shape_mismatch_is_an_error() {
        let r = kl_per_token(KlEstimator::K1, &t2(&[&[0.0, 0.0]]), &t2(&[&[0.0]]), &mask_of(&[1], 2));
        assert!(matches!(r, Err(RlError::InvalidArgument(_))));
    }

    #[test]
    fn sequence_kl_sums_real_tokens() {
        // row 0: 0.1 + 0.2 + 0.3 = 0.6; row 1: 0.4 (padding ignored)
        let kl = t2(&[&[0.1, 0.2, 0.3], &[0.4, 9.0, 9.0]]);
        let seq = v1(&sequence_kl(&kl, &mask_of(&[3, 1], 3)).unwrap());
        close_v(&seq, &[0.6, 0.4], 1e-12);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn kl_tensor_matches_scalar_and_k2_k3_nonnegative(
            pairs in proptest::collection::vec((-5.0f64..0.0, -5.0f64..0.0), 1..8)
        ) {
            let n = pairs.len();
            let logp = Tensor::from_vec(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), (1, n), &CPU).unwrap();
            let ref_logp = Tensor::from_vec(pairs.iter().map(|p| p.1).collect::<Vec<_>>(), (1, n), &CPU).unwrap();
            let mask = mask_of(&[n], n);
            for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
                let k = v2(&kl_per_token(e, &logp, &ref_logp, &mask).unwrap());
                for (i, (a, b)) in pairs.iter().enumerate() {
                    prop_assert!((k[0][i] - e.value(*a, *b)).abs() < 1e-9);
                    if e != KlEstimator::K1 {
                        prop_assert!(k[0][i] >= 0.0);
                    }
                }
            }
        }
    }

    use candle_core::Tensor;

    // ---------- per-token rewards ----------

    #[test]
    fn rewards_hand_computed() {
        // beta = 0.5; scores [2, -1]; row 0 has 3 tokens, row 1 has 1.
        // row 0: [-0.5*0.1, -0.5*0.2, -0.5*0.3 + 2] = [-0.05, -0.1, 1.85]
        // row 1: [-0.5*0.4 + (-1), 0, 0] = [-1.2, 0, 0]
        let kl = t2(&[&[0.1, 0.2, 0.3], &[0.4, 9.0, 9.0]]);
        let mask = mask_of(&[3, 1], 3);
        let scores = t1(&[2.0, -1.0]);
        let r = per_token_rewards(&scores, &kl, &mask, 0.5, None).unwrap();
        close_v2(&v2(&r), &[&[-0.05, -0.1, 1.85], &[-1.2, 0.0, 0.0]], 1e-12);
        // score clip 1.5: 2 -> 1.5, so row 0 ends with -0.15 + 1.5 = 1.35; -1 is unchanged.
        let r = per_token_rewards(&scores, &kl, &mask, 0.5, Some(1.5)).unwrap();
        close_v2(&v2(&r), &[&[-0.05, -0.1, 1.35], &[-1.2, 0.0, 0.0]], 1e-12);
    }

    #[test]
    fn reward_config_uses_its_estimator() {
        // k2 with d = [0.5, -1.0] -> KL [0.125, 0.5]; beta = 0.1; score 3 at the last token:
        // [-0.0125, -0.05 + 3] = [-0.0125, 2.95]
        let cfg: RewardConfig = serde_json::from_str(r#"{"kl_estimator": "k2"}"#).unwrap();
        assert_eq!(cfg.score_clip, None);
        let out = cfg
            .token_rewards(
                &t1(&[3.0]),
                &t2(&[&[-1.0, -2.0]]),
                &t2(&[&[-1.5, -1.0]]),
                &mask_of(&[2], 2),
                0.1,
            )
            .unwrap();
        close_v(&v2(&out.kl)[0], &[0.125, 0.5], 1e-12);
        close_v(&v2(&out.rewards)[0], &[-0.0125, 2.95], 1e-12);
        assert!(serde_json::from_str::<RewardConfig>(r#"{"kl_estimatr": "k2"}"#).is_err());
    }

    #[test]
    fn rewards_reject_bad_input() {
        let kl = t2(&[&[0.1, 0.2]]);
        let bad = |r: tandem_models::rl::Result<_>| assert!(matches!(r, Err(RlError::InvalidArgument(_))));
        // scores of the wrong shape
        bad(per_token_rewards(&t1(&[1.0, 2.0]), &kl, &mask_of(&[2], 2), 0.1, None));
        // a mask with a hole
        bad(per_token_rewards(&t1(&[1.0]), &kl, &t2(&[&[0.0, 1.0]]), 0.1, None));
        // an empty row
        bad(per_token_rewards(&t1(&[1.0]), &kl, &t2(&[&[0.0, 0.0]]), 0.1, None));
        // non-positive clip
        bad(per_token_rewards(&t1(&[1.0]), &kl, &mask_of(&[2], 2), 0.1, Some(0.0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn rewards_padding_never_changes_result(
            lens in proptest::collection::vec(1usize..5, 1..4),
            extra in 0usize..3,
            seed in 0u64..1000,
            beta in 0.0f64..1.0,
        ) {
            let len = 4;
            let b = lens.len();
            let kl = Tensor::from_vec(uniform(b * len, -1.0, 1.0, seed), (b, len), &CPU).unwrap();
            let scores = Tensor::from_vec(uniform(b, -3.0, 3.0, seed + 1), b, &CPU).unwrap();
            let base = v2(&per_token_rewards(&scores, &kl, &mask_of(&lens, len), beta, Some(2.0)).unwrap());
            // Garbage in the existing padding and extra padded columns.
            let garbage = Tensor::from_vec(uniform(b * (len + extra), 50.0, 60.0, seed + 2), (b, len + extra), &CPU).unwrap();
            let m_wide = mask_of(&lens, len + extra);
            let kl_wide = m_wide.ne(0.0).unwrap()
                .where_cond(&candle_core::Tensor::cat(&[&kl, &garbage.narrow(1, 0, extra).unwrap()], 1).unwrap(), &garbage)
                .unwrap();
            let wide = v2(&per_token_rewards(&scores, &kl_wide, &m_wide, beta, Some(2.0)).unwrap());
            for (i, row) in wide.iter().enumerate() {
                for (t, x) in row.iter().enumerate() {
                    if t < lens[i] {
                        prop_assert_eq!(*x, base[i][t]);
                    } else {
                        prop_assert_eq!(*x, 0.0);
                    }
                }
            }
        }
    }

    // ---------- normalisers ----------

    #[test]
    fn running_mean_std_hand_computed() {
        // batch [1, 2, 3]: mean 2, m2 = 1 + 0 + 1 = 2
        // batch [4, 5]: mean 4.5, m2 = 0.25 + 0.25 = 0.5
        // merge: delta = 2.5, n = 5, mean = 2 + 2.5 * 2 / 5 = 3,
        //        m2 = 2 + 0.5 + 2.5^2 * 3 * 2 / 5 = 10, var = 10 / 5 = 2
        let mut rms = RunningMeanStd::new();
        rms.update(&[1.0, 2.0, 3.0]).unwrap();
        rms.update_tensor(&t1(&[4.0, 5.0])).unwrap();
        close(rms.mean, 3.0, 1e-12);
        close(rms.var(), 2.0, 1e-12);
        // normalise 5 and 1: (5 - 3) / sqrt(2) = 1.41421356, (1 - 3) / sqrt(2) = -1.41421356
        let n = v1(&rms.normalize(&t1(&[5.0, 1.0])).unwrap());
        close_v(&n, &[std::f64::consts::SQRT_2, -std::f64::consts::SQRT_2], 1e-7);
        assert!(RunningMeanStd::new().normalize(&t1(&[1.0])).is_err());
        assert!(rms.update(&[f64::NAN]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn running_mean_std_chunked_equals_one_shot(
            xs in proptest::collection::vec(-10.0f64..10.0, 1..40),
            cut in 0usize..40,
        ) {
            let cut = cut.min(xs.len());
            let mut rms = RunningMeanStd::new();
            rms.update(&xs[..cut]).unwrap();
            rms.update(&xs[cut..]).unwrap();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            prop_assert!((rms.mean - mean).abs() < 1e-9);
            prop_assert!((rms.var() - var).abs() < 1e-9);
        }

        #[test]
        fn fixed_gain_bias_gives_reference_mean0_std1(
            xs in proptest::collection::vec(-10.0f64..10.0, 2..40),
        ) {
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            prop_assume!(xs.iter().any(|x| (x - mean).abs() > 1e-3));
            let gb = FixedGainBias::fit(&xs).unwrap();
            let ys = v1(&gb.apply(&t1(&xs)).unwrap());
            let n = ys.len() as f64;
            let m = ys.iter().sum::<f64>() / n;
            let sd = (ys.iter().map(|y| (y - m).powi(2)).sum::<f64>() / n).sqrt();
            prop_assert!(m.abs() < 1e-9);
            prop_assert!((sd - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn fixed_gain_bias_hand_computed() {
        // reference [1, 3]: mean 2, population std 1 -> gain 1, bias -2
        let gb = FixedGainBias::fit(&[1.0, 3.0]).unwrap();
        close(gb.gain, 1.0, 1e-12);
        close(gb.bias, -2.0, 1e-12);
        // reference [0, 4, 8]: mean 4, var (16 + 0 + 16) / 3 = 32/3, std 3.2659863
        // gain 0.30618622, bias -4 * 0.30618622 = -1.22474487
        let gb = FixedGainBias::fit_tensor(&t1(&[0.0, 4.0, 8.0])).unwrap();
        close(gb.gain, 0.30618622, 1e-7);
        close(gb.bias, -1.22474487, 1e-7);
        // apply to 10: 10 * 0.30618622 - 1.22474487 = 1.83711731
        close(v1(&gb.apply(&t1(&[10.0])).unwrap())[0], 1.83711731, 1e-7);
        assert!(FixedGainBias::fit(&[1.0]).is_err());
        assert!(FixedGainBias::fit(&[2.0, 2.0]).is_err());
        let cfg: FixedGainBias = serde_json::from_str(r#"{"gain": 0.5, "bias": 1.0}"#).unwrap();
        assert_eq!(cfg, FixedGainBias { gain: 0.5, bias: 1.0 });
    }

    // ---------- KL controllers ----------

    #[test]
    fn fixed_controller_never_moves() {
        let mut c = KlController::fixed(0.05).unwrap();
        assert_eq!(c.update(100.0).unwrap(), 0.05);
        assert_eq!(c.update(0.0).unwrap(), 0.05);
        assert!(KlController::fixed(-1.0).is_err());
    }

    #[test]
    fn adaptive_controller_hand_computed() {
        // init 0.1, target 6, K_beta 0.1
        let mut c = KlController::adaptive(0.1, 6.0).unwrap();
        // KL 9: e = (9 - 6) / 6 = 0.5 -> clipped to 0.2; beta = 0.1 * (1 + 0.1 * 0.2) = 0.102
        close(c.update(9.0).unwrap(), 0.102, 1e-12);
        // KL 5.4: e = (5.4 - 6) / 6 = -0.1; beta = 0.102 * (1 - 0.01) = 0.10098
        close(c.update(5.4).unwrap(), 0.10098, 1e-12);
        // KL on target: e = 0, unchanged
        close(c.update(6.0).unwrap(), 0.10098, 1e-12);
        // KL 0: e = -1 -> clipped to -0.2; beta = 0.10098 * 0.98 = 0.0989604
        close(c.update(0.0).unwrap(), 0.0989604, 1e-12);
        assert!(c.update(f64::NAN).is_err());
        close(c.beta(), 0.0989604, 1e-12);
    }

    #[test]
    fn controller_configs() {
        let c: KlControllerConfig =
            serde_json::from_str(r#"{"kind": "adaptive", "init_beta": 0.1, "target": 6.0}"#).unwrap();
        assert_eq!(
            c,
            KlControllerConfig::Adaptive {
                init_beta: 0.1,
                target: 6.0,
                k_beta: 0.1
            }
        );
        let c: KlControllerConfig = serde_json::from_str(r#"{"kind": "fixed", "beta": 0.05}"#).unwrap();
        assert_eq!(c, KlControllerConfig::Fixed { beta: 0.05 });
        assert!(
            serde_json::from_str::<KlControllerConfig>(r#"{"kind": "fixed", "beta": 0.05, "target": 1.0}"#).is_err()
        );
        let bad = |c| assert!(matches!(KlController::new(c), Err(RlError::InvalidArgument(_))));
        bad(KlControllerConfig::Adaptive {
            init_beta: 0.1,
            target: 0.0,
            k_beta: 0.1,
        });
        bad(KlControllerConfig::Adaptive {
            init_beta: 0.0,
            target: 1.0,
            k_beta: 0.1,
        });
        bad(KlControllerConfig::Adaptive {
            init_beta: 0.1,
            target: 1.0,
            k_beta: 5.0,
        });
        bad(KlControllerConfig::Adaptive {
            init_beta: 0.1,
            target: 1.0,
            k_beta: 0.0,
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn adaptive_controller_moves_toward_target_within_bounds(
            beta in 1e-4f64..10.0,
            kl in -5.0f64..50.0,
            target in 0.1f64..20.0,
            k_beta in 0.01f64..4.99,
        ) {
            let mut c = KlController::new(KlControllerConfig::Adaptive { init_beta: beta, target, k_beta }).unwrap();
            let next = c.update(kl).unwrap();
            prop_assert_eq!(next, adaptive_beta_step(beta, kl, target, k_beta));
            let factor = next / beta;
            // at most a factor 1 +- 0.2 K_beta per update
            prop_assert!(factor <= 1.0 + 0.2 * k_beta + 1e-12);
            prop_assert!(factor >= 1.0 - 0.2 * k_beta - 1e-12);
            prop_assert!(next > 0.0);
            // KL above target -> stronger penalty; below -> weaker
            if kl > target { prop_assert!(next > beta); }
            if kl < target { prop_assert!(next < beta); }
        }
    }
}
