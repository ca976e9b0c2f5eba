//! Muon on the CPU backend: the reference backend's `muon.rs` is the recurrence (momentum,
//! Nesterov, five quintic Newton–Schulz iterations, the aspect-ratio scale); here the three
//! products of each iteration are the backend's GEMMs, in its precision: bf16 inputs where
//! the tier has them (as the parameter-golf baseline runs Newton–Schulz in bf16), f32
//! elsewhere. X is kept as (short side, long side), so the Gram matrix is the small one;
//! the transposes are strides, not copies.

use kiln_core::backend::{MatrixShape, MuonStep};
use kiln_reference::muon::NS_COEFFICIENTS;

use crate::gemm::Mat;
use crate::CpuBackend;

/// One Muon update of `params (rows, cols)` with momentum buffer `buf`.
pub fn step(
    backend: &CpuBackend,
    params: &mut [f32],
    grads: &[f32],
    buf: &mut [f32],
    s: MatrixShape,
    hp: &MuonStep,
) {
    let (rows, cols) = (s.rows, s.cols);
    let (mu, scale) = (hp.momentum, hp.grad_scale);
    let mut update = vec![0f32; grads.len()];
    for ((u, b), &g) in update.iter_mut().zip(buf.iter_mut()).zip(grads) {
        let g = g * scale;
        *b = mu * *b + g;
        *u = if hp.nesterov { g + mu * *b } else { *b };
    }
    if hp.row_normalize {
        // MuonEq-R, as the reference's `normalize_rows`; each row's sum in f64.
        for row in update.chunks_mut(cols) {
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
            let inv = 1.0 / norm.max(1e-7);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
    let norm = update
        .iter()
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt() as f32;
    let inv = 1.0 / (norm + 1e-7);
    // X (r, k), r the short side: element (i, j) of X is update[i, j] or update[j, i].
    let transposed = rows > cols;
    let (r, k) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let mut x = vec![0f32; r * k];
    for i in 0..rows {
        for j in 0..cols {
            let at = if transposed { j * k + i } else { i * k + j };
            x[at] = update[i * cols + j] * inv;
        }
    }
    let (a, b, c) = (
        NS_COEFFICIENTS.0 as f32,
        NS_COEFFICIENTS.1 as f32,
        NS_COEFFICIENTS.2 as f32,
    );
    let (mut gram, mut poly, mut bx) = (vec![0f32; r * r], vec![0f32; r * r], vec![0f32; r * k]);
    for _ in 0..hp.ns_steps {
        // gram = X·Xᵀ
        let xm = Mat {
            data: &x,
            rs: k,
            cs: 1,
        };
        let xt = Mat {
            data: &x,
            rs: 1,
            cs: k,
        };
        backend.gemm(r, r, k, xm, xt, &mut gram, false);
        // poly = c·gram·gram + b·gram
        let gm = Mat {
            data: &gram,
            rs: r,
            cs: 1,
        };
        backend.gemm(r, r, r, gm, gm, &mut poly, false);
        for (p, &g) in poly.iter_mut().zip(&gram) {
            *p = c * *p + b * g;
        }
        // X = a·X + poly·X
        let pm = Mat {
            data: &poly,
            rs: r,
            cs: 1,
        };
        backend.gemm(r, k, r, pm, xm, &mut bx, false);
        for (xv, &d) in x.iter_mut().zip(&bx) {
            *xv = a * *xv + d;
        }
    }
    let aspect = (rows as f64 / cols as f64).max(1.0).sqrt() as f32;
    let lr_step = hp.learning_rate * aspect;
    let decay = 1.0 - hp.learning_rate * hp.weight_decay;
    for i in 0..rows {
        for j in 0..cols {
            let at = if transposed { j * k + i } else { i * k + j };
            let p = &mut params[i * cols + j];
            *p = *p * decay - lr_step * x[at];
        }
    }
}
