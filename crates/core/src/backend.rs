//! The backend trait: one method per kernel family, each forward paired with its backward.
//!
//! The model's forward and backward passes ([`crate::model`]) are written once against this
//! trait as explicit calls with explicit buffers (no autograd tape). A backend owns device
//! memory ([`Backend::Memory`]); the model addresses it through [`View`]s (an allocation, an
//! offset and a length), so parameters, gradients, optimizer state and activations can each
//! live in one contiguous arena (see [`crate::layout`]).
//!
//! Conventions every backend follows (all matrices row-major):
//! - **Parameter gradients accumulate** (`+=`): a step may run several micro-batches before
//!   the optimizer, and a tied embedding receives gradient from both its uses.
//! - **Activation gradients overwrite** (`=`), except where a method takes [`Accumulate`]:
//!   the residual stream's gradient is one buffer that every branch adds into, which is also
//!   how the backward of the residual add is realised (it is the identity on both inputs).
//! - An output view never overlaps an input view of the same call, unless a method says so.
//! - Token ids and targets are host slices (`&[u32]`): they are the step's input, uploaded by
//!   the backend as it needs.
//! - Element-wise kernels take their length from the views; everything else takes a shape
//!   struct ([`MatmulShape`], [`NormShape`], [`RopeShape`], [`AttentionShape`],
//!   [`DecodeShape`], [`ScaleShape`], [`MatrixShape`]) named with kiln's shape letters
//!   (B, T, C, V, H, Hkv, D, F).
//! - Buffers are f32 or bf16 ([`DType`]). Master weights, gradients and optimizer state are
//!   f32; a fast backend may keep bf16 copies of weights and activations. Host transfers are
//!   always f32 and convert (round to nearest even) on the way in.
//!
//! This is not a tensor library: there is no broadcasting, no graph, no dtype zoo.

use std::fmt;

/// Whether an activation-gradient output is overwritten or added into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    Overwrite,
    Add,
}

/// The kernel families, for [`Backend::supports`] and [`Backend::tolerance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Allocation, transfers, zero and copy.
    Memory,
    Matmul,
    Embedding,
    RmsNorm,
    Rope,
    Attention,
    SwiGlu,
    Relu2,
    Softcap,
    /// EngramHash's context gate: a sigmoid of each row pair's scaled dot product.
    Gate,
    /// Exclusive self attention: the attention output less its own value's direction.
    Xsa,
    Scale,
    Residual,
    CrossEntropy,
    /// The classifier fused with the softmax cross-entropy.
    ClassifierLoss,
    /// Quantization's round trip (QAT).
    FakeQuant,
    SumSquares,
    AdamW,
    Ema,
    Muon,
}

/// A weight matrix `(rows, cols)` as integer codes with one scale per `group` consecutive
/// values of a row: `value = code · scale` ([`Backend::take_int_codes`]).
#[derive(Clone, Copy, Debug)]
pub struct IntCodes<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Values per scale; divides `cols`.
    pub group: usize,
    /// `(rows, cols)`, within ±127.
    pub codes: &'a [i8],
    /// `(rows, cols / group)`.
    pub scales: &'a [f32],
}

/// The element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// Why a backend could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend}: out of memory allocating {bytes} bytes")]
    OutOfMemory { backend: String, bytes: usize },
    #[error("{backend} does not support {what}")]
    Unsupported { backend: String, what: String },
    #[error("transfer of {got} values to or from a buffer of {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("{backend}: {message}")]
    Device { backend: String, message: String },
}

/// Shape facts a backend may want to see before accepting a kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShapeHint {
    pub rows: usize,
    pub cols: usize,
    pub head_dim: usize,
    pub seq_len: usize,
}

/// How closely a backend's results track exact arithmetic, for the conformance suite:
/// `|a - b| <= atol + rtol * |reference|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// `out (rows, out_dim) = inp (rows, in_dim) · weight (out_dim, in_dim)ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub rows: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// A quantizer's round trip, quantize then dequantize, for [`Backend::fake_quantize`] (the
/// `quant` module's schemes; its `round_trip` is the arithmetic, identical to quantizing for
/// export and loading the export back).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FakeQuant {
    /// Groups of `group` values (in flat order) scaled by their absolute mean, rounded to
    /// −1, 0, 1; the scale is stored as f16.
    Ternary { group: usize },
    /// Rows of `cols` values scaled by the `percentile` (0–100, nearest rank) of their
    /// absolute values over 2^(bits−1) − 1, rounded and clamped to that; f16 scales.
    Int {
        bits: u32,
        percentile: f32,
        cols: usize,
    },
    /// Each value rounded to f16.
    F16,
}

/// The classifier fused with the softmax cross-entropy: `logits = softcap(inp (rows, dim) ·
/// weight (vocab, dim)ᵀ)` and each row's loss against its target, without the `(rows, vocab)`
/// logits ever held in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassifierShape {
    pub rows: usize,
    pub dim: usize,
    pub vocab: usize,
    /// `cap·tanh(z / cap)` on the logits before the softmax (none: the logits as they are).
    pub softcap: Option<f32>,
}

/// RMSNorm over `rows` rows of `dim` values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormShape {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

/// Rotary embedding of `(B, T, heads, D)`: the first `rot_dims` (even, ≤ D) dimensions of
/// each head rotate; row t is at position `start_pos + t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rot_dims: usize,
    pub theta: f32,
    /// Non-zero only when decoding with a KV cache (the backward is for training: 0).
    pub start_pos: usize,
}

/// Causal attention over `(B, T)` with H query heads reading Hkv key/value heads of width D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// One decoding step against a KV cache: the first `len` of `capacity` rows are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub len: usize,
    pub capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `(rows, groups, inner)`: a learnable `s (groups)` broadcast over rows and the inner width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleShape {
    pub rows: usize,
    pub groups: usize,
    pub inner: usize,
}

/// A matrix `(rows, cols)` updated as a whole (Muon).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixShape {
    pub rows: usize,
    pub cols: usize,
}

/// Hyper-parameters of one AdamW update of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW), applied as `p -= lr * wd * p`; 0 for norms and gains.
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies the gradient before use: gradient clipping and loss-scale removal.
    pub grad_scale: f32,
}

/// Hyper-parameters of one Muon update of one matrix.
#[derive(Clone, Copy, Debug)]
pub struct MuonStep {
    pub learning_rate: f32,
    /// Momentum μ (the baseline warms it from 0.85 to 0.95).
    pub momentum: f32,
    pub nesterov: bool,
    /// Newton–Schulz iterations (5).
    pub ns_steps: usize,
    /// MuonEq-R: each row of the (Nesterov) update divided by its L2 norm (at least 1e-7)
    /// before Newton–Schulz.
    pub row_normalize: bool,
    /// Decoupled weight decay (0 in the baseline).
    pub weight_decay: f32,
    /// Multiplies the gradient first (clipping, loss-scale removal).
    pub grad_scale: f32,
}

/// What every device allocation can say about itself.
pub trait DeviceMemory: Send {
    /// Elements (not bytes).
    fn len(&self) -> usize;
    fn dtype(&self) -> DType;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A window of `len` elements at `offset` in one backend allocation. The fields are private
/// and checked against the allocation when the view is made, so a view is always in bounds.
pub struct View<'a, B: Backend + ?Sized> {
    memory: &'a B::Memory,
    offset: usize,
    len: usize,
}

impl<B: Backend + ?Sized> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for View<'_, B> {}

impl<B: Backend + ?Sized> fmt::Debug for View<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "View[{}..{}]", self.offset, self.offset + self.len)
    }
}

impl<'a, B: Backend + ?Sized> View<'a, B> {
    /// `len` elements at `offset` of `memory`. Panics when the window leaves the allocation:
    /// views come from layouts computed for that allocation, so that is a bug, not bad input.
    pub fn new(memory: &'a B::Memory, offset: usize, len: usize) -> Self {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= memory.len()),
            "view {offset}+{len} out of an allocation of {}",
            memory.len()
        );
        View {
            memory,
            offset,
            len,
        }
    }

    /// The whole of an allocation.
    pub fn whole(memory: &'a B::Memory) -> Self {
        Self::new(memory, 0, memory.len())
    }

    /// A sub-window of this view.
    pub fn slice(self, start: usize, len: usize) -> Self {
        assert!(
            start + len <= self.len,
            "view slice {start}+{len} out of {}",
            self.len
        );
        View {
            memory: self.memory,
            offset: self.offset + start,
            len,
        }
    }

    pub fn memory(&self) -> &'a B::Memory {
        self.memory
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.memory.dtype()
    }

    /// Whether two views share an element.
    pub fn overlaps(&self, other: &View<'_, B>) -> bool {
        std::ptr::eq(self.memory, other.memory)
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
            && self.len > 0
            && other.len > 0
    }
}

/// The three inputs (or the three gradients) of attention: `q (B, T, H·D)`, `k, v (B, T,
/// Hkv·D)`.
pub struct Qkv<'a, B: Backend + ?Sized> {
    pub q: View<'a, B>,
    pub k: View<'a, B>,
    pub v: View<'a, B>,
}

impl<B: Backend + ?Sized> Clone for Qkv<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Qkv<'_, B> {}

/// A compute device with its kernels. See the module docs for the conventions.
///
/// Shape comments give each buffer's logical shape. Kernels do not return errors: their
/// inputs come from the model's own layouts, and a wrong shape is a bug (a backend asserts).
/// What can fail for reasons outside the program (memory, the device) returns
/// [`BackendError`].
/// One name's device time in [`Backend::launch_times`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LaunchTime {
    /// The kernel's name, a product's shape (`gemm m×n×k …`), or `zero`/`copy`.
    pub name: String,
    pub ms: f64,
    pub launches: usize,
}

pub trait Backend: Send + Sync {
    /// One allocation of device memory.
    type Memory: DeviceMemory;

    /// A short name for logs and `kiln doctor`.
    fn name(&self) -> String;

    /// Whether this backend runs `kernel` at this shape. A fast backend may decline (a shape it
    /// has no tiles for, a head_dim over its limit) and hand the call to a slower path.
    fn supports(&self, kernel: Kernel, shape: ShapeHint) -> Result<(), String>;

    /// How far `kernel`'s results may stray from exact arithmetic (the conformance suite's
    /// bound): a bf16 matmul cannot share the tolerance of an f32 element-wise kernel.
    fn tolerance(&self, kernel: Kernel) -> Tolerance;

    // ---- memory ----------------------------------------------------------------------

    /// A zero-filled allocation of `len` elements of `dtype`.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Memory, BackendError>;
    /// Copies host data into the device (converted to the view's dtype).
    fn upload(&self, dst: View<Self>, src: &[f32]) -> Result<(), BackendError>;
    /// Copies device data to the host (widened to f32).
    fn download(&self, src: View<Self>, dst: &mut [f32]) -> Result<(), BackendError>;
    /// Waits until every kernel issued so far has finished (a no-op on a synchronous CPU
    /// backend; a stream sync on a GPU).
    fn synchronize(&self) -> Result<(), BackendError>;
    /// Bytes the backend can still allocate, where it can tell (host backends: the memory
    /// the system has available, swap included), so a model or batch that cannot fit is
    /// refused with both numbers before any allocation. `None`: unknown.
    fn memory_available(&self) -> Option<u64> {
        None
    }
    /// The device time of every launch since the last call, summed by name (a kernel, or a
    /// product's shape), longest first, where the backend times its launches (the cuda
    /// backend under `KILN_CUDA_PROFILE=1`); waits for the device. `None`: not timed.
    fn launch_times(&self) -> Option<Vec<LaunchTime>> {
        None
    }
    /// Sets every value of `dst` to zero.
    fn zero(&self, dst: View<Self>);
    /// `dst = src` (same length, no overlap), converting between dtypes.
    fn copy(&self, dst: View<Self>, src: View<Self>);

    // ---- matmul ----------------------------------------------------------------------

    /// `out (rows, out_dim) = inp (rows, in_dim) · weight (out_dim, in_dim)ᵀ`.
    fn matmul_forward(&self, out: View<Self>, inp: View<Self>, weight: View<Self>, s: MatmulShape);
    /// `dinp (rows, in_dim) =/+= dout · weight`; `dweight (out_dim, in_dim) += doutᵀ · inp`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: View<Self>,
        dweight: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        s: MatmulShape,
        dinp_mode: Accumulate,
    );

    // ---- embedding ---------------------------------------------------------------------

    /// `out (tokens.len(), C) = table (V, C)[tokens]`.
    fn embedding_forward(&self, out: View<Self>, table: View<Self>, tokens: &[u32], dim: usize);
    /// `dtable[tokens[i]] += dout[i]`.
    fn embedding_backward(&self, dtable: View<Self>, dout: View<Self>, tokens: &[u32], dim: usize);

    // ---- rmsnorm -----------------------------------------------------------------------

    /// `out (rows, dim) = inp / rms(inp) * weight (dim)`; saves `rstd (rows) = 1/rms`.
    fn rmsnorm_forward(
        &self,
        out: View<Self>,
        rstd: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        s: NormShape,
    );
    /// `dinp =/+= …`, `dweight += …` from `dout` and the saved `rstd`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: View<Self>,
        dweight: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        rstd: View<Self>,
        s: NormShape,
        dinp_mode: Accumulate,
    );

    // ---- rope --------------------------------------------------------------------------

    /// Rotary position embedding on `inp (B, T, heads, D)` into `out`.
    /// Half-split pairing (dimension `i` with `i + rot_dims/2`), as Hugging Face Llama and
    /// Qwen3 do; llama2.c pairs neighbours (`2i`, `2i+1`), and its weights are permuted on
    /// import. Dimensions past `rot_dims` are copied (partial RoPE).
    fn rope_forward(&self, out: View<Self>, inp: View<Self>, s: RopeShape);
    /// The inverse rotation of `dout` into `dinp` (RoPE is orthogonal; no saved input needed).
    /// Training positions start at 0 (`s.start_pos` is 0).
    fn rope_backward(&self, dinp: View<Self>, dout: View<Self>, s: RopeShape);

    // ---- attention ---------------------------------------------------------------------

    /// Values of saved state the attention forward keeps for its backward, per call.
    fn attention_saved_len(&self, s: AttentionShape) -> usize;
    /// Causal softmax attention with grouped-query heads: `out (B, T, H·D)` from `q (B, T,
    /// H·D)`, `k, v (B, T, Hkv·D)`; query head `h` reads kv head `h / (H / Hkv)`; scores
    /// scaled by `1/sqrt(D)`.
    fn attention_forward(
        &self,
        out: View<Self>,
        saved: View<Self>,
        inputs: Qkv<Self>,
        s: AttentionShape,
    );
    /// `grads.q, grads.k, grads.v` (overwritten) from `dout` and the forward's inputs and
    /// saved state.
    fn attention_backward(
        &self,
        grads: Qkv<Self>,
        dout: View<Self>,
        inputs: Qkv<Self>,
        saved: View<Self>,
        s: AttentionShape,
    );
    /// One decoding step against a KV cache: `out (B, H·D)` for the newest position, from
    /// `q (B, H·D)` and the first `len` rows of `k_cache, v_cache (B, capacity, Hkv·D)` (the
    /// newest position's k and v already written at row `len − 1`). Inference only.
    fn attention_decode(
        &self,
        out: View<Self>,
        q: View<Self>,
        k_cache: View<Self>,
        v_cache: View<Self>,
        s: DecodeShape,
    );

    // ---- element-wise: swiglu, relu², softcap, residual ---------------------------------

    /// `out = silu(gate) * up`.
    fn swiglu_forward(&self, out: View<Self>, gate: View<Self>, up: View<Self>);
    /// `dgate, dup` (overwritten) from `dout`.
    fn swiglu_backward(
        &self,
        dgate: View<Self>,
        dup: View<Self>,
        dout: View<Self>,
        gate: View<Self>,
        up: View<Self>,
    );
    /// `out = r(x)²`, `r(x) = x > 0 ? x : slope·x` (slope 0: ReLU²).
    fn relu2_forward(&self, out: View<Self>, inp: View<Self>, slope: f32);
    /// `dinp` (overwritten) from `dout` and the forward's input.
    fn relu2_backward(&self, dinp: View<Self>, dout: View<Self>, inp: View<Self>, slope: f32);
    /// Logit soft cap `out = cap · tanh(inp / cap)`.
    fn softcap_forward(&self, out: View<Self>, inp: View<Self>, cap: f32);
    /// `dinp = dout · (1 − (out/cap)²)` (overwritten), from the forward's output.
    fn softcap_backward(&self, dinp: View<Self>, dout: View<Self>, out: View<Self>, cap: f32);
    /// `out = a + b`. Its backward is the identity on both inputs: the model passes the
    /// residual-stream gradient to the branch and adds the branch's input gradient back into
    /// it ([`Accumulate::Add`]), so no kernel is needed.
    fn residual_forward(&self, out: View<Self>, a: View<Self>, b: View<Self>);
    /// `out += inp`: where a gradient reaches the residual stream by a second path (a U-Net
    /// skip, the golf block's `x0`).
    fn accumulate(&self, out: View<Self>, inp: View<Self>);
    /// EngramHash's context gate: per row r of `a` and `b` `(rows, dim)`,
    /// `out[r] = σ(scale · Σ_c a[r, c]·b[r, c])`.
    fn gate_forward(&self, out: View<Self>, a: View<Self>, b: View<Self>, dim: usize, scale: f32);
    /// Exclusive self attention: per row and query head, `out = y − (y·v̂) v̂` with `v̂` the
    /// row's value of the head's kv group, normalized (`y`, `out` `(rows, H·D)`, `v`
    /// `(rows, Hkv·D)`; `s.batch·s.seq` rows).
    fn xsa_forward(&self, out: View<Self>, y: View<Self>, v: View<Self>, s: AttentionShape);
    /// Its backward: `dy` and `dv` (both overwritten) from `dout`.
    fn xsa_backward(
        &self,
        dy: View<Self>,
        dv: View<Self>,
        dout: View<Self>,
        y: View<Self>,
        v: View<Self>,
        s: AttentionShape,
    );
    /// The gate's backward from its output: `ds = dout·out·(1 − out)·scale` per row, then
    /// `da = ds·b` and `db = ds·a` (both overwritten).
    #[allow(clippy::too_many_arguments)]
    fn gate_backward(
        &self,
        da: View<Self>,
        db: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        a: View<Self>,
        b: View<Self>,
        dim: usize,
        scale: f32,
    );

    // ---- scale -------------------------------------------------------------------------

    /// `out (rows, G, inner) (=|+=) inp ⊙ s[g]` for a learnable `s (G)`: per-channel scales
    /// (`inner` 1), the per-head q gain (`G` = H, `inner` = D), a scalar (`G` 1).
    fn scale_forward(
        &self,
        out: View<Self>,
        inp: View<Self>,
        scale: View<Self>,
        s: ScaleShape,
        mode: Accumulate,
    );
    /// `dinp (=|+=) dout ⊙ s` (per `mode`), and `ds += Σ dout ⊙ inp` (a parameter gradient).
    #[allow(clippy::too_many_arguments)]
    fn scale_backward(
        &self,
        dinp: View<Self>,
        dscale: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        scale: View<Self>,
        s: ScaleShape,
        mode: Accumulate,
    );

    // ---- cross-entropy -----------------------------------------------------------------

    /// Per-row softmax cross-entropy: `losses (rows)` and the saved `logsumexp (rows)` from
    /// `logits (rows, V)` and `targets (rows)`.
    fn cross_entropy_forward(
        &self,
        losses: View<Self>,
        logsumexp: View<Self>,
        logits: View<Self>,
        targets: &[u32],
        vocab: usize,
    );
    /// `dlogits (rows, V) = (softmax(logits) - onehot(target)) * dloss` (overwritten); `dloss`
    /// is the gradient of the objective with respect to each row's loss (1/rows for a mean).
    fn cross_entropy_backward(
        &self,
        dlogits: View<Self>,
        logits: View<Self>,
        logsumexp: View<Self>,
        targets: &[u32],
        vocab: usize,
        dloss: f32,
    );

    /// Values [`Backend::classifier_loss_forward`] saves for its backward (in `saved`): 0
    /// when the backward recomputes the logits a chunk at a time, up to `rows · vocab` when
    /// the backend keeps them (where recomputing costs more than holding them).
    fn classifier_saved_len(&self, s: ClassifierShape) -> usize;
    /// The classifier and the cross-entropy in one (training's and evaluation's head, where
    /// only the losses are wanted): `losses (rows)` and the saved `logsumexp (rows)` of
    /// `softcap(inp · weightᵀ)`, as [`Backend::matmul_forward`], [`Backend::softcap_forward`]
    /// and [`Backend::cross_entropy_forward`] would give, never holding the logits beyond
    /// what the backend chose to save (`saved`, of [`Backend::classifier_saved_len`]).
    #[allow(clippy::too_many_arguments)]
    fn classifier_loss_forward(
        &self,
        losses: View<Self>,
        logsumexp: View<Self>,
        saved: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        targets: &[u32],
        s: ClassifierShape,
    );
    /// The backward of [`Backend::classifier_loss_forward`] with each row's loss weighted by
    /// `dloss`: `dinp (rows, dim) =/+= dlogits · weight` and `dweight (vocab, dim) +=
    /// dlogitsᵀ · inp`, where `dlogits` are the soft cap's and the cross-entropy's backward,
    /// from the forward's `state`, its `(logsumexp, saved)` (logits recomputed from `inp` and
    /// `weight` where it saved none).
    #[allow(clippy::too_many_arguments)]
    fn classifier_loss_backward(
        &self,
        dinp: View<Self>,
        dweight: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        state: (View<Self>, View<Self>),
        targets: &[u32],
        s: ClassifierShape,
        dloss: f32,
        dinp_mode: Accumulate,
    );

    // ---- quantization ------------------------------------------------------------------

    /// Offers a weight's integer codes for its forward products: a backend that
    /// runs quantized weights natively reads them instead of the f32 values, which are
    /// exactly what the codes stand for. Returns whether it took them; by default it does
    /// not, and the f32 values are used.
    fn take_int_codes(&self, weight: View<Self>, codes: &IntCodes) -> bool {
        let _ = (weight, codes);
        false
    }

    /// `dst = dequantize(quantize(src))` under `q` (quantization-aware training's weights;
    /// same length, no overlap); with a `rotation` block, quantized in the block Hadamard
    /// rotation and rotated back (`quant::round_trip`).
    fn fake_quantize(
        &self,
        dst: View<Self>,
        src: View<Self>,
        q: FakeQuant,
        rotation: Option<usize>,
    );

    // ---- optimizer ---------------------------------------------------------------------

    /// Sum of squares of `x`, for the global gradient norm (f64 to keep 100M-term sums exact
    /// enough).
    fn sum_squares(&self, x: View<Self>) -> f64;
    /// One AdamW update of `params` from `grads` with moment buffers `m`, `v` (same length).
    fn adamw_step(
        &self,
        params: View<Self>,
        grads: View<Self>,
        m: View<Self>,
        v: View<Self>,
        hp: &AdamWStep,
    );
    /// `ema ← decay·ema + (1 − decay)·params` (the moving average of the weights).
    fn ema_update(&self, ema: View<Self>, params: View<Self>, decay: f32);
    /// One Muon update of the matrix `params (rows, cols)` from `grads`, with momentum buffer
    /// `momentum` (the reference backend's `muon` module gives the exact recurrence).
    fn muon_step(
        &self,
        params: View<Self>,
        grads: View<Self>,
        momentum: View<Self>,
        s: MatrixShape,
        hp: &MuonStep,
    );
}

/// Data parallelism's one collective: every process holds the same model, computes gradients
/// on its own share of the batch, and all-reduces the single gradient arena before the
/// optimizer step. A communicator belongs to one backend (its buffers live there).
pub trait Communicator<B: Backend> {
    /// This process's index, `0..world_size`.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every process by the element-wise sum over all processes.
    fn all_reduce_sum(&self, backend: &B, buffer: View<B>) -> Result<(), BackendError>;
    /// Replaces host `values` on every process by their element-wise reduction by `op` over
    /// all processes: the few numbers the processes must agree on (the step's loss, the clock,
    /// whether to stop).
    fn all_reduce_host(&self, values: &mut [f64], op: HostReduce) -> Result<(), BackendError>;
    /// The optimizer step the next collectives belong to, for the message a communicator
    /// gives when the other processes stop answering.
    fn at_step(&self, _step: u64) {}
}

/// How [`Communicator::all_reduce_host`] combines the processes' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostReduce {
    Sum,
    Min,
    Max,
}

/// Training in one process: the all-reduce is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl<B: Backend> Communicator<B> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _backend: &B, _buffer: View<B>) -> Result<(), BackendError> {
        Ok(())
    }

    fn all_reduce_host(&self, _values: &mut [f64], _op: HostReduce) -> Result<(), BackendError> {
        Ok(())
    }
}
