//! The AVX2 + FMA f32 micro-kernel: a 6 × 16 block of C in 12 ymm accumulators, the largest
//! that leaves registers for two B rows and a broadcast in the 16 ymm registers (the shape
//! OpenBLAS and BLIS use on Haswell-class cores).

use std::arch::x86_64::*;

use super::merge_edge;

pub const MR: usize = 6;
pub const NR: usize = 16;

/// `C[..rows, ..cols] (=|+=) A_strip · B_panel` over `kc` k.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds `kc · MR` and `b` `kc · NR` values; `c` is a `rows` ×
/// `cols` block (rows ≤ MR, cols ≤ NR) with row stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*ap.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    if rows == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            let dst = c.add(i * ldc);
            for (h, v) in row.iter().enumerate() {
                let d = dst.add(8 * h);
                let v = if overwrite {
                    *v
                } else {
                    _mm256_add_ps(*v, _mm256_loadu_ps(d))
                };
                _mm256_storeu_ps(d, v);
            }
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), row[0]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), row[1]);
        }
        merge_edge(&tile, NR, c, ldc, rows, cols, overwrite);
    }
}
