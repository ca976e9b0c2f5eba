//! Softmax cross-entropy over the vocabulary, a row per position, vectorized (the reference
//! backend's `xent.rs` is the formula): `lse = max + ln Σ e^(z − max)`, `loss = lse − z[t]`;
//! backward `dz = (e^(z − lse) − [j = t]) · dloss`. Rows go out over the thread pool.
//! Accumulation rule: `dlogits` is overwritten (an activation gradient).

use std::arch::x86_64::*;

use kiln_core::cpu::Isa;

use crate::simd::{exp_ymm, exp_zmm};

/// `(max, Σ e^(z − max))` of a row.
pub fn max_and_sum(isa: Isa, row: &[f32]) -> (f32, f32) {
    // SAFETY: the tier was checked when the backend was made.
    unsafe {
        match isa {
            Isa::Avx2 => max_and_sum_ymm(row),
            _ => max_and_sum_zmm(row),
        }
    }
}

/// `out[j] = e^(z[j] − shift) · scale`.
pub fn exp_scaled(isa: Isa, out: &mut [f32], z: &[f32], shift: f32, scale: f32) {
    assert_eq!(out.len(), z.len());
    // SAFETY: as above; the lengths match.
    unsafe {
        match isa {
            Isa::Avx2 => exp_scaled_ymm(out, z, shift, scale),
            _ => exp_scaled_zmm(out, z, shift, scale),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn max_and_sum_zmm(row: &[f32]) -> (f32, f32) {
    let n = row.len();
    let p = row.as_ptr();
    let tail = (1u32 << (n % 16)) as u16 - 1;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n / 16 * 16).step_by(16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
    }
    let last = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(n / 16 * 16));
    let max = _mm512_reduce_max_ps(_mm512_max_ps(m, last));
    let shift = _mm512_set1_ps(max);
    let mut s = _mm512_setzero_ps();
    for i in (0..n / 16 * 16).step_by(16) {
        s = _mm512_add_ps(s, exp_zmm(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift)));
    }
    let last = exp_zmm(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(n / 16 * 16)), shift));
    s = _mm512_mask_add_ps(s, tail, s, last);
    (max, _mm512_reduce_add_ps(s))
}

#[target_feature(enable = "avx512f")]
unsafe fn exp_scaled_zmm(out: &mut [f32], z: &[f32], shift: f32, scale: f32) {
    let n = z.len();
    let (zp, op) = (z.as_ptr(), out.as_mut_ptr());
    let (shift, scale) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    for i in (0..n / 16 * 16).step_by(16) {
        let e = exp_zmm(_mm512_sub_ps(_mm512_loadu_ps(zp.add(i)), shift));
        _mm512_storeu_ps(op.add(i), _mm512_mul_ps(e, scale));
    }
    let tail = (1u32 << (n % 16)) as u16 - 1;
    let at = n / 16 * 16;
    let e = exp_zmm(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, zp.add(at)), shift));
    _mm512_mask_storeu_ps(op.add(at), tail, _mm512_mul_ps(e, scale));
}

#[target_feature(enable = "avx2,fma")]
unsafe fn max_and_sum_ymm(row: &[f32]) -> (f32, f32) {
    let n = row.len();
    let full = n / 8 * 8;
    let p = row.as_ptr();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let max = lanes
        .iter()
        .chain(&row[full..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let shift = _mm256_set1_ps(max);
    let mut s = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        s = _mm256_add_ps(s, exp_ymm(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift)));
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    let tail: f32 = row[full..].iter().map(|&z| (z - max).exp()).sum();
    (max, lanes.iter().sum::<f32>() + tail)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp_scaled_ymm(out: &mut [f32], z: &[f32], shift: f32, scale: f32) {
    let n = z.len();
    let full = n / 8 * 8;
    let (zp, op) = (z.as_ptr(), out.as_mut_ptr());
    let (vs, vk) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    for i in (0..full).step_by(8) {
        let e = exp_ymm(_mm256_sub_ps(_mm256_loadu_ps(zp.add(i)), vs));
        _mm256_storeu_ps(op.add(i), _mm256_mul_ps(e, vk));
    }
    for (o, &v) in out[full..].iter_mut().zip(&z[full..]) {
        *o = (v - shift).exp() * scale;
    }
}
