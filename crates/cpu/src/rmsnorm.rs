//! RMSNorm and its backward, vectorized (the reference backend's `rmsnorm.rs` is the formula):
//! `y = x · rstd · w` with `rstd = 1/√(mean(x²) + eps)`; backward with `x̂ = x · rstd`,
//! `g = dy · w`: `dx (=|+=) rstd · (g − x̂ · mean(g · x̂))`, `dw += Σ_rows dy · x̂`. Rows go out
//! over the pool in blocks; each block sums its own `dw` and the blocks' sums are added in
//! order at the end. Accumulation rule: `dw` accumulates (a parameter gradient), `dx` per
//! the call's mode.

use kiln_core::backend::{Accumulate, NormShape};
use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;
use crate::simd::dot;

/// Rows per task.
const ROWS: usize = 32;

#[allow(clippy::too_many_arguments)]
pub fn forward(
    isa: Isa,
    pool: &ThreadPool,
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    s: NormShape,
) {
    let dim = s.dim;
    assert!(inp.len() == s.rows * dim && out.len() == inp.len() && rstd.len() == s.rows);
    assert_eq!(weight.len(), dim);
    let (o, r) = (SharedMut::new(out), SharedMut::new(rstd));
    pool.run(s.rows.div_ceil(ROWS), &|block| {
        let (r0, r1) = (block * ROWS, ((block + 1) * ROWS).min(s.rows));
        // SAFETY: this block's rows of out and rstd belong to this task.
        let (y, rs) = unsafe { (o.slice(r0 * dim, (r1 - r0) * dim), r.slice(r0, r1 - r0)) };
        forward_rows(isa, y, rs, &inp[r0 * dim..r1 * dim], weight, s.eps);
    });
}

tiered!(
    /// Whole rows of the forward.
    fn forward_rows(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], eps: f32) {
        let dim = weight.len();
        let rows = out.chunks_exact_mut(dim).zip(inp.chunks_exact(dim));
        for ((y, x), r) in rows.zip(rstd.iter_mut()) {
            let scale = 1.0 / (dot(x, x) / dim as f32 + eps).sqrt();
            *r = scale;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * scale * w;
            }
        }
    }
);

#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    pool: &ThreadPool,
    dinp: &mut [f32],
    dweight: &mut [f32],
    (dout, inp, weight, rstd): (&[f32], &[f32], &[f32], &[f32]),
    s: NormShape,
    mode: Accumulate,
) {
    let dim = s.dim;
    assert!(inp.len() == s.rows * dim && dout.len() == inp.len() && dinp.len() == inp.len());
    assert!(weight.len() == dim && dweight.len() == dim && rstd.len() == s.rows);
    let blocks = s.rows.div_ceil(ROWS);
    let mut partial = vec![0f32; blocks * dim];
    let (dx_out, dw_out) = (SharedMut::new(dinp), SharedMut::new(&mut partial));
    pool.run(blocks, &|block| {
        let (r0, r1) = (block * ROWS, ((block + 1) * ROWS).min(s.rows));
        let span = r0 * dim..r1 * dim;
        // SAFETY: this block's rows of dx and its own partial dw belong to this task.
        let (dx, dw) = unsafe {
            (
                dx_out.slice(r0 * dim, (r1 - r0) * dim),
                dw_out.slice(block * dim, dim),
            )
        };
        let inputs = (&dout[span.clone()], &inp[span], weight, &rstd[r0..r1]);
        backward_rows(isa, dx, dw, inputs, mode);
    });
    for block in partial.chunks_exact(dim) {
        for (d, &p) in dweight.iter_mut().zip(block) {
            *d += p;
        }
    }
}

tiered!(
    /// Whole rows of the backward: `dx` per `mode`, `dw +=`.
    fn backward_rows(
        dx: &mut [f32],
        dw: &mut [f32],
        inputs: (&[f32], &[f32], &[f32], &[f32]),
        mode: Accumulate,
    ) {
        let (dout, inp, weight, rstd) = inputs;
        let dim = weight.len();
        let mut g = vec![0f32; dim];
        let rows = dx.chunks_exact_mut(dim).zip(dout.chunks_exact(dim));
        for (((dx, dy), x), &scale) in rows.zip(inp.chunks_exact(dim)).zip(rstd) {
            for ((gi, &d), &w) in g.iter_mut().zip(dy).zip(weight) {
                *gi = d * w;
            }
            let mean = dot(&g, x) * scale / dim as f32;
            for i in 0..dim {
                let v = g[i] * scale - x[i] * scale * scale * mean;
                match mode {
                    Accumulate::Overwrite => dx[i] = v,
                    Accumulate::Add => dx[i] += v,
                }
                dw[i] += dy[i] * x[i] * scale;
            }
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Several row blocks (the conformance cases fit in one), both modes, against the
    /// reference kernels in f64.
    #[test]
    fn blocks_match_the_reference() {
        let s = NormShape {
            rows: 3 * ROWS + 5,
            dim: 37,
            eps: 1e-5,
        };
        let n = s.rows * s.dim;
        let val = |i: usize, m: usize| ((i * m) % 101) as f32 / 50.0 - 1.0;
        let x: Vec<f32> = (0..n).map(|i| val(i, 7)).collect();
        let dy: Vec<f32> = (0..n).map(|i| val(i, 13)).collect();
        let w: Vec<f32> = (0..s.dim).map(|i| val(i, 3) + 1.5).collect();
        let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, dy64, w64) = (wide(&x), wide(&dy), wide(&w));
        let (mut want_y, mut want_r) = (vec![0.0; n], vec![0.0; s.rows]);
        kiln_reference::rmsnorm::rmsnorm_forward(&mut want_y, &mut want_r, &x64, &w64, s.dim, 1e-5);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if kiln_core::cpu::features().missing(isa).is_some() {
                continue;
            }
            let pool = ThreadPool::new(2);
            let (mut y, mut r) = (vec![0f32; n], vec![0f32; s.rows]);
            forward(isa, &pool, &mut y, &mut r, &x, &w, s);
            close(&y, &want_y);
            close(&r, &want_r);
            for mode in [Accumulate::Overwrite, Accumulate::Add] {
                let (mut dx, mut dw) = (vec![0.5f32; n], vec![0.25f32; s.dim]);
                let (mut want_dx, mut want_dw) = (vec![0.5f64; n], vec![0.25f64; s.dim]);
                let r64 = wide(&r);
                kiln_reference::rmsnorm::rmsnorm_backward(
                    &mut want_dx,
                    &mut want_dw,
                    &dy64,
                    &x64,
                    &w64,
                    &r64,
                    s.dim,
                    mode,
                );
                backward(isa, &pool, &mut dx, &mut dw, (&dy, &x, &w, &r), s, mode);
                close(&dx, &want_dx);
                close(&dw, &want_dw);
            }
        }
    }

    /// f32 sums of up to 101 rows or 37 columns: 1e-5 + 1e-4·|ref|.
    fn close(got: &[f32], want: &[f64]) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "[{i}] {g} vs {w}"
            );
        }
    }
}
