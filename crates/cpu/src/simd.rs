//! The lane-split dot product, and vector `exp` for the element-wise kernels, one per tier:
//! Cephes' `expf` (S. Moshier, Cephes Math Library, `expf.c`): n = round(x·log₂e), r = x −
//! n·ln2 in two parts, a degree-5 polynomial for eʳ, then ×2ⁿ. Relative error about 2 ulp
//! over the clamped range [−87.3, 88.7], where the result is a normal f32; below it the
//! result flushes toward 0.

use std::arch::x86_64::*;

/// `Σ a·b` in 16 independent lanes, so the compiler vectorizes the reduction at the width of
/// the tier it is inlined into (RMSNorm, the few-row f32 product, the KV-cache attention).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in f32 and the rest (Cephes' C1, C2).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5.000_000_1e-1_f64 as f32,
];
const HI: f32 = 88.7;
const LO: f32 = -87.3;

/// e^x on 16 lanes.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_zmm(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for &c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // e^r ≈ 1 + r + r²·p(r)
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
}

/// e^x on 8 lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_ymm(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for &c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // 2ⁿ built in the exponent field: n ∈ [−126, 128] after the clamp.
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let f = kiln_core::cpu::features();
        let xs: Vec<f32> = (-8700..8800).map(|i| i as f32 * 0.01 + 0.003).collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            if f.supports(kiln_core::cpu::Isa::Avx512) {
                // SAFETY: the tier is present.
                unsafe {
                    _mm512_storeu_ps(got.as_mut_ptr(), exp_zmm(_mm512_loadu_ps(chunk.as_ptr())))
                };
                check(chunk, &got);
            }
            if f.supports(kiln_core::cpu::Isa::Avx2) {
                for h in 0..2 {
                    // SAFETY: as above.
                    unsafe {
                        let v = exp_ymm(_mm256_loadu_ps(chunk.as_ptr().add(8 * h)));
                        _mm256_storeu_ps(got.as_mut_ptr().add(8 * h), v);
                    }
                }
                check(chunk, &got);
            }
        }
    }

    /// Relative error ≤ 4e-7 (about 3 ulp) against f64's exp.
    fn check(xs: &[f32], got: &[f32]) {
        for (&x, &g) in xs.iter().zip(got) {
            let want = (x as f64).exp();
            let rel = ((g as f64 - want) / want).abs();
            assert!(
                rel <= 4e-7,
                "exp({x}) = {g}, want {want} (relative {rel:.2e})"
            );
        }
    }
}
