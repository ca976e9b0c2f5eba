//! Packed, register-blocked GEMM for the CPU tiers: `C (m, n) (=|+=) A (m, k) · B (k, n)`,
//! with A and B read through row and column strides, so the three products of a linear
//! layer (X·Wᵀ, dY·W, dYᵀ·X) are one routine with different strides.
//!
//! The structure is the one every BLAS-like library uses (Goto and van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication", 2008; BLIS's five loops):
//! - B is packed into panels of NR columns, A into strips of MR rows, each k-major, so the
//!   micro-kernel streams both with unit stride; bf16 tiers pack k in pairs, the operand
//!   layout of `vdpbf16ps`, and round to bf16 while packing (f32 accumulation throughout);
//!   the AMX kernel reads the same B panels and its A strips as rows of 32 k (`amx.rs`).
//! - C is cut into tiles of MC × NC, handed out one at a time from the thread pool's
//!   counter; inside a tile the k dimension goes in blocks of KC so the B panel stays in L1
//!   and the A strips in L2 while the micro-kernel runs.
//! - The micro-kernel keeps an MR × NR block of C in registers (16 accumulators of 16 f32 on
//!   AVX-512, 12 of 8 on AVX2, four 16 × 16 tiles with AMX) and adds it to C, or overwrites C
//!   on the first k block.

mod amx;
mod avx2;
mod avx512;
mod bf16;

use kiln_core::cpu::Isa;

pub(crate) use amx::probe as amx_probe;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Which micro-kernel computes: a tier and a precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// AVX2 + FMA, f32, 6 × 16.
    Avx2F32,
    /// AVX-512F, f32, 8 × 32.
    Avx512F32,
    /// AVX512-BF16 `vdpbf16ps`, bf16 inputs and f32 accumulation, 8 × 32.
    Avx512Bf16,
    /// AMX-BF16 `tdpbf16ps` on tiles, bf16 inputs and f32 accumulation, 32 × 32.
    AmxBf16,
}

impl Microkernel {
    /// The micro-kernel of `isa` at the given precision (bf16 only where the tier has a
    /// native bf16 dot product).
    pub fn for_isa(isa: Isa, bf16: bool) -> Self {
        match (isa, bf16) {
            (Isa::Avx2, _) => Microkernel::Avx2F32,
            (Isa::Amx, true) => Microkernel::AmxBf16,
            (Isa::Avx512bf16, true) => Microkernel::Avx512Bf16,
            _ => Microkernel::Avx512F32,
        }
    }

    fn mr(self) -> usize {
        match self {
            Microkernel::Avx2F32 => avx2::MR,
            Microkernel::Avx512F32 => avx512::MR,
            Microkernel::Avx512Bf16 => bf16::MR,
            Microkernel::AmxBf16 => amx::MR,
        }
    }

    fn nr(self) -> usize {
        match self {
            Microkernel::Avx2F32 => avx2::NR,
            Microkernel::Avx512F32 => avx512::NR,
            Microkernel::Avx512Bf16 => bf16::NR,
            Microkernel::AmxBf16 => amx::NR,
        }
    }

    /// Whether operands are packed as bf16 (B as pairs of k, the same panels for both bf16
    /// kernels; A as pairs for `vdpbf16ps`, as rows of 32 k for AMX).
    pub fn is_bf16(self) -> bool {
        matches!(self, Microkernel::Avx512Bf16 | Microkernel::AmxBf16)
    }

    /// What packed k is padded to (with zeros): a pair for `vdpbf16ps`, a tile's 32 for AMX.
    fn k_align(self) -> usize {
        match self {
            Microkernel::Avx2F32 | Microkernel::Avx512F32 => 1,
            Microkernel::Avx512Bf16 => 2,
            Microkernel::AmxBf16 => amx::K_STEP,
        }
    }
}

/// A read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

#[cfg(test)]
impl Mat<'_> {
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The most k per block: a 32-column B panel of 256 k is 32 KiB of f32, of 384 k 24 KiB of
/// bf16 (L1 is 32–48 KiB; AMX's 32-row A block of 384 k is 24 KiB too). k is cut into equal
/// blocks under this (multiples of the kernel's [`Microkernel::k_align`]), so 288 is one
/// block, not 256 + 32 (a block's C tile is loaded and stored once per block).
fn kc_max(kernel: Microkernel) -> usize {
    if kernel.is_bf16() {
        384
    } else {
        256
    }
}
/// MR-strips per tile (rows of C per task ≈ 48–64) and NR-panels per tile (columns ≈ 256):
/// small enough that a step's GEMMs give each thread many tiles to balance with.
const TILE_STRIPS: usize = 8;
const TILE_PANELS: usize = 8;

/// Packed operands: f32 or bf16 bit patterns.
#[derive(Clone, Copy)]
enum PackedRef<'s> {
    F32(&'s [f32]),
    Bf16(&'s [u16]),
}

/// An operand packed for one micro-kernel: `lanes` lanes (A's rows or B's columns) of `k`
/// values, k padded to `kp`, in groups of the kernel's MR (A) or NR (B) lanes (see [`pack`]).
/// Its buffers are kept from one packing to the next, so a step's GEMMs reuse them instead
/// of allocating (and page-faulting in) tens of megabytes per call. Callers that use one
/// operand in many products (the fused classifier's inputs) pack it once and call
/// [`multiply`].
#[derive(Default)]
pub struct Packed {
    f32: Vec<f32>,
    bf16: Vec<u16>,
    kernel: Option<Microkernel>,
    /// Whether the lanes are A's rows (groups of MR) or B's columns (groups of NR).
    left: bool,
    lanes: usize,
    k: usize,
    kp: usize,
}

impl Packed {
    /// Packs `a (m, k)` as the left operand of `kernel`.
    pub fn pack_a(&mut self, pool: &ThreadPool, kernel: Microkernel, a: Mat, m: usize, k: usize) {
        self.pack(pool, kernel, Source::new(a.data, a.rs, a.cs, m, k), true);
    }

    /// Packs `b (k, n)` as the right operand of `kernel`.
    pub fn pack_b(&mut self, pool: &ThreadPool, kernel: Microkernel, b: Mat, k: usize, n: usize) {
        self.pack(pool, kernel, Source::new(b.data, b.cs, b.rs, n, k), false);
    }

    fn pack(&mut self, pool: &ThreadPool, kernel: Microkernel, src: Source, left: bool) {
        // bf16 packs k in pairs (AMX in blocks of 32): k padded with zeros.
        let kp = src.k.next_multiple_of(kernel.k_align());
        let width = if left { kernel.mr() } else { kernel.nr() };
        if kernel == Microkernel::AmxBf16 && left {
            pack(pool, &mut self.bf16, src, width, kp, pack_bf16_rows);
        } else if kernel.is_bf16() {
            pack(pool, &mut self.bf16, src, width, kp, pack_bf16);
        } else {
            pack(pool, &mut self.f32, src, width, kp, pack_f32);
        }
        (self.kernel, self.left) = (Some(kernel), left);
        (self.lanes, self.k, self.kp) = (src.lanes, src.k, kp);
    }

    /// Packs `w (n, k)`, row-major, as the right operand of `kernel` for products X·Wᵀ
    /// (`B (k, j) = w[j, k]`), a group of NR rows per task; on each group's thread,
    /// `update(first_row, rows)` runs just before the group is packed (the optimizer writes
    /// those rows there, so they are packed while still in cache).
    ///
    /// # Safety
    /// `w` points to `n · k` f32 that only `update` writes during the call, each call only
    /// the rows it is given.
    pub unsafe fn pack_rows_after(
        &mut self,
        pool: &ThreadPool,
        kernel: Microkernel,
        w: *const f32,
        (n, k): (usize, usize),
        update: &(dyn Fn(usize, usize) + Sync),
    ) {
        let kp = k.next_multiple_of(kernel.k_align());
        let (width, shape) = (kernel.nr(), (n, k, kp));
        if kernel.is_bf16() {
            pack_rows_after(pool, &mut self.bf16, w, shape, width, update, pack_bf16);
        } else {
            pack_rows_after(pool, &mut self.f32, w, shape, width, update, pack_f32);
        }
        (self.kernel, self.left) = (Some(kernel), false);
        (self.lanes, self.k, self.kp) = (n, k, kp);
    }

    fn data(&self) -> PackedRef<'_> {
        match self.kernel {
            Some(k) if k.is_bf16() => PackedRef::Bf16(&self.bf16),
            _ => PackedRef::F32(&self.f32),
        }
    }
}

/// See [`Packed::pack_rows_after`]: groups of `width` rows of `w (n, k)` into `buffer`.
///
/// # Safety
/// As [`Packed::pack_rows_after`].
#[allow(clippy::too_many_arguments)]
unsafe fn pack_rows_after<T: Copy + Default + Send>(
    pool: &ThreadPool,
    buffer: &mut Vec<T>,
    w: *const f32,
    (n, k, kp): (usize, usize, usize),
    width: usize,
    update: &(dyn Fn(usize, usize) + Sync),
    pack_group: fn(&mut [T], Source, usize, usize, usize),
) {
    let per_group = kp * width;
    let groups = n.div_ceil(width);
    let dst = SharedMut::new(grown(buffer, groups * per_group));
    let w = SharedMut::from_raw(w as *mut f32);
    pool.run(groups, &|g| {
        let rows = width.min(n - g * width);
        update(g * width, rows);
        // SAFETY: `update` has finished with these rows and nothing writes them now; group g
        // of the buffer is this task's alone.
        let (src, out) = unsafe {
            (
                std::slice::from_raw_parts(w.get().add(g * width * k), rows * k),
                dst.slice(g * per_group, per_group),
            )
        };
        pack_group(out, Source::new(src, k, 1, rows, k), 0, width, kp);
    });
}

/// `buffer` grown to at least `len` elements; its first `len` returned.
fn grown<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        crate::shared::reserve_huge(buffer, len);
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// The packing buffers of one caller's GEMMs (see [`Packed`]).
#[derive(Default)]
pub struct Scratch {
    pub(crate) a: Packed,
    pub(crate) b: Packed,
}

/// `C (m, n) = A · B` (or `C += A · B` with `accumulate`); C is row-major with row stride
/// `ldc`. Work goes out over `pool`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    pool: &ThreadPool,
    scratch: &mut Scratch,
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
    if m > 0 && n > 0 {
        assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too short");
    }
    // SAFETY: C is a unique borrow covering every element the product writes (checked).
    unsafe {
        gemm_into(
            pool,
            scratch,
            kernel,
            m,
            n,
            k,
            a,
            b,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// [`gemm`] into a raw C, for callers whose threads write disjoint parts of one buffer (the
/// attention's heads).
///
/// # Safety
/// `c` points to `(m − 1) · ldc + n` writable f32 (when m, n > 0) that nothing else reads or
/// writes during the call, except other threads at other elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into(
    pool: &ThreadPool,
    scratch: &mut Scratch,
    kernel: Microkernel,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    scratch.a.pack_a(pool, kernel, a, m, k);
    scratch.b.pack_b(pool, kernel, b, k, n);
    multiply(pool, &scratch.a, &scratch.b, c, ldc, accumulate);
}

/// `C (m, n) (=|+=) A · B` from operands packed for one micro-kernel ([`Packed::pack_a`]
/// of `A (m, k)`, [`Packed::pack_b`] of `B (k, n)`); work goes out over `pool`.
///
/// # Safety
/// As [`gemm_into`].
pub unsafe fn multiply(
    pool: &ThreadPool,
    a: &Packed,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    multiply_window(pool, a, b, 0..b.lanes, c, ldc, accumulate)
}

/// [`multiply`] with a window of B: its columns `columns` (starting at a panel boundary, a
/// multiple of the kernel's NR). `C` is `(m, columns.len())`. The fused classifier reads a
/// vocabulary chunk of a weight packed whole this way.
///
/// # Safety
/// As [`gemm_into`], for `m × columns.len()` values of C.
pub unsafe fn multiply_window(
    pool: &ThreadPool,
    a: &Packed,
    b: &Packed,
    columns: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.left && !b.left, "multiply: operands packed as A and B");
    assert_eq!(
        a.kernel, b.kernel,
        "multiply: operands packed for one kernel"
    );
    assert_eq!(a.k, b.k, "multiply: inner dimensions differ");
    let Some(kernel) = a.kernel else { return };
    let (mr, nr) = (kernel.mr(), kernel.nr());
    assert!(
        columns.start.is_multiple_of(nr) && columns.end <= b.lanes,
        "multiply: B's columns {columns:?} of {} (panels of {nr})",
        b.lanes
    );
    let (m, n, kp) = (a.lanes, columns.len(), a.kp);
    if m == 0 || n == 0 {
        return;
    }
    if a.k == 0 {
        if !accumulate {
            // SAFETY: rows of C within the caller's guarantee.
            (0..m).for_each(|i| std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0));
        }
        return;
    }
    let (strips, panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let operands = Operands {
        kernel,
        a: a.data(),
        b: b.data(),
        kp,
        b_panel0: columns.start / nr,
    };
    // Tiles of at most TILE_STRIPS × TILE_PANELS, the counts split evenly (9 panels make
    // tiles of 5 and 4, not 8 and 1), so the tasks are of one size.
    let tiles_m = strips.div_ceil(TILE_STRIPS);
    let tiles_n = panels.div_ceil(TILE_PANELS);
    let (tile_strips, tile_panels) = (strips.div_ceil(tiles_m), panels.div_ceil(tiles_n));
    let (tiles_m, tiles_n) = (strips.div_ceil(tile_strips), panels.div_ceil(tile_panels));
    let blocks = kp.div_ceil(kc_max(kernel));
    let kc_block = kp.div_ceil(blocks).next_multiple_of(kernel.k_align());
    let c_ptr = SharedMut::from_raw(c);
    let task = |t: usize| {
        let (tm, tn) = (t / tiles_n, t % tiles_n);
        let strip_range = tm * tile_strips..((tm + 1) * tile_strips).min(strips);
        let panel_range = tn * tile_panels..((tn + 1) * tile_panels).min(panels);
        for pc in (0..kp).step_by(kc_block) {
            let kc = kc_block.min(kp - pc);
            let overwrite = pc == 0 && !accumulate;
            for p in panel_range.clone() {
                for s in strip_range.clone() {
                    let (i0, j0) = (s * mr, p * nr);
                    let (rows, cols) = (mr.min(m - i0), nr.min(n - j0));
                    // SAFETY: tile (tm, tn) covers rows i0..i0+rows and columns j0..j0+cols
                    // of C, which no other task touches; A holds strip s and B panel
                    // b_panel0 + p (inside B, checked above) over all of kp, so the offsets
                    // plus kc·MR and kc·NR stay inside them.
                    unsafe {
                        let c_tile = c_ptr.get().add(i0 * ldc + j0);
                        run_kernel(&operands, s, p, pc, kc, c_tile, ldc, rows, cols, overwrite);
                    }
                }
            }
        }
    };
    pool.run(tiles_m * tiles_n, &task);
}

/// Rows of A up to which [`multiply_rows`] serves a product.
pub const FEW_ROWS: usize = bf16::GEMV_ROWS;

/// `C (m, n) (=|+=) A · B` for a few rows of A (`m ≤ FEW_ROWS`, decoding) read in place,
/// `A (i, k) = a[i · lda + k]`, and B packed for the bf16 kernel: A's rows are rounded to bf16
/// pairs once (as packing would round them) and each panel of B is read once for all rows,
/// so the product runs at the speed the packed weight streams in, where the micro-kernel
/// would compute 8 rows to use one.
///
/// # Safety
/// As [`gemm_into`].
pub unsafe fn multiply_rows(
    pool: &ThreadPool,
    (a, lda, m): (&[f32], usize, usize),
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        !b.left && b.kernel.is_some_and(Microkernel::is_bf16),
        "multiply_rows: a bf16 B"
    );
    assert!(m <= FEW_ROWS, "multiply_rows: {m} rows");
    let (k, n, pairs) = (b.k, b.lanes, b.kp / 2);
    if m == 0 || n == 0 {
        return;
    }
    // Each row as bf16 pairs, zeros past k (the odd k's partner; AMX's copies pad k to 32),
    // in the calling thread's buffer (reused: decoding allocates nothing per token).
    thread_local! {
        static PAIRS: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PAIRS.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        buffer.clear();
        for i in 0..m {
            let row = &a[i * lda..i * lda + k];
            buffer.extend((0..pairs).map(|p| {
                let bf16 = |kk: usize| row.get(kk).map_or(0, |&v| to_bf16(v) as u32);
                let (lo, hi) = (bf16(2 * p), bf16(2 * p + 1));
                (lo | hi << 16) as i32
            }));
        }
        let mut x = [&buffer[..0]; FEW_ROWS];
        for (i, row) in buffer.chunks_exact(pairs.max(1)).enumerate().take(m) {
            x[i] = row;
        }
        // SAFETY: as this function's contract.
        unsafe { few_rows_panels(pool, &x[..m], b, (c, ldc, n), accumulate) };
    });
}

/// The panels of [`multiply_rows`] over the pool, `x` its rows as bf16 pairs.
///
/// # Safety
/// As [`multiply_rows`] (`b` checked there to be packed bf16).
unsafe fn few_rows_panels(
    pool: &ThreadPool,
    x: &[&[i32]],
    b: &Packed,
    (c, ldc, n): (*mut f32, usize, usize),
    accumulate: bool,
) {
    let pairs = b.kp / 2;
    let nr = bf16::NR;
    let panels = n.div_ceil(nr);
    // Each task streams a long contiguous run of panels (`ThreadPool::stream_ranges`).
    let ranges = pool.stream_ranges(panels, 1);
    let data = match b.data() {
        PackedRef::Bf16(d) => d,
        PackedRef::F32(_) => unreachable!("checked by multiply_rows"),
    };
    let c_ptr = SharedMut::from_raw(c);
    pool.run(ranges.len(), &|t| {
        for p in ranges.get(t) {
            let cols = nr.min(n - p * nr);
            // SAFETY: panel p's columns of C are this task's alone; the panel holds
            // `pairs · NR` pairs; the tier was checked when the operand was packed.
            unsafe {
                let bp = data.as_ptr().add(p * b.kp * nr);
                let cp = c_ptr.get().add(p * nr);
                bf16::gemv_panel(pairs, x, bp, cp, ldc, cols, !accumulate);
            }
        }
    });
}

/// The packed operands of one product and where B's window starts.
struct Operands<'s> {
    kernel: Microkernel,
    a: PackedRef<'s>,
    b: PackedRef<'s>,
    /// Padded k of A's strips and B's panels (their stride).
    kp: usize,
    /// B's first panel in the window.
    b_panel0: usize,
}

/// Calls the micro-kernel on strip `s` of A and panel `p` of B's window over k `pc..pc + kc`.
///
/// # Safety
/// `c` points to an MR × NR (at least `rows` × `cols`) block of C with row stride `ldc`,
/// written by no one else; the operands are packed for their kernel and the window lies
/// inside B.
#[allow(clippy::too_many_arguments)]
unsafe fn run_kernel(
    o: &Operands,
    s: usize,
    p: usize,
    pc: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    let (mr, nr) = (o.kernel.mr(), o.kernel.nr());
    let a_at = s * o.kp * mr + pc * mr;
    let b_at = (o.b_panel0 + p) * o.kp * nr + pc * nr;
    match (o.kernel, o.a, o.b) {
        (Microkernel::Avx2F32, PackedRef::F32(a), PackedRef::F32(b)) => {
            let (ap, bp) = (a.as_ptr().add(a_at), b.as_ptr().add(b_at));
            avx2::kernel(kc, ap, bp, c, ldc, rows, cols, overwrite)
        }
        (Microkernel::Avx512F32, PackedRef::F32(a), PackedRef::F32(b)) => {
            let (ap, bp) = (a.as_ptr().add(a_at), b.as_ptr().add(b_at));
            avx512::kernel(kc, ap, bp, c, ldc, rows, cols, overwrite)
        }
        (Microkernel::Avx512Bf16, PackedRef::Bf16(a), PackedRef::Bf16(b)) => {
            let (ap, bp) = (a.as_ptr().add(a_at), b.as_ptr().add(b_at));
            bf16::kernel(kc / 2, ap, bp, c, ldc, rows, cols, overwrite)
        }
        (Microkernel::AmxBf16, PackedRef::Bf16(a), PackedRef::Bf16(b)) => {
            let (ap, bp) = (a.as_ptr().add(a_at), b.as_ptr().add(b_at));
            amx::kernel(kc, ap, bp, c, ldc, rows, cols, overwrite)
        }
        _ => unreachable!("operands are packed for the kernel that reads them"),
    }
}

/// The matrix an operand is packed from, seen as `lanes` lanes (A's rows, B's columns) of
/// `k` values: element (lane, kk) is `data[lane * lane_stride + kk * k_stride]`.
#[derive(Clone, Copy)]
struct Source<'a> {
    data: &'a [f32],
    lane_stride: usize,
    k_stride: usize,
    lanes: usize,
    k: usize,
}

impl<'a> Source<'a> {
    fn new(data: &'a [f32], lane_stride: usize, k_stride: usize, lanes: usize, k: usize) -> Self {
        Source {
            data,
            lane_stride,
            k_stride,
            lanes,
            k,
        }
    }
}

/// Packs `src` into `buffer` (grown as needed) in groups of `width` lanes, one task per
/// group, with `pack_group(dst, src, first lane, width, kp)` writing one group: f32 as
/// `[k][width]`, bf16 as `[k / 2][width][2]` (the pair layout of `vdpbf16ps`); lanes and k
/// past the edges are zero.
fn pack<T: Copy + Default + Send>(
    pool: &ThreadPool,
    buffer: &mut Vec<T>,
    src: Source,
    width: usize,
    kp: usize,
    pack_group: fn(&mut [T], Source, usize, usize, usize),
) {
    let per_group = kp * width;
    let groups = src.lanes.div_ceil(width);
    let out = grown(buffer, groups * per_group);
    let ptr = SharedMut::new(out);
    pool.run(groups, &|g| {
        // SAFETY: group g writes only its own `per_group` elements of `out`.
        let dst = unsafe { ptr.slice(g * per_group, per_group) };
        pack_group(dst, src, g * width, width, kp);
    });
}

/// One f32 group (see [`pack`]).
fn pack_f32(dst: &mut [f32], src: Source, first: usize, width: usize, kp: usize) {
    let lanes = width.min(src.lanes - first);
    if lanes < width || kp > src.k {
        dst.fill(0.0);
    }
    let base = first * src.lane_stride;
    if src.k_stride == 1 {
        // Each lane's k values are contiguous: transposed 8 × 8 at a time.
        // SAFETY: every tier of this backend has AVX2; `dst` holds the group's k rows of
        // `width`, and each lane's first k values lie in `src`.
        unsafe {
            let at = (base, src.lane_stride);
            avx2::pack_k_contiguous(dst, src.data, at, lanes, width, src.k);
        }
    } else if src.lane_stride == 1 {
        // SAFETY: as above; row kk holds `lanes` contiguous values from `base + kk·k_stride`.
        unsafe {
            let at = (base, src.k_stride);
            avx2::pack_lanes_contiguous(dst, src.data, at, lanes, width, src.k);
        }
    } else {
        for kk in 0..src.k {
            let at = base + kk * src.k_stride;
            let out = &mut dst[kk * width..kk * width + lanes];
            for (lane, o) in out.iter_mut().enumerate() {
                *o = src.data[at + lane * src.lane_stride];
            }
        }
    }
}

/// f32 to bf16, rounding to nearest even (as `half` and `vcvtne2ps2bf16` do); NaN stays NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// One bf16 group (see [`pack`]): k in pairs, `[k / 2][width][2]`. The bulk goes through
/// the AVX512-BF16 packers (only bf16 kernels pack bf16, and they need that tier); edges
/// and strided operands take the scalar path, which rounds identically.
fn pack_bf16(dst: &mut [u16], src: Source, first: usize, width: usize, kp: usize) {
    let lanes = width.min(src.lanes - first);
    if lanes < width || kp > src.k {
        dst.fill(0);
    }
    let base = first * src.lane_stride;
    let pair_at = |kk: usize, lane: usize| ((kk / 2) * width + lane) * 2 + kk % 2;
    if src.k_stride == 1 {
        // SAFETY: bf16 packing runs only for the AVX512-BF16 micro-kernel, whose tier
        // requires the feature; each lane's first `k` values lie in `src`; `dst` holds the
        // group's kp / 2 rows of `width` pairs.
        unsafe {
            bf16::pack_k_contiguous(dst, src.data, base, src.lane_stride, lanes, width, src.k)
        };
    } else {
        let done = if src.lane_stride == 1 {
            // SAFETY: as above; row kk holds `lanes` contiguous values from `base + kk·k_stride`.
            unsafe {
                bf16::pack_lanes_contiguous(dst, src.data, base, src.k_stride, lanes, width, src.k)
            }
        } else {
            0
        };
        for kk in 0..src.k {
            let row = base + kk * src.k_stride;
            // Lanes the vector path packed, except in an odd last k, which it leaves.
            let from = if kk + 1 < src.k || kk % 2 == 1 {
                done
            } else {
                0
            };
            for lane in from..lanes {
                dst[pair_at(kk, lane)] = to_bf16(src.data[row + lane * src.lane_stride]);
            }
        }
    }
}

/// One AMX A group (see [`pack`]): `width` rows in blocks of 32 k, `[kp / 32][width][32]`
/// (see `amx.rs`). Rows with contiguous k and transposed operands with contiguous lanes go
/// through the AVX512-BF16 packers (the AMX tier requires that feature); any other strides
/// take the scalar path, which rounds identically.
fn pack_bf16_rows(dst: &mut [u16], src: Source, first: usize, width: usize, kp: usize) {
    let lanes = width.min(src.lanes - first);
    if lanes < width || kp > src.k {
        dst.fill(0);
    }
    let base = first * src.lane_stride;
    // SAFETY (both vector paths): AMX packing runs only for the AMX kernel, whose tier
    // requires AVX512-BF16 and AVX512BW; `dst` holds `kp · width` values, kp a multiple of 32
    // covering k; each lane's first k values lie in `src`.
    if src.k_stride == 1 {
        let at = (base, src.lane_stride);
        unsafe { amx::pack_rows_k_contiguous(dst, src.data, at, lanes, width, src.k) };
    } else if src.lane_stride == 1 {
        let at = (base, src.k_stride);
        unsafe { amx::pack_rows_lanes_contiguous(dst, src.data, at, lanes, width, src.k) };
    } else {
        let step = amx::K_STEP;
        for lane in 0..lanes {
            for kk in 0..src.k {
                let v = src.data[base + lane * src.lane_stride + kk * src.k_stride];
                dst[((kk / step) * width + lane) * step + kk % step] = to_bf16(v);
            }
        }
    }
}

/// Prefetches the micro-kernel's block of C (`rows` rows of `nr` f32 from `c`, row stride
/// `ldc`) into L1 before its k loop, so the tile's final load and store find it there: a
/// weight gradient's C is cold (each block is visited once per k block), and its rows are
/// too far apart for the hardware prefetchers; stalling on them took 9% of a stories110m
/// bf16 step (Zen 5). BLIS's micro-kernels prefetch C the same way. A prefetch never faults.
#[inline(always)]
fn prefetch_tile(c: *const f32, ldc: usize, rows: usize, nr: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..rows {
        let row = c.wrapping_add(i * ldc);
        // SAFETY: prefetching is a hint; it reads nothing the program sees and never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(nr - 1) as *const i8);
        }
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
            // The AMX tile kernel, emulated where the CPU has no AMX (`amx.rs`).
            out.push(Microkernel::AmxBf16);
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
            // Neither stride 1 (the packers' general path): A (i, p) at 2i + 2m·p.
            let mut a_spread = vec![f32::NAN; 2 * m * k];
            for i in 0..m {
                for p in 0..k {
                    a_spread[2 * i + 2 * m * p] = a_data[i * k + p];
                }
            }
            let spread = Mat {
                data: &a_spread,
                rs: 2,
                cs: 2 * m,
            };
            let plain_b = Mat {
                data: &b_data,
                rs: n,
                cs: 1,
            };
            for (a, b) in [
                (spread, plain_b),
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
                        let mut scratch = Scratch::default();
                        gemm(
                            &pool,
                            &mut scratch,
                            kernel,
                            m,
                            n,
                            k,
                            a,
                            b,
                            &mut c,
                            n,
                            accumulate,
                        );
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

    /// A window of a packed B (panels from a boundary) gives the product with that
    /// sub-matrix, as packing the sub-matrix alone does (same kernel, same rounding: bit for
    /// bit).
    #[test]
    fn a_window_of_packed_b_equals_the_packed_sub_matrix() {
        let pool = ThreadPool::new(2);
        let (m, k_all, n_all) = (19, 91, 150);
        let val = |i: usize, mul: usize| ((i * mul) % 97) as f32 / 48.0 - 1.0;
        let a_all: Vec<f32> = (0..m * k_all).map(|i| val(i, 7)).collect();
        let b_all: Vec<f32> = (0..k_all * n_all).map(|i| val(i, 11)).collect();
        for kernel in kernels() {
            let nr = kernel.nr();
            let mut b = Packed::default();
            let whole = Mat {
                data: &b_all,
                rs: n_all,
                cs: 1,
            };
            b.pack_b(&pool, kernel, whole, k_all, n_all);
            // Columns from the second panel to the end (a ragged last panel); odd k.
            let (columns, k) = (nr..n_all, k_all);
            let a_mat = Mat {
                data: &a_all,
                rs: k,
                cs: 1,
            };
            let mut a = Packed::default();
            a.pack_a(&pool, kernel, a_mat, m, k);
            let n = columns.len();
            let mut got = vec![0f32; m * n];
            // SAFETY: m × n values.
            unsafe { multiply_window(&pool, &a, &b, columns.clone(), got.as_mut_ptr(), n, false) };
            let sub = Mat {
                data: &b_all[columns.start..],
                rs: n_all,
                cs: 1,
            };
            let mut want = vec![0f32; m * n];
            gemm(
                &pool,
                &mut Scratch::default(),
                kernel,
                m,
                n,
                k,
                a_mat,
                sub,
                &mut want,
                n,
                false,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{kernel:?}");
        }
    }

    /// A few rows against a packed bf16 B (decoding), as either bf16 kernel packs it (AMX pads
    /// k to 32): 1 to 4 rows, several panels with a ragged last one, odd k (a lone last
    /// pair), both modes, against the triple loop within the bf16 bound of the test above.
    #[test]
    fn few_rows_against_a_packed_bf16_b_match_the_triple_loop() {
        if !kiln_core::cpu::features().supports(Isa::Avx512bf16) {
            println!("skipped: needs AVX512-BF16");
            return;
        }
        let pool = ThreadPool::new(2);
        for kernel in [Microkernel::Avx512Bf16, Microkernel::AmxBf16] {
            few_rows_match(&pool, kernel);
        }
    }

    fn few_rows_match(pool: &ThreadPool, kernel: Microkernel) {
        let (k, n) = (77, 150);
        let val = |i: usize, mul: usize| ((i * mul) % 97) as f32 / 97.0 - 0.5;
        let b_data: Vec<f32> = (0..k * n).map(|i| val(i, 11)).collect();
        let b = Mat {
            data: &b_data,
            rs: n,
            cs: 1,
        };
        let mut packed = Packed::default();
        packed.pack_b(pool, kernel, b, k, n);
        for m in 1..=FEW_ROWS {
            let a_data: Vec<f32> = (0..m * k).map(|i| val(i, 7)).collect();
            let a = Mat {
                data: &a_data,
                rs: k,
                cs: 1,
            };
            let want = naive(m, n, k, a, b);
            let start: Vec<f32> = (0..m * n).map(|i| val(i, 3)).collect();
            for accumulate in [false, true] {
                let mut c = start.clone();
                // SAFETY: m × n values.
                unsafe {
                    multiply_rows(
                        pool,
                        (&a_data, k, m),
                        &packed,
                        c.as_mut_ptr(),
                        n,
                        accumulate,
                    )
                };
                let tol = 4e-3 * k as f64 / 4.0 + 1e-6;
                for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                    let w = w + if accumulate { start[i] as f64 } else { 0.0 };
                    assert!(
                        (got as f64 - w).abs() <= tol,
                        "{kernel:?} m {m} acc {accumulate}: C[{i}] {got} vs {w}"
                    );
                }
            }
        }
    }
}
