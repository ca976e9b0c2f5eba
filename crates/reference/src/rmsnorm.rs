//! RMSNorm with a learned gain (Llama): `y = x / sqrt(mean(x²) + eps) * w`.

use rayon::prelude::*;

use crate::Real;
use kiln_core::backend::Accumulate;

/// `out (rows, dim)`, `rstd (rows)` from `inp (rows, dim)` and `weight (dim)`.
pub fn rmsnorm_forward<T: Real>(
    out: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    dim: usize,
    eps: T,
) {
    assert_eq!(out.len(), inp.len());
    assert_eq!(rstd.len() * dim, inp.len());
    assert_eq!(weight.len(), dim);
    out.par_chunks_mut(dim)
        .zip(rstd.par_iter_mut())
        .zip(inp.par_chunks(dim))
        .for_each(|((y, r), x)| {
            let mean_square = x.iter().map(|&v| v * v).fold(T::zero(), |a, b| a + b)
                / T::from_usize(dim).unwrap();
            let s = T::one() / (mean_square + eps).sqrt();
            *r = s;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * s * w;
            }
        });
}

/// With `x̂ = x · rstd` and `g = dout · w`:
/// `dx = rstd · (g − x̂ · mean(g · x̂))`, `dw += Σ_rows dout · x̂`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    rstd: &[T],
    dim: usize,
    dinp_mode: Accumulate,
) {
    assert_eq!(dinp.len(), inp.len());
    assert_eq!(dout.len(), inp.len());
    assert_eq!(dweight.len(), dim);
    let n = T::from_usize(dim).unwrap();
    dinp.par_chunks_mut(dim)
        .zip(dout.par_chunks(dim))
        .zip(inp.par_chunks(dim))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), x), &s)| {
            let mut dot = T::zero();
            for i in 0..dim {
                dot += dy[i] * weight[i] * x[i] * s;
            }
            let mean = dot / n;
            for i in 0..dim {
                let g = dy[i] * weight[i] * s - x[i] * s * s * mean;
                match dinp_mode {
                    Accumulate::Overwrite => dx[i] = g,
                    Accumulate::Add => dx[i] += g,
                }
            }
        });
    for ((dy, x), &s) in dout.chunks_exact(dim).zip(inp.chunks_exact(dim)).zip(rstd) {
        for i in 0..dim {
            dweight[i] += dy[i] * x[i] * s;
        }
    }
}
