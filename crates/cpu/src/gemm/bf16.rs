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
    super::prefetch_tile(c, ldc, rows, NR);
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
/// the pair layout `[kp / 2][width][2]` (`kp` = k rounded up to even), all of k: per group
/// of 8 lanes and 32 k, each lane's two f32 vectors are rounded to 16 bf16 pairs by
/// `vcvtne2ps2bf16` (round to nearest even, as the scalar path), and the 8 × 16 block of
/// pairs is transposed in registers (the classic unpack-32, unpack-64, 128-bit shuffle
/// sequence) into 16 rows of 8 pairs, each one 256-bit store. The last partial 32 k are read
/// with a mask (zeros past k, which is also the odd k's padding); missing lanes of the last
/// group are zeros. Returns k (everything is packed).
///
/// # Safety
/// The CPU has AVX512-BF16; `width` is a multiple of 8; `dst` holds `(kp / 2) · width`
/// pairs; every lane's k values lie inside `src`.
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
    debug_assert!(width.is_multiple_of(8) && lanes <= width);
    let pair_rows = k.div_ceil(2);
    assert!(
        dst.len() >= pair_rows * width * 2,
        "pack: destination too short"
    );
    let out = dst.as_mut_ptr() as *mut i32;
    let s = src.as_ptr();
    for g in (0..lanes).step_by(8) {
        let in_group = 8.min(lanes - g);
        for k0 in (0..k).step_by(32) {
            let left = k - k0;
            // 16 pairs of each of the group's lanes (zeros past k and past the lanes).
            let mut r = [_mm512_setzero_si512(); 8];
            for (i, ri) in r.iter_mut().enumerate().take(in_group) {
                let row = s.add(base + (g + i) * lane_stride + k0);
                let (lo, hi) = if left >= 32 {
                    (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)))
                } else {
                    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
                    (
                        _mm512_maskz_loadu_ps(mask(left), row),
                        _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), row.add(16)),
                    )
                };
                *ri = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            let rows = transpose_8x16(&r);
            // Pair row p of this block goes to row k0/2 + p, lanes g..g + 8.
            let count = 16.min(pair_rows - k0 / 2);
            for (p, v) in rows.iter().enumerate().take(count) {
                let at = out.add((k0 / 2 + p) * width + g);
                _mm256_storeu_si256(at as *mut __m256i, *v);
            }
        }
    }
    k
}

/// `r[i]` holds 16 i32 (element p of lane i); returns 16 vectors of 8 i32, vector p holding
/// element p of lanes 0..8.
#[inline(always)]
unsafe fn transpose_8x16(r: &[__m512i; 8]) -> [__m256i; 16] {
    // Within each 128-bit block: pairs of lanes interleaved, then quadruples.
    let t: [__m512i; 8] = [
        _mm512_unpacklo_epi32(r[0], r[1]),
        _mm512_unpackhi_epi32(r[0], r[1]),
        _mm512_unpacklo_epi32(r[2], r[3]),
        _mm512_unpackhi_epi32(r[2], r[3]),
        _mm512_unpacklo_epi32(r[4], r[5]),
        _mm512_unpackhi_epi32(r[4], r[5]),
        _mm512_unpacklo_epi32(r[6], r[7]),
        _mm512_unpackhi_epi32(r[6], r[7]),
    ];
    // u[j] (j = 0..4) holds elements j, j+4, j+8, j+12 of lanes 0..4 in its four blocks;
    // u[4 + j] the same of lanes 4..8.
    let u: [__m512i; 8] = [
        _mm512_unpacklo_epi64(t[0], t[2]),
        _mm512_unpackhi_epi64(t[0], t[2]),
        _mm512_unpacklo_epi64(t[1], t[3]),
        _mm512_unpackhi_epi64(t[1], t[3]),
        _mm512_unpacklo_epi64(t[4], t[6]),
        _mm512_unpackhi_epi64(t[4], t[6]),
        _mm512_unpacklo_epi64(t[5], t[7]),
        _mm512_unpackhi_epi64(t[5], t[7]),
    ];
    let mut out = [_mm256_setzero_si256(); 16];
    for j in 0..4 {
        let (lo4, hi4) = (u[j], u[4 + j]);
        // [lo.b0, lo.b1, hi.b0, hi.b1] then reordered to [lo.b0, hi.b0, lo.b1, hi.b1].
        let a = _mm512_shuffle_i32x4::<0b01_00_01_00>(lo4, hi4);
        let a = _mm512_shuffle_i32x4::<0b11_01_10_00>(a, a);
        let b = _mm512_shuffle_i32x4::<0b11_10_11_10>(lo4, hi4);
        let b = _mm512_shuffle_i32x4::<0b11_01_10_00>(b, b);
        out[j] = _mm512_castsi512_si256(a);
        out[j + 4] = _mm512_extracti64x4_epi64::<1>(a);
        out[j + 8] = _mm512_castsi512_si256(b);
        out[j + 12] = _mm512_extracti64x4_epi64::<1>(b);
    }
    out
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

/// `c[r][..cols] (=|+=) x_r · B_panel` for `rows` ≤ [`GEMV_ROWS`] rows of `x`, given as bf16
/// pairs (`x[r]` holds `pairs` i32, each two bf16 of consecutive k): the small-row product
/// over one packed panel, for decoding. Two accumulators per row cover the 32 columns; the
/// k pairs go in two interleaved halves so each row has four independent `vdpbf16ps` chains
/// (its latency is about 6 cycles; the loop is bound by reading the panel).
///
/// # Safety
/// The CPU has AVX512-BF16; `b` holds `pairs · NR` pairs (one panel); each `x[r]` holds
/// `pairs` pairs; `c` points to `rows` rows of `cols ≤ NR` values with stride `ldc`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv_panel(
    pairs: usize,
    x: &[&[i32]],
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    overwrite: bool,
) {
    let rows = x.len();
    debug_assert!(rows <= GEMV_ROWS);
    let mut acc = [[_mm512_setzero_ps(); 4]; GEMV_ROWS];
    let half = pairs / 2;
    let load = |p: usize| -> (__m512bh, __m512bh) {
        let bp = b.add(p * 2 * NR);
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp as *const __m512i)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                bp.add(32) as *const __m512i
            )),
        )
    };
    for p in 0..half {
        let (b0, b1) = load(p);
        let (b2, b3) = load(half + p);
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let x0: __m512bh = std::mem::transmute(_mm512_set1_epi32(x[r][p]));
            let x1: __m512bh = std::mem::transmute(_mm512_set1_epi32(x[r][half + p]));
            a[0] = _mm512_dpbf16_ps(a[0], x0, b0);
            a[1] = _mm512_dpbf16_ps(a[1], x0, b1);
            a[2] = _mm512_dpbf16_ps(a[2], x1, b2);
            a[3] = _mm512_dpbf16_ps(a[3], x1, b3);
        }
    }
    if pairs % 2 == 1 {
        let (b0, b1) = load(pairs - 1);
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let x0: __m512bh = std::mem::transmute(_mm512_set1_epi32(x[r][pairs - 1]));
            a[0] = _mm512_dpbf16_ps(a[0], x0, b0);
            a[1] = _mm512_dpbf16_ps(a[1], x0, b1);
        }
    }
    let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
    for (r, a) in acc.iter().enumerate().take(rows) {
        let sums = [_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3])];
        for (h, (v, &mask)) in sums.iter().zip(&masks).enumerate() {
            let d = c.add(r * ldc + 16 * h);
            let v = if overwrite {
                *v
            } else {
                _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, d))
            };
            _mm512_mask_storeu_ps(d, mask, v);
        }
    }
}

/// Rows up to which [`gemv_panel`] serves a product.
pub const GEMV_ROWS: usize = 4;
