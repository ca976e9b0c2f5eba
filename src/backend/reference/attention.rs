//! Causal softmax attention with grouped-query heads, the plain way: the forward saves the
//! probability matrix `(B, H, T, T)` for the backward. Fast backends recompute it instead
//! (flash-style); this one is the yardstick, so it spells every sum out.
//!
//! Layouts: `q (B, T, H·D)`, `k, v (B, T, Hkv·D)`, `out (B, T, H·D)`; query head `h` reads kv
//! head `h / (H / Hkv)`.

use rayon::prelude::*;

use super::Real;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Index of element `d` of query head `h` at (b, t).
    fn q_at(&self, b: usize, t: usize, h: usize, d: usize) -> usize {
        ((b * self.seq + t) * self.heads + h) * self.head_dim + d
    }
    fn kv_at(&self, b: usize, t: usize, h: usize, d: usize) -> usize {
        ((b * self.seq + t) * self.kv_heads + h) * self.head_dim + d
    }
}

pub fn attention_forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttentionShape,
) {
    let (seq, dim) = (s.seq, s.head_dim);
    let scale = T::one() / T::from_usize(dim).unwrap().sqrt();
    assert_eq!(probs.len(), s.batch * s.heads * seq * seq);
    // One task per (b, h): its probabilities are a contiguous (T, T) block; its output rows are
    // gathered per task and scattered afterwards.
    let outputs: Vec<Vec<T>> = probs
        .par_chunks_mut(seq * seq)
        .enumerate()
        .map(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let kvh = h / s.group();
            let mut o = vec![T::zero(); seq * dim];
            for t in 0..seq {
                let row = &mut p[t * seq..(t + 1) * seq];
                let mut max = T::neg_infinity();
                for (u, score) in row.iter_mut().enumerate().take(t + 1) {
                    let mut dot = T::zero();
                    for d in 0..dim {
                        dot += q[s.q_at(b, t, h, d)] * k[s.kv_at(b, u, kvh, d)];
                    }
                    *score = dot * scale;
                    max = max.max(*score);
                }
                let mut sum = T::zero();
                for score in row.iter_mut().take(t + 1) {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                for (u, score) in row.iter_mut().enumerate() {
                    if u <= t {
                        *score = *score / sum;
                        for d in 0..dim {
                            o[t * dim + d] += *score * v[s.kv_at(b, u, kvh, d)];
                        }
                    } else {
                        *score = T::zero();
                    }
                }
            }
            o
        })
        .collect();
    for (bh, o) in outputs.iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for t in 0..seq {
            let at = s.q_at(b, t, h, 0);
            out[at..at + dim].copy_from_slice(&o[t * dim..(t + 1) * dim]);
        }
    }
}

/// With `P` the saved probabilities: `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ∘ (dP − rowsum(P ∘ dP))`, `dQ = scale · dS K`, `dK = scale · dSᵀ Q`.
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
    let grads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / s.kv_heads, bk % s.kv_heads);
            let mut dq_local = vec![T::zero(); s.group() * seq * dim];
            let mut dk_local = vec![T::zero(); seq * dim];
            let mut dv_local = vec![T::zero(); seq * dim];
            let mut dp = vec![T::zero(); seq];
            for g in 0..s.group() {
                let h = kvh * s.group() + g;
                let p = &probs[(b * s.heads + h) * seq * seq..][..seq * seq];
                for t in 0..seq {
                    let prow = &p[t * seq..(t + 1) * seq];
                    let mut weighted = T::zero();
                    for u in 0..=t {
                        let mut dot = T::zero();
                        for d in 0..dim {
                            let go = dout[s.q_at(b, t, h, d)];
                            dot += go * v[s.kv_at(b, u, kvh, d)];
                            dv_local[u * dim + d] += prow[u] * go;
                        }
                        dp[u] = dot;
                        weighted += prow[u] * dot;
                    }
                    for u in 0..=t {
                        let ds = prow[u] * (dp[u] - weighted) * scale;
                        for d in 0..dim {
                            dq_local[(g * seq + t) * dim + d] += ds * k[s.kv_at(b, u, kvh, d)];
                            dk_local[u * dim + d] += ds * q[s.q_at(b, t, h, d)];
                        }
                    }
                }
            }
            (dq_local, dk_local, dv_local)
        })
        .collect();
    for (bk, (dq_local, dk_local, dv_local)) in grads.iter().enumerate() {
        let (b, kvh) = (bk / s.kv_heads, bk % s.kv_heads);
        for t in 0..seq {
            let at = s.kv_at(b, t, kvh, 0);
            dk[at..at + dim].copy_from_slice(&dk_local[t * dim..(t + 1) * dim]);
            dv[at..at + dim].copy_from_slice(&dv_local[t * dim..(t + 1) * dim]);
            for g in 0..s.group() {
                let at = s.q_at(b, t, kvh * s.group() + g, 0);
                dq[at..at + dim].copy_from_slice(&dq_local[(g * seq + t) * dim..][..dim]);
            }
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
