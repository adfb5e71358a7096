//! Fused CPU kernels against their reference compositions of candle ops.
//!
//!     cargo bench --bench kernels
//!     TANDEM_BENCH_THREADS=2 cargo bench --bench kernels -- gelu
//!
//! Each kernel is one function below that registers a group `<kernel>` with four entries:
//! `fused/forward`, `reference/forward`, `fused/forward_backward` and
//! `reference/forward_backward`, on an f32 input of [`ROWS`] × [`COLS`] (GPT-2's MLP activation
//! for 768 tokens of a 256-wide model is (768, 1024)). Forward+backward takes the gradient of
//! `sum(kernel(x))` with respect to `x`, so it times the op's backward plus one sum. To add a
//! kernel (layer norm, softmax, log-softmax), write its function with [`bench_unary`] and list
//! it in `criterion_group!`. Throughput is reported in input elements per second.

mod common;

use candle_core::{Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tandem_models::kernels;

const ROWS: usize = 768;
const COLS: usize = 1024;

/// A seeded-normal-looking input: deterministic, no RNG state shared between benches.
fn input(rows: usize, cols: usize, scale: f32) -> Tensor {
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| {
            // A cheap deterministic spread over [-scale, scale]: Weyl sequence.
            let u = ((i as f64 * 0.618_033_988_749_895) % 1.0) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), &candle_core::Device::Cpu).expect("bench input")
}

/// Benches one elementwise-or-rowwise op, fused against reference, forward and
/// forward+backward, in the bench pool.
fn bench_unary(
    c: &mut Criterion,
    name: &str,
    x: &Tensor,
    fused: fn(&Tensor) -> Result<Tensor>,
    reference: fn(&Tensor) -> Result<Tensor>,
) {
    let pool = common::pool();
    let var = Var::from_tensor(x).expect("bench variable");
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(x.elem_count() as u64));
    for (path, f) in [("fused", fused), ("reference", reference)] {
        g.bench_function(format!("{path}/forward"), |b| {
            pool.install(|| b.iter(|| f(x).expect("forward")))
        });
        g.bench_function(format!("{path}/forward_backward"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let y = f(var.as_tensor()).expect("forward");
                    let grads = y.sum_all().and_then(|s| s.backward()).expect("backward");
                    grads.get(var.as_tensor()).expect("gradient").clone()
                })
            })
        });
    }
    g.finish();
}

/// GELU (tanh form, GPT-2's `gelu_new`) on the MLP activation shape.
fn gelu(c: &mut Criterion) {
    bench_unary(
        c,
        "gelu",
        &input(ROWS, COLS, 4.0),
        kernels::gelu,
        kernels::gelu_reference,
    );
}

criterion_group! {
    name = benches;
    config = common::quick(3);
    targets = gelu
}
criterion_main!(benches);
