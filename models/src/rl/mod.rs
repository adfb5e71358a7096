//! RL math for RLHF: per-token rewards, KL estimators and controllers, GAE, PPO losses
//! (with the decoupled off-policy correction), critic-free advantages, reward-model
//! losses, the PPO-ptx term and the optimiser helpers candle lacks.
//!
//! Everything here is a pure function (or a small value type) over candle tensors, or
//! plain Rust where the work is sequential. Nothing here owns a model or a device.
//!
//! # Conventions
//!
//! - Response-level tensors have shape `(batch, resp_len)` and a float dtype (f32 at run
//!   time; the tests also use f64). Every such tensor comes with a `mask` of the same shape
//!   and dtype holding `1.0` on real response tokens and `0.0` on padding. Responses are
//!   right-padded, so each mask row is a prefix of ones of length `>= 1`
//!   (see [`masked::row_lengths`]). Values at padded positions never change a result,
//!   and outputs are `0.0` there.
//! - Sequence-level tensors (reward-model scores) have shape `(batch,)`.
//! - Tensor arithmetic returns [`Result`]; invalid arguments (mismatched shapes, a group size
//!   that does not divide the batch, `K < 2`, ...) are [`RlError::InvalidArgument`], never a
//!   panic.
//!
//! # Modules
//!
//! | module | holds |
//! |---|---|
//! | [`masked`] | masked sums, means and variances; mask validation; token-/sequence-mean aggregation |
//! | [`kl`] | the k1, k2, k3 per-token KL estimators |
//! | [`rewards`] | per-token rewards (score at the last token, `-beta * KL_t` elsewhere); score normalisers |
//! | [`kl_controller`] | fixed and adaptive (Ziegler et al. 2019) KL coefficient |
//! | [`gae`](mod@gae) | generalised advantage estimation over masked rows; masked whitening |
//! | [`ppo`] | clipped PPO policy, value and entropy losses, decoupled off-policy PPO, statistics |
//! | [`critic_free`] | GRPO and RLOO advantages |
//! | [`logprob`] | token log-probabilities and entropy from logits (differentiable) |
//! | [`rm_loss`] | reward-model losses: Bradley–Terry, best-of-K, InstructGPT ranking |
//! | [`ptx`] | the PPO-ptx pretraining log-likelihood term |
//! | [`optim`] | global-norm gradient clipping, LR schedules, gradient accumulation, weight EMA |

pub mod critic_free;
pub mod gae;
pub mod kl;
pub mod kl_controller;
pub mod logprob;
pub mod masked;
pub mod optim;
pub mod ppo;
pub mod ptx;
pub mod rewards;
pub mod rm_loss;

pub use critic_free::{broadcast_to_tokens, grpo_advantages, rloo_advantages, GrpoConfig};
pub use gae::{gae, masked_whiten, GaeConfig, GaeOutput};
pub use kl::{kl_per_token, sequence_kl, KlEstimator};
pub use kl_controller::{KlController, KlControllerConfig};
pub use logprob::{entropy_from_logits, token_logprobs};
pub use masked::{aggregate, masked_mean, masked_var, row_lengths, Aggregation};
pub use optim::{clip_grad_norm, clip_scale, global_grad_norm, Ema, GradAccumulator, LrDecay, LrSchedule};
pub use ppo::{
    ppo_loss, KlLossInputs, PpoInputs, PpoLossConfig, PpoLossOutput, PpoStats, ValueInputs,
    DEFAULT_BEHAVIOUR_WEIGHT_CAP,
};
pub use ptx::{ptx_loss, with_ptx};
pub use rewards::{per_token_rewards, FixedGainBias, RewardConfig, RunningMeanStd, ScoreNormalization, TokenRewards};
pub use rm_loss::{best_of_k_loss, bradley_terry_loss, ranking_loss};

/// Errors of the RL math.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// A tensor operation failed (shape, dtype or device mismatch inside candle, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An argument is outside what the function accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<RlError> for candle_core::Error {
    fn from(e: RlError) -> Self {
        match e {
            RlError::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// Result of the RL math.
pub type Result<T> = std::result::Result<T, RlError>;

/// Returns `Err(RlError::InvalidArgument)` with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::rl::RlError::InvalidArgument(format!($($arg)*)))
    };
}
pub(crate) use invalid;

/// Reads a scalar tensor of any float dtype as `f64`.
pub(crate) fn scalar_f64(t: &candle_core::Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
