//! Helpers shared by the `rl_*` integration tests: tensor construction, closeness checks and
//! a finite-difference gradient checker (f64).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

pub const CPU: Device = Device::Cpu;

/// A `(rows.len(), rows[0].len())` f64 tensor.
pub fn t2(rows: &[&[f64]]) -> Tensor {
    let b = rows.len();
    let l = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (b, l), &CPU).unwrap()
}

/// A 1-D f64 tensor.
pub fn t1(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &CPU).unwrap()
}

/// The mask of right-padded rows with the given lengths, f64.
pub fn mask_of(lens: &[usize], len: usize) -> Tensor {
    let flat: Vec<f64> = lens
        .iter()
        .flat_map(|&l| (0..len).map(move |t| if t < l { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(flat, (lens.len(), len), &CPU).unwrap()
}

pub fn v1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

pub fn v2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

pub fn s(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

#[track_caller]
pub fn close(a: f64, b: f64, tol: f64) {
    assert!(
        (a - b).abs() <= tol * (1.0 + b.abs()),
        "{a} vs expected {b} (tol {tol})"
    );
}

#[track_caller]
pub fn close_v(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "lengths differ: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{a:?} vs expected {b:?} (tol {tol})"
        );
    }
}

#[track_caller]
pub fn close_v2(a: &[Vec<f64>], b: &[&[f64]], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        close_v(x, y, tol);
    }
}

/// Checks the gradient of the scalar `f(x)` at `x0` (f64, any shape) against central finite
/// differences, entry by entry.
#[track_caller]
pub fn check_grad<F>(f: F, x0: &Tensor, tol: f64)
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let x0 = x0.to_dtype(DType::F64).unwrap();
    let shape = x0.shape().clone();
    let var = Var::from_tensor(&x0).unwrap();
    let y = f(var.as_tensor()).unwrap();
    assert_eq!(y.rank(), 0, "f must return a scalar");
    let grads = y.backward().unwrap();
    let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
        None => vec![0.0; shape.elem_count()],
    };
    let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let eval = |d: f64| {
            let mut x = base.clone();
            x[i] += d;
            let xt = Tensor::from_vec(x, shape.clone(), &CPU).unwrap();
            s(&f(&xt).unwrap())
        };
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (analytic[i] - numeric).abs() <= tol * (1.0 + numeric.abs()),
            "d f / d x[{i}]: analytic {} vs finite difference {numeric}",
            analytic[i]
        );
    }
}

/// Deterministic pseudo-random numbers in `[lo, hi)` (xorshift), for fixed test inputs.
pub fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lo + (hi - lo) * ((x >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}
