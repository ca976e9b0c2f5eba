//! The AVX512-BF16 micro-kernel: an 8 × 32 block of C in 16 zmm f32 accumulators, fed by
//! `vdpbf16ps`, which adds to each f32 lane the dot product of a pair of bf16 values from
//! each operand. A is packed as bf16 pairs (two consecutive k of one row), broadcast as one
//! 32-bit value; B as `[k / 2][32 columns][2]`, two zmm per k pair. The instruction's
//! latency is about 6–7 cycles on Zen 4/5 with two issued per cycle, so it wants at least
//! 12 independent accumulators: 16 here.

use std::arch::x86_64::*;

use super::merge_edge;

pub const MR: usize = 8;
pub const NR: usize = 32;

/// `C[..rows, ..cols] (=|+=) A_strip · B_panel` over `pairs` k pairs.
///
/// # Safety
/// The CPU has AVX512-BF16; `a` holds `pairs · 2 · MR` and `b` `pairs · 2 · NR` bf16 values
/// packed as described above; `c` is a `rows` × `cols` block (rows ≤ MR, cols ≤ NR) with row
/// stride `ldc`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel(
    pairs: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let a = a as *const i32;
    for p in 0..pairs {
        let bp = b.add(p * 2 * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const __m512i));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i)));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
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
        let mut tile = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), row[0]);
            _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16), row[1]);
        }
        merge_edge(&tile, NR, c, ldc, rows, cols, overwrite);
    }
}
