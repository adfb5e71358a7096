//! The learner's checkpoint state: what [`PpoTrainer::state`] saves and
//! [`PpoTrainer::load_state`] restores.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use tandem_models::rl::Ema;

use super::{sorted_names, sorted_vars, PpoTrainer};
use crate::error::ActorError;

/// Everything a checkpoint keeps of the learner.
#[derive(Debug, Clone)]
pub struct TrainerState {
    pub policy: HashMap<String, Tensor>,
    pub critic: Option<HashMap<String, Tensor>>,
    /// AdamW moments as `policy/m/NAME`, `policy/v/NAME`, `critic/m/NAME`, `critic/v/NAME`;
    /// with an EMA its weights as `ema/NAME`; with running score normalisation its
    /// `[count, mean, m2]` (f64) as `score_norm`.
    pub optimizer: HashMap<String, Tensor>,
    pub policy_optimizer_steps: usize,
    pub critic_optimizer_steps: Option<usize>,
    pub beta: f64,
    pub completed_steps: u64,
}

/// Sets every variable of `vars` from `tensors` (same names and shapes).
fn load_vars(vars: &VarMap, tensors: &HashMap<String, Tensor>, what: &str) -> Result<(), ActorError> {
    let data = vars.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| ActorError::Checkpoint(format!("{what} checkpoint lacks tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(ActorError::Checkpoint(format!(
                "{what} checkpoint tensor {name} has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

impl PpoTrainer {
    /// A copy of the learner's state for a checkpoint.
    pub fn state(&self) -> Result<TrainerState, ActorError> {
        let mut optimizer = HashMap::new();
        let (policy_optimizer_steps, m) = self.policy_opt.state()?;
        optimizer.extend(m.into_iter().map(|(k, v)| (format!("policy/{k}"), v)));
        let critic_optimizer_steps = match &self.critic {
            Some((_, _, opt)) => {
                let (n, m) = opt.state()?;
                optimizer.extend(m.into_iter().map(|(k, v)| (format!("critic/{k}"), v)));
                Some(n)
            }
            None => None,
        };
        if let Some(ema) = self.ema_weights() {
            optimizer.extend(ema.into_iter().map(|(k, v)| (format!("ema/{k}"), v)));
        }
        if let Some(n) = &self.score_norm {
            optimizer.insert(
                "score_norm".into(),
                Tensor::new(&[n.count, n.mean, n.m2], &Device::Cpu)?,
            );
        }
        Ok(TrainerState {
            policy: self.policy_weights()?,
            critic: self.critic_weights()?,
            optimizer,
            policy_optimizer_steps,
            critic_optimizer_steps,
            beta: self.kl.beta(),
            completed_steps: self.completed_steps,
        })
    }

    /// Restores a [`TrainerState`]; every tensor must be present with its shape.
    pub fn load_state(&mut self, s: &TrainerState) -> Result<(), ActorError> {
        let prefixed = |p: &str| -> HashMap<String, Tensor> {
            s.optimizer
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(p).map(|k| (k.to_string(), v.clone())))
                .collect()
        };
        load_vars(&self.policy_vars, &s.policy, "policy")?;
        self.policy_opt
            .load_state(s.policy_optimizer_steps, &prefixed("policy/"))?;
        match (&mut self.critic, &s.critic, s.critic_optimizer_steps) {
            (Some((_, vars, opt)), Some(w), Some(n)) => {
                load_vars(vars, w, "critic")?;
                opt.load_state(n, &prefixed("critic/"))?;
            }
            (None, None, None) => {}
            _ => {
                return Err(ActorError::Checkpoint(
                    "checkpoint and run disagree on having a critic".into(),
                ))
            }
        }
        if let Some(ema) = &mut self.ema {
            // A checkpoint without EMA weights starts the average at its policy weights.
            *ema = Ema::new(&sorted_vars(&self.policy_vars), ema.decay())?;
            let saved = prefixed("ema/");
            if !saved.is_empty() {
                let shadow = sorted_names(&self.policy_vars)
                    .iter()
                    .map(|n| {
                        let t = saved
                            .get(n)
                            .ok_or_else(|| ActorError::Checkpoint(format!("checkpoint lacks EMA tensor {n}")))?;
                        Ok(t.to_device(&self.device)?)
                    })
                    .collect::<Result<Vec<_>, ActorError>>()?;
                ema.set_shadow(shadow)?;
            }
        }
        if let Some(n) = &mut self.score_norm {
            if let Some(t) = s.optimizer.get("score_norm") {
                let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                if let [count, mean, m2] = v[..] {
                    (n.count, n.mean, n.m2) = (count, mean, m2);
                }
            }
        }
        self.kl.restore_beta(s.beta)?;
        self.completed_steps = s.completed_steps;
        Ok(())
    }
}
