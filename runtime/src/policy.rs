//! The policy a run or a recipe starts from: a HF checkpoint directory (checked to be a causal
//! LM that reads the longest prompt and response) or a built-in tiny model, with its tokenizer.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use tandem_models::{load_tensors, HeadKind, ModelConfig, TextTokenizer};

use crate::config::{builtin, Config};
use crate::error::RuntimeError;

/// The policy's config and tokenizer, and the checkpoint's weights (`None`: a built-in model,
/// initialised from the seed).
pub struct LoadedPolicy {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub(crate) init: Option<(PathBuf, HashMap<String, Tensor>)>,
}

pub fn load_policy(cfg: &Config) -> Result<LoadedPolicy, RuntimeError> {
    let m = &cfg.models.policy;
    if let Some(dir) = &m.path {
        let config = ModelConfig::from_dir(dir)?;
        if config.head != HeadKind::CausalLm {
            return Err(RuntimeError::Config {
                path: dir.join("config.json"),
                msg: format!("models.policy must be a causal LM, found {}", config.hf_class()),
            });
        }
        let longest = cfg.data.prompt_max_tokens + cfg.sampling.max_new_tokens;
        if longest > config.dims().max_positions {
            return Err(RuntimeError::Config {
                path: dir.join("config.json"),
                msg: format!(
                    "models.policy reads at most {} positions, but data.prompt_max_tokens + sampling.max_new_tokens = {longest}",
                    config.dims().max_positions
                ),
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
