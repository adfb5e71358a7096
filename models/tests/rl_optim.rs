//! Global-norm gradient clipping, learning-rate schedules, gradient accumulation and weight
//! EMA.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl_common;

mod rl {
    use super::rl_common::*;
    use candle_core::{Tensor, Var};
    use candle_nn::Optimizer;
    use proptest::prelude::*;
    use tandem_models::rl::*;

    fn two_vars() -> (Var, Var, Var) {
        (
            Var::from_tensor(&t1(&[0.0, 0.0])).unwrap(),
            Var::from_tensor(&t1(&[0.0])).unwrap(),
            Var::from_tensor(&t1(&[0.0])).unwrap(),
        )
    }

    #[test]
    fn clip_grad_norm_hand_computed() {
        // loss = 3 a0 + 4 a1 + 12 b0: grads [3, 4] and [12], global norm sqrt(9 + 16 + 144) = 13
        let (a, b, unused) = two_vars();
        let loss = ((a.as_tensor() * &t1(&[3.0, 4.0])).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 12.0).unwrap().sum_all().unwrap())
        .unwrap();
        let vars = [a.clone(), b.clone(), unused];
        let mut g = loss.backward().unwrap();
        close(global_grad_norm(&vars, &g).unwrap(), 13.0, 1e-12);
        // max_norm 20 > 13: unchanged
        close(clip_grad_norm(&vars, &mut g, 20.0).unwrap(), 13.0, 1e-12);
        close_v(&v1(g.get(&a).unwrap()), &[3.0, 4.0], 0.0);
        // max_norm 6.5: scale 6.5 / (13 + 1e-6) ~ 0.5 -> [1.5, 2], [6]
        close(clip_grad_norm(&vars, &mut g, 6.5).unwrap(), 13.0, 1e-12);
        close_v(&v1(g.get(&a).unwrap()), &[1.5, 2.0], 1e-6);
        close_v(&v1(g.get(&b).unwrap()), &[6.0], 1e-6);
        close(global_grad_norm(&vars, &g).unwrap(), 6.5, 1e-6);
        assert!(clip_grad_norm(&vars, &mut g, 0.0).is_err());
        assert!(clip_grad_norm(&vars, &mut g, f64::NAN).is_err());
    }

    #[test]
    fn clip_grad_norm_leaves_non_finite_gradients_alone() {
        let (a, _, _) = two_vars();
        let loss = (a.as_tensor() * &t1(&[f64::INFINITY, 1.0])).unwrap().sum_all().unwrap();
        let mut g = loss.backward().unwrap();
        let n = clip_grad_norm(std::slice::from_ref(&a), &mut g, 1.0).unwrap();
        assert!(n.is_infinite());
        assert_eq!(v1(g.get(&a).unwrap())[1], 1.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn clipped_norm_is_at_most_max_norm(
            ga in proptest::collection::vec(-10.0f64..10.0, 1..6),
            gb in proptest::collection::vec(-10.0f64..10.0, 1..6),
            max_norm in 0.1f64..20.0,
        ) {
            let a = Var::from_tensor(&t1(&vec![0.0; ga.len()])).unwrap();
            let b = Var::from_tensor(&t1(&vec![0.0; gb.len()])).unwrap();
            let loss = ((a.as_tensor() * &t1(&ga)).unwrap().sum_all().unwrap()
                + (b.as_tensor() * &t1(&gb)).unwrap().sum_all().unwrap()).unwrap();
            let mut g = loss.backward().unwrap();
            let vars = [a.clone(), b.clone()];
            let before = clip_grad_norm(&vars, &mut g, max_norm).unwrap();
            let want = ga.iter().chain(&gb).map(|x| x * x).sum::<f64>().sqrt();
            prop_assert!((before - want).abs() < 1e-9);
            let after = global_grad_norm(&vars, &g).unwrap();
            prop_assert!(after <= max_norm + 1e-9);
            if before <= max_norm {
                prop_assert_eq!(v1(g.get(&a).unwrap()), ga);
            } else {
                // direction kept
                let ra = v1(g.get(&a).unwrap());
                let scale = ra[0] / ga[0];
                prop_assert!(ga.iter().zip(&ra).all(|(x, y)| (x * scale - y).abs() < 1e-9));
            }
        }
    }

    // ---------- schedules ----------

    #[test]
    fn cosine_and_linear_schedules_hand_computed() {
        let cos = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 2,
            total_steps: 6,
            decay: LrDecay::Cosine,
            min_lr: 0.0,
        };
        cos.validate().unwrap();
        // warm-up: (s + 1) / 2 -> 0.5, 1.0
        // decay over 4 steps, p = (s - 2) / 4: s = 2 -> 1; s = 3: (1 + cos(pi/4)) / 2 = 0.85355339;
        // s = 4: (1 + cos(pi/2)) / 2 = 0.5; s = 5: (1 + cos(3pi/4)) / 2 = 0.14644661; s >= 6: 0
        let got: Vec<f64> = (0..8).map(|s| cos.lr_at(s)).collect();
        close_v(&got, &[0.5, 1.0, 1.0, 0.85355339, 0.5, 0.14644661, 0.0, 0.0], 1e-8);
        // linear with a floor 0.1: 0.1 + 0.9 (1 - p): s = 3 -> 0.775, s = 4 -> 0.55, s = 6 -> 0.1
        let lin = LrSchedule {
            decay: LrDecay::Linear,
            min_lr: 0.1,
            ..cos
        };
        close_v(&[lin.lr_at(3), lin.lr_at(4), lin.lr_at(6)], &[0.775, 0.55, 0.1], 1e-12);
        let cst = LrSchedule {
            decay: LrDecay::Constant,
            warmup_steps: 0,
            ..cos
        };
        close_v(&[cst.lr_at(0), cst.lr_at(100)], &[1.0, 1.0], 0.0);
    }

    #[test]
    fn schedule_config_and_validation() {
        let s: LrSchedule =
            serde_json::from_str(r#"{"peak_lr": 1e-5, "warmup_steps": 10, "total_steps": 100, "decay": "linear"}"#)
                .unwrap();
        assert_eq!(s.decay, LrDecay::Linear);
        assert_eq!(s.min_lr, 0.0);
        let s: LrSchedule = serde_json::from_str(r#"{"peak_lr": 1e-5, "total_steps": 100}"#).unwrap();
        assert_eq!((s.decay, s.warmup_steps), (LrDecay::Cosine, 0));
        assert!(serde_json::from_str::<LrSchedule>(r#"{"peak_lr": 1e-5, "total_steps": 1, "warmup": 1}"#).is_err());
        let base = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 0,
            total_steps: 10,
            decay: LrDecay::Cosine,
            min_lr: 0.0,
        };
        assert!(LrSchedule {
            warmup_steps: 11,
            ..base
        }
        .validate()
        .is_err());
        assert!(LrSchedule { min_lr: 2.0, ..base }.validate().is_err());
        assert!(LrSchedule { total_steps: 0, ..base }.validate().is_err());
        assert!(LrSchedule { peak_lr: 0.0, ..base }.validate().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn schedule_stays_between_floor_and_peak(
            warmup in 0usize..20,
            extra in 1usize..50,
            step in 0usize..100,
            cosine in any::<bool>(),
        ) {
            let s = LrSchedule {
                peak_lr: 2.0,
                warmup_steps: warmup,
                total_steps: warmup + extra,
                decay: if cosine { LrDecay::Cosine } else { LrDecay::Linear },
                min_lr: 0.5,
            };
            let lr = s.lr_at(step);
            prop_assert!(lr <= 2.0 + 1e-12);
            if step >= warmup { prop_assert!(lr >= 0.5 - 1e-12); }
            // monotone after warm-up
            if step >= warmup { prop_assert!(s.lr_at(step + 1) <= lr + 1e-12); }
        }
    }

    // ---------- accumulation ----------

    #[test]
    fn accumulation_mean_hand_computed() {
        // micro-batch 1: loss sum(2 w) -> grad [2, 2]; micro-batch 2: sum(4 w) -> [4, 4]
        // mean: [3, 3]
        let w = Var::from_tensor(&t1(&[1.0, 2.0])).unwrap();
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        for k in [2.0, 4.0] {
            let g = (w.as_tensor() * k).unwrap().sum_all().unwrap().backward().unwrap();
            acc.add(&g).unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        let g = acc.finish_mean().unwrap();
        close_v(&v1(g.get(&w).unwrap()), &[3.0, 3.0], 1e-12);
        // only the tracked vars are in the store
        assert_eq!(g.get_ids().count(), 1);
        // composes with candle-nn's optimisers: SGD lr 0.1 -> [1 - 0.3, 2 - 0.3]
        let mut sgd = candle_nn::SGD::new(vec![w.clone()], 0.1).unwrap();
        sgd.step(&g).unwrap();
        close_v(&v1(w.as_tensor()), &[0.7, 1.7], 1e-12);
        // finished: reset
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.finish_mean().is_err());
    }

    #[test]
    fn token_weighted_accumulation_equals_full_batch_token_mean() {
        // per-token loss w * x_i over tokens x = [1..6]; full-batch token mean gradient = 3.5
        // micro-batches [1, 2] (mean 1.5) and [3, 4, 5, 6] (mean 4.5), weighted by tokens:
        // (2 * 1.5 + 4 * 4.5) / 6 = 21 / 6 = 3.5
        let w = Var::from_tensor(&t1(&[0.5])).unwrap();
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        for chunk in [&[1.0, 2.0][..], &[3.0, 4.0, 5.0, 6.0][..]] {
            let x = t1(chunk);
            let loss = x.broadcast_mul(w.as_tensor()).unwrap().mean_all().unwrap();
            acc.add_weighted(&loss.backward().unwrap(), chunk.len() as f64).unwrap();
        }
        close(acc.total_weight(), 6.0, 0.0);
        let g = acc.finish_mean().unwrap();
        close_v(&v1(g.get(&w).unwrap()), &[3.5], 1e-12);
        assert!(acc
            .add_weighted(&Tensor::new(0.0f64, &CPU).unwrap().backward().unwrap(), 0.0)
            .is_err());
    }

    // ---------- EMA ----------

    #[test]
    fn ema_hand_computed() {
        // decay 0.5, start 1: set 3, update -> 0.5 * 1 + 0.5 * 3 = 2; again -> 2.5
        let w = Var::from_tensor(&t1(&[1.0])).unwrap();
        let mut ema = Ema::new(std::slice::from_ref(&w), 0.5).unwrap();
        w.set(&t1(&[3.0])).unwrap();
        ema.update().unwrap();
        close(v1(&ema.shadow()[0])[0], 2.0, 1e-12);
        ema.update().unwrap();
        close(v1(&ema.shadow()[0])[0], 2.5, 1e-12);
        // the source is untouched; an eval copy receives the average
        close(v1(w.as_tensor())[0], 3.0, 0.0);
        let eval = Var::from_tensor(&t1(&[0.0])).unwrap();
        ema.copy_to(std::slice::from_ref(&eval)).unwrap();
        close(v1(eval.as_tensor())[0], 2.5, 0.0);
        assert!(ema.copy_to(&[]).is_err());
        assert!(Ema::new(std::slice::from_ref(&w), 1.0).is_err());
        // InstructGPT's 0.992: from 0 toward 1 in one update -> 0.008
        let z = Var::from_tensor(&t1(&[0.0])).unwrap();
        let mut ema = Ema::new(std::slice::from_ref(&z), 0.992).unwrap();
        z.set(&t1(&[1.0])).unwrap();
        ema.update().unwrap();
        close(v1(&ema.shadow()[0])[0], 0.008, 1e-12);
    }
}
