//! What the bench measures besides the run: the learner's FLOPs from the model shapes, the
//! machine's f32 GEMM rate, and the peak resident memory.

use super::*;

/// Matmul parameters and attention width of one model, for the FLOP count.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) layers: usize,
    pub(super) hidden: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) mlp_hidden: usize,
    pub(super) vocab: usize,
    /// 2 for GPT-2's MLP (up, down); 3 for a gated SiLU MLP (gate, up, down).
    pub(super) mlp_mats: usize,
}

impl Shape {
    pub(super) fn of(config: &ModelConfig) -> Self {
        let d = config.dims();
        Shape {
            layers: d.layers,
            hidden: d.hidden,
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            mlp_hidden: d.mlp_hidden,
            vocab: d.vocab_size,
            mlp_mats: if matches!(config.arch, Architecture::Gpt2(_)) {
                2
            } else {
                3
            },
        }
    }

    /// Q, K, V projection width.
    pub(super) fn qkv(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Weights multiplied per token by the transformer blocks.
    pub(super) fn block_matmul_params(&self) -> f64 {
        let (d, a) = (self.hidden as f64, (self.heads * self.head_dim) as f64);
        let per_layer = d * self.qkv() as f64 + a * d + (self.mlp_mats * self.mlp_hidden) as f64 * d;
        self.layers as f64 * per_layer
    }

    /// Forward FLOPs per token at sequence length `t` with an output head of `head` weights.
    pub(super) fn forward_flops_per_token(&self, t: usize, head: f64) -> f64 {
        let attention = 4.0 * (self.layers * t * self.heads * self.head_dim) as f64;
        2.0 * (self.block_matmul_params() + head) + attention
    }
}

/// One GEMM shape, (m, k) × (k, n), and its rate in each round so far, GFLOP/s.
pub(super) struct GemmRate {
    pub(super) name: &'static str,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) rounds: Vec<f64>,
}

impl GemmRate {
    /// The median over every round.
    pub(super) fn gflops(&self) -> f64 {
        median(self.rounds.clone())
    }
}

/// Timed rounds per GEMM shape on each side of the run.
pub(super) const GEMM_ROUNDS: usize = 3;

/// f32 GEMM with candle at fixed shapes, in the rayon pool it is called from: each call to
/// [`GemmReference::rounds`] adds [`GEMM_ROUNDS`] rounds over all shapes, `secs /
/// GEMM_ROUNDS` seconds (and at least 3 products) per shape and round.
pub(super) struct GemmReference {
    pub(super) shapes: Vec<GemmRate>,
}

impl GemmReference {
    pub(super) fn new(shapes: &[(&'static str, usize, usize, usize)]) -> Self {
        let shapes = shapes
            .iter()
            .map(|&(name, m, k, n)| GemmRate {
                name,
                m,
                k,
                n,
                rounds: vec![],
            })
            .collect();
        Self { shapes }
    }

    /// One set of rounds, on operands made for it (and freed after it, so they take no memory
    /// from the run in between) after one untimed product per shape: first touch of the output
    /// and packing buffers.
    pub(super) fn rounds(&mut self, secs: f64) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut operands = vec![];
        for g in &self.shapes {
            let a = Tensor::randn(0f32, 1.0, (g.m, g.k), &dev)?;
            let b = Tensor::randn(0f32, 0.05, (g.k, g.n), &dev)?;
            a.matmul(&b)?;
            operands.push((a, b));
        }
        for _ in 0..GEMM_ROUNDS {
            for (g, (a, b)) in self.shapes.iter_mut().zip(&operands) {
                let (mut reps, start) = (0usize, Instant::now());
                while reps < 3 || start.elapsed().as_secs_f64() < secs / GEMM_ROUNDS as f64 {
                    drop(a.matmul(b)?);
                    reps += 1;
                }
                g.rounds
                    .push(2.0 * (g.m * g.k * g.n * reps) as f64 / start.elapsed().as_secs_f64() / 1e9);
            }
        }
        Ok(())
    }
}

/// Peak resident set size in MiB (`VmHWM`), if the platform reports it.
pub(super) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(super) fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = xs.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer workload's learner does about 0.5 TFLOP a step (issue 16's estimate).
    #[test]
    fn peer_workload_flops_match_the_hand_count() {
        let config = ModelConfig::gpt2(512, 256, 4, 4, 256);
        let policy = Shape::of(&config);
        assert_eq!(policy.block_matmul_params(), 4.0 * 12.0 * 256.0 * 256.0);
        let t = 48;
        let fwd = policy.forward_flops_per_token(t, 256.0 * 512.0);
        let by_hand = 2.0 * (4.0 * 12.0 * 65536.0 + 256.0 * 512.0) + 4.0 * 4.0 * 48.0 * 256.0;
        assert_eq!(fwd, by_hand);
        let critic = policy.forward_flops_per_token(t, 256.0);
        let step = 3.0 * (4 * 64 * t) as f64 * (fwd + critic);
        assert!((0.45e12..0.55e12).contains(&step), "{step}");
    }
}
