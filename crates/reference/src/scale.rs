//! Broadcast scaling by a learnable vector: `out (rows, groups, inner) = inp · s[group]`.
//! With `inner` 1 it is a per-channel scale (the golf block's attention/MLP output scales,
//! `resid_mix`, the U-Net skip weights); with `groups` = heads and `inner` = D it is the
//! per-head q gain; with one group it is a scalar (the value-residual λ).
//! PyTorch: `inp * s[None, :, None]`.

use rayon::prelude::*;

use crate::Real;
use kiln_core::backend::Accumulate;

/// `out (=|+=) inp ⊙ s`, broadcast as in the module docs.
pub fn scale_forward<T: Real>(out: &mut [T], inp: &[T], s: &[T], inner: usize, mode: Accumulate) {
    let row = s.len() * inner;
    assert_eq!(out.len(), inp.len());
    assert_eq!(
        inp.len() % row,
        0,
        "scale: input is not a whole number of rows"
    );
    out.par_chunks_mut(row)
        .zip(inp.par_chunks(row))
        .for_each(|(y, x)| {
            for (g, &sg) in s.iter().enumerate() {
                let span = g * inner..(g + 1) * inner;
                for (y, &x) in y[span.clone()].iter_mut().zip(&x[span]) {
                    match mode {
                        Accumulate::Overwrite => *y = x * sg,
                        Accumulate::Add => *y += x * sg,
                    }
                }
            }
        });
}

/// `dinp (=|+=) dout ⊙ s` and `ds[g] += Σ dout ⊙ inp` over the rows and the inner span.
pub fn scale_backward<T: Real>(
    dinp: &mut [T],
    ds: &mut [T],
    dout: &[T],
    inp: &[T],
    s: &[T],
    inner: usize,
    mode: Accumulate,
) {
    scale_forward(dinp, dout, s, inner, mode);
    let row = s.len() * inner;
    // Partial sums per chunk of rows, then a serial reduction (deterministic order).
    let partial: Vec<Vec<T>> = dout
        .par_chunks(row * 64)
        .zip(inp.par_chunks(row * 64))
        .map(|(dy, x)| {
            let mut acc = vec![T::zero(); s.len()];
            for (dy, x) in dy.chunks(row).zip(x.chunks(row)) {
                for (g, a) in acc.iter_mut().enumerate() {
                    let span = g * inner..(g + 1) * inner;
                    for (&dy, &x) in dy[span.clone()].iter().zip(&x[span]) {
                        *a += dy * x;
                    }
                }
            }
            acc
        })
        .collect();
    for acc in partial {
        for (d, a) in ds.iter_mut().zip(acc) {
            *d += a;
        }
    }
}
