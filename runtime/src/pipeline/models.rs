//! The models a run starts from: the policy (a checkpoint directory or a built-in
//! configuration), the critic (initialised from the reward model, the policy or a path) and
//! the PPO trainer over them, before any checkpoint is restored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tandem_actors::{Advantage, PpoTrainer};
use tandem_models::rl::Aggregation;
use tandem_models::{
    load_tensors, snapshot, HeadKind, LanguageModel, ModelConfig, ScalarModel, TextTokenizer, WeightInit,
};

use crate::config::{Config, CriticInit};
use crate::error::RuntimeError;
use crate::policy::{load_policy, LoadedPolicy};
use crate::prompts::read_jsonl;

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
                check_critic_input(&dir, &config, &policy, "init = \"reward_model\"")?;
                let t = load_tensors(&dir, &config, device)?;
                (dir, config, t)
            }
            CriticInit::Policy => (PathBuf::from("<policy>"), policy.config.clone(), initial_policy.clone()),
            CriticInit::Path => {
                let dir = c.path.clone().expect("validated");
                let config = ModelConfig::from_dir(&dir)?;
                check_critic_input(&dir, &config, &policy, "path")?;
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
    let mut algorithm = cfg.algorithm.clone();
    if algorithm.loss.aggregation == Aggregation::TokenSum {
        // Dr. GRPO's constant: the generation budget.
        algorithm
            .loss
            .token_sum_norm
            .get_or_insert(cfg.sampling.max_new_tokens as f64);
    }
    let mut trainer = PpoTrainer::new(
        algorithm,
        (policy_model, policy_vars),
        critic,
        sampling_temperature(cfg),
        cfg.data.samples_per_prompt,
        cfg.seed,
        device.clone(),
    )?;
    trainer.inject_nonfinite_loss(cfg.faults.nonfinite_loss_steps.clone());
    if cfg.mode.stale == tandem_actors::StalePolicy::Mask {
        trainer.mask_stale_tokens(cfg.mode.max_lag());
    }
    if let Some(path) = &cfg.data.pretrain {
        trainer.set_pretraining(
            load_pretraining(path, &policy.tokenizer, cfg.data.pretrain_max_tokens)?,
            cfg.data.pretrain_rows,
        )?;
    }
    Ok(BuiltLearner {
        trainer,
        policy,
        critic_config,
        initial_policy,
    })
}

/// The critic reads the policy's ids, so a checkpoint it starts from must share the policy's
/// vocabulary (its tokenizer.json, when it has one) and cover every id the policy can sample.
fn check_critic_input(dir: &Path, config: &ModelConfig, policy: &LoadedPolicy, key: &str) -> Result<(), RuntimeError> {
    let bad = |msg: String| {
        Err(RuntimeError::Config {
            path: dir.join("config.json"),
            msg: format!("models.critic.{key}: {msg}"),
        })
    };
    if dir.join("tokenizer.json").is_file() && !TextTokenizer::from_dir(dir)?.same_vocabulary(&policy.tokenizer) {
        return bad(
            "this checkpoint's tokenizer is not the policy's, and the critic reads the policy's ids; \
             initialise the critic from the policy (models.critic.init = \"policy\")"
                .into(),
        );
    }
    let (have, need) = (config.dims().vocab_size, policy.config.dims().vocab_size);
    if have < need {
        return bad(format!(
            "vocab_size is {have} but the policy's vocabulary has {need} ids; the critic would read ids it has no embedding for"
        ));
    }
    Ok(())
}

/// PPO-ptx texts: one `{"text": "..."}` per line, or an SFT record (InstructGPT mixes the
/// SFT demonstrations in): `{"prompt", "completion"}` as prompt then completion, `{"messages"}`
/// as the whole conversation rendered with the chat template. Tokenised and cut to their first
/// `max_tokens` tokens; a text of fewer than 2 tokens is an error naming its line.
fn load_pretraining(path: &Path, tokenizer: &TextTokenizer, max_tokens: usize) -> Result<Vec<Vec<u32>>, RuntimeError> {
    let template =
        crate::chat::ChatTemplate::of(tokenizer).map_err(|msg| RuntimeError::Config { path: path.into(), msg })?;
    let mut texts = vec![];
    read_jsonl(path, |v| {
        let s = |k: &str| v.get(k).and_then(|t| t.as_str());
        let text = match (s("text"), s("prompt"), s("completion"), v.get("messages")) {
            (Some(t), ..) => t.to_string(),
            (None, Some(p), Some(c), _) => format!("{p}{c}"),
            (None, _, _, Some(m)) => {
                let t = template
                    .as_ref()
                    .ok_or("a {\"messages\": ...} record needs a model with a chat_template")?;
                t.render(&crate::chat::parse_messages(m)?, false)?
            }
            _ => {
                return Err("expected a \"text\" string, \"prompt\" and \"completion\" strings, or \"messages\"".into())
            }
        };
        let mut ids = tokenizer.encode(&text).map_err(|e| e.to_string())?;
        ids.truncate(max_tokens);
        if ids.len() < 2 {
            return Err("a pretraining text needs at least 2 tokens".into());
        }
        texts.push(ids);
        Ok(())
    })?;
    if texts.is_empty() {
        return Err(RuntimeError::Prompts {
            path: path.into(),
            line: 0,
            msg: "no pretraining texts".into(),
        });
    }
    Ok(texts)
}

/// The temperature the reference and the learner score with: the one the samplers record
/// their log-probs at ([`tandem_models::SamplingConfig::logprob_temperature`]).
pub(crate) fn sampling_temperature(cfg: &Config) -> f64 {
    cfg.sampling.logprob_temperature()
}
