//! API-level checks of the RL math: thread-safety of the value types the actors will move
//! between threads, and error conversions.
//! Run: `cargo test --release -p tandem-models rl`.

mod rl {
    use tandem_models::rl::*;

    const fn assert_send_sync<T: Send + Sync + 'static>() {}

    // Compile-time: configs and controller/normaliser state can move between actor threads.
    const _: () = {
        assert_send_sync::<PpoLossConfig>();
        assert_send_sync::<PpoStats>();
        assert_send_sync::<PpoLossOutput>();
        assert_send_sync::<GaeConfig>();
        assert_send_sync::<GaeOutput>();
        assert_send_sync::<KlController>();
        assert_send_sync::<KlControllerConfig>();
        assert_send_sync::<RewardConfig>();
        assert_send_sync::<RunningMeanStd>();
        assert_send_sync::<FixedGainBias>();
        assert_send_sync::<GrpoConfig>();
        assert_send_sync::<LrSchedule>();
        assert_send_sync::<GradAccumulator>();
        assert_send_sync::<Ema>();
        assert_send_sync::<RlError>();
    };

    #[test]
    fn rl_errors_convert_to_candle_errors_and_display() {
        let e = KlController::fixed(-1.0).unwrap_err();
        assert!(e.to_string().starts_with("invalid argument: fixed KL beta"), "{e}");
        let c: candle_core::Error = e.into();
        assert!(c.to_string().contains("fixed KL beta"), "{c}");
        // candle errors pass through unchanged
        let t = candle_core::Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let inner = t.reshape((3, 1)).unwrap_err().to_string();
        let wrapped: RlError = t.reshape((3, 1)).unwrap_err().into();
        assert_eq!(candle_core::Error::from(wrapped).to_string(), inner);
    }
}
