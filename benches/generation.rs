//! KV-cache generation against full recomputation, on a randomly initialised GPT-2 of the
//! peer workload's shape (4 layers × 256 wide, 4 heads, vocabulary 512).
//!
//!     cargo bench --bench generation
//!
//! Group `generation`: [`BATCH`] prompts of [`PROMPT`] random tokens, [`NEW`] tokens sampled
//! per prompt at temperature 1 with no stop token, from an immutable weight snapshot as a
//! sampler holds it. `cached` decodes one position per step against the KV cache (the fast
//! path); `recompute` reruns the whole prefix each step (the reference). Both sample with the
//! same seed on every iteration, so they do the same work each time. Throughput is generated
//! tokens per second. `tandem bench generate` reports the same comparison at other sizes.

mod common;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_models::{generate, snapshot, Decoding, LanguageModel, ModelConfig, SamplingConfig, WeightInit};

const VOCAB: usize = 512;
const WIDTH: usize = 256;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const BATCH: usize = 8;
const PROMPT: usize = 16;
const NEW: usize = 16;

fn generation(c: &mut Criterion) {
    let pool = common::pool();
    let dev = Device::Cpu;
    let config = ModelConfig::gpt2(VOCAB, WIDTH, LAYERS, HEADS, 64);
    let (_, vars) = LanguageModel::trainable(&config, WeightInit::Random { seed: 0 }, &dev).expect("model");
    let model = LanguageModel::from_tensors(&config, snapshot(&vars).expect("snapshot"), &dev).expect("snapshot model");
    let mut rng = StdRng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| (0..PROMPT).map(|_| rng.random_range(0..VOCAB as u32)).collect())
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: NEW,
        ..SamplingConfig::default()
    };

    let mut g = c.benchmark_group("generation");
    g.throughput(Throughput::Elements((BATCH * NEW) as u64));
    for (name, decoding) in [("cached", Decoding::Cached), ("recompute", Decoding::Recompute)] {
        g.bench_function(name, |b| {
            pool.install(|| {
                b.iter(|| {
                    let mut rng = StdRng::seed_from_u64(1);
                    let out = generate(&model, &prompts, &sampling, &mut rng, decoding).expect("generate");
                    assert!(out.responses.iter().all(|r| r.len() == NEW));
                    out
                })
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::quick(5);
    targets = generation
}
criterion_main!(benches);
