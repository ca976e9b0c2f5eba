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
    super::prefetch_tile(c, ldc, rows, NR);
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

/// Packs `lanes` lanes whose k values are contiguous (`src[base + lane · lane_stride + kk]`)
/// into the f32 layout `[k][width]`: blocks of 8 lanes × 8 k loaded as eight rows and
/// transposed in registers (the classic unpack, shuffle, 128-bit permute sequence), each
/// k's 8 lanes one store (masked to the width's last lanes when `width` is 6, the AVX2
/// strips). The last partial 8 k are read with a mask; missing lanes are zeros. Whole
/// blocks use plain loads and stores: `vmaskmovps` is slower on every core kiln has met
/// (on Zen 5 the masked forms took half of this function's time). Every tier has AVX2, so
/// the AVX-512 f32 operands use it too.
///
/// # Safety
/// The CPU has AVX2; `dst` holds `k · width` values; every lane's k values lie in `src`.
#[target_feature(enable = "avx2")]
pub unsafe fn pack_k_contiguous(
    dst: &mut [f32],
    src: &[f32],
    (base, lane_stride): (usize, usize),
    lanes: usize,
    width: usize,
    k: usize,
) {
    assert!(
        dst.len() >= k * width && lanes <= width,
        "pack: destination too short"
    );
    let s = src.as_ptr();
    let out = dst.as_mut_ptr();
    let mask_of = |n: usize| {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
    };
    for g in (0..lanes).step_by(8) {
        let in_group = 8.min(lanes - g);
        // The group's lanes that exist in the destination row (6 for the AVX2 strips).
        let whole_rows = width - g >= 8;
        let store = mask_of(8.min(width - g));
        for k0 in (0..k).step_by(8) {
            let left = 8.min(k - k0);
            let load = mask_of(left);
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, ri) in r.iter_mut().enumerate().take(in_group) {
                let row = s.add(base + (g + i) * lane_stride + k0);
                *ri = if left == 8 {
                    _mm256_loadu_ps(row)
                } else {
                    _mm256_maskload_ps(row, load)
                };
            }
            let cols = transpose_8x8(&r);
            for (j, v) in cols.iter().enumerate().take(left) {
                let at = out.add((k0 + j) * width + g);
                if whole_rows {
                    _mm256_storeu_ps(at, *v);
                } else {
                    _mm256_maskstore_ps(at, store, *v);
                }
            }
        }
    }
}

/// Packs `lanes` contiguous lanes (`src[base + kk · k_stride + lane]`) into the f32 layout
/// `[k][width]`: each k row's lanes copied 8 at a time, a masked tail. (A `memcpy` per row,
/// 24 to 128 bytes, spent more in the call than in the copy: 7% of an AVX-512 f32 step.)
///
/// # Safety
/// The CPU has AVX2; `dst` holds `k · width` values; row `kk` of `src` holds `lanes` values
/// from `base + kk · k_stride`.
#[target_feature(enable = "avx2")]
pub unsafe fn pack_lanes_contiguous(
    dst: &mut [f32],
    src: &[f32],
    (base, k_stride): (usize, usize),
    lanes: usize,
    width: usize,
    k: usize,
) {
    assert!(
        dst.len() >= k * width && lanes <= width,
        "pack: destination too short"
    );
    if k > 0 {
        assert!(
            base + (k - 1) * k_stride + lanes <= src.len(),
            "pack: source too short"
        );
    }
    let (full, tail) = (lanes / 8 * 8, lanes % 8);
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(tail as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    for kk in 0..k {
        let (from, to) = (
            src.as_ptr().add(base + kk * k_stride),
            dst.as_mut_ptr().add(kk * width),
        );
        for l in (0..full).step_by(8) {
            _mm256_storeu_ps(to.add(l), _mm256_loadu_ps(from.add(l)));
        }
        if tail > 0 {
            let v = _mm256_maskload_ps(from.add(full), mask);
            _mm256_maskstore_ps(to.add(full), mask, v);
        }
    }
}

/// `r[i]` holds element j of lane i; returns vector j holding element j of lanes 0..8.
#[inline(always)]
unsafe fn transpose_8x8(r: &[__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    // Within each 128-bit half: elements j (j = 0..4 of the half) of lanes 0..4, then 4..8.
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}
