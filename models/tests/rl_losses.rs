//! Reward-model losses (Bradley–Terry, best-of-K, InstructGPT ranking), PPO-ptx, and token
//! log-probabilities / entropy from logits.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl_common;

mod rl {
    use super::rl_common::*;
    use candle_core::{Tensor, Var};
    use proptest::prelude::*;
    use tandem_models::rl::logprob::log_softmax;
    use tandem_models::rl::ptx::with_ptx;
    use tandem_models::rl::rm_loss::{neg_log_sigmoid, pairwise_accuracy};
    use tandem_models::rl::*;

    // ---------- Bradley–Terry ----------

    #[test]
    fn bradley_terry_hand_computed() {
        // diffs [2 - 1, 0 - 0] = [1, 0]: -log sigmoid(1) = ln(1 + e^-1) = 0.31326169,
        // -log sigmoid(0) = ln 2 = 0.69314718; mean 0.50320443
        let l = bradley_terry_loss(&t1(&[2.0, 0.0]), &t1(&[1.0, 0.0])).unwrap();
        close(s(&l), 0.50320443, 1e-8);
        close(
            pairwise_accuracy(&t1(&[2.0, 0.0]), &t1(&[1.0, 0.0])).unwrap() as f64,
            0.5,
            0.0,
        );
    }

    #[test]
    fn neg_log_sigmoid_is_stable_and_has_the_right_gradient_at_zero() {
        // -log sigmoid(-100) = 100 + ln(1 + e^-100) = 100; -log sigmoid(100) = e^-100 ~ 0
        let v = v1(&neg_log_sigmoid(&t1(&[-100.0, 100.0, -1000.0])).unwrap());
        close_v(&v, &[100.0, 0.0, 1000.0], 1e-12);
        // equal rewards (e.g. a zero-initialised head): d/d chosen_b = -sigmoid(0) / B = -0.25
        let chosen = Var::from_tensor(&t1(&[0.0, 0.0])).unwrap();
        let rejected = Var::from_tensor(&t1(&[0.0, 0.0])).unwrap();
        let g = bradley_terry_loss(&chosen, &rejected).unwrap().backward().unwrap();
        close_v(&v1(g.get(&chosen).unwrap()), &[-0.25, -0.25], 1e-12);
        close_v(&v1(g.get(&rejected).unwrap()), &[0.25, 0.25], 1e-12);
    }

    #[test]
    fn bradley_terry_rejects_bad_shapes() {
        assert!(bradley_terry_loss(&t1(&[1.0]), &t1(&[1.0, 2.0])).is_err());
        assert!(bradley_terry_loss(&t2(&[&[1.0]]), &t2(&[&[1.0]])).is_err());
        assert!(bradley_terry_loss(&t1(&[]), &t1(&[])).is_err());
    }

    #[test]
    fn bradley_terry_gradient_matches_finite_differences() {
        // x = [chosen; rejected], shape (2, B)
        let x = Tensor::from_vec(uniform(10, -3.0, 3.0, 1), (2, 5), &CPU).unwrap();
        check_grad(|x| Ok(bradley_terry_loss(&x.get(0)?, &x.get(1)?)?), &x, 1e-6);
    }

    // ---------- best-of-K ----------

    #[test]
    fn best_of_k_hand_computed() {
        // row 0 [1, 2, 3], best 2: log(e + e^2 + e^3) - 3 = ln(1 + e^-1 + e^-2) = 0.40760596
        // row 1 [0, 0, 0], best 1: ln 3 = 1.09861229
        // mean 0.75310912
        let r = t2(&[&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.0]]);
        close(s(&best_of_k_loss(&r, &[2, 1]).unwrap()), 0.75310912, 1e-8);
        assert!(best_of_k_loss(&r, &[3, 0]).is_err());
        assert!(best_of_k_loss(&r, &[0]).is_err());
        assert!(best_of_k_loss(&t2(&[&[1.0]]), &[0]).is_err());
    }

    #[test]
    fn best_of_k_gradient_matches_finite_differences() {
        let r = Tensor::from_vec(uniform(12, -3.0, 3.0, 2), (3, 4), &CPU).unwrap();
        check_grad(|x| Ok(best_of_k_loss(x, &[0, 3, 1])?), &r, 1e-6);
    }

    // ---------- ranking ----------

    #[test]
    fn ranking_hand_computed() {
        // rewards [3, 1, 2], ranking best-to-worst [0, 2, 1]: pairs (w, l)
        //   (0, 2): 3 - 2 = 1 -> 0.31326169
        //   (0, 1): 3 - 1 = 2 -> ln(1 + e^-2) = 0.12692801
        //   (2, 1): 2 - 1 = 1 -> 0.31326169
        // 1/C(3,2) * sum = 0.75345139 / 3 = 0.25115046
        let r = t2(&[&[3.0, 1.0, 2.0]]);
        close(s(&ranking_loss(&r, &[vec![0, 2, 1]]).unwrap()), 0.25115046, 1e-8);
        // a second prompt with equal rewards scores ln 2 on each pair; each prompt weighs the
        // same: (0.25115046 + 0.69314718) / 2 = 0.47214882
        let r = t2(&[&[3.0, 1.0, 2.0], &[0.0, 0.0, 0.0]]);
        let l = ranking_loss(&r, &[vec![0, 2, 1], vec![2, 1, 0]]).unwrap();
        close(s(&l), 0.47214882, 1e-8);
    }

    #[test]
    fn ranking_rejects_bad_rankings() {
        let r = t2(&[&[3.0, 1.0, 2.0]]);
        assert!(ranking_loss(&r, &[vec![0, 0, 1]]).is_err());
        assert!(ranking_loss(&r, &[vec![0, 1]]).is_err());
        assert!(ranking_loss(&r, &[vec![0, 1, 3]]).is_err());
        assert!(ranking_loss(&r, &[]).is_err());
        assert!(ranking_loss(&t2(&[&[3.0]]), &[vec![0]]).is_err());
    }

    #[test]
    fn ranking_gradient_matches_finite_differences() {
        let r = Tensor::from_vec(uniform(10, -2.0, 2.0, 3), (2, 5), &CPU).unwrap();
        let ranking = [vec![4, 0, 2, 1, 3], vec![0, 1, 2, 3, 4]];
        check_grad(|x| Ok(ranking_loss(x, &ranking)?), &r, 1e-6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn ranking_with_k2_is_bradley_terry(
            pairs in proptest::collection::vec((-5.0f64..5.0, -5.0f64..5.0), 1..6),
        ) {
            let chosen: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let rejected: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            // column 1 is the preferred one
            let flat: Vec<f64> = pairs.iter().flat_map(|p| [p.1, p.0]).collect();
            let r = Tensor::from_vec(flat, (pairs.len(), 2), &CPU).unwrap();
            let ranking = vec![vec![1, 0]; pairs.len()];
            let a = s(&ranking_loss(&r, &ranking).unwrap());
            let b = s(&bradley_terry_loss(&t1(&chosen), &t1(&rejected)).unwrap());
            prop_assert!((a - b).abs() < 1e-12);
        }

        #[test]
        fn ranking_loss_is_the_mean_of_per_prompt_losses(
            k in 2usize..6,
            prompts in 1usize..4,
            seed in 0u64..10_000,
        ) {
            let r = Tensor::from_vec(uniform(prompts * k, -3.0, 3.0, seed), (prompts, k), &CPU).unwrap();
            let ranking: Vec<Vec<usize>> = (0..prompts)
                .map(|p| (0..k).map(|i| (i + p) % k).collect())
                .collect();
            let all = s(&ranking_loss(&r, &ranking).unwrap());
            let mut per = 0.0;
            for p in 0..prompts {
                let row = r.narrow(0, p, 1).unwrap();
                let rv = v2(&row)[0].clone();
                // explicit 1/C(K,2) sum over ranked pairs
                let mut sum = 0.0;
                for i in 0..k {
                    for j in i + 1..k {
                        let d = rv[ranking[p][i]] - rv[ranking[p][j]];
                        sum += (1.0 + (-d).exp()).ln();
                    }
                }
                let pairs = (k * (k - 1) / 2) as f64;
                prop_assert!((s(&ranking_loss(&row, &ranking[p..p + 1]).unwrap()) - sum / pairs).abs() < 1e-9);
                per += sum / pairs;
            }
            prop_assert!((all - per / prompts as f64).abs() < 1e-9);
        }
    }

    // ---------- PPO-ptx ----------

    #[test]
    fn ptx_hand_computed() {
        // real token log-probs [-1, -2, -3]: mean -2; gamma 0.5 -> loss -0.5 * -2 = 1.0
        let lp = t2(&[&[-1.0, -2.0], &[-3.0, f64::NAN]]);
        let m = mask_of(&[2, 1], 2);
        close(s(&ptx_loss(&lp, &m, 0.5).unwrap()), 1.0, 1e-12);
        assert!(ptx_loss(&lp, &m, -1.0).is_err());
        assert!(ptx_loss(&lp, &mask_of(&[0, 0], 2), 0.5).is_err());
    }

    #[test]
    fn ptx_gradients_accumulate_with_ppo() {
        // w = [1, 2, 3]; a stand-in PPO loss sum(w^2) has gradient 2w = [2, 4, 6];
        // ptx with token log-probs w, gamma 0.3, 3 tokens: gradient -0.3 / 3 = -0.1 each.
        // One backward pass of the sum gives [1.9, 3.9, 5.9].
        let w = Var::from_tensor(&t1(&[1.0, 2.0, 3.0])).unwrap();
        let ppo = w.sqr().unwrap().sum_all().unwrap();
        let lp = w.reshape((1, 3)).unwrap();
        let m = mask_of(&[3], 3);
        let total = with_ptx(&ppo, &lp, &m, 0.3).unwrap();
        let g = v1(total.backward().unwrap().get(&w).unwrap());
        close_v(&g, &[1.9, 3.9, 5.9], 1e-12);
        // and it equals the sum of the two separate gradients
        let g1 = v1(ppo.backward().unwrap().get(&w).unwrap());
        let g2 = v1(ptx_loss(&lp, &m, 0.3).unwrap().backward().unwrap().get(&w).unwrap());
        let sum: Vec<f64> = g1.iter().zip(&g2).map(|(a, b)| a + b).collect();
        close_v(&g, &sum, 1e-12);
    }

    #[test]
    fn ptx_gradient_matches_finite_differences() {
        let lp = Tensor::from_vec(uniform(8, -4.0, -0.1, 4), (2, 4), &CPU).unwrap();
        let m = mask_of(&[4, 2], 4);
        check_grad(|x| Ok(ptx_loss(x, &m, 0.7)?), &lp, 1e-6);
    }

    // ---------- log-probs and entropy ----------

    #[test]
    fn token_logprobs_and_entropy_hand_computed() {
        // logits [0, ln 2, ln 3] -> p = [1/6, 2/6, 3/6]
        let z = Tensor::from_vec(vec![0.0, 2f64.ln(), 3f64.ln()], (1, 1, 3), &CPU).unwrap();
        // target 2: ln(1/2) = -0.69314718
        let y = Tensor::from_vec(vec![2u32], (1, 1), &CPU).unwrap();
        close(
            v2(&token_logprobs(&z, &y).unwrap())[0][0],
            -std::f64::consts::LN_2,
            1e-8,
        );
        // H = -(1/6 ln 1/6 + 1/3 ln 1/3 + 1/2 ln 1/2) = 0.29862658 + 0.36620410 + 0.34657359 = 1.01140426
        close(v2(&entropy_from_logits(&z).unwrap())[0][0], 1.01140426, 1e-8);
        // shift invariance and no overflow with huge logits
        let big = (z + 1e4).unwrap();
        close(
            v2(&token_logprobs(&big, &y).unwrap())[0][0],
            -std::f64::consts::LN_2,
            1e-8,
        );
        // out-of-range target is an error, not a panic
        let bad = Tensor::from_vec(vec![3u32], (1, 1), &CPU).unwrap();
        assert!(token_logprobs(&Tensor::from_vec(vec![0.0f64; 3], (1, 1, 3), &CPU).unwrap(), &bad).is_err());
    }

    #[test]
    fn logprob_and_entropy_gradients_match_finite_differences() {
        let z = Tensor::from_vec(uniform(2 * 3 * 5, -2.0, 2.0, 9), (2, 3, 5), &CPU).unwrap();
        let y = Tensor::from_vec(vec![0u32, 4, 2, 1, 1, 3], (2, 3), &CPU).unwrap();
        let wts = Tensor::from_vec(uniform(6, -1.0, 1.0, 10), (2, 3), &CPU).unwrap();
        check_grad(|x| (token_logprobs(x, &y)? * &wts)?.sum_all(), &z, 1e-6);
        check_grad(|x| (entropy_from_logits(x)? * &wts)?.sum_all(), &z, 1e-6);
        // log_softmax agrees with candle-nn's
        let a = log_softmax(&z).unwrap().flatten_all().unwrap();
        let b = candle_nn::ops::log_softmax(&z, candle_core::D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap();
        close_v(&v1(&a), &v1(&b), 1e-12);
    }
}
