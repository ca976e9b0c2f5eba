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

/// The row's softmax in place, returning its log-sum-exp: `max`, then `e^(z − max)` stored
/// while summed, then scaled by `1 / Σ`: one exponential per value, where
/// [`max_and_sum`] then [`exp_scaled_in_place`] with the log-sum-exp take two.
pub fn softmax_in_place(isa: Isa, row: &mut [f32]) -> f32 {
    // SAFETY: the tier was checked when the backend was made.
    unsafe {
        match isa {
            Isa::Avx2 => softmax_ymm(row),
            _ => softmax_zmm(row),
        }
    }
}

/// `out[j] = e^(z[j] − shift) · scale`.
pub fn exp_scaled(isa: Isa, out: &mut [f32], z: &[f32], shift: f32, scale: f32) {
    assert_eq!(out.len(), z.len());
    // SAFETY: as above; the lengths match.
    unsafe { exp_scaled_raw(isa, out.as_mut_ptr(), z.as_ptr(), z.len(), shift, scale) }
}

/// `row[j] = e^(row[j] − shift) · scale`, in place.
pub fn exp_scaled_in_place(isa: Isa, row: &mut [f32], shift: f32, scale: f32) {
    let p = row.as_mut_ptr();
    // SAFETY: as above; each element is read before it is written, lane by lane.
    unsafe { exp_scaled_raw(isa, p, p, row.len(), shift, scale) }
}

/// # Safety
/// The tier was checked; `out` and `z` hold `n` values (they may be the same buffer).
unsafe fn exp_scaled_raw(isa: Isa, out: *mut f32, z: *const f32, n: usize, shift: f32, scale: f32) {
    match isa {
        Isa::Avx2 => exp_scaled_ymm(out, z, n, shift, scale),
        _ => exp_scaled_zmm(out, z, n, shift, scale),
    }
}

/// The row's maximum (−∞ when empty).
#[target_feature(enable = "avx512f")]
unsafe fn max_zmm(row: &[f32]) -> f32 {
    let (n, p) = (row.len(), row.as_ptr());
    let tail = (1u32 << (n % 16)) as u16 - 1;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n / 16 * 16).step_by(16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
    }
    let last = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(n / 16 * 16));
    _mm512_reduce_max_ps(_mm512_max_ps(m, last))
}

/// The row's maximum (−∞ when empty).
#[target_feature(enable = "avx2,fma")]
unsafe fn max_ymm(row: &[f32]) -> f32 {
    let full = row.len() / 8 * 8;
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(row.as_ptr().add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    lanes
        .iter()
        .chain(&row[full..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[target_feature(enable = "avx512f")]
unsafe fn max_and_sum_zmm(row: &[f32]) -> (f32, f32) {
    let n = row.len();
    let p = row.as_ptr();
    let tail = (1u32 << (n % 16)) as u16 - 1;
    let max = max_zmm(row);
    let shift = _mm512_set1_ps(max);
    let mut s = _mm512_setzero_ps();
    for i in (0..n / 16 * 16).step_by(16) {
        s = _mm512_add_ps(s, exp_zmm(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift)));
    }
    let last = exp_zmm(_mm512_sub_ps(
        _mm512_maskz_loadu_ps(tail, p.add(n / 16 * 16)),
        shift,
    ));
    s = _mm512_mask_add_ps(s, tail, s, last);
    (max, _mm512_reduce_add_ps(s))
}

#[target_feature(enable = "avx512f")]
unsafe fn softmax_zmm(row: &mut [f32]) -> f32 {
    let (max, sum) = max_exp_sum_zmm(row);
    let inv = 1.0 / sum;
    scale_in_place(row, inv);
    max + sum.ln()
}

/// The row's maximum `m`, the row turned into `e^(z − m)` in place, and their sum.
#[target_feature(enable = "avx512f")]
unsafe fn max_exp_sum_zmm(row: &mut [f32]) -> (f32, f32) {
    let max = max_zmm(row);
    let n = row.len();
    let p = row.as_mut_ptr();
    let (full, tail) = (n / 16 * 16, (1u32 << (n % 16)) as u16 - 1);
    let shift = _mm512_set1_ps(max);
    let mut s = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp_zmm(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift));
        _mm512_storeu_ps(p.add(i), e);
        s = _mm512_add_ps(s, e);
    }
    let e = exp_zmm(_mm512_sub_ps(
        _mm512_maskz_loadu_ps(tail, p.add(full)),
        shift,
    ));
    _mm512_mask_storeu_ps(p.add(full), tail, e);
    (max, _mm512_reduce_add_ps(_mm512_mask_add_ps(s, tail, s, e)))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_ymm(row: &mut [f32]) -> f32 {
    let (max, sum) = max_exp_sum_ymm(row);
    scale_in_place(row, 1.0 / sum);
    max + sum.ln()
}

/// As [`max_exp_sum_zmm`], 8 wide.
#[target_feature(enable = "avx2,fma")]
unsafe fn max_exp_sum_ymm(row: &mut [f32]) -> (f32, f32) {
    let n = row.len();
    let full = n / 8 * 8;
    let max = max_ymm(row);
    let p = row.as_mut_ptr();
    let mut lanes = [0f32; 8];
    let shift = _mm256_set1_ps(max);
    let mut s = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        let e = exp_ymm(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift));
        _mm256_storeu_ps(p.add(i), e);
        s = _mm256_add_ps(s, e);
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    let mut sum: f32 = lanes.iter().sum();
    for z in &mut row[full..] {
        *z = (*z - max).exp();
        sum += *z;
    }
    (max, sum)
}

/// `row *= factor` (vectorized by the compiler at AVX2; every tier has it).
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_in_place(row: &mut [f32], factor: f32) {
    row.iter_mut().for_each(|z| *z *= factor);
}

/// The row's maximum `m`, the row turned into `e^(z − m)` in place, and `Σ e^(z − m)`: the
/// forward half of [`max_and_sum`] that keeps the exponentials.
pub fn max_exp_sum_in_place(isa: Isa, row: &mut [f32]) -> (f32, f32) {
    // SAFETY: the tier was checked when the backend was made.
    unsafe {
        match isa {
            Isa::Avx2 => max_exp_sum_ymm(row),
            _ => max_exp_sum_zmm(row),
        }
    }
}

/// `out[j] = x[j] · factor`.
pub fn scaled(out: &mut [f32], x: &[f32], factor: f32) {
    assert_eq!(out.len(), x.len());
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(out: &mut [f32], x: &[f32], factor: f32) {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = v * factor);
    }
    // SAFETY: every tier of this backend has AVX2 and FMA.
    unsafe { run(out, x, factor) }
}

/// `out[j] = bf16(x[j]) · factor`, the bf16 values widened to f32 (exactly: their bits are
/// an f32's upper half).
pub fn widened_scaled(out: &mut [f32], x: &[u16], factor: f32) {
    assert_eq!(out.len(), x.len());
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(out: &mut [f32], x: &[u16], factor: f32) {
        out.iter_mut()
            .zip(x)
            .for_each(|(o, &b)| *o = f32::from_bits((b as u32) << 16) * factor);
    }
    // SAFETY: every tier of this backend has AVX2 and FMA.
    unsafe { run(out, x, factor) }
}

/// `out[j] = bf16(x[j])`, rounding to nearest even (as `vcvtneps2bf16`, and as packing rounds).
///
/// # Safety
/// The CPU has AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub unsafe fn to_bf16(out: &mut [u16], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    let full = x.len() / 16 * 16;
    let bits = |v: __m256bh| std::mem::transmute::<__m256bh, __m256i>(v);
    for i in (0..full).step_by(16) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, bits(v));
    }
    let tail = (1u32 << (x.len() % 16)) as u16 - 1;
    let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, x.as_ptr().add(full)));
    _mm256_mask_storeu_epi16(out.as_mut_ptr().add(full) as *mut i16, tail, bits(v));
}

#[target_feature(enable = "avx512f")]
unsafe fn exp_scaled_zmm(op: *mut f32, zp: *const f32, n: usize, shift: f32, scale: f32) {
    let (shift, scale) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    for i in (0..n / 16 * 16).step_by(16) {
        let e = exp_zmm(_mm512_sub_ps(_mm512_loadu_ps(zp.add(i)), shift));
        _mm512_storeu_ps(op.add(i), _mm512_mul_ps(e, scale));
    }
    let tail = (1u32 << (n % 16)) as u16 - 1;
    let at = n / 16 * 16;
    let e = exp_zmm(_mm512_sub_ps(
        _mm512_maskz_loadu_ps(tail, zp.add(at)),
        shift,
    ));
    _mm512_mask_storeu_ps(op.add(at), tail, _mm512_mul_ps(e, scale));
}

#[target_feature(enable = "avx2,fma")]
unsafe fn max_and_sum_ymm(row: &[f32]) -> (f32, f32) {
    let n = row.len();
    let full = n / 8 * 8;
    let p = row.as_ptr();
    let max = max_ymm(row);
    let mut lanes = [0f32; 8];
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
unsafe fn exp_scaled_ymm(op: *mut f32, zp: *const f32, n: usize, shift: f32, scale: f32) {
    let full = n / 8 * 8;
    let (vs, vk) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    for i in (0..full).step_by(8) {
        let e = exp_ymm(_mm256_sub_ps(_mm256_loadu_ps(zp.add(i)), vs));
        _mm256_storeu_ps(op.add(i), _mm256_mul_ps(e, vk));
    }
    for i in full..n {
        *op.add(i) = (*zp.add(i) - shift).exp() * scale;
    }
}

/// The logit soft cap `out = cap · tanh(z / cap)`, with `tanh(y) = sign(y) · (1 − 2 / (e^(2|y|)
/// + 1))` (no cancellation for large |y|, and e^(2|y|) saturates to infinity cleanly, giving
/// ±cap), on the tier's vector `exp`.
pub fn softcap(isa: Isa, out: &mut [f32], z: &[f32], cap: f32) {
    assert_eq!(out.len(), z.len());
    // SAFETY: the tier was checked when the backend was made; the lengths match.
    unsafe {
        match isa {
            Isa::Avx2 => softcap_ymm(out, z, cap),
            _ => softcap_zmm(out, z, cap),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn softcap_zmm(out: &mut [f32], z: &[f32], cap: f32) {
    let n = z.len();
    let (zp, op) = (z.as_ptr(), out.as_mut_ptr());
    let (inv2, capv, one, two) = (
        _mm512_set1_ps(2.0 / cap),
        _mm512_set1_ps(cap),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(2.0),
    );
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    let mut i = 0;
    while i < n {
        let mask = if n - i >= 16 {
            0xffff
        } else {
            (1u32 << (n - i)) as u16 - 1
        };
        let x = _mm512_maskz_loadu_ps(mask, zp.add(i));
        let sign = _mm512_and_si512(_mm512_castps_si512(x), sign_bit);
        let ax = _mm512_abs_ps(x);
        let e = exp_zmm(_mm512_mul_ps(ax, inv2));
        let t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
        let t = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
        _mm512_mask_storeu_ps(op.add(i), mask, _mm512_mul_ps(capv, t));
        i += 16;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn softcap_ymm(out: &mut [f32], z: &[f32], cap: f32) {
    let n = z.len();
    let full = n / 8 * 8;
    let (zp, op) = (z.as_ptr(), out.as_mut_ptr());
    let (inv2, capv, one, two) = (
        _mm256_set1_ps(2.0 / cap),
        _mm256_set1_ps(cap),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(2.0),
    );
    let sign_bit = _mm256_set1_ps(-0.0);
    for i in (0..full).step_by(8) {
        let x = _mm256_loadu_ps(zp.add(i));
        let sign = _mm256_and_ps(x, sign_bit);
        let ax = _mm256_andnot_ps(sign_bit, x);
        let e = exp_ymm(_mm256_mul_ps(ax, inv2));
        let t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
        _mm256_storeu_ps(op.add(i), _mm256_mul_ps(capv, _mm256_or_ps(t, sign)));
    }
    for i in full..n {
        *op.add(i) = cap * (*zp.add(i) / cap).tanh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector conversion rounds as `half` does (to nearest, ties to even), across a run
    /// longer than a vector with a ragged tail, ties included.
    #[test]
    fn to_bf16_rounds_to_nearest_even() {
        if !kiln_core::cpu::features().supports(Isa::Avx512bf16) {
            println!("skipped: needs AVX512-BF16");
            return;
        }
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
        // Exact ties: the low 16 bits are 0x8000, rounded down on an even, up on an odd.
        x.push(f32::from_bits(0x3f80_8000));
        x.push(f32::from_bits(0x3f81_8000));
        let mut got = vec![0u16; x.len()];
        // SAFETY: checked above.
        unsafe { to_bf16(&mut got, &x) };
        let want: Vec<u16> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[got.len() - 2..], [0x3f80, 0x3f82]);
    }
}
