//! Causal attention's launches (kernels/attention.cu): FlashAttention-2's blocking on the
//! tensor cores ([`AttentionPath::Mma`], the default), batched cuBLASLt products
//! ([`AttentionPath::Gemm`]), or the flash-style kernels on the CUDA cores
//! ([`AttentionPath::Flash`]: dq with each row's delta, then dk and dv); and KV-cache decoding.

use cudarc::driver::sys::CUdeviceptr;
use kiln_core::backend::{AttentionShape, Backend, DecodeShape, Qkv};

use super::gemm::{Batch, GemmShape};
use super::{addr, Arg::*, CudaBackend, MAX_HEAD_DIM, V};

/// How causal attention runs (`KILN_CUDA_ATTENTION`). Measured on an H200 (training steps,
/// bf16, in one run): stories110m at 256 × 256 took 188 ms with `Mma`, 205 with `Gemm` and
/// 1,006 with `Flash`; at 64 × 1,024, 241 with `Mma` and 314 with `Gemm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionPath {
    /// Flash-style kernels on the CUDA cores in f32 (no (T, T) matrix; a warp per row).
    Flash,
    /// One head at a time through strided batches of cuBLASLt products, with (B, T, T) f32
    /// scratch for the scores (as PyTorch's unfused attention).
    Gemm,
    /// FlashAttention-2's blocking on the tensor cores (`mma.sync` bf16 products, f32
    /// softmax and accumulation; no (T, T) matrix), for head dims up to 64 (larger ones take
    /// the batched products). The default.
    #[default]
    Mma,
}

impl AttentionPath {
    /// From `KILN_CUDA_ATTENTION` (`mma`, `gemm` or `flash`; unset: mma).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("KILN_CUDA_ATTENTION").as_deref() {
            Ok("flash") => Ok(AttentionPath::Flash),
            Ok("gemm") => Ok(AttentionPath::Gemm),
            Err(_) | Ok("mma") => Ok(AttentionPath::Mma),
            Ok(other) => Err(format!(
                "KILN_CUDA_ATTENTION must be mma, gemm or flash, got {other:?}"
            )),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AttentionPath::Flash => "flash",
            AttentionPath::Gemm => "gemm",
            AttentionPath::Mma => "mma",
        }
    }
}

/// The largest head dim the tensor-core kernels take (`MMA_D` in kernels/attention.cu), their
/// rows per block (`MMA_ROWS`) and shared row stride in bf16 elements (`MMA_LD`).
pub(crate) const MMA_HEAD_DIM: usize = 64;
const MMA_ROWS: usize = 64;
const MMA_LD: usize = MMA_HEAD_DIM + 8;

/// Rows per block of the attention kernels (`ROWS_PER_BLOCK` in kernels/attention.cu) and
/// their tile of keys (`TILE`).
const ATTENTION_ROWS: usize = 4;
const ATTENTION_TILE: usize = 32;

impl CudaBackend {
    pub(crate) fn attention_forward_on_device(
        &self,
        out: V,
        saved: V,
        inputs: Qkv<CudaBackend>,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        self.check_attention(s, q, k, v);
        assert_eq!(saved.len(), self.attention_saved_len(s));
        if s.seq == 0 || s.batch == 0 {
            return;
        }
        match self.attention_path_for(s) {
            AttentionPath::Gemm => return self.attention_forward_gemm(out, saved, inputs, s),
            AttentionPath::Mma => return self.attention_forward_mma(out, saved, inputs, s),
            AttentionPath::Flash => {}
        }
        let grid = (
            s.seq.div_ceil(ATTENTION_ROWS) as u32,
            (s.batch * s.heads) as u32,
            1,
        );
        self.launch(
            "attention_forward",
            grid,
            (32 * ATTENTION_ROWS) as u32,
            attention_shared(s.head_dim),
            &self.forward_args(out, saved, inputs, s),
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward_on_device(
        &self,
        grads: Qkv<CudaBackend>,
        dout: V,
        inputs: Qkv<CudaBackend>,
        saved: V,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        self.check_attention(s, q, k, v);
        if s.seq == 0 || s.batch == 0 {
            return;
        }
        match self.attention_path_for(s) {
            AttentionPath::Gemm => {
                return self.attention_backward_gemm(grads, dout, inputs, saved, s)
            }
            AttentionPath::Mma => {
                return self.attention_backward_mma(grads, dout, inputs, saved, s)
            }
            AttentionPath::Flash => {}
        }
        let rows = s.batch * s.heads * s.seq;
        let delta = self.scratch("attention_delta", rows * 4);
        let dims = shape_args(s);
        let shared = attention_shared(s.head_dim);
        let block = (32 * ATTENTION_ROWS) as u32;
        let blocks = s.seq.div_ceil(ATTENTION_ROWS) as u32;
        let mut args = vec![
            self.f(grads.q),
            Ptr(delta),
            self.f(dout),
            self.f(q),
            self.f(k),
            self.f(v),
            self.f(saved),
        ];
        args.extend(dims);
        self.launch(
            "attention_backward_dq",
            (blocks, (s.batch * s.heads) as u32, 1),
            block,
            shared,
            &args,
        );
        let mut args = vec![
            self.f(grads.k),
            self.f(grads.v),
            self.f(dout),
            self.f(q),
            self.f(k),
            self.f(v),
            self.f(saved),
            Ptr(delta),
        ];
        args.extend(dims);
        self.launch(
            "attention_backward_dkdv",
            (blocks, (s.batch * s.kv_heads) as u32, 1),
            block,
            shared,
            &args,
        );
    }

    pub(crate) fn attention_decode_on_device(
        &self,
        out: V,
        q: V,
        k_cache: V,
        v_cache: V,
        s: DecodeShape,
    ) {
        assert!(
            s.head_dim <= MAX_HEAD_DIM,
            "attention_decode: head_dim {}",
            s.head_dim
        );
        assert_eq!(q.len(), s.batch * s.heads * s.head_dim);
        assert_eq!(
            k_cache.len(),
            s.batch * s.capacity * s.kv_heads * s.head_dim
        );
        let count = s.batch * s.heads;
        self.warps(
            "attention_decode",
            count,
            &[
                self.f(out),
                self.f(q),
                self.f(k_cache),
                self.f(v_cache),
                Int(s.len as i64),
                Int(s.capacity as i64),
                Int(s.heads as i64),
                Int(s.kv_heads as i64),
                Int(s.head_dim as i64),
                Int(count as i64),
            ],
        );
    }

    /// The path attention at shape `s` takes: the backend's, except that head dims over
    /// [`MMA_HEAD_DIM`] go from the tensor-core kernels to the batched products.
    pub(crate) fn attention_path_for(&self, s: AttentionShape) -> AttentionPath {
        match self.attention {
            AttentionPath::Mma if s.head_dim > MMA_HEAD_DIM => AttentionPath::Gemm,
            path => path,
        }
    }

    /// The tensor-core forward (kernels/attention.cu, `attention_forward_mma`): `saved` gets
    /// the logsumexps, then a copy of `out` for the backward's deltas.
    fn attention_forward_mma(&self, out: V, saved: V, inputs: Qkv<CudaBackend>, s: AttentionShape) {
        self.launch(
            "attention_forward_mma",
            ((s.batch * s.heads * s.seq.div_ceil(MMA_ROWS)) as u32, 1, 1),
            128,
            (2 * MMA_ROWS * MMA_LD * 2) as u32,
            &self.forward_args(out, saved, inputs, s),
        );
    }

    /// The tensor-core backward: each row's delta = dO·O from the saved copy of O, then dK
    /// and dV per block of keys, dQ added into zeros.
    fn attention_backward_mma(
        &self,
        grads: Qkv<CudaBackend>,
        dout: V,
        inputs: Qkv<CudaBackend>,
        saved: V,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        let rows = s.batch * s.heads * s.seq;
        let delta = self.scratch("attention_delta", rows * 4);
        self.warps(
            "attention_delta_mma",
            rows,
            &[
                Ptr(delta),
                self.f(dout),
                self.f(saved),
                Int(s.batch as i64),
                Int(s.seq as i64),
                Int(s.heads as i64),
                Int(s.head_dim as i64),
            ],
        );
        self.zero(grads.q);
        self.launch(
            "attention_backward_mma",
            (
                (s.batch * s.kv_heads * s.seq.div_ceil(MMA_ROWS)) as u32,
                1,
                1,
            ),
            128,
            (4 * MMA_ROWS * MMA_LD * 2 + 2 * MMA_ROWS * 4) as u32,
            &[
                [
                    self.f(grads.q),
                    self.f(grads.k),
                    self.f(grads.v),
                    self.f(dout),
                    self.f(q),
                    self.f(k),
                    self.f(v),
                    self.f(saved),
                    Ptr(delta),
                ]
                .as_slice(),
                &shape_args(s),
            ]
            .concat(),
        );
    }

    /// The forward through batched products, head after head: `S = Q_h·K_hᵀ` for every
    /// sequence at once, the causal softmax in place (saving each row's logsumexp as the
    /// flash forward does), then `O_h = P·V_h` into the head's columns of `out`.
    fn attention_forward_gemm(
        &self,
        out: V,
        saved: V,
        inputs: Qkv<CudaBackend>,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        let g = Geometry::new(s);
        let scores = self.scratch("attention_scores", g.square * s.batch * 4);
        for h in 0..s.heads {
            let (qh, kh, vh) = (g.q(addr(q), h), g.kv(addr(k), h), g.kv(addr(v), h));
            self.gemm_batched(g.scores(), g.batch_scores(), 1.0, (qh, kh), 0.0, scores);
            self.warps(
                "causal_softmax",
                s.batch * s.seq,
                &g.rows_args(scores, self.f(saved), h),
            );
            let (shape, batch) = g.times_values();
            self.gemm_batched(shape, batch, 1.0, (scores, vh), 0.0, g.q(addr(out), h));
        }
    }

    /// The backward through batched products, head after head: the probabilities again from
    /// the saved logsumexp, `dV += Pᵀ·dO_h`, `dP = dO_h·V_hᵀ`, the softmax's backward in place,
    /// then `dQ_h = scale·dS·K_h` and `dK += scale·dSᵀ·Q_h` (a kv head gathers its query
    /// heads' shares; dK and dV start at zero).
    fn attention_backward_gemm(
        &self,
        grads: Qkv<CudaBackend>,
        dout: V,
        inputs: Qkv<CudaBackend>,
        saved: V,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        self.zero(grads.k);
        self.zero(grads.v);
        let g = Geometry::new(s);
        let bytes = g.square * s.batch * 4;
        let probs = self.scratch("attention_scores", bytes);
        let dprobs = self.scratch("attention_dscores", bytes);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        for h in 0..s.heads {
            let (qh, kh, vh) = (g.q(addr(q), h), g.kv(addr(k), h), g.kv(addr(v), h));
            let (dq, dk, dv) = (
                g.q(addr(grads.q), h),
                g.kv(addr(grads.k), h),
                g.kv(addr(grads.v), h),
            );
            let doh = g.q(addr(dout), h);
            self.gemm_batched(g.scores(), g.batch_scores(), 1.0, (qh, kh), 0.0, probs);
            self.warps(
                "causal_probabilities",
                s.batch * s.seq,
                &g.rows_args(probs, self.f(saved), h),
            );
            let (shape, batch) = g.transposed_times_q_rows();
            self.gemm_batched(shape, batch, 1.0, (probs, doh), 1.0, dv);
            self.gemm_batched(g.scores(), g.batch_scores(), 1.0, (doh, vh), 0.0, dprobs);
            let rows = [
                Ptr(dprobs),
                Ptr(probs),
                Int((s.batch * s.seq) as i64),
                Int(s.seq as i64),
            ];
            self.warps("softmax_rows_backward", s.batch * s.seq, &rows);
            let (shape, batch) = g.times_values();
            self.gemm_batched(shape, batch, scale, (dprobs, kh), 0.0, dq);
            let (shape, batch) = g.transposed_times_q_rows();
            self.gemm_batched(shape, batch, scale, (dprobs, qh), 1.0, dk);
        }
    }

    /// The forward kernels' arguments: out, saved, q, k, v, then the shape.
    fn forward_args(
        &self,
        out: V,
        saved: V,
        inputs: Qkv<CudaBackend>,
        s: AttentionShape,
    ) -> Vec<super::Arg> {
        let Qkv { q, k, v } = inputs;
        let mut args = vec![self.f(out), self.f(saved), self.f(q), self.f(k), self.f(v)];
        args.extend(shape_args(s));
        args
    }

    fn check_attention(&self, s: AttentionShape, q: V, k: V, v: V) {
        assert!(
            s.head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {} over {MAX_HEAD_DIM}",
            s.head_dim
        );
        assert!(
            s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
            "attention: heads {} over {}",
            s.heads,
            s.kv_heads
        );
        let rows = s.batch * s.seq;
        assert_eq!(
            (q.len(), k.len(), v.len()),
            (
                rows * s.heads * s.head_dim,
                rows * s.kv_heads * s.head_dim,
                rows * s.kv_heads * s.head_dim
            )
        );
    }
}

/// The attention kernels' last four arguments: seq, heads, kv_heads, head_dim.
fn shape_args(s: AttentionShape) -> [super::Arg; 4] {
    [
        Int(s.seq as i64),
        Int(s.heads as i64),
        Int(s.kv_heads as i64),
        Int(s.head_dim as i64),
    ]
}

/// Dynamic shared memory of the attention kernels: two tiles of TILE × (D + 1) floats.
fn attention_shared(head_dim: usize) -> u32 {
    (2 * ATTENTION_TILE * (head_dim + 1) * 4) as u32
}

/// Where one head's rows lie in the (B, T, heads·D) tensors, and the batched products'
/// shapes over the (B, T, T) scores (one product per sequence).
struct Geometry {
    s: AttentionShape,
    /// T·T: one sequence's scores.
    square: usize,
}

impl Geometry {
    fn new(s: AttentionShape) -> Self {
        Geometry {
            s,
            square: s.seq * s.seq,
        }
    }

    /// Query head `h`'s first row in a (B, T, H·D) tensor at `base`.
    fn q(&self, base: CUdeviceptr, h: usize) -> CUdeviceptr {
        base + (4 * h * self.s.head_dim) as u64
    }

    /// The kv head query head `h` reads, in a (B, T, Hkv·D) tensor at `base`.
    fn kv(&self, base: CUdeviceptr, h: usize) -> CUdeviceptr {
        let group = self.s.heads / self.s.kv_heads;
        base + (4 * (h / group) * self.s.head_dim) as u64
    }

    fn q_stride(&self) -> usize {
        self.s.seq * self.s.heads * self.s.head_dim
    }

    fn kv_stride(&self) -> usize {
        self.s.seq * self.s.kv_heads * self.s.head_dim
    }

    /// `S (T, T) = Q_h·K_hᵀ` (also `dP = dO_h·V_hᵀ`).
    fn scores(&self) -> GemmShape {
        let (t, d) = (self.s.seq, self.s.head_dim);
        GemmShape {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: d,
            lda: self.s.heads * d,
            ldb: self.s.kv_heads * d,
            ldc: t,
        }
    }

    fn batch_scores(&self) -> Batch {
        Batch {
            count: self.s.batch,
            stride_a: self.q_stride(),
            stride_b: self.kv_stride(),
            stride_c: self.square,
        }
    }

    /// `O_h (T, D) = P·V_h` (also `dQ_h = dS·K_h`), into a (B, T, H·D) tensor.
    fn times_values(&self) -> (GemmShape, Batch) {
        let (kv, q) = (self.kv_operand(), self.q_operand());
        self.over_keys(false, kv, q)
    }

    /// `dV_h (T, D) += Pᵀ·dO_h` (also `dK_h += dSᵀ·Q_h`), into a (B, T, Hkv·D) tensor.
    fn transposed_times_q_rows(&self) -> (GemmShape, Batch) {
        let (q, kv) = (self.q_operand(), self.kv_operand());
        self.over_keys(true, q, kv)
    }

    /// A (B, T, heads·D) tensor's (row stride, sequence stride).
    fn q_operand(&self) -> (usize, usize) {
        (self.s.heads * self.s.head_dim, self.q_stride())
    }

    fn kv_operand(&self) -> (usize, usize) {
        (self.s.kv_heads * self.s.head_dim, self.kv_stride())
    }

    /// `c (T, D) = op(a)·b` with `a` the (T, T) buffer (transposed with `ta`) and `b`, `c`
    /// one head's rows of the tensors whose (row stride, sequence stride) are given.
    fn over_keys(&self, ta: bool, b: (usize, usize), c: (usize, usize)) -> (GemmShape, Batch) {
        let (t, d) = (self.s.seq, self.s.head_dim);
        let shape = GemmShape {
            ta,
            tb: false,
            m: t,
            n: d,
            k: t,
            lda: t,
            ldb: b.0,
            ldc: c.0,
        };
        let batch = Batch {
            count: self.s.batch,
            stride_a: self.square,
            stride_b: b.1,
            stride_c: c.1,
        };
        (shape, batch)
    }

    /// The row kernels' arguments: the (B, T, T) buffer, the logsumexps, B, T, H, h, scale.
    fn rows_args(&self, buffer: CUdeviceptr, lse: super::Arg, h: usize) -> [super::Arg; 7] {
        let s = self.s;
        [
            Ptr(buffer),
            lse,
            Int(s.batch as i64),
            Int(s.seq as i64),
            Int(s.heads as i64),
            Int(h as i64),
            Float(1.0 / (s.head_dim as f32).sqrt()),
        ]
    }
}
