//! The KL coefficient `beta` of the per-token penalty: fixed, or adapted toward a target KL.
//!
//! Adaptive control (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
//! Preferences", in the horizon-free form): after each batch with observed KL `KL_t`
//! (batch mean of the summed per-response KL, see [`super::kl::sequence_kl`]),
//!
//! ```text
//! e_t        = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
//! beta_{t+1} = beta_t * (1 + K_beta * e_t)          K_beta = 0.1 by default
//! ```
//!
//! So `beta` grows when the policy drifts further than the target and shrinks when it stays
//! closer, by a factor within `[1 - 0.2 K_beta, 1 + 0.2 K_beta]` per update. `K_beta` must
//! lie in `(0, 5)` so that the factor stays positive.
//!
//! Config form (TOML):
//!
//! ```toml
//! [kl]
//! kind = "adaptive"   # or kind = "fixed", beta = 0.05
//! init_beta = 0.1
//! target = 6.0
//! k_beta = 0.1        # optional
//! ```

use serde::{Deserialize, Serialize};

use super::{invalid, Result};

/// Default proportional gain of the adaptive controller.
pub const DEFAULT_K_BETA: f64 = 0.1;
/// The proportional error is clipped to `[-ERROR_CLIP, ERROR_CLIP]`.
pub const ERROR_CLIP: f64 = 0.2;

fn default_k_beta() -> f64 {
    DEFAULT_K_BETA
}

/// Which KL controller to run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum KlControllerConfig {
    /// `beta` never changes.
    Fixed {
        /// The coefficient, `>= 0`.
        beta: f64,
    },
    /// Proportional control of `beta` toward a target KL.
    Adaptive {
        /// Starting coefficient, `> 0`.
        init_beta: f64,
        /// Target KL (nats per response), `> 0`.
        target: f64,
        /// Proportional gain, in `(0, 5)`.
        #[serde(default = "default_k_beta")]
        k_beta: f64,
    },
}

/// One step of the adaptive rule: `beta * (1 + k_beta * clip((kl - target) / target, -0.2, 0.2))`.
pub fn adaptive_beta_step(beta: f64, observed_kl: f64, target: f64, k_beta: f64) -> f64 {
    let e = ((observed_kl - target) / target).clamp(-ERROR_CLIP, ERROR_CLIP);
    beta * (1.0 + k_beta * e)
}

/// A KL coefficient that is updated once per batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlController {
    config: KlControllerConfig,
    beta: f64,
}

impl KlController {
    /// Validates the config and starts at its initial `beta`.
    pub fn new(config: KlControllerConfig) -> Result<Self> {
        let beta = match config {
            KlControllerConfig::Fixed { beta } => {
                if !(beta.is_finite() && beta >= 0.0) {
                    invalid!("fixed KL beta must be finite and >= 0, got {beta}");
                }
                beta
            }
            KlControllerConfig::Adaptive {
                init_beta,
                target,
                k_beta,
            } => {
                if !(init_beta.is_finite() && init_beta > 0.0) {
                    invalid!("adaptive KL init_beta must be finite and > 0, got {init_beta}");
                }
                if !(target.is_finite() && target > 0.0) {
                    invalid!("adaptive KL target must be finite and > 0, got {target}");
                }
                if !(k_beta > 0.0 && k_beta < 1.0 / ERROR_CLIP) {
                    invalid!("adaptive KL k_beta must lie in (0, 5), got {k_beta}");
                }
                init_beta
            }
        };
        Ok(Self { config, beta })
    }

    /// A fixed coefficient.
    pub fn fixed(beta: f64) -> Result<Self> {
        Self::new(KlControllerConfig::Fixed { beta })
    }

    /// An adaptive controller with the default `K_beta = 0.1`.
    pub fn adaptive(init_beta: f64, target: f64) -> Result<Self> {
        Self::new(KlControllerConfig::Adaptive {
            init_beta,
            target,
            k_beta: DEFAULT_K_BETA,
        })
    }

    /// The config this controller runs.
    pub fn config(&self) -> &KlControllerConfig {
        &self.config
    }

    /// The current coefficient.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// Restores a coefficient saved from a running controller (checkpoints); it must be finite
    /// and `>= 0`.
    pub fn restore_beta(&mut self, beta: f64) -> Result<()> {
        if !(beta.is_finite() && beta >= 0.0) {
            invalid!("restored KL beta must be finite and >= 0, got {beta}");
        }
        self.beta = beta;
        Ok(())
    }

    /// Feeds the KL observed on the last batch and returns the new `beta`. An error (and no
    /// change) when `observed_kl` is not finite.
    pub fn update(&mut self, observed_kl: f64) -> Result<f64> {
        if !observed_kl.is_finite() {
            invalid!("observed KL must be finite, got {observed_kl}");
        }
        if let KlControllerConfig::Adaptive { target, k_beta, .. } = self.config {
            self.beta = adaptive_beta_step(self.beta, observed_kl, target, k_beta);
        }
        Ok(self.beta)
    }
}
