//! kiln's CUDA backend.
//!
//! - **Loaded at run time.** cudarc with dynamic loading: this crate builds on any machine,
//!   and [`CudaBackend::new`] says why it cannot run (no driver, no NVRTC, no cuBLASLt, no
//!   device) instead of panicking ([`libs`]).
//! - **Kernels in CUDA C** (`kernels/`, one file per kernel family), compiled at start-up by NVRTC for the device's
//!   architecture, the PTX cached on disk ([`compile`]); each matches the reference backend's
//!   kernel of the same name, and the conformance suite holds it to it.
//! - **GEMMs through cuBLASLt**, bf16 (or f16) multiplies with f32 accumulation ([`gemm`]);
//!   Muon's Newton–Schulz iterations use the same products.
//! - **QAT on the device**: the quantizers' round trips (f16, ternary, int with its row
//!   percentile, the block Hadamard rotation) are kernels, bit for bit the export's
//!   arithmetic.
//! - **Weights stay on the device.** Parameters, gradients, optimizer state and activations
//!   live in device arenas; a step's transfers are its token ids and targets up and the loss
//!   and the gradient norm down (and a mixture of experts' routing, decided on the host).
//!   Everything runs in order on the legacy default stream.
//! - Buffers are f32 or bf16; kernels compute in f32 (bf16 buffers are staging, converted by
//!   `copy`, `upload` and `download`).
//! - **Data parallel over NCCL** ([`nccl`]): one process per GPU, the gradient arena
//!   all-reduced in place.

mod attention;
pub mod compile;

pub use attention::AttentionPath;
pub mod gemm;
pub mod libs;
pub mod nccl;
mod optim;
mod profile;
mod quant;
mod xent;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use kiln_core::backend::{
    Accumulate, AdamWStep, AttentionShape, Backend, BackendError, ClassifierShape, DType,
    DecodeShape, DeviceMemory, FakeQuant, Kernel, MatmulShape, MatrixShape, MuonStep, NormShape,
    Qkv, RopeShape, ScaleShape, ShapeHint, Tolerance, View,
};

pub use gemm::Operands;
pub use gemm::Products;
use gemm::{Gemm, GemmShape};
use libs::Lib;
use profile::Profiler;

/// What `kiln doctor` reports about the GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
    /// Where each library was loaded from.
    pub libraries: Vec<(String, String)>,
}

/// Whether the backend can run here: the device's facts, or why not.
pub fn probe() -> Result<DeviceInfo, String> {
    libs::require(Lib::Driver)?;
    let nvrtc = compile::nvrtc_version()?;
    libs::require(Lib::CublasLt)?;
    // SAFETY: libcuda is loaded (checked above), so cudarc's calls do not panic.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver found (libcuda.so.1 could not be opened)".into());
    }
    cudarc::driver::result::init()
        .map_err(|e| format!("the CUDA driver failed to start: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("no CUDA device: {e:?}"))?;
    if count < 1 {
        return Err("the CUDA driver is loaded but sees no GPU".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("CUDA context: {e:?}"))?;
    let mut driver_version = 0;
    // SAFETY: a plain out-parameter.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
    Ok(DeviceInfo {
        name: ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
        compute_capability: ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
        memory_bytes: ctx.total_mem().unwrap_or(0),
        driver_version,
        nvrtc_version: nvrtc,
        libraries: [Lib::Driver, Lib::Nvrtc, Lib::CublasLt]
            .iter()
            .map(|&l| {
                let at = libs::location(l).map_or("not found".into(), |p| p.display().to_string());
                (l.soname().to_string(), at)
            })
            .collect(),
    })
}

/// One device allocation.
pub struct CudaMemory {
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
    ctx: Arc<CudaContext>,
}

impl DeviceMemory for CudaMemory {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by `malloc_sync` in `alloc`, freed once; cuMemFree waits for
            // the kernels using it.
            unsafe {
                let _ = cudarc::driver::result::free_sync(self.ptr);
            }
        }
    }
}

/// A device buffer the backend keeps for itself (token ids, a classifier chunk's logits,
/// Newton–Schulz's matrices), grown on demand.
struct Scratch {
    ptr: CUdeviceptr,
    bytes: usize,
}

/// The bf16 copies of the last few f32 operands the products rounded (with
/// [`Operands::Bf16`]), so that q, k and v's product reads one copy of their shared input and a
/// linear layer's two backward products one copy of the output gradient. A copy is good while
/// nothing may have written its source: every launch, zeroing, copy, upload and all-reduce
/// moves `generation` on (dropping every copy), and a product drops the copies its output
/// overlaps.
#[derive(Default)]
struct Converted {
    generation: u64,
    /// (source, f32 elements, generation made) per slot; slot i lives in scratch
    /// `CONVERTED[i]`.
    slots: [Option<(CUdeviceptr, usize, u64)>; 3],
    /// The slot filled longest ago is filled next.
    next: usize,
}

const CONVERTED: [&str; 3] = ["gemm_bf16_0", "gemm_bf16_1", "gemm_bf16_2"];

/// A product's operand: f32 (rounded first when the backend multiplies on bf16 operands) or
/// bf16 already.
#[derive(Clone, Copy)]
enum Src {
    F32(CUdeviceptr),
    Bf16(CUdeviceptr),
}

struct Inner {
    /// Per-launch timing (`KILN_CUDA_PROFILE`); first, so that its events go before the
    /// context.
    profile: Option<Profiler>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    kernels: HashMap<&'static str, CudaFunction>,
    gemm: Gemm,
    scratch: Mutex<HashMap<&'static str, Scratch>>,
    /// bf16 copies of recent product operands ([`Operands::Bf16`]).
    converted: Mutex<Converted>,
    /// RoPE's cos/sin tables by (start, seq, rot_dims, theta bits), computed on the host in
    /// f64 as the reference does.
    rope_tables: Mutex<HashMap<(usize, usize, usize, u32), CudaMemory>>,
    info: DeviceInfo,
}

/// The CUDA backend (see the crate docs). Cloning shares the device context.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
    products: Products,
    attention: AttentionPath,
    operands: Operands,
}

type V<'a> = View<'a, CudaBackend>;

/// A kernel argument, passed in an 8-byte slot (the driver reads as many bytes as the kernel's
/// parameter has, little-endian).
#[derive(Clone, Copy)]
enum Arg {
    Ptr(CUdeviceptr),
    Int(i64),
    Float(f32),
}

use Arg::{Float, Int, Ptr};

const THREADS: u32 = 256;
/// A product's name in the launch profile: `gemm m×n×k`, with `aᵀ`/`bᵀ` for transposed
/// operands.
fn gemm_label(s: GemmShape) -> String {
    format!(
        "gemm {}×{}×{}{}{}",
        s.m,
        s.n,
        s.k,
        if s.ta { " aᵀ" } else { "" },
        if s.tb { " bᵀ" } else { "" },
    )
}

/// `KILN_CUDA_OPERANDS`: `bf16` (unset) or `f32` (see [`CudaBackend::with_operands`]).
fn operands_from_env() -> Result<Operands, String> {
    match std::env::var("KILN_CUDA_OPERANDS").as_deref() {
        Ok("f32") => Ok(Operands::F32),
        Err(_) | Ok("bf16") => Ok(Operands::Bf16),
        Ok(other) => Err(format!(
            "KILN_CUDA_OPERANDS must be f32 or bf16, got {other:?}"
        )),
    }
}

/// The largest head dimension the attention kernels keep in registers (`32 · MAXJ`).
const MAX_HEAD_DIM: usize = 128;

fn device_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device {
        backend: "cuda".into(),
        message: format!("{what}: {e:?}"),
    }
}

impl CudaBackend {
    /// The backend on GPU 0, or why it cannot run here.
    pub fn new() -> Result<Self, String> {
        let info = probe()?;
        let ctx = CudaContext::new(0).map_err(|e| format!("CUDA context: {e:?}"))?;
        // SAFETY: everything runs on the one legacy stream, in order; no cross-stream events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = info.compute_capability;
        let arch: &'static str = match (major, minor) {
            (9, _) => "compute_90",
            (8, 9) => "compute_89",
            (8, 6) => "compute_86",
            (8, _) => "compute_80",
            (10, _) => "compute_100",
            (12, _) => "compute_120",
            _ if major >= 8 => "compute_80",
            _ => {
                return Err(format!(
                    "{} (sm_{major}{minor}) is older than sm_80, which kiln needs",
                    info.name
                ))
            }
        };
        let ptx = compile::cached(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the kernels' PTX for {arch}: {e:?}"))?;
        let mut kernels = HashMap::new();
        for name in compile::KERNELS {
            let f = module
                .load_function(name)
                .map_err(|e| format!("kernel {name} missing from the module: {e:?}"))?;
            kernels.insert(name, f);
        }
        let gemm = Gemm::new()?;
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                profile: Profiler::from_env(),
                ctx,
                stream,
                _module: module,
                kernels,
                gemm,
                scratch: Mutex::new(HashMap::new()),
                converted: Mutex::new(Converted::default()),
                rope_tables: Mutex::new(HashMap::new()),
                info,
            }),
            products: Products::Bf16,
            attention: AttentionPath::from_env()?,
            operands: operands_from_env()?,
        })
    }

    /// This backend storing the single products' operands as `operands` (bf16 by default, or
    /// `KILN_CUDA_OPERANDS`'s choice): with [`Operands::Bf16`] and bf16 products, each operand
    /// is rounded to bf16 by a kernel before cuBLASLt reads it (half the bytes it streams; a
    /// copy is reused while its source is unchanged); attention's batched products keep f32
    /// operands. f16 products ignore it.
    pub fn with_operands(mut self, operands: Operands) -> Self {
        self.operands = operands;
        self
    }

    /// This backend computing causal attention by `path` (the tensor-core kernels by default,
    /// or `KILN_CUDA_ATTENTION`'s choice).
    pub fn with_attention(mut self, path: AttentionPath) -> Self {
        self.attention = path;
        self
    }

    pub fn attention_path(&self) -> AttentionPath {
        self.attention
    }

    /// This backend multiplying in `products` (bf16 by default).
    pub fn with_products(mut self, products: Products) -> Self {
        self.products = products;
        self
    }

    pub fn products(&self) -> Products {
        self.products
    }

    /// The number of GPUs the driver sees, or why none can be used.
    pub fn device_count() -> Result<usize, String> {
        probe()?;
        cudarc::driver::result::device::get_count()
            .map(|n| n as usize)
            .map_err(|e| format!("cuDeviceGetCount: {e:?}"))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    pub(crate) fn bind(&self) {
        self.inner
            .ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("cuda: binding the context: {e:?}"));
    }

    /// The device address of an f32 view (kernels compute in f32 only).
    fn f(&self, view: V) -> Arg {
        assert_eq!(
            view.dtype(),
            DType::F32,
            "the CUDA kernels compute in f32; got a bf16 view"
        );
        Ptr(addr(view))
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, shared: u32, args: &[Arg]) {
        self.bind();
        let slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Ptr(p) => p,
                Int(i) => i as u64,
                Float(f) => f.to_bits() as u64,
            })
            .collect();
        if name != "f32_to_bf16" {
            self.written();
        }
        let f = &self.inner.kernels[name];
        let mut builder = self.inner.stream.launch_builder(f);
        for slot in &slots {
            builder.arg(slot);
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        self.timed(
            || name.to_string(),
            // SAFETY: each kernel's arguments are built by its one caller below from views
            // checked against their allocations; the kernels index within the shapes they are
            // given.
            || unsafe { builder.launch(cfg) },
        )
        .unwrap_or_else(|e| panic!("cuda: launching {name}: {e:?}"));
    }

    /// Runs `f`, timed on the device under `name()` when profiling (`KILN_CUDA_PROFILE`).
    fn timed<R>(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        match &self.inner.profile {
            None => f(),
            Some(p) => {
                let start = p.start();
                let r = f();
                p.end(start, name());
                r
            }
        }
    }

    /// A grid-stride launch over `n` elements.
    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) {
        if n == 0 {
            return;
        }
        let blocks = n.div_ceil(THREADS as usize).min(1 << 16) as u32;
        self.launch(name, (blocks, 1, 1), THREADS, 0, args);
    }

    /// A warp per task, 8 warps a block.
    fn warps(&self, name: &str, tasks: usize, args: &[Arg]) {
        if tasks == 0 {
            return;
        }
        self.launch(name, (tasks.div_ceil(8) as u32, 1, 1), 256, 0, args);
    }

    /// The scratch buffer `name`, at least `bytes` long.
    fn scratch(&self, name: &'static str, bytes: usize) -> CUdeviceptr {
        self.bind();
        let mut all = self.inner.scratch.lock().unwrap();
        let entry = all.entry(name).or_insert(Scratch { ptr: 0, bytes: 0 });
        if entry.bytes < bytes {
            // SAFETY: the old buffer is freed once (cuMemFree waits for kernels using it); the
            // new one is a plain allocation.
            unsafe {
                if entry.ptr != 0 {
                    let _ = cudarc::driver::result::free_sync(entry.ptr);
                }
                let bytes = bytes.next_power_of_two().max(256);
                entry.ptr = cudarc::driver::result::malloc_sync(bytes)
                    .unwrap_or_else(|e| panic!("cuda: scratch {name} of {bytes} bytes: {e:?}"));
                entry.bytes = bytes;
            }
        }
        entry.ptr
    }

    /// Uploads host `u32`s (token ids, targets) into the scratch buffer `name`.
    fn upload_ids(&self, name: &'static str, ids: &[u32]) -> CUdeviceptr {
        self.written();
        let ptr = self.scratch(name, ids.len() * 4);
        // SAFETY: the scratch holds at least `ids.len()` u32s; the synchronous copy on the
        // legacy stream runs after the kernels queued before it.
        unsafe { cudarc::driver::result::memcpy_htod_sync(ptr, ids) }
            .unwrap_or_else(|e| panic!("cuda: uploading ids: {e:?}"));
        ptr
    }

    /// `c = alpha·op(a)·op(b) + beta·c` on device pointers.
    /// A strided batch of products ([`gemm::Batch`]) on raw device pointers.
    fn gemm_batched(
        &self,
        s: GemmShape,
        batch: gemm::Batch,
        alpha: f32,
        (a, b): (CUdeviceptr, CUdeviceptr),
        beta: f32,
        c: CUdeviceptr,
    ) {
        self.bind();
        let label = || format!("{} ×{}", gemm_label(s), batch.count);
        let operands = (self.products, Operands::F32);
        // The batch's outputs are strided over its count: drop every bf16 copy rather than
        // work out which ones they overlap.
        self.written();
        // SAFETY: the callers derive the pointers from views checked against the shapes.
        self.timed(label, || unsafe {
            self.inner
                .gemm
                .run_batched(s, batch, operands, alpha, (a, b), beta, c)
        })
        .unwrap_or_else(|e| panic!("cuda: {e}"));
    }

    /// Whether single products round their operands to bf16 first ([`Operands::Bf16`] with bf16
    /// products).
    fn on_bf16_operands(&self) -> bool {
        (self.products, self.operands) == (Products::Bf16, Operands::Bf16)
    }

    /// Something may have written device memory outside a product: the bf16 copies of
    /// operands are stale.
    pub(crate) fn written(&self) {
        self.inner.converted.lock().unwrap().generation += 1;
    }

    fn gemm(
        &self,
        s: GemmShape,
        alpha: f32,
        a: CUdeviceptr,
        b: CUdeviceptr,
        beta: f32,
        c: CUdeviceptr,
    ) {
        self.gemm_on(s, alpha, (Src::F32(a), Src::F32(b)), beta, c)
    }

    /// `c = alpha·op(a)·op(b) + beta·c` (see [`GemmShape`]) for operands f32 or bf16 already;
    /// with bf16 operands ([`Operands::Bf16`] and bf16 products) an f32 operand is rounded into
    /// a bf16 copy first (or its copy reused), else a bf16 one is refused.
    fn gemm_on(&self, s: GemmShape, alpha: f32, (a, b): (Src, Src), beta: f32, c: CUdeviceptr) {
        self.bind();
        let label = || gemm_label(s);
        if !self.on_bf16_operands() {
            let (Src::F32(a), Src::F32(b)) = (a, b) else {
                panic!("cuda: bf16 operands need bf16 products on bf16 operands")
            };
            // SAFETY: the callers pass views whose lengths were checked against the shape.
            return self
                .timed(label, || unsafe {
                    self.inner.gemm.run(s, self.products, alpha, a, b, beta, c)
                })
                .unwrap_or_else(|e| panic!("cuda: {e}"));
        }
        if s.m == 0 || s.n == 0 {
            return;
        }
        // Each operand's whole stored extent: rows × leading dimension, the last row's tail cut.
        let extent = |rows: usize, cols: usize, ld: usize| match rows * cols {
            0 => 0,
            _ => (rows - 1) * ld + cols,
        };
        let (a_rows, a_cols) = if s.ta { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.tb { (s.n, s.k) } else { (s.k, s.n) };
        let (na, nb) = (extent(a_rows, a_cols, s.lda), extent(b_rows, b_cols, s.ldb));
        let (a16, a_slot) = self.bf16_operand(a, na, None);
        let (b16, _) = self.bf16_operand(b, nb, a_slot);
        let operands = (Products::Bf16, Operands::Bf16);
        // SAFETY: the callers pass views whose lengths were checked against the shape; the
        // bf16 operands hold the same extents.
        self.timed(label, || unsafe {
            self.inner
                .gemm
                .run_batched(s, gemm::Batch::ONE, operands, alpha, (a16, b16), beta, c)
        })
        .unwrap_or_else(|e| panic!("cuda: {e}"));
        // The product wrote c's extent: copies of anything there are stale.
        let written = (c, c + 4 * extent(s.m, s.n, s.ldc) as u64);
        let mut conv = self.inner.converted.lock().unwrap();
        for slot in conv.slots.iter_mut() {
            if let Some((src, n, _)) = *slot {
                if src < written.1 && written.0 < src + 4 * n as u64 {
                    *slot = None;
                }
            }
        }
    }

    /// The bf16 copy of operand `src` (`n` elements), rounded now unless a good copy exists,
    /// and the slot that holds it; slot `keep` (the other operand's) is not overwritten.
    fn bf16_operand(
        &self,
        src: Src,
        n: usize,
        keep: Option<usize>,
    ) -> (CUdeviceptr, Option<usize>) {
        let src = match src {
            Src::Bf16(p) => return (p, None),
            Src::F32(p) => p,
        };
        let mut conv = self.inner.converted.lock().unwrap();
        let wanted = Some((src, n, conv.generation));
        if let Some(i) = conv.slots.iter().position(|&slot| slot == wanted) {
            return (self.scratch(CONVERTED[i], 2 * n), Some(i));
        }
        let mut i = conv.next;
        if Some(i) == keep {
            i = (i + 1) % CONVERTED.len();
        }
        conv.next = (i + 1) % CONVERTED.len();
        conv.slots[i] = wanted;
        drop(conv);
        let at = self.scratch(CONVERTED[i], 2 * n);
        self.elementwise("f32_to_bf16", n, &[Ptr(at), Ptr(src), Int(n as i64)]);
        (at, Some(i))
    }

    fn rope_table(
        &self,
        start: usize,
        seq: usize,
        rot: usize,
        theta: f32,
    ) -> (CUdeviceptr, CUdeviceptr) {
        let key = (start, seq, rot, theta.to_bits());
        let mut tables = self.inner.rope_tables.lock().unwrap();
        let memory = tables.entry(key).or_insert_with(|| {
            let half = rot / 2;
            let mut values = vec![0f32; 2 * seq * half];
            for t in 0..seq {
                for i in 0..half {
                    // As the reference's `tables`: f64 angles.
                    let inv_freq = 1.0 / (theta as f64).powf((2 * i) as f64 / rot as f64);
                    let angle = (start + t) as f64 * inv_freq;
                    values[t * half + i] = angle.cos() as f32;
                    values[seq * half + t * half + i] = angle.sin() as f32;
                }
            }
            let memory = self
                .alloc(values.len().max(1), DType::F32)
                .expect("rope table");
            if !values.is_empty() {
                self.upload(View::whole(&memory), &values)
                    .expect("rope table");
            }
            memory
        });
        let base = memory.ptr;
        (base, base + (seq * (rot / 2) * 4) as u64)
    }
}

fn addr(view: V) -> CUdeviceptr {
    view.memory().ptr + (view.offset() * view.dtype().size()) as u64
}

fn flag(mode: Accumulate) -> Arg {
    Int((mode == Accumulate::Add) as i64)
}

fn check_len(expected: usize, got: usize) -> Result<(), BackendError> {
    if expected == got {
        Ok(())
    } else {
        Err(BackendError::LengthMismatch { expected, got })
    }
}

impl Backend for CudaBackend {
    type Memory = CudaMemory;

    fn name(&self) -> String {
        let (major, minor) = self.inner.info.compute_capability;
        let products = match self.products {
            Products::Bf16 => "bf16",
            Products::F16 => "f16",
        };
        let operands = match (self.products, self.operands) {
            (Products::Bf16, Operands::Bf16) => " on bf16 operands",
            _ => "",
        };
        format!(
            "cuda ({}, sm_{major}{minor}, {products} cuBLASLt{operands}, {} attention)",
            self.inner.info.name,
            self.attention.label()
        )
    }

    fn supports(&self, kernel: Kernel, shape: ShapeHint) -> Result<(), String> {
        if kernel == Kernel::Attention && shape.head_dim > MAX_HEAD_DIM {
            return Err(format!("head_dim {} over {MAX_HEAD_DIM}", shape.head_dim));
        }
        Ok(())
    }

    fn tolerance(&self, kernel: Kernel) -> Tolerance {
        match kernel {
            // bf16 operands (relative rounding 2⁻⁹ each) summed in f32: a product's error is
            // a few 2⁻⁹ of the operands' magnitude, as the CPU backend's bf16 tiers.
            Kernel::Matmul | Kernel::ClassifierLoss | Kernel::Muon => Tolerance {
                atol: 2e-2,
                rtol: 2e-2,
            },
            // Attention through batched products: the scores and the probabilities times the
            // values are such products (the probabilities, at most 1, rounded to 2⁻⁹ too).
            // The tensor-core kernels round q, k, v, the probabilities, dO and dS the same way.
            Kernel::Attention if self.attention != AttentionPath::Flash => Tolerance {
                atol: 2e-2,
                rtol: 2e-2,
            },
            // f32 throughout, in another summation order than the reference (and expf,
            // tanhf within 2 ulps).
            _ => Tolerance {
                atol: 1e-5,
                rtol: 1e-4,
            },
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaMemory, BackendError> {
        self.bind();
        let bytes = len * dtype.size();
        // Fresh memory may sit where a freed operand's bf16 copy was taken.
        self.written();
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: a plain allocation, zeroed before use, freed in Drop.
            unsafe {
                let ptr = cudarc::driver::result::malloc_sync(bytes).map_err(|_| {
                    BackendError::OutOfMemory {
                        backend: "cuda".into(),
                        bytes,
                    }
                })?;
                cudarc::driver::result::memset_d8_sync(ptr, 0, bytes)
                    .map_err(|e| device_err("zeroing", e))?;
                ptr
            }
        };
        Ok(CudaMemory {
            ptr,
            len,
            dtype,
            ctx: self.inner.ctx.clone(),
        })
    }

    fn upload(&self, dst: V, src: &[f32]) -> Result<(), BackendError> {
        check_len(dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind();
        self.written();
        // SAFETY: `dst` is in bounds of its allocation (a View is), the host slice as long.
        unsafe {
            match dst.dtype() {
                DType::F32 => cudarc::driver::result::memcpy_htod_sync(addr(dst), src),
                DType::BF16 => {
                    let bits: Vec<u16> = src
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_bits())
                        .collect();
                    cudarc::driver::result::memcpy_htod_sync(addr(dst), &bits)
                }
            }
        }
        .map_err(|e| device_err("upload", e))
    }

    fn download(&self, src: V, dst: &mut [f32]) -> Result<(), BackendError> {
        check_len(src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.bind();
        // SAFETY: as `upload`; the synchronous copy waits for the kernels queued before it.
        unsafe {
            match src.dtype() {
                DType::F32 => cudarc::driver::result::memcpy_dtoh_sync(dst, addr(src)),
                DType::BF16 => {
                    let mut bits = vec![0u16; dst.len()];
                    let r = cudarc::driver::result::memcpy_dtoh_sync(&mut bits, addr(src));
                    for (d, b) in dst.iter_mut().zip(bits) {
                        *d = half::bf16::from_bits(b).to_f32();
                    }
                    r
                }
            }
        }
        .map_err(|e| device_err("download", e))
    }

    /// Under `KILN_CUDA_PROFILE`: the launches timed since the last call (profile.rs).
    fn launch_times(&self) -> Option<Vec<kiln_core::backend::LaunchTime>> {
        self.inner.profile.as_ref().map(|p| {
            self.bind();
            p.take()
        })
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.bind();
        self.inner
            .ctx
            .synchronize()
            .map_err(|e| device_err("synchronize", e))
    }

    fn memory_available(&self) -> Option<u64> {
        self.bind();
        self.inner
            .ctx
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64)
    }

    fn zero(&self, dst: V) {
        if dst.is_empty() {
            return;
        }
        self.bind();
        self.written();
        // SAFETY: the view is in bounds; the memset is ordered on the legacy stream.
        self.timed(
            || "zero".into(),
            || unsafe {
                cudarc::driver::result::memset_d8_async(
                    addr(dst),
                    0,
                    dst.len() * dst.dtype().size(),
                    std::ptr::null_mut(),
                )
            },
        )
        .unwrap_or_else(|e| panic!("cuda: zero: {e:?}"));
    }

    fn copy(&self, dst: V, src: V) {
        assert_eq!(dst.len(), src.len(), "copy: lengths differ");
        assert!(!dst.overlaps(&src), "copy: {dst:?} overlaps {src:?}");
        self.written();
        let n = dst.len() as i64;
        match (dst.dtype(), src.dtype()) {
            (a, b) if a == b => {
                if n == 0 {
                    return;
                }
                self.bind();
                // SAFETY: both views in bounds and disjoint.
                self.timed(
                    || "copy".into(),
                    || unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            addr(dst),
                            addr(src),
                            dst.len() * dst.dtype().size(),
                            std::ptr::null_mut(),
                        )
                    },
                )
                .unwrap_or_else(|e| panic!("cuda: copy: {e:?}"));
            }
            (DType::BF16, DType::F32) => self.elementwise(
                "f32_to_bf16",
                dst.len(),
                &[Ptr(addr(dst)), Ptr(addr(src)), Int(n)],
            ),
            _ => self.elementwise(
                "bf16_to_f32",
                dst.len(),
                &[Ptr(addr(dst)), Ptr(addr(src)), Int(n)],
            ),
        }
    }

    fn matmul_forward(&self, out: V, inp: V, weight: V, s: MatmulShape) {
        assert_eq!(
            (out.len(), inp.len(), weight.len()),
            (s.rows * s.out_dim, s.rows * s.in_dim, s.out_dim * s.in_dim),
            "matmul_forward: shapes"
        );
        let (Ptr(o), Ptr(x), Ptr(w)) = (self.f(out), self.f(inp), self.f(weight)) else {
            unreachable!()
        };
        let shape = GemmShape {
            ta: false,
            tb: true,
            m: s.rows,
            n: s.out_dim,
            k: s.in_dim,
            lda: s.in_dim,
            ldb: s.in_dim,
            ldc: s.out_dim,
        };
        self.gemm(shape, 1.0, x, w, 0.0, o);
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
        assert_eq!(
            (dinp.len(), dweight.len(), dout.len()),
            (s.rows * s.in_dim, s.out_dim * s.in_dim, s.rows * s.out_dim),
            "matmul_backward: shapes"
        );
        let ptr = |v| match self.f(v) {
            Ptr(p) => p,
            _ => unreachable!(),
        };
        let beta = if dinp_mode == Accumulate::Add {
            1.0
        } else {
            0.0
        };
        // dinp (rows, in) = dout (rows, out) · weight (out, in)
        self.gemm(
            GemmShape {
                ta: false,
                tb: false,
                m: s.rows,
                n: s.in_dim,
                k: s.out_dim,
                lda: s.out_dim,
                ldb: s.in_dim,
                ldc: s.in_dim,
            },
            1.0,
            ptr(dout),
            ptr(weight),
            beta,
            ptr(dinp),
        );
        // dweight (out, in) += doutᵀ · inp
        self.gemm(
            GemmShape {
                ta: true,
                tb: false,
                m: s.out_dim,
                n: s.in_dim,
                k: s.rows,
                lda: s.out_dim,
                ldb: s.in_dim,
                ldc: s.in_dim,
            },
            1.0,
            ptr(dout),
            ptr(inp),
            1.0,
            ptr(dweight),
        );
    }

    fn embedding_forward(&self, out: V, table: V, tokens: &[u32], dim: usize) {
        assert_eq!(out.len(), tokens.len() * dim);
        let vocab = table.len() / dim;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            panic!("token id {bad} out of vocabulary {vocab}");
        }
        let ids = self.upload_ids("tokens", tokens);
        let n = tokens.len() as i64;
        self.elementwise(
            "embedding_forward",
            out.len(),
            &[
                self.f(out),
                self.f(table),
                Ptr(ids),
                Int(n),
                Int(dim as i64),
            ],
        );
    }

    fn embedding_backward(&self, dtable: V, dout: V, tokens: &[u32], dim: usize) {
        assert_eq!(dout.len(), tokens.len() * dim);
        let ids = self.upload_ids("tokens", tokens);
        let n = tokens.len() as i64;
        self.elementwise(
            "embedding_backward",
            dout.len(),
            &[
                self.f(dtable),
                self.f(dout),
                Ptr(ids),
                Int(n),
                Int(dim as i64),
            ],
        );
    }

    fn rmsnorm_forward(&self, out: V, rstd: V, inp: V, weight: V, s: NormShape) {
        assert_eq!(
            (inp.len(), rstd.len(), weight.len()),
            (s.rows * s.dim, s.rows, s.dim)
        );
        if s.rows == 0 {
            return;
        }
        self.launch(
            "rmsnorm_forward",
            (s.rows as u32, 1, 1),
            THREADS,
            0,
            &[
                self.f(out),
                self.f(rstd),
                self.f(inp),
                self.f(weight),
                Int(s.dim as i64),
                Float(s.eps),
            ],
        );
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
        assert_eq!(
            (inp.len(), rstd.len(), dweight.len()),
            (s.rows * s.dim, s.rows, s.dim)
        );
        if s.rows == 0 {
            return;
        }
        self.launch(
            "rmsnorm_backward",
            (s.rows as u32, 1, 1),
            THREADS,
            0,
            &[
                self.f(dinp),
                self.f(dout),
                self.f(inp),
                self.f(weight),
                self.f(rstd),
                Int(s.dim as i64),
                flag(dinp_mode),
            ],
        );
        self.column_dot(dweight, dout, inp, Some(rstd), s.rows, s.dim, 1);
    }

    fn rope_forward(&self, out: V, inp: V, s: RopeShape) {
        assert_eq!(inp.len(), s.batch * s.seq * s.heads * s.head_dim);
        self.rope(out, inp, s, s.start_pos, 1.0);
    }

    fn rope_backward(&self, dinp: V, dout: V, s: RopeShape) {
        assert_eq!(dout.len(), s.batch * s.seq * s.heads * s.head_dim);
        assert_eq!(
            s.start_pos, 0,
            "rope_backward: training positions start at 0"
        );
        self.rope(dinp, dout, s, 0, -1.0);
    }

    fn attention_saved_len(&self, s: AttentionShape) -> usize {
        // Each query row's logsumexp; the backward recomputes the probabilities from it. The
        // tensor-core kernels keep a copy of the output too (their deltas are dO·O).
        let lse = s.batch * s.heads * s.seq;
        match self.attention_path_for(s) {
            AttentionPath::Mma => lse + s.batch * s.seq * s.heads * s.head_dim,
            _ => lse,
        }
    }

    fn attention_forward(&self, out: V, saved: V, inputs: Qkv<Self>, s: AttentionShape) {
        self.attention_forward_on_device(out, saved, inputs, s)
    }

    fn attention_backward(
        &self,
        grads: Qkv<Self>,
        dout: V,
        inputs: Qkv<Self>,
        saved: V,
        s: AttentionShape,
    ) {
        self.attention_backward_on_device(grads, dout, inputs, saved, s)
    }

    fn attention_decode(&self, out: V, q: V, k_cache: V, v_cache: V, s: DecodeShape) {
        self.attention_decode_on_device(out, q, k_cache, v_cache, s)
    }

    fn swiglu_forward(&self, out: V, gate: V, up: V) {
        assert_eq!((gate.len(), up.len()), (out.len(), out.len()));
        let n = Int(out.len() as i64);
        self.elementwise(
            "swiglu_forward",
            out.len(),
            &[self.f(out), self.f(gate), self.f(up), n],
        );
    }

    fn swiglu_backward(&self, dgate: V, dup: V, dout: V, gate: V, up: V) {
        assert_eq!(
            (gate.len(), up.len(), dout.len()),
            (dgate.len(), dup.len(), gate.len())
        );
        let n = Int(gate.len() as i64);
        let args = [
            self.f(dgate),
            self.f(dup),
            self.f(dout),
            self.f(gate),
            self.f(up),
            n,
        ];
        self.elementwise("swiglu_backward", gate.len(), &args);
    }

    fn relu2_forward(&self, out: V, inp: V, slope: f32) {
        assert_eq!(out.len(), inp.len());
        let args = [
            self.f(out),
            self.f(inp),
            Float(slope),
            Int(out.len() as i64),
        ];
        self.elementwise("relu2_forward", out.len(), &args);
    }

    fn relu2_backward(&self, dinp: V, dout: V, inp: V, slope: f32) {
        assert_eq!((dinp.len(), dout.len()), (inp.len(), inp.len()));
        let n = Int(inp.len() as i64);
        let args = [self.f(dinp), self.f(dout), self.f(inp), Float(slope), n];
        self.elementwise("relu2_backward", inp.len(), &args);
    }

    fn softcap_forward(&self, out: V, inp: V, cap: f32) {
        assert_eq!(out.len(), inp.len());
        let args = [self.f(out), self.f(inp), Float(cap), Int(out.len() as i64)];
        self.elementwise("softcap_forward", out.len(), &args);
    }

    fn softcap_backward(&self, dinp: V, dout: V, out: V, cap: f32) {
        assert_eq!((dinp.len(), dout.len()), (out.len(), out.len()));
        let n = Int(out.len() as i64);
        let args = [self.f(dinp), self.f(dout), self.f(out), Float(cap), n];
        self.elementwise("softcap_backward", out.len(), &args);
    }

    fn residual_forward(&self, out: V, a: V, b: V) {
        assert_eq!((a.len(), b.len()), (out.len(), out.len()));
        let args = [self.f(out), self.f(a), self.f(b), Int(out.len() as i64)];
        self.elementwise("residual_forward", out.len(), &args);
    }

    fn accumulate(&self, out: V, inp: V) {
        assert_eq!(out.len(), inp.len());
        let args = [self.f(out), self.f(inp), Int(out.len() as i64)];
        self.elementwise("accumulate", out.len(), &args);
    }

    fn gate_forward(&self, out: V, a: V, b: V, dim: usize, scale: f32) {
        assert_eq!((a.len(), b.len()), (out.len() * dim, out.len() * dim));
        let rows = out.len();
        let args = [
            self.f(out),
            self.f(a),
            self.f(b),
            Int(rows as i64),
            Int(dim as i64),
            Float(scale),
        ];
        self.warps("gate_forward", rows, &args);
    }

    fn gate_backward(&self, da: V, db: V, dout: V, out: V, a: V, b: V, dim: usize, scale: f32) {
        assert_eq!((a.len(), b.len()), (out.len() * dim, out.len() * dim));
        assert_eq!(
            (da.len(), db.len(), dout.len()),
            (a.len(), b.len(), out.len())
        );
        let args = [
            self.f(da),
            self.f(db),
            self.f(dout),
            self.f(out),
            self.f(a),
            self.f(b),
            Int(out.len() as i64),
            Int(dim as i64),
            Float(scale),
        ];
        self.elementwise("gate_backward", a.len(), &args);
    }

    fn xsa_forward(&self, out: V, y: V, v: V, s: AttentionShape) {
        let rows = s.batch * s.seq;
        assert!(s.head_dim <= MAX_HEAD_DIM, "xsa: head_dim {}", s.head_dim);
        assert_eq!(
            (y.len(), v.len(), out.len()),
            (
                rows * s.heads * s.head_dim,
                rows * s.kv_heads * s.head_dim,
                y.len()
            )
        );
        let args = [
            self.f(out),
            self.f(y),
            self.f(v),
            Int(rows as i64),
            Int(s.heads as i64),
            Int(s.kv_heads as i64),
            Int(s.head_dim as i64),
        ];
        self.warps("xsa_forward", rows * s.kv_heads, &args);
    }

    fn xsa_backward(&self, dy: V, dv: V, dout: V, y: V, v: V, s: AttentionShape) {
        let rows = s.batch * s.seq;
        assert!(s.head_dim <= MAX_HEAD_DIM, "xsa: head_dim {}", s.head_dim);
        assert_eq!(
            (dy.len(), dv.len(), dout.len(), y.len(), v.len()),
            (
                rows * s.heads * s.head_dim,
                rows * s.kv_heads * s.head_dim,
                y.len(),
                rows * s.heads * s.head_dim,
                rows * s.kv_heads * s.head_dim
            )
        );
        let args = [
            self.f(dy),
            self.f(dv),
            self.f(dout),
            self.f(y),
            self.f(v),
            Int(rows as i64),
            Int(s.heads as i64),
            Int(s.kv_heads as i64),
            Int(s.head_dim as i64),
        ];
        self.warps("xsa_backward", rows * s.kv_heads, &args);
    }

    fn scale_forward(&self, out: V, inp: V, scale: V, s: ScaleShape, mode: Accumulate) {
        assert_eq!(
            (inp.len(), scale.len(), out.len()),
            (s.rows * s.groups * s.inner, s.groups, inp.len())
        );
        let args = [
            self.f(out),
            self.f(inp),
            self.f(scale),
            Int(s.groups as i64),
            Int(s.inner as i64),
            Int(out.len() as i64),
            flag(mode),
        ];
        self.elementwise("scale_forward", out.len(), &args);
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
        self.scale_forward(dinp, dout, scale, s, mode);
        self.column_dot(dscale, dout, inp, None, s.rows, s.groups * s.inner, s.inner);
    }

    fn cross_entropy_forward(
        &self,
        losses: V,
        logsumexp: V,
        logits: V,
        targets: &[u32],
        vocab: usize,
    ) {
        self.cross_entropy_forward_on_device(losses, logsumexp, logits, targets, vocab)
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
        self.cross_entropy_backward_on_device(dlogits, logits, logsumexp, targets, vocab, dloss)
    }

    fn classifier_saved_len(&self, _s: ClassifierShape) -> usize {
        // The backward recomputes each chunk's logits (one GEMM) rather than keep rows × vocab.
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
        self.classifier_loss_forward_on_device(losses, logsumexp, _saved, inp, weight, targets, s)
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
        self.classifier_loss_backward_on_device(
            dinp,
            dweight,
            inp,
            weight,
            (logsumexp, _saved),
            targets,
            s,
            dloss,
            dinp_mode,
        )
    }

    fn fake_quantize(&self, dst: V, src: V, q: FakeQuant, rotation: Option<usize>) {
        self.fake_quantize_on_device(dst, src, q, rotation)
    }

    fn sum_squares(&self, x: V) -> f64 {
        self.sum_squares_on_device(x)
    }

    fn adamw_step(&self, params: V, grads: V, m: V, v: V, hp: &AdamWStep) {
        self.adamw_step_on_device(params, grads, m, v, hp)
    }

    fn ema_update(&self, ema: V, params: V, decay: f32) {
        self.ema_update_on_device(ema, params, decay)
    }

    fn muon_step(&self, params: V, grads: V, momentum: V, s: MatrixShape, hp: &MuonStep) {
        self.muon_step_on_device(params, grads, momentum, s, hp)
    }
}

impl CudaBackend {
    fn rope(&self, out: V, inp: V, s: RopeShape, start: usize, direction: f32) {
        assert!(
            s.rot_dims <= s.head_dim && s.rot_dims.is_multiple_of(2),
            "rope: bad rot_dims {}",
            s.rot_dims
        );
        assert_eq!(out.len(), inp.len());
        let (cos, sin) = self.rope_table(start, s.seq, s.rot_dims, s.theta);
        let rows = s.batch * s.seq;
        let args = [
            self.f(out),
            self.f(inp),
            Ptr(cos),
            Ptr(sin),
            Int(rows as i64),
            Int(s.seq as i64),
            Int(s.heads as i64),
            Int(s.head_dim as i64),
            Int(s.rot_dims as i64),
            Float(direction),
        ];
        // A thread per rotated pair or unrotated dimension (kernels/rope.cu).
        let threads = rows * s.heads * (s.head_dim - s.rot_dims / 2);
        self.elementwise("rope", threads, &args);
    }

    /// `dst[col / inner] += Σ_rows dout·inp (·rstd[row])` over `(rows, cols)`.
    #[allow(clippy::too_many_arguments)]
    fn column_dot(
        &self,
        dst: V,
        dout: V,
        inp: V,
        rstd: Option<V>,
        rows: usize,
        cols: usize,
        inner: usize,
    ) {
        assert_eq!(
            (dout.len(), inp.len(), dst.len() * inner),
            (rows * cols, rows * cols, cols)
        );
        if rows == 0 || cols == 0 {
            return;
        }
        let per_block = rows.div_ceil(4096).max(32);
        let grid = (
            cols.div_ceil(THREADS as usize) as u32,
            rows.div_ceil(per_block) as u32,
            1,
        );
        let rstd = rstd.map_or(Ptr(0), |r| self.f(r));
        self.launch(
            "column_dot",
            grid,
            THREADS,
            0,
            &[
                self.f(dst),
                self.f(dout),
                self.f(inp),
                rstd,
                Int(rows as i64),
                Int(cols as i64),
                Int(inner as i64),
                Int(per_block as i64),
            ],
        );
    }

    fn copy_raw(&self, dst: CUdeviceptr, src: CUdeviceptr, floats: usize) {
        self.bind();
        self.written();
        // SAFETY: both scratch buffers hold at least `floats` f32s and are distinct.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, floats * 4, std::ptr::null_mut())
        }
        .unwrap_or_else(|e| panic!("cuda: {e:?}"));
    }
}
