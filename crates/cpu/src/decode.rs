//! One decoding step's attention against the KV cache (the reference backend's
//! `attention::attention_decode` is the formula): for the newest position, each query head's
//! scores against the first `len` cached keys, scaled by `1/√D`, softmax, and the weighted sum
//! of the cached values. One task per (batch, kv head) takes every query head of its group, so
//! each cached key and value row is read once for the whole group (GQA). Accumulation rule:
//! the output is overwritten.
//!
//! Layouts as the trait: `q, out (B, H·D)`, `k_cache, v_cache (B, capacity, Hkv·D)`.

use kiln_core::backend::DecodeShape;
use kiln_core::cpu::Isa;

use crate::pool::ThreadPool;
use crate::shared::SharedMut;
use crate::simd::dot;
use crate::xent;

thread_local! {
    /// Each thread's scores for its task, reused: decoding allocates nothing per token.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out (B, H·D)` for the newest position (see the module docs).
pub fn decode(
    isa: Isa,
    pool: &ThreadPool,
    out: &mut [f32],
    q: &[f32],
    (k_cache, v_cache): (&[f32], &[f32]),
    s: DecodeShape,
) {
    let (dim, group) = (s.head_dim, s.heads / s.kv_heads);
    let kv_row = s.kv_heads * dim;
    assert!(s.len >= 1 && s.len <= s.capacity, "attention decode: len");
    assert_eq!(q.len(), s.batch * s.heads * dim, "attention decode: q");
    assert_eq!(out.len(), q.len(), "attention decode: out");
    assert!(
        k_cache.len() == s.batch * s.capacity * kv_row && v_cache.len() == k_cache.len(),
        "attention decode: cache"
    );
    let o = SharedMut::new(out);
    pool.run(s.batch * s.kv_heads, &|task| {
        let (b, kvh) = (task / s.kv_heads, task % s.kv_heads);
        // The group's query heads are contiguous in q and out.
        let at = (b * s.heads + kvh * group) * dim;
        // SAFETY: this group's heads of `out` are this task's alone.
        let out = unsafe { o.slice(at, group * dim) };
        let cache = b * s.capacity * kv_row + kvh * dim;
        let (keys, values) = (&k_cache[cache..], &v_cache[cache..]);
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.resize(group * s.len, 0.0);
            let scale = 1.0 / (dim as f32).sqrt();
            let shape = (s.len, kv_row, dim, scale);
            group_scores(isa, &mut scores, &q[at..at + group * dim], keys, shape);
            for row in scores.chunks_exact_mut(s.len) {
                let (max, sum) = xent::max_and_sum(isa, row);
                xent::exp_scaled_in_place(isa, row, max, 1.0 / sum);
            }
            group_values(isa, out, &scores, values, (s.len, kv_row, dim));
        });
    });
}

tiered!(
    /// `scores[g][u] = q_g · k_u · scale` for the group's heads and the cache's first `len`
    /// rows (`keys` starts at the kv head's first row, rows `kv_row` apart).
    fn group_scores(
        scores: &mut [f32],
        qs: &[f32],
        keys: &[f32],
        shape: (usize, usize, usize, f32),
    ) {
        let (len, kv_row, dim, scale) = shape;
        for u in 0..len {
            let k = &keys[u * kv_row..u * kv_row + dim];
            for (g, q) in qs.chunks_exact(dim).enumerate() {
                scores[g * len + u] = dot(q, k) * scale;
            }
        }
    }
);

tiered!(
    /// `out_g = Σ_u p[g][u] · v_u` (overwritten).
    fn group_values(out: &mut [f32], probs: &[f32], values: &[f32], shape: (usize, usize, usize)) {
        let (len, kv_row, dim) = shape;
        out.fill(0.0);
        for u in 0..len {
            let v = &values[u * kv_row..u * kv_row + dim];
            for (g, o) in out.chunks_exact_mut(dim).enumerate() {
                let p = probs[g * len + u];
                o.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
            }
        }
    }
);
