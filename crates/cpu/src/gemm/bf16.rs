//! The AVX512-BF16 micro-kernel: an 8 × 32 block of C in 16 zmm f32 accumulators, fed by
//! `vdpbf16ps`, which adds to each f32 lane the dot product of a pair of bf16 values from
//! each operand. A is packed as bf16 pairs (two consecutive k of one row), broadcast as one
//! 32-bit value; B as `[k / 2][32 columns][2]`, two zmm per k pair. The instruction's
//! latency is about 6–7 cycles on Zen 4/5 with two issued per cycle, so it wants at least
//! 12 independent accumulators: 16 here.

use std::arch::x86_64::*;

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
    super::avx512::store_tile(&acc, c, ldc, rows, cols, overwrite);
}

/// Packs `lanes` lanes whose k values are contiguous (`src[lane * lane_stride + kk]`) into
/// the pair layout `[k / 2][width][2]`, 32 k of one lane at a time: two f32 vectors rounded
/// to 32 bf16 by `vcvtne2ps2bf16` (round to nearest even, as the scalar path), which are
/// already 16 pairs in order, scattered to their 16 rows of the packed block. k past the last
/// full 32 is left to the caller.
///
/// # Safety
/// The CPU has AVX512-BF16; `dst` holds `(k / 2) · width` pairs; every lane's 32-k chunks
/// read below lie inside `src`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn pack_k_contiguous(
    dst: &mut [u16],
    src: &[f32],
    base: usize,
    lane_stride: usize,
    lanes: usize,
    width: usize,
    k: usize,
) -> usize {
    let full = k / 32 * 32;
    let index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(width as i32),
    );
    let out = dst.as_mut_ptr() as *mut i32;
    for lane in 0..lanes {
        let row = src.as_ptr().add(base + lane * lane_stride);
        for k0 in (0..full).step_by(32) {
            let lo = _mm512_loadu_ps(row.add(k0));
            let hi = _mm512_loadu_ps(row.add(k0 + 16));
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let at = out.add((k0 / 2) * width + lane);
            _mm512_i32scatter_epi32::<4>(at, index, pairs);
        }
    }
    full
}

/// Packs `lanes` contiguous lanes (`src[lane + kk * k_stride]`) into the pair layout, two k
/// rows and 16 lanes at a time: `vcvtne2ps2bf16` rounds both rows, and one permute
/// interleaves them into 16 pairs (8 with the 256-bit form). Returns how many lanes were
/// packed (a multiple of 8);
/// the rest, and an odd last k, are left to the caller.
///
/// # Safety
/// The CPU has AVX512-BF16 and AVX512BW; `dst` holds `(k / 2) · width` pairs; rows
/// `base + kk · k_stride` hold `lanes` values for every even `kk + 1 < k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn pack_lanes_contiguous(
    dst: &mut [u16],
    src: &[f32],
    base: usize,
    k_stride: usize,
    lanes: usize,
    width: usize,
    k: usize,
) -> usize {
    let full = lanes / 16 * 16;
    // An A strip is 8 lanes wide: a last group of 8 goes through the 256-bit form.
    let half = if lanes - full >= 8 { 8 } else { 0 };
    const INTERLEAVE8: [i16; 16] = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15];
    let interleave8 = _mm256_loadu_si256(INTERLEAVE8.as_ptr() as *const __m256i);
    // vcvtne2ps2bf16(b, a) puts a's 16 values in the low half and b's in the high half;
    // pair i takes element i of each.
    const INTERLEAVE: [i16; 32] = [
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12,
        28, 13, 29, 14, 30, 15, 31,
    ];
    let interleave = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
    let s = src.as_ptr();
    for kk in (0..k - k % 2).step_by(2) {
        let (r0, r1) = (
            s.add(base + kk * k_stride),
            s.add(base + (kk + 1) * k_stride),
        );
        let out = dst.as_mut_ptr().add((kk / 2) * width * 2);
        for l0 in (0..full).step_by(16) {
            let a = _mm512_loadu_ps(r0.add(l0));
            let b = _mm512_loadu_ps(r1.add(l0));
            let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let pairs = _mm512_permutexvar_epi16(interleave, halves);
            _mm512_storeu_si512(out.add(l0 * 2) as *mut __m512i, pairs);
        }
        if half > 0 {
            let a = _mm256_loadu_ps(r0.add(full));
            let b = _mm256_loadu_ps(r1.add(full));
            let halves: __m256i = std::mem::transmute(_mm256_cvtne2ps_pbh(b, a));
            let pairs = _mm256_permutexvar_epi16(interleave8, halves);
            _mm256_storeu_si256(out.add(full * 2) as *mut __m256i, pairs);
        }
    }
    full + half
}
