//! The small-shape path of `X · Wᵀ`: for a few rows (decoding, one token at a time) packing
//! the weight would cost as much as the product, so each output is a dot product of an input
//! row with a weight row read in place, `out[r, j] = Σ_k x[r, k] · w[j, k]` (the reference
//! backend's `matmul.rs` is the formula), blocks of weight rows over the pool. Memory-bound:
//! the weight is read once, whatever the number of rows up to [`MAX_ROWS`].
//! Accumulation rule: the output is overwritten.

use crate::pool::ThreadPool;
use crate::shared::SharedMut;
use crate::simd::dot;

/// Rows up to which the forward product skips packing.
pub const MAX_ROWS: usize = 4;

/// Weight rows per block of dot products (a task streams several).
const BLOCK: usize = 64;

/// `out (rows, n) = x (rows, k) · w (n, k)ᵀ`.
pub fn forward(
    isa: kiln_core::cpu::Isa,
    pool: &ThreadPool,
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    (rows, k, n): (usize, usize, usize),
) {
    assert!(rows <= MAX_ROWS && x.len() == rows * k && w.len() == n * k);
    assert_eq!(out.len(), rows * n, "gemv: out");
    let o = SharedMut::new(out);
    // Each task streams a long contiguous run of rows (`ThreadPool::stream_ranges`).
    let ranges = pool.stream_ranges(n, BLOCK);
    pool.run(ranges.len(), &|t| {
        for j0 in ranges.get(t).step_by(BLOCK) {
            let j1 = (j0 + BLOCK).min(n);
            let mut sums = [[0f32; BLOCK]; MAX_ROWS];
            dots(isa, &mut sums, x, &w[j0 * k..j1 * k], (rows, k));
            for (r, row) in sums.iter().enumerate().take(rows) {
                // SAFETY: columns j0..j1 of each row of `out` are this task's alone.
                let dst = unsafe { o.slice(r * n + j0, j1 - j0) };
                dst.copy_from_slice(&row[..j1 - j0]);
            }
        }
    });
}

tiered!(
    /// `sums[r][j] = x_r · w_j` for the weight rows of `w`, 16 lanes per dot product.
    fn dots(sums: &mut [[f32; BLOCK]; MAX_ROWS], x: &[f32], w: &[f32], shape: (usize, usize)) {
        let (rows, k) = shape;
        for (j, wj) in w.chunks_exact(k).enumerate() {
            for (r, sum) in sums.iter_mut().enumerate().take(rows) {
                sum[j] = dot4(wj, &x[r * k..(r + 1) * k]);
            }
        }
    }
);

/// `Σ a·b` in four independent 16-lane accumulators (64 lanes), so four vector adds are in
/// flight at once instead of one chain waiting on the last (the few-row product streams a
/// row per dot product; one chain held a core below its share of the memory bandwidth).
#[inline(always)]
fn dot4(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 64];
    let (ac, bc) = (a.chunks_exact(64), b.chunks_exact(64));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..64 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + dot(ar, br)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::cpu::Isa;

    /// Against the f64 triple loop, 1 to 4 rows, a ragged last block and k not a multiple of
    /// 16: f32 sums of 100 products in 16 lanes, 1e-5 relative to Σ|x·w|.
    #[test]
    fn matches_the_triple_loop() {
        let (k, n) = (100, 150);
        let val = |i: usize, m: usize| ((i * m) % 97) as f32 / 48.0 - 1.0;
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 7)).collect();
        let pool = ThreadPool::new(2);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if kiln_core::cpu::features().missing(isa).is_some() {
                continue;
            }
            for rows in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..rows * k).map(|i| val(i, 13)).collect();
                let mut out = vec![0f32; rows * n];
                forward(isa, &pool, &mut out, &x, &w, (rows, k, n));
                for r in 0..rows {
                    for j in 0..n {
                        let terms = (0..k).map(|p| x[r * k + p] as f64 * w[j * k + p] as f64);
                        let (want, size) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * size,
                            "{isa} [{r}, {j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
