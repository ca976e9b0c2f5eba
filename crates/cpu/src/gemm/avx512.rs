//! The AVX-512F f32 micro-kernel: an 8 × 32 block of C in 16 zmm accumulators. Per k it
//! loads two 16-wide rows of the B panel and broadcasts eight A values (folded into the FMA
//! as `{1to16}` memory operands), 16 FMAs for 2 loads. Two FMA ports need at least 8
//! independent accumulators to hide a 4-cycle latency; 16 leave room.

use std::arch::x86_64::*;

pub const MR: usize = 8;
pub const NR: usize = 32;

/// `C[..rows, ..cols] (=|+=) A_strip · B_panel` over `kc` k.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds `kc · MR` and `b` `kc · NR` values; `c` is a `rows` ×
/// `cols` block (rows ≤ MR, cols ≤ NR) with row stride `ldc`.
#[target_feature(enable = "avx512f")]
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
    super::prefetch_tile(c, ldc, rows, NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    store_tile(&acc, c, ldc, rows, cols, overwrite);
}

/// Adds (or, with `overwrite`, writes) an 8 × 32 block of zmm accumulators into C: whole
/// rows with vector stores, an edge block with masked ones. The bf16 kernel's
/// accumulators are f32 zmm too and end here as well.
///
/// # Safety
/// The CPU has AVX-512F; `c` is a `rows` × `cols` block (rows ≤ MR, cols ≤ NR) with row
/// stride `ldc`.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_tile(
    acc: &[[__m512; 2]; MR],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    if rows == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            let dst = c.add(i * ldc);
            for (h, v) in row.iter().enumerate() {
                let d = dst.add(16 * h);
                let v = if overwrite {
                    *v
                } else {
                    _mm512_add_ps(*v, _mm512_loadu_ps(d))
                };
                _mm512_storeu_ps(d, v);
            }
        }
    } else {
        // The edge: the first `rows` rows, `cols` columns through masked loads and stores
        // (masked-off lanes neither fault nor write).
        let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
        let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
        for (i, row) in acc.iter().enumerate().take(rows) {
            let dst = c.add(i * ldc);
            for (h, (v, &mask)) in row.iter().zip(&masks).enumerate() {
                let d = dst.add(16 * h);
                let v = if overwrite {
                    *v
                } else {
                    _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, d))
                };
                _mm512_mask_storeu_ps(d, mask, v);
            }
        }
    }
}
