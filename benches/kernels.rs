//! Fused CPU kernels against their reference compositions of candle ops.
//!
//!     cargo bench --bench kernels
//!     TANDEM_BENCH_THREADS=2 cargo bench --bench kernels -- gelu
//!
//! Each kernel is one function below that registers a group `<kernel>` with four entries:
//! `fused/forward`, `reference/forward`, `fused/forward_backward` and
//! `reference/forward_backward`, on an f32 input of the shape the peer workload gives it
//! (GPT-2's MLP activation for 768 tokens of a 256-wide model is [`ROWS`] × [`COLS`]). Forward+backward takes the gradient of
//! `sum(kernel(x))` with respect to `x`, so it times the op's backward plus one sum. To add a
//! kernel, write its function with [`bench_unary`] and list it in `criterion_group!`.
//! Throughput is reported in input elements per second; `transposed_rhs_matmul` (a vendored
//! matmul patch against upstream's path) reports FLOPs per second.

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
    fused: &(dyn Fn(&Tensor) -> Result<Tensor> + Sync),
    reference: &(dyn Fn(&Tensor) -> Result<Tensor> + Sync),
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

/// GELU (tanh form, GPT-2's `gelu_new`) of the MLP projection plus its bias, on the MLP
/// activation shape.
fn gelu(c: &mut Criterion) {
    let b = input(1, COLS, 0.5).squeeze(0).unwrap();
    bench_unary(
        c,
        "gelu",
        &input(ROWS, COLS, 4.0),
        &|x| kernels::bias_gelu(x, &b),
        &|x| kernels::bias_gelu_reference(x, &b),
    );
}

/// SwiGLU (`silu(gate) * up`, Qwen2 / Llama MLPs) on the MLP activation shape; the gradient
/// is taken with respect to the gate (the backward computes both).
fn swiglu(c: &mut Criterion) {
    let up = input(ROWS, COLS, 2.0);
    bench_unary(
        c,
        "swiglu",
        &input(ROWS, COLS, 4.0),
        &|g| kernels::swiglu(g, &up),
        &|g| kernels::swiglu_reference(g, &up),
    );
}

/// Layer norm over rows of width 256 (GPT-2's residual stream for 768 tokens).
fn layer_norm(c: &mut Criterion) {
    let (w, b) = (
        input(1, 256, 1.0).squeeze(0).unwrap(),
        input(1, 256, 0.5).squeeze(0).unwrap(),
    );
    bench_unary(
        c,
        "layer_norm",
        &input(ROWS, 256, 3.0),
        &|x| kernels::layer_norm(x, &w, &b, 1e-5),
        &|x| kernels::layer_norm_reference(x, &w, &b, 1e-5),
    );
}

/// Bias add on the MLP activation shape (the reference's backward reduces with index arithmetic).
fn add_bias(c: &mut Criterion) {
    let b = input(1, COLS, 0.5).squeeze(0).unwrap();
    bench_unary(
        c,
        "add_bias",
        &input(ROWS, COLS, 3.0),
        &|x| kernels::add_bias(x, &b),
        &|x| kernels::add_bias_reference(x, &b),
    );
}

/// Attention from a packed qkv: 16 rows of 48 tokens, 4 heads of 64, causal mask.
fn attention(c: &mut Criterion) {
    let (b, t) = (16, 48);
    let mask = vec![vec![1f32; t]; b];
    let bias = tandem_models::layers::AttentionInputs::new(&mask, t, &candle_core::Device::Cpu)
        .unwrap()
        .bias;
    let qkv = input(b * t, 3 * 256, 2.0).reshape((b, t, 3 * 256)).unwrap();
    bench_unary(
        c,
        "attention",
        &qkv,
        &|x| kernels::packed_attention(x, &bias, 4, 4, 0.125),
        &|x| kernels::packed_attention_reference(x, &bias, 4, 4, 0.125),
    );
}

/// Grouped-query attention from a packed qkv: 16 rows of 48 tokens, 8 query heads of 32 over
/// 2 key/value heads (a Qwen2-style 4 × 256 model), causal mask.
fn grouped_attention(c: &mut Criterion) {
    let (b, t, w) = (16, 48, (8 + 2 * 2) * 32);
    let mask = vec![vec![1f32; t]; b];
    let bias = tandem_models::layers::AttentionInputs::new(&mask, t, &candle_core::Device::Cpu)
        .unwrap()
        .bias;
    let qkv = input(b * t, w, 2.0).reshape((b, t, w)).unwrap();
    let scale = 1.0 / 32f64.sqrt();
    bench_unary(
        c,
        "grouped_attention",
        &qkv,
        &|x| kernels::packed_attention(x, &bias, 8, 2, scale),
        &|x| kernels::packed_attention_reference(x, &bias, 8, 2, scale),
    );
}

/// Rotary embedding of the query and key heads of the same packed qkv, positions 0..48.
fn rotary(c: &mut Criterion) {
    let (b, t, w) = (16, 48, (8 + 2 * 2) * 32);
    let dev = candle_core::Device::Cpu;
    let rotary = tandem_models::layers::Rotary::new(32, 128, 10000.0, &dev).unwrap();
    let (cos, sin) = rotary.tables();
    let positions = Tensor::arange(0u32, t as u32, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((b, 1))
        .unwrap();
    bench_unary(
        c,
        "rotary",
        &input(b * t, w, 2.0).reshape((b, t, w)).unwrap(),
        &|x| kernels::rotary_packed(x, cos, sin, &positions, 8, 2),
        &|x| kernels::rotary_packed_reference(x, cos, sin, &positions, 8, 2),
    );
}

/// Token log-probs + entropy over a vocabulary of 512 for 16 x 32 response tokens.
fn token_logprobs(c: &mut Criterion) {
    let targets = Tensor::from_vec(
        (0..16 * 32).map(|i| (i * 37 % 512) as u32).collect::<Vec<_>>(),
        (16, 32),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let both = |(l, e): (Tensor, Tensor)| l + e;
    bench_unary(
        c,
        "token_logprobs",
        &input(16 * 32, 512, 6.0).reshape((16, 32, 512)).unwrap(),
        &|x| kernels::token_logprobs_entropy(x, &targets, 1.0).and_then(both),
        &|x| kernels::token_logprobs_entropy_reference(x, &targets, 1.0).and_then(both),
    );
}

/// `x W^T` with `W` stored (out, in) (`nn.Linear`; GPT-2's `dX = dY W^T`), for a learner
/// minibatch (768 rows) and a decoding batch (64 rows) of a 256-wide model with an MLP of 1024:
/// `transposed_first` (the vendored matmul transposes the view back first; `vendor/README.md`),
/// `gemm_packing` (gemm packs the strided view itself, as upstream), and `row_major` (the same
/// product with `W^T` stored row-major: the rate to reach).
fn transposed_rhs_matmul(c: &mut Criterion) {
    let pool = common::pool();
    let w = input(1024, 256, 1.0);
    let (wt, wt_rows) = (w.t().unwrap(), w.t().unwrap().contiguous().unwrap());
    for rows in [768, 64] {
        let x = input(rows, 256, 1.0);
        let mut g = c.benchmark_group(format!("transposed_rhs_matmul/{rows}"));
        g.throughput(Throughput::Elements((2 * rows * 256 * 1024) as u64));
        for (path, rhs, transpose) in [
            ("transposed_first", &wt, true),
            ("gemm_packing", &wt, false),
            ("row_major", &wt_rows, true),
        ] {
            g.bench_function(path, |b| {
                candle_core::cpu_backend::set_transpose_rhs(transpose);
                pool.install(|| b.iter(|| x.matmul(rhs).expect("product")))
            });
        }
        candle_core::cpu_backend::set_transpose_rhs(true);
    }
}

criterion_group! {
    name = benches;
    config = common::quick(3);
    targets = gelu, swiglu, layer_norm, add_bias, attention, grouped_attention, rotary, token_logprobs, transposed_rhs_matmul
}
criterion_main!(benches);
