//! Products of a few rows with int8 or ternary weights (decoding with `--weights
//! int8|packed`): each input row is quantized per group on the fly, and
//! `out[r, j] = Σ_h sw[j, h] · sx[r, h] · Σ_{k ∈ h} q[j, k] · p[r, k]` over the 32-value halves
//! `h` of the row, with integer dot products inside each half (llama2.c `runq.c`'s `matmul` is
//! the formula; its weights are [`kiln_core::quant::quantize_groups`]). Accumulation rule:
//! the output is overwritten.
//!
//! Weight codes are in −127..=127 (never −128, so a code's negation is a code). The integer
//! dot product multiplies unsigned by signed bytes, so the input's sign moves onto the weight
//! (`|p| · (q · sign p)`, as ggml's x86 int8 kernels do): with AVX512-VNNI one `vpdpbusd`
//! per 64 bytes; on AVX2 `vpmaddubsw` (pairs of products, at most 2 · 127² = 32,258, so its
//! i16 never saturates) then `vpmaddwd` by ones. Each 64-byte step's 16 integer sums are
//! scaled in f32 right away (lanes of the two halves take their own scales), so the weights
//! are read once and the only per-row reduction is the last one. Memory-bound: one byte per
//! weight plus 4 per group.
//!
//! Ternary codes ([`TernaryMatrix`]) are held in 2 bits and unpacked in registers; their
//! product is `Σ (c + 1)·p − Σ p`, with the unsigned `c + 1` as the first operand, so no sign
//! moves. [`Codes`] is what a weight's memory keeps: either kind.

use std::arch::x86_64::*;
use std::cell::RefCell;

use kiln_core::cpu::{self, Isa};

use crate::int8_gemm::{Cache, Panels};
use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Weight rows a kernel call takes together, interleaved in memory.
const ROWS: usize = 4;

/// A weight matrix `(rows, cols)` as int8 codes with one f32 scale per `group` values of a
/// row, its codes in the kernels' layout: blocks of [`ROWS`] rows, each 64-byte step of a
/// row followed by the same step of the block's next row, so a kernel call streams one
/// contiguous run of memory (four rows read side by side measured 20 GB/s on one Zen 5
/// core, one row at a time 25; ggml repacks its quantized weights for the same reason).
/// Rows are padded to 64-byte steps and the matrix to whole blocks, with zero codes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Values per scale: a multiple of 32 that divides `cols`.
    pub group: usize,
    /// `(⌈rows / ROWS⌉, ⌈cols / 64⌉, ROWS, 64)`, each in −127..=127.
    codes: Vec<i8>,
    /// `(rows, cols / group)`, and one more (a ragged step's second half reads it, times 0).
    scales: Vec<f32>,
    /// The codes repacked for products of many rows, once needed.
    panels: Cache,
}

impl Int8Matrix {
    /// `w (rows, cols)` quantized in groups of `group` ([`kiln_core::quant::quantize_groups`]).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, group: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "int8: weight");
        let (codes, scales) = kiln_core::quant::quantize_groups(w, group);
        Self::new(rows, cols, group, &codes, &scales).expect("quantize_groups keeps ±127")
    }

    /// Row-major codes and scales made elsewhere (a llama2.c int8 file, a packed artifact),
    /// checked and laid out for the kernels.
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        codes: &[i8],
        scales: &[f32],
    ) -> Result<Self, String> {
        check_codes("int8", (rows, cols, group), codes, scales)?;
        if codes.contains(&i8::MIN) {
            return Err("int8 code −128: codes must be within ±127".into());
        }
        let steps = cols.div_ceil(64);
        let mut laid = blocks(rows, steps);
        for (j, row) in codes.chunks_exact(cols.max(1)).enumerate() {
            for (step, bytes) in row.chunks(64).enumerate() {
                let at = block_offset(steps, j, step);
                laid[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        Ok(Int8Matrix {
            rows,
            cols,
            group,
            codes: laid,
            scales: padded(scales),
            panels: Cache::default(),
        })
    }

    /// Row `j`'s codes, into `out` (`cols` long).
    fn row_codes(&self, j: usize, out: &mut [i8]) {
        let steps = self.cols.div_ceil(64);
        for (step, out) in out.chunks_mut(64).enumerate() {
            let at = block_offset(steps, j, step);
            out.copy_from_slice(&self.codes[at..at + out.len()]);
        }
    }

    /// The values the codes stand for, `(rows, cols)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (steps, groups) = (self.cols.div_ceil(64), self.cols / self.group);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for j in 0..self.rows {
            out.extend((0..self.cols).map(|c| {
                let code = self.codes[block_offset(steps, j, c / 64) + c % 64];
                code as f32 * self.scales[j * groups + c / self.group]
            }));
        }
        out
    }
}

/// A ternary weight matrix `(rows, cols)`: codes −1, 0, 1 in 2 bits each (a quarter of the
/// int8 bytes), with one f32 scale per `group` values of a row. Laid out for the kernels in
/// blocks of [`ROWS`] rows and chunks of 256 columns: each row's chunk is 64 bytes whose
/// byte `b` holds, in bits `2s..2s + 2`, the code of column `256·chunk + 64·s + b` plus one
/// (0, 1 or 2), so one load and a shift give a 64-byte step of unsigned codes, and
/// `Σ (c + 1)·x − Σ x` is the dot product (the published b1.58 CPU kernels unpack 2-bit
/// codes the same way). Columns past the row's end hold 0 (their inputs are 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `(⌈rows / ROWS⌉, ⌈cols / 256⌉, ROWS, 64)`.
    codes: Vec<u8>,
    /// `(rows, cols / group)`, and one more (as [`Int8Matrix`]).
    scales: Vec<f32>,
    /// The codes repacked for products of many rows, once needed.
    panels: Cache,
}

impl TernaryMatrix {
    /// Row-major codes in −1..=1 and their scales, checked and laid out for the kernels.
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        codes: &[i8],
        scales: &[f32],
    ) -> Result<Self, String> {
        check_codes("ternary", (rows, cols, group), codes, scales)?;
        if let Some(c) = codes.iter().find(|c| !(-1..=1).contains(*c)) {
            return Err(format!("ternary code {c}: codes must be −1, 0 or 1"));
        }
        let chunks = cols.div_ceil(256);
        let mut laid = blocks(rows, chunks);
        for (j, row) in codes.chunks_exact(cols.max(1)).enumerate() {
            for (c, &code) in row.iter().enumerate() {
                let (at, shift) = Self::place(chunks, j, c);
                laid[at] |= ((code + 1) as u8) << shift;
            }
        }
        Ok(TernaryMatrix {
            rows,
            cols,
            group,
            codes: laid,
            scales: padded(scales),
            panels: Cache::default(),
        })
    }

    /// The byte and bit shift of column `c` of row `j`'s code: byte `c mod 64` of the row's
    /// chunk, bits `2·s` for the chunk's step `s`.
    fn place(chunks: usize, j: usize, c: usize) -> (usize, usize) {
        (
            block_offset(chunks, j, c / 256) + c % 64,
            2 * (c % 256 / 64),
        )
    }

    /// Row `j`'s codes, into `out` (`cols` long).
    fn row_codes(&self, j: usize, out: &mut [i8]) {
        let chunks = self.cols.div_ceil(256);
        for (c, out) in out.iter_mut().enumerate() {
            let (at, shift) = Self::place(chunks, j, c);
            *out = (self.codes[at] >> shift & 3) as i8 - 1;
        }
    }

    /// The values the codes stand for, `(rows, cols)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (chunks, groups) = (self.cols.div_ceil(256), self.cols / self.group);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for j in 0..self.rows {
            out.extend((0..self.cols).map(|c| {
                let (at, shift) = Self::place(chunks, j, c);
                let code = (self.codes[at] >> shift & 3) as f32 - 1.0;
                code * self.scales[j * groups + c / self.group]
            }));
        }
        out
    }
}

/// The shape rules both code matrices share: groups a multiple of 32 that divides the row,
/// `rows · cols` codes and a scale per group.
fn check_codes(
    kind: &str,
    (rows, cols, group): (usize, usize, usize),
    codes: &[i8],
    scales: &[f32],
) -> Result<(), String> {
    if group == 0 || !group.is_multiple_of(32) || !cols.is_multiple_of(group) {
        return Err(format!(
            "{kind} groups of {group} for rows of {cols}: the kernels need a multiple of 32 \
             that divides the row"
        ));
    }
    if codes.len() != rows * cols || scales.len() != rows * (cols / group) {
        return Err(format!(
            "{kind} {rows}×{cols} in groups of {group}: {} codes and {} scales",
            codes.len(),
            scales.len()
        ));
    }
    Ok(())
}

/// Zeroed room for `rows` rows of `per_row` 64-byte blocks in the kernels' layout (whole
/// blocks of [`ROWS`] rows), in huge pages where large.
fn blocks<T: Copy + Default>(rows: usize, per_row: usize) -> Vec<T> {
    let size = rows.div_ceil(ROWS) * per_row * ROWS * 64;
    let mut laid = Vec::new();
    crate::shared::reserve_huge(&mut laid, size);
    laid.resize(size, T::default());
    laid
}

/// Where block `block` (a 64-byte step, or a ternary chunk) of row `j` starts: blocks of
/// [`ROWS`] rows, each block of a row beside the same block of the next rows.
fn block_offset(per_row: usize, j: usize, block: usize) -> usize {
    ((j / ROWS * per_row + block) * ROWS + j % ROWS) * 64
}

/// The scales and one more, which a ragged step's second half reads (times 0).
fn padded(scales: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(scales.len() + 1);
    out.extend_from_slice(scales);
    out.push(0.0);
    out
}

/// The integer dot product the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Dot {
    /// `vpmaddubsw` + `vpmaddwd` on 32 bytes (AVX2).
    Avx2,
    /// `vpdpbusd` on 32 bytes, VEX-encoded (AVX-VNNI: Intel from Alder Lake, AMD from Zen 5).
    AvxVnni,
    /// `vpdpbusd` on 64 bytes (AVX512-VNNI with AVX512-BW).
    Vnni512,
}

impl Int8Dot {
    /// The tier's: 64-byte VNNI on the AVX-512 tiers when CPUID has AVX512-VNNI, else
    /// 32-byte AVX-VNNI where CPUID has it, else the plain AVX2 product (run on any machine
    /// by the unit tests, which check every variant the CPU has).
    pub fn for_isa(isa: Isa) -> Self {
        let f = cpu::features();
        if isa >= Isa::Avx512 && f.avx512_vnni {
            Int8Dot::Vnni512
        } else if f.avx_vnni {
            Int8Dot::AvxVnni
        } else {
            Int8Dot::Avx2
        }
    }

    /// Every variant this CPU runs (the tests check each).
    pub fn usable() -> Vec<Int8Dot> {
        let f = cpu::features();
        let mut all = Vec::new();
        if f.supports(Isa::Avx2) {
            all.push(Int8Dot::Avx2);
        }
        if f.supports(Isa::Avx2) && f.avx_vnni {
            all.push(Int8Dot::AvxVnni);
        }
        if f.supports(Isa::Avx512) && f.avx512_vnni {
            all.push(Int8Dot::Vnni512);
        }
        all
    }
}

/// Input rows quantized for one product.
#[derive(Default)]
struct Inputs {
    /// `(rows, k)` codes and their magnitudes.
    codes: Vec<i8>,
    magnitudes: Vec<u8>,
    /// `(rows, 2 · steps)`: the scale of each half's input group.
    half_scales: Vec<f32>,
    /// `(rows, steps)`: which bytes of each 64-byte step are negative.
    negative: Vec<u64>,
    /// `(rows, steps, 16)`: each 64-byte step's lane scales (lanes 0–7 the first half's,
    /// 8–15 the second's).
    step_scales: Vec<f32>,
    /// `(2 · steps)`: the weight group of each half.
    weight_group: Vec<usize>,
    /// `(rows, steps, 16)`: the sums of each 4-byte lane's codes (the ternary kernels'
    /// offset).
    lane_sums: Vec<i32>,
}

impl Inputs {
    /// Quantizes `x (rows, k)` in groups of 64 (32 when the weight's `group` is not a multiple
    /// of 64): scale = max |x| / 127, codes round(x / scale), as `runq.c` quantizes its
    /// activations; rows padded with zeros to `steps` 64-byte steps.
    fn quantize(&mut self, x: &[f32], rows: usize, (k, group, steps): (usize, usize, usize)) {
        let (halves, padded) = (2 * steps, 64 * steps);
        let weight_group = group;
        let group = if group.is_multiple_of(64) { 64 } else { 32 };
        // Codes past the row's end stay 0, so a ragged step adds nothing.
        self.codes.clear();
        self.codes.resize(rows * padded, 0);
        self.magnitudes.clear();
        self.magnitudes.resize(rows * padded, 0);
        self.half_scales.clear();
        self.half_scales.resize(rows * halves, 0.0);
        self.weight_group.clear();
        // A padded half reads the row's last scale (or the one after it), times zero.
        let last = k / weight_group;
        self.weight_group
            .extend((0..halves).map(|h| (h * 32 / weight_group).min(last)));
        for r in 0..rows {
            let xs = x[r * k..(r + 1) * k].chunks_exact(group);
            let codes = self.codes[r * padded..r * padded + k].chunks_exact_mut(group);
            let magnitudes = self.magnitudes[r * padded..r * padded + k].chunks_exact_mut(group);
            for (g, ((xs, codes), magnitudes)) in xs.zip(codes).zip(magnitudes).enumerate() {
                let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                for ((c, m), &v) in codes.iter_mut().zip(magnitudes.iter_mut()).zip(xs) {
                    // The quotient rounded, as runq.c (a product by 1/scale can differ in the
                    // last bit, and so in the rounding).
                    *c = if max > 0.0 {
                        (v / scale).round() as i8
                    } else {
                        0
                    };
                    *m = c.unsigned_abs();
                }
                let per = group / 32;
                let at = r * halves + g * per;
                self.half_scales[at..at + per].fill(scale);
            }
        }
        self.negative.clear();
        self.step_scales.clear();
        self.lane_sums.clear();
        for r in 0..rows {
            let codes = &self.codes[r * padded..(r + 1) * padded];
            let scales = &self.half_scales[r * halves..(r + 1) * halves];
            for (step, bytes) in codes.chunks_exact(64).enumerate() {
                let signs = bytes.iter().enumerate();
                self.negative
                    .push(signs.fold(0u64, |m, (i, &c)| m | (((c < 0) as u64) << i)));
                self.step_scales.extend([scales[2 * step]; 8]);
                self.step_scales.extend([scales[2 * step + 1]; 8]);
                self.lane_sums.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|l| l.iter().map(|&c| c as i32).sum::<i32>()),
                );
            }
        }
    }
}

thread_local! {
    /// The quantized inputs of the calling thread's products: reused, so decoding allocates
    /// nothing per token.
    static INPUTS: RefCell<Inputs> = RefCell::default();
}

/// A weight's codes as its products read them (kept with the weight's memory).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Codes {
    /// None made yet.
    #[default]
    None,
    Int8(Int8Matrix),
    Ternary(TernaryMatrix),
}

impl Codes {
    /// `(rows, cols)`, if any.
    pub fn shape(&self) -> Option<(usize, usize)> {
        match self {
            Codes::None => None,
            Codes::Int8(m) => Some((m.rows, m.cols)),
            Codes::Ternary(m) => Some((m.rows, m.cols)),
        }
    }

    /// The codes repacked for products of many rows ([`crate::int8_gemm`]), built on first
    /// use.
    pub fn panels(&self) -> &Panels {
        // The scales without the padding one the few-row kernels read.
        let build = |(rows, cols, group), scales: &[f32], row: &dyn Fn(usize, &mut [i8])| {
            Panels::new((rows, cols, group), &scales[..scales.len() - 1], row)
        };
        match self {
            Codes::None => panic!("int8: no codes"),
            Codes::Int8(m) => m.panels.get_or_build(|| {
                build((m.rows, m.cols, m.group), &m.scales, &|j, o| {
                    m.row_codes(j, o)
                })
            }),
            Codes::Ternary(m) => m.panels.get_or_build(|| {
                build((m.rows, m.cols, m.group), &m.scales, &|j, o| {
                    m.row_codes(j, o)
                })
            }),
        }
    }

    /// Codes of −1, 0 and 1 as a [`TernaryMatrix`], others as an [`Int8Matrix`].
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        codes: &[i8],
        scales: &[f32],
    ) -> Result<Self, String> {
        if codes.iter().all(|c| (-1..=1).contains(c)) {
            TernaryMatrix::new(rows, cols, group, codes, scales).map(Codes::Ternary)
        } else {
            Int8Matrix::new(rows, cols, group, codes, scales).map(Codes::Int8)
        }
    }
}

/// `out (rows, n) = x (rows, k) · wᵀ` for `w (n, k)` as codes (see the module docs).
pub fn forward(
    dot: Int8Dot,
    pool: &ThreadPool,
    out: &mut [f32],
    x: &[f32],
    w: &Codes,
    rows: usize,
) {
    match dot {
        Int8Dot::Vnni512 => {
            assert!(cpu::features().avx512_vnni && cpu::features().supports(Isa::Avx512))
        }
        Int8Dot::AvxVnni => assert!(cpu::features().avx_vnni),
        Int8Dot::Avx2 => {}
    }
    // SAFETY (each kernel call): the variant's features were checked above (VNNI) or by the
    // backend's tier (AVX2, the lowest); `run` hands each kernel its block's steps and an
    // input row of as many (asserted there).
    match w {
        Codes::None => panic!("int8: no codes"),
        Codes::Int8(m) => {
            let shape = (m.rows, m.cols, m.group, m.cols.div_ceil(64));
            run(
                pool,
                (out, x, rows),
                shape,
                &m.scales,
                &|j, row, scales, sums| {
                    let codes = &m.codes[block_offset(shape.3, j, 0)..][..shape.3 * ROWS * 64];
                    unsafe {
                        match dot {
                            Int8Dot::Avx2 => dots_avx2(codes, scales, row, sums),
                            Int8Dot::AvxVnni => dots_avxvnni(codes, scales, row, sums),
                            Int8Dot::Vnni512 => dots_vnni512(codes, scales, row, sums),
                        }
                    }
                },
            )
        }
        Codes::Ternary(m) => {
            let chunks = m.cols.div_ceil(256);
            let shape = (m.rows, m.cols, m.group, 4 * chunks);
            run(
                pool,
                (out, x, rows),
                shape,
                &m.scales,
                &|j, row, scales, sums| {
                    let codes = &m.codes[block_offset(chunks, j, 0)..][..chunks * ROWS * 64];
                    unsafe {
                        match dot {
                            Int8Dot::Avx2 => ternary_avx2(codes, scales, row, sums),
                            Int8Dot::AvxVnni => ternary_avxvnni(codes, scales, row, sums),
                            Int8Dot::Vnni512 => ternary_vnni512(codes, scales, row, sums),
                        }
                    }
                },
            )
        }
    }
}

/// A kernel: the block of weight rows starting at `j` against one input row, into `sums`.
type Kernel<'a> = dyn Fn(usize, Row, &[&[f32]; ROWS], &mut [f32; ROWS]) + Sync + 'a;

/// Quantizes the inputs, then runs `kernel` over blocks of [`ROWS`] weight rows, in long
/// contiguous runs (`shape`: the weight's rows, columns, group and 64-byte steps per row;
/// `scales (rows, cols / group)` and one more).
fn run(
    pool: &ThreadPool,
    (out, x, rows): (&mut [f32], &[f32], usize),
    (n, k, group, steps): (usize, usize, usize, usize),
    scales: &[f32],
    kernel: &Kernel,
) {
    let (halves, groups) = (2 * steps, k / group);
    assert_eq!(x.len(), rows * k, "int8: x");
    assert_eq!(out.len(), rows * n, "int8: out");
    assert!(group.is_multiple_of(32) && steps * 64 >= k);
    assert_eq!(scales.len(), n * groups + 1, "int8: scales");
    INPUTS.with(|inputs| {
        let mut inputs = inputs.borrow_mut();
        inputs.quantize(x, rows, (k, group, steps));
        let inputs = &*inputs;
        let o = SharedMut::new(out);
        // Each task streams a long contiguous run of blocks (`ThreadPool::stream_ranges`).
        let ranges = pool.stream_ranges(n, ROWS);
        pool.run(ranges.len(), &|t| {
            let run = ranges.get(t);
            let (j0, j1) = (run.start, run.end);
            for r in 0..rows {
                let bytes = r * steps * 64..(r + 1) * steps * 64;
                let lanes = r * steps * 16..(r + 1) * steps * 16;
                let row = Row {
                    magnitudes: &inputs.magnitudes[bytes.clone()],
                    codes: &inputs.codes[bytes],
                    half_scales: &inputs.half_scales[r * halves..(r + 1) * halves],
                    negative: &inputs.negative[r * steps..(r + 1) * steps],
                    step_scales: &inputs.step_scales[lanes.clone()],
                    lane_sums: &inputs.lane_sums[lanes],
                    weight_group: &inputs.weight_group,
                };
                for j in (j0..j1).step_by(ROWS) {
                    // The block's scales; a padded row past `n` reads the next rows' (or the
                    // extra one) and its sum is dropped.
                    let block_scales = std::array::from_fn(|i| {
                        let at = ((j + i).min(n - 1)) * groups;
                        &scales[at..at + groups + 1]
                    });
                    let mut sums = [0f32; ROWS];
                    kernel(j, row, &block_scales, &mut sums);
                    let take = ROWS.min(n - j);
                    // SAFETY: rows j..j + take of this task's block are this task's alone.
                    let dst = unsafe { o.slice(r * n + j, take) };
                    dst.copy_from_slice(&sums[..take]);
                }
            }
        });
    });
}

/// How far ahead of its loads the block's codes are prefetched, in bytes.
const PREFETCH: usize = 4096;

/// One quantized input row, padded to whole 64-byte steps.
#[derive(Clone, Copy)]
struct Row<'a> {
    codes: &'a [i8],
    magnitudes: &'a [u8],
    half_scales: &'a [f32],
    negative: &'a [u64],
    step_scales: &'a [f32],
    lane_sums: &'a [i32],
    weight_group: &'a [usize],
}

/// As [`dots_avx2`], 64 bytes at a time; a step's halves take their own groups' scales
/// (a ragged step's second half reads the row's last or the extra one, times 0).
///
/// # Safety
/// AVX512-F/BW/VNNI and FMA; as [`dots_avx2`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn dots_vnni512(codes: &[i8], scales: &[&[f32]; ROWS], x: Row, out: &mut [f32; ROWS]) {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for step in 0..x.negative.len() {
        let mv = _mm512_loadu_si512(x.magnitudes.as_ptr().add(64 * step).cast());
        let negative = *x.negative.get_unchecked(step);
        let xs = _mm512_loadu_ps(x.step_scales.as_ptr().add(16 * step));
        let g = *x.weight_group.get_unchecked(2 * step);
        let g1 = *x.weight_group.get_unchecked(2 * step + 1);
        let block = codes.as_ptr().add(step * ROWS * 64);
        for line in 0..ROWS {
            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH + 64 * line).cast());
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let wv = _mm512_loadu_si512(block.add(64 * i).cast());
            let signed = _mm512_mask_sub_epi8(wv, negative, zero, wv);
            let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, mv, signed));
            let ws = step_weight_scales(scales[i], g, g1);
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(sums, xs), ws, *acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// The weight scales of a 64-byte step for one row: lanes 0–7 take the first half's group's
/// scale `scales[g0]`, lanes 8–15 the second's, `scales[g1]` (the same one unless groups are
/// not a multiple of 64).
///
/// # Safety
/// AVX-512F; `scales` holds both.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn step_weight_scales(scales: &[f32], g0: usize, g1: usize) -> __m512 {
    let first = _mm512_set1_ps(*scales.get_unchecked(g0));
    if g0 == g1 {
        first
    } else {
        _mm512_mask_blend_ps(0xff00, first, _mm512_set1_ps(*scales.get_unchecked(g1)))
    }
}

/// Step `s` (0–3) of a 2-bit chunk as bytes 0, 1 or 2.
///
/// # Safety
/// AVX512-BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_zmm(packed: __m512i, s: usize) -> __m512i {
    // The 16-bit shift pulls the next byte's bits into the top of each byte; the mask keeps
    // only the two that came from the byte itself.
    let shifted = match s {
        0 => packed,
        1 => _mm512_srli_epi16::<2>(packed),
        2 => _mm512_srli_epi16::<4>(packed),
        _ => _mm512_srli_epi16::<6>(packed),
    };
    _mm512_and_si512(shifted, _mm512_set1_epi8(3))
}

/// A block of [`ROWS`] ternary rows ([`TernaryMatrix`]'s layout) against one input row, a
/// 256-column chunk (four 64-byte steps of one load per row) at a time:
/// `vpdpbusd(c + 1, x) − Σx` per lane.
///
/// # Safety
/// AVX512-F/BW/VNNI and FMA; `codes` holds the block's chunks for the input row's steps.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn ternary_vnni512(codes: &[u8], scales: &[&[f32]; ROWS], x: Row, out: &mut [f32; ROWS]) {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for chunk in 0..x.negative.len() / 4 {
        let block = codes.as_ptr().add(chunk * ROWS * 64);
        for line in 0..ROWS {
            _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH / 4 + 64 * line).cast());
        }
        let packed: [__m512i; ROWS] =
            std::array::from_fn(|i| _mm512_loadu_si512(block.add(64 * i).cast()));
        for s in 0..4 {
            let step = 4 * chunk + s;
            let xv = _mm512_loadu_si512(x.codes.as_ptr().add(64 * step).cast());
            let lanes = _mm512_loadu_si512(x.lane_sums.as_ptr().add(16 * step).cast());
            let xs = _mm512_loadu_ps(x.step_scales.as_ptr().add(16 * step));
            let g = *x.weight_group.get_unchecked(2 * step);
            let g1 = *x.weight_group.get_unchecked(2 * step + 1);
            for (i, acc) in acc.iter_mut().enumerate() {
                let c = unpack_zmm(packed[i], s);
                let sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, c, xv), lanes);
                let ws = step_weight_scales(scales[i], g, g1);
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), xs), ws, *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// The 32-byte kernels, once per integer dot product: `$dot(u, s)` sums the products of
/// 4 adjacent unsigned bytes of `u` and signed bytes of `s` into each i32 lane (AVX2:
/// `vpmaddubsw` then `vpmaddwd` by ones, at most 2 · 127² per pair so the i16 never
/// saturates; AVX-VNNI: `vpdpbusd`, VEX-encoded).
macro_rules! ymm_kernels {
    ($int8:ident, $ternary:ident, $features:literal, |$u:ident, $s:ident| $dot:expr) => {
        /// A block of [`ROWS`] weight rows (`codes` laid out as [`Int8Matrix`] keeps them,
        /// `scales` each row's) against one input row, 32 bytes at a time.
        ///
        /// # Safety
        /// The features named; `codes` holds the block's steps for the input row's length.
        #[target_feature(enable = $features)]
        unsafe fn $int8(codes: &[i8], scales: &[&[f32]; ROWS], x: Row, out: &mut [f32; ROWS]) {
            let halves = x.half_scales.len();
            let mut acc = [_mm256_setzero_ps(); ROWS];
            for h in 0..halves {
                let at = 32 * h;
                let xv = _mm256_loadu_si256(x.codes.as_ptr().add(at).cast());
                let mv = _mm256_loadu_si256(x.magnitudes.as_ptr().add(at).cast());
                let xs = *x.half_scales.get_unchecked(h);
                let g = *x.weight_group.get_unchecked(h);
                let block = codes.as_ptr().add((h / 2) * ROWS * 64 + (h % 2) * 32);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_si256(block.add(64 * i).cast());
                    let ($u, $s) = (mv, _mm256_sign_epi8(wv, xv));
                    let sums = _mm256_cvtepi32_ps($dot);
                    let scale = _mm256_set1_ps(xs * *scales[i].get_unchecked(g));
                    *acc = _mm256_fmadd_ps(sums, scale, *acc);
                }
            }
            for (o, acc) in out.iter_mut().zip(acc) {
                *o = sum_ymm(acc);
            }
        }

        /// As [`ternary_vnni512`], 32 bytes at a time: the dot product of `c + 1` and the
        /// input (at most 2 · 2 · 127 per pair), minus Σx per lane.
        ///
        /// # Safety
        /// The features named; as [`ternary_vnni512`].
        #[target_feature(enable = $features)]
        unsafe fn $ternary(codes: &[u8], scales: &[&[f32]; ROWS], x: Row, out: &mut [f32; ROWS]) {
            let three = _mm256_set1_epi8(3);
            let mut acc = [_mm256_setzero_ps(); ROWS];
            for chunk in 0..x.negative.len() / 4 {
                let block = codes.as_ptr().add(chunk * ROWS * 64);
                for half in 0..2 {
                    let packed: [__m256i; ROWS] = std::array::from_fn(|i| {
                        _mm256_loadu_si256(block.add(64 * i + 32 * half).cast())
                    });
                    for s in 0..4 {
                        let h = 2 * (4 * chunk + s) + half;
                        let xv = _mm256_loadu_si256(x.codes.as_ptr().add(32 * h).cast());
                        let lanes = _mm256_loadu_si256(x.lane_sums.as_ptr().add(8 * h).cast());
                        let xs = *x.half_scales.get_unchecked(h);
                        let g = *x.weight_group.get_unchecked(h);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let shifted = match s {
                                0 => packed[i],
                                1 => _mm256_srli_epi16::<2>(packed[i]),
                                2 => _mm256_srli_epi16::<4>(packed[i]),
                                _ => _mm256_srli_epi16::<6>(packed[i]),
                            };
                            let ($u, $s) = (_mm256_and_si256(shifted, three), xv);
                            let sums = _mm256_sub_epi32($dot, lanes);
                            let scale = _mm256_set1_ps(xs * *scales[i].get_unchecked(g));
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, *acc);
                        }
                    }
                }
            }
            for (o, acc) in out.iter_mut().zip(acc) {
                *o = sum_ymm(acc);
            }
        }
    };
}

ymm_kernels!(dots_avx2, ternary_avx2, "avx2,fma", |u, s| {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
});
ymm_kernels!(dots_avxvnni, ternary_avxvnni, "avx2,fma,avxvnni", |u, s| {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
});

/// The sum of 8 lanes.
///
/// # Safety
/// AVX.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn sum_ymm(acc: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// runq.c's quantizer, written again here: the reference the kernels are held to.
    fn runq_quantize(x: &[f32], group: usize) -> (Vec<i8>, Vec<f32>) {
        let mut codes = Vec::new();
        let mut scales = Vec::new();
        for g in x.chunks(group) {
            let max = g.iter().map(|v| v.abs()).fold(0.0, f32::max);
            let s = max / 127.0;
            scales.push(s);
            codes.extend(
                g.iter()
                    .map(|&v| if s > 0.0 { (v / s).round() as i8 } else { 0 }),
            );
        }
        (codes, scales)
    }

    /// Both products, the few rows' ([`forward`]) and the many rows' ([`int8_gemm::forward`],
    /// on the codes' panels), of `rows` input rows.
    fn products(
        dot: Int8Dot,
        pool: &ThreadPool,
        x: &[f32],
        w: &Codes,
        rows: usize,
    ) -> [Vec<f32>; 2] {
        let n = w.shape().unwrap().0;
        let mut few = vec![f32::NAN; rows * n];
        forward(dot, pool, &mut few, x, w, rows);
        let mut many = vec![f32::NAN; rows * n];
        crate::int8_gemm::forward(dot, pool, &mut many, x, w.panels(), rows);
        [few, many]
    }

    /// Input rows the tests take: 1 to 4 (decoding), and more than a GEMM tile and than a
    /// GEMM task's block of rows, with ragged ends.
    const ROW_COUNTS: [usize; 6] = [1, 2, 3, 4, 11, 100];

    /// Against the f64 sum of the dequantized weights times the dequantized inputs, both
    /// products, for the [`ROW_COUNTS`], weight groups of 32, 64 and the whole row, rows with
    /// and without a ragged last 32 bytes, and a ragged last block of 4 rows and panel of 32
    /// (70 rows: 6 in the last panel): the integer sums are exact, so the only error is f32
    /// scaling and summation, 1e-5 relative to Σ|terms|.
    #[test]
    fn matches_runq_formula() {
        let pool = ThreadPool::new(2);
        let val = |i: usize, m: usize| ((i * m) % 251) as f32 / 125.0 - 1.0;
        for (k, group) in [(288, 32), (320, 64), (96, 96), (256, 128)] {
            let n = 70;
            let w: Vec<f32> = (0..n * k).map(|i| val(i, 7) * (1 + i % 5) as f32).collect();
            let m = Int8Matrix::quantize(&w, n, k, group);
            let wq = m.dequantize();
            let act_group = if group % 64 == 0 { 64 } else { 32 };
            let codes = Codes::Int8(m.clone());
            for dot in Int8Dot::usable() {
                for rows in ROW_COUNTS {
                    let mut x: Vec<f32> = (0..rows * k).map(|i| val(i, 13)).collect();
                    // A group with one value, and an all-zero group (scale 0).
                    x[1..act_group].fill(0.0);
                    x[act_group..2 * act_group].fill(0.0);
                    let (xc, xs) = runq_quantize(&x, act_group);
                    let xq: Vec<f64> = xc
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| c as f64 * xs[i / act_group] as f64)
                        .collect();
                    for (out, path) in products(dot, &pool, &x, &codes, rows).iter().zip(PATHS) {
                        for r in 0..rows {
                            for j in 0..n {
                                let terms = (0..k).map(|p| xq[r * k + p] * wq[j * k + p] as f64);
                                let (want, size) =
                                    terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                                let got = out[r * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * size + 1e-30,
                                    "{dot:?} {path} k {k} group {group} [{r}, {j}]: {got} vs \
                                     {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The two products, as the assertions name them.
    const PATHS: [&str; 2] = ["few rows", "many rows"];

    /// Ternary codes in 2 bits against the same f64 formula on their values, both products,
    /// for rows that end inside a 256-column chunk and inside a 64-byte step (288), groups of
    /// 32, 64, 96 and 128 (a step's halves in different groups), a ragged last block of rows
    /// and a last panel of 26 of its 32 rows (90 rows); and the layout gives back the codes
    /// (`dequantize`).
    #[test]
    fn ternary_matches_the_formula() {
        let pool = ThreadPool::new(2);
        let val = |i: usize, m: usize| ((i * m) % 251) as f32 / 125.0 - 1.0;
        for (k, group) in [(288, 32), (384, 128), (96, 96), (640, 64)] {
            let n = 90;
            let codes: Vec<i8> = (0..n * k)
                .map(|i| ((i * 7 + i / 5) % 3) as i8 - 1)
                .collect();
            let scales: Vec<f32> = (0..n * k / group).map(|g| 0.5 + val(g, 3)).collect();
            let m = TernaryMatrix::new(n, k, group, &codes, &scales).unwrap();
            let wq = m.dequantize();
            for (i, (&c, &v)) in codes.iter().zip(&wq).enumerate() {
                assert_eq!(c as f32 * scales[i / group], v, "layout at {i}");
            }
            let act_group = if group % 64 == 0 { 64 } else { 32 };
            let ternary = Codes::Ternary(m.clone());
            for dot in Int8Dot::usable() {
                for rows in ROW_COUNTS {
                    let x: Vec<f32> = (0..rows * k).map(|i| val(i, 13)).collect();
                    let (xc, xs) = runq_quantize(&x, act_group);
                    for (out, path) in products(dot, &pool, &x, &ternary, rows).iter().zip(PATHS) {
                        for r in 0..rows {
                            for j in 0..n {
                                let terms = (0..k).map(|p| {
                                    let at = r * k + p;
                                    let xq = xc[at] as f64 * xs[at / act_group] as f64;
                                    xq * wq[j * k + p] as f64
                                });
                                let (want, size) =
                                    terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                                let got = out[r * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * size + 1e-30,
                                    "{dot:?} {path} k {k} group {group} [{r}, {j}]: {got} vs \
                                     {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        let err = TernaryMatrix::new(1, 64, 64, &[2; 64], &[1.0]).unwrap_err();
        assert!(err.contains("ternary code 2"), "{err}");
    }

    #[test]
    fn bad_codes_and_groups_are_refused() {
        assert!(Int8Matrix::new(1, 64, 48, &[0; 64], &[0.0; 1]).is_err());
        assert!(Int8Matrix::new(1, 64, 32, &[0; 64], &[0.0; 1]).is_err());
        let mut codes = vec![0i8; 64];
        codes[3] = i8::MIN;
        let err = Int8Matrix::new(1, 64, 64, &codes, &[1.0]).unwrap_err();
        assert!(err.contains("−128"), "{err}");
    }
}
