//! `tandem replay RUN_DIR --rerun-step K`: executes learner step K again and compares it with
//! what the run recorded.
//!
//! It builds the learner from the run's config, restores `checkpoints/step-K` (the state before
//! step K) over it, takes the trajectories the store recorded as used in step K (in the order
//! the learner saw them) and runs the same PPO step on the learner's device with its thread
//! count. Then it compares:
//! - every statistic of the step ([`tandem_actors::ppo_trainer::StepStats`]) with line K of
//!   `metrics.jsonl`;
//! - the per-token rewards, advantages and returns with those stored for each trajectory;
//! - the resulting policy and critic weights with `checkpoints/step-(K+1)`, when it exists.
//!
//! A step depends only on that state and batch, so everything is identical on the machine that
//! ran it; the command prints the differences as JSON and exits 1 if any is not zero.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor};
use serde_json::json;
use tandem_actors::{Executor, StepReport};
use tandem_models::{load_tensors, ModelConfig};
use tandem_runtime::checkpoint;
use tandem_runtime::pipeline::build_learner;
use tandem_runtime::store::StoredTrajectory;
use tandem_runtime::Config;

use crate::error::bad_input;

pub fn rerun_step(run_dir: &Path, step: u64, stored: &[StoredTrajectory]) -> anyhow::Result<()> {
    let ckdir = checkpoint::step_dir(run_dir, step);
    if !ckdir.join("state.json").is_file() {
        let have: Vec<u64> = checkpoint::list(run_dir)?.into_iter().map(|(k, _)| k).collect();
        return bad_input!(
            "{}: no checkpoint of step {step} (have {have:?}); --rerun-step K needs the checkpoint taken before \
             step K (set checkpoints.every and checkpoints.keep so it is kept)",
            ckdir.display()
        );
    }
    let cfg = Config::load_resolved(&ckdir.join("config.toml"))?;
    let batch: Vec<_> = stored
        .iter()
        .filter(|t| t.outcome.used() && t.outcome.step() == step)
        .collect();
    if batch.len() != cfg.batch_size() {
        return bad_input!(
            "{}: the store holds {} trajectories used in step {step}, the batch had {} (is store.retention keeping this step?)",
            run_dir.display(),
            batch.len(),
            cfg.batch_size()
        );
    }
    let recorded = recorded_line(run_dir, step)?;
    let trajectories: Vec<_> = batch.iter().map(|t| t.to_trajectory()).collect();

    let executor = Executor::new(cfg.placement.learner_device, cfg.placement.threads_per_device)?;
    let rt = crate::control_runtime("tandem-control")?;
    let (out, _) = rt.block_on(executor.run(move |device| -> anyhow::Result<_> {
        let mut built = build_learner(&cfg, device)?;
        let ck = checkpoint::read(&ckdir, device)?;
        built.trainer.load_state(&ck.trainer)?;
        let (stats, outputs) = built.trainer.step_with_outputs(&trajectories, ck.meta.version, step)?;
        let policy = built.trainer.policy_weights()?;
        let critic = built.trainer.critic_weights()?;
        Ok((stats, outputs, policy, critic))
    }))?;
    let (stats, outputs, policy, critic) = out?;

    let mut identical = true;
    // Every statistic of the step, named as metrics.jsonl names it. The rerun's numbers go
    // through the same text form and parser as the recorded line, so equal numbers compare equal.
    let recorded = serde_json::to_value(&recorded.stats)?;
    let rerun: serde_json::Value = serde_json::from_str(&serde_json::to_string(&stats)?)?;
    let mut losses = serde_json::Map::new();
    for (k, a) in recorded.as_object().into_iter().flatten() {
        let b = &rerun[k];
        let diff = match (a.as_f64(), b.as_f64()) {
            _ if a == b && !a.is_null() => 0.0,
            (Some(x), Some(y)) => (x - y).abs(),
            _ => f64::NAN,
        };
        identical &= diff == 0.0;
        losses.insert(k.clone(), json!({ "recorded": a, "rerun": b, "abs_diff": diff }));
    }
    let mut token_diff = 0f32;
    for (t, o) in batch.iter().zip(&outputs) {
        for (a, b) in [
            (&t.token_rewards, &o.rewards),
            (&t.advantages, &o.advantages),
            (&t.returns, &o.returns),
        ] {
            token_diff = a.iter().zip(b).fold(token_diff, |m, (x, y)| m.max((x - y).abs()));
            if a.len() != b.len() {
                token_diff = f32::INFINITY;
            }
        }
    }
    identical &= token_diff == 0.0;
    let next = checkpoint::step_dir(run_dir, step + 1);
    let weights = if next.join("state.json").is_file() {
        let p = max_abs_diff(&policy, &load(&next.join("policy"))?)?;
        let c = match &critic {
            Some(w) => Some(max_abs_diff(w, &load(&next.join("critic"))?)?),
            None => None,
        };
        identical &= p == 0.0 && c.is_none_or(|c| c == 0.0);
        json!({ "compared_with": next, "policy_max_abs_diff": p, "critic_max_abs_diff": c })
    } else {
        json!({ "compared_with": null, "note": format!("no checkpoint of step {} to compare the weights with", step + 1) })
    };
    crate::print_json(&json!({
        "step": step,
        "trajectories": batch.len(),
        "identical": identical,
        "stats": losses,
        "token_outputs_max_abs_diff": token_diff,
        "weights": weights,
    }))?;
    if !identical {
        anyhow::bail!("step {step} did not rerun identically (see the differences above)");
    }
    Ok(())
}

fn recorded_line(run_dir: &Path, step: u64) -> anyhow::Result<StepReport> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    for (i, line) in text.lines().enumerate() {
        let r = StepReport::from_line(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if r.step == step {
            return Ok(r);
        }
    }
    bad_input!("{}: no line for step {step}", path.display())
}

fn load(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let cfg = ModelConfig::from_dir(dir)?;
    Ok(load_tensors(dir, &cfg, &candle_core::Device::Cpu)?)
}

fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> anyhow::Result<f64> {
    let mut m = 0f64;
    for (name, x) in a {
        let y = b.get(name).with_context(|| format!("checkpoint lacks {name}"))?;
        let d = (x.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64)? - y.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        m = m.max(d);
    }
    Ok(m)
}
