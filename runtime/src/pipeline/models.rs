//! The models a run starts from: the policy (a checkpoint directory or a built-in
//! configuration), the critic (initialised from the reward model, the policy or a path) and
//! the PPO trainer over them, before any checkpoint is restored.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use tandem_actors::{Advantage, PpoTrainer};
use tandem_models::{
    load_tensors, snapshot, HeadKind, LanguageModel, ModelConfig, ScalarModel, TextTokenizer, WeightInit,
};

use crate::builtin;
use crate::config::{Config, CriticInit};
use crate::error::RuntimeError;

pub struct LoadedPolicy {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub(crate) init: Option<(PathBuf, HashMap<String, Tensor>)>,
}

pub(crate) fn load_policy(cfg: &Config) -> Result<LoadedPolicy, RuntimeError> {
    let m = &cfg.models.policy;
    if let Some(dir) = &m.path {
        let config = ModelConfig::from_dir(dir)?;
        if config.head != HeadKind::CausalLm {
            return Err(RuntimeError::Config {
                path: dir.join("config.json"),
                msg: format!("models.policy must be a causal LM, found {}", config.hf_class()),
            });
        }
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let tensors = load_tensors(dir, &config, &candle_core::Device::Cpu)?;
        Ok(LoadedPolicy {
            config,
            tokenizer,
            init: Some((dir.clone(), tensors)),
        })
    } else {
        let spec = m.builtin.as_ref().expect("validated: path or builtin");
        let max_pos = (cfg.data.prompt_max_tokens + cfg.sampling.max_new_tokens)
            .next_power_of_two()
            .max(64);
        Ok(LoadedPolicy {
            config: builtin::model_config(spec, max_pos),
            tokenizer: builtin::tokenizer()?,
            init: None,
        })
    }
}

/// A run's learner as the config initialises it (before any checkpoint is restored).
pub struct BuiltLearner {
    pub trainer: PpoTrainer,
    pub policy: LoadedPolicy,
    pub critic_config: Option<ModelConfig>,
    /// The initial policy weights: the frozen reference model.
    pub initial_policy: HashMap<String, Tensor>,
}

/// Builds the policy, critic and trainer the config describes on `device`. `tandem replay
/// --rerun-step` builds them the same way before restoring a checkpoint.
pub fn build_learner(cfg: &Config, device: &candle_core::Device) -> Result<BuiltLearner, RuntimeError> {
    let policy = load_policy(cfg)?;
    let init = WeightInit::loaded_or_random(policy.init.as_ref(), cfg.seed);
    let (policy_model, policy_vars) = LanguageModel::trainable(&policy.config, init, device)?;
    let initial_policy = snapshot(&policy_vars)?;
    let critic = if cfg.algorithm.advantage == Advantage::Gae {
        let c = &cfg.models.critic;
        let (dir, config, tensors) = match c.init {
            CriticInit::RewardModel => {
                let dir = cfg.reward.model.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                let t = load_tensors(&dir, &config, device)?;
                (dir, config, t)
            }
            CriticInit::Policy => (PathBuf::from("<policy>"), policy.config.clone(), initial_policy.clone()),
            CriticInit::Path => {
                let dir = c.path.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                let t = load_tensors(&dir, &config, device)?;
                (dir, config, t)
            }
        };
        let init = WeightInit::Checkpoint {
            tensors: &tensors,
            dir: &dir,
            seed: cfg.seed.wrapping_add(1),
        };
        Some(ScalarModel::trainable(
            &config.with_head(HeadKind::Scalar),
            init,
            device,
        )?)
    } else {
        None
    };
    let critic_config = critic.as_ref().map(|(m, _)| m.config().clone());
    let mut trainer = PpoTrainer::new(
        cfg.algorithm.clone(),
        (policy_model, policy_vars),
        critic,
        sampling_temperature(cfg),
        cfg.data.samples_per_prompt,
        cfg.seed,
        device.clone(),
    )?;
    trainer.inject_nonfinite_loss(cfg.faults.nonfinite_loss_steps.clone());
    Ok(BuiltLearner {
        trainer,
        policy,
        critic_config,
        initial_policy,
    })
}

pub(crate) fn sampling_temperature(cfg: &Config) -> f64 {
    if cfg.sampling.greedy {
        1.0
    } else {
        cfg.sampling.temperature.max(1e-6)
    }
}
