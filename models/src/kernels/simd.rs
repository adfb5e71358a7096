//! Vectorisable scalar math for the fused kernels: straight-line code with no calls into libm,
//! so that loops over slices compile to SIMD.

/// AVX2 and FMA are present (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// AVX-512 (F, VL, BW, DQ) with AVX2 and FMA is present (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2_fma()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
    })
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;

/// e^x with a relative error below 2e-7 for x in [-87, 88]; smaller x gives about 0 and larger
/// x about 2e38 (inputs are clamped). The range reduction and the Horner steps are fused
/// multiply-adds, as in [`tanh`]: a softmax or log-softmax row is bound by this arithmetic.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // y holds n = round(x log2 e) in its low mantissa bits.
    let y = x.mul_add(LOG2E, ROUND);
    let n = y - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    // Taylor series of e^r on |r| <= ln2/2, degree 7.
    let mut p = r.mul_add(1.0 / 5040.0, 1.0 / 720.0);
    p = r.mul_add(p, 1.0 / 120.0);
    p = r.mul_add(p, 1.0 / 24.0);
    p = r.mul_add(p, 1.0 / 6.0);
    p = r.mul_add(p, 0.5);
    p = r.mul_add(p, 1.0);
    p = r.mul_add(p, 1.0);
    // 2^n from the bits of y (n in [-126, 127] after the clamp): integer operations only, as a
    // float-to-int cast saturates and would take several instructions a lane.
    let scale = f32::from_bits(y.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// tanh(x), absolute error below 3e-7: the odd rational minimax approximation (degree 13 over
/// degree 6 in x) that Eigen uses for f32, one division and no exponential. The Horner steps
/// are fused multiply-adds (one rounding each, the same bits in every copy of a kernel; a CPU
/// without FMA gets them from libm, exact but slow): GELU's forward, which is bound by this
/// arithmetic, runs about a fifth faster than with separate products and sums.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.760_768_5e-16, 2.000_188e-13);
    p = x2.mul_add(p, -8.604_672e-11);
    p = x2.mul_add(p, 5.122_297e-8);
    p = x2.mul_add(p, 1.485_722_4e-5);
    p = x2.mul_add(p, 6.372_619_3e-4);
    p = x2.mul_add(p, 4.893_524_6e-3);
    let mut q = x2.mul_add(1.198_258_4e-6, 1.185_347e-4);
    q = x2.mul_add(q, 2.268_434_6e-3);
    q = x2.mul_add(q, 4.893_525e-3);
    x * p / q
}

/// ln(x) for finite x > 0, relative error below 3e-7.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln x = e ln2 + ln m, ln m = 2 atanh(s),
    // s = (m - 1) / (m + 1), |s| <= 0.1716.
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))));
    e as f32 * std::f32::consts::LN_2 + series
}

/// Independent accumulators of the lane reductions below: a serial f32 sum or max is one
/// dependency chain that cannot vectorise (f32 addition is not associative), so these keep
/// `LANES` partial results and combine them at the end.
pub const LANES: usize = 16;

/// The sum of [`LANES`] partial sums, as a tree of depth 4: summed in order they are a chain
/// of 15 dependent additions, which on a short row (a norm over 64 columns) costs more than the
/// row's vector work.
#[inline(always)]
pub fn lane_sum(a: [f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for k in 0..LANES / 2 {
        h[k] = a[k] + a[k + LANES / 2];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The maximum of [`LANES`] partial maxima, as a tree like [`lane_sum`]'s.
#[inline(always)]
pub fn lane_max(a: [f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for k in 0..LANES / 2 {
        h[k] = a[k].max(a[k + LANES / 2]);
    }
    let q = [h[0].max(h[4]), h[1].max(h[5]), h[2].max(h[6]), h[3].max(h[7])];
    q[0].max(q[2]).max(q[1].max(q[3]))
}

/// `sum_i f(x[i])`, summed in [`LANES`] lanes.
#[inline(always)]
pub fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let s = chunks.remainder().iter().map(|&v| f(v)).sum::<f32>();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k]);
        }
    }
    s + lane_sum(acc)
}

/// The two sums `sum_i f(a[i], b[i], c[i])`, summed in [`LANES`] lanes.
#[inline(always)]
pub fn sum2_map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> (f32, f32)) -> (f32, f32) {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let (mut acc0, mut acc1) = ([0f32; LANES], [0f32; LANES]);
    let whole = n / LANES * LANES;
    for ((a, b), c) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
        .zip(c[..whole].chunks_exact(LANES))
    {
        for k in 0..LANES {
            let (x, y) = f(a[k], b[k], c[k]);
            acc0[k] += x;
            acc1[k] += y;
        }
    }
    let (mut s0, mut s1) = (0f32, 0f32);
    for i in whole..n {
        let (x, y) = f(a[i], b[i], c[i]);
        s0 += x;
        s1 += y;
    }
    (s0 + lane_sum(acc0), s1 + lane_sum(acc1))
}

/// `max_i x[i]` (`-inf` for an empty slice), in [`LANES`] lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    m.max(lane_max(acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_tanh_ln_match_libm() {
        let mut worst = (0f32, 0f32, 0f32);
        let mut x = -30.0f32;
        while x < 30.0 {
            let e = ((exp(x) - x.exp()) / x.exp()).abs();
            let t = (tanh(x) - x.tanh()).abs();
            worst.0 = worst.0.max(e);
            worst.1 = worst.1.max(t);
            if x > 0.0 {
                worst.2 = worst.2.max(((ln(x) - x.ln()) / x.ln().abs().max(1.0)).abs());
            }
            x += 0.000_731;
        }
        assert!(worst.0 < 4e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 4e-7, "tanh absolute error {}", worst.1);
        assert!(worst.2 < 4e-7, "ln error {}", worst.2);
        assert!((0.0..1e-37).contains(&exp(-200.0)));
        assert!(exp(200.0).is_finite() && exp(200.0) > 1e38);
    }

    #[test]
    fn lane_reductions_match_serial_ones() {
        for n in [0usize, 1, 15, 16, 17, 48, 256, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.0).collect();
            let serial: f32 = a.iter().map(|v| v * v).sum();
            assert!((sum_map(&a, |v| v * v) - serial).abs() <= 1e-5 * serial.max(1.0), "{n}");
            let (s0, s1) = sum2_map3(&a, &b, &a, |x, y, z| (x * y, y + z));
            let (r0, r1): (f32, f32) = (
                a.iter().zip(&b).map(|(x, y)| x * y).sum(),
                b.iter().zip(&a).map(|(y, z)| y + z).sum(),
            );
            assert!(
                (s0 - r0).abs() <= 1e-4 * r0.abs().max(1.0) && (s1 - r1).abs() <= 1e-4 * r1.abs().max(1.0),
                "{n}"
            );
            assert_eq!(max(&a), a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)), "{n}");
        }
    }
}
