//! GAE, masked whitening and critic-free (GRPO, RLOO) advantages.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl_common;

mod rl {
    use super::rl_common::*;
    use candle_core::Tensor;
    use proptest::prelude::*;
    use tandem_models::rl::critic_free::broadcast_to_tokens;
    use tandem_models::rl::gae::gae_row;
    use tandem_models::rl::*;

    // ---------- GAE ----------

    #[test]
    fn gae_hand_computed_masked_batch() {
        // gamma = 1, lambda = 0.5
        // row 0: r = [1, 0, 2], V = [0.5, 1.0, 1.5]
        //   delta_2 = 2 + 0 - 1.5 = 0.5               A_2 = 0.5
        //   delta_1 = 0 + 1.5 - 1.0 = 0.5             A_1 = 0.5 + 0.5 * 0.5 = 0.75
        //   delta_0 = 1 + 1.0 - 0.5 = 1.5             A_0 = 1.5 + 0.5 * 0.75 = 1.875
        //   R = A + V = [2.375, 1.75, 2.0]
        // row 1 (2 real tokens): r = [0, 1], V = [0.2, 0.4]
        //   delta_1 = 1 + 0 - 0.4 = 0.6               A_1 = 0.6
        //   delta_0 = 0 + 0.4 - 0.2 = 0.2             A_0 = 0.2 + 0.5 * 0.6 = 0.5
        //   R = [0.7, 1.0, 0]
        let rewards = t2(&[&[1.0, 0.0, 2.0], &[0.0, 1.0, 7.0]]);
        let values = t2(&[&[0.5, 1.0, 1.5], &[0.2, 0.4, -3.0]]);
        let mask = mask_of(&[3, 2], 3);
        let cfg = GaeConfig {
            gamma: 1.0,
            lambda: 0.5,
        };
        let out = gae(&rewards, &values, &mask, &cfg).unwrap();
        close_v2(&v2(&out.advantages), &[&[1.875, 0.75, 0.5], &[0.5, 0.6, 0.0]], 1e-12);
        close_v2(&v2(&out.returns), &[&[2.375, 1.75, 2.0], &[0.7, 1.0, 0.0]], 1e-12);
    }

    #[test]
    fn gae_row_with_discount() {
        // gamma = 0.9, lambda = 0.95, r = [0, 1], V = [0.2, 0.4]
        //   delta_1 = 1 + 0.9 * 0 - 0.4 = 0.6          A_1 = 0.6
        //   delta_0 = 0 + 0.9 * 0.4 - 0.2 = 0.16       A_0 = 0.16 + 0.9 * 0.95 * 0.6 = 0.673
        let (a, r) = gae_row(&[0.0, 1.0], &[0.2, 0.4], 0.9, 0.95);
        close_v(&a, &[0.673, 0.6], 1e-12);
        close_v(&r, &[0.873, 1.0], 1e-12);
    }

    #[test]
    fn gae_defaults_and_config() {
        assert_eq!(
            GaeConfig::default(),
            GaeConfig {
                gamma: 1.0,
                lambda: 0.95
            }
        );
        let c: GaeConfig = serde_json::from_str(r#"{"lambda": 0.9}"#).unwrap();
        assert_eq!(
            c,
            GaeConfig {
                gamma: 1.0,
                lambda: 0.9
            }
        );
        assert!(serde_json::from_str::<GaeConfig>(r#"{"lamda": 0.9}"#).is_err());
        let m = mask_of(&[1], 1);
        let bad = GaeConfig {
            gamma: 1.1,
            lambda: 0.9,
        };
        assert!(matches!(gae(&m, &m, &m, &bad), Err(RlError::InvalidArgument(_))));
        // a mask with a hole
        let hole = t2(&[&[1.0, 0.0, 1.0]]);
        assert!(gae(&hole, &hole, &hole, &GaeConfig::default()).is_err());
    }

    #[test]
    fn gae_keeps_f32() {
        let m = mask_of(&[2], 2).to_dtype(candle_core::DType::F32).unwrap();
        let out = gae(&m, &m, &m, &GaeConfig::default()).unwrap();
        assert_eq!(out.advantages.dtype(), candle_core::DType::F32);
        // r = [1, 1], V = [1, 1], gamma 1, lambda 0.95:
        //   delta_1 = 1 - 1 = 0, A_1 = 0; delta_0 = 1 + 1 - 1 = 1, A_0 = 1
        close_v(&v2(&out.advantages)[0], &[1.0, 0.0], 1e-6);
    }

    fn random_batch(lens: &[usize], len: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        let b = lens.len();
        let r = Tensor::from_vec(uniform(b * len, -2.0, 2.0, seed), (b, len), &CPU).unwrap();
        let v = Tensor::from_vec(uniform(b * len, -2.0, 2.0, seed + 7), (b, len), &CPU).unwrap();
        (r, v, mask_of(lens, len))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn gae_with_gamma_lambda_one_is_reward_to_go_minus_value(
            lens in proptest::collection::vec(1usize..7, 1..5),
            seed in 0u64..10_000,
        ) {
            let len = 6;
            let (r, v, m) = random_batch(&lens, len, seed);
            let out = gae(&r, &v, &m, &GaeConfig { gamma: 1.0, lambda: 1.0 }).unwrap();
            let (a, rr, vv) = (v2(&out.advantages), v2(&r), v2(&v));
            for (b, &l) in lens.iter().enumerate() {
                for t in 0..len {
                    let want = if t < l { rr[b][t..l].iter().sum::<f64>() - vv[b][t] } else { 0.0 };
                    prop_assert!((a[b][t] - want).abs() < 1e-9, "row {} t {}: {} vs {}", b, t, a[b][t], want);
                }
            }
        }

        #[test]
        fn gae_with_lambda_zero_is_one_step_td(
            lens in proptest::collection::vec(1usize..7, 1..5),
            seed in 0u64..10_000,
            gamma in 0.0f64..=1.0,
        ) {
            let len = 6;
            let (r, v, m) = random_batch(&lens, len, seed);
            let out = gae(&r, &v, &m, &GaeConfig { gamma, lambda: 0.0 }).unwrap();
            let (a, rr, vv) = (v2(&out.advantages), v2(&r), v2(&v));
            for (b, &l) in lens.iter().enumerate() {
                for t in 0..l {
                    let next = if t + 1 < l { vv[b][t + 1] } else { 0.0 };
                    let want = rr[b][t] + gamma * next - vv[b][t];
                    prop_assert!((a[b][t] - want).abs() < 1e-9);
                }
            }
        }

        #[test]
        fn gae_padding_never_changes_result(
            lens in proptest::collection::vec(1usize..5, 1..5),
            extra in 1usize..4,
            seed in 0u64..10_000,
            lambda in 0.0f64..=1.0,
        ) {
            let len = 4;
            let cfg = GaeConfig { gamma: 0.99, lambda };
            let (r, v, m) = random_batch(&lens, len, seed);
            let base = gae(&r, &v, &m, &cfg).unwrap();
            // overwrite the padding with garbage and add padded columns
            let (gr, gv, _) = random_batch(&lens, len + extra, seed + 99);
            let mw = mask_of(&lens, len + extra);
            let keep = mw.ne(0.0).unwrap();
            let pad = |x: &Tensor, g: &Tensor| {
                let xw = Tensor::cat(&[x, &g.narrow(1, 0, extra).unwrap()], 1).unwrap();
                keep.where_cond(&xw, &(g * 100.0).unwrap()).unwrap()
            };
            let wide = gae(&pad(&r, &gr), &pad(&v, &gv), &mw, &cfg).unwrap();
            for (x, y) in [(&base.advantages, &wide.advantages), (&base.returns, &wide.returns)] {
                let (x, y) = (v2(x), v2(y));
                for b in 0..lens.len() {
                    prop_assert_eq!(&y[b][..len], &x[b][..]);
                    prop_assert!(y[b][len..].iter().all(|&z| z == 0.0));
                }
            }
        }
    }

    // ---------- whitening ----------

    #[test]
    fn whiten_hand_computed() {
        // real entries [1, 2, 3, 4]: mean 2.5,
        // population var ((-1.5)^2 + (-0.5)^2 + 0.5^2 + 1.5^2) / 4 = 5 / 4 = 1.25, std 1.11803399
        // whitened: [-1.5, -0.5, 0.5, 1.5] / 1.11803399 = [-1.34164079, -0.44721360, 0.44721360, 1.34164079]
        let x = t2(&[&[1.0, 2.0, 3.0], &[4.0, 9.0, f64::NAN]]);
        let m = mask_of(&[3, 1], 3);
        let w = v2(&masked_whiten(&x, &m, true).unwrap());
        close_v2(
            &w,
            &[&[-1.34164079, -0.44721360, 0.44721360], &[1.34164079, 0.0, 0.0]],
            1e-8,
        );
        // without shifting the mean, the mean 2.5 is added back on real tokens
        let w = v2(&masked_whiten(&x, &m, false).unwrap());
        close_v2(
            &w,
            &[&[1.15835921, 2.05278640, 2.94721360], &[3.84164079, 0.0, 0.0]],
            1e-8,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn whitening_gives_mean0_std1_over_mask_and_ignores_padding(
            lens in proptest::collection::vec(1usize..6, 1..5),
            seed in 0u64..10_000,
        ) {
            let len = 5;
            let (x, g, m) = random_batch(&lens, len, seed);
            prop_assume!(lens.iter().sum::<usize>() >= 2);
            let w = masked_whiten(&x, &m, true).unwrap();
            let mean = s(&masked_mean(&w, &m).unwrap());
            let var = s(&masked_var(&w, &m).unwrap());
            let raw_var = s(&masked_var(&x, &m).unwrap());
            prop_assume!(raw_var > 1e-3);
            prop_assert!(mean.abs() < 1e-9);
            // unit std up to the 1e-8 added to the variance: var_w = var / (var + 1e-8)
            prop_assert!((var - raw_var / (raw_var + 1e-8)).abs() < 1e-9);
            prop_assert!((var.sqrt() - 1.0).abs() < 1e-5);
            // padding garbage changes nothing
            let xg = m.ne(0.0).unwrap().where_cond(&x, &(g * 1e6).unwrap()).unwrap();
            let wg = masked_whiten(&xg, &m, true).unwrap();
            prop_assert_eq!(v2(&w), v2(&wg));
        }
    }

    // ---------- critic-free ----------

    #[test]
    fn grpo_hand_computed() {
        // n = 3, groups [1, 2, 3] and [0, 0, 6]
        // group 0: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-6)
        // group 1: mean 2, deviations [-2, -2, 4], sample var (4 + 4 + 16) / 2 = 12,
        //          std 3.46410162 -> [-0.57735027, -0.57735027, 1.15470054]
        let s = t1(&[1.0, 2.0, 3.0, 0.0, 0.0, 6.0]);
        let a = v1(&grpo_advantages(&s, 3, &GrpoConfig::default()).unwrap());
        close_v(&a, &[-1.0, 0.0, 1.0, -0.57735027, -0.57735027, 1.15470054], 1e-6);
        // Dr. GRPO: only the mean is removed
        let cfg = GrpoConfig {
            scale_by_std: false,
            eps: 0.0,
        };
        let a = v1(&grpo_advantages(&s, 3, &cfg).unwrap());
        close_v(&a, &[-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], 1e-12);
    }

    #[test]
    fn rloo_hand_computed() {
        // group 0 [1, 2, 3]: 1 - (2 + 3) / 2 = -1.5, 2 - (1 + 3) / 2 = 0, 3 - (1 + 2) / 2 = 1.5
        // group 1 [0, 0, 6]: 0 - (0 + 6) / 2 = -3 (twice), 6 - 0 = 6
        let s = t1(&[1.0, 2.0, 3.0, 0.0, 0.0, 6.0]);
        let a = v1(&rloo_advantages(&s, 3).unwrap());
        close_v(&a, &[-1.5, 0.0, 1.5, -3.0, -3.0, 6.0], 1e-12);
    }

    #[test]
    fn critic_free_rejects_bad_groups() {
        let s = t1(&[1.0, 2.0, 3.0, 4.0]);
        let bad = |r: tandem_models::rl::Result<Tensor>| assert!(matches!(r, Err(RlError::InvalidArgument(_))));
        bad(rloo_advantages(&s, 3));
        bad(rloo_advantages(&s, 1));
        bad(rloo_advantages(&s, 0));
        bad(grpo_advantages(&s, 3, &GrpoConfig::default()));
        bad(grpo_advantages(&t2(&[&[1.0, 2.0]]), 2, &GrpoConfig::default()));
        bad(rloo_advantages(&t1(&[]), 2));
    }

    #[test]
    fn broadcast_advantages_to_tokens() {
        let a = broadcast_to_tokens(&t1(&[2.0, -1.0]), &mask_of(&[3, 1], 3)).unwrap();
        close_v2(&v2(&a), &[&[2.0, 2.0, 2.0], &[-1.0, 0.0, 0.0]], 0.0);
        assert!(broadcast_to_tokens(&t1(&[2.0]), &mask_of(&[3, 1], 3)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn critic_free_group_laws(
            groups in 1usize..4,
            n in 2usize..6,
            seed in 0u64..10_000,
        ) {
            let xs = uniform(groups * n, -3.0, 3.0, seed);
            let s = t1(&xs);
            let rloo = v1(&rloo_advantages(&s, n).unwrap());
            let grpo = v1(&grpo_advantages(&s, n, &GrpoConfig::default()).unwrap());
            for g in 0..groups {
                let grp = &xs[g * n..(g + 1) * n];
                let mean = grp.iter().sum::<f64>() / n as f64;
                // leave-one-out baseline: sum of advantages is 0 and A_i = n/(n-1) (s_i - mean)
                prop_assert!(rloo[g * n..(g + 1) * n].iter().sum::<f64>().abs() < 1e-9);
                for i in 0..n {
                    let loo = (grp.iter().sum::<f64>() - grp[i]) / (n - 1) as f64;
                    prop_assert!((rloo[g * n + i] - (grp[i] - loo)).abs() < 1e-9);
                    prop_assert!((rloo[g * n + i] - n as f64 / (n - 1) as f64 * (grp[i] - mean)).abs() < 1e-9);
                }
                // GRPO: zero mean, sample std ~1 within the group
                let a = &grpo[g * n..(g + 1) * n];
                prop_assert!(a.iter().sum::<f64>().abs() < 1e-9);
                let sd = (grp.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
                prop_assume!(sd > 1e-3);
                let sd_a = (a.iter().map(|x| x * x).sum::<f64>() / (n - 1) as f64).sqrt();
                // A = (s - mean) / (sd + 1e-6), so its sample std is sd / (sd + 1e-6)
                prop_assert!((sd_a - sd / (sd + 1e-6)).abs() < 1e-9);
            }
        }
    }
}
