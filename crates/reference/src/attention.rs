//! Causal softmax attention with grouped-query heads, the plain way: per (batch, head), the
//! score, probability and output matrices are formed whole with matrix products, and the
//! forward saves the probabilities `(B, H, T, T)` for the backward. Fast backends recompute
//! them instead (flash-style); this one is the yardstick.
//!
//! Layouts: `q (B, T, H·D)`, `k, v (B, T, Hkv·D)`, `out (B, T, H·D)`; query head `h` reads kv
//! head `h / (H / Hkv)`.

use rayon::prelude::*;

pub use kiln_core::backend::AttentionShape;

use crate::Real;

/// Copies head `h` (of `heads`) of the rows of batch element `b` into a contiguous (T, D)
/// matrix.
fn gather<T: Real>(src: &[T], b: usize, h: usize, heads: usize, s: AttentionShape) -> Vec<T> {
    let (seq, dim) = (s.seq, s.head_dim);
    let mut out = Vec::with_capacity(seq * dim);
    for t in 0..seq {
        let at = ((b * seq + t) * heads + h) * dim;
        out.extend_from_slice(&src[at..at + dim]);
    }
    out
}

/// Writes a contiguous (T, D) matrix back as head `h` of batch element `b`.
fn scatter<T: Real>(dst: &mut [T], m: &[T], b: usize, h: usize, heads: usize, s: AttentionShape) {
    let (seq, dim) = (s.seq, s.head_dim);
    for t in 0..seq {
        let at = ((b * seq + t) * heads + h) * dim;
        dst[at..at + dim].copy_from_slice(&m[t * dim..(t + 1) * dim]);
    }
}

/// `S = scale · Q Kᵀ` (T, T), then a causal row softmax in place: `P`.
fn causal_softmax<T: Real>(p: &mut [T], q: &[T], k: &[T], seq: usize, dim: usize) {
    let scale = T::one() / T::from_usize(dim).unwrap().sqrt();
    // Kᵀ through strides: element (d, u) of Kᵀ is k[u * dim + d].
    T::gemm(seq, dim, seq, q, dim, 1, k, 1, dim, T::zero(), p, seq);
    for (t, row) in p.chunks_exact_mut(seq).enumerate() {
        let max = row[..=t]
            .iter()
            .fold(T::neg_infinity(), |m, &x| m.max(x * scale));
        let mut sum = T::zero();
        for x in row[..=t].iter_mut() {
            *x = (*x * scale - max).exp();
            sum += *x;
        }
        row[..=t].iter_mut().for_each(|x| *x = *x / sum);
        row[t + 1..].iter_mut().for_each(|x| *x = T::zero());
    }
}

/// Per (b, h): `P = causal_softmax(scale · Q Kᵀ)`, `O = P V`, as matrix products; `P` is saved.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttentionShape,
) {
    let (seq, dim) = (s.seq, s.head_dim);
    assert_eq!(probs.len(), s.batch * s.heads * seq * seq);
    // One task per (b, h): its probabilities are a contiguous (T, T) block; its output is
    // gathered per task and scattered afterwards.
    let outputs: Vec<Vec<T>> = probs
        .par_chunks_mut(seq * seq)
        .enumerate()
        .map(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let kvh = h / s.group();
            let (qh, kh, vh) = (
                gather(q, b, h, s.heads, s),
                gather(k, b, kvh, s.kv_heads, s),
                gather(v, b, kvh, s.kv_heads, s),
            );
            causal_softmax(p, &qh, &kh, seq, dim);
            let mut o = vec![T::zero(); seq * dim];
            T::gemm(
                seq,
                seq,
                dim,
                p,
                seq,
                1,
                &vh,
                dim,
                1,
                T::zero(),
                &mut o,
                dim,
            );
            o
        })
        .collect();
    for (bh, o) in outputs.iter().enumerate() {
        scatter(out, o, bh / s.heads, bh % s.heads, s.heads, s);
    }
}

/// With `P` the saved probabilities, per query head: `dV += Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ∘ (dP − rowsum(P ∘ dP))`, `dQ = scale · dS K`, `dK += scale · dSᵀ Q`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    s: AttentionShape,
) {
    let (seq, dim) = (s.seq, s.head_dim);
    let scale = T::one() / T::from_usize(dim).unwrap().sqrt();
    // One task per (b, kv head), so the query heads sharing a kv head add into one dK, dV.
    type Grads<T> = (Vec<Vec<T>>, Vec<T>, Vec<T>);
    let grads: Vec<Grads<T>> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / s.kv_heads, bk % s.kv_heads);
            let (kh, vh) = (
                gather(k, b, kvh, s.kv_heads, s),
                gather(v, b, kvh, s.kv_heads, s),
            );
            let mut dk_local = vec![T::zero(); seq * dim];
            let mut dv_local = vec![T::zero(); seq * dim];
            let mut dq_heads = Vec::with_capacity(s.group());
            let mut ds = vec![T::zero(); seq * seq];
            for g in 0..s.group() {
                let h = kvh * s.group() + g;
                let p = &probs[(b * s.heads + h) * seq * seq..][..seq * seq];
                let (qh, doh) = (gather(q, b, h, s.heads, s), gather(dout, b, h, s.heads, s));
                // dV += Pᵀ dO (Pᵀ through strides).
                T::gemm(
                    seq,
                    seq,
                    dim,
                    p,
                    1,
                    seq,
                    &doh,
                    dim,
                    1,
                    T::one(),
                    &mut dv_local,
                    dim,
                );
                // dP = dO Vᵀ, then dS in place.
                T::gemm(
                    seq,
                    dim,
                    seq,
                    &doh,
                    dim,
                    1,
                    &vh,
                    1,
                    dim,
                    T::zero(),
                    &mut ds,
                    seq,
                );
                for (row_ds, row_p) in ds.chunks_exact_mut(seq).zip(p.chunks_exact(seq)) {
                    let weighted = row_ds
                        .iter()
                        .zip(row_p)
                        .fold(T::zero(), |acc, (&d, &pp)| acc + d * pp);
                    for (d, &pp) in row_ds.iter_mut().zip(row_p) {
                        *d = pp * (*d - weighted) * scale;
                    }
                }
                let mut dqh = vec![T::zero(); seq * dim];
                T::gemm(
                    seq,
                    seq,
                    dim,
                    &ds,
                    seq,
                    1,
                    &kh,
                    dim,
                    1,
                    T::zero(),
                    &mut dqh,
                    dim,
                );
                T::gemm(
                    seq,
                    seq,
                    dim,
                    &ds,
                    1,
                    seq,
                    &qh,
                    dim,
                    1,
                    T::one(),
                    &mut dk_local,
                    dim,
                );
                dq_heads.push(dqh);
            }
            (dq_heads, dk_local, dv_local)
        })
        .collect();
    for (bk, (dq_heads, dk_local, dv_local)) in grads.iter().enumerate() {
        let (b, kvh) = (bk / s.kv_heads, bk % s.kv_heads);
        scatter(dk, dk_local, b, kvh, s.kv_heads, s);
        scatter(dv, dv_local, b, kvh, s.kv_heads, s);
        for (g, dqh) in dq_heads.iter().enumerate() {
            scatter(dq, dqh, b, kvh * s.group() + g, s.heads, s);
        }
    }
}

/// One decoding step: the newest query of each sequence attends over the first `len` cached
/// positions (`k_cache, v_cache (B, capacity, Hkv·D)`). Same arithmetic as one row of
/// [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Real>(
    out: &mut [T],
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    len: usize,
    capacity: usize,
    s: AttentionShape,
) {
    let dim = s.head_dim;
    let scale = T::one() / T::from_usize(dim).unwrap().sqrt();
    let kv_row = s.kv_heads * dim;
    out.par_chunks_mut(dim).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let kvh = h / s.group();
        let query = &q[bh * dim..(bh + 1) * dim];
        let at = |u: usize| (b * capacity + u) * kv_row + kvh * dim;
        let scores: Vec<T> = (0..len)
            .map(|u| {
                query
                    .iter()
                    .zip(&k_cache[at(u)..at(u) + dim])
                    .fold(T::zero(), |acc, (&a, &b)| acc + a * b)
                    * scale
            })
            .collect();
        let max = scores.iter().copied().fold(T::neg_infinity(), T::max);
        let weights: Vec<T> = scores.iter().map(|&x| (x - max).exp()).collect();
        let sum = weights.iter().copied().fold(T::zero(), |a, b| a + b);
        o.iter_mut().for_each(|x| *x = T::zero());
        for (u, &w) in weights.iter().enumerate() {
            for (x, &v) in o.iter_mut().zip(&v_cache[at(u)..at(u) + dim]) {
                *x += w / sum * v;
            }
        }
    });
}
