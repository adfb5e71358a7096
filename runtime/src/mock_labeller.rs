//! The seed papers' controlled experiment (Ziegler et al. 2019; Gao et al. 2022 in spirit):
//! a programmatic labeller stands in for humans, a reward model is learned from its labels,
//! PPO optimises the learned reward model, and the programmatic ("true") score is logged
//! beside the learned one so over-optimisation shows.
//!
//! A config with a `[mock_labeller]` section runs, under `tandem run`:
//! 1. **Labelling.** The initial policy (exactly the weights PPO starts from) samples two
//!    responses per prompt with the run's sampling settings; the config's `[reward]` source —
//!    the programmatic preference, e.g. `positive_words` (more positive words is better) —
//!    scores both and the higher one is labelled chosen. Ties are not labelled. Draws continue
//!    over the shuffled prompts until `pairs + eval_pairs` labelled pairs exist (or 50 times
//!    that many draws, an error). Everything is written under `RUN_DIR/mock_labeller/`:
//!    `train.jsonl`, `eval.jsonl` (`{"prompt","chosen","rejected"}`) and `reference.jsonl`
//!    (every sampled response: the policy samples the normalisation is fitted on).
//! 2. **Reward model.** [`crate::train_rm`] trains a reward model on the labelled ids (the
//!    same runtime path as `tandem train-rm`: loader, learner actor, metrics, checkpoints) with
//!    the policy's architecture as backbone, into `RUN_DIR/mock_labeller/rm/`, normalised with
//!    `normalize` (default `gain_bias`: the initial policy's samples score mean 0, std 1).
//!    A held-out accuracy below `min_eval_accuracy` stops the run.
//! 3. **PPO** runs on the config with `[reward]` replaced by the learned model
//!    (`kind = "reward_model"`). Each `metrics.jsonl` line carries `true_score_mean`, the
//!    programmatic score of the trajectories that step trained on, beside `score_mean`, the
//!    learned model's score of the same trajectories.
//!
//! The run directory's `config.toml` is the PPO config (what `tandem replay --rescore`
//! needs); the original, with `[mock_labeller]`, is `RUN_DIR/mock_labeller/config.toml`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use tandem_actors::reward_source::RewardSource;
use tandem_actors::rm_trainer::{Comparison, RmLoss};
use tandem_actors::{ActorError, Executor};
use tandem_models::{TextTokenizer, WeightInit};

use crate::best_of::{sample_and_score, SampleSpec};
use crate::config::{Config, RewardKind, RewardSourceConfig};
use crate::error::RuntimeError;
use crate::pipeline::{RunOptions, RunSummary};
use crate::policy::{load_policy, LoadedPolicy};
use crate::prompts::load_prompts;
use crate::reward_sources::reward_source;
use crate::step_probe::StepProbe;
use crate::train_rm::{
    train_rm_on, NormalizeSection, RmChannels, RmConfig, RmData, RmInputs, RmPlacement, SupervisedCheckpoints,
    TrainSection,
};

/// Labelled pairs and every sampled (prompt, response).
type Labelled = (Vec<Comparison>, Vec<(Vec<u32>, Vec<u32>)>, usize);

fn label(
    cfg: &Config,
    policy: &LoadedPolicy,
    prompts: &[Vec<u32>],
    truth: &dyn RewardSource,
    want: usize,
    dev: &candle_core::Device,
) -> Result<Labelled, ActorError> {
    let init = WeightInit::loaded_or_random(policy.init.as_ref(), cfg.seed);
    let (model, _) = tandem_models::LanguageModel::trainable(&policy.config, init, dev)?;
    let mut pairs = Vec::with_capacity(want);
    let mut samples = Vec::new();
    let mut drawn = 0;
    let mut round = 0u64;
    while pairs.len() < want {
        if drawn >= 50 * want {
            return Err(ActorError::InvalidConfig(format!(
                "mock_labeller: only {} of {want} sampled pairs differ in the programmatic score after {drawn} draws",
                pairs.len()
            )));
        }
        let mut order = prompts.to_vec();
        order.shuffle(&mut StdRng::seed_from_u64(cfg.seed ^ 0x1abe1 ^ round));
        let need = (want - pairs.len()) * 2;
        order.truncate(need.min(order.len()));
        let spec = SampleSpec {
            n: 2,
            sampling: &cfg.sampling,
            seed: cfg.seed ^ 0x5a_4d_70 ^ (round << 20),
            batch: cfg.data.prompts_per_ticket,
        };
        let scored = sample_and_score(&model, &order, spec, truth, false)?;
        for s in scored {
            drawn += 1;
            for r in &s.responses {
                samples.push((s.prompt.clone(), r.clone()));
            }
            if s.scores[0] == s.scores[1] || pairs.len() == want {
                continue;
            }
            let ranking = if s.scores[0] > s.scores[1] {
                vec![0, 1]
            } else {
                vec![1, 0]
            };
            pairs.push(Comparison {
                prompt: s.prompt,
                responses: s.responses,
                ranking,
            });
        }
        round += 1;
    }
    Ok((pairs, samples, drawn))
}

fn write_jsonl(path: &Path, lines: impl Iterator<Item = serde_json::Value>) -> Result<(), RuntimeError> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| RuntimeError::io(path, e))?);
    for l in lines {
        writeln!(f, "{l}").map_err(|e| RuntimeError::io(path, e))?;
    }
    f.flush().map_err(|e| RuntimeError::io(path, e))
}

fn text(tok: &TextTokenizer, ids: &[u32]) -> String {
    tok.decode(ids).unwrap_or_default()
}

/// Labels, trains the reward model, then runs PPO against it (see the module docs).
pub async fn run(cfg: &Config, opts: RunOptions) -> Result<RunSummary, RuntimeError> {
    let Some(m) = cfg.mock_labeller.clone() else {
        return Err(RuntimeError::InvalidArgument(
            "the mock labeller needs a [mock_labeller] section".into(),
        ));
    };
    let dir = opts.run_dir.join("mock_labeller");
    std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(&dir, e))?;
    let orig = dir.join("config.toml");
    std::fs::write(&orig, cfg.to_toml()).map_err(|e| RuntimeError::io(&orig, e))?;

    // 1. Label pairs sampled from the initial policy with the programmatic preference.
    let policy = Arc::new(load_policy(cfg)?);
    let device = cfg.placement.learner_device;
    let exec = Executor::new(device, cfg.placement.threads_per_device)?;
    let truth = reward_source(cfg, &policy.tokenizer, exec.device())?;
    let prompts = load_prompts(
        &cfg.data.prompts,
        &cfg.data.prompt_key,
        &policy.tokenizer,
        cfg.data.prompt_max_tokens,
        cfg.data.on_bad_line,
    )?
    .prompts;
    let want = m.pairs + m.eval_pairs;
    let (c, p, t) = (cfg.clone(), policy.clone(), truth.clone());
    let (out, took) = exec
        .run(move |dev| label(&c, &p, &prompts, t.as_ref(), want, dev))
        .await?;
    let (mut pairs, samples, drawn) = out?;
    tracing::info!(
        pairs = pairs.len(),
        drawn,
        secs = took.as_secs_f64(),
        "mock labeller: pairs labelled"
    );
    let eval = pairs.split_off(m.pairs);
    let tok = &policy.tokenizer;
    let pair_line = |c: &Comparison| {
        serde_json::json!({
            "prompt": text(tok, &c.prompt),
            "chosen": text(tok, &c.responses[c.ranking[0]]),
            "rejected": text(tok, &c.responses[c.ranking[1]]),
        })
    };
    write_jsonl(&dir.join("train.jsonl"), pairs.iter().map(pair_line))?;
    write_jsonl(&dir.join("eval.jsonl"), eval.iter().map(pair_line))?;
    write_jsonl(
        &dir.join("reference.jsonl"),
        samples
            .iter()
            .map(|(p, r)| serde_json::json!({"prompt": text(tok, p), "response": text(tok, r)})),
    )?;

    // 2. Train the reward model on the labels, on the runtime.
    let rm_cfg = RmConfig {
        seed: cfg.seed.wrapping_add(7),
        run_dir: None,
        model: cfg.models.policy.clone(),
        data: RmData {
            train: dir.join("train.jsonl"),
            eval: Some(dir.join("eval.jsonl")),
            eval_fraction: 0.0,
            prompt_max_tokens: cfg.data.prompt_max_tokens,
            response_max_tokens: cfg.sampling.max_new_tokens,
        },
        train: TrainSection {
            loss: Some(RmLoss::BradleyTerry),
            epochs: m.epochs,
            batch_size: m.batch_size,
            lr: m.lr,
            eval_every: 0,
            eval_batch_size: 64,
            ..Default::default()
        },
        normalize: NormalizeSection {
            kind: m.normalize,
            reference: Some(dir.join("reference.jsonl")),
        },
        checkpoints: SupervisedCheckpoints::default(),
        placement: RmPlacement {
            device,
            threads: cfg.placement.threads_per_device,
        },
        channels: RmChannels::default(),
        progress: false,
    };
    let rm = train_rm_on(
        &rm_cfg,
        &dir.join("rm"),
        RmInputs {
            train: pairs,
            eval,
            reference: Some(samples),
        },
    )
    .await?;
    let acc = rm.eval_accuracy.unwrap_or(0.0);
    let summary = serde_json::json!({
        "pairs": rm.train_examples,
        "eval_pairs": rm.eval_examples,
        "draws": drawn,
        "eval_accuracy": acc,
        "normalization": rm.normalization,
    });
    let path = dir.join("summary.json");
    std::fs::write(&path, summary.to_string()).map_err(|e| RuntimeError::io(&path, e))?;
    tracing::info!(eval_accuracy = acc, "mock labeller: reward model trained");
    if acc < m.min_eval_accuracy {
        return Err(RuntimeError::Unmet(format!(
            "mock_labeller: the reward model's held-out accuracy {acc:.3} is below min_eval_accuracy {}",
            m.min_eval_accuracy
        )));
    }

    // 3. PPO against the learned reward model, logging the programmatic score beside it.
    let mut ppo = cfg.clone();
    ppo.mock_labeller = None;
    let mut reward: RewardSourceConfig = toml::from_str("kind = \"reward_model\"").expect("valid reward section");
    reward.model = Some(rm.model_dir.clone());
    debug_assert_eq!(reward.kind, RewardKind::RewardModel);
    ppo.reward = reward;
    let probe = StepProbe(Arc::new(move |rec: &tandem_actors::StepRecords| {
        let p: Vec<&[u32]> = rec.used.iter().map(|(t, _)| t.prompt_ids.as_slice()).collect();
        let r: Vec<&[u32]> = rec.used.iter().map(|(t, _)| t.response_ids.as_slice()).collect();
        match truth.score(&p, &r, &candle_core::Device::Cpu) {
            Ok(s) if !s.is_empty() => {
                let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
                vec![("true_score_mean".to_string(), mean)]
            }
            Ok(_) => vec![],
            Err(e) => {
                tracing::warn!("mock labeller: true score failed: {e}");
                vec![]
            }
        }
    }));
    crate::pipeline::run(
        &ppo,
        RunOptions {
            step_probe: Some(probe),
            ..opts
        },
    )
    .await
}
