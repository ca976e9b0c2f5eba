//! The AMX-BF16 micro-kernel: a 32 × 32 block of C in four 16 × 16 f32 tiles, fed by
//! `tdpbf16ps`, which adds to each tile the product of a 16-row tile of A (32 bf16 of k per
//! row) and a tile of B (16 rows of k pairs, 16 columns of pairs). The 2 × 2 blocking is the
//! one of Intel's AMX guide and oneDNN's brgemm: two A tiles and two B tiles, four loads, feed
//! four products per 32 k, and the eight tile registers are all in use.
//!
//! Operands:
//! - B is the bf16 pair layout of the AVX512-BF16 kernel (`[k / 2][32 columns][2]`, a panel of
//!   32 columns), so the weight copies AdamW writes serve both kernels: a B tile is 16 pair
//!   rows of one half panel, read with a stride of 128 bytes.
//! - A is packed here in strips of 32 rows cut into blocks of 32 k, `[k / 32][32 rows][32 k]`,
//!   so an A tile is 1 KiB of contiguous rows (stride 64 bytes), and block `pc / 32` of a
//!   strip starts at `pc · 32`, where the driver's k-major offset `pc · MR` puts it.
//! - k is padded with zeros to a multiple of 32 (one product's depth) in both.
//!
//! Rust has no tile register class, so a whole micro-kernel call (the tile configuration,
//! its loads, products and stores, and `tilerelease`) is one `asm!` block, and nothing else
//! in the process touches the tile registers. A full 32 × 32 block of C is loaded into the
//! accumulators (or zeroed, to overwrite) and stored back in place; an edge block goes
//! through a 32 × 32 buffer and is merged by rows and columns.
//!
//! The tier exists only where CPUID, XCR0 and the OS's permission say AMX is usable
//! (`kiln_core::cpu`); the unit tests also run the kernel's exact instruction sequence
//! through an emulation of the tile instructions (Intel SDM vol. 2, "TILELOADD", "TDPBF16PS",
//! "TILESTORED", "LDTILECFG"), so its packing, offsets, strides and configuration are checked
//! on machines without AMX.

use std::arch::x86_64::*;

pub const MR: usize = 32;
pub const NR: usize = 32;
/// k per product: a tile row of A holds 32 bf16 (64 bytes, the most a tile row holds).
pub const K_STEP: usize = 32;

/// The 64-byte operand of `ldtilecfg` (palette 1): bytes per row and rows of each tile.
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// tmm0–3 the four 16 × 16 f32 blocks of C (C00, C01, C10, C11), tmm4–5 A's rows 0–15 and
/// 16–31 (16 rows of 32 bf16), tmm6–7 B's columns 0–15 and 16–31 (16 rows of k pairs, 16
/// columns): 16 rows of 64 bytes each.
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Bytes from one A block of 32 k (32 rows × 64 bytes) to the next, and from one B block (16
/// pair rows × 128 bytes) to the next.
const A_BLOCK_BYTES: usize = MR * K_STEP * 2;
const B_BLOCK_BYTES: usize = (K_STEP / 2) * NR * 4;

/// `C[..rows, ..cols] (=|+=) A_strip · B_panel` over `kc` k (a multiple of [`K_STEP`]).
///
/// # Safety
/// The CPU has AMX-BF16 and AVX-512F and the OS granted this process the tile data; `a`
/// holds `kc · MR` and `b` `kc · NR` bf16 values packed as the module docs say; `c` is a
/// `rows` × `cols` block (rows ≤ MR, cols ≤ NR) with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel(
    kc: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    debug_assert!(kc > 0 && kc.is_multiple_of(K_STEP));
    let steps = kc / K_STEP;
    if rows == MR && cols == NR {
        tiles(steps, a, b, (c, ldc), !overwrite);
    } else {
        let mut tile = [0f32; MR * NR];
        tiles(steps, a, b, (tile.as_mut_ptr(), NR), false);
        merge(&tile, c, ldc, rows, cols, overwrite);
    }
}

/// The tile program: C's four tiles loaded from `c` (with `load_c`) or zeroed, `steps` blocks
/// of 32 k multiplied in, the tiles stored back to `c` (row stride `ldc` f32).
///
/// # Safety
/// As [`kernel`], with `c` a full 32 × 32 block.
unsafe fn tiles(steps: usize, a: *const u16, b: *const u16, c: (*mut f32, usize), load_c: bool) {
    #[cfg(test)]
    if !kiln_core::cpu::features().supports(kiln_core::cpu::Isa::Amx) {
        return emulation::tiles(&CONFIG, steps, a, b, c, load_c);
    }
    let (c, ldc) = c;
    // SAFETY: the caller guarantees AMX and the operands' extents; the configuration is
    // 64-byte aligned; every load reads 16 rows of 64 bytes inside A's block (stride 64),
    // B's block (stride 128) or C (stride 4·ldc), and the stores write C's 32 × 32 block.
    std::arch::asm!(
        "ldtilecfg [{cfg}]",
        "test {load}, {load}",
        "jz 2f",
        "tileloadd tmm0, [{c} + {cs}*1]",
        "tileloadd tmm1, [{c} + {cs}*1 + 64]",
        "tileloadd tmm2, [{c16} + {cs}*1]",
        "tileloadd tmm3, [{c16} + {cs}*1 + 64]",
        "jmp 3f",
        "2:",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "3:",
        "tileloadd tmm4, [{a} + {a_stride}*1]",
        "tileloadd tmm5, [{a} + {a_stride}*1 + 1024]",
        "tileloadd tmm6, [{b} + {b_stride}*1]",
        "tileloadd tmm7, [{b} + {b_stride}*1 + 64]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, {a_block}",
        "add {b}, {b_block}",
        "dec {steps}",
        "jnz 3b",
        "tilestored [{c} + {cs}*1], tmm0",
        "tilestored [{c} + {cs}*1 + 64], tmm1",
        "tilestored [{c16} + {cs}*1], tmm2",
        "tilestored [{c16} + {cs}*1 + 64], tmm3",
        "tilerelease",
        cfg = in(reg) &CONFIG,
        load = in(reg) load_c as usize,
        c = in(reg) c,
        c16 = in(reg) c.add(16 * ldc),
        cs = in(reg) ldc * 4,
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        steps = inout(reg) steps => _,
        a_stride = in(reg) K_STEP * 2,
        b_stride = in(reg) NR * 4,
        a_block = const A_BLOCK_BYTES,
        b_block = const B_BLOCK_BYTES,
        options(nostack),
    );
}

/// The register-only peak probe (`kiln bench peak`): `iters` times four `tdpbf16ps` on the
/// kernel's tiles (four independent accumulators, as the kernel has), with no load in the
/// loop. Returns an element of a result so the work is used.
///
/// # Safety
/// The CPU has AMX-BF16 and the OS granted this process the tile data.
pub(crate) unsafe fn probe(iters: u64) -> f32 {
    let a = [0x3f80u16; 512]; // bf16 1.0
    let b = [0x3380u16; 512]; // bf16 ~6e-8
    let mut out = [0f32; 256];
    // SAFETY: the caller guarantees AMX; the loads read 16 rows of 64 bytes of `a` and `b`
    // (1 KiB each), the store writes 16 rows of 64 bytes into `out` (1 KiB).
    std::arch::asm!(
        "ldtilecfg [{cfg}]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tileloadd tmm4, [{a} + {stride}*1]",
        "tileloadd tmm5, [{a} + {stride}*1]",
        "tileloadd tmm6, [{b} + {stride}*1]",
        "tileloadd tmm7, [{b} + {stride}*1]",
        "2:",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "dec {iters}",
        "jnz 2b",
        "tilestored [{out} + {stride}*1], tmm0",
        "tilerelease",
        cfg = in(reg) &CONFIG,
        a = in(reg) a.as_ptr(),
        b = in(reg) b.as_ptr(),
        out = in(reg) out.as_mut_ptr(),
        stride = in(reg) 64usize,
        iters = inout(reg) iters.max(1) => _,
        options(nostack),
    );
    out[0]
}

/// Adds (or, with `overwrite`, writes) the `rows` × `cols` corner of a 32 × 32 block in
/// `tile` into C, by whole rows of 16 with masks at the right edge.
///
/// # Safety
/// The CPU has AVX-512F; `c` is a `rows` × `cols` block of C with row stride `ldc`.
#[target_feature(enable = "avx512f")]
unsafe fn merge(
    tile: &[f32; MR * NR],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
    for i in 0..rows {
        for (h, &mask) in masks.iter().enumerate() {
            let d = c.add(i * ldc + 16 * h);
            let v = _mm512_loadu_ps(tile.as_ptr().add(i * NR + 16 * h));
            let v = if overwrite {
                v
            } else {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, d))
            };
            _mm512_mask_storeu_ps(d, mask, v);
        }
    }
}

/// Packs `lanes` rows whose k values are contiguous (`src[base + lane · lane_stride + kk]`)
/// into A's layout `[kp / 32][width][32]`: each row's 32 k of a block rounded to bf16 by one
/// `vcvtne2ps2bf16` (round to nearest even, as the scalar path) and stored as one 64-byte
/// row. The last block's k past `k` read as zeros (masked loads).
///
/// # Safety
/// The CPU has AVX512-BF16; `dst` holds `kp · width` values with `kp ≥ k` a multiple of 32;
/// every lane's k values lie inside `src`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn pack_rows_k_contiguous(
    dst: &mut [u16],
    src: &[f32],
    (base, lane_stride): (usize, usize),
    lanes: usize,
    width: usize,
    k: usize,
) {
    let blocks = k.div_ceil(K_STEP);
    assert!(
        dst.len() >= blocks * width * K_STEP,
        "pack: destination too short"
    );
    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let s = src.as_ptr();
    for lane in 0..lanes {
        let row = s.add(base + lane * lane_stride);
        for block in 0..blocks {
            let (k0, left) = (block * K_STEP, k - block * K_STEP);
            let (lo, hi) = if left >= K_STEP {
                (
                    _mm512_loadu_ps(row.add(k0)),
                    _mm512_loadu_ps(row.add(k0 + 16)),
                )
            } else {
                (
                    _mm512_maskz_loadu_ps(mask(left), row.add(k0)),
                    _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), row.add(k0 + 16)),
                )
            };
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let at = dst.as_mut_ptr().add((block * width + lane) * K_STEP);
            _mm512_storeu_si512(at as *mut __m512i, v);
        }
    }
}

/// Packs `lanes` (≤ 32) contiguous lanes (`src[base + lane + kk · k_stride]`, the transposed
/// operands: dYᵀ in a weight gradient) into A's layout: per block of 32 k, each pair of k rows
/// is rounded and interleaved into 32 lanes' pairs (as the AVX512-BF16 packer does), which
/// land in a 16 × 32 block of pairs; each lane's 16 pairs are then gathered from its column
/// into one 64-byte row.
///
/// # Safety
/// The CPU has AVX512-BF16 and AVX512BW; `width` ≤ 32; `dst` holds `kp · width` values with
/// `kp ≥ k` a multiple of 32; rows `base + kk · k_stride`, kk < k, hold `lanes` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn pack_rows_lanes_contiguous(
    dst: &mut [u16],
    src: &[f32],
    (base, k_stride): (usize, usize),
    lanes: usize,
    width: usize,
    k: usize,
) {
    assert!(
        lanes <= width && width <= 32,
        "pack: {lanes} lanes of {width}"
    );
    let blocks = k.div_ceil(K_STEP);
    assert!(
        dst.len() >= blocks * width * K_STEP,
        "pack: destination too short"
    );
    // vcvtne2ps2bf16(b, a) puts a's 16 values in the low half and b's in the high half;
    // pair i takes element i of each.
    const INTERLEAVE: [i16; 32] = [
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12,
        28, 13, 29, 14, 30, 15, 31,
    ];
    let interleave = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let masks = [mask(lanes), mask(lanes.saturating_sub(16))];
    // Row p: the 32 lanes' pairs of k 2p and 2p + 1; column j gathered with stride 32.
    let mut pairs = [0i32; 16 * 32];
    let column = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(32),
    );
    let s = src.as_ptr();
    let row = |kk: usize, h: usize| {
        if kk < k {
            _mm512_maskz_loadu_ps(masks[h], s.add(base + kk * k_stride + 16 * h))
        } else {
            _mm512_setzero_ps()
        }
    };
    for block in 0..blocks {
        let k0 = block * K_STEP;
        for p in 0..K_STEP / 2 {
            for h in 0..2 {
                let (a, b) = (row(k0 + 2 * p, h), row(k0 + 2 * p + 1, h));
                let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                let interleaved = _mm512_permutexvar_epi16(interleave, halves);
                let at = pairs.as_mut_ptr().add(p * 32 + 16 * h);
                _mm512_storeu_si512(at as *mut __m512i, interleaved);
            }
        }
        for lane in 0..lanes {
            let gathered = _mm512_i32gather_epi32::<4>(column, pairs.as_ptr().add(lane));
            let at = dst.as_mut_ptr().add((block * width + lane) * K_STEP);
            _mm512_storeu_si512(at as *mut __m512i, gathered);
        }
    }
}

/// The tile instructions the kernel uses, executed in software on the emulated tile
/// registers as the Intel SDM defines them, so the tests check the kernel's instruction
/// sequence (configuration, addresses, strides, operand roles) on any machine.
/// `tdpbf16ps` is emulated in f32 with the two products of a pair added in order; the
/// hardware flushes denormals and may round differently inside a pair, well within the bf16
/// bounds the tests use.
#[cfg(test)]
mod emulation {
    use super::TileConfig;

    struct Tiles {
        rows: [usize; 8],
        colsb: [usize; 8],
        data: [[u8; 1024]; 8],
    }

    impl Tiles {
        /// `ldtilecfg`: palette 1 has eight tiles of at most 16 rows of 64 bytes.
        fn configure(cfg: &TileConfig) -> Self {
            assert_eq!(cfg.palette, 1, "ldtilecfg: palette");
            assert_eq!(cfg.start_row, 0, "ldtilecfg: start row");
            assert!(
                cfg.reserved.iter().all(|&b| b == 0),
                "ldtilecfg: reserved bytes"
            );
            assert!(
                cfg.rows[8..].iter().all(|&r| r == 0) && cfg.colsb[8..].iter().all(|&c| c == 0),
                "ldtilecfg: palette 1 has 8 tiles"
            );
            let mut tiles = Tiles {
                rows: [0; 8],
                colsb: [0; 8],
                data: [[0; 1024]; 8],
            };
            for t in 0..8 {
                assert!(cfg.rows[t] <= 16 && cfg.colsb[t] <= 64 && cfg.colsb[t].is_multiple_of(4));
                tiles.rows[t] = cfg.rows[t] as usize;
                tiles.colsb[t] = cfg.colsb[t] as usize;
            }
            tiles
        }

        /// `tileloadd tmm{t}, [base + stride]`: rows × colsb bytes, row r from base + r·stride.
        unsafe fn load(&mut self, t: usize, base: *const u8, stride: usize) {
            for r in 0..self.rows[t] {
                let n = self.colsb[t];
                let src = std::slice::from_raw_parts(base.add(r * stride), n);
                self.data[t][r * 64..r * 64 + n].copy_from_slice(src);
            }
        }

        fn zero(&mut self, t: usize) {
            self.data[t] = [0; 1024];
        }

        /// `tilestored [base + stride], tmm{t}`.
        unsafe fn store(&self, t: usize, base: *mut u8, stride: usize) {
            for r in 0..self.rows[t] {
                let n = self.colsb[t];
                let dst = std::slice::from_raw_parts_mut(base.add(r * stride), n);
                dst.copy_from_slice(&self.data[t][r * 64..r * 64 + n]);
            }
        }

        fn f32_at(&self, t: usize, r: usize, col: usize) -> f32 {
            let at = r * 64 + col * 4;
            f32::from_le_bytes(self.data[t][at..at + 4].try_into().unwrap())
        }

        fn bf16_at(&self, t: usize, r: usize, col: usize) -> f32 {
            let at = r * 64 + col * 2;
            let bits = u16::from_le_bytes([self.data[t][at], self.data[t][at + 1]]);
            f32::from_bits((bits as u32) << 16)
        }

        /// `tdpbf16ps tmm{c}, tmm{a}, tmm{b}`: C[m][n] += Σ_k A.bf16[m][2k]·B.bf16[k][2n] +
        /// A.bf16[m][2k+1]·B.bf16[k][2n+1], with the SDM's shape checks.
        fn dpbf16ps(&mut self, c: usize, a: usize, b: usize) {
            let (m, k, n) = (self.rows[a], self.colsb[a] / 4, self.colsb[b] / 4);
            assert_eq!(self.rows[c], m, "tdpbf16ps: C rows ≠ A rows");
            assert_eq!(
                self.colsb[c], self.colsb[b],
                "tdpbf16ps: C columns ≠ B columns"
            );
            assert_eq!(self.rows[b], k, "tdpbf16ps: B rows ≠ A's k pairs");
            for i in 0..m {
                for j in 0..n {
                    let mut acc = self.f32_at(c, i, j);
                    for p in 0..k {
                        acc += self.bf16_at(a, i, 2 * p) * self.bf16_at(b, p, 2 * j);
                        acc += self.bf16_at(a, i, 2 * p + 1) * self.bf16_at(b, p, 2 * j + 1);
                    }
                    let at = i * 64 + j * 4;
                    self.data[c][at..at + 4].copy_from_slice(&acc.to_le_bytes());
                }
            }
        }
    }

    /// The asm block of `super::tiles`, instruction by instruction.
    pub(super) unsafe fn tiles(
        cfg: &TileConfig,
        steps: usize,
        a: *const u16,
        b: *const u16,
        (c, ldc): (*mut f32, usize),
        load_c: bool,
    ) {
        let mut t = Tiles::configure(cfg);
        let (c, c16, cs) = (c as *mut u8, c.add(16 * ldc) as *mut u8, ldc * 4);
        if load_c {
            t.load(0, c, cs);
            t.load(1, c.add(64), cs);
            t.load(2, c16, cs);
            t.load(3, c16.add(64), cs);
        } else {
            (0..4).for_each(|i| t.zero(i));
        }
        let (mut a, mut b) = (a as *const u8, b as *const u8);
        let (a_stride, b_stride) = (super::K_STEP * 2, super::NR * 4);
        for _ in 0..steps {
            t.load(4, a, a_stride);
            t.load(5, a.add(1024), a_stride);
            t.load(6, b, b_stride);
            t.load(7, b.add(64), b_stride);
            t.dpbf16ps(0, 4, 6);
            t.dpbf16ps(1, 4, 7);
            t.dpbf16ps(2, 5, 6);
            t.dpbf16ps(3, 5, 7);
            a = a.add(super::A_BLOCK_BYTES);
            b = b.add(super::B_BLOCK_BYTES);
        }
        t.store(0, c, cs);
        t.store(1, c.add(64), cs);
        t.store(2, c16, cs);
        t.store(3, c16.add(64), cs);
    }
}
