//! Matrix products of a linear layer, forward and backward (llm.c `matmul_forward` /
//! `matmul_backward`), on `matrixmultiply`'s blocked GEMM.

use crate::Real;
use kiln_core::backend::Accumulate;

/// `out (rows, out_dim) = inp (rows, in_dim) · weight (out_dim, in_dim)ᵀ`.
pub fn matmul_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    assert_eq!(out.len(), rows * out_dim);
    assert_eq!(inp.len(), rows * in_dim);
    assert_eq!(weight.len(), out_dim * in_dim);
    // B = weightᵀ: element (k, j) is weight[j * in_dim + k].
    T::gemm(
        rows,
        in_dim,
        out_dim,
        inp,
        in_dim,
        1,
        weight,
        1,
        in_dim,
        T::zero(),
        out,
        out_dim,
    );
}

/// `dinp (rows, in_dim) =/+= dout · weight` and `dweight (out_dim, in_dim) += doutᵀ · inp`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    dinp_mode: Accumulate,
) {
    assert_eq!(dinp.len(), rows * in_dim);
    assert_eq!(dweight.len(), out_dim * in_dim);
    assert_eq!(dout.len(), rows * out_dim);
    assert_eq!(inp.len(), rows * in_dim);
    assert_eq!(weight.len(), out_dim * in_dim);
    let beta = match dinp_mode {
        Accumulate::Overwrite => T::zero(),
        Accumulate::Add => T::one(),
    };
    T::gemm(
        rows, out_dim, in_dim, dout, out_dim, 1, weight, in_dim, 1, beta, dinp, in_dim,
    );
    // A = doutᵀ: element (i, r) is dout[r * out_dim + i].
    T::gemm(
        out_dim,
        rows,
        in_dim,
        dout,
        1,
        out_dim,
        inp,
        in_dim,
        1,
        T::one(),
        dweight,
        in_dim,
    );
}
