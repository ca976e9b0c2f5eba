//! Causal attention with grouped-query heads, flash-style: the forward saves only each row's
//! log-sum-exp (B·H·T values instead of the reference's B·H·T·T probabilities), and the
//! backward recomputes the probabilities from it (Dao et al., "FlashAttention", 2022,
//! Algorithms 1 and 2, here one query row at a time, since T ≤ a few thousand fits in cache).
//!
//! One task per (batch, kv head) takes every query head of its group, so the gradients of
//! the shared keys and values are summed by one thread. Within a task each product is one of
//! the backend's packed GEMMs (its micro-kernel, bf16 or f32, on a one-thread pool) over the
//! whole T × T block: S = Q·Kᵀ, O = P·V forward; S, dP = dO·Vᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q,
//! dQ = dS·K backward. The causal upper half is computed and masked, twice the FLOPs of a
//! row-by-row kernel but at GEMM speed, which wins at the sequence lengths kiln trains at.
//!
//! Layouts as the trait: `q, out (B, T, H·D)`, `k, v (B, T, Hkv·D)`; query head `h` reads kv
//! head `h / (H / Hkv)`; scores scaled by `1/√D`. Accumulation rule: dq, dk, dv are
//! overwritten.

use kiln_core::backend::AttentionShape;
use kiln_core::cpu::Isa;

use crate::gemm::{gemm, gemm_into, Mat, Microkernel, Scratch};
use crate::pool::ThreadPool;
use crate::shared::SharedMut;

/// Values the forward saves per call: one log-sum-exp per (batch, head, row).
pub fn saved_len(s: AttentionShape) -> usize {
    s.batch * s.heads * s.seq
}

/// Row `t` of head `h` of batch `b` in a `(B, T, heads·D)` tensor.
#[inline(always)]
fn at(s: AttentionShape, b: usize, t: usize, heads: usize, h: usize) -> usize {
    ((b * s.seq + t) * heads + h) * s.head_dim
}

/// `out (B, T, H·D)` and `lse (B, H, T)` from q, k, v.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    (isa, kernel): (Isa, Microkernel),
    pool: &ThreadPool,
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    assert_eq!(
        out.len(),
        s.batch * s.seq * s.heads * s.head_dim,
        "attention: out"
    );
    let (o_ptr, l_ptr) = (SharedMut::new(out), SharedMut::new(lse));
    pool.run(s.batch * s.kv_heads, &|task| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        let mut ctx = Context::take(isa, kernel, s);
        for h in kvh * s.group()..(kvh + 1) * s.group() {
            let (qh, kh, vh) = (
                ctx.head(q, b, h, s.heads),
                ctx.head(k, b, kvh, s.kv_heads),
                ctx.head(v, b, kvh, s.kv_heads),
            );
            ctx.probabilities_from_scores(qh, kh, None);
            // SAFETY: rows of head h of batch b (and their log-sum-exps) belong to this task;
            // O = P·V writes the strided rows of head h only.
            unsafe {
                let l = l_ptr.slice((b * s.heads + h) * s.seq, s.seq);
                l.copy_from_slice(&ctx.lse);
                let o = o_ptr.get().add(at(s, b, 0, s.heads, h));
                let p = std::mem::take(&mut ctx.p);
                ctx.lower_times(&p, vh, o, s.heads * s.head_dim, false);
                ctx.p = p;
            }
        }
        ctx.give_back();
    });
}

/// `dq, dk, dv` from `dout`, the forward's inputs and its saved log-sum-exps.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    (isa, kernel): (Isa, Microkernel),
    pool: &ThreadPool,
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    s: AttentionShape,
) {
    let ptrs = (
        SharedMut::new(grads.0),
        SharedMut::new(grads.1),
        SharedMut::new(grads.2),
    );
    pool.run(s.batch * s.kv_heads, &|task| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        let (seq, dim) = (s.seq, s.head_dim);
        let scale = 1.0 / (dim as f32).sqrt();
        let mut ctx = Context::take(isa, kernel, s);
        let (kh, vh) = (
            ctx.head(k, b, kvh, s.kv_heads),
            ctx.head(v, b, kvh, s.kv_heads),
        );
        let kv_at = at(s, b, 0, s.kv_heads, kvh);
        let ldkv = s.kv_heads * dim;
        let (dq, dk, dv) = (ptrs.0.get(), ptrs.1.get(), ptrs.2.get());
        for (first, h) in (kvh * s.group()..(kvh + 1) * s.group()).enumerate() {
            let (qh, doh) = (ctx.head(q, b, h, s.heads), ctx.head(dout, b, h, s.heads));
            let row_lse = &lse[(b * s.heads + h) * seq..][..seq];
            ctx.probabilities_from_scores(qh, kh, Some(row_lse));
            // dP = dO·Vᵀ (T, T).
            let mut dp = std::mem::take(&mut ctx.dp);
            ctx.lower_scores(doh, vh, &mut dp);
            // δ_t = Σ_j P·dP; dS = P∘(dP − δ)·scale (zero above the diagonal, where P is).
            for t in 0..seq {
                let (p_row, dp_row) = (
                    &ctx.p[t * seq..(t + 1) * seq],
                    &mut dp[t * seq..(t + 1) * seq],
                );
                // SAFETY: every tier of this backend has AVX2 and FMA.
                unsafe { score_gradients(&p_row[..=t], &mut dp_row[..=t], scale) };
                // Above the diagonal dP was not computed: dS is zero there.
                dp_row[t + 1..].fill(0.0);
            }
            let p = std::mem::take(&mut ctx.p);
            let accumulate = first > 0;
            let q_at = at(s, b, 0, s.heads, h);
            // SAFETY: dq rows of the group's query heads, and dk, dv rows of kv head kvh of
            // batch b, belong to this task alone.
            unsafe {
                // dV (=|+=) Pᵀ·dO, dK (=|+=) dSᵀ·Q: the group's heads add into one kv head.
                ctx.upper_t_times(&p, doh, dv.add(kv_at), ldkv, accumulate);
                ctx.upper_t_times(&dp, qh, dk.add(kv_at), ldkv, accumulate);
                // dQ = dS·K into head h's rows.
                ctx.lower_times(&dp, kh, dq.add(q_at), s.heads * dim, false);
            }
            ctx.p = p;
            ctx.dp = dp;
        }
        ctx.give_back();
    });
}

/// One row of the softmax's backward: `dp = p ∘ (dp − δ) · scale` with `δ = Σ p · dp`
/// (FlashAttention's `D_i`), the sum in eight lanes so it vectorizes (a scalar sum, in order,
/// took 10% of the attention's time).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn score_gradients(p: &[f32], dp: &mut [f32], scale: f32) {
    let mut lanes = [0f32; 8];
    let (p8, dp8) = (p.chunks_exact(8), dp.chunks_exact(8));
    let tail: f32 = p8
        .remainder()
        .iter()
        .zip(dp8.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in p8.zip(dp8) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    let delta = lanes.iter().sum::<f32>() + tail;
    for (d, &pv) in dp.iter_mut().zip(p) {
        *d = pv * (*d - delta) * scale;
    }
}

/// Rows per block of the causal products: the products skip the blocks above the diagonal.
const BLOCK: usize = 64;

/// One task's workspace: a one-thread pool (the task already runs on the backend's pool),
/// GEMM packing buffers, and the T × T probabilities and their gradient.
struct Context {
    isa: Isa,
    /// The products' micro-kernel: the backend's, so bf16 inputs where its matmuls are bf16
    /// (as PyTorch's autocast runs attention), f32 otherwise.
    kernel: Microkernel,
    pool: ThreadPool,
    scratch: Scratch,
    s: AttentionShape,
    /// `(T, T)` probabilities, zero above the diagonal.
    p: Vec<f32>,
    /// `(T, T)` gradient of the scores.
    dp: Vec<f32>,
    /// `(T)` each row's log-sum-exp.
    lse: Vec<f32>,
}

/// One head's rows of a `(B, T, heads·D)` tensor: data from the head's first element, row
/// stride heads·D.
#[derive(Clone, Copy)]
struct Head<'a> {
    data: &'a [f32],
    stride: usize,
}

thread_local! {
    /// The last workspace this thread used: a step calls attention with the same shape layer
    /// after layer, and fresh T × T buffers would be mapped and faulted in every time.
    static CACHED: std::cell::RefCell<Option<Context>> = const { std::cell::RefCell::new(None) };
}

impl Context {
    /// This thread's cached workspace if it fits, else a new one.
    fn take(isa: Isa, kernel: Microkernel, s: AttentionShape) -> Self {
        CACHED
            .with(|c| c.borrow_mut().take())
            .filter(|c| c.s == s && c.isa == isa && c.kernel == kernel)
            .unwrap_or_else(|| Context::new(isa, kernel, s))
    }

    /// Keeps the workspace for this thread's next call.
    fn give_back(self) {
        CACHED.with(|c| *c.borrow_mut() = Some(self));
    }

    fn new(isa: Isa, kernel: Microkernel, s: AttentionShape) -> Self {
        Context {
            isa,
            kernel,
            pool: ThreadPool::new(1),
            scratch: Scratch::default(),
            s,
            p: vec![0.0; s.seq * s.seq],
            dp: vec![0.0; s.seq * s.seq],
            lse: vec![0.0; s.seq],
        }
    }

    /// `c (m, n) (=|+=) a (m, k) · b (k, n)` on this context's one-thread pool.
    ///
    /// # Safety
    /// As [`gemm_into`].
    unsafe fn product(
        &mut self,
        (m, n, k): (usize, usize, usize),
        a: Mat,
        b: Mat,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let kernel = self.kernel;
        gemm_into(
            &self.pool,
            &mut self.scratch,
            kernel,
            m,
            n,
            k,
            a,
            b,
            c,
            ldc,
            accumulate,
        );
    }

    fn head<'a>(&self, x: &'a [f32], b: usize, h: usize, heads: usize) -> Head<'a> {
        Head {
            data: &x[at(self.s, b, 0, heads, h)..],
            stride: heads * self.s.head_dim,
        }
    }

    /// `c (T, D) (=|+=) A · x` for a causal (lower-triangular) `A (T, T)`: block row
    /// `r0..r1` of the product needs only A's columns and x's rows below `r1`.
    ///
    /// # Safety
    /// `c` points to T rows of `D` writable values at stride `ldc` that no one else touches.
    unsafe fn lower_times(
        &mut self,
        a: &[f32],
        x: Head,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let (seq, dim) = (self.s.seq, self.s.head_dim);
        for r0 in (0..seq).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(seq);
            let am = Mat {
                data: &a[r0 * seq..],
                rs: seq,
                cs: 1,
            };
            let xm = Mat {
                data: x.data,
                rs: x.stride,
                cs: 1,
            };
            self.product((r1 - r0, dim, r1), am, xm, c.add(r0 * ldc), ldc, accumulate);
        }
    }

    /// `c (T, D) (=|+=) Aᵀ · x` for a causal `A (T, T)`: row `j` of the product sums rows
    /// `t ≥ j` of x, so block row `j0..j1` needs only A's rows and x's rows from `j0`.
    ///
    /// # Safety
    /// As [`Context::lower_times`].
    unsafe fn upper_t_times(
        &mut self,
        a: &[f32],
        x: Head,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let (seq, dim) = (self.s.seq, self.s.head_dim);
        for j0 in (0..seq).step_by(BLOCK) {
            let j1 = (j0 + BLOCK).min(seq);
            let am = Mat {
                data: &a[j0 * seq + j0..],
                rs: 1,
                cs: seq,
            };
            let xm = Mat {
                data: &x.data[j0 * x.stride..],
                rs: x.stride,
                cs: 1,
            };
            self.product(
                (j1 - j0, dim, seq - j0),
                am,
                xm,
                c.add(j0 * ldc),
                ldc,
                accumulate,
            );
        }
    }

    /// `out (T, T) = x (T, D) · yᵀ` on and below the diagonal, block row by block row (the
    /// part above is left as it was; callers zero it).
    fn lower_scores(&mut self, x: Head, y: Head, out: &mut [f32]) {
        let (seq, dim) = (self.s.seq, self.s.head_dim);
        for r0 in (0..seq).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(seq);
            let a = Mat {
                data: &x.data[r0 * x.stride..],
                rs: x.stride,
                cs: 1,
            };
            let b = Mat {
                data: y.data,
                rs: 1,
                cs: y.stride,
            };
            let c = &mut out[r0 * seq..];
            let kernel = self.kernel;
            gemm(
                &self.pool,
                &mut self.scratch,
                kernel,
                r1 - r0,
                r1,
                dim,
                a,
                b,
                c,
                seq,
                false,
            );
        }
    }

    /// `p = softmax(q·kᵀ / √D)` causally (zero above the diagonal), with each row's
    /// log-sum-exp in `self.lse`, or, given `lse`, `p = e^(q·kᵀ/√D − lse)` (the backward's
    /// recomputation).
    fn probabilities_from_scores(&mut self, q: Head, k: Head, lse: Option<&[f32]>) {
        let seq = self.s.seq;
        let scale = 1.0 / (self.s.head_dim as f32).sqrt();
        let isa = self.isa;
        let mut p = std::mem::take(&mut self.p);
        self.lower_scores(q, k, &mut p);
        for t in 0..seq {
            let row = &mut p[t * seq..(t + 1) * seq];
            row[..=t].iter_mut().for_each(|x| *x *= scale);
            self.lse[t] = match lse {
                Some(l) => {
                    crate::xent::exp_scaled_in_place(isa, &mut row[..=t], l[t], 1.0);
                    l[t]
                }
                None => crate::xent::softmax_in_place(isa, &mut row[..=t]),
            };
            row[t + 1..].fill(0.0);
        }
        self.p = p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Longer than several blocks (with a ragged last one), with GQA: against the reference
    /// kernels in f64. The conformance table's sequences fit in one block.
    #[test]
    fn blocked_causal_products_match_the_reference_across_blocks() {
        let s = AttentionShape {
            batch: 2,
            seq: 2 * BLOCK + 23,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let mut state = 3u32;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let (nq, nkv) = (
            s.batch * s.seq * s.heads * s.head_dim,
            s.batch * s.seq * s.kv_heads * s.head_dim,
        );
        let (q, k, v, dout) = (rand(nq), rand(nkv), rand(nkv), rand(nq));
        let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (q64, k64, v64, d64) = (wide(&q), wide(&k), wide(&v), wide(&dout));
        let mut want_out = vec![0.0; nq];
        let mut probs = vec![0.0; s.batch * s.heads * s.seq * s.seq];
        kiln_reference::attention::attention_forward(
            &mut want_out,
            &mut probs,
            &q64,
            &k64,
            &v64,
            s,
        );
        let (mut wdq, mut wdk, mut wdv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        kiln_reference::attention::attention_backward(
            &mut wdq, &mut wdk, &mut wdv, &d64, &q64, &k64, &v64, &probs, s,
        );
        for isa in [Isa::Avx2, Isa::Avx512] {
            if kiln_core::cpu::features().missing(isa).is_some() {
                continue;
            }
            let pool = ThreadPool::new(2);
            let (mut out, mut lse) = (vec![0f32; nq], vec![0f32; saved_len(s)]);
            let tier = (isa, Microkernel::for_isa(isa, false));
            forward(tier, &pool, &mut out, &mut lse, &q, &k, &v, s);
            let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nkv], vec![0f32; nkv]);
            backward(
                tier,
                &pool,
                (&mut dq, &mut dk, &mut dv),
                &dout,
                &q,
                &k,
                &v,
                &lse,
                s,
            );
            // f32 sums over up to 151 keys of products below 1: within 1e-5 + 1e-4·|ref|.
            for (what, got, want) in [
                ("out", &out, &want_out),
                ("dq", &dq, &wdq),
                ("dk", &dk, &wdk),
                ("dv", &dv, &wdv),
            ] {
                for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                        "{isa} {what}[{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
