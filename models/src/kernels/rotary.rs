//! Rotary position embedding of a packed `qkv (b, t, (heads + 2 kv_heads) * d)` (queries, then
//! keys, then values, token-major as [`super::packed_attention`] reads it): every query and key
//! head of token i is rotated by the angles of its position, `x cos + rotate_half(x) sin` with
//! `rotate_half(x) = [-x2, x1]` (transformers' convention); the value heads pass through.
//!
//! candle composes this from a narrow, a negation, a concatenation, two broadcast products
//! and a sum, each a pass over the query and key heads, and its backward from as many again
//! plus strided copies. Here the forward is one pass that reads each row once and writes it
//! once. The rotation is orthogonal, so the backward is the same pass with the angles negated
//! (`-sin`).

#![allow(clippy::too_many_arguments)]

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous_f32, for_each_chunk, fused_applies, multiversion};

/// Rotates the query and key heads of `qkv` by `positions (b, t)` (u32), with `cos` and `sin`
/// tables `(max_positions, d)` holding each angle in both halves of a head, as
/// [`crate::layers::Rotary`] builds them. Fused on the CPU for f32,
/// [`rotary_packed_reference`] elsewhere.
pub fn rotary_packed(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    if !(fused_applies(qkv) && fused_applies(cos) && fused_applies(sin)) {
        return rotary_packed_reference(qkv, cos, sin, positions, heads, kv_heads);
    }
    let (b, t, w) = qkv.dims3()?;
    let slots = heads + 2 * kv_heads;
    let d = w / slots;
    if !w.is_multiple_of(slots) || !d.is_multiple_of(2) || cos.dims2()?.1 != d || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rotary: qkv width {w} does not split into {slots} heads of an even width matching the tables {:?}",
            cos.dims()
        );
    }
    if positions.dims() != [b, t] {
        candle_core::bail!("rotary: positions {:?} for qkv {:?}", positions.dims(), qkv.dims());
    }
    let positions: Vec<u32> = positions.flatten_all()?.to_vec1()?;
    let max = cos.dims2()?.0;
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= max) {
        candle_core::bail!("rotary: position {p} is past the {max} positions of the tables");
    }
    let op = Rotate {
        rotated: heads + kv_heads,
        slots,
        d,
        positions: positions.into(),
        inverse: false,
    };
    qkv.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
}

/// The composition: narrow, negate and concatenate for `rotate_half`, broadcast products with
/// the tables gathered at the positions, then the value heads concatenated back.
pub fn rotary_packed_reference(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let slots = heads + 2 * kv_heads;
    let d = w / slots;
    let x = qkv.reshape((b, t, slots, d))?;
    let qk = x.narrow(2, 0, heads + kv_heads)?;
    let flat = positions.flatten_all()?;
    let cos = cos.index_select(&flat, 0)?.reshape((b, t, 1, d))?;
    let sin = sin.index_select(&flat, 0)?.reshape((b, t, 1, d))?;
    let qk = crate::layers::rotate(&qk, &cos, &sin)?;
    Tensor::cat(&[&qk, &x.narrow(2, heads + kv_heads, kv_heads)?], 2)?.reshape((b, t, w))
}

struct Rotate {
    /// Heads rotated at the start of each token's row (queries and keys).
    rotated: usize,
    /// Heads in a row.
    slots: usize,
    /// Head width.
    d: usize,
    /// Position of each token, (b * t); shared with the backward's inverse rotation.
    positions: std::sync::Arc<[u32]>,
    /// Rotate by the negated angles (the backward).
    inverse: bool,
}

multiversion! {
    /// Rows of `x` (`slots * d` wide) into `y`: the first `rotated` heads of row r rotated by
    /// the table row `at[r]` of `cos` and `sin` (`sign` times `sin`), the rest copied.
    fn rotate_rows(x: &[f32], y: &mut [f32], at: &[u32], cos: &[f32], sin: &[f32], rotated: usize, d: usize, sign: f32) {
        let h = d / 2;
        let w = x.len() / at.len().max(1);
        for ((xr, yr), &p) in x.chunks_exact(w).zip(y.chunks_exact_mut(w)).zip(at) {
            let (c, s) = (&cos[p as usize * d..][..h], &sin[p as usize * d..][..h]);
            let (xq, xv) = xr.split_at(rotated * d);
            let (yq, yv) = yr.split_at_mut(rotated * d);
            for (xh, yh) in xq.chunks_exact(d).zip(yq.chunks_exact_mut(d)) {
                let (x1, x2) = xh.split_at(h);
                let (y1, y2) = yh.split_at_mut(h);
                for i in 0..h {
                    let si = sign * s[i];
                    y1[i] = x1[i] * c[i] - x2[i] * si;
                    y2[i] = x2[i] * c[i] + x1[i] * si;
                }
            }
            yv.copy_from_slice(xv);
        }
    }
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "fused-rotary"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let cos = contiguous_f32(s2, l2, self.name())?;
        let sin = contiguous_f32(s3, l3, self.name())?;
        let w = self.slots * self.d;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // Every element is written: rotated heads by the rotation, the others by the copy.
        let mut y = super::written_output(x.len());
        for_each_chunk(&mut y, w, |off, y| {
            let (r0, rows) = (off / w, y.len() / w);
            rotate_rows(
                &x[off..][..y.len()],
                y,
                &self.positions[r0..][..rows],
                cos,
                sin,
                self.rotated,
                self.d,
                sign,
            );
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rotate {
            rotated: self.rotated,
            slots: self.slots,
            d: self.d,
            positions: self.positions.clone(),
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, rel_err};
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_match_the_reference() {
        // (batch, len, heads, key/value heads, head width), positions with left padding.
        for (i, (b, t, heads, kv_heads, d)) in [(1, 1, 1, 1, 2), (2, 7, 4, 2, 8), (3, 48, 8, 2, 32), (2, 33, 3, 3, 10)]
            .into_iter()
            .enumerate()
        {
            let rotary = crate::layers::Rotary::new(d, 64, 10000.0, &Device::Cpu).unwrap();
            let (cos, sin) = rotary.tables();
            let pos: Vec<u32> = (0..b)
                .flat_map(|r| (0..t as u32).map(move |j| j.saturating_sub(r as u32)))
                .collect();
            let positions = Tensor::from_vec(pos, (b, t), &Device::Cpu).unwrap();
            let w = (heads + 2 * kv_heads) * d;
            let qkv = Var::from_tensor(&random(&[b, t, w], 2.0, i as u64)).unwrap();
            let up = random(&[b, t, w], 1.0, 10 + i as u64);
            let fused = rotary_packed(qkv.as_tensor(), cos, sin, &positions, heads, kv_heads).unwrap();
            let reference = rotary_packed_reference(qkv.as_tensor(), cos, sin, &positions, heads, kv_heads).unwrap();
            let shape = format!("{b} {t} {heads}/{kv_heads} {d}");
            assert!(rel_err(&fused, &reference) < 1e-5, "{shape}");
            let gf = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel_err(gf.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
            assert!(e < 1e-5, "{shape}: {e}");
        }
    }

    #[test]
    fn a_position_past_the_tables_is_an_error() {
        let rotary = crate::layers::Rotary::new(4, 8, 10000.0, &Device::Cpu).unwrap();
        let (cos, sin) = rotary.tables();
        let qkv = random(&[1, 2, 12], 1.0, 0);
        let positions = Tensor::new(&[[0u32, 8]], &Device::Cpu).unwrap();
        let err = rotary_packed(&qkv, cos, sin, &positions, 1, 1).unwrap_err().to_string();
        assert!(err.contains("position 8"), "{err}");
    }
}
