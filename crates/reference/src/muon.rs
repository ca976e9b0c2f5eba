//! Muon (Keller Jordan): momentum SGD whose update is orthogonalised by a Newton–Schulz
//! iteration, for the 2-D matrices of the blocks. Written to match the parameter-golf
//! baseline's `Muon` and `zeropower_via_newtonschulz5` (train_gpt.py) step for step, except
//! that the iteration runs in f32 here where the baseline uses bf16:
//!
//! ```text
//! buf ← μ·buf + g                      (g already multiplied by grad_scale)
//! u   ← nesterov ? g + μ·buf : buf
//! uᵢ  ← uᵢ / max(‖uᵢ‖, 1e-7)          (row_normalize, MuonEq-R: each row i)
//! X   ← u / (‖u‖_F + 1e-7), transposed to (short side, long side)
//! 5×: A ← X·Xᵀ;  B ← b·A + c·A·A;  X ← a·X + B·X      (a, b, c) = (3.4445, −4.7750, 2.0315)
//! p   ← p·(1 − lr·wd) − lr·√max(1, rows/cols)·X
//! ```

use crate::Real;
use kiln_core::backend::MuonStep;

/// The quintic Newton–Schulz coefficients (a, b, c) of the baseline.
pub const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// `out (rows, cols)`: the Newton–Schulz approximation of `U·Vᵀ` for `g = U·S·Vᵀ`.
pub fn newton_schulz<T: Real>(out: &mut [T], g: &[T], rows: usize, cols: usize, steps: usize) {
    assert_eq!(g.len(), rows * cols);
    assert_eq!(out.len(), rows * cols);
    let norm = g.iter().fold(T::zero(), |s, &x| s + x * x).sqrt();
    let inv = T::one() / (norm + T::from_f64(1e-7).unwrap());
    // Work on X (r, k) with r the short side: the Gram matrix is then the small one.
    let transposed = rows > cols;
    let (r, k) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let mut x = vec![T::zero(); r * k];
    for i in 0..rows {
        for j in 0..cols {
            let at = if transposed { j * k + i } else { i * k + j };
            x[at] = g[i * cols + j] * inv;
        }
    }
    let f = |v: f64| T::from_f64(v).unwrap();
    let (a, b, c) = (
        f(NS_COEFFICIENTS.0),
        f(NS_COEFFICIENTS.1),
        f(NS_COEFFICIENTS.2),
    );
    let mut gram = vec![T::zero(); r * r];
    let mut poly = vec![T::zero(); r * r];
    let mut bx = vec![T::zero(); r * k];
    for _ in 0..steps {
        // gram = X·Xᵀ
        T::gemm(r, k, r, &x, k, 1, &x, 1, k, T::zero(), &mut gram, r);
        // poly = c·gram·gram + b·gram
        T::gemm(r, r, r, &gram, r, 1, &gram, 1, r, T::zero(), &mut poly, r);
        for (p, &s) in poly.iter_mut().zip(&gram) {
            *p = c * *p + b * s;
        }
        // X = a·X + poly·X
        T::gemm(r, r, k, &poly, r, 1, &x, k, 1, T::zero(), &mut bx, k);
        for (xv, &d) in x.iter_mut().zip(&bx) {
            *xv = a * *xv + d;
        }
    }
    for i in 0..rows {
        for j in 0..cols {
            let at = if transposed { j * k + i } else { i * k + j };
            out[i * cols + j] = x[at];
        }
    }
}

/// One Muon update of the matrix `params (rows, cols)` with momentum buffer `buf`.
pub fn muon_step<T: Real>(
    params: &mut [T],
    grads: &[T],
    buf: &mut [T],
    rows: usize,
    cols: usize,
    hp: &MuonStep,
) {
    let f = |v: f32| T::from_f32(v).unwrap();
    let (mu, scale) = (f(hp.momentum), f(hp.grad_scale));
    let mut update = vec![T::zero(); grads.len()];
    for ((u, b), &g) in update.iter_mut().zip(buf.iter_mut()).zip(grads) {
        let g = g * scale;
        *b = mu * *b + g;
        *u = if hp.nesterov { g + mu * *b } else { *b };
    }
    if hp.row_normalize {
        normalize_rows(&mut update, cols);
    }
    let mut ortho = vec![T::zero(); grads.len()];
    newton_schulz(&mut ortho, &update, rows, cols, hp.ns_steps);
    let aspect = (rows as f64 / cols as f64).max(1.0).sqrt();
    let step = f(hp.learning_rate) * T::from_f64(aspect).unwrap();
    let decay = T::one() - f(hp.learning_rate) * f(hp.weight_decay);
    for (p, &o) in params.iter_mut().zip(&ortho) {
        *p = *p * decay - step * o;
    }
}

/// MuonEq-R's equilibration: each row of `m (rows, cols)` divided by its L2 norm, at least
/// 1e-7 (an all-zero row, a dormant unit's, stays zero rather than NaN).
pub fn normalize_rows<T: Real>(m: &mut [T], cols: usize) {
    let floor = T::from_f64(1e-7).unwrap();
    for row in m.chunks_mut(cols) {
        let norm = row.iter().fold(T::zero(), |s, &x| s + x * x).sqrt();
        let inv = T::one() / norm.max(floor);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}
