//! The backend trait: one method per kernel family, each forward paired with its backward.
//!
//! The model's forward and backward passes (`crate::model`) are written once against this
//! trait as explicit calls with explicit buffers (no autograd tape). A backend owns device
//! memory ([`Backend::Memory`]); the model addresses it through [`View`]s — an allocation, an
//! offset and a length — so parameters, gradients, optimizer state and activations can each
//! live in one contiguous arena (see `crate::model`).
//!
//! Conventions every backend follows (all matrices row-major, f32 at the interface):
//! - **Parameter gradients accumulate** (`+=`): a step may run several micro-batches before
//!   the optimizer, and a tied embedding receives gradient from both its uses.
//! - **Activation gradients overwrite** (`=`), except where a method takes [`Accumulate`]:
//!   the residual stream's gradient is one buffer that every branch adds into, which is also
//!   how the backward of the residual add is realised (it is the identity on both inputs).
//! - An output view never overlaps an input view of the same call, unless a method says so.
//! - Token ids and targets are host slices (`&[u32]`): they are the step's input, uploaded by
//!   the backend as it needs.
//!
//! This is not a tensor library: there is no broadcasting, no dtype zoo, no graph. Shapes are
//! passed as plain integers named with kiln's shape letters (B, T, C, V, H, Hkv, D, F).

pub mod reference;

use std::fmt;

/// Whether an activation-gradient output is overwritten or added into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    Overwrite,
    Add,
}

/// The kernel families, for [`Backend::supports`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Matmul,
    Embedding,
    RmsNorm,
    Rope,
    Attention,
    SwiGlu,
    Relu2,
    Softcap,
    Scale,
    Residual,
    CrossEntropy,
    AdamW,
    Muon,
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
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
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
    /// Decoupled weight decay (0 in the baseline).
    pub weight_decay: f32,
    /// Multiplies the gradient first (clipping, loss-scale removal).
    pub grad_scale: f32,
}

/// A window of `len` f32 values at `offset` in one backend allocation.
pub struct View<'a, B: Backend + ?Sized> {
    pub memory: &'a B::Memory,
    pub offset: usize,
    pub len: usize,
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
    /// The whole of an allocation.
    pub fn whole(memory: &'a B::Memory, len: usize) -> Self {
        View {
            memory,
            offset: 0,
            len,
        }
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
}

/// A compute device with its kernels. See the module docs for the conventions.
///
/// Shape comments give each buffer's logical shape; `n` is a flat element count.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    /// One allocation of f32 device memory.
    type Memory: Send + Sync;

    /// A short name for logs and `kiln doctor`.
    fn name(&self) -> String;

    /// Whether this backend runs `kernel` at this shape. A fast backend may decline (a shape it
    /// has no tiles for, a head_dim over its limit); the caller then picks another backend.
    fn supports(&self, kernel: Kernel, shape: ShapeHint) -> Result<(), String>;

    /// How far its results may stray from exact arithmetic (used by the conformance suite).
    fn tolerance(&self) -> Tolerance;

    // ---- memory ----------------------------------------------------------------------

    /// A zero-filled allocation of `len` f32 values.
    fn alloc(&self, len: usize) -> Self::Memory;
    /// Copies host data into the device.
    fn upload(&self, dst: View<Self>, src: &[f32]);
    /// Copies device data to the host.
    fn download(&self, src: View<Self>, dst: &mut [f32]);
    /// Sets every value of `dst` to zero.
    fn zero(&self, dst: View<Self>);
    /// `dst = src` (same length, no overlap).
    fn copy(&self, dst: View<Self>, src: View<Self>);

    // ---- matmul ----------------------------------------------------------------------

    /// `out (rows, out_dim) = inp (rows, in_dim) · weight (out_dim, in_dim)ᵀ`.
    fn matmul_forward(
        &self,
        out: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    );
    /// `dinp (rows, in_dim) =/+= dout · weight`; `dweight (out_dim, in_dim) += doutᵀ · inp`.
    fn matmul_backward(
        &self,
        dinp: View<Self>,
        dweight: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
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
        rows: usize,
        dim: usize,
        eps: f32,
    );
    /// `dinp =/+= …`, `dweight += …` from `dout` and the saved `rstd`.
    fn rmsnorm_backward(
        &self,
        dinp: View<Self>,
        dweight: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        weight: View<Self>,
        rstd: View<Self>,
        rows: usize,
        dim: usize,
        dinp_mode: Accumulate,
    );

    // ---- rope --------------------------------------------------------------------------

    /// Rotary position embedding on `inp (B, T, heads, D)` into `out`; row t is at position
    /// `start_pos + t` (non-zero when decoding with a KV cache).
    /// Half-split pairing (dimension `i` with `i + D/2`), as Hugging Face Llama and Qwen3 do;
    /// llama2.c pairs neighbours (`2i`, `2i+1`), and its weights are permuted on import.
    /// Only the first `rot_dims` (even, ≤ D) dimensions of a head rotate, as a head of that
    /// width (partial RoPE); the rest are copied. `rot_dims = D` is ordinary RoPE.
    fn rope_forward(
        &self,
        out: View<Self>,
        inp: View<Self>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        rot_dims: usize,
        theta: f32,
        start_pos: usize,
    );
    /// The inverse rotation of `dout` into `dinp` (RoPE is orthogonal; no saved input needed).
    fn rope_backward(
        &self,
        dinp: View<Self>,
        dout: View<Self>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        rot_dims: usize,
        theta: f32,
    );

    // ---- attention ---------------------------------------------------------------------

    /// Values of saved state the attention forward keeps for its backward, per call.
    fn attention_saved_len(&self, batch: usize, seq: usize, heads: usize) -> usize;
    /// Causal softmax attention with grouped-query heads:
    /// `out (B, T, H·D)` from `q (B, T, H·D)`, `k, v (B, T, Hkv·D)`; query head `h` reads
    /// kv head `h / (H / Hkv)`; scores scaled by `1/sqrt(D)`.
    fn attention_forward(
        &self,
        out: View<Self>,
        saved: View<Self>,
        q: View<Self>,
        k: View<Self>,
        v: View<Self>,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    );
    /// `dq, dk, dv` (overwritten) from `dout` and the forward's inputs and saved state.
    fn attention_backward(
        &self,
        dq: View<Self>,
        dk: View<Self>,
        dv: View<Self>,
        dout: View<Self>,
        q: View<Self>,
        k: View<Self>,
        v: View<Self>,
        saved: View<Self>,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
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
        batch: usize,
        len: usize,
        capacity: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    );

    // ---- swiglu ------------------------------------------------------------------------

    /// `out = silu(gate) * up`, elementwise over `n`.
    fn swiglu_forward(&self, out: View<Self>, gate: View<Self>, up: View<Self>, n: usize);
    /// `dgate, dup` (overwritten) from `dout`.
    fn swiglu_backward(
        &self,
        dgate: View<Self>,
        dup: View<Self>,
        dout: View<Self>,
        gate: View<Self>,
        up: View<Self>,
        n: usize,
    );

    // ---- activation (golf family) ------------------------------------------------------

    /// `out = r(x)²` elementwise over `n`, `r(x) = x > 0 ? x : slope·x` (slope 0: ReLU²).
    fn relu2_forward(&self, out: View<Self>, inp: View<Self>, n: usize, slope: f32);
    /// `dinp` (overwritten) from `dout` and the forward's input.
    fn relu2_backward(
        &self,
        dinp: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        n: usize,
        slope: f32,
    );
    /// Logit soft cap `out = cap · tanh(inp / cap)` elementwise over `n`.
    fn softcap_forward(&self, out: View<Self>, inp: View<Self>, n: usize, cap: f32);
    /// `dinp = dout · (1 − (out/cap)²)` (overwritten), from the forward's output.
    fn softcap_backward(
        &self,
        dinp: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        n: usize,
        cap: f32,
    );

    // ---- scale -------------------------------------------------------------------------

    /// `out (rows, G, inner) (=|+=) inp ⊙ s[g]` for a learnable `s (G)`: per-channel scales
    /// (`inner` 1), the per-head q gain (`G` = H, `inner` = D), a scalar (`G` 1).
    fn scale_forward(
        &self,
        out: View<Self>,
        inp: View<Self>,
        s: View<Self>,
        rows: usize,
        groups: usize,
        inner: usize,
        mode: Accumulate,
    );
    /// `dinp (=|+=) dout ⊙ s` (per `mode`), and `ds += Σ dout ⊙ inp` (a parameter gradient).
    fn scale_backward(
        &self,
        dinp: View<Self>,
        ds: View<Self>,
        dout: View<Self>,
        inp: View<Self>,
        s: View<Self>,
        rows: usize,
        groups: usize,
        inner: usize,
        mode: Accumulate,
    );

    // ---- residual ----------------------------------------------------------------------

    /// `out = a + b`, elementwise over `n`. Its backward is the identity on both inputs: the
    /// model passes the residual-stream gradient to the branch and adds the branch's input
    /// gradient back into it ([`Accumulate::Add`]), so no kernel is needed.
    fn residual_forward(&self, out: View<Self>, a: View<Self>, b: View<Self>, n: usize);
    /// `out += inp`: where a gradient reaches the residual stream by a second path (a U-Net
    /// skip, the golf block's `x0`).
    fn accumulate(&self, out: View<Self>, inp: View<Self>);

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
    /// `momentum` (see `reference::muon` for the exact recurrence).
    fn muon_step(
        &self,
        params: View<Self>,
        grads: View<Self>,
        momentum: View<Self>,
        rows: usize,
        cols: usize,
        hp: &MuonStep,
    );
}
