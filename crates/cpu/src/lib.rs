//! The fast CPU backend: run-time ISA dispatch over four tiers (AVX2+FMA, AVX-512F,
//! AVX512-BF16, AMX-BF16; `kiln_core::cpu`), packed register-blocked GEMMs for every tier
//! ([`gemm`]), and a persistent thread pool ([`pool`]).
//!
//! Its buffers are the reference backend's [`HostMemory`], so a kernel this backend does not
//! (yet) accelerate is handed to the reference backend on the very same buffers: fallback
//! happens inside the backend, where the memory type is shared (as ggml's AMX backend hands
//! a shape it cannot tile to the CPU path). Its own: the matmuls, attention ([`attention`],
//! flash-style), the classifier fused with the cross-entropy ([`classifier`]), cross-entropy
//! and the soft cap ([`xent`]), SwiGLU, RMSNorm, RoPE, the
//! element-wise kernels and broadcast scales, Muon ([`muon`]), AdamW, the EMA and the sum of
//! squares ([`optim`]), the KV-cache attention ([`decode`]). The reference's: the embedding.
//!
//! Precision: master weights, gradients and optimizer state are f32. With `Precision::Bf16`
//! (the default where the tier has a native bf16 dot product) the matmuls round their inputs
//! to bf16 while packing and accumulate in f32; on the f32 tiers everything is f32. The AMX
//! tier runs the AVX512-BF16 micro-kernel until its tile kernel lands.
//!
//! With bf16 matmuls each weight keeps a bf16 copy packed for the forward product
//! ([`weights`]), written by AdamW as it updates the weight. A few rows of an f32 forward
//! product skip packing ([`gemv`]). With int8 weights (`with_int8_weights`) the products read
//! int8 or 2-bit ternary codes kept with each weight's memory, or an artifact's own codes
//! (`take_int_codes`; `with_given_codes` reads only those), through integer dot products: a
//! few rows in [`int8`], many in [`int8_gemm`].
//!
//! What it is not, yet: an AMX tile kernel (the AMX tier runs the AVX512-BF16 kernel).

/// Defines `fn $name(isa: Isa, args…)` whose body is compiled once per tier and picked at run
/// time: element-wise SIMD written once. The body is an `#[inline(always)]` function called
/// from one `#[target_feature]` function per tier, so the compiler vectorizes a copy of it for
/// each width. (A closure handed to a `#[target_feature]` function is not enough: when the
/// compiler declines to inline it, both tiers call one copy compiled without the features;
/// the disassembly showed AdamW, RMSNorm and the scales running SSE2 that way.)
macro_rules! tiered {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name(isa: kiln_core::cpu::Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            // SAFETY: the tier was checked when the backend was made.
            unsafe {
                match isa {
                    kiln_core::cpu::Isa::Avx2 => avx2($($arg),*),
                    _ => avx512($($arg),*),
                }
            }
        }
    };
}

pub mod attention;
pub mod classifier;
pub mod decode;
mod elementwise;
pub mod gemm;
pub mod gemv;
pub mod int8;
pub mod int8_gemm;
pub mod muon;
pub mod optim;
pub mod pool;
pub mod probe;
pub mod rmsnorm;
pub mod rope;
mod shared;
pub mod simd;
pub mod swiglu;
pub mod weights;
pub mod xent;

use std::sync::{Arc, Mutex};

use kiln_core::backend::{
    Accumulate, AdamWStep, AttentionShape, Backend, BackendError, ClassifierShape, DType,
    DecodeShape, FakeQuant, IntCodes, Kernel, MatmulShape, MatrixShape, MuonStep, NormShape, Qkv,
    RopeShape, ScaleShape, ShapeHint, Tolerance, View,
};
use kiln_core::cpu::{self, Isa};
pub use kiln_reference::HostMemory;
use kiln_reference::ReferenceBackend;

use gemm::Packed;
use gemm::{Mat, Microkernel};
use pool::ThreadPool;
use shared::SharedMut;
use weights::PackedWeight;

/// The precision of the matmuls (everything else computes in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Precision {
    /// bf16 inputs, f32 accumulation: only on tiers with a native bf16 dot product.
    Bf16,
    F32,
}

impl Precision {
    /// bf16 where the tier has a native bf16 dot product; f32 elsewhere. Without the dot
    /// product, bf16 could only be a storage format widened to f32 while packing: the FMAs
    /// stay f32, so the most it could save is half the bytes the packing reads. Measured on
    /// the AVX2 tier (stories15m b4, `perf`): all packing is about 4% of the step, the f32
    /// micro-kernel over 75%, so widening bf16 could gain at most about 2% while rounding
    /// every weight; f32 is the faster choice there (and PyTorch's bf16 ran 3× slower than
    /// its f32 on such a machine, FACTS).
    pub fn default_for(isa: Isa) -> Self {
        match isa {
            Isa::Avx512bf16 | Isa::Amx => Precision::Bf16,
            Isa::Avx2 | Isa::Avx512 => Precision::F32,
        }
    }
}

/// Which weights' forward products read int8 or ternary codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IntWeights {
    /// None: every product as the precision says.
    Off,
    /// Every weight whose rows divide into int8 groups, from its own int8 copy, or from the
    /// codes given with it (`--weights int8`).
    Own,
    /// Only weights given codes (`--weights packed`).
    Given,
}

/// What the fused classifier keeps between its forward and backward (`KILN_LOGITS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The softmax's input, `(rows, vocab)` f32: the backward reads it instead of
    /// recomputing it (the default: a third fewer of the head's FLOPs for 4 bytes per logit;
    /// measured in `classifier.rs`).
    Keep,
    /// Nothing: the backward recomputes each vocabulary chunk's logits, and no more than a
    /// chunk of logits per thread is ever held (for runs where `rows × vocab` floats do not
    /// fit).
    Recompute,
}

impl Logits {
    /// `KILN_LOGITS=keep|recompute`, or keep.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("KILN_LOGITS").ok().as_deref() {
            None | Some("keep") => Ok(Logits::Keep),
            Some("recompute") => Ok(Logits::Recompute),
            Some(other) => Err(format!("KILN_LOGITS={other}: expected keep or recompute")),
        }
    }
}

/// The fast CPU backend (see the module docs).
#[derive(Clone)]
pub struct CpuBackend {
    isa: Isa,
    precision: Precision,
    logits: Logits,
    /// Which weights' products read int8 or ternary codes ([`int8`], [`int8_gemm`]).
    int8: IntWeights,
    pool: Arc<ThreadPool>,
    /// The GEMMs' packing buffers, reused from call to call.
    scratch: Arc<Mutex<gemm::Scratch>>,
    /// RoPE's cos/sin tables for the last shape.
    rope_tables: Arc<Mutex<Option<rope::Tables>>>,
}

type V<'a> = View<'a, CpuBackend>;

/// Which product of a linear layer reads its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orientation {
    /// `X · Wᵀ`.
    Forward,
    /// `dY · W`.
    Backward,
}

/// The classifier weight `(vocab, dim)` as a linear layer's matrix.
fn classifier_matrix(s: ClassifierShape) -> MatmulShape {
    MatmulShape {
        rows: s.rows,
        in_dim: s.dim,
        out_dim: s.vocab,
    }
}

/// The same window as a view of the reference backend, which shares the memory type.
fn r(view: V) -> View<ReferenceBackend> {
    View::new(view.memory(), view.offset(), view.len())
}

/// Threads for the pool: `KILN_THREADS`, or every CPU this process may use.
fn default_threads() -> usize {
    std::env::var("KILN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl CpuBackend {
    /// The backend at the best tier this machine allows (lowered to `KILN_ISA`), at that
    /// tier's default precision, on all CPUs (or `KILN_THREADS`).
    pub fn new() -> Result<Self, String> {
        let isa = cpu::selected_isa()?
            .ok_or("this CPU has no AVX2+FMA, the lowest tier of the fast CPU backend")?;
        let backend = Self::with(isa, Precision::default_for(isa), default_threads())?;
        Ok(backend.keeping(Logits::from_env()?))
    }

    /// The backend at an explicit tier and precision (the tests run every tier this way).
    pub fn with(isa: Isa, precision: Precision, threads: usize) -> Result<Self, String> {
        if let Some(why) = cpu::features().missing(isa) {
            return Err(format!("tier {isa} is not usable here: {why}"));
        }
        if precision == Precision::Bf16 && Precision::default_for(isa) != Precision::Bf16 {
            return Err(format!(
                "tier {isa} has no native bf16 dot product: use f32"
            ));
        }
        Ok(Self::at(isa, precision, threads))
    }

    /// The backend at a tier and precision, unchecked: [`CpuBackend::with`] checks them (the
    /// AMX tier's emulated tests make it without AMX).
    fn at(isa: Isa, precision: Precision, threads: usize) -> Self {
        CpuBackend {
            isa,
            precision,
            logits: Logits::Keep,
            int8: IntWeights::Off,
            pool: Arc::new(ThreadPool::new(threads)),
            scratch: Arc::default(),
            rope_tables: Arc::default(),
        }
    }

    /// This backend with the fused classifier's `logits` policy.
    pub fn keeping(mut self, logits: Logits) -> Self {
        self.logits = logits;
        self
    }

    pub fn logits(&self) -> Logits {
        self.logits
    }

    /// This backend with int8 weights (`--weights int8`): each weight whose rows divide
    /// into groups of 32 or 64 is quantized once into an int8 copy kept with its memory
    /// ([`int8`]; rewritten when the weight is written), which every forward product reads
    /// instead of the f32 or bf16 one, decoding's few rows and evaluation's many alike. The
    /// loader rounds the weights through the same int8 groups
    /// (`kiln_core::quant::round_trip_groups`), so the copy holds the values the model has.
    /// Codes given with a weight (`take_int_codes`) are read as given.
    pub fn with_int8_weights(mut self) -> Self {
        self.int8 = IntWeights::Own;
        self
    }

    /// This backend reading only the codes given with weights (`--weights packed`: a packed
    /// artifact's ternary, int6 or int8 codes, offered by `take_int_codes`): those weights'
    /// products run on their codes, every other weight's as the precision says (the
    /// unquantized model evaluated beside an artifact keeps its own values).
    pub fn with_given_codes(mut self) -> Self {
        self.int8 = IntWeights::Given;
        self
    }

    /// Whether weights are quantized to int8 copies (`with_int8_weights`).
    pub fn int8_weights(&self) -> bool {
        self.int8 == IntWeights::Own
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The probe whose peak this backend's matmuls are measured against (MFU).
    pub fn peak_probe(&self) -> probe::Probe {
        probe::Probe::for_matmuls(self.isa, self.precision == Precision::Bf16)
    }

    /// `C = A·B` or `C += A·B` on this backend's micro-kernel and pool (`C` is `m × n`,
    /// row-major, dense).
    /// `c (m, n) (=|+=) a (m, k) · W'`, W' the weight matrix of shape `s` in `orientation`
    /// (`Wᵀ` forward, `W` backward; `weight` its view, `w` its values): forward with bf16
    /// matmuls from the weight's packed copy ([`weights`]), else packed for this product.
    #[allow(clippy::too_many_arguments)]
    fn gemm_weight(
        &self,
        m: usize,
        a: Mat,
        (weight, w): (V, &[f32]),
        s: MatmulShape,
        orientation: Orientation,
        c: &mut [f32],
        accumulate: bool,
    ) {
        let (k, n, b) = match orientation {
            // B (k, j) = W[j, k].
            Orientation::Forward => (
                s.in_dim,
                s.out_dim,
                Mat {
                    data: w,
                    rs: 1,
                    cs: s.in_dim,
                },
            ),
            // B (k, j) = W[k, j].
            Orientation::Backward => (
                s.out_dim,
                s.in_dim,
                Mat {
                    data: w,
                    rs: s.in_dim,
                    cs: 1,
                },
            ),
        };
        let kernel = self.kernel();
        if !kernel.is_bf16() || orientation == Orientation::Backward {
            return self.gemm(m, n, k, a, b, c, accumulate);
        }
        assert!(c.len() >= m * n, "gemm: C too short");
        let c = c.as_mut_ptr();
        if m <= gemm::FEW_ROWS && a.cs == 1 {
            // A few rows (decoding): read in place against the packed copy.
            let rows = (a.data, a.rs, m);
            // SAFETY: C is a unique borrow of at least m × n values (checked).
            return self.with_weight_copy((weight, w), s, |b| unsafe {
                gemm::multiply_rows(&self.pool, rows, b, c, n, accumulate)
            });
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        scratch.a.pack_a(&self.pool, kernel, a, m, k);
        // SAFETY: as above.
        self.with_weight_copy((weight, w), s, |b| unsafe {
            gemm::multiply(&self.pool, &scratch.a, b, c, n, accumulate)
        });
    }

    /// Runs `f` on the packed forward copy of `weight` (`w` its values, `s` its shape),
    /// packed first if it is missing or stale ([`weights`]).
    fn with_weight_copy<R>(
        &self,
        (weight, w): (V, &[f32]),
        s: MatmulShape,
        f: impl FnOnce(&Packed) -> R,
    ) -> R {
        let kernel = self.kernel();
        let memory = weight.memory();
        memory.with_derived(
            weight.offset(),
            weight.len(),
            |copy: &mut PackedWeight, stale| f(copy.forward(&self.pool, kernel, w, s, stale)),
        )
    }

    /// Runs `f` on the classifier weight as the fused head reads it: with bf16 matmuls its
    /// packed copy, of which the chunks are windows; else its values alone.
    fn with_classifier_weight<R>(
        &self,
        (weight, w): (V, &[f32]),
        s: ClassifierShape,
        f: impl FnOnce(classifier::Weight) -> R,
    ) -> R {
        if !self.kernel().is_bf16() {
            return f(classifier::Weight::unpacked(w));
        }
        self.with_weight_copy((weight, w), classifier_matrix(s), |forward| {
            f(classifier::Weight {
                values: w,
                forward: Some(forward),
            })
        })
    }

    /// The micro-kernel of the matmuls: the tier's, at the backend's precision.
    fn kernel(&self) -> Microkernel {
        Microkernel::for_isa(self.isa, self.precision == Precision::Bf16)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Mat,
        b: Mat,
        c: &mut [f32],
        accumulate: bool,
    ) {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = self.kernel();
        gemm::gemm(
            &self.pool,
            &mut scratch,
            kernel,
            m,
            n,
            k,
            a,
            b,
            c,
            n,
            accumulate,
        );
    }
}

/// f32 slices of a call's views: outputs checked disjoint from the inputs.
macro_rules! slices {
    (read $v:expr) => {
        // SAFETY: the slice lives only for this kernel call, and every output of the call is
        // checked against it by `host_slice_mut`.
        unsafe { ReferenceBackend::host_slice(r($v)) }
    };
    (write $v:expr, [$($input:expr),*]) => {
        // SAFETY: as above; the inputs listed are every other view of the call.
        unsafe { ReferenceBackend::host_slice_mut(r($v), &[$(r($input)),*]) }
    };
}

impl Backend for CpuBackend {
    type Memory = HostMemory;

    fn name(&self) -> String {
        let precision = match self.precision {
            Precision::Bf16 => "bf16 matmuls",
            Precision::F32 => "f32",
        };
        let logits = match self.logits {
            Logits::Keep => "",
            Logits::Recompute => ", logits recomputed",
        };
        let int8 = if self.int8 != IntWeights::Off {
            let what = match self.int8 {
                IntWeights::Given => "given codes",
                _ => "int8 weights",
            };
            match int8::Int8Dot::for_isa(self.isa) {
                int8::Int8Dot::Vnni512 => format!(", {what} (VNNI)"),
                int8::Int8Dot::Avx2 => format!(", {what} (AVX2)"),
                int8::Int8Dot::AvxVnni => format!(", {what} (AVX-VNNI)"),
            }
        } else {
            String::new()
        };
        format!(
            "cpu ({}, {precision}{int8}, {} threads{logits})",
            self.isa,
            self.threads()
        )
    }

    fn supports(&self, _kernel: Kernel, _shape: ShapeHint) -> Result<(), String> {
        // Every shape runs: what this backend does not tile goes to the reference kernels.
        Ok(())
    }

    fn tolerance(&self, kernel: Kernel) -> Tolerance {
        match (kernel, self.precision) {
            // bf16 inputs carry 8 significant bits (relative error ≤ 2⁻⁹ each), so a product
            // is within 2⁻⁸ of exact and a dot product within 2⁻⁸·Σ|aᵢbᵢ|. The conformance
            // cases have k ≤ 32 and inputs within ±1 (Σ|aᵢbᵢ| ≈ k/4 ≤ 8): 0.03 absolute,
            // and 1% of the value where it does not cancel.
            //
            // The fused classifier's logits are such products (k = C), and the loss and
            // gradients move with them: a logit off by δ moves the loss by at most δ and a
            // probability by a factor e^δ ≈ 1 + δ, and its gradient products are bf16 products
            // again: the same bound.
            (Kernel::Matmul | Kernel::ClassifierLoss, Precision::Bf16) => Tolerance {
                atol: 3e-2,
                rtol: 1e-2,
            },
            // Attention's five products with bf16 inputs, as PyTorch's autocast runs it: the
            // scores are dot products over D (≤ 32 here, inputs within ±1), within 2⁻⁸·D/4 ≈
            // 0.008 of exact; a score off by δ scales a probability by e^δ ≈ 1 + δ, and the
            // output (a convex combination of value rows, themselves rounded by 2⁻⁹) moves
            // by about δ; the gradients are bf16 products of those again: 1e-2 absolute and
            // 1e-2 relative.
            (Kernel::Attention, Precision::Bf16) => Tolerance {
                atol: 1e-2,
                rtol: 1e-2,
            },
            // Newton–Schulz in bf16, as the parameter-golf baseline runs it: five iterations
            // of three bf16 products each; the orthogonalised update's elements (about
            // 1/√cols) carry a few 2⁻⁸ of relative error, scaled by the learning rate into the
            // parameters: 2e-3 absolute, 2% relative.
            (Kernel::Muon, Precision::Bf16) => Tolerance {
                atol: 2e-3,
                rtol: 2e-2,
            },
            // f32 throughout, summed in another order than the reference: as the reference.
            _ => ReferenceBackend.tolerance(kernel),
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<HostMemory, BackendError> {
        ReferenceBackend.alloc(len, dtype)
    }

    fn upload(&self, dst: V, src: &[f32]) -> Result<(), BackendError> {
        ReferenceBackend.upload(r(dst), src)
    }

    fn download(&self, src: V, dst: &mut [f32]) -> Result<(), BackendError> {
        ReferenceBackend.download(r(src), dst)
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn memory_available(&self) -> Option<u64> {
        kiln_reference::host_memory_available()
    }

    fn zero(&self, dst: V) {
        ReferenceBackend.zero(r(dst))
    }

    fn copy(&self, dst: V, src: V) {
        ReferenceBackend.copy(r(dst), r(src))
    }

    fn matmul_forward(&self, out: V, inp: V, weight: V, s: MatmulShape) {
        assert_eq!(inp.len(), s.rows * s.in_dim, "matmul_forward: inp");
        assert_eq!(weight.len(), s.out_dim * s.in_dim, "matmul_forward: weight");
        assert_eq!(out.len(), s.rows * s.out_dim, "matmul_forward: out");
        let o = slices!(write out, [inp, weight]);
        let (x, w) = (slices!(read inp), slices!(read weight));
        if self.int8 != IntWeights::Off {
            let group = kiln_core::quant::int8_group(&[s.in_dim]);
            let dot = int8::Int8Dot::for_isa(self.isa);
            let memory = weight.memory();
            let (offset, len) = (weight.offset(), weight.len());
            let done = memory.with_derived(offset, len, |m: &mut int8::Codes, stale| {
                // A copy made from the values, or codes given with the weight
                // (`take_int_codes`, in their own groups), while no write has touched it.
                if stale || m.shape() != Some((s.out_dim, s.in_dim)) {
                    let (IntWeights::Own, Some(group)) = (self.int8, group) else {
                        // Given codes a write has made stale are dropped for good.
                        *m = int8::Codes::None;
                        return false;
                    };
                    let copy = int8::Int8Matrix::quantize(w, s.out_dim, s.in_dim, group);
                    *m = int8::Codes::Int8(copy);
                }
                if s.rows <= gemv::MAX_ROWS {
                    int8::forward(dot, &self.pool, o, x, m, s.rows);
                } else {
                    int8_gemm::forward(dot, &self.pool, o, x, m.panels(), s.rows);
                }
                true
            });
            if done {
                return;
            }
        }
        if s.rows <= gemv::MAX_ROWS && self.precision == Precision::F32 {
            // A few rows (decoding): dot products on the weight in place, no packing. With
            // bf16 matmuls the weight's packed copy is read instead, half the bytes
            // (`gemm::multiply_rows`).
            let shape = (s.rows, s.in_dim, s.out_dim);
            return gemv::forward(self.isa, &self.pool, o, x, w, shape);
        }
        // out (rows, out) = inp (rows, in) · Wᵀ.
        let a = Mat {
            data: x,
            rs: s.in_dim,
            cs: 1,
        };
        self.gemm_weight(s.rows, a, (weight, w), s, Orientation::Forward, o, false);
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
        assert_eq!(dout.len(), s.rows * s.out_dim, "matmul_backward: dout");
        assert_eq!(dinp.len(), s.rows * s.in_dim, "matmul_backward: dinp");
        assert_eq!(
            dweight.len(),
            s.out_dim * s.in_dim,
            "matmul_backward: dweight"
        );
        let di = slices!(write dinp, [dout, inp, weight, dweight]);
        let dw = slices!(write dweight, [dout, inp, weight]);
        let (dy, x, w) = (slices!(read dout), slices!(read inp), slices!(read weight));
        // dinp (rows, in) =/+= dout (rows, out) · W (out, in).
        let a = Mat {
            data: dy,
            rs: s.out_dim,
            cs: 1,
        };
        let add = dinp_mode == Accumulate::Add;
        self.gemm_weight(s.rows, a, (weight, w), s, Orientation::Backward, di, add);
        // dweight (out, in) += doutᵀ (out, rows) · inp (rows, in).
        let a = Mat {
            data: dy,
            rs: 1,
            cs: s.out_dim,
        };
        let b = Mat {
            data: x,
            rs: s.in_dim,
            cs: 1,
        };
        self.gemm(s.out_dim, s.in_dim, s.rows, a, b, dw, true);
    }

    fn embedding_forward(&self, out: V, table: V, tokens: &[u32], dim: usize) {
        ReferenceBackend.embedding_forward(r(out), r(table), tokens, dim)
    }

    fn embedding_backward(&self, dtable: V, dout: V, tokens: &[u32], dim: usize) {
        ReferenceBackend.embedding_backward(r(dtable), r(dout), tokens, dim)
    }

    fn rmsnorm_forward(&self, out: V, rstd: V, inp: V, weight: V, s: NormShape) {
        let o = slices!(write out, [inp, weight, rstd]);
        let rs = slices!(write rstd, [inp, weight]);
        let (x, w) = (slices!(read inp), slices!(read weight));
        rmsnorm::forward(self.isa, &self.pool, o, rs, x, w, s);
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
        let di = slices!(write dinp, [dout, inp, weight, rstd, dweight]);
        let dw = slices!(write dweight, [dout, inp, weight, rstd]);
        let ins = (
            slices!(read dout),
            slices!(read inp),
            slices!(read weight),
            slices!(read rstd),
        );
        rmsnorm::backward(self.isa, &self.pool, di, dw, ins, s, dinp_mode);
    }

    fn rope_forward(&self, out: V, inp: V, s: RopeShape) {
        let o = slices!(write out, [inp]);
        let x = slices!(read inp);
        rope::rotate(self.isa, &self.pool, &self.rope_tables, o, x, s, 1.0);
    }

    fn rope_backward(&self, dinp: V, dout: V, s: RopeShape) {
        assert_eq!(
            s.start_pos, 0,
            "rope_backward: training positions start at 0"
        );
        let d = slices!(write dinp, [dout]);
        let dy = slices!(read dout);
        rope::rotate(self.isa, &self.pool, &self.rope_tables, d, dy, s, -1.0);
    }

    fn attention_saved_len(&self, s: AttentionShape) -> usize {
        attention::saved_len(s)
    }

    fn attention_forward(&self, out: V, saved: V, inputs: Qkv<Self>, s: AttentionShape) {
        let Qkv { q, k, v } = inputs;
        assert_eq!(
            q.len(),
            s.batch * s.seq * s.heads * s.head_dim,
            "attention: q"
        );
        assert_eq!(
            k.len(),
            s.batch * s.seq * s.kv_heads * s.head_dim,
            "attention: k"
        );
        assert_eq!(v.len(), k.len(), "attention: v");
        assert_eq!(saved.len(), attention::saved_len(s), "attention: saved");
        let o = slices!(write out, [q, k, v, saved]);
        let l = slices!(write saved, [q, k, v]);
        let (q, k, v) = (slices!(read q), slices!(read k), slices!(read v));
        attention::forward((self.isa, self.kernel()), &self.pool, o, l, q, k, v, s);
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
        let gq = slices!(write grads.q, [dout, q, k, v, saved, grads.k, grads.v]);
        let gk = slices!(write grads.k, [dout, q, k, v, saved, grads.v]);
        let gv = slices!(write grads.v, [dout, q, k, v, saved]);
        let (dy, q, k, v, lse) = (
            slices!(read dout),
            slices!(read q),
            slices!(read k),
            slices!(read v),
            slices!(read saved),
        );
        assert_eq!(lse.len(), attention::saved_len(s), "attention: saved");
        let tier = (self.isa, self.kernel());
        attention::backward(tier, &self.pool, (gq, gk, gv), dy, q, k, v, lse, s);
    }

    fn attention_decode(&self, out: V, q: V, k_cache: V, v_cache: V, s: DecodeShape) {
        let o = slices!(write out, [q, k_cache, v_cache]);
        let (qs, k, v) = (
            slices!(read q),
            slices!(read k_cache),
            slices!(read v_cache),
        );
        decode::decode(self.isa, &self.pool, o, qs, (k, v), s);
    }

    fn swiglu_forward(&self, out: V, gate: V, up: V) {
        let o = slices!(write out, [gate, up]);
        let (g, u) = (slices!(read gate), slices!(read up));
        swiglu::forward(self.isa, &self.pool, o, g, u);
    }

    fn swiglu_backward(&self, dgate: V, dup: V, dout: V, gate: V, up: V) {
        let dg = slices!(write dgate, [dout, gate, up, dup]);
        let du = slices!(write dup, [dout, gate, up]);
        let (dy, g, u) = (slices!(read dout), slices!(read gate), slices!(read up));
        swiglu::backward(self.isa, &self.pool, dg, du, dy, g, u);
    }

    fn relu2_forward(&self, out: V, inp: V, slope: f32) {
        let o = slices!(write out, [inp]);
        elementwise::relu2_forward(self.isa, &self.pool, o, slices!(read inp), slope);
    }

    fn relu2_backward(&self, dinp: V, dout: V, inp: V, slope: f32) {
        let d = slices!(write dinp, [dout, inp]);
        let (dy, x) = (slices!(read dout), slices!(read inp));
        elementwise::relu2_backward(self.isa, &self.pool, d, dy, x, slope);
    }

    fn softcap_forward(&self, out: V, inp: V, cap: f32) {
        let o = SharedMut::new(slices!(write out, [inp]));
        let z = slices!(read inp);
        let (n, isa) = (z.len(), self.isa);
        const CHUNK: usize = 1 << 14;
        self.pool.run(n.div_ceil(CHUNK), &|c| {
            let (start, len) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
            // SAFETY: chunk c of `out` is this task's alone.
            let y = unsafe { o.slice(start, len) };
            xent::softcap(isa, y, &z[start..start + len], cap);
        });
    }

    fn softcap_backward(&self, dinp: V, dout: V, out: V, cap: f32) {
        ReferenceBackend.softcap_backward(r(dinp), r(dout), r(out), cap)
    }

    fn residual_forward(&self, out: V, a: V, b: V) {
        let o = slices!(write out, [a, b]);
        let (a, b) = (slices!(read a), slices!(read b));
        elementwise::add(self.isa, &self.pool, o, Some(a), b);
    }

    // XSA: O(rows · H·D) per layer, a residual add's cost; the reference's code on the same
    // memory.
    fn xsa_forward(&self, out: V, y: V, v: V, s: AttentionShape) {
        ReferenceBackend.xsa_forward(r(out), r(y), r(v), s)
    }

    fn xsa_backward(&self, dy: V, dv: V, dout: V, y: V, v: V, s: AttentionShape) {
        ReferenceBackend.xsa_backward(r(dy), r(dv), r(dout), r(y), r(v), s)
    }

    // EngramHash's gate: O(rows · dim) once per step at one layer, a residual add's cost;
    // the reference's code on the same memory.
    fn gate_forward(&self, out: V, a: V, b: V, dim: usize, scale: f32) {
        ReferenceBackend.gate_forward(r(out), r(a), r(b), dim, scale)
    }

    fn gate_backward(&self, da: V, db: V, dout: V, out: V, a: V, b: V, dim: usize, scale: f32) {
        let (dout, out) = (r(dout), r(out));
        ReferenceBackend.gate_backward(r(da), r(db), dout, out, r(a), r(b), dim, scale)
    }

    fn accumulate(&self, out: V, inp: V) {
        let o = slices!(write out, [inp]);
        elementwise::add(self.isa, &self.pool, o, None, slices!(read inp));
    }

    fn scale_forward(&self, out: V, inp: V, scale: V, s: ScaleShape, mode: Accumulate) {
        assert_eq!(
            (inp.len(), scale.len()),
            (s.rows * s.groups * s.inner, s.groups)
        );
        let o = slices!(write out, [inp, scale]);
        let (x, sc) = (slices!(read inp), slices!(read scale));
        let add = mode == Accumulate::Add;
        elementwise::scale_forward(self.isa, &self.pool, o, x, sc, s.inner, add);
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
        let di = slices!(write dinp, [dout, inp, scale, dscale]);
        let ds = slices!(write dscale, [dout, inp, scale]);
        let ins = (slices!(read dout), slices!(read inp), slices!(read scale));
        let add = mode == Accumulate::Add;
        elementwise::scale_backward(self.isa, &self.pool, di, ds, ins, s.inner, add);
    }

    fn cross_entropy_forward(
        &self,
        losses: V,
        logsumexp: V,
        logits: V,
        targets: &[u32],
        vocab: usize,
    ) {
        let rows = targets.len();
        assert_eq!(logits.len(), rows * vocab, "cross_entropy_forward: logits");
        assert!(
            targets.iter().all(|&t| (t as usize) < vocab),
            "target out of vocabulary"
        );
        let l = slices!(write losses, [logits, logsumexp]);
        let s = slices!(write logsumexp, [logits]);
        let z = slices!(read logits);
        let (l, s) = (SharedMut::new(l), SharedMut::new(s));
        let isa = self.isa;
        self.pool.run(rows, &|row| {
            let zr = &z[row * vocab..(row + 1) * vocab];
            let (max, sum) = xent::max_and_sum(isa, zr);
            let lse = max + sum.ln();
            // SAFETY: each task writes only its own row's element.
            unsafe {
                s.set(row, lse);
                l.set(row, lse - zr[targets[row] as usize]);
            }
        });
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
        let rows = targets.len();
        assert_eq!(logits.len(), rows * vocab, "cross_entropy_backward: logits");
        assert!(
            targets.iter().all(|&t| (t as usize) < vocab),
            "target out of vocabulary"
        );
        let d = SharedMut::new(slices!(write dlogits, [logits, logsumexp]));
        let (z, s) = (slices!(read logits), slices!(read logsumexp));
        let isa = self.isa;
        self.pool.run(rows, &|row| {
            // SAFETY: each task writes only its own row.
            let dr = unsafe { d.slice(row * vocab, vocab) };
            xent::exp_scaled(isa, dr, &z[row * vocab..(row + 1) * vocab], s[row], dloss);
            dr[targets[row] as usize] -= dloss;
        });
    }

    fn classifier_saved_len(&self, s: ClassifierShape) -> usize {
        match self.logits {
            Logits::Keep => classifier::saved_len(self.kernel(), s),
            Logits::Recompute => 0,
        }
    }

    fn classifier_loss_forward(
        &self,
        losses: V,
        logsumexp: V,
        saved: V,
        inp: V,
        weight: V,
        targets: &[u32],
        s: ClassifierShape,
    ) {
        let n = s.rows;
        assert!(
            losses.len() == n && logsumexp.len() == n,
            "classifier: losses"
        );
        assert_eq!(
            saved.len(),
            self.classifier_saved_len(s),
            "classifier: saved"
        );
        let l = slices!(write losses, [logsumexp, saved, inp, weight]);
        let lse = slices!(write logsumexp, [saved, inp, weight]);
        let sv = (!saved.is_empty()).then(|| slices!(write saved, [inp, weight]));
        let (x, w) = (slices!(read inp), slices!(read weight));
        let (isa, kernel, pool) = (self.isa, self.kernel(), &*self.pool);
        self.with_classifier_weight((weight, w), s, |w| {
            classifier::forward(isa, kernel, pool, l, (lse, sv), x, w, targets, s)
        });
    }

    fn classifier_loss_backward(
        &self,
        dinp: V,
        dweight: V,
        inp: V,
        weight: V,
        (logsumexp, saved): (V, V),
        targets: &[u32],
        s: ClassifierShape,
        dloss: f32,
        dinp_mode: Accumulate,
    ) {
        assert_eq!(logsumexp.len(), s.rows, "classifier: logsumexp");
        assert_eq!(
            saved.len(),
            self.classifier_saved_len(s),
            "classifier: saved"
        );
        let di = slices!(write dinp, [dweight, inp, weight, logsumexp, saved]);
        let dw = slices!(write dweight, [inp, weight, logsumexp, saved]);
        let (x, w) = (slices!(read inp), slices!(read weight));
        let lse = slices!(read logsumexp);
        let state = (lse, (!saved.is_empty()).then(|| slices!(read saved)));
        let (isa, kernel, pool) = (self.isa, self.kernel(), &*self.pool);
        let (d, mode) = (dloss, dinp_mode);
        self.with_classifier_weight((weight, w), s, |w| {
            classifier::backward(isa, kernel, pool, di, dw, x, w, state, targets, s, d, mode)
        });
    }

    fn take_int_codes(&self, weight: V, c: &IntCodes) -> bool {
        if self.int8 == IntWeights::Off || c.rows * c.cols != weight.len() {
            return false;
        }
        let Ok(m) = int8::Codes::new(c.rows, c.cols, c.group, c.codes, c.scales) else {
            return false;
        };
        let memory = weight.memory();
        memory.with_derived(weight.offset(), weight.len(), |slot, _| *slot = m);
        true
    }

    fn fake_quantize(&self, dst: V, src: V, q: FakeQuant, rotation: Option<usize>) {
        assert_eq!(dst.len(), src.len(), "fake_quantize: lengths");
        let d = slices!(write dst, [src]);
        optim::fake_quantize(&self.pool, d, slices!(read src), q, rotation);
    }

    fn sum_squares(&self, x: V) -> f64 {
        optim::sum_squares(self.isa, &self.pool, slices!(read x))
    }

    fn adamw_step(&self, params: V, grads: V, m: V, v: V, hp: &AdamWStep) {
        let p = slices!(write params, [grads, m, v]);
        let mm = slices!(write m, [grads, v]);
        let vv = slices!(write v, [grads]);
        let bufs = (p, slices!(read grads), mm, vv);
        // A weight whose products keep a packed copy has it written by this step.
        let (memory, offset) = (params.memory(), params.offset());
        weights::adamw_step(self.isa, &self.pool, memory, offset, bufs, hp);
    }

    fn ema_update(&self, ema: V, params: V, decay: f32) {
        let e = slices!(write ema, [params]);
        optim::ema(self.isa, &self.pool, e, slices!(read params), decay);
    }

    fn muon_step(&self, params: V, grads: V, momentum: V, s: MatrixShape, hp: &MuonStep) {
        let n = s.rows * s.cols;
        assert!(
            params.len() == n && grads.len() == n && momentum.len() == n,
            "muon: sizes"
        );
        let p = slices!(write params, [grads, momentum]);
        let m = slices!(write momentum, [grads]);
        let g = slices!(read grads);
        muon::step(self, p, g, m, s, hp);
    }
}

/// The AMX tier's whole backend where the CPU has no AMX: the tile kernel runs through its
/// emulation (`gemm/amx.rs`), everything else as the tier runs it, so the tier's packing
/// (k padded to 32, A in rows of 32 k), its weight copies and the products of every kernel are
/// checked on any machine with AVX512-BF16. Where the CPU has AMX, the conformance suite runs
/// the real tier instead.
#[cfg(test)]
mod emulated_amx {
    use super::*;

    fn backend() -> Option<CpuBackend> {
        if !cpu::features().supports(Isa::Avx512bf16) {
            println!("skipped: the AMX tier's packers need AVX512-BF16");
            return None;
        }
        Some(CpuBackend::at(Isa::Amx, Precision::Bf16, 2))
    }

    #[test]
    fn the_amx_tier_passes_the_kernel_table_with_its_tile_kernel_emulated() {
        let Some(backend) = backend() else { return };
        for backend in [backend.clone(), backend.keeping(Logits::Recompute)] {
            let report = kiln_conformance::check_kernels(&backend).unwrap();
            assert!(
                report.declined.is_empty(),
                "declined: {:?}",
                report.declined
            );
            kiln_conformance::check_memory(&backend).unwrap();
        }
    }

    /// The bf16 tolerances of `tests/conformance.rs` (the reasons are there).
    #[test]
    fn the_amx_tier_matches_the_pytorch_fixtures_with_its_tile_kernel_emulated() {
        let Some(backend) = backend() else { return };
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        for name in kiln_conformance::FIXTURES {
            let path = fixtures.join(format!("model_{name}.safetensors"));
            let tolerance = kiln_conformance::ModelTolerance::Nmse {
                outputs: 1e-3,
                gradients: 1e-2,
                trajectory: 1e-4,
            };
            kiln_conformance::check_fixture_within(backend.clone(), &path, tolerance)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
        kiln_conformance::check_training_smoke(backend, "tiny-gqa").unwrap();
    }
}
