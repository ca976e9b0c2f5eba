//! The reference CPU backend: plain, readable Rust in f32, multithreaded over rows and heads
//! with rayon, matmuls on `matrixmultiply`. It is the yardstick the fast backends (CPU tiers,
//! CUDA) are held to by the conformance suite, so clarity wins over speed here.
//!
//! Its buffers hold f32 or bf16 ([`DType`]); the kernels compute in f32 only (a bf16 view
//! given to a kernel is a bug and panics), while transfers and `copy` convert, rounding to
//! nearest even, so the conformance suite can check a backend's bf16 staging against it.
//!
//! Every kernel is a generic function over [`Real`] (f32 or f64) on plain slices, one file per
//! kernel family. [`ReferenceBackend`] runs them in f32 behind the [`Backend`] trait; the
//! finite-difference tests run the very same functions in f64.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod classifier;
pub mod embed;
pub mod matmul;
pub mod muon;
pub mod rmsnorm;
pub mod rope;
pub mod scale;
pub mod swiglu;
pub mod xent;
pub mod xsa;

use std::any::Any;
use std::cell::{RefCell, UnsafeCell};
use std::fmt::Debug;

use half::bf16;

use num_traits::{Float, FromPrimitive, NumAssign};

use kiln_core::backend::{
    Accumulate, AdamWStep, AttentionShape, Backend, BackendError, ClassifierShape, DType,
    DecodeShape, DeviceMemory, FakeQuant, Kernel, MatmulShape, MatrixShape, MuonStep, NormShape,
    Qkv, RopeShape, ScaleShape, ShapeHint, Tolerance, View,
};

/// The float types the reference kernels run in: f32 for training, f64 for gradient checks.
pub trait Real:
    Float + FromPrimitive + NumAssign + Default + Debug + Send + Sync + 'static
{
    /// `c (m, n) = a (m, k) · b (k, n) + beta · c`, with row/column strides for each matrix
    /// (so a transpose is a swap of strides). `c` need not be initialised when `beta` is 0.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        a_row_stride: usize,
        a_col_stride: usize,
        b: &[Self],
        b_row_stride: usize,
        b_col_stride: usize,
        beta: Self,
        c: &mut [Self],
        c_row_stride: usize,
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                a: &[Self],
                a_row_stride: usize,
                a_col_stride: usize,
                b: &[Self],
                b_row_stride: usize,
                b_col_stride: usize,
                beta: Self,
                c: &mut [Self],
                c_row_stride: usize,
            ) {
                let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
                    if rows == 0 || cols == 0 {
                        0
                    } else {
                        (rows - 1) * rs + (cols - 1) * cs + 1
                    }
                };
                assert!(
                    a.len() >= last(m, k, a_row_stride, a_col_stride),
                    "gemm: a too short"
                );
                assert!(
                    b.len() >= last(k, n, b_row_stride, b_col_stride),
                    "gemm: b too short"
                );
                assert!(c.len() >= last(m, n, c_row_stride, 1), "gemm: c too short");
                // SAFETY: the asserts above keep every strided access inside the slices, and
                // `c` is borrowed mutably, so it aliases neither input.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        a_row_stride as isize,
                        a_col_stride as isize,
                        b.as_ptr(),
                        b_row_stride as isize,
                        b_col_stride as isize,
                        beta,
                        c.as_mut_ptr(),
                        c_row_stride as isize,
                        1,
                    )
                }
            }
        }
    };
}
impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// One host allocation, addressed through [`View`]s.
///
/// Views into one allocation are handed out freely (the model keeps every activation of a step
/// in one arena), so the memory sits in `UnsafeCell`s and each kernel call checks that its
/// outputs overlap none of its inputs before it borrows them. `UnsafeCell` makes this type
/// `Send` but not `Sync`: views of it cannot reach another thread, so two calls can never
/// touch it at once.
pub struct HostMemory {
    data: Storage,
    /// What backends derive from windows of this memory and keep with it (see
    /// [`HostMemory::with_derived`]).
    derived: RefCell<Vec<Derived>>,
}

/// Data derived from a window of a [`HostMemory`] (the CPU backend's weights packed for its
/// micro-kernels): dropped with the memory, and marked stale by any write that overlaps the
/// window, through whichever kernel or transfer makes it.
struct Derived {
    offset: usize,
    len: usize,
    stale: bool,
    data: Box<dyn Any + Send>,
}

enum Storage {
    F32(Buffer<f32>),
    /// bf16 bit patterns.
    BF16(Buffer<u16>),
}

/// A zeroed host buffer. Large ones (at least [`HUGE`] bytes) are aligned to 2 MiB and asked
/// of Linux as transparent huge pages (`madvise(MADV_HUGEPAGE)`, before their first touch):
/// streaming a model's weights once per decoded token walks the page tables once per 4 KiB
/// page otherwise (llama.cpp's weights, a mapped file, come in large page-cache folios).
struct Buffer<T> {
    ptr: std::ptr::NonNull<UnsafeCell<T>>,
    len: usize,
    layout: std::alloc::Layout,
}

/// Bytes from which a buffer is aligned and advised to huge pages.
const HUGE: usize = 4 << 20;

// SAFETY: the buffer owns its elements (as a Box would); `UnsafeCell<T>` is `Send` for the
// `T`s used (f32, u16).
unsafe impl<T: Send> Send for Buffer<T> {}

impl<T> Buffer<T> {
    /// `len` zeroed elements, or `None` if the allocation cannot be had (an error, not an
    /// abort). `T` must be valid as zero bits (f32, u16).
    fn zeroed(len: usize) -> Option<Self> {
        let bytes = std::mem::size_of::<T>().checked_mul(len)?;
        let huge = bytes >= HUGE;
        let align = if huge {
            2 << 20
        } else {
            std::mem::align_of::<T>()
        };
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), align).ok()?;
        // SAFETY: the layout is non-empty; the pointer is checked; zero bits are valid `T`s.
        unsafe {
            let ptr = if huge {
                let ptr = std::alloc::alloc(layout);
                if !ptr.is_null() {
                    #[cfg(target_os = "linux")]
                    libc::madvise(ptr.cast(), layout.size(), libc::MADV_HUGEPAGE);
                    std::ptr::write_bytes(ptr, 0, layout.size());
                }
                ptr
            } else {
                // calloc: a large block comes as fresh pages the kernel has zeroed, without a
                // second pass that touches them all.
                std::alloc::alloc_zeroed(layout)
            };
            let ptr = std::ptr::NonNull::new(ptr.cast::<UnsafeCell<T>>())?;
            Some(Buffer { ptr, len, layout })
        }
    }
}

impl<T> std::ops::Deref for Buffer<T> {
    type Target = [UnsafeCell<T>];
    fn deref(&self) -> &[UnsafeCell<T>] {
        // SAFETY: `len` initialized elements live at `ptr` for the buffer's life.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated with exactly this layout in `zeroed`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

impl HostMemory {
    fn new(len: usize, dtype: DType) -> Result<Self, BackendError> {
        let out_of_memory = || BackendError::OutOfMemory {
            backend: "reference".into(),
            bytes: len.saturating_mul(dtype.size()),
        };
        let data = match dtype {
            DType::F32 => Storage::F32(Buffer::zeroed(len).ok_or_else(out_of_memory)?),
            DType::BF16 => Storage::BF16(Buffer::zeroed(len).ok_or_else(out_of_memory)?),
        };
        Ok(HostMemory {
            data,
            derived: RefCell::new(Vec::new()),
        })
    }

    /// Runs `f` on the data of type `T` derived from the window `offset..offset + len` (a
    /// default `T` the first time), with whether the window was written since `f` last ran
    /// on it (always on the first time): `f` brings the data up to date. Windows are matched
    /// exactly; other types and windows keep their own data.
    ///
    /// Panics if called from inside `f`, or while the caller holds a slice of this memory
    /// it has yet to write (writes are noted when a kernel takes its output slice).
    pub fn with_derived<T: Any + Send + Default, R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut T, bool) -> R,
    ) -> R {
        let mut derived = self.derived.borrow_mut();
        let at = derived
            .iter()
            .position(|d| d.offset == offset && d.len == len && d.data.is::<T>());
        let at = at.unwrap_or_else(|| {
            derived.push(Derived {
                offset,
                len,
                stale: true,
                data: Box::new(T::default()),
            });
            derived.len() - 1
        });
        let entry = &mut derived[at];
        let stale = std::mem::replace(&mut entry.stale, false);
        let data = entry.data.downcast_mut::<T>().expect("matched by type");
        f(data, stale)
    }

    /// Runs `f` on the data of type `T` derived from exactly the window `offset..offset +
    /// len`, if there is any (`None` if not), and marks it current: `f` has brought it up to
    /// date (the CPU backend's optimizer repacks the weights it writes).
    pub fn update_derived<T: Any + Send, R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut derived = self.derived.borrow_mut();
        let entry = derived
            .iter_mut()
            .find(|d| d.offset == offset && d.len == len && d.data.is::<T>())?;
        let result = f(entry.data.downcast_mut::<T>().expect("matched by type"));
        entry.stale = false;
        Some(result)
    }

    /// Marks the derived data of every window that overlaps `offset..offset + len` stale.
    fn note_write(&self, offset: usize, len: usize) {
        let mut derived = self.derived.borrow_mut();
        for d in derived.iter_mut() {
            if offset < d.offset + d.len && d.offset < offset + len {
                d.stale = true;
            }
        }
    }

    /// A pointer to `len` f32 values at `offset`. Panics for a bf16 allocation: the reference
    /// kernels compute in f32 only.
    fn f32_window(&self, offset: usize, len: usize) -> *mut f32 {
        match &self.data {
            Storage::F32(data) => {
                assert!(
                    offset + len <= data.len(),
                    "view {offset}+{len} out of {}",
                    data.len()
                );
                // UnsafeCell<f32> has the layout of f32.
                data[offset..].as_ptr() as *mut f32
            }
            Storage::BF16(_) => panic!("the reference kernels compute in f32; got a bf16 view"),
        }
    }
}

impl DeviceMemory for HostMemory {
    fn len(&self) -> usize {
        match &self.data {
            Storage::F32(d) => d.len(),
            Storage::BF16(d) => d.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self.data {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }
}

/// The reference backend (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

type V<'a> = View<'a, ReferenceBackend>;

impl ReferenceBackend {
    /// Read access to an f32 view.
    fn read<'a>(&self, view: V<'a>) -> &'a [f32] {
        let ptr = view.memory().f32_window(view.offset(), view.len());
        // SAFETY: in bounds (checked by `f32_window`); a kernel's outputs were checked not to
        // overlap it in `write`, and the memory is not `Sync`, so no other thread holds it.
        unsafe { std::slice::from_raw_parts(ptr, view.len()) }
    }

    /// Write access to an f32 view that must not overlap any of `inputs` (the call's inputs
    /// and its other outputs).
    fn write<'a>(&self, view: V<'a>, inputs: &[V]) -> &'a mut [f32] {
        for input in inputs {
            assert!(
                !view.overlaps(input),
                "kernel output {view:?} overlaps {input:?}"
            );
        }
        let ptr = view.memory().f32_window(view.offset(), view.len());
        view.memory().note_write(view.offset(), view.len());
        // SAFETY: in bounds (checked by `f32_window`) and disjoint from every other view this
        // call touches (asserted above), so this is the only live reference to the window.
        unsafe { std::slice::from_raw_parts_mut(ptr, view.len()) }
    }

    /// Reads any view as f32 (bf16 widened).
    fn read_any(&self, view: V, out: &mut [f32]) {
        match &view.memory().data {
            Storage::F32(_) => out.copy_from_slice(self.read(view)),
            Storage::BF16(data) => {
                let cells = &data[view.offset()..view.offset() + view.len()];
                for (o, cell) in out.iter_mut().zip(cells) {
                    // SAFETY: no kernel holds a reference into this cell during the call (the
                    // memory is not `Sync`, and this call is the only one running on it).
                    *o = bf16::from_bits(unsafe { *cell.get() }).to_f32();
                }
            }
        }
    }

    /// Writes f32 values into any view (rounded to nearest even for bf16).
    fn write_any(&self, view: V, values: &[f32], inputs: &[V]) {
        match &view.memory().data {
            Storage::F32(_) => self.write(view, inputs).copy_from_slice(values),
            Storage::BF16(data) => {
                for input in inputs {
                    assert!(!view.overlaps(input), "output {view:?} overlaps {input:?}");
                }
                view.memory().note_write(view.offset(), view.len());
                let cells = &data[view.offset()..view.offset() + view.len()];
                for (cell, v) in cells.iter().zip(values) {
                    // SAFETY: as in `read_any`; the window does not overlap the inputs.
                    unsafe { *cell.get() = bf16::from_f32(*v).to_bits() };
                }
            }
        }
    }
}

/// Access to this backend's memory for a backend that shares it (the fast CPU backend keeps
/// its buffers in [`HostMemory`] so it can hand any kernel it does not accelerate to this
/// one, on the same buffers).
impl ReferenceBackend {
    /// The f32 values of `view`.
    ///
    /// # Safety
    /// No mutable slice overlapping the window may be alive while the returned one is, and
    /// the slice must not outlive the kernel call it serves.
    pub unsafe fn host_slice<'a>(view: V<'a>) -> &'a [f32] {
        ReferenceBackend.read(view)
    }

    /// The f32 values of `view`, mutable; panics when it overlaps any of `inputs`.
    ///
    /// # Safety
    /// `inputs` must list every other view the caller holds a slice of during the call, and
    /// the slice must not outlive the kernel call it serves.
    pub unsafe fn host_slice_mut<'a>(view: V<'a>, inputs: &[V]) -> &'a mut [f32] {
        ReferenceBackend.write(view, inputs)
    }
}

fn check_len(expected: usize, got: usize) -> Result<(), BackendError> {
    if expected == got {
        Ok(())
    } else {
        Err(BackendError::LengthMismatch { expected, got })
    }
}

/// The host memory Linux says is available (`MemAvailable` plus `SwapFree` in
/// `/proc/meminfo`); `None` where that cannot be read.
pub fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

impl Backend for ReferenceBackend {
    type Memory = HostMemory;

    fn name(&self) -> String {
        "reference (f32, rayon, matrixmultiply)".into()
    }

    fn supports(&self, _kernel: Kernel, _shape: ShapeHint) -> Result<(), String> {
        Ok(())
    }

    fn tolerance(&self, _kernel: Kernel) -> Tolerance {
        // f32 rounding through a few hundred-term dot products: a few ulps relative, plus an
        // absolute floor for values that cancel to near zero. Every kernel computes in f32 the
        // same way, so one bound serves them all.
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<HostMemory, BackendError> {
        HostMemory::new(len, dtype)
    }

    fn upload(&self, dst: V, src: &[f32]) -> Result<(), BackendError> {
        check_len(dst.len(), src.len())?;
        self.write_any(dst, src, &[]);
        Ok(())
    }

    fn download(&self, src: V, dst: &mut [f32]) -> Result<(), BackendError> {
        check_len(src.len(), dst.len())?;
        self.read_any(src, dst);
        Ok(())
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn memory_available(&self) -> Option<u64> {
        host_memory_available()
    }

    fn zero(&self, dst: V) {
        use rayon::prelude::*;
        match dst.dtype() {
            // In place, in parallel: the gradient arena is zeroed every step.
            DType::F32 => self
                .write(dst, &[])
                .par_chunks_mut(1 << 16)
                .for_each(|c| c.fill(0.0)),
            DType::BF16 => self.write_any(dst, &vec![0.0; dst.len()], &[]),
        }
    }

    fn copy(&self, dst: V, src: V) {
        assert_eq!(dst.len(), src.len(), "copy: lengths differ");
        if dst.dtype() == DType::F32 && src.dtype() == DType::F32 {
            self.write(dst, &[src]).copy_from_slice(self.read(src));
        } else {
            let mut values = vec![0.0; src.len()];
            self.read_any(src, &mut values);
            self.write_any(dst, &values, &[src]);
        }
    }

    fn matmul_forward(&self, out: V, inp: V, weight: V, s: MatmulShape) {
        let o = self.write(out, &[inp, weight]);
        let (inp, weight) = (self.read(inp), self.read(weight));
        matmul::matmul_forward(o, inp, weight, s.rows, s.in_dim, s.out_dim);
    }

    fn matmul_backward(
        &self,
        dinp: V,
        dweight: V,
        dout: V,
        inp: V,
        weight: V,
        s: MatmulShape,
        dinp_mode: Accumulate,
    ) {
        let inputs = [dout, inp, weight];
        let di = self.write(dinp, &[&inputs[..], &[dweight]].concat());
        let dw = self.write(dweight, &inputs);
        let (dout, inp, weight) = (self.read(dout), self.read(inp), self.read(weight));
        let (rows, in_dim, out_dim) = (s.rows, s.in_dim, s.out_dim);
        matmul::matmul_backward(di, dw, dout, inp, weight, rows, in_dim, out_dim, dinp_mode);
    }

    fn embedding_forward(&self, out: V, table: V, tokens: &[u32], dim: usize) {
        embed::embedding_forward(self.write(out, &[table]), self.read(table), tokens, dim);
    }

    fn embedding_backward(&self, dtable: V, dout: V, tokens: &[u32], dim: usize) {
        embed::embedding_backward(self.write(dtable, &[dout]), self.read(dout), tokens, dim);
    }

    fn rmsnorm_forward(&self, out: V, rstd: V, inp: V, weight: V, s: NormShape) {
        let o = self.write(out, &[inp, weight, rstd]);
        let r = self.write(rstd, &[inp, weight]);
        assert_eq!(inp.len(), s.rows * s.dim);
        rmsnorm::rmsnorm_forward(o, r, self.read(inp), self.read(weight), s.dim, s.eps);
    }

    fn rmsnorm_backward(
        &self,
        dinp: V,
        dweight: V,
        dout: V,
        inp: V,
        weight: V,
        rstd: V,
        s: NormShape,
        dinp_mode: Accumulate,
    ) {
        let inputs = [dout, inp, weight, rstd];
        let di = self.write(dinp, &[&inputs[..], &[dweight]].concat());
        let dw = self.write(dweight, &inputs);
        assert_eq!(inp.len(), s.rows * s.dim);
        let (dout, inp, weight, rstd) = (
            self.read(dout),
            self.read(inp),
            self.read(weight),
            self.read(rstd),
        );
        rmsnorm::rmsnorm_backward(di, dw, dout, inp, weight, rstd, s.dim, dinp_mode);
    }

    fn rope_forward(&self, out: V, inp: V, s: RopeShape) {
        assert_eq!(inp.len(), s.batch * s.seq * s.heads * s.head_dim);
        let o = self.write(out, &[inp]);
        rope::rope_forward(
            o,
            self.read(inp),
            s.start_pos,
            s.seq,
            s.heads,
            s.head_dim,
            s.rot_dims,
            s.theta as f64,
        );
    }

    fn rope_backward(&self, dinp: V, dout: V, s: RopeShape) {
        assert_eq!(dout.len(), s.batch * s.seq * s.heads * s.head_dim);
        assert_eq!(
            s.start_pos, 0,
            "rope_backward: training positions start at 0"
        );
        let d = self.write(dinp, &[dout]);
        let dout = self.read(dout);
        rope::rope_backward(
            d,
            dout,
            s.seq,
            s.heads,
            s.head_dim,
            s.rot_dims,
            s.theta as f64,
        );
    }

    fn attention_saved_len(&self, s: AttentionShape) -> usize {
        s.batch * s.heads * s.seq * s.seq
    }

    fn attention_forward(&self, out: V, saved: V, inputs: Qkv<Self>, s: AttentionShape) {
        let Qkv { q, k, v } = inputs;
        let o = self.write(out, &[q, k, v, saved]);
        let p = self.write(saved, &[q, k, v]);
        attention::attention_forward(o, p, self.read(q), self.read(k), self.read(v), s);
    }

    fn attention_backward(
        &self,
        grads: Qkv<Self>,
        dout: V,
        inputs: Qkv<Self>,
        saved: V,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        let all = [dout, q, k, v, saved];
        let gq = self.write(grads.q, &[&all[..], &[grads.k, grads.v]].concat());
        let gk = self.write(grads.k, &[&all[..], &[grads.v]].concat());
        let gv = self.write(grads.v, &all);
        let (dout, q, k, v, saved) = (
            self.read(dout),
            self.read(q),
            self.read(k),
            self.read(v),
            self.read(saved),
        );
        attention::attention_backward(gq, gk, gv, dout, q, k, v, saved, s);
    }

    fn attention_decode(&self, out: V, q: V, k_cache: V, v_cache: V, s: DecodeShape) {
        let shape = AttentionShape {
            batch: s.batch,
            seq: 1,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
        };
        let o = self.write(out, &[q, k_cache, v_cache]);
        let (q, k, v) = (self.read(q), self.read(k_cache), self.read(v_cache));
        attention::attention_decode(o, q, k, v, s.len, s.capacity, shape);
    }

    fn swiglu_forward(&self, out: V, gate: V, up: V) {
        assert_eq!(gate.len(), up.len());
        let o = self.write(out, &[gate, up]);
        swiglu::swiglu_forward(o, self.read(gate), self.read(up));
    }

    fn swiglu_backward(&self, dgate: V, dup: V, dout: V, gate: V, up: V) {
        assert_eq!(gate.len(), up.len());
        let dg = self.write(dgate, &[dout, gate, up, dup]);
        let du = self.write(dup, &[dout, gate, up]);
        swiglu::swiglu_backward(dg, du, self.read(dout), self.read(gate), self.read(up));
    }

    fn relu2_forward(&self, out: V, inp: V, slope: f32) {
        assert_eq!(out.len(), inp.len());
        let o = self.write(out, &[inp]);
        activation::relu2_forward(o, self.read(inp), slope);
    }

    fn relu2_backward(&self, dinp: V, dout: V, inp: V, slope: f32) {
        assert_eq!(dinp.len(), inp.len());
        let d = self.write(dinp, &[dout, inp]);
        activation::relu2_backward(d, self.read(dout), self.read(inp), slope);
    }

    fn softcap_forward(&self, out: V, inp: V, cap: f32) {
        assert_eq!(out.len(), inp.len());
        let o = self.write(out, &[inp]);
        activation::softcap_forward(o, self.read(inp), cap);
    }

    fn softcap_backward(&self, dinp: V, dout: V, out: V, cap: f32) {
        assert_eq!(dinp.len(), out.len());
        let d = self.write(dinp, &[dout, out]);
        activation::softcap_backward(d, self.read(dout), self.read(out), cap);
    }

    fn scale_forward(&self, out: V, inp: V, scale: V, s: ScaleShape, mode: Accumulate) {
        assert_eq!(
            (inp.len(), scale.len()),
            (s.rows * s.groups * s.inner, s.groups)
        );
        let o = self.write(out, &[inp, scale]);
        scale::scale_forward(o, self.read(inp), self.read(scale), s.inner, mode);
    }

    fn scale_backward(
        &self,
        dinp: V,
        dscale: V,
        dout: V,
        inp: V,
        scale: V,
        s: ScaleShape,
        mode: Accumulate,
    ) {
        assert_eq!(
            (inp.len(), scale.len()),
            (s.rows * s.groups * s.inner, s.groups)
        );
        let inputs = [dout, inp, scale];
        let di = self.write(dinp, &[&inputs[..], &[dscale]].concat());
        let g = self.write(dscale, &inputs);
        let (dout, inp, scale) = (self.read(dout), self.read(inp), self.read(scale));
        scale::scale_backward(di, g, dout, inp, scale, s.inner, mode);
    }

    fn residual_forward(&self, out: V, a: V, b: V) {
        assert_eq!(a.len(), b.len());
        let o = self.write(out, &[a, b]);
        swiglu::residual_forward(o, self.read(a), self.read(b));
    }

    fn xsa_forward(&self, out: V, y: V, v: V, s: AttentionShape) {
        let rows = s.batch * s.seq;
        let dims = (s.heads, s.kv_heads, s.head_dim);
        assert_eq!(
            (y.len(), v.len()),
            (rows * s.heads * s.head_dim, rows * s.kv_heads * s.head_dim)
        );
        assert_eq!(out.len(), y.len());
        let o = self.write(out, &[y, v]);
        xsa::xsa_forward(o, self.read(y), self.read(v), dims);
    }

    fn xsa_backward(&self, dy: V, dv: V, dout: V, y: V, v: V, s: AttentionShape) {
        let rows = s.batch * s.seq;
        let dims = (s.heads, s.kv_heads, s.head_dim);
        assert_eq!(
            (y.len(), v.len()),
            (rows * s.heads * s.head_dim, rows * s.kv_heads * s.head_dim)
        );
        assert_eq!(
            (dy.len(), dv.len(), dout.len()),
            (y.len(), v.len(), y.len())
        );
        let inputs = [dout, y, v];
        let gy = self.write(dy, &[&inputs[..], &[dv]].concat());
        let gv = self.write(dv, &inputs);
        xsa::xsa_backward(gy, gv, self.read(dout), self.read(y), self.read(v), dims);
    }

    fn gate_forward(&self, out: V, a: V, b: V, dim: usize, scale: f32) {
        assert_eq!((a.len(), b.len()), (out.len() * dim, out.len() * dim));
        let o = self.write(out, &[a, b]);
        activation::gate_forward(o, self.read(a), self.read(b), dim, scale);
    }

    fn gate_backward(&self, da: V, db: V, dout: V, out: V, a: V, b: V, dim: usize, scale: f32) {
        assert_eq!((a.len(), b.len()), (out.len() * dim, out.len() * dim));
        assert_eq!(
            (da.len(), db.len(), dout.len()),
            (a.len(), b.len(), out.len())
        );
        let inputs = [dout, out, a, b];
        let g_a = self.write(da, &[&inputs[..], &[db]].concat());
        let g_b = self.write(db, &inputs);
        let (dout, out, a, b) = (self.read(dout), self.read(out), self.read(a), self.read(b));
        activation::gate_backward(g_a, g_b, dout, out, a, b, dim, scale);
    }

    fn accumulate(&self, out: V, inp: V) {
        assert_eq!(out.len(), inp.len());
        let o = self.write(out, &[inp]);
        swiglu::accumulate(o, self.read(inp));
    }

    fn cross_entropy_forward(
        &self,
        losses: V,
        logsumexp: V,
        logits: V,
        targets: &[u32],
        vocab: usize,
    ) {
        let l = self.write(losses, &[logits, logsumexp]);
        let s = self.write(logsumexp, &[logits]);
        xent::cross_entropy_forward(l, s, self.read(logits), targets, vocab);
    }

    fn cross_entropy_backward(
        &self,
        dlogits: V,
        logits: V,
        logsumexp: V,
        targets: &[u32],
        vocab: usize,
        dloss: f32,
    ) {
        let d = self.write(dlogits, &[logits, logsumexp]);
        let (logits, logsumexp) = (self.read(logits), self.read(logsumexp));
        xent::cross_entropy_backward(d, logits, logsumexp, targets, vocab, dloss);
    }

    fn classifier_saved_len(&self, _s: ClassifierShape) -> usize {
        // The composition recomputes a block of logits at a time.
        0
    }

    fn classifier_loss_forward(
        &self,
        losses: V,
        logsumexp: V,
        _saved: V,
        inp: V,
        weight: V,
        targets: &[u32],
        s: ClassifierShape,
    ) {
        let l = self.write(losses, &[logsumexp, inp, weight]);
        let lse = self.write(logsumexp, &[inp, weight]);
        let (x, w) = (self.read(inp), self.read(weight));
        classifier::classifier_loss_forward(l, lse, x, w, targets, s.dim, s.vocab, s.softcap);
    }

    fn classifier_loss_backward(
        &self,
        dinp: V,
        dweight: V,
        inp: V,
        weight: V,
        (logsumexp, _saved): (V, V),
        targets: &[u32],
        s: ClassifierShape,
        dloss: f32,
        dinp_mode: Accumulate,
    ) {
        let di = self.write(dinp, &[dweight, inp, weight, logsumexp]);
        let dw = self.write(dweight, &[inp, weight, logsumexp]);
        let (x, w, lse) = (self.read(inp), self.read(weight), self.read(logsumexp));
        let (dim, vocab, cap) = (s.dim, s.vocab, s.softcap);
        classifier::classifier_loss_backward(
            di, dw, x, w, lse, targets, dim, vocab, cap, dloss, dinp_mode,
        );
    }

    fn fake_quantize(&self, dst: V, src: V, q: FakeQuant, rotation: Option<usize>) {
        assert_eq!(dst.len(), src.len(), "fake_quantize: lengths");
        let d = self.write(dst, &[src]);
        kiln_core::quant::round_trip(q, rotation, self.read(src), d);
    }

    fn sum_squares(&self, x: V) -> f64 {
        adamw::sum_squares(self.read(x))
    }

    fn adamw_step(&self, params: V, grads: V, m: V, v: V, hp: &AdamWStep) {
        let p = self.write(params, &[grads, m, v]);
        let mm = self.write(m, &[grads, v]);
        let vv = self.write(v, &[grads]);
        adamw::adamw_step(p, self.read(grads), mm, vv, hp);
    }

    fn ema_update(&self, ema: V, params: V, decay: f32) {
        let e = self.write(ema, &[params]);
        adamw::ema_update(e, self.read(params), decay);
    }

    fn muon_step(&self, params: V, grads: V, momentum: V, s: MatrixShape, hp: &MuonStep) {
        assert_eq!(params.len(), s.rows * s.cols);
        let p = self.write(params, &[grads, momentum]);
        let m = self.write(momentum, &[grads]);
        muon::muon_step(p, self.read(grads), m, s.rows, s.cols, hp);
    }
}
