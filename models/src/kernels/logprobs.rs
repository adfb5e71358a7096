//! Token log-probabilities and entropies from logits in one pass: for each row of logits `l`
//! (vocabulary `V`) with target `y` and inverse temperature `a`, `z = a * l`,
//!
//! ```text
//! lse = log sum_v exp(z_v)      logp = z_y - lse      H = lse - sum_v p_v z_v,  p = exp(z - lse)
//! dz_v = g_logp (1[v = y] - p_v) - g_H p_v (z_v - lse + H)      dl = a dz
//! ```
//!
//! The composition materialises the scaled logits, the log-softmax, its exponent and their
//! product (each `rows x V`), then gathers; here a row is read twice forward and once
//! backward, and nothing of size `V` is kept: a forward on a graph keeps each row's `lse` and
//! `H` for its backward, which otherwise reads the row twice more to recompute them.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use std::sync::OnceLock;

use super::{chunk_len, contiguous_f32, for_each_chunk, for_each_chunk_paired, fused_applies, multiversion, simd};

/// `(logprobs, entropy)`, each shaped like `targets`, for `logits (..., V)` divided by
/// `temperature` and integer `targets (...)`. Differentiable in the logits. Fused on the CPU
/// for f32 logits and u32 targets, [`token_logprobs_entropy_reference`] elsewhere.
pub fn token_logprobs_entropy(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    if !(fused_applies(logits) && targets.dtype() == DType::U32) {
        return token_logprobs_entropy_reference(logits, targets, temperature);
    }
    let v = logits.dim(D::Minus1)?;
    if logits.dims()[..logits.rank() - 1] != *targets.dims() {
        candle_core::bail!("logits {:?} and targets {:?} disagree", logits.dims(), targets.dims());
    }
    let rows = targets.elem_count();
    let both = logits.reshape((rows, v))?.contiguous()?.apply_op2(
        &targets.flatten_all()?.contiguous()?,
        LogProbs {
            inv_temperature: (1.0 / temperature) as f32,
            keep_stats: logits.track_op(),
            stats: OnceLock::new(),
        },
    )?;
    let column = |c: usize| both.narrow(1, c, 1)?.reshape(targets.shape());
    Ok((column(0)?, column(1)?))
}

multiversion! {
    /// `out[i] = e^((x[i] - shift) * a)` with the vectorised [`simd::exp`] (relative error
    /// below 2e-7): a sampler's unnormalised weights, `shift` the row's maximum and `a` the
    /// inverse temperature.
    pub fn exp_shifted(x: &[f32], shift: f32, a: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = simd::exp((v - shift) * a);
        }
    }
}

/// Scale, log-softmax, gather and `-sum p log p` as separate candle ops.
pub fn token_logprobs_entropy_reference(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let logits = if temperature != 1.0 {
        (logits / temperature)?
    } else {
        logits.clone()
    };
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let logprobs = lp
        .gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let entropy = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?;
    Ok((logprobs, entropy))
}

struct LogProbs {
    inv_temperature: f32,
    /// Whether the forward keeps each row's `lse` and `H` for the backward: the logits are on
    /// a graph, so a backward may follow.
    keep_stats: bool,
    /// `[lse, H]` per row of the forward's logits, when `keep_stats`.
    stats: OnceLock<Vec<f32>>,
}

multiversion! {
    /// (lse, sum_v p_v z_v) of one row of logits scaled by `a`.
    fn row_stats(l: &[f32], a: f32, out: &mut (f32, f32)) {
        let m = simd::max(l) * a;
        const L: usize = simd::LANES;
        let (mut s, mut sz) = ([0f32; L], [0f32; L]);
        let chunks = l.chunks_exact(L);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..L {
                let z = c[k] * a;
                let e = simd::exp(z - m);
                s[k] += e;
                sz[k] += e * z;
            }
        }
        let (mut sum, mut sum_z) = (simd::lane_sum(s), simd::lane_sum(sz));
        for &v in rest {
            let z = v * a;
            let e = simd::exp(z - m);
            sum += e;
            sum_z += e * z;
        }
        *out = (m + simd::ln(sum), sum_z / sum);
    }
}

multiversion! {
    fn backward_row(l: &[f32], a: f32, lse: f32, h: f32, g_lp: f32, g_h: f32, dl: &mut [f32]) {
        for (d, &v) in dl.iter_mut().zip(l) {
            let z = v * a;
            let p = simd::exp(z - lse);
            *d = a * (-g_lp * p - g_h * p * (z - lse + h));
        }
    }
}

fn contiguous_u32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<u32>()?[a..b]),
        None => candle_core::bail!("{op}: targets must be contiguous"),
    }
}

fn check_rows(logits: &Layout, targets: &[u32]) -> Result<(usize, usize)> {
    let (rows, v) = logits.shape().dims2()?;
    if targets.len() != rows {
        candle_core::bail!("{rows} rows of logits but {} targets", targets.len());
    }
    if let Some(&y) = targets.iter().find(|&&y| y as usize >= v) {
        candle_core::bail!("target {y} outside a vocabulary of {v}");
    }
    Ok((rows, v))
}

impl CustomOp2 for LogProbs {
    fn name(&self) -> &'static str {
        "fused-token-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = contiguous_u32(s2, l2, self.name())?;
        let (rows, v) = check_rows(l1, targets)?;
        let a = self.inv_temperature;
        let mut out = vec![0f32; rows * 2];
        // Two entries a row, each assigned below; none when nothing is kept.
        let mut stats = if self.keep_stats {
            super::written_output(rows * 2)
        } else {
            vec![]
        };
        // Rows split over the pool as the logits' size decides: the policy's forward ends
        // here, after the critic's branch of the learner's join has finished.
        let rows_per_chunk = (chunk_len(rows * v, v) / v.max(1)).max(1);
        let chunk = 2 * rows_per_chunk;
        for_each_chunk_paired(&mut out, chunk, &mut stats, chunk, |off, out, stats| {
            for (i, o) in out.chunks_exact_mut(2).enumerate() {
                let r = off / 2 + i;
                let row = &logits[r * v..(r + 1) * v];
                let mut st = (0.0, 0.0);
                row_stats(row, a, &mut st);
                let (lse, mean_z) = st;
                o[0] = row[targets[r] as usize] * a - lse;
                o[1] = lse - mean_z;
                if !stats.is_empty() {
                    stats[2 * i] = lse;
                    stats[2 * i + 1] = o[1];
                }
            }
        });
        if self.keep_stats {
            // Each call makes its own op, so this is its only forward.
            let _ = self.stats.set(stats);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dl = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &LogProbsBackward(self))?;
        Ok((Some(dl), None))
    }
}

/// (logits, targets, d(logprob, entropy)) to dlogits, with the forward's `lse` and `H` where
/// it kept them.
struct LogProbsBackward<'a>(&'a LogProbs);

impl CustomOp3 for LogProbsBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-token-logprobs-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = contiguous_u32(s2, l2, self.name())?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let (rows, v) = check_rows(l1, targets)?;
        let a = self.0.inv_temperature;
        let kept = self.0.stats.get().filter(|s| s.len() == 2 * rows);
        let mut dl = super::written_output(logits.len()); // backward_row assigns every element
        for_each_chunk(&mut dl, v, |off, out| {
            for (i, d) in out.chunks_exact_mut(v).enumerate() {
                let r = off / v + i;
                let row = &logits[r * v..(r + 1) * v];
                let (lse, h) = match kept {
                    Some(s) => (s[2 * r], s[2 * r + 1]),
                    None => {
                        let mut st = (0.0, 0.0);
                        row_stats(row, a, &mut st);
                        (st.0, st.0 - st.1)
                    }
                };
                let (g_lp, g_h) = (grad[2 * r], grad[2 * r + 1]);
                backward_row(row, a, lse, h, g_lp, g_h, d);
                d[targets[r] as usize] += a * g_lp;
            }
        });
        Ok((CpuStorage::F32(dl), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_match_the_reference() {
        for (i, (b, n, v, temp)) in [(1, 1, 3, 1.0), (2, 7, 37, 0.7), (16, 32, 512, 1.0), (3, 5, 1000, 1.3)]
            .into_iter()
            .enumerate()
        {
            let logits = Var::from_tensor(&random(&[b, n, v], 8.0, i as u64)).unwrap();
            let ids: Vec<u32> = (0..b * n).map(|k| ((k * 7919 + i) % v) as u32).collect();
            let targets = Tensor::from_vec(ids, (b, n), &Device::Cpu).unwrap();
            let (w1, w2) = (random(&[b, n], 1.0, 10 + i as u64), random(&[b, n], 1.0, 20 + i as u64));
            let (lf, ef) = token_logprobs_entropy(logits.as_tensor(), &targets, temp).unwrap();
            let (lr, er) = token_logprobs_entropy_reference(logits.as_tensor(), &targets, temp).unwrap();
            assert!(rel_err(&lf, &lr) < 1e-5 && rel_err(&ef, &er) < 1e-5, "{b} {n} {v}");
            let loss = |l: Tensor, e: Tensor| ((l * &w1).unwrap() + (e * &w2).unwrap()).unwrap().sum_all().unwrap();
            let gf = loss(lf, ef).backward().unwrap();
            let gr = loss(lr, er).backward().unwrap();
            let e = rel_err(gf.get(&logits).unwrap(), gr.get(&logits).unwrap());
            assert!(e < 1e-5, "{b} {n} {v}: {e}");
        }
    }

    /// The backward gives the same bits from the forward's kept `lse` and `H` as from
    /// recomputing them, with the rows split over a pool or not.
    #[test]
    fn kept_row_statistics_give_the_recomputed_gradients() {
        let (rows, v) = (200, 256);
        let logits = Var::from_tensor(&random(&[rows, v], 8.0, 3)).unwrap();
        let ids: Vec<u32> = (0..rows).map(|k| ((k * 7919) % v) as u32).collect();
        let targets = Tensor::from_vec(ids, rows, &Device::Cpu).unwrap();
        let w = random(&[rows, 2], 1.0, 4);
        let grads = |keep: bool| {
            let op = LogProbs {
                inv_temperature: 1.0 / 0.7,
                keep_stats: keep,
                stats: OnceLock::new(),
            };
            let both = logits.as_tensor().apply_op2(&targets, op).unwrap();
            let g = (both * &w).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&logits).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let recomputed = grads(false);
        assert_eq!(grads(true), recomputed);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(pool.install(|| grads(true)), recomputed);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let logits = random(&[2, 4], 1.0, 0);
        let targets = Tensor::from_vec(vec![1u32, 4], 2, &Device::Cpu).unwrap();
        assert!(token_logprobs_entropy(&logits, &targets, 1.0).is_err());
    }
}
