//! SwiGLU, vectorized (the reference backend's `swiglu.rs` is the formula):
//! `out = silu(g) · u` with `silu(g) = g · σ(g)`, `σ(g) = 1 / (1 + e^(−g))`; backward
//! `du = dy · g · σ(g)`, `dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))`. Chunks of the flat
//! tensors go out over the thread pool. Accumulation rule: outputs are overwritten.

use std::arch::x86_64::*;

use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;
use crate::simd::{exp_ymm, exp_zmm};

/// Values per task: big enough that a task outlasts its hand-out, small enough to balance.
const CHUNK: usize = 1 << 14;

pub fn forward(isa: Isa, pool: &ThreadPool, out: &mut [f32], gate: &[f32], up: &[f32]) {
    let n = out.len();
    assert!(gate.len() == n && up.len() == n, "swiglu: lengths");
    let o = SharedMut::new(out);
    pool.run(n.div_ceil(CHUNK), &|c| {
        let (start, len) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
        // SAFETY: the tier was checked when the backend was made; chunk c is this task's.
        unsafe {
            let (g, u, o) = (
                gate.as_ptr().add(start),
                up.as_ptr().add(start),
                o.get().add(start),
            );
            match isa {
                Isa::Avx2 => forward_ymm(o, g, u, len),
                _ => forward_zmm(o, g, u, len),
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    pool: &ThreadPool,
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) {
    let n = dgate.len();
    assert!(dup.len() == n && dout.len() == n && gate.len() == n && up.len() == n);
    let (dg, du) = (SharedMut::new(dgate), SharedMut::new(dup));
    pool.run(n.div_ceil(CHUNK), &|c| {
        let (start, len) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
        // SAFETY: as in `forward`.
        unsafe {
            let ins = (
                dout.as_ptr().add(start),
                gate.as_ptr().add(start),
                up.as_ptr().add(start),
            );
            let outs = (dg.get().add(start), du.get().add(start));
            match isa {
                Isa::Avx2 => backward_ymm(outs, ins, len),
                _ => backward_zmm(outs, ins, len),
            }
        }
    });
}

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_zmm(g: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(
        one,
        _mm512_add_ps(one, exp_zmm(_mm512_sub_ps(_mm512_setzero_ps(), g))),
    )
}

#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_ymm(g: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    _mm256_div_ps(
        one,
        _mm256_add_ps(one, exp_ymm(_mm256_sub_ps(_mm256_setzero_ps(), g))),
    )
}

#[target_feature(enable = "avx512f")]
unsafe fn forward_zmm(o: *mut f32, g: *const f32, u: *const f32, n: usize) {
    let mut i = 0;
    while i < n {
        let mask = if n - i >= 16 {
            0xffff
        } else {
            (1u32 << (n - i)) as u16 - 1
        };
        let gv = _mm512_maskz_loadu_ps(mask, g.add(i));
        let uv = _mm512_maskz_loadu_ps(mask, u.add(i));
        let y = _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid_zmm(gv)), uv);
        _mm512_mask_storeu_ps(o.add(i), mask, y);
        i += 16;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn forward_ymm(o: *mut f32, g: *const f32, u: *const f32, n: usize) {
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        let gv = _mm256_loadu_ps(g.add(i));
        let y = _mm256_mul_ps(
            _mm256_mul_ps(gv, sigmoid_ymm(gv)),
            _mm256_loadu_ps(u.add(i)),
        );
        _mm256_storeu_ps(o.add(i), y);
    }
    for i in full..n {
        let gv = *g.add(i);
        *o.add(i) = gv * sigmoid(gv) * *u.add(i);
    }
}

type Outs = (*mut f32, *mut f32);
type Ins = (*const f32, *const f32, *const f32);

#[target_feature(enable = "avx512f")]
unsafe fn backward_zmm((dg, du): Outs, (dy, g, u): Ins, n: usize) {
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let mask = if n - i >= 16 {
            0xffff
        } else {
            (1u32 << (n - i)) as u16 - 1
        };
        let dyv = _mm512_maskz_loadu_ps(mask, dy.add(i));
        let gv = _mm512_maskz_loadu_ps(mask, g.add(i));
        let uv = _mm512_maskz_loadu_ps(mask, u.add(i));
        let s = sigmoid_zmm(gv);
        _mm512_mask_storeu_ps(du.add(i), mask, _mm512_mul_ps(_mm512_mul_ps(dyv, gv), s));
        let inner = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
        let d = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dyv, uv), s), inner);
        _mm512_mask_storeu_ps(dg.add(i), mask, d);
        i += 16;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn backward_ymm((dg, du): Outs, (dy, g, u): Ins, n: usize) {
    let one = _mm256_set1_ps(1.0);
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        let (dyv, gv, uv) = (
            _mm256_loadu_ps(dy.add(i)),
            _mm256_loadu_ps(g.add(i)),
            _mm256_loadu_ps(u.add(i)),
        );
        let s = sigmoid_ymm(gv);
        _mm256_storeu_ps(du.add(i), _mm256_mul_ps(_mm256_mul_ps(dyv, gv), s));
        let inner = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one);
        let d = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dyv, uv), s), inner);
        _mm256_storeu_ps(dg.add(i), d);
    }
    for i in full..n {
        let (dyv, gv, uv) = (*dy.add(i), *g.add(i), *u.add(i));
        let s = sigmoid(gv);
        *du.add(i) = dyv * gv * s;
        *dg.add(i) = dyv * uv * s * (1.0 + gv * (1.0 - s));
    }
}
