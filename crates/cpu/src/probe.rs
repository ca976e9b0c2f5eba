//! Register-only throughput probes: the peak of each arithmetic the CPU tiers use, measured
//! on this machine now rather than taken from a datasheet (`kiln bench peak`). Each probe
//! keeps independent accumulators in registers (enough to cover the latency of the
//! instruction on every core kiln has met: FMA 4 cycles, `vdpbf16ps` 6–7) and never touches
//! memory in its loop, so it measures the execution units alone.

use std::arch::x86_64::*;
use std::time::Instant;

use kiln_core::cpu::Isa;

/// An arithmetic whose peak can be probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// 8-wide f32 FMA (AVX2).
    FmaYmm,
    /// 16-wide f32 FMA (AVX-512F).
    FmaZmm,
    /// `vdpbf16ps` on zmm: 32 bf16 products summed in pairs into 16 f32 (AVX512-BF16).
    Bf16Dot,
    /// `tdpbf16ps` on AMX tiles: a 16 × 32 by 32 × 16 bf16 product added into 16 × 16 f32.
    AmxBf16,
}

impl Probe {
    pub fn name(self) -> &'static str {
        match self {
            Probe::FmaYmm => "f32 FMA, ymm (AVX2)",
            Probe::FmaZmm => "f32 FMA, zmm (AVX-512F)",
            Probe::Bf16Dot => "bf16 dot, zmm (AVX512-BF16 vdpbf16ps)",
            Probe::AmxBf16 => "bf16 tiles (AMX tdpbf16ps)",
        }
    }

    /// The tier that has this instruction.
    pub fn tier(self) -> Isa {
        match self {
            Probe::FmaYmm => Isa::Avx2,
            Probe::FmaZmm => Isa::Avx512,
            Probe::Bf16Dot => Isa::Avx512bf16,
            Probe::AmxBf16 => Isa::Amx,
        }
    }

    /// FLOPs per instruction (a multiply and an add per product).
    fn flops_per_op(self) -> f64 {
        match self {
            Probe::FmaYmm => 16.0,
            Probe::FmaZmm => 32.0,
            Probe::Bf16Dot => 64.0,
            Probe::AmxBf16 => (16 * 16 * 32 * 2) as f64,
        }
    }

    /// The probe that measures the peak a backend at `isa` computes matmuls at.
    pub fn for_matmuls(isa: Isa, bf16: bool) -> Probe {
        match (isa, bf16) {
            (Isa::Avx2, _) => Probe::FmaYmm,
            (Isa::Amx, true) => Probe::AmxBf16,
            (_, true) => Probe::Bf16Dot,
            _ => Probe::FmaZmm,
        }
    }
}

/// Instructions per loop iteration: 16 accumulators on zmm (32 registers); 12 on ymm, where
/// AVX2 has only 16 registers and 16 accumulators plus two constants would spill (12 still
/// cover two FMA ports × a 4-cycle latency); 4 tiles with AMX (eight tile registers: four
/// accumulators and their four operands, the micro-kernel's own arrangement).
const PER_ITER: u64 = 16;
const PER_ITER_YMM: u64 = 12;
const PER_ITER_TILES: u64 = 4;

/// GFLOP/s of `probe` on `threads` threads at once (each spinning ~`seconds`), best of three
/// runs. `None` when the CPU lacks the instruction.
pub fn peak_gflops(probe: Probe, threads: usize, seconds: f64) -> Option<f64> {
    if kiln_core::cpu::features().missing(probe.tier()).is_some() {
        return None;
    }
    // Calibrate the iteration count on one thread.
    let iters = {
        let t = Instant::now();
        let mut n = 1u64 << 16;
        while t.elapsed().as_secs_f64() < 0.01 {
            std::hint::black_box(run(probe, n));
            n *= 2;
        }
        let per_iter = t.elapsed().as_secs_f64() / (2 * n) as f64;
        ((seconds / 3.0 / per_iter) as u64).max(1 << 16)
    };
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(run(probe, iters)));
            }
        });
        let per_iter = match probe {
            Probe::FmaYmm => PER_ITER_YMM,
            Probe::AmxBf16 => PER_ITER_TILES,
            Probe::FmaZmm | Probe::Bf16Dot => PER_ITER,
        };
        let flops = (iters * per_iter) as f64 * probe.flops_per_op() * threads as f64;
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    Some(best)
}

fn run(probe: Probe, iters: u64) -> f32 {
    // SAFETY: `peak_gflops` checked the tier before calling.
    unsafe {
        match probe {
            Probe::FmaYmm => fma_ymm(iters),
            Probe::FmaZmm => fma_zmm(iters),
            Probe::Bf16Dot => dot_bf16(iters),
            Probe::AmxBf16 => crate::gemm::amx_probe(iters),
        }
    }
}

macro_rules! sixteen_chains {
    ($acc:ident, $step:expr) => {
        for a in $acc.iter_mut() {
            *a = $step(*a);
        }
    };
}

#[target_feature(enable = "avx2,fma")]
unsafe fn fma_ymm(iters: u64) -> f32 {
    let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); PER_ITER_YMM as usize];
    for _ in 0..iters {
        sixteen_chains!(acc, |a| _mm256_fmadd_ps(a, x, y));
    }
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    _mm256_cvtss_f32(sum)
}

#[target_feature(enable = "avx512f")]
unsafe fn fma_zmm(iters: u64) -> f32 {
    let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); PER_ITER as usize];
    for _ in 0..iters {
        sixteen_chains!(acc, |a| _mm512_fmadd_ps(a, x, y));
    }
    _mm512_reduce_add_ps(
        acc.iter()
            .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a)),
    )
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_bf16(iters: u64) -> f32 {
    let x: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80)); // bf16 1.0
    let y: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380)); // bf16 ~6e-8
    let mut acc = [_mm512_setzero_ps(); PER_ITER as usize];
    for _ in 0..iters {
        sixteen_chains!(acc, |a| _mm512_dpbf16_ps(a, x, y));
    }
    _mm512_reduce_add_ps(
        acc.iter()
            .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a)),
    )
}

/// Memory read bandwidth (GB/s) on `threads` threads at once: each sums its own share of a
/// `mib`-MiB buffer (far larger than any cache) with AVX2 loads, for about `seconds`; best of
/// three passes. Decoding one token reads every weight once, so this is its speed limit (the
/// read half of STREAM, McCalpin).
pub fn memory_read_gbs(threads: usize, mib: usize, seconds: f64) -> f64 {
    let threads = threads.max(1);
    let len = (mib << 20) / 4 / threads * threads;
    // Written once, so every page is mapped before the timing.
    let buffer = vec![1.0f32; len];
    let share = len / threads;
    let one_pass = |t: usize| read_sum(&buffer[t * share..(t + 1) * share]);
    let pass = || {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || std::hint::black_box(one_pass(t)));
            }
        })
    };
    pass();
    let mut best = 0f64;
    for _ in 0..3 {
        let (t, mut passes) = (Instant::now(), 0usize);
        while passes == 0 || t.elapsed().as_secs_f64() < seconds / 3.0 {
            pass();
            passes += 1;
        }
        let bytes = (len * 4 * passes) as f64;
        best = best.max(bytes / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Σ x in 32 lanes (four ymm accumulators), so loads, not adds, bound the loop.
fn read_sum(x: &[f32]) -> f32 {
    #[target_feature(enable = "avx2")]
    unsafe fn sum(x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let blocks = x.chunks_exact(32);
        let tail: f32 = blocks.remainder().iter().sum();
        for block in blocks {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(block.as_ptr().add(8 * i)));
            }
        }
        let s = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum::<f32>() + tail
    }
    if kiln_core::cpu::features().missing(Isa::Avx2).is_some() {
        return x.iter().sum();
    }
    // SAFETY: AVX2 was checked just above.
    unsafe { sum(x) }
}
