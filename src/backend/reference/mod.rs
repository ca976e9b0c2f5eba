//! The reference CPU backend: plain, readable Rust in f32, multithreaded over rows and heads
//! with rayon, matmuls on `matrixmultiply`. It is the yardstick the fast backends (AMX, CUDA)
//! are held to by the conformance suite, so clarity wins over speed here.
//!
//! Every kernel is a generic function over [`Real`] (f32 or f64) on plain slices, one file per
//! kernel family. [`ReferenceBackend`] runs them in f32 behind the [`Backend`] trait; the
//! finite-difference tests run the very same functions in f64.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod embed;
pub mod matmul;
pub mod muon;
pub mod rmsnorm;
pub mod rope;
pub mod scale;
pub mod swiglu;
pub mod xent;

use std::cell::UnsafeCell;
use std::fmt::Debug;

use num_traits::{Float, FromPrimitive, NumAssign};

use super::{Accumulate, AdamWStep, Backend, Kernel, MuonStep, ShapeHint, Tolerance, View};
use attention::AttentionShape;

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

/// One host allocation of f32, addressed through [`View`]s.
///
/// Views into one allocation are handed out freely (the model keeps every activation of a step
/// in one arena), so the memory sits in `UnsafeCell`s and each kernel call checks that its
/// output does not overlap its inputs before it borrows them.
pub struct HostMemory {
    data: Box<[UnsafeCell<f32>]>,
}

// SAFETY: kernels borrow disjoint windows (checked by `ReferenceBackend::borrow`), and the model
// never runs two kernels on one arena at once.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    fn new(len: usize) -> Self {
        HostMemory {
            data: (0..len).map(|_| UnsafeCell::new(0.0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn window(&self, offset: usize, len: usize) -> *mut f32 {
        assert!(
            offset + len <= self.data.len(),
            "view {offset}+{len} out of {}",
            self.data.len()
        );
        // UnsafeCell<f32> has the layout of f32.
        self.data[offset..].as_ptr() as *mut f32
    }
}

/// The reference backend (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

type V<'a> = View<'a, ReferenceBackend>;

fn overlaps(a: V, b: V) -> bool {
    std::ptr::eq(a.memory, b.memory)
        && a.offset < b.offset + b.len
        && b.offset < a.offset + a.len
        && a.len > 0
        && b.len > 0
}

impl ReferenceBackend {
    /// Read access to a view.
    fn read<'a>(&self, view: V<'a>) -> &'a [f32] {
        // SAFETY: in bounds (checked by `window`); a kernel's outputs were checked not to
        // overlap it in `write`.
        unsafe { std::slice::from_raw_parts(view.memory.window(view.offset, view.len), view.len) }
    }

    /// Write access to a view that must not overlap any of `inputs` or `others` (the other
    /// outputs of the same call).
    fn write<'a>(&self, view: V<'a>, inputs: &[V]) -> &'a mut [f32] {
        for input in inputs {
            assert!(
                !overlaps(view, *input),
                "kernel output {view:?} overlaps {input:?}"
            );
        }
        // SAFETY: in bounds (checked by `window`) and disjoint from every other view this call
        // touches (asserted above), so this is the only live reference to the window.
        unsafe {
            std::slice::from_raw_parts_mut(view.memory.window(view.offset, view.len), view.len)
        }
    }
}

impl Backend for ReferenceBackend {
    type Memory = HostMemory;

    fn name(&self) -> String {
        "reference (f32, rayon, matrixmultiply)".into()
    }

    fn supports(&self, _kernel: Kernel, _shape: ShapeHint) -> Result<(), String> {
        Ok(())
    }

    fn tolerance(&self) -> Tolerance {
        // f32 rounding through a few hundred-term dot products: a few ulps relative, plus an
        // absolute floor for values that cancel to near zero.
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        }
    }

    fn alloc(&self, len: usize) -> HostMemory {
        HostMemory::new(len)
    }

    fn upload(&self, dst: V, src: &[f32]) {
        self.write(dst, &[]).copy_from_slice(src);
    }

    fn download(&self, src: V, dst: &mut [f32]) {
        dst.copy_from_slice(self.read(src));
    }

    fn zero(&self, dst: V) {
        self.write(dst, &[]).fill(0.0);
    }

    fn copy(&self, dst: V, src: V) {
        self.write(dst, &[src]).copy_from_slice(self.read(src));
    }

    fn matmul_forward(
        &self,
        out: V,
        inp: V,
        weight: V,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) {
        let o = self.write(out, &[inp, weight]);
        matmul::matmul_forward(o, self.read(inp), self.read(weight), rows, in_dim, out_dim);
    }

    fn matmul_backward(
        &self,
        dinp: V,
        dweight: V,
        dout: V,
        inp: V,
        weight: V,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        dinp_mode: Accumulate,
    ) {
        let inputs = [dout, inp, weight];
        let di = self.write(dinp, &[&inputs[..], &[dweight]].concat());
        let dw = self.write(dweight, &inputs);
        let (dout, inp, weight) = (self.read(dout), self.read(inp), self.read(weight));
        matmul::matmul_backward(di, dw, dout, inp, weight, rows, in_dim, out_dim, dinp_mode);
    }

    fn embedding_forward(&self, out: V, table: V, tokens: &[u32], dim: usize) {
        embed::embedding_forward(self.write(out, &[table]), self.read(table), tokens, dim);
    }

    fn embedding_backward(&self, dtable: V, dout: V, tokens: &[u32], dim: usize) {
        embed::embedding_backward(self.write(dtable, &[dout]), self.read(dout), tokens, dim);
    }

    fn rmsnorm_forward(
        &self,
        out: V,
        rstd: V,
        inp: V,
        weight: V,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        let o = self.write(out, &[inp, weight, rstd]);
        let r = self.write(rstd, &[inp, weight]);
        assert_eq!(inp.len, rows * dim);
        rmsnorm::rmsnorm_forward(o, r, self.read(inp), self.read(weight), dim, eps);
    }

    fn rmsnorm_backward(
        &self,
        dinp: V,
        dweight: V,
        dout: V,
        inp: V,
        weight: V,
        rstd: V,
        rows: usize,
        dim: usize,
        dinp_mode: Accumulate,
    ) {
        let inputs = [dout, inp, weight, rstd];
        let di = self.write(dinp, &[&inputs[..], &[dweight]].concat());
        let dw = self.write(dweight, &inputs);
        assert_eq!(inp.len, rows * dim);
        let (dout, inp, weight, rstd) = (
            self.read(dout),
            self.read(inp),
            self.read(weight),
            self.read(rstd),
        );
        rmsnorm::rmsnorm_backward(di, dw, dout, inp, weight, rstd, dim, dinp_mode);
    }

    fn rope_forward(
        &self,
        out: V,
        inp: V,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        rot_dims: usize,
        theta: f32,
        start_pos: usize,
    ) {
        assert_eq!(inp.len, batch * seq * heads * head_dim);
        let o = self.write(out, &[inp]);
        rope::rope_forward(
            o,
            self.read(inp),
            start_pos,
            seq,
            heads,
            head_dim,
            rot_dims,
            theta as f64,
        );
    }

    fn rope_backward(
        &self,
        dinp: V,
        dout: V,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        rot_dims: usize,
        theta: f32,
    ) {
        assert_eq!(dout.len, batch * seq * heads * head_dim);
        let d = self.write(dinp, &[dout]);
        let dout = self.read(dout);
        rope::rope_backward(d, dout, seq, heads, head_dim, rot_dims, theta as f64);
    }

    fn attention_saved_len(&self, batch: usize, seq: usize, heads: usize) -> usize {
        batch * heads * seq * seq
    }

    fn attention_forward(
        &self,
        out: V,
        saved: V,
        q: V,
        k: V,
        v: V,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        let o = self.write(out, &[q, k, v, saved]);
        let p = self.write(saved, &[q, k, v]);
        attention::attention_forward(o, p, self.read(q), self.read(k), self.read(v), shape);
    }

    fn attention_backward(
        &self,
        dq: V,
        dk: V,
        dv: V,
        dout: V,
        q: V,
        k: V,
        v: V,
        saved: V,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        let inputs = [dout, q, k, v, saved];
        let gq = self.write(dq, &[&inputs[..], &[dk, dv]].concat());
        let gk = self.write(dk, &[&inputs[..], &[dv]].concat());
        let gv = self.write(dv, &inputs);
        let (dout, q, k, v, saved) = (
            self.read(dout),
            self.read(q),
            self.read(k),
            self.read(v),
            self.read(saved),
        );
        attention::attention_backward(gq, gk, gv, dout, q, k, v, saved, shape);
    }

    fn attention_decode(
        &self,
        out: V,
        q: V,
        k_cache: V,
        v_cache: V,
        batch: usize,
        len: usize,
        capacity: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) {
        let shape = AttentionShape {
            batch,
            seq: 1,
            heads,
            kv_heads,
            head_dim,
        };
        let o = self.write(out, &[q, k_cache, v_cache]);
        let (q, k, v) = (self.read(q), self.read(k_cache), self.read(v_cache));
        attention::attention_decode(o, q, k, v, len, capacity, shape);
    }

    fn swiglu_forward(&self, out: V, gate: V, up: V, n: usize) {
        assert_eq!(gate.len, n);
        let o = self.write(out, &[gate, up]);
        swiglu::swiglu_forward(o, self.read(gate), self.read(up));
    }

    fn swiglu_backward(&self, dgate: V, dup: V, dout: V, gate: V, up: V, n: usize) {
        assert_eq!(gate.len, n);
        let dg = self.write(dgate, &[dout, gate, up, dup]);
        let du = self.write(dup, &[dout, gate, up]);
        swiglu::swiglu_backward(dg, du, self.read(dout), self.read(gate), self.read(up));
    }

    fn relu2_forward(&self, out: V, inp: V, n: usize, slope: f32) {
        assert_eq!(inp.len, n);
        let o = self.write(out, &[inp]);
        activation::relu2_forward(o, self.read(inp), slope);
    }

    fn relu2_backward(&self, dinp: V, dout: V, inp: V, n: usize, slope: f32) {
        assert_eq!(inp.len, n);
        let d = self.write(dinp, &[dout, inp]);
        activation::relu2_backward(d, self.read(dout), self.read(inp), slope);
    }

    fn softcap_forward(&self, out: V, inp: V, n: usize, cap: f32) {
        assert_eq!(inp.len, n);
        let o = self.write(out, &[inp]);
        activation::softcap_forward(o, self.read(inp), cap);
    }

    fn softcap_backward(&self, dinp: V, dout: V, out: V, n: usize, cap: f32) {
        assert_eq!(out.len, n);
        let d = self.write(dinp, &[dout, out]);
        activation::softcap_backward(d, self.read(dout), self.read(out), cap);
    }

    fn scale_forward(
        &self,
        out: V,
        inp: V,
        s: V,
        rows: usize,
        groups: usize,
        inner: usize,
        mode: Accumulate,
    ) {
        assert_eq!((inp.len, s.len), (rows * groups * inner, groups));
        let o = self.write(out, &[inp, s]);
        scale::scale_forward(o, self.read(inp), self.read(s), inner, mode);
    }

    fn scale_backward(
        &self,
        dinp: V,
        ds: V,
        dout: V,
        inp: V,
        s: V,
        rows: usize,
        groups: usize,
        inner: usize,
        mode: Accumulate,
    ) {
        assert_eq!((inp.len, s.len), (rows * groups * inner, groups));
        let inputs = [dout, inp, s];
        let di = self.write(dinp, &[&inputs[..], &[ds]].concat());
        let g = self.write(ds, &inputs);
        let (dout, inp, s) = (self.read(dout), self.read(inp), self.read(s));
        scale::scale_backward(di, g, dout, inp, s, inner, mode);
    }

    fn residual_forward(&self, out: V, a: V, b: V, n: usize) {
        assert_eq!(a.len, n);
        let o = self.write(out, &[a, b]);
        swiglu::residual_forward(o, self.read(a), self.read(b));
    }

    fn accumulate(&self, out: V, inp: V) {
        assert_eq!(out.len, inp.len);
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
        xent::cross_entropy_backward(
            d,
            self.read(logits),
            self.read(logsumexp),
            targets,
            vocab,
            dloss,
        );
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

    fn muon_step(&self, params: V, grads: V, momentum: V, rows: usize, cols: usize, hp: &MuonStep) {
        assert_eq!(params.len, rows * cols);
        let p = self.write(params, &[grads, momentum]);
        let m = self.write(momentum, &[grads]);
        muon::muon_step(p, self.read(grads), m, rows, cols, hp);
    }
}
