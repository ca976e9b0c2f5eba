//! Packed, register-blocked GEMM for the CPU tiers: `C (m, n) (=|+=) A (m, k) · B (k, n)`,
//! with A and B read through row and column strides, so the three products of a linear
//! layer (X·Wᵀ, dY·W, dYᵀ·X) are one routine with different strides.
//!
//! The structure is the one every BLAS-like library uses (Goto and van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication", 2008; BLIS's five loops):
//! - B is packed into panels of NR columns, A into strips of MR rows, each k-major, so the
//!   micro-kernel streams both with unit stride; bf16 tiers pack k in pairs, the operand
//!   layout of `vdpbf16ps`, and round to bf16 while packing (f32 accumulation throughout).
//! - C is cut into tiles of MC × NC, handed out one at a time from the thread pool's
//!   counter; inside a tile the k dimension goes in blocks of KC so the B panel stays in L1
//!   and the A strips in L2 while the micro-kernel runs.
//! - The micro-kernel keeps an MR × NR block of C in registers (16 accumulators of 16 f32 on
//!   AVX-512, 12 of 8 on AVX2) and adds it to C, or overwrites C on the first k block.

mod avx2;
mod avx512;
mod bf16;

use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;

/// Which micro-kernel computes: a tier and a precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// AVX2 + FMA, f32, 6 × 16.
    Avx2F32,
    /// AVX-512F, f32, 8 × 32.
    Avx512F32,
    /// AVX512-BF16 `vdpbf16ps`, bf16 inputs and f32 accumulation, 8 × 32.
    Avx512Bf16,
}

impl Microkernel {
    /// The micro-kernel of `isa` at the given precision (bf16 only where the tier has a
    /// native bf16 dot product).
    pub fn for_isa(isa: Isa, bf16: bool) -> Self {
        match (isa, bf16) {
            (Isa::Avx2, _) => Microkernel::Avx2F32,
            (Isa::Avx512bf16 | Isa::Amx, true) => Microkernel::Avx512Bf16,
            _ => Microkernel::Avx512F32,
        }
    }

    fn mr(self) -> usize {
        match self {
            Microkernel::Avx2F32 => avx2::MR,
            Microkernel::Avx512F32 => avx512::MR,
            Microkernel::Avx512Bf16 => bf16::MR,
        }
    }

    fn nr(self) -> usize {
        match self {
            Microkernel::Avx2F32 => avx2::NR,
            Microkernel::Avx512F32 => avx512::NR,
            Microkernel::Avx512Bf16 => bf16::NR,
        }
    }

    /// Whether operands are packed as bf16 pairs.
    pub fn is_bf16(self) -> bool {
        self == Microkernel::Avx512Bf16
    }
}

/// A read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Mat<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// K elements per block: a 32-column B panel of 256 k is 32 KiB of f32 (L1 is 32–48 KiB).
const KC: usize = 256;
/// MR-strips per tile (rows of C per task ≈ 48–64) and NR-panels per tile (columns ≈ 256):
/// small enough that a step's GEMMs give each thread many tiles to balance with.
const TILE_STRIPS: usize = 8;
const TILE_PANELS: usize = 8;

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: tasks write disjoint ranges (each proves it in its comment), and the pool's `run`
// does not return before they are done.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Packed operands: f32 or bf16 bit patterns.
enum Packed {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// `C (m, n) = A · B` (or `C += A · B` with `accumulate`); C is row-major with row stride
/// `ldc`. Work goes out over `pool`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    pool: &ThreadPool,
    kernel: Microkernel,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too short");
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
        }
        return;
    }
    let (mr, nr) = (kernel.mr(), kernel.nr());
    // bf16 packs k in pairs: pad k to even with zeros.
    let kp = if kernel.is_bf16() {
        k.next_multiple_of(2)
    } else {
        k
    };
    let (strips, panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let a_packed = pack(pool, kernel, strips, mr, kp, |s, kk, r| {
        let i = s * mr + r;
        if i < m && kk < k {
            a.at(i, kk)
        } else {
            0.0
        }
    });
    let b_packed = pack(pool, kernel, panels, nr, kp, |p, kk, col| {
        let j = p * nr + col;
        if j < n && kk < k {
            b.at(kk, j)
        } else {
            0.0
        }
    });
    let tiles_m = strips.div_ceil(TILE_STRIPS);
    let tiles_n = panels.div_ceil(TILE_PANELS);
    let c_ptr = Shared(c.as_mut_ptr());
    let task = |t: usize| {
        let (tm, tn) = (t / tiles_n, t % tiles_n);
        let strip_range = tm * TILE_STRIPS..((tm + 1) * TILE_STRIPS).min(strips);
        let panel_range = tn * TILE_PANELS..((tn + 1) * TILE_PANELS).min(panels);
        for pc in (0..kp).step_by(KC) {
            let kc = KC.min(kp - pc);
            let overwrite = pc == 0 && !accumulate;
            for p in panel_range.clone() {
                for s in strip_range.clone() {
                    let (i0, j0) = (s * mr, p * nr);
                    let (rows, cols) = (mr.min(m - i0), nr.min(n - j0));
                    // SAFETY: tile (tm, tn) covers rows i0..i0+rows and columns j0..j0+cols
                    // of C, which no other task touches; the packed operands hold strip s
                    // and panel p over all of kp, so offset pc·MR and pc·NR plus kc·MR and
                    // kc·NR stay inside them.
                    unsafe {
                        let c_tile = c_ptr.get().add(i0 * ldc + j0);
                        run_kernel(
                            kernel, &a_packed, &b_packed, s, p, pc, kc, kp, c_tile, ldc, rows,
                            cols, overwrite,
                        );
                    }
                }
            }
        }
    };
    pool.run(tiles_m * tiles_n, &task);
}

/// Calls the micro-kernel on strip `s` of A and panel `p` of B over k `pc..pc + kc`.
///
/// # Safety
/// `c` points to an MR × NR (at least `rows` × `cols`) block of C with row stride `ldc`,
/// written by no one else; the packed operands come from [`pack`] for this kernel and `kp`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_kernel(
    kernel: Microkernel,
    a: &Packed,
    b: &Packed,
    s: usize,
    p: usize,
    pc: usize,
    kc: usize,
    kp: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    match (kernel, a, b) {
        (Microkernel::Avx2F32, Packed::F32(a), Packed::F32(b)) => {
            let ap = a.as_ptr().add(s * kp * mr + pc * mr);
            let bp = b.as_ptr().add(p * kp * nr + pc * nr);
            avx2::kernel(kc, ap, bp, c, ldc, rows, cols, overwrite)
        }
        (Microkernel::Avx512F32, Packed::F32(a), Packed::F32(b)) => {
            let ap = a.as_ptr().add(s * kp * mr + pc * mr);
            let bp = b.as_ptr().add(p * kp * nr + pc * nr);
            avx512::kernel(kc, ap, bp, c, ldc, rows, cols, overwrite)
        }
        (Microkernel::Avx512Bf16, Packed::Bf16(a), Packed::Bf16(b)) => {
            let ap = a.as_ptr().add(s * kp * mr + pc * mr);
            let bp = b.as_ptr().add(p * kp * nr + pc * nr);
            bf16::kernel(kc / 2, ap, bp, c, ldc, rows, cols, overwrite)
        }
        _ => unreachable!("operands are packed for the kernel that reads them"),
    }
}

/// Packs `groups` groups of `width` rows (A strips) or columns (B panels) over `kp` k values:
/// f32 as `[group][k][width]`, bf16 as `[group][k / 2][width][2]` (the pair layout of
/// `vdpbf16ps`). `value(group, k, lane)` gives each element (zero past the matrix's edge).
fn pack(
    pool: &ThreadPool,
    kernel: Microkernel,
    groups: usize,
    width: usize,
    kp: usize,
    value: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Packed {
    let per_group = kp * width;
    if kernel.is_bf16() {
        let mut out = vec![0u16; groups * per_group];
        let ptr = Shared(out.as_mut_ptr());
        pool.run(groups, &|g| {
            // SAFETY: group g writes only its own `per_group` elements.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(g * per_group), per_group) };
            for kk in (0..kp).step_by(2) {
                let row = &mut dst[kk * width..(kk + 2) * width];
                for lane in 0..width {
                    row[2 * lane] = half::bf16::from_f32(value(g, kk, lane)).to_bits();
                    row[2 * lane + 1] = half::bf16::from_f32(value(g, kk + 1, lane)).to_bits();
                }
            }
        });
        Packed::Bf16(out)
    } else {
        let mut out = vec![0f32; groups * per_group];
        let ptr = Shared(out.as_mut_ptr());
        pool.run(groups, &|g| {
            // SAFETY: group g writes only its own `per_group` elements.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(g * per_group), per_group) };
            for kk in 0..kp {
                for lane in 0..width {
                    dst[kk * width + lane] = value(g, kk, lane);
                }
            }
        });
        Packed::F32(out)
    }
}

/// Adds (or, with `overwrite`, writes) the `rows` × `cols` corner of an MR × NR block of
/// accumulators in `tile` into C. The micro-kernels use it at the edges of C.
///
/// # Safety
/// `c` points to a `rows` × `cols` block of C with row stride `ldc`.
unsafe fn merge_edge(
    tile: &[f32],
    nr: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    for i in 0..rows {
        for j in 0..cols {
            let dst = c.add(i * ldc + j);
            let v = tile[i * nr + j];
            *dst = if overwrite { v } else { *dst + v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C = A·B` in f64, the plain triple loop.
    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            }
        }
        c
    }

    fn kernels() -> Vec<Microkernel> {
        let f = kiln_core::cpu::features();
        let mut out = Vec::new();
        if f.supports(Isa::Avx2) {
            out.push(Microkernel::Avx2F32);
        }
        if f.supports(Isa::Avx512) {
            out.push(Microkernel::Avx512F32);
        }
        if f.supports(Isa::Avx512bf16) {
            out.push(Microkernel::Avx512Bf16);
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_triple_loop_at_awkward_shapes_and_strides() {
        let pool = ThreadPool::new(2);
        let mut state = 1u32;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        // Edges in every dimension, k across a KC block and odd (bf16 pads a pair), and
        // transposed operands.
        for (m, n, k) in [
            (1, 1, 1),
            (7, 13, 5),
            (9, 33, 17),
            (65, 70, 300),
            (130, 257, 513),
        ] {
            let a_data = rand(m * k);
            let b_data = rand(k * n);
            for (a, b) in [
                (
                    Mat {
                        data: &a_data,
                        rs: k,
                        cs: 1,
                    },
                    Mat {
                        data: &b_data,
                        rs: n,
                        cs: 1,
                    },
                ),
                (
                    Mat {
                        data: &a_data,
                        rs: 1,
                        cs: m,
                    },
                    Mat {
                        data: &b_data,
                        rs: 1,
                        cs: k,
                    },
                ),
            ] {
                let want = naive(m, n, k, a, b);
                for kernel in kernels() {
                    // bf16 rounds each input to 8 significant bits (relative 2⁻⁹): the
                    // products' error is at most ~2⁻⁸·Σ|a||b| ≤ 2⁻⁸·k/4 for inputs in ±½.
                    let tol = if kernel.is_bf16() {
                        4e-3 * k as f64 / 4.0 + 1e-6
                    } else {
                        1e-5 * k as f64
                    };
                    let start = rand(m * n);
                    for accumulate in [false, true] {
                        let mut c = start.clone();
                        gemm(&pool, kernel, m, n, k, a, b, &mut c, n, accumulate);
                        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let w = w + if accumulate { start[idx] as f64 } else { 0.0 };
                            assert!(
                                (got as f64 - w).abs() <= tol,
                                "{kernel:?} {m}×{n}×{k} acc {accumulate}: C[{idx}] {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
