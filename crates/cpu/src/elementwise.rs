//! Element-wise kernels over flat tensors, in chunks over the pool, each loop compiled per
//! tier (`tiered!`): the golf MLP's (leaky) ReLU² and its backward (the reference backend's
//! `activation.rs` is the formula), the residual add and `accumulate`. Accumulation rule:
//! outputs are overwritten, except `accumulate`'s (`+=`).

use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Values per task.
const CHUNK: usize = 1 << 15;

/// Runs `f(start, len)` over `n` values in chunks on the pool.
fn chunks(pool: &ThreadPool, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    pool.run(n.div_ceil(CHUNK), &|c| {
        f(c * CHUNK, CHUNK.min(n - c * CHUNK))
    });
}

/// `out = (x > 0 ? x : slope·x)²`.
pub fn relu2_forward(isa: Isa, pool: &ThreadPool, out: &mut [f32], inp: &[f32], slope: f32) {
    assert_eq!(out.len(), inp.len());
    let o = SharedMut::new(out);
    chunks(pool, inp.len(), &|start, len| {
        // SAFETY: this chunk of `out` is this task's alone.
        let y = unsafe { o.slice(start, len) };
        relu2_span(isa, y, &inp[start..start + len], slope);
    });
}

tiered!(
    fn relu2_span(y: &mut [f32], x: &[f32], slope: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            let r = if x > 0.0 { x } else { slope * x };
            *y = r * r;
        }
    }
);

/// `dinp = dout · 2r · r'`, `r` the (leaky) ReLU of the input, `r'` its slope there.
pub fn relu2_backward(
    isa: Isa,
    pool: &ThreadPool,
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    slope: f32,
) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len());
    let d = SharedMut::new(dinp);
    chunks(pool, inp.len(), &|start, len| {
        // SAFETY: as above.
        let dx = unsafe { d.slice(start, len) };
        let (dy, x) = (&dout[start..start + len], &inp[start..start + len]);
        relu2_backward_span(isa, dx, dy, x, slope);
    });
}

tiered!(
    fn relu2_backward_span(dx: &mut [f32], dy: &[f32], x: &[f32], slope: f32) {
        for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
            *dx = if x > 0.0 {
                dy * 2.0 * x
            } else {
                dy * 2.0 * slope * slope * x
            };
        }
    }
);

/// `out = a + b`, or with `a` absent, `out += b`.
pub fn add(isa: Isa, pool: &ThreadPool, out: &mut [f32], a: Option<&[f32]>, b: &[f32]) {
    assert!(out.len() == b.len() && a.is_none_or(|a| a.len() == b.len()));
    let o = SharedMut::new(out);
    chunks(pool, b.len(), &|start, len| {
        // SAFETY: as above.
        let y = unsafe { o.slice(start, len) };
        let bs = &b[start..start + len];
        match a {
            Some(a) => sum_span(isa, y, &a[start..start + len], bs),
            None => add_span(isa, y, bs),
        }
    });
}

tiered!(
    fn sum_span(y: &mut [f32], a: &[f32], b: &[f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a + b;
        }
    }
);

tiered!(
    fn add_span(y: &mut [f32], b: &[f32]) {
        for (y, &b) in y.iter_mut().zip(b) {
            *y += b;
        }
    }
);

/// Rows per task of the broadcast scale.
const SCALE_ROWS: usize = 32;

/// `y (=|+=) x ⊙ s` over one row of `(G, inner)`.
#[inline(always)]
fn scale_row(y: &mut [f32], x: &[f32], s: &[f32], inner: usize, add: bool) {
    if inner == 1 {
        // Per-channel scales: one zip the compiler vectorizes.
        for ((y, &x), &sg) in y.iter_mut().zip(x).zip(s) {
            *y = if add { *y + x * sg } else { x * sg };
        }
        return;
    }
    for (g, &sg) in s.iter().enumerate() {
        let span = g * inner..(g + 1) * inner;
        for (y, &x) in y[span.clone()].iter_mut().zip(&x[span]) {
            *y = if add { *y + x * sg } else { x * sg };
        }
    }
}

/// The broadcast scale `out (rows, G, inner) (=|+=) inp ⊙ s[g]` (the reference backend's
/// `scale.rs` is the formula); rows in blocks over the pool.
pub fn scale_forward(
    isa: Isa,
    pool: &ThreadPool,
    out: &mut [f32],
    inp: &[f32],
    s: &[f32],
    inner: usize,
    add: bool,
) {
    let row = s.len() * inner;
    assert!(
        out.len() == inp.len() && inp.len().is_multiple_of(row),
        "scale: shapes"
    );
    let rows = inp.len() / row;
    let o = SharedMut::new(out);
    pool.run(rows.div_ceil(SCALE_ROWS), &|block| {
        let (r0, r1) = (block * SCALE_ROWS, ((block + 1) * SCALE_ROWS).min(rows));
        // SAFETY: this block's rows of `out` are this task's alone.
        let y = unsafe { o.slice(r0 * row, (r1 - r0) * row) };
        scale_rows(isa, y, &inp[r0 * row..r1 * row], s, inner, add);
    });
}

tiered!(
    /// `y (=|+=) x ⊙ s` over whole rows of `(G, inner)`.
    fn scale_rows(y: &mut [f32], x: &[f32], s: &[f32], inner: usize, add: bool) {
        let row = s.len() * inner;
        for (y, x) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
            scale_row(y, x, s, inner, add);
        }
    }
);

/// `dinp (=|+=) dout ⊙ s`, `ds += Σ dout ⊙ inp`: the input gradient by blocks of rows, each
/// block's partial `ds` summed in block order at the end.
#[allow(clippy::too_many_arguments)]
pub fn scale_backward(
    isa: Isa,
    pool: &ThreadPool,
    dinp: &mut [f32],
    ds: &mut [f32],
    (dout, inp, s): (&[f32], &[f32], &[f32]),
    inner: usize,
    add: bool,
) {
    scale_forward(isa, pool, dinp, dout, s, inner, add);
    let groups = s.len();
    let row = groups * inner;
    let rows = inp.len() / row;
    let blocks = rows.div_ceil(SCALE_ROWS);
    let mut partial = vec![0f32; blocks * groups];
    let p = SharedMut::new(&mut partial);
    pool.run(blocks, &|block| {
        let (r0, r1) = (block * SCALE_ROWS, ((block + 1) * SCALE_ROWS).min(rows));
        // SAFETY: this block's partial sums are this task's alone.
        let acc = unsafe { p.slice(block * groups, groups) };
        let (dy, x) = (&dout[r0 * row..r1 * row], &inp[r0 * row..r1 * row]);
        scale_grad_rows(isa, acc, dy, x, inner);
    });
    for block in partial.chunks_exact(groups) {
        for (d, &v) in ds.iter_mut().zip(block) {
            *d += v;
        }
    }
}

tiered!(
    /// `acc[g] += Σ dy ⊙ x` over group g of whole rows of `(G, inner)`.
    fn scale_grad_rows(acc: &mut [f32], dy: &[f32], x: &[f32], inner: usize) {
        let row = acc.len() * inner;
        for (dy, x) in dy.chunks_exact(row).zip(x.chunks_exact(row)) {
            if inner == 1 {
                for ((a, &d), &v) in acc.iter_mut().zip(dy).zip(x) {
                    *a += d * v;
                }
            } else {
                for (g, a) in acc.iter_mut().enumerate() {
                    let span = g * inner..(g + 1) * inner;
                    *a += dy[span.clone()]
                        .iter()
                        .zip(&x[span])
                        .map(|(d, v)| d * v)
                        .sum::<f32>();
                }
            }
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::backend::Accumulate;

    /// Several row blocks (the conformance cases fit in one), per channel and per head, both
    /// modes, against the reference kernels in f64; f32 sums of up to 101 rows: 1e-5 + 1e-4·|ref|.
    #[test]
    fn scale_blocks_match_the_reference() {
        let rows = 3 * SCALE_ROWS + 5;
        for (groups, inner) in [(37, 1), (4, 6)] {
            let n = rows * groups * inner;
            let val = |i: usize, m: usize| ((i * m) % 101) as f32 / 50.0 - 1.0;
            let (x, dy): (Vec<f32>, Vec<f32>) = (
                (0..n).map(|i| val(i, 7)).collect(),
                (0..n).map(|i| val(i, 13)).collect(),
            );
            let s: Vec<f32> = (0..groups).map(|i| val(i, 3)).collect();
            let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            for mode in [Accumulate::Overwrite, Accumulate::Add] {
                let (mut want_dx, mut want_ds) = (vec![0.5f64; n], vec![0.25f64; groups]);
                kiln_reference::scale::scale_backward(
                    &mut want_dx,
                    &mut want_ds,
                    &wide(&dy),
                    &wide(&x),
                    &wide(&s),
                    inner,
                    mode,
                );
                for isa in [Isa::Avx2, Isa::Avx512] {
                    if kiln_core::cpu::features().missing(isa).is_some() {
                        continue;
                    }
                    let pool = ThreadPool::new(2);
                    let (mut dx, mut ds) = (vec![0.5f32; n], vec![0.25f32; groups]);
                    let add = mode == Accumulate::Add;
                    scale_backward(isa, &pool, &mut dx, &mut ds, (&dy, &x, &s), inner, add);
                    for (got, want) in [(&dx, &want_dx), (&ds, &want_ds)] {
                        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                            assert!(
                                (g as f64 - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                                "[{i}] {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
