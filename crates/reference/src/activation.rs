//! Elementwise nonlinearities of the compact-model ("golf") family: the squared (leaky) ReLU
//! of the MLP and the tanh soft cap on the logits. Each matches its PyTorch expression in
//! `bench/peers/golf.py` (`F.leaky_relu(x, slope).square()`, `cap * torch.tanh(z / cap)`).
//! And EngramHash's context gate, `torch.sigmoid((a * b).sum(-1) * scale)` per row
//! (`scripts/make_fixtures.py`).

use rayon::prelude::*;

use crate::Real;

/// `out = (x > 0 ? x : slope·x)²`; slope 0 is the plain ReLU².
pub fn relu2_forward<T: Real>(out: &mut [T], inp: &[T], slope: T) {
    out.par_iter_mut().zip(inp.par_iter()).for_each(|(y, &x)| {
        let r = if x > T::zero() { x } else { slope * x };
        *y = r * r;
    });
}

/// `dinp = dout · 2r · r'` with `r` the (leaky) ReLU of the input and `r'` its slope there.
pub fn relu2_backward<T: Real>(dinp: &mut [T], dout: &[T], inp: &[T], slope: T) {
    let two = T::one() + T::one();
    dinp.par_iter_mut()
        .zip(dout.par_iter().zip(inp.par_iter()))
        .for_each(|(dx, (&dy, &x))| {
            *dx = if x > T::zero() {
                dy * two * x
            } else {
                dy * two * slope * slope * x
            };
        });
}

/// `out = cap · tanh(inp / cap)`.
pub fn softcap_forward<T: Real>(out: &mut [T], inp: &[T], cap: T) {
    out.par_iter_mut()
        .zip(inp.par_iter())
        .for_each(|(y, &x)| *y = cap * (x / cap).tanh());
}

/// `dinp = dout · (1 − (out / cap)²)`, from the capped output the forward wrote.
pub fn softcap_backward<T: Real>(dinp: &mut [T], dout: &[T], out: &[T], cap: T) {
    dinp.par_iter_mut()
        .zip(dout.par_iter().zip(out.par_iter()))
        .for_each(|(dx, (&dy, &y))| {
            let t = y / cap;
            *dx = dy * (T::one() - t * t);
        });
}

/// `out[r] = σ(scale · Σ_c a[r, c]·b[r, c])` for each row r of `a`, `b` `(rows, dim)`.
pub fn gate_forward<T: Real>(out: &mut [T], a: &[T], b: &[T], dim: usize, scale: T) {
    out.par_iter_mut()
        .zip(a.par_chunks(dim).zip(b.par_chunks(dim)))
        .for_each(|(g, (a, b))| {
            let dot = a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y);
            *g = T::one() / (T::one() + (-(dot * scale)).exp());
        });
}

/// `ds = dout·out·(1 − out)·scale` per row; `da = ds·b`, `db = ds·a`.
#[allow(clippy::too_many_arguments)]
pub fn gate_backward<T: Real>(
    da: &mut [T],
    db: &mut [T],
    dout: &[T],
    out: &[T],
    a: &[T],
    b: &[T],
    dim: usize,
    scale: T,
) {
    da.par_chunks_mut(dim)
        .zip(db.par_chunks_mut(dim))
        .zip(dout.par_iter().zip(out.par_iter()))
        .zip(a.par_chunks(dim).zip(b.par_chunks(dim)))
        .for_each(|(((da, db), (&dg, &g)), (a, b))| {
            let ds = dg * g * (T::one() - g) * scale;
            for c in 0..dim {
                da[c] = ds * b[c];
                db[c] = ds * a[c];
            }
        });
}
