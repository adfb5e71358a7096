//! One learner step (`PpoTrainer::step`) on the quickstart's shapes.
//!
//!     cargo bench --bench learner_step
//!
//! Group `learner_step`, entry `quickstart`: the built-in GPT-2 of `configs/quickstart.toml`
//! (2 layers × 64 wide, 4 heads, the built-in word vocabulary) as policy, a critic started
//! from the policy, and one batch of 32 trajectories: 12-token prompts with 12 tokens sampled
//! from the policy itself (so the behaviour log-probs are the policy's own and the step is
//! on-policy), scores in [0, 1), reference log-probs equal to the policy's (zero KL). One
//! iteration is the whole step: GAE, whitening, 4 epochs × 2 minibatches of 16 of policy and
//! critic forward, backward and AdamW. The trainer keeps learning across iterations, as it does
//! in a run; each iteration does the same arithmetic. Issue 16 asks for ≤ 0.1 s here.
//!
//! Entry `peer`: the same on the shared peer workload's shapes (4 layers × 256, vocabulary
//! 512, 64 trajectories of 16 + 32 tokens, 4 epochs × 4 minibatches of 16, critic the same
//! shape): the learner step that `tandem bench ppo` times inside the full loop. It takes
//! seconds an iteration, so it runs only when `TANDEM_BENCH_PEER=1`.

mod common;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_actors::{PpoTrainer, TrainerConfig, Trajectory};
use tandem_models::rl::KlControllerConfig;
use tandem_models::{
    generate, snapshot, Decoding, LanguageModel, ModelConfig, SamplingConfig, ScalarModel, WeightInit,
};
use tandem_runtime::builtin;
use tandem_runtime::config::{BuiltinArch, BuiltinModel};

struct Workload {
    config: ModelConfig,
    batch: usize,
    prompt: usize,
    new: usize,
    epochs: usize,
    minibatch: usize,
    lr: f64,
}

/// A trainer and a batch sampled from its own policy.
fn setup(w: &Workload) -> (PpoTrainer, Vec<Trajectory>) {
    let dev = Device::Cpu;
    let vocab = w.config.dims().vocab_size as u32;
    let policy = LanguageModel::trainable(&w.config, WeightInit::Random { seed: 1 }, &dev).expect("policy");
    let initial = snapshot(&policy.1).expect("snapshot");
    let critic = ScalarModel::trainable(
        &w.config,
        WeightInit::Checkpoint {
            tensors: &initial,
            dir: std::path::Path::new("<policy>"),
            seed: 2,
        },
        &dev,
    )
    .expect("critic");
    let sampler = LanguageModel::from_tensors(&w.config, initial, &dev).expect("sampler");
    let mut rng = StdRng::seed_from_u64(3);
    // Token 0 pads; prompts use the rest of the vocabulary.
    let prompts: Vec<Vec<u32>> = (0..w.batch)
        .map(|_| (0..w.prompt).map(|_| rng.random_range(1..vocab)).collect())
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: w.new,
        ..SamplingConfig::default()
    };
    let g = generate(&sampler, &prompts, &sampling, &mut rng, Decoding::Cached).expect("generate");
    let batch: Vec<Trajectory> = (0..w.batch)
        .map(|i| Trajectory {
            ticket: 0,
            row: i as u32,
            prompt_index: i as u64,
            prompt_ids: prompts[i].clone(),
            response_ids: g.responses[i].clone(),
            behaviour_logprobs: g.logprobs[i].clone(),
            full_logprobs: g.full_logprobs[i].clone(),
            stopped: g.stopped[i],
            policy_version: 0,
            token_versions: vec![],
            sampler: "bench".into(),
            sampling_seed: 3,
            ref_logprobs: g.full_logprobs[i].clone(),
            score: rng.random::<f32>(),
            values: vec![0.0; g.responses[i].len()],
            sampled_unix_ms: 0,
        })
        .collect();
    let cfg = TrainerConfig {
        ppo_epochs: w.epochs,
        minibatch_size: w.minibatch,
        policy_lr: w.lr,
        critic_lr: w.lr,
        kl: KlControllerConfig::Fixed { beta: 0.05 },
        ..TrainerConfig::default()
    };
    let trainer = PpoTrainer::new(cfg, policy, Some(critic), 1.0, 1, 1, dev).expect("trainer");
    (trainer, batch)
}

fn bench_step(c: &mut Criterion, name: &str, w: &Workload) {
    let pool = common::pool();
    let (mut trainer, batch) = pool.install(|| setup(w));
    let mut g = c.benchmark_group("learner_step");
    // Token positions through policy and critic, forward and backward, per step.
    g.throughput(Throughput::Elements((w.epochs * w.batch * (w.prompt + w.new)) as u64));
    let mut step = 0u64;
    g.bench_function(name, |b| {
        pool.install(|| {
            b.iter(|| {
                step += 1;
                trainer.step(&batch, 0, step).expect("learner step")
            })
        })
    });
    g.finish();
}

fn quickstart(c: &mut Criterion) {
    let spec = BuiltinModel {
        arch: BuiltinArch::Gpt2,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: None,
    };
    let w = Workload {
        config: builtin::model_config(&spec, 64),
        batch: 32,
        prompt: 12,
        new: 12,
        epochs: 4,
        minibatch: 16,
        lr: 3e-4,
    };
    bench_step(c, "quickstart", &w);
}

fn peer(c: &mut Criterion) {
    if std::env::var("TANDEM_BENCH_PEER").as_deref() != Ok("1") {
        return;
    }
    let w = Workload {
        config: ModelConfig::gpt2(512, 256, 4, 4, 256),
        batch: 64,
        prompt: 16,
        new: 32,
        epochs: 4,
        minibatch: 16,
        lr: 1e-5,
    };
    bench_step(c, "peer", &w);
}

criterion_group! {
    name = benches;
    config = common::quick(5);
    targets = quickstart, peer
}
criterion_main!(benches);
