//! Products of many rows with int8 or ternary weights (prefill and evaluation with
//! `--weights int8|packed`): the quantities [`crate::int8`] computes for a few rows — each
//! input row quantized per group of 64 (32 where the weight's groups need it) as llama2.c's
//! `runq.c` quantizes its activations, integer sums inside each group, scaled by the input's
//! and the weight's scales:
//! `out[r, j] = Σ_g sw[j, g] · sx[r, g] · Σ_{k ∈ g} q[j, k] · p[r, k]` — as a register-blocked
//! GEMM, so each weight vector loaded serves [`MR`] input rows and each input quad, broadcast,
//! [`NR`] weight rows. Accumulation rule: the output is overwritten.
//!
//! The weights are repacked once per matrix into [`Panels`] (kept with the codes, built on the
//! first product of many rows): panels of [`NR`] weight rows; per input group, each 4-column
//! quad of the panel's rows side by side, the B operand layout of a `vpdpbusd` whose A quad
//! is broadcast (oneDNN's and ggml's x86 int8 GEMMs pack B the same way), with the group's
//! weight scales beside them. Ternary codes are widened to bytes there: a GEMM is bound by
//! its arithmetic, not by the weight bytes.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the inputs are stored offset by 128
//! (1..=255) and each group's integer sum starts at `−128 · Σ_{k ∈ g} q[j, k]`, precomputed
//! in the panel. On plain AVX2, `vpmaddubsw` would saturate on such products
//! (2 · 255 · 127 > 32,767), so that kernel takes the inputs back to signed bytes and moves
//! the weight's sign onto them (`|q| · (p · sign q)`, at most 2 · 127² per pair, as
//! [`crate::int8`] does), without the offset.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use kiln_core::cpu::{self, Isa};

use crate::int8::Int8Dot;
use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Weight rows per panel: two 16-lane vectors of i32 sums.
pub const NR: usize = 32;
/// Input rows per kernel call.
pub const MR: usize = 6;
/// Input rows per task (a block of inputs that stays in L2 while a task's panels pass).
const MB: usize = 96;
/// Panels per task.
const PANELS_PER_TASK: usize = 4;

/// 64-byte aligned storage, so the kernels' 64-byte loads never straddle cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A weight matrix `(n, k)` repacked for [`forward`]: per panel of [`NR`] rows (the last one
/// padded with zero codes and scales), per input group, a block of the rows' offsets
/// (`NR` i32: −128 · Σ q over the group), their scales (`NR` f32) and the group's codes
/// (`group / 4` quads, each `NR` rows × 4 bytes).
#[derive(Clone)]
pub struct Panels {
    n: usize,
    k: usize,
    /// The inputs' group: 64, or 32 when the weight's group is not a multiple of 64.
    group: usize,
    lines: Vec<Line>,
}

impl Panels {
    /// The panels of a weight `(n, k)` in groups of `weight_group` (a multiple of 32 that
    /// divides `k`), its scales `(n, k / weight_group)` and its codes, row `j` written into
    /// a slice of `k` by `row(j, slice)`.
    pub fn new(
        (n, k, weight_group): (usize, usize, usize),
        scales: &[f32],
        row: impl Fn(usize, &mut [i8]),
    ) -> Self {
        assert!(weight_group.is_multiple_of(32) && k.is_multiple_of(weight_group));
        assert_eq!(scales.len(), n * (k / weight_group), "int8 panels: scales");
        let group = input_group(weight_group);
        let (blocks, block) = (k / group, block_bytes(group));
        let panels = n.div_ceil(NR);
        let mut lines = Vec::new();
        crate::shared::reserve_huge(&mut lines, panels * blocks * block / 64);
        lines.resize(panels * blocks * block / 64, Line([0; 64]));
        // SAFETY: `Line` is 64 plain bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64)
        };
        let mut codes = vec![0i8; NR * k];
        for p in 0..panels {
            codes.fill(0);
            let live = NR.min(n - p * NR);
            for (c, codes) in codes.chunks_exact_mut(k).take(live).enumerate() {
                row(p * NR + c, codes);
            }
            for b in 0..blocks {
                let out = &mut bytes[(p * blocks + b) * block..][..block];
                for (c, codes) in codes.chunks_exact(k).enumerate() {
                    let codes = &codes[b * group..(b + 1) * group];
                    let offset = -128 * codes.iter().map(|&q| q as i32).sum::<i32>();
                    out[4 * c..4 * c + 4].copy_from_slice(&offset.to_le_bytes());
                    let j = p * NR + c;
                    let scale = if c < live {
                        scales[j * (k / weight_group) + b * group / weight_group]
                    } else {
                        0.0
                    };
                    out[4 * NR + 4 * c..][..4].copy_from_slice(&scale.to_le_bytes());
                    for (q, quad) in codes.chunks_exact(4).enumerate() {
                        let at = 8 * NR + q * 4 * NR + 4 * c;
                        for (o, &v) in out[at..at + 4].iter_mut().zip(quad) {
                            *o = v as u8;
                        }
                    }
                }
            }
        }
        Panels { n, k, group, lines }
    }

    /// `(n, k)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn bytes(&self) -> *const u8 {
        self.lines.as_ptr().cast()
    }
}

/// The inputs' group for weights in groups of `weight_group` (as [`crate::int8`]).
fn input_group(weight_group: usize) -> usize {
    if weight_group.is_multiple_of(64) {
        64
    } else {
        32
    }
}

/// The bytes of one panel's block for an input group of `group`.
fn block_bytes(group: usize) -> usize {
    8 * NR + NR * group
}

/// Panels built on first use and kept with the codes they come from; a copy of the codes
/// made by `clone` carries them, and two caches always compare equal (they hold nothing the
/// codes do not say).
#[derive(Clone, Default)]
pub struct Cache(OnceLock<Panels>);

impl Cache {
    /// The panels, built by `build` the first time.
    pub fn get_or_build(&self, build: impl FnOnce() -> Panels) -> &Panels {
        self.0.get_or_init(build)
    }
}

impl PartialEq for Cache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Cache(built)"
        } else {
            "Cache(empty)"
        })
    }
}

/// Input rows quantized for one product: `(rows, k)` codes offset by 128, `(rows, k /
/// group)` scales.
#[derive(Default)]
struct Inputs {
    codes: Vec<u8>,
    scales: Vec<f32>,
}

thread_local! {
    /// The calling thread's quantized inputs, reused from product to product.
    static INPUTS: RefCell<Inputs> = RefCell::default();
}

/// `out (rows, n) = x (rows, k) · wᵀ` for the weight whose panels are `w` (see the module
/// docs).
pub fn forward(
    dot: Int8Dot,
    pool: &ThreadPool,
    out: &mut [f32],
    x: &[f32],
    w: &Panels,
    rows: usize,
) {
    let (n, k, group) = (w.n, w.k, w.group);
    assert_eq!(x.len(), rows * k, "int8 gemm: x");
    assert_eq!(out.len(), rows * n, "int8 gemm: out");
    let f = cpu::features();
    match dot {
        Int8Dot::Vnni512 => assert!(f.avx512_vnni && f.supports(Isa::Avx512)),
        Int8Dot::AvxVnni => assert!(f.avx_vnni && f.supports(Isa::Avx2)),
        Int8Dot::Avx2 => assert!(f.supports(Isa::Avx2)),
    }
    let blocks = k / group;
    INPUTS.with(|inputs| {
        let mut inputs = inputs.borrow_mut();
        let inputs = &mut *inputs;
        inputs.codes.resize(rows * k, 0);
        inputs.scales.resize(rows * blocks, 0.0);
        quantize(pool, x, (rows, k, group), inputs);
        let (a, sx) = (&inputs.codes, &inputs.scales);
        let o = SharedMut::from_raw(out.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let panel_bytes = blocks * block_bytes(group);
        let column_tasks = panels.div_ceil(PANELS_PER_TASK);
        pool.run(column_tasks * rows.div_ceil(MB), &|t| {
            let (first, rb) = (t % column_tasks * PANELS_PER_TASK, t / column_tasks);
            for p in first..panels.min(first + PANELS_PER_TASK) {
                let cols = NR.min(n - p * NR);
                for r in (rb * MB..rows.min((rb + 1) * MB)).step_by(MR) {
                    let tile = Tile {
                        panel: w.bytes().wrapping_add(p * panel_bytes),
                        blocks,
                        a: a[r * k..].as_ptr(),
                        k,
                        sx: sx[r * blocks..].as_ptr(),
                        out: o.get().wrapping_add(r * n + p * NR),
                        n,
                        cols,
                    };
                    // SAFETY: the features were checked above; the tile reads its panel
                    // (`blocks` whole blocks), `MR.min(rows − r)` input rows of `k` codes and
                    // `blocks` scales, and writes columns `p·NR..p·NR + cols` of those output
                    // rows, which are this task's alone (tasks differ in panel or row block).
                    unsafe { tile.run(dot, MR.min(rows - r), group / 4) }
                }
            }
        });
    });
}

/// One kernel call: up to [`MR`] input rows against one panel.
#[derive(Clone, Copy)]
struct Tile {
    panel: *const u8,
    blocks: usize,
    /// The first input row's codes; the next rows follow `k` apart.
    a: *const u8,
    k: usize,
    /// The first input row's scales; the next rows follow `blocks` apart.
    sx: *const f32,
    /// The output of the first row and the panel's first column; rows `n` apart.
    out: *mut f32,
    n: usize,
    /// The panel's live columns (≤ [`NR`]).
    cols: usize,
}

impl Tile {
    /// Dispatches to the kernel for `rows` input rows and `quads` quads per group.
    ///
    /// # Safety
    /// As [`forward`] says at its call.
    unsafe fn run(self, dot: Int8Dot, rows: usize, quads: usize) {
        macro_rules! dispatch {
            ($kernel:ident $(, $half:literal)?) => {
                match (rows, quads) {
                    (6, 16) => $kernel::<6, 16 $(, $half)?>(self),
                    (5, 16) => $kernel::<5, 16 $(, $half)?>(self),
                    (4, 16) => $kernel::<4, 16 $(, $half)?>(self),
                    (3, 16) => $kernel::<3, 16 $(, $half)?>(self),
                    (2, 16) => $kernel::<2, 16 $(, $half)?>(self),
                    (1, 16) => $kernel::<1, 16 $(, $half)?>(self),
                    (6, 8) => $kernel::<6, 8 $(, $half)?>(self),
                    (5, 8) => $kernel::<5, 8 $(, $half)?>(self),
                    (4, 8) => $kernel::<4, 8 $(, $half)?>(self),
                    (3, 8) => $kernel::<3, 8 $(, $half)?>(self),
                    (2, 8) => $kernel::<2, 8 $(, $half)?>(self),
                    (1, 8) => $kernel::<1, 8 $(, $half)?>(self),
                    _ => unreachable!("int8 gemm: {rows} rows, {quads} quads"),
                }
            };
        }
        match dot {
            Int8Dot::Vnni512 => dispatch!(tile_vnni512),
            Int8Dot::AvxVnni => {
                dispatch!(tile_avxvnni, 0);
                dispatch!(tile_avxvnni, 1);
            }
            Int8Dot::Avx2 => {
                dispatch!(tile_avx2, 0);
                dispatch!(tile_avx2, 1);
            }
        }
    }
}

/// Quantizes `x (rows, k)` per group of `group` into `inputs`: scale = max |x| / 127, codes
/// round(x / scale) (the quotient rounded half away from zero, as `runq.c` and
/// [`crate::int8`]), stored plus 128; rows split across the pool.
fn quantize(
    pool: &ThreadPool,
    x: &[f32],
    (rows, k, group): (usize, usize, usize),
    inputs: &mut Inputs,
) {
    const ROWS_PER_TASK: usize = 16;
    let blocks = k / group;
    let codes = SharedMut::new(&mut inputs.codes);
    let scales = SharedMut::new(&mut inputs.scales);
    pool.run(rows.div_ceil(ROWS_PER_TASK), &|t| {
        let (r0, r1) = (t * ROWS_PER_TASK, rows.min((t + 1) * ROWS_PER_TASK));
        // SAFETY: rows r0..r1 of both outputs are this task's alone.
        let (codes, scales) = unsafe {
            (
                codes.slice(r0 * k, (r1 - r0) * k),
                scales.slice(r0 * blocks, (r1 - r0) * blocks),
            )
        };
        // SAFETY: AVX2 and FMA, the lowest tier the backend runs (asserted by `forward`).
        unsafe { quantize_rows(&x[r0 * k..r1 * k], group, codes, scales) }
    });
}

/// # Safety
/// AVX2 and FMA; `group` a multiple of 8, `x` whole groups, `codes` as long as `x` and a
/// scale per group.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows(x: &[f32], group: usize, codes: &mut [u8], scales: &mut [f32]) {
    assert!(group.is_multiple_of(8) && codes.len() == x.len());
    assert_eq!(scales.len() * group, x.len());
    let sign = _mm256_set1_ps(-0.0);
    // Byte 0 of each i32 lane, to the lane's low 4 bytes.
    let low_bytes = _mm256_set1_epi32(0x0c08_0400);
    for (g, scale) in scales.iter_mut().enumerate() {
        let xs = x.as_ptr().add(g * group);
        let mut max = _mm256_setzero_ps();
        for i in (0..group).step_by(8) {
            max = _mm256_max_ps(max, _mm256_andnot_ps(sign, _mm256_loadu_ps(xs.add(i))));
        }
        let max = max_ymm(max);
        *scale = max / 127.0;
        let out = codes.as_mut_ptr().add(g * group);
        if max > 0.0 {
            let s = _mm256_set1_ps(*scale);
            for i in (0..group).step_by(8) {
                // round(x / scale), half away from zero: the quotient truncated, then one
                // away from zero where the part cut off is at least ½.
                let q = _mm256_div_ps(_mm256_loadu_ps(xs.add(i)), s);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
                let cut = _mm256_andnot_ps(sign, _mm256_sub_ps(q, t));
                let up = _mm256_cmp_ps::<_CMP_GE_OQ>(cut, _mm256_set1_ps(0.5));
                let away = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(q, sign));
                let rounded = _mm256_add_ps(t, _mm256_and_ps(up, away));
                let biased = _mm256_add_epi32(_mm256_cvttps_epi32(rounded), _mm256_set1_epi32(128));
                let bytes = _mm256_shuffle_epi8(biased, low_bytes);
                let pair = _mm_unpacklo_epi32(
                    _mm256_castsi256_si128(bytes),
                    _mm256_extracti128_si256::<1>(bytes),
                );
                _mm_storel_epi64(out.add(i).cast(), pair);
            }
        } else {
            std::ptr::write_bytes(out, 128, group);
        }
    }
}

/// The largest of 8 lanes.
///
/// # Safety
/// AVX.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn max_ymm(v: __m256) -> f32 {
    let quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)))
}

/// [`MR`] or fewer input rows against a panel, 64 bytes (16 weight rows × one quad) at a
/// time: `vpdpbusd` of the broadcast input quad (offset by 128) and the weights, from the
/// group's offset; each group's i32 sums scaled into f32 accumulators.
///
/// # Safety
/// AVX512-F/BW/VNNI and FMA; the tile's pointers as [`forward`] says.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn tile_vnni512<const R: usize, const Q: usize>(t: Tile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..t.blocks {
        let block = t.panel.add(b * block_bytes(4 * Q));
        let offsets = [
            _mm512_load_si512(block.cast()),
            _mm512_load_si512(block.add(64).cast()),
        ];
        let mut sums = [offsets; R];
        let a = t.a.add(b * 4 * Q);
        for q in 0..Q {
            let w = block.add(8 * NR + q * 4 * NR);
            let w = [
                _mm512_load_si512(w.cast()),
                _mm512_load_si512(w.add(64).cast()),
            ];
            for (r, sums) in sums.iter_mut().enumerate() {
                let quad = a.add(r * t.k + 4 * q).cast::<i32>().read_unaligned();
                let av = _mm512_set1_epi32(quad);
                sums[0] = _mm512_dpbusd_epi32(sums[0], av, w[0]);
                sums[1] = _mm512_dpbusd_epi32(sums[1], av, w[1]);
            }
        }
        let scales = block.add(4 * NR).cast::<f32>();
        let sw = [_mm512_load_ps(scales), _mm512_load_ps(scales.add(16))];
        for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
            let xs = _mm512_set1_ps(*t.sx.add(r * t.blocks + b));
            for h in 0..2 {
                let scale = _mm512_mul_ps(sw[h], xs);
                acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[h]), scale, acc[h]);
            }
        }
    }
    let masks = [
        ((1u32 << t.cols.min(16)) - 1) as u16,
        ((1u32 << t.cols.saturating_sub(16)) - 1) as u16,
    ];
    for (r, acc) in acc.iter().enumerate() {
        let out = t.out.add(r * t.n);
        _mm512_mask_storeu_ps(out, masks[0], acc[0]);
        _mm512_mask_storeu_ps(out.add(16), masks[1], acc[1]);
    }
}

/// The 32-byte kernels, once per integer dot product, each for one half of a panel (16 of its
/// weight rows: the generic `HALF`, 0 or 1): `$offset(block)` is the group's starting sums
/// for those rows, `$input(av)` turns a broadcast input quad into the product's operand, and
/// `$dot(sums, input, w, |w|)` adds the products of 4 adjacent bytes into each i32 lane.
macro_rules! ymm_tiles {
    ($name:ident, $features:literal,
     offset: |$block:ident| $offset:expr,
     input: |$av:ident| $input:expr,
     dot: |$s:ident, $x:ident, $w:ident, $wabs:ident| $dot:expr) => {
        /// Half a panel against [`MR`] or fewer input rows, 32 bytes (8 weight rows × one
        /// quad) at a time (see the macro).
        ///
        /// # Safety
        /// The features named; the tile's pointers as [`forward`] says.
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const Q: usize, const HALF: usize>(t: Tile) {
            if t.cols <= 16 * HALF {
                return;
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..t.blocks {
                let $block = t.panel.add(b * block_bytes(4 * Q) + 64 * HALF);
                let offsets: [__m256i; 2] = $offset;
                let mut sums = [offsets; R];
                let a = t.a.add(b * 4 * Q);
                for q in 0..Q {
                    let w = $block.add(8 * NR + q * 4 * NR);
                    let w = [
                        _mm256_load_si256(w.cast()),
                        _mm256_load_si256(w.add(32).cast()),
                    ];
                    let wabs = [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])];
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let quad = a.add(r * t.k + 4 * q).cast::<i32>().read_unaligned();
                        let $av = _mm256_set1_epi32(quad);
                        let $x = $input;
                        for h in 0..2 {
                            let ($s, $w, $wabs) = (sums[h], w[h], wabs[h]);
                            sums[h] = $dot;
                        }
                    }
                }
                let scales = $block.add(4 * NR).cast::<f32>();
                let sw = [_mm256_load_ps(scales), _mm256_load_ps(scales.add(8))];
                for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                    let xs = _mm256_set1_ps(*t.sx.add(r * t.blocks + b));
                    for h in 0..2 {
                        let scale = _mm256_mul_ps(sw[h], xs);
                        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[h]), scale, acc[h]);
                    }
                }
            }
            let live = t.cols - 16 * HALF;
            for (r, acc) in acc.iter().enumerate() {
                let out = t.out.add(r * t.n + 16 * HALF);
                if live >= 16 {
                    _mm256_storeu_ps(out, acc[0]);
                    _mm256_storeu_ps(out.add(8), acc[1]);
                } else {
                    let mut row = [0f32; 16];
                    _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out, live);
                }
            }
        }
    };
}

ymm_tiles!(tile_avxvnni, "avx2,fma,avxvnni",
    offset: |block| [_mm256_load_si256(block.cast()), _mm256_load_si256(block.add(32).cast())],
    input: |av| av,
    dot: |s, x, w, _wabs| _mm256_dpbusd_avx_epi32(s, x, w));
ymm_tiles!(tile_avx2, "avx2,fma",
    offset: |block| [_mm256_setzero_si256(); 2],
    input: |av| _mm256_xor_si256(av, _mm256_set1_epi8(-128)),
    dot: |s, x, w, wabs| _mm256_add_epi32(s, _mm256_madd_epi16(
        _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1))));
