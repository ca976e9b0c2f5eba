//! Causal attention with grouped-query heads, flash-style: the forward saves only each row's
//! log-sum-exp (B·H·T values instead of the reference's B·H·T·T probabilities), and the
//! backward recomputes the probabilities from it (Dao et al., "FlashAttention", 2022,
//! Algorithms 1 and 2, here one query row at a time, since T ≤ a few thousand fits in cache).
//!
//! One task per (batch, kv head) takes every query head of its group, so the gradients of
//! the shared keys and values are summed by one thread. Inner loops are written as axpys
//! over contiguous rows (keys transposed per task), which the compiler vectorizes; they are
//! compiled once per tier (`multiversion`) and dispatched at run time.
//!
//! Layouts as the trait: `q, out (B, T, H·D)`, `k, v (B, T, Hkv·D)`; query head `h` reads kv
//! head `h / (H / Hkv)`; scores scaled by `1/√D`. Accumulation rule: dq, dk, dv are
//! overwritten.

use kiln_core::backend::AttentionShape;
use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;

/// Values the forward saves per call: one log-sum-exp per (batch, head, row).
pub fn saved_len(s: AttentionShape) -> usize {
    s.batch * s.heads * s.seq
}

/// A buffer that tasks write in disjoint parts.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only the rows of its own (batch, head group); `ThreadPool::run`
// returns after every task has finished.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Row `t` of head `h` of batch `b` in a `(B, T, heads·D)` tensor.
#[inline(always)]
fn at(s: AttentionShape, b: usize, t: usize, heads: usize, h: usize) -> usize {
    ((b * s.seq + t) * heads + h) * s.head_dim
}

/// Copies head `kvh` of batch `b` of `x (B, T, Hkv·D)` transposed into `xt (D, T)`.
fn transpose_head(xt: &mut [f32], x: &[f32], s: AttentionShape, b: usize, kvh: usize) {
    for t in 0..s.seq {
        let row = &x[at(s, b, t, s.kv_heads, kvh)..][..s.head_dim];
        for (d, &v) in row.iter().enumerate() {
            xt[d * s.seq + t] = v;
        }
    }
}

/// `out (B, T, H·D)` and `lse (B, H, T)` from q, k, v.
pub fn forward(
    isa: Isa,
    pool: &ThreadPool,
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    let (o_ptr, l_ptr) = (Out(out.as_mut_ptr()), Out(lse.as_mut_ptr()));
    pool.run(s.batch * s.kv_heads, &|task| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        // SAFETY: this task writes rows of its own group's query heads only.
        unsafe { dispatch_forward(isa, o_ptr, l_ptr, q, k, v, s, b, kvh) };
    });
}

/// `dq, dk, dv` from `dout`, the forward's inputs and its saved log-sum-exps.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    pool: &ThreadPool,
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    s: AttentionShape,
) {
    let ptrs = (Out(grads.0.as_mut_ptr()), Out(grads.1.as_mut_ptr()), Out(grads.2.as_mut_ptr()));
    pool.run(s.batch * s.kv_heads, &|task| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        // SAFETY: this task writes dq rows of its group's query heads and the dk, dv rows of
        // its own kv head only.
        unsafe { dispatch_backward(isa, ptrs, dout, q, k, v, lse, s, b, kvh) };
    });
}

/// Compiles `$body` (a generic function) once per tier, with that tier's target features
/// enabled so its loops vectorize to that width, and calls the one for `isa`.
macro_rules! multiversion {
    ($isa:expr, $generic:ident($($arg:expr),*)) => {{
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn avx512(f: impl FnOnce()) { f() }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(f: impl FnOnce()) { f() }
        match $isa {
            Isa::Avx2 => avx2(|| $generic($($arg),*)),
            _ => avx512(|| $generic($($arg),*)),
        }
    }};
}

#[allow(clippy::too_many_arguments)]
unsafe fn dispatch_forward(
    isa: Isa,
    out: Out,
    lse: Out,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    b: usize,
    kvh: usize,
) {
    multiversion!(isa, forward_group(isa, out, lse, q, k, v, s, b, kvh))
}

#[allow(clippy::too_many_arguments)]
unsafe fn dispatch_backward(
    isa: Isa,
    grads: (Out, Out, Out),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    s: AttentionShape,
    b: usize,
    kvh: usize,
) {
    multiversion!(isa, backward_group(isa, grads, dout, q, k, v, lse, s, b, kvh))
}

/// `row[j] = scale · Σ_d x[d] · yt[d][j]` for `j < n` (scores of one query against keys
/// stored transposed, `yt (D, T)`), 16 keys at a time in a register-sized accumulator.
#[inline(always)]
fn scores(row: &mut [f32], x: &[f32], yt: &[f32], seq: usize, n: usize, scale: f32) {
    const LANES: usize = 16;
    let mut j0 = 0;
    while j0 < n {
        let width = LANES.min(n - j0);
        let mut acc = [0f32; LANES];
        for (d, &xd) in x.iter().enumerate() {
            let col = &yt[d * seq + j0..][..width];
            if width == LANES {
                for (a, &y) in acc.iter_mut().zip(col) {
                    *a += xd * y;
                }
            } else {
                for (a, &y) in acc[..width].iter_mut().zip(col) {
                    *a += xd * y;
                }
            }
        }
        for (r, a) in row[j0..j0 + width].iter_mut().zip(acc) {
            *r = a * scale;
        }
        j0 += width;
    }
}

/// `out = Σ_j w[j] · x[row(j)..][..out.len()]`, 16 columns at a time in a register-sized
/// accumulator (so the sum over j stays in registers instead of a load and store per j).
#[inline(always)]
fn weighted_sum(out: &mut [f32], w: &[f32], x: &[f32], row: impl Fn(usize) -> usize) {
    const LANES: usize = 16;
    let dim = out.len();
    let mut c0 = 0;
    while c0 < dim {
        let width = LANES.min(dim - c0);
        let mut acc = [0f32; LANES];
        for (j, &wj) in w.iter().enumerate() {
            let xr = &x[row(j) + c0..][..width];
            if width == LANES {
                for (a, &xv) in acc.iter_mut().zip(xr) {
                    *a += wj * xv;
                }
            } else {
                for (a, &xv) in acc[..width].iter_mut().zip(xr) {
                    *a += wj * xv;
                }
            }
        }
        out[c0..c0 + width].copy_from_slice(&acc[..width]);
        c0 += width;
    }
}

/// `acc += c · x`.
#[inline(always)]
fn axpy(acc: &mut [f32], c: f32, x: &[f32]) {
    for (a, &xv) in acc.iter_mut().zip(x) {
        *a += c * xv;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group(
    isa: Isa,
    out: Out,
    lse: Out,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    b: usize,
    kvh: usize,
) {
    let (seq, dim) = (s.seq, s.head_dim);
    let scale = 1.0 / (dim as f32).sqrt();
    let mut kt = vec![0f32; dim * seq];
    transpose_head(&mut kt, k, s, b, kvh);
    let mut p = vec![0f32; seq];
    let mut o = vec![0f32; dim];
    for h in kvh * s.group()..(kvh + 1) * s.group() {
        for t in 0..seq {
            let n = t + 1;
            let qt = &q[at(s, b, t, s.heads, h)..][..dim];
            scores(&mut p, qt, &kt, seq, n, scale);
            let (max, sum) = crate::xent::max_and_sum(isa, &p[..n]);
            let row_lse = max + sum.ln();
            crate::xent::exp_scaled_in_place(isa, &mut p[..n], row_lse, 1.0);
            weighted_sum(&mut o, &p[..n], v, |j| at(s, b, j, s.kv_heads, kvh));
            // SAFETY: row t of head h belongs to this task alone.
            unsafe {
                let dst = out.get().add(at(s, b, t, s.heads, h));
                std::ptr::copy_nonoverlapping(o.as_ptr(), dst, dim);
                *lse.get().add((b * s.heads + h) * seq + t) = row_lse;
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group(
    isa: Isa,
    (dq_out, dk_out, dv_out): (Out, Out, Out),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    s: AttentionShape,
    b: usize,
    kvh: usize,
) {
    let (seq, dim) = (s.seq, s.head_dim);
    let scale = 1.0 / (dim as f32).sqrt();
    let (mut kt, mut vt) = (vec![0f32; dim * seq], vec![0f32; dim * seq]);
    transpose_head(&mut kt, k, s, b, kvh);
    transpose_head(&mut vt, v, s, b, kvh);
    // This kv head's key and value gradients, summed over the group's query heads.
    let (mut dk, mut dv) = (vec![0f32; seq * dim], vec![0f32; seq * dim]);
    let (mut p, mut dp) = (vec![0f32; seq], vec![0f32; seq]);
    let mut row = vec![0f32; dim];
    for h in kvh * s.group()..(kvh + 1) * s.group() {
        let q_row = |t: usize| at(s, b, t, s.heads, h);
        for t in 0..seq {
            let n = t + 1;
            let qt = &q[q_row(t)..][..dim];
            let dot = &dout[q_row(t)..][..dim];
            // P recomputed from the saved log-sum-exp.
            scores(&mut p, qt, &kt, seq, n, scale);
            let row_lse = lse[(b * s.heads + h) * seq + t];
            crate::xent::exp_scaled_in_place(isa, &mut p[..n], row_lse, 1.0);
            // dP = dO·Vᵀ, δ = Σ P∘dP, dS = P∘(dP − δ)·scale; dV_j += P_j·dO, dK_j += dS_j·Q.
            scores(&mut dp, dot, &vt, seq, n, 1.0);
            let delta: f32 = p[..n].iter().zip(&dp[..n]).map(|(a, b)| a * b).sum();
            for j in 0..n {
                let ds = p[j] * (dp[j] - delta) * scale;
                axpy(&mut dv[j * dim..(j + 1) * dim], p[j], dot);
                axpy(&mut dk[j * dim..(j + 1) * dim], ds, qt);
                dp[j] = ds;
            }
            weighted_sum(&mut row, &dp[..n], k, |j| at(s, b, j, s.kv_heads, kvh));
            // SAFETY: dq row t of head h belongs to this task alone.
            unsafe {
                let dst_row = dq_out.get().add(q_row(t));
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst_row, dim);
            }
        }
    }
    for t in 0..seq {
        // SAFETY: rows of kv head kvh of batch b belong to this task alone.
        unsafe {
            let at_kv = at(s, b, t, s.kv_heads, kvh);
            std::ptr::copy_nonoverlapping(dk[t * dim..].as_ptr(), dk_out.get().add(at_kv), dim);
            std::ptr::copy_nonoverlapping(dv[t * dim..].as_ptr(), dv_out.get().add(at_kv), dim);
        }
    }
}
