//! PPO losses: clipped surrogate, clipped value loss, entropy bonus, aggregation, decoupled
//! off-policy correction, statistics and finite-difference gradient checks.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl_common;

mod rl {
    use super::rl_common::*;
    use candle_core::{Tensor, Var};
    use proptest::prelude::*;
    use tandem_models::rl::ppo::{policy_loss_per_token, value_loss_per_token};
    use tandem_models::rl::*;

    const NAN: f64 = f64::NAN;
    const INF: f64 = f64::INFINITY;

    /// The hand-computed batch: two rows, lengths 3 and 1, garbage in the padding.
    ///
    /// ratio = exp(logp - prox) and advantages, eps = 0.2:
    ///   row 0 t0: ratio 1.5, A =  1: min(1.5, 1.2) = 1.2   -> pg -1.2 (clipped)
    ///   row 0 t1: ratio 0.5, A =  1: min(0.5, 0.8) = 0.5   -> pg -0.5
    ///   row 0 t2: ratio 1.0, A = -2: min(-2, -2)  = -2     -> pg  2.0
    ///   row 1 t0: ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> pg 0.8 (clipped)
    /// values V, rollout values V_old, returns R, c = 0.2:
    ///   row 0 t0: V 1.0, V_old 0.5, R 1.2:  (V-R)^2 = 0.04, clip(V) = 0.7, (0.7-1.2)^2 = 0.25 -> 0.5*0.25 = 0.125 (clipped)
    ///   row 0 t1: V 0.0, V_old 0.5, R 1.0:  1.0, clip(V) = 0.3, 0.49 -> 0.5*1.0 = 0.5
    ///   row 0 t2: V 2.0, V_old 1.0, R 2.5:  0.25, clip(V) = 1.2, 1.69 -> 0.845 (clipped)
    ///   row 1 t0: V -1.0, V_old -0.5, R -1.5: 0.25, clip(V) = -0.7, 0.64 -> 0.32 (clipped)
    /// entropy: [0.5, 1.0, 1.5], [2.0]
    struct Batch {
        logp: Tensor,
        prox: Tensor,
        adv: Tensor,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        entropy: Tensor,
        mask: Tensor,
    }

    fn hand_batch() -> Batch {
        let prox = t2(&[&[-1.0, -2.0, -0.5], &[-1.5, NAN, 0.0]]);
        let lr = [1.5f64.ln(), 0.5f64.ln(), 0.0, 0.5f64.ln()];
        let logp = t2(&[&[-1.0 + lr[0], -2.0 + lr[1], -0.5 + lr[2]], &[-1.5 + lr[3], INF, 3.0]]);
        Batch {
            logp,
            prox,
            adv: t2(&[&[1.0, 1.0, -2.0], &[-1.0, NAN, 5.0]]),
            values: t2(&[&[1.0, 0.0, 2.0], &[-1.0, INF, 1.0]]),
            old_values: t2(&[&[0.5, 0.5, 1.0], &[-0.5, NAN, 0.0]]),
            returns: t2(&[&[1.2, 1.0, 2.5], &[-1.5, 7.0, NAN]]),
            entropy: t2(&[&[0.5, 1.0, 1.5], &[2.0, NAN, 9.0]]),
            mask: mask_of(&[3, 1], 3),
        }
    }

    fn inputs<'a>(b: &'a Batch, behaviour: Option<&'a Tensor>) -> PpoInputs<'a> {
        PpoInputs {
            logp: &b.logp,
            prox_logp: &b.prox,
            behaviour_logp: behaviour,
            advantages: &b.adv,
            entropy: Some(&b.entropy),
            value: Some(ValueInputs {
                values: &b.values,
                old_values: &b.old_values,
                returns: &b.returns,
            }),
            kl: None,
            mask: &b.mask,
        }
    }

    fn cfg(aggregation: Aggregation) -> PpoLossConfig {
        PpoLossConfig {
            clip_eps: 0.2,
            value_clip: Some(0.2),
            vf_coef: 0.5,
            entropy_coef: 0.01,
            aggregation,
            token_sum_norm: None,
            behaviour_weight_cap: None,
            off_policy_correction: true,
        }
    }

    #[test]
    fn ppo_token_mean_hand_computed() {
        let b = hand_batch();
        let out = ppo_loss(&cfg(Aggregation::TokenMean), &inputs(&b, None)).unwrap();
        // policy: (-1.2 - 0.5 + 2.0 + 0.8) / 4 = 1.1 / 4 = 0.275
        close(out.policy_loss as f64, 0.275, 1e-6);
        // value: (0.125 + 0.5 + 0.845 + 0.32) / 4 = 1.79 / 4 = 0.4475
        close(out.value_loss.unwrap() as f64, 0.4475, 1e-6);
        // entropy: (0.5 + 1.0 + 1.5 + 2.0) / 4 = 1.25
        close(out.entropy.unwrap() as f64, 1.25, 1e-6);
        // total: 0.275 + 0.5 * 0.4475 - 0.01 * 1.25 = 0.48625
        close(s(&out.loss), 0.48625, 1e-12);
        let st = out.stats;
        // 2 of 4 tokens clipped
        close(st.clip_frac as f64, 0.5, 1e-7);
        // ratio mean (1.5 + 0.5 + 1 + 0.5) / 4 = 0.875; E[ratio^2] = (2.25 + 0.25 + 1 + 0.25) / 4
        // = 0.9375, var = 0.9375 - 0.875^2 = 0.171875
        close(st.ratio_mean as f64, 0.875, 1e-6);
        close(st.ratio_var as f64, 0.171875, 1e-6);
        // approx_kl = mean(r - 1 - ln r) = (0.0945349 + 0.1931472 + 0 + 0.1931472) / 4 = 0.1202073
        close(st.approx_kl as f64, 0.12020731, 1e-6);
        // R = [1.2, 1, 2.5, -1.5], V = [1, 0, 2, -1]: Var[R] = 8.38 / 4 = 2.095,
        // R - V = [0.2, 1, 0.5, -0.5], Var = 1.18 / 4 = 0.295; EV = 1 - 0.295 / 2.095 = 0.8591885
        close(st.explained_var.unwrap() as f64, 0.85918854, 1e-6);
        // value clip active on 3 of 4 tokens
        close(st.value_clip_frac.unwrap() as f64, 0.75, 1e-7);
        assert_eq!(st.behaviour_weight_mean, None);
    }

    #[test]
    fn ppo_seq_mean_hand_computed() {
        let b = hand_batch();
        let out = ppo_loss(&cfg(Aggregation::SeqMean), &inputs(&b, None)).unwrap();
        // policy: row 0 (-1.2 - 0.5 + 2.0) / 3 = 0.1, row 1 0.8 -> (0.1 + 0.8) / 2 = 0.45
        close(out.policy_loss as f64, 0.45, 1e-6);
        // value: row 0 (0.125 + 0.5 + 0.845) / 3 = 0.49, row 1 0.32 -> 0.405
        close(out.value_loss.unwrap() as f64, 0.405, 1e-6);
        // entropy: row 0 1.0, row 1 2.0 -> 1.5
        close(out.entropy.unwrap() as f64, 1.5, 1e-6);
        // total: 0.45 + 0.5 * 0.405 - 0.01 * 1.5 = 0.6375
        close(s(&out.loss), 0.6375, 1e-12);
        // statistics are token means whatever the aggregation
        close(out.stats.clip_frac as f64, 0.5, 1e-7);
    }

    #[test]
    fn decoupled_ppo_hand_computed() {
        let b = hand_batch();
        // behaviour = prox except row 0 t0, where pi_prox / pi_behaviour = 2
        let behaviour = t2(&[&[-1.0 - 2f64.ln(), -2.0, -0.5], &[-1.5, INF, NAN]]);
        let mut c = cfg(Aggregation::TokenMean);
        c.behaviour_weight_cap = Some(1.5);
        let out = ppo_loss(&c, &inputs(&b, Some(&behaviour))).unwrap();
        // w = [min(2, 1.5), 1, 1, 1]: pg = (-1.2 * 1.5 - 0.5 + 2 + 0.8) / 4 = 0.5 / 4 = 0.125
        close(out.policy_loss as f64, 0.125, 1e-6);
        // mean w = (1.5 + 3) / 4 = 1.125; the cap bound on 1 of 4 tokens
        close(out.stats.behaviour_weight_mean.unwrap() as f64, 1.125, 1e-6);
        close(out.stats.behaviour_weight_trunc_frac.unwrap() as f64, 0.25, 1e-7);
        // untruncated: pg = (-1.2 * 2 - 0.5 + 2 + 0.8) / 4 = -0.1 / 4 = -0.025
        c.behaviour_weight_cap = None;
        let out = ppo_loss(&c, &inputs(&b, Some(&behaviour))).unwrap();
        close(out.policy_loss as f64, -0.025, 1e-6);
        assert_eq!(out.stats.behaviour_weight_trunc_frac, None);
        // no correction: w = 1 everywhere, the loss of on-policy data (0.275)
        c.off_policy_correction = false;
        let out = ppo_loss(&c, &inputs(&b, Some(&behaviour))).unwrap();
        close(out.policy_loss as f64, 0.275, 1e-6);
        assert_eq!(out.stats.behaviour_weight_mean, None);
    }

    #[test]
    fn critic_free_and_entropy_free() {
        let b = hand_batch();
        let mut c = cfg(Aggregation::TokenMean);
        c.entropy_coef = 0.0;
        let mut i = inputs(&b, None);
        i.value = None;
        i.entropy = None;
        let out = ppo_loss(&c, &i).unwrap();
        // only the policy loss remains: 0.275
        close(s(&out.loss), 0.275, 1e-12);
        assert_eq!(out.value_loss, None);
        assert_eq!(out.stats.explained_var, None);
        assert_eq!(out.entropy, None);
    }

    #[test]
    fn value_loss_without_clip() {
        let b = hand_batch();
        // 0.5 * (V - R)^2 = [0.5 * 0.04, 0.5 * 1.0, 0.5 * 0.25], [0.5 * 0.25]
        let v = value_loss_per_token(&b.values, &b.old_values, &b.returns, &b.mask, None).unwrap();
        close_v2(&v2(&v), &[&[0.02, 0.5, 0.125], &[0.125, 0.0, 0.0]], 1e-12);
    }

    #[test]
    fn ppo_rejects_bad_input() {
        let b = hand_batch();
        let bad =
            |c: &PpoLossConfig, i: &PpoInputs| assert!(matches!(ppo_loss(c, i), Err(RlError::InvalidArgument(_))));
        let mut i = inputs(&b, None);
        i.entropy = None;
        bad(&cfg(Aggregation::TokenMean), &i); // entropy_coef != 0 without entropy
        let mut c = cfg(Aggregation::TokenMean);
        c.behaviour_weight_cap = Some(0.5);
        bad(&c, &inputs(&b, None));
        let mut c = cfg(Aggregation::TokenMean);
        c.clip_eps = 0.0;
        bad(&c, &inputs(&b, None));
        let short = t2(&[&[0.0, 0.0]]);
        let mut i = inputs(&b, None);
        i.advantages = &short;
        bad(&cfg(Aggregation::TokenMean), &i);
        // sequence mean needs a real token in every row
        let empty_row = t2(&[&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0]]);
        let mut i = inputs(&b, None);
        i.mask = &empty_row;
        bad(&cfg(Aggregation::SeqMean), &i);
    }

    #[test]
    fn kl_loss_term_adds_beta_times_aggregated_k3() {
        let b = hand_batch();
        // ref_logp - logp = d per real token: k3 = exp(d) - 1 - d.
        let d = [[0.5f64, -1.0, 0.0], [2.0, 0.0, 0.0]];
        let logp = v2(&b.logp);
        let ref_logp = t2(&[
            &[logp[0][0] + d[0][0], logp[0][1] + d[0][1], logp[0][2] + d[0][2]],
            &[logp[1][0] + d[1][0], NAN, 0.0],
        ]);
        let k3 = |d: f64| d.exp() - 1.0 - d;
        let plain = ppo_loss(&cfg(Aggregation::TokenMean), &inputs(&b, None)).unwrap();
        assert!(plain.kl_loss.is_none());
        let mut i = inputs(&b, None);
        let logp_var = Var::from_tensor(&b.logp).unwrap();
        i.logp = logp_var.as_tensor();
        i.kl = Some(KlLossInputs {
            ref_logp: &ref_logp,
            beta: 0.3,
        });
        let out = ppo_loss(&cfg(Aggregation::TokenMean), &i).unwrap();
        let want = (k3(0.5) + k3(-1.0) + k3(0.0) + k3(2.0)) / 4.0;
        close(out.kl_loss.unwrap() as f64, want, 1e-6);
        close(s(&out.loss), s(&plain.loss) + 0.3 * want, 1e-9);
        // Its gradient flows into logp: d k3 / d logp = 1 - exp(d), times beta / 4, on top of
        // the policy gradient of the plain loss.
        let grads = out.loss.backward().unwrap();
        let gl = v2(grads.get(&logp_var).unwrap());
        let plain_grad = [0.0, -0.125, 0.5];
        for t in 0..3 {
            close(gl[0][t], plain_grad[t] + 0.3 * (1.0 - d[0][t].exp()) / 4.0, 1e-9);
        }
    }

    #[test]
    fn token_sum_divides_each_rows_sum_by_the_constant() {
        let b = hand_batch();
        let mut c = cfg(Aggregation::TokenSum);
        // Without its constant the config is refused.
        assert!(ppo_loss(&c, &inputs(&b, None)).is_err());
        c.token_sum_norm = Some(5.0);
        let out = ppo_loss(&c, &inputs(&b, None)).unwrap();
        // Policy per token (-1.2, -0.5, 2.0 | 0.8): sum 1.1 over 2 rows x 5.
        close(out.policy_loss as f64, 1.1 / 10.0, 1e-6);
        // Value per token sums to 1.79; entropy to 5.0.
        close(out.value_loss.unwrap() as f64, 1.79 / 10.0, 1e-6);
        close(out.entropy.unwrap() as f64, 0.5, 1e-6);
        c.token_sum_norm = Some(0.0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_behaviour_weight_is_capped_at_2_by_default() {
        assert_eq!(PpoLossConfig::default().behaviour_weight_cap, Some(2.0));
        let b = hand_batch();
        // Behaviour log-probs log(50) below prox on every token: raw weight 50.
        let behaviour = (&b.prox - 50f64.ln()).unwrap();
        let c = PpoLossConfig {
            entropy_coef: 0.01,
            ..PpoLossConfig::default()
        };
        let out = ppo_loss(&c, &inputs(&b, Some(&behaviour))).unwrap();
        close(out.stats.behaviour_weight_mean.unwrap() as f64, 2.0, 1e-6);
        close(out.stats.behaviour_weight_trunc_frac.unwrap() as f64, 1.0, 1e-7);
    }

    #[test]
    fn ppo_config_from_toml_like_json() {
        let c: PpoLossConfig =
            serde_json::from_str(r#"{"clip_eps": 0.1, "aggregation": "seq_mean", "behaviour_weight_cap": 5.0}"#)
                .unwrap();
        assert_eq!(c.clip_eps, 0.1);
        assert_eq!(c.aggregation, Aggregation::SeqMean);
        assert_eq!(c.behaviour_weight_cap, Some(5.0));
        assert_eq!(c.value_clip, PpoLossConfig::default().value_clip);
        assert!(serde_json::from_str::<PpoLossConfig>(r#"{"clip": 0.1}"#).is_err());
    }

    #[test]
    fn padding_gets_zero_finite_gradient() {
        let b = hand_batch();
        let logp = Var::from_tensor(&b.logp).unwrap();
        let values = Var::from_tensor(&b.values).unwrap();
        let mut i = inputs(&b, None);
        i.logp = logp.as_tensor();
        let vi = ValueInputs {
            values: values.as_tensor(),
            ..i.value.unwrap()
        };
        i.value = Some(vi);
        let out = ppo_loss(&cfg(Aggregation::TokenMean), &i).unwrap();
        let g = out.loss.backward().unwrap();
        for var in [&logp, &values] {
            let gv = v2(g.get(var).unwrap());
            assert!(gv.iter().flatten().all(|x| x.is_finite()), "{gv:?}");
            assert_eq!(gv[1][1..], [0.0, 0.0]);
        }
        // d policy / d logp: token mean 1/4 * d(-ratio * A)/d logp = -ratio * A / 4 where the
        // clip is inactive: t1: -0.5 * 1 / 4 = -0.125, t2: -1 * -2 / 4 = 0.5; clipped tokens 0.
        close_v(&v2(g.get(&logp).unwrap())[0], &[0.0, -0.125, 0.5], 1e-12);
    }

    // ---------- random inputs ----------

    struct Rand {
        b: Batch,
        behaviour: Tensor,
    }

    /// Random inputs away from the clip kinks (|ratio - (1 +- eps)| > 1e-3, and value kinks).
    fn rand_batch(lens: &[usize], len: usize, seed: u64) -> Rand {
        let n = lens.len() * len;
        let shape = (lens.len(), len);
        let nudge = |x: f64, kinks: &[f64]| {
            kinks
                .iter()
                .fold(x, |x, &k| if (x - k).abs() < 1e-3 { k + 2e-3 } else { x })
        };
        let lr: Vec<f64> = uniform(n, -0.5, 0.5, seed)
            .into_iter()
            .map(|x| nudge(x, &[0.8f64.ln(), 1.2f64.ln()]))
            .collect();
        let prox = uniform(n, -3.0, -0.1, seed + 1);
        let logp: Vec<f64> = prox.iter().zip(&lr).map(|(p, l)| p + l).collect();
        let old_v = uniform(n, -1.0, 1.0, seed + 2);
        let dv: Vec<f64> = uniform(n, -0.5, 0.5, seed + 3)
            .into_iter()
            .map(|x| nudge(x, &[-0.2, 0.2]))
            .collect();
        let values: Vec<f64> = old_v.iter().zip(&dv).map(|(o, d)| o + d).collect();
        let t = |v: Vec<f64>| Tensor::from_vec(v, shape, &CPU).unwrap();
        let behaviour: Vec<f64> = prox
            .iter()
            .zip(uniform(n, -0.7, 0.7, seed + 4))
            .map(|(p, d)| p + d)
            .collect();
        Rand {
            b: Batch {
                logp: t(logp),
                prox: t(prox),
                adv: t(uniform(n, -2.0, 2.0, seed + 5)),
                values: t(values),
                old_values: t(old_v),
                returns: t(uniform(n, -1.5, 1.5, seed + 6)),
                entropy: t(uniform(n, 0.0, 3.0, seed + 7)),
                mask: mask_of(lens, len),
            },
            behaviour: t(behaviour),
        }
    }

    #[test]
    fn ppo_gradients_match_finite_differences() {
        let r = rand_batch(&[4, 2, 3], 4, 17);
        for aggregation in [Aggregation::TokenMean, Aggregation::SeqMean] {
            for (behaviour, cap) in [
                (None, None),
                (Some(&r.behaviour), Some(1.3)),
                (Some(&r.behaviour), None),
            ] {
                let mut c = cfg(aggregation);
                c.behaviour_weight_cap = cap;
                c.entropy_coef = 0.05;
                let base = inputs(&r.b, behaviour);
                // in logp
                check_grad(
                    |x| {
                        let mut i = base;
                        i.logp = x;
                        Ok(ppo_loss(&c, &i)?.loss)
                    },
                    &r.b.logp,
                    1e-6,
                );
                // in the critic values
                check_grad(
                    |x| {
                        let mut i = base;
                        i.value = Some(ValueInputs {
                            values: x,
                            ..base.value.unwrap()
                        });
                        Ok(ppo_loss(&c, &i)?.loss)
                    },
                    &r.b.values,
                    1e-6,
                );
                // in the entropy
                check_grad(
                    |x| {
                        let mut i = base;
                        i.entropy = Some(x);
                        Ok(ppo_loss(&c, &i)?.loss)
                    },
                    &r.b.entropy,
                    1e-6,
                );
            }
        }
    }

    #[test]
    fn value_loss_gradient_matches_finite_differences() {
        let r = rand_batch(&[3, 4], 4, 5);
        for clip in [Some(0.2), None] {
            check_grad(
                |x| {
                    let v = value_loss_per_token(x, &r.b.old_values, &r.b.returns, &r.b.mask, clip)?;
                    Ok(aggregate(&v, &r.b.mask, Aggregation::TokenMean)?)
                },
                &r.b.values,
                1e-6,
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn decoupled_objective_equals_ppo_on_policy(
            lens in proptest::collection::vec(1usize..5, 1..4),
            seed in 0u64..10_000,
            cap in proptest::option::of(1.0f64..10.0),
            seq in any::<bool>(),
        ) {
            let r = rand_batch(&lens, 4, seed);
            let mut c = cfg(if seq { Aggregation::SeqMean } else { Aggregation::TokenMean });
            c.behaviour_weight_cap = cap;
            let run = |behaviour: Option<&Tensor>| {
                let logp = Var::from_tensor(&r.b.logp).unwrap();
                let mut i = inputs(&r.b, behaviour);
                i.logp = logp.as_tensor();
                let out = ppo_loss(&c, &i).unwrap();
                let g = v2(out.loss.backward().unwrap().get(&logp).unwrap());
                (s(&out.loss), out.policy_loss, out.stats, g)
            };
            // on-policy: the behaviour policy is the proximal policy
            let on_policy = r.b.prox.copy().unwrap();
            let (l1, p1, s1, g1) = run(None);
            let (l2, p2, s2, g2) = run(Some(&on_policy));
            prop_assert_eq!(l1, l2);
            prop_assert_eq!(p1, p2);
            prop_assert_eq!(g1, g2);
            prop_assert_eq!(s1.approx_kl, s2.approx_kl);
            prop_assert_eq!(s1.clip_frac, s2.clip_frac);
            prop_assert_eq!(s2.behaviour_weight_mean, Some(1.0));
        }

        #[test]
        fn ppo_padding_never_changes_result(
            lens in proptest::collection::vec(1usize..5, 1..4),
            extra in 1usize..3,
            seed in 0u64..10_000,
            seq in any::<bool>(),
        ) {
            let len = 4;
            let c = cfg(if seq { Aggregation::SeqMean } else { Aggregation::TokenMean });
            let r = rand_batch(&lens, len, seed);
            let g = rand_batch(&lens, len + extra, seed + 1);
            let mw = mask_of(&lens, len + extra);
            let keep = mw.ne(0.0).unwrap();
            let pad = |x: &Tensor, garbage: &Tensor| {
                let xw = Tensor::cat(&[x, &garbage.narrow(1, 0, extra).unwrap()], 1).unwrap();
                keep.where_cond(&xw, &(garbage * 1e3).unwrap().exp().unwrap()).unwrap()
            };
            let w = Batch {
                logp: pad(&r.b.logp, &g.b.logp),
                prox: pad(&r.b.prox, &g.b.prox),
                adv: pad(&r.b.adv, &g.b.adv),
                values: pad(&r.b.values, &g.b.values),
                old_values: pad(&r.b.old_values, &g.b.old_values),
                returns: pad(&r.b.returns, &g.b.returns),
                entropy: pad(&r.b.entropy, &g.b.entropy),
                mask: mw.clone(),
            };
            let behaviour_w = pad(&r.behaviour, &g.behaviour);
            let a = ppo_loss(&c, &inputs(&r.b, Some(&r.behaviour))).unwrap();
            let b = ppo_loss(&c, &inputs(&w, Some(&behaviour_w))).unwrap();
            prop_assert!((s(&a.loss) - s(&b.loss)).abs() < 1e-12);
            prop_assert!((a.stats.approx_kl - b.stats.approx_kl).abs() < 1e-6);
            prop_assert!((a.stats.ratio_var - b.stats.ratio_var).abs() < 1e-6);
            prop_assert_eq!(a.stats.clip_frac, b.stats.clip_frac);
            prop_assert!(a.stats.approx_kl >= 0.0);
            prop_assert!((0.0..=1.0).contains(&a.stats.clip_frac));
        }
    }

    #[test]
    fn policy_loss_per_token_matches_formula() {
        let r = rand_batch(&[4, 4], 4, 3);
        let pg = v2(&policy_loss_per_token(&r.b.logp, &r.b.prox, &r.b.adv, None, &r.b.mask, 0.2).unwrap());
        let (lp, px, ad) = (v2(&r.b.logp), v2(&r.b.prox), v2(&r.b.adv));
        for b in 0..2 {
            for t in 0..4 {
                let ratio = (lp[b][t] - px[b][t]).exp();
                let want = -(ratio * ad[b][t]).min(ratio.clamp(0.8, 1.2) * ad[b][t]);
                close(pg[b][t], want, 1e-12);
            }
        }
    }
}
