//! The vendored candle-core's backward pass (`vendor/README.md`) accumulates gradients without
//! a zero-filled buffer, and passes a transposed matmul operand's gradient straight to the
//! transposed tensor. These graphs give tensors several consumers, transposed and broadcast
//! uses, and check every gradient against one worked out by hand. The matmul's own patches
//! (padded and transposed operands) are checked against products of contiguous copies.

use candle_core::{Device, Tensor, Var};

fn close(a: &Tensor, b: &Tensor) {
    let (a, b) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} != {b:?}");
    }
}

#[test]
fn gradients_of_a_tensor_with_several_consumers_add_up() {
    let dev = Device::Cpu;
    // loss = sum(x @ w^T) + sum(x * 3) + sum(x + b) with b broadcast over rows.
    let x = Var::from_vec((0..6).map(|i| i as f32 * 0.5 - 1.0).collect(), (2, 3), &dev).unwrap();
    let w = Var::from_vec((0..12).map(|i| (i as f32).sin()).collect(), (4, 3), &dev).unwrap();
    let b = Var::from_vec(vec![0.1f32, -0.2, 0.3], 3, &dev).unwrap();
    let mm = x
        .as_tensor()
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let scaled = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
    let shifted = x.as_tensor().broadcast_add(b.as_tensor()).unwrap().sum_all().unwrap();
    let loss = ((mm + scaled).unwrap() + shifted).unwrap();
    let grads = loss.backward().unwrap();

    // d/dx = column sums of w (same for every row) + 3 + 1.
    let w_col = w.as_tensor().sum(0).unwrap();
    let gx = (w_col.unsqueeze(0).unwrap().broadcast_as((2, 3)).unwrap() + 4.0).unwrap();
    close(grads.get(x.as_tensor()).unwrap(), &gx);
    // d/dw = column sums of x, for every row of w; d/db = number of rows.
    let x_col = x.as_tensor().sum(0).unwrap();
    close(
        grads.get(w.as_tensor()).unwrap(),
        &x_col.unsqueeze(0).unwrap().broadcast_as((4, 3)).unwrap(),
    );
    close(
        grads.get(b.as_tensor()).unwrap(),
        &Tensor::new(&[2f32, 2., 2.], &dev).unwrap(),
    );
    // Every stored gradient is contiguous, as upstream's `zeros + grad` made it.
    for v in [&x, &w, &b] {
        assert!(grads.get(v.as_tensor()).unwrap().is_contiguous());
    }
}

#[test]
fn a_single_consumer_gradient_is_the_upstream_gradient_itself() {
    let dev = Device::Cpu;
    let x = Var::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &dev).unwrap();
    // A transposed use only: the stored gradient is the transposed upstream one, contiguous.
    let c = Tensor::new(&[[1f32, 10.], [100., 1000.]], &dev).unwrap();
    let loss = (x.as_tensor().t().unwrap() * &c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![1., 100.], vec![10., 1000.]]);
}

/// The matmul copies an operand read down its columns, with columns 4 KiB apart, to a padded
/// stride first (`vendor/README.md`): the products equal those of contiguous copies, for lhs,
/// rhs, both, and a batch.
#[test]
fn products_of_operands_with_4kib_column_strides_match_contiguous_ones() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (40, 1024), &dev).unwrap();
    let y = Tensor::randn(0f32, 1.0, (40, 24), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (24, 1024), &dev).unwrap();
    // lhs (1024, 40) with row stride 1 and column stride 1024.
    let xt = x.t().unwrap();
    close(&xt.matmul(&y).unwrap(), &xt.contiguous().unwrap().matmul(&y).unwrap());
    // rhs (1024, 24) likewise.
    let wt = w.t().unwrap();
    close(&x.matmul(&wt).unwrap(), &x.matmul(&wt.contiguous().unwrap()).unwrap());
    // Both at once: (1024, 40) x (40, 1024)^T^T.
    let a = Tensor::randn(0f32, 1.0, (40, 1024), &dev).unwrap().t().unwrap();
    let b = Tensor::randn(0f32, 1.0, (1024, 40), &dev).unwrap().t().unwrap();
    close(
        &b.matmul(&a).unwrap(),
        &b.contiguous().unwrap().matmul(&a.contiguous().unwrap()).unwrap(),
    );
    // A batch of transposed lhs blocks.
    let xb = Tensor::randn(0f32, 1.0, (3, 40, 1024), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let yb = Tensor::randn(0f32, 1.0, (3, 40, 24), &dev).unwrap();
    close(&xb.matmul(&yb).unwrap(), &xb.contiguous().unwrap().matmul(&yb).unwrap());
}

/// The matmul transposes an rhs that is the transpose of a row-major matrix (`x.matmul(&w.t())`,
/// `dY Wᵀ`) back to row-major before the product (`vendor/README.md`). The products are
/// bit-identical to those of contiguous copies and to upstream's path: shapes with partial
/// 16 x 16 blocks on every side, two rows, a row stride wider than the row, a batch of
/// transposed blocks, and a transposed rhs shared by every batch. (A single row is left to
/// gemm, whose one-row product with a strided rhs sums in another order than with a
/// contiguous one, as upstream.)
#[test]
fn products_with_a_transposed_rhs_equal_those_of_contiguous_copies() {
    let dev = Device::Cpu;
    let exact = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    };
    for (m, k, n) in [(32, 16, 16), (100, 37, 53), (768, 256, 300), (2, 64, 64), (64, 300, 17)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = w.t().unwrap();
        exact(&x.matmul(&wt).unwrap(), &x.matmul(&wt.contiguous().unwrap()).unwrap());
    }
    // Upstream's path, gemm packing the view itself, gives the same bits. (Switched for the
    // whole process: other tests' products are bit-identical either way.)
    let x = Tensor::randn(0f32, 1.0, (100, 37), &dev).unwrap();
    let wt = Tensor::randn(0f32, 1.0, (53, 37), &dev).unwrap().t().unwrap();
    let transposed_first = x.matmul(&wt).unwrap();
    candle_core::cpu_backend::set_transpose_rhs(false);
    let packed_by_gemm = x.matmul(&wt).unwrap();
    candle_core::cpu_backend::set_transpose_rhs(true);
    exact(&transposed_first, &packed_by_gemm);
    // A row stride wider than k: the transpose of a narrowed matrix.
    let x = Tensor::randn(0f32, 1.0, (48, 40), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (33, 64), &dev)
        .unwrap()
        .narrow(1, 8, 40)
        .unwrap();
    let wt = w.t().unwrap();
    exact(&x.matmul(&wt).unwrap(), &x.matmul(&wt.contiguous().unwrap()).unwrap());
    // A batch of transposed rhs blocks, and one transposed rhs broadcast over the batch.
    let xb = Tensor::randn(0f32, 1.0, (3, 40, 48), &dev).unwrap();
    let wb = Tensor::randn(0f32, 1.0, (3, 20, 48), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    exact(&xb.matmul(&wb).unwrap(), &xb.matmul(&wb.contiguous().unwrap()).unwrap());
    let w1 = Tensor::randn(0f32, 1.0, (20, 48), &dev).unwrap().t().unwrap();
    exact(
        &xb.broadcast_matmul(&w1).unwrap(),
        &xb.broadcast_matmul(&w1.contiguous().unwrap()).unwrap(),
    );
    // The same with batches of lhs that do not stack into one matrix (rows 64 apart, 48
    // wide): one product per batch, the shared rhs transposed once.
    let xn = Tensor::randn(0f32, 1.0, (3, 40, 64), &dev)
        .unwrap()
        .narrow(2, 0, 48)
        .unwrap();
    exact(
        &xn.broadcast_matmul(&w1).unwrap(),
        &xn.broadcast_matmul(&w1.contiguous().unwrap()).unwrap(),
    );
}

/// A matmul operand that is `a.t()` passes its gradient to `a` directly, computed in `a`'s
/// layout (`vendor/README.md`): the gradients equal `lhs^T grad` / `grad rhs^T` transposed,
/// arrive contiguous, and add up with those of the transpose's other consumers. Covers a
/// transposed rhs (`nn.Linear`), a transposed lhs, a transpose used twice, and a batch.
#[test]
fn gradients_through_transposed_matmul_operands_land_on_the_transposed_tensor() {
    let dev = Device::Cpu;
    let vals = |n: usize, f: f32| (0..n).map(|i| ((i as f32) * f).sin()).collect::<Vec<f32>>();
    // loss = sum(g * (x @ w^T)) + sum(h * (w^T @ y)) + sum(v^T @ z) with fixed weights g, h.
    let x = Var::from_vec(vals(15, 0.7), (5, 3), &dev).unwrap();
    let w = Var::from_vec(vals(12, 1.3), (4, 3), &dev).unwrap();
    let y = Var::from_vec(vals(8, 0.4), (4, 2), &dev).unwrap();
    let v = Var::from_vec(vals(2 * 4 * 3, 0.9), (2, 4, 3), &dev).unwrap();
    let z = Var::from_vec(vals(2 * 4 * 2, 1.1), (2, 4, 2), &dev).unwrap();
    let g = Tensor::from_vec(vals(20, 2.1), (5, 4), &dev).unwrap();
    let h = Tensor::from_vec(vals(6, 0.3), (3, 2), &dev).unwrap();
    let wt = w.as_tensor().t().unwrap();
    let a = (x.as_tensor().matmul(&wt).unwrap() * &g).unwrap().sum_all().unwrap();
    let b = (wt.matmul(y.as_tensor()).unwrap() * &h).unwrap().sum_all().unwrap();
    let c = v
        .as_tensor()
        .t()
        .unwrap()
        .matmul(z.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = ((a + b).unwrap() + c).unwrap().backward().unwrap();

    // d/dw = g^T x (from a) + (h y^T)^T (from b, whose gradient in w^T is h y^T).
    let gw = (g.t().unwrap().matmul(x.as_tensor()).unwrap() + y.as_tensor().matmul(&h.t().unwrap()).unwrap()).unwrap();
    let gx = g.matmul(w.as_tensor()).unwrap();
    let gy = w.as_tensor().matmul(&h).unwrap();
    // c = sum over batches of v_b^T z_b: d/dv_b = z_b 1^T (rows of z summed per column), d/dz_b = v_b 1.
    let gv = z.as_tensor().sum_keepdim(2).unwrap().broadcast_as((2, 4, 3)).unwrap();
    let gz = v.as_tensor().sum_keepdim(2).unwrap().broadcast_as((2, 4, 2)).unwrap();
    for (var, want) in [(&w, &gw), (&x, &gx), (&y, &gy), (&v, &gv), (&z, &gz)] {
        let got = grads.get(var.as_tensor()).unwrap();
        assert!(
            got.is_contiguous(),
            "gradient of shape {:?} is not contiguous",
            got.dims()
        );
        close(got, want);
    }
}
