//! The classifier fused with the softmax cross-entropy, a vocabulary chunk at a time: neither
//! the `(rows, vocab)` logits' gradient nor, if asked, the logits themselves are ever held
//! (the reference backend's `classifier.rs` is the composition it must equal: matmul, soft
//! cap, cross-entropy).
//!
//! The pattern is the one of Liger-Kernel's fused linear cross-entropy and Apple's "Cut Your
//! Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024): the forward keeps, per
//! row and chunk, the chunk's maximum and its sum of exponentials, and combines them into the
//! log-sum-exp (the online softmax of Milakov and Gimelshein, 2018); the backward turns each
//! chunk's logits into their gradient with the saved log-sum-exp while the chunk is in cache,
//! then feeds it straight into the two products of the classifier's backward.
//!
//! What the forward keeps for the backward is the backend's choice ([`crate::Logits`]): by
//! default what it computed, chunk by chunk ([`Kept`]: without a soft cap each row's
//! exponentials against the chunk's row maximum, bf16 with bf16 products, and the maxima, so
//! the backward's gradient is a multiply; with a cap the capped logits), which the backward
//! reads back instead of recomputing; or nothing, the backward recomputing each chunk's
//! logits, so that no more than a chunk of logits per thread is ever held. Either way the logits'
//! gradient is never materialised: each chunk's is formed in cache and fed straight into
//! the two products. Keeping them measured faster at every tier (stories15m, batch 4 × 256,
//! Zen 5, runs taken in turn): AVX512-BF16 165 against 180 ms/step, AVX-512 f32 356–375
//! against 414–424, AVX2 577–597 against 654–673; peak RSS 546 against 421 MiB (PyTorch's
//! is 1,455 MiB).
//!
//! Work goes out one chunk per task. The inputs are packed once per call and shared; a task
//! packs its chunk of the weight (the logits product reads a window of the weight's packed
//! copy where there is one) and of the gradient on its own thread. The weight gradient of a
//! chunk belongs to its task alone; the input gradient is summed in one accumulator per
//! thread (a task takes whichever is free) and the accumulators are added up at the end.
//!
//! Accumulation rule: `dweight +=` (a parameter gradient), `dinp` per the call's mode, the
//! losses and log-sum-exps overwritten.

use std::sync::Mutex;

use kiln_core::backend::{Accumulate, ClassifierShape};
use kiln_core::cpu::Isa;

use crate::gemm::{multiply, multiply_window, Mat, Microkernel, Packed};
use crate::pool::ThreadPool;
use crate::shared::SharedMut;
use crate::xent;

/// The classifier weight `(vocab, dim)` as the products read it: its values, and its packed
/// copy as the logits product's B (`k = dim`, `n = vocab`) when the backend keeps one
/// (`weights.rs`, bf16), of which a chunk is a window instead of a packing.
#[derive(Clone, Copy)]
pub struct Weight<'a> {
    pub values: &'a [f32],
    pub forward: Option<&'a Packed>,
}

impl<'a> Weight<'a> {
    /// The values alone: every chunk is packed when it is used.
    pub fn unpacked(values: &'a [f32]) -> Self {
        Weight {
            values,
            forward: None,
        }
    }
}

/// Vocabulary entries per chunk for `rows` rows: a chunk's f32 logits stay near 1 MiB, between
/// 64 and 512 entries, a multiple of 32 (the panel width of the AVX-512 micro-kernels, twice
/// the AVX2 one's). Measured on stories15m's head (1024 rows, Zen 5): budgets of 256 KiB to
/// 4 MiB of logits were within 10% of each other, 1 MiB the fastest backward.
fn chunk_len(rows: usize, vocab: usize) -> usize {
    let by_cache = ((256 << 10) / rows.max(1)).clamp(64, 512) / 32 * 32;
    by_cache.min(vocab.max(1))
}

/// What the forward keeps of each chunk for the backward, when it keeps anything.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// The softmax's input `z` (the capped logits), which the soft cap's derivative reads.
    Logits,
    /// Without a cap: `e^(z − m)` against each row's maximum `m` in the chunk, in bf16 where
    /// the products are bf16, then the maxima `(rows, chunks)`. The backward's gradient is
    /// then `e · e^(m − lse) · dloss`, a multiply where it took an exponential; e ≤ 1 keeps its
    /// 8 significant bits in bf16, and the bf16 products round the gradient to bf16 anyway.
    Exps { bf16: bool },
}

impl Kept {
    fn of(kernel: Microkernel, s: ClassifierShape) -> Self {
        match s.softcap {
            Some(_) => Kept::Logits,
            None => Kept::Exps {
                bf16: kernel.is_bf16(),
            },
        }
    }

    /// f32 values the values take: `(rows, vocab)` in chunk-major blocks (chunk c's `(rows,
    /// len)` block at `rows · v0`, bf16 ones two to an f32); the maxima follow.
    fn values_len(self, s: ClassifierShape) -> usize {
        match self {
            Kept::Exps { bf16: true } => (s.rows * s.vocab).div_ceil(2),
            _ => s.rows * s.vocab,
        }
    }

    fn len(self, s: ClassifierShape, chunk: usize) -> usize {
        let maxima = match self {
            Kept::Logits => 0,
            Kept::Exps { .. } => s.rows * s.vocab.div_ceil(chunk),
        };
        self.values_len(s) + maxima
    }
}

/// f32 values the forward keeps for the backward with `Logits::Keep` (see [`Kept`]).
pub fn saved_len(kernel: Microkernel, s: ClassifierShape) -> usize {
    Kept::of(kernel, s).len(s, chunk_len(s.rows, s.vocab))
}

/// One task's workspace: a one-thread pool (the task already runs on the backend's pool),
/// its chunk's packed operands and its logits.
struct Context {
    pool: ThreadPool,
    /// The chunk of the weight as the logits product's B (`dim × chunk`).
    weight: Packed,
    /// The chunk of the weight as the input gradient's B (`chunk × dim`).
    weight_t: Packed,
    /// The chunk's logit gradients as the input gradient's A (`rows × chunk`).
    grad: Packed,
    /// Their transpose as the weight gradient's A (`chunk × rows`).
    grad_t: Packed,
    /// `(rows, chunk)` logits, then their gradient.
    logits: Vec<f32>,
    /// `(rows, chunk)` soft-capped logits (with a cap only).
    capped: Vec<f32>,
}

thread_local! {
    /// This thread's workspace, kept between calls: a step calls the classifier twice with
    /// the same shapes, and its buffers would be faulted in again every time.
    static CACHED: std::cell::RefCell<Option<Context>> = const { std::cell::RefCell::new(None) };
}

impl Context {
    fn take() -> Self {
        CACHED
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| Context {
                pool: ThreadPool::new(1),
                weight: Packed::default(),
                weight_t: Packed::default(),
                grad: Packed::default(),
                grad_t: Packed::default(),
                logits: Vec::new(),
                capped: Vec::new(),
            })
    }

    fn give_back(self) {
        CACHED.with(|c| *c.borrow_mut() = Some(self));
    }

    /// The logits of vocabulary entries `entries` for every row, soft-capped when the shape
    /// has a cap: `(rows, len)` in `self.capped` with a cap, else in `self.logits`.
    fn logits(
        &mut self,
        (isa, kernel): (Isa, Microkernel),
        inp: &Packed,
        weight: Weight,
        entries: std::ops::Range<usize>,
        s: ClassifierShape,
    ) {
        let (rows, dim) = (s.rows, s.dim);
        let (v0, len) = (entries.start, entries.len());
        grow(&mut self.logits, rows * len);
        if let Some(copy) = weight.forward {
            // SAFETY: `logits` holds rows × len values, this thread's alone.
            unsafe {
                let c = self.logits.as_mut_ptr();
                multiply_window(&self.pool, inp, copy, entries, c, len, false);
            }
            self.cap(isa, s, rows * len);
            return;
        }
        // B (k, j) = W[v0 + j, k].
        let b = Mat {
            data: &weight.values[v0 * dim..(v0 + len) * dim],
            rs: 1,
            cs: dim,
        };
        self.weight.pack_b(&self.pool, kernel, b, dim, len);
        // SAFETY: `logits` holds rows × len values, this thread's alone.
        unsafe {
            multiply(
                &self.pool,
                inp,
                &self.weight,
                self.logits.as_mut_ptr(),
                len,
                false,
            )
        };
        self.cap(isa, s, rows * len);
    }

    /// The soft cap of the first `n` logits into `self.capped`, when the shape has one.
    fn cap(&mut self, isa: Isa, s: ClassifierShape, n: usize) {
        if let Some(cap) = s.softcap {
            grow(&mut self.capped, n);
            xent::softcap(isa, &mut self.capped[..n], &self.logits[..n], cap);
        }
    }

    /// The logits the softmax reads (see [`Context::logits`]).
    fn softmax_input(&mut self, s: ClassifierShape, n: usize) -> &mut [f32] {
        if s.softcap.is_some() {
            &mut self.capped[..n]
        } else {
            &mut self.logits[..n]
        }
    }
}

fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// `inp (rows, dim)` packed as the logits product's A.
fn pack_input(pool: &ThreadPool, kernel: Microkernel, inp: &[f32], s: ClassifierShape) -> Packed {
    let mut packed = Packed::default();
    let a = Mat {
        data: inp,
        rs: s.dim,
        cs: 1,
    };
    packed.pack_a(pool, kernel, a, s.rows, s.dim);
    packed
}

fn check(s: ClassifierShape, inp: &[f32], weight: &[f32], targets: &[u32]) {
    assert_eq!(targets.len(), s.rows, "classifier: targets");
    assert_eq!(inp.len(), s.rows * s.dim, "classifier: inp");
    assert_eq!(weight.len(), s.vocab * s.dim, "classifier: weight");
    assert!(
        targets.iter().all(|&t| (t as usize) < s.vocab),
        "target out of vocabulary"
    );
}

/// `losses (rows)` and `logsumexp (rows)` (see `Backend::classifier_loss_forward`).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    isa: Isa,
    kernel: Microkernel,
    pool: &ThreadPool,
    losses: &mut [f32],
    (logsumexp, saved): (&mut [f32], Option<&mut [f32]>),
    inp: &[f32],
    weight: Weight,
    targets: &[u32],
    s: ClassifierShape,
) {
    let chunk = chunk_len(s.rows, s.vocab);
    let out = (logsumexp, saved);
    forward_in_chunks(
        isa, kernel, pool, losses, out, inp, weight, targets, s, chunk,
    )
}

/// [`forward`] with vocabulary chunks of `chunk` entries.
#[allow(clippy::too_many_arguments)]
fn forward_in_chunks(
    isa: Isa,
    kernel: Microkernel,
    pool: &ThreadPool,
    losses: &mut [f32],
    (logsumexp, saved): (&mut [f32], Option<&mut [f32]>),
    inp: &[f32],
    weight: Weight,
    targets: &[u32],
    s: ClassifierShape,
    chunk: usize,
) {
    check(s, inp, weight.values, targets);
    let rows = s.rows;
    let chunks = s.vocab.div_ceil(chunk);
    let packed = pack_input(pool, kernel, inp, s);
    // Per (row, chunk): the chunk's maximum and Σ e^(z − max); per row: its target's logit.
    let mut partial = vec![(0f32, 0f32); rows * chunks];
    let mut target_logit = vec![0f32; rows];
    let (part, tl) = (
        SharedMut::new(&mut partial),
        SharedMut::new(&mut target_logit),
    );
    let kept = Kept::of(kernel, s);
    let saved = saved.map(|v| {
        assert_eq!(v.len(), kept.len(s, chunk), "classifier: saved");
        SharedMut::new(v)
    });
    pool.run(chunks, &|c| {
        let (v0, len) = (c * chunk, chunk.min(s.vocab - c * chunk));
        let mut ctx = Context::take();
        ctx.logits((isa, kernel), &packed, weight, v0..v0 + len, s);
        let n = rows * len;
        // Without a cap, each row's exponentials are kept, with the row's maximum; with one,
        // the capped logits.
        let exps = match (saved, kept) {
            (Some(saved), Kept::Exps { bf16 }) => Some((saved, bf16)),
            _ => None,
        };
        let z = ctx.softmax_input(s, n);
        if let (Some(saved), None) = (saved, exps) {
            // Chunk-major: the chunk's `(rows, len)` block at `rows · v0`, one contiguous copy.
            // SAFETY: that block is this chunk's alone.
            unsafe { saved.slice(rows * v0, n) }.copy_from_slice(z);
        }
        for (r, row) in z.chunks_exact_mut(len).enumerate() {
            let t = targets[r] as usize;
            // SAFETY: (row, chunk) pairs are this task's alone, and so is the maximum's slot;
            // a row's target lies in one chunk, so one task writes its target logit.
            unsafe {
                if (v0..v0 + len).contains(&t) {
                    tl.set(r, row[t - v0]);
                }
                let partial = match exps {
                    Some((saved, _)) => {
                        let (max, sum) = xent::max_exp_sum_in_place(isa, row);
                        saved.set(kept.values_len(s) + r * chunks + c, max);
                        (max, sum)
                    }
                    None => xent::max_and_sum(isa, row),
                };
                part.set(r * chunks + c, partial);
            }
        }
        if let Some((saved, bf16)) = exps {
            // SAFETY: the chunk's block (at `rows · v0` values, f32 or bf16) is this task's
            // alone; bf16 is kept only for the bf16 kernels, whose tiers have AVX512-BF16.
            unsafe {
                if bf16 {
                    let values = saved.get() as *mut u16;
                    let block = std::slice::from_raw_parts_mut(values.add(rows * v0), n);
                    xent::to_bf16(block, z);
                } else {
                    saved.slice(rows * v0, n).copy_from_slice(z);
                }
            }
        }
        ctx.give_back();
    });
    for r in 0..rows {
        let parts = &partial[r * chunks..(r + 1) * chunks];
        let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.0));
        let sum: f32 = parts.iter().map(|&(m, s)| s * (m - max).exp()).sum();
        logsumexp[r] = max + sum.ln();
        losses[r] = logsumexp[r] - target_logit[r];
    }
}

/// Groups of vocabulary chunks per thread in the backward: enough that a thread whose core is
/// busy holds up little of the rest.
const GROUPS_PER_THREAD: usize = 4;

/// The groups' input-gradient buffers, kept from call to call: fresh ones would be fresh
/// pages, every one faulted in on first touch, every step.
static GROUP_SUMS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// `dinp =/+= dlogits · weight`, `dweight += dlogitsᵀ · inp` (see
/// `Backend::classifier_loss_backward`).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    kernel: Microkernel,
    pool: &ThreadPool,
    dinp: &mut [f32],
    dweight: &mut [f32],
    inp: &[f32],
    weight: Weight,
    state: (&[f32], Option<&[f32]>),
    targets: &[u32],
    s: ClassifierShape,
    dloss: f32,
    dinp_mode: Accumulate,
) {
    let chunk = chunk_len(s.rows, s.vocab);
    let (d, mode) = (dloss, dinp_mode);
    backward_in_chunks(
        isa, kernel, pool, dinp, dweight, inp, weight, state, targets, s, d, mode, chunk,
    )
}

/// [`backward`] with vocabulary chunks of `chunk` entries.
#[allow(clippy::too_many_arguments)]
fn backward_in_chunks(
    isa: Isa,
    kernel: Microkernel,
    pool: &ThreadPool,
    dinp: &mut [f32],
    dweight: &mut [f32],
    inp: &[f32],
    weight: Weight,
    (logsumexp, saved): (&[f32], Option<&[f32]>),
    targets: &[u32],
    s: ClassifierShape,
    dloss: f32,
    dinp_mode: Accumulate,
    chunk: usize,
) {
    let kept = Kept::of(kernel, s);
    if let Some(saved) = saved {
        assert_eq!(saved.len(), kept.len(s, chunk), "classifier: saved");
    }
    check(s, inp, weight.values, targets);
    assert_eq!(dinp.len(), inp.len(), "classifier: dinp");
    assert_eq!(dweight.len(), weight.values.len(), "classifier: dweight");
    let (rows, dim) = (s.rows, s.dim);
    let chunks = s.vocab.div_ceil(chunk);
    // The logits product's A, needed only to recompute.
    let packed = match saved {
        Some(_) => Packed::default(),
        None => pack_input(pool, kernel, inp, s),
    };
    // inp as the weight gradient's B (k = rows, n = dim).
    let mut packed_t = Packed::default();
    let b = Mat {
        data: inp,
        rs: dim,
        cs: 1,
    };
    packed_t.pack_b(pool, kernel, b, rows, dim);
    // The input gradient sums every chunk's share. So that the sum does not depend on which
    // thread took which chunk when (the same run twice gives the same bits), the chunks go
    // out in groups of consecutive ones (chunk c in group c · groups / chunks), each group
    // summed in chunk order into its own buffer by whichever thread takes it, and the buffers
    // added in group order.
    let groups = chunks.min(GROUPS_PER_THREAD * pool.threads());
    let sums: Vec<Mutex<Vec<f32>>> = {
        let mut spare = GROUP_SUMS.lock().unwrap_or_else(|e| e.into_inner());
        (0..groups)
            .map(|_| Mutex::new(spare.pop().unwrap_or_default()))
            .collect()
    };
    let dw = SharedMut::new(dweight);
    pool.run(groups, &|group| {
        let mut acc = sums[group].lock().unwrap_or_else(|e| e.into_inner());
        // Its first chunk overwrites every value: a kept buffer needs no clearing.
        acc.resize(rows * dim, 0.0);
        let first = group * chunks / groups;
        for c in first..(group + 1) * chunks / groups {
            let (v0, len) = (c * chunk, chunk.min(s.vocab - c * chunk));
            let mut ctx = Context::take();
            let n = rows * len;
            let chunk = Chunk { v0, len, s };
            match (saved, kept) {
                // Kept exponentials: `e · e^(m − lse) · dloss − [j = target] · dloss`.
                (Some(saved), Kept::Exps { bf16 }) => {
                    grow(&mut ctx.logits, n);
                    let maxima = &saved[kept.values_len(s)..];
                    // SAFETY: the values region holds `rows · vocab` bf16 values in its
                    // `values_len` f32 (u16 is less aligned than f32).
                    let halves = unsafe {
                        std::slice::from_raw_parts(saved.as_ptr() as *const u16, rows * s.vocab)
                    };
                    let g = &mut ctx.logits[..n];
                    for (r, gr) in g.chunks_exact_mut(len).enumerate() {
                        let factor = (maxima[r * chunks + c] - logsumexp[r]).exp() * dloss;
                        let at = rows * v0 + r * len..rows * v0 + (r + 1) * len;
                        if bf16 {
                            xent::widened_scaled(gr, &halves[at], factor);
                        } else {
                            xent::scaled(gr, &saved[at], factor);
                        }
                        subtract_target(gr, targets[r], v0, dloss);
                    }
                }
                // The gradient formed straight from the saved block (chunk-major: the chunk's
                // `(rows, len)` block at `rows · v0`), which the exp pass streams as a copy
                // would.
                (Some(saved), Kept::Logits) => {
                    grow(&mut ctx.logits, n);
                    let z = &saved[rows * v0..rows * v0 + n];
                    let g = &mut ctx.logits[..n];
                    logit_gradients(isa, g, Some(z), logsumexp, targets, chunk, dloss);
                }
                (None, _) => {
                    ctx.logits((isa, kernel), &packed, weight, v0..v0 + len, s);
                    let Context { logits, capped, .. } = &mut ctx;
                    let z = s.softcap.map(|_| &capped[..n]);
                    let g = &mut logits[..n];
                    logit_gradients(isa, g, z, logsumexp, targets, chunk, dloss);
                }
            }
            let g = &ctx.logits[..n];
            // The input gradient: A = g (rows, len), B (k, j) = W[v0 + k, j].
            let a = Mat {
                data: g,
                rs: len,
                cs: 1,
            };
            ctx.grad.pack_a(&ctx.pool, kernel, a, rows, len);
            let b = Mat {
                data: &weight.values[v0 * dim..(v0 + len) * dim],
                rs: dim,
                cs: 1,
            };
            ctx.weight_t.pack_b(&ctx.pool, kernel, b, len, dim);
            // SAFETY: the group's buffer is locked by this task; rows × dim values.
            unsafe {
                let p = acc.as_mut_ptr();
                multiply(&ctx.pool, &ctx.grad, &ctx.weight_t, p, dim, c != first);
            }
            // The weight gradient of the chunk: A (i, k) = g[k, i], B = inp.
            let a = Mat {
                data: g,
                rs: 1,
                cs: len,
            };
            ctx.grad_t.pack_a(&ctx.pool, kernel, a, len, rows);
            // SAFETY: rows v0..v0 + len of dweight are this chunk's alone.
            unsafe {
                let p = dw.slice(v0 * dim, len * dim).as_mut_ptr();
                multiply(&ctx.pool, &ctx.grad_t, &packed_t, p, dim, true);
            }
            ctx.give_back();
        }
    });
    let sums: Vec<Vec<f32>> = sums
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let out = SharedMut::new(dinp);
    const SPAN: usize = 1 << 14;
    let n = rows * dim;
    pool.run(n.div_ceil(SPAN), &|t| {
        let (start, len) = (t * SPAN, SPAN.min(n - t * SPAN));
        // SAFETY: span t of dinp is this task's alone.
        let o = unsafe { out.slice(start, len) };
        if dinp_mode == Accumulate::Overwrite {
            o.fill(0.0);
        }
        for sum in &sums {
            o.iter_mut()
                .zip(&sum[start..start + len])
                .for_each(|(o, &v)| *o += v);
        }
    });
    GROUP_SUMS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(sums);
}

/// Which vocabulary entries a chunk holds, of which head.
#[derive(Clone, Copy)]
struct Chunk {
    v0: usize,
    len: usize,
    s: ClassifierShape,
}

/// Writes the chunk's logit gradients into `g` (`(rows, len)`): `(e^(z − lse) − [j =
/// target]) · dloss`, times the soft cap's derivative `1 − (z / cap)²`, where `z` is the
/// softmax's input (the capped logits with a cap), or `g` itself when `None` (no cap).
#[allow(clippy::too_many_arguments)]
fn logit_gradients(
    isa: Isa,
    g: &mut [f32],
    z: Option<&[f32]>,
    logsumexp: &[f32],
    targets: &[u32],
    Chunk { v0, len, s }: Chunk,
    dloss: f32,
) {
    let rows = g.chunks_exact_mut(len).enumerate();
    match z {
        Some(z) => {
            for ((r, gr), zr) in rows.zip(z.chunks_exact(len)) {
                xent::exp_scaled(isa, gr, zr, logsumexp[r], dloss);
                subtract_target(gr, targets[r], v0, dloss);
                if let Some(cap) = s.softcap {
                    let inv = 1.0 / cap;
                    gr.iter_mut().zip(zr).for_each(|(g, &z)| {
                        let t = z * inv;
                        *g *= 1.0 - t * t;
                    });
                }
            }
        }
        None => {
            assert!(
                s.softcap.is_none(),
                "classifier: a soft cap needs its input"
            );
            for (r, gr) in rows {
                xent::exp_scaled_in_place(isa, gr, logsumexp[r], dloss);
                subtract_target(gr, targets[r], v0, dloss);
            }
        }
    }
}

fn subtract_target(row: &mut [f32], target: u32, v0: usize, dloss: f32) {
    let t = target as usize;
    if (v0..v0 + row.len()).contains(&t) {
        row[t - v0] -= dloss;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reference::classifier as reference;

    fn kernels() -> Vec<(Isa, Microkernel)> {
        let f = kiln_core::cpu::features();
        let mut out = Vec::new();
        for isa in [Isa::Avx2, Isa::Avx512, Isa::Avx512bf16] {
            if f.supports(isa) {
                out.push((isa, Microkernel::for_isa(isa, false)));
                if isa == Isa::Avx512bf16 {
                    out.push((isa, Microkernel::for_isa(isa, true)));
                    // The AMX tile kernel, emulated where the CPU has no AMX (`gemm/amx.rs`).
                    out.push((isa, Microkernel::AmxBf16));
                }
            }
        }
        out
    }

    /// Many chunks, the last one short, and rows across several micro-kernel strips: the
    /// combination of the chunks' partial sums, the groups' input-gradient buffers and the
    /// chunk offsets into the weight gradient are all exercised, against the reference
    /// composition in f64.
    #[test]
    fn chunked_loss_and_gradients_match_the_f64_reference() {
        let pool = ThreadPool::new(2);
        let mut state = 7u32;
        let mut rand = |len: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0 * scale
                })
                .collect()
        };
        let (rows, dim, vocab, chunk) = (37, 40, 203, 32);
        let x = rand(rows * dim, 1.0);
        let w = rand(vocab * dim, 0.5);
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 53 + 11) % vocab) as u32).collect();
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (x64, w64) = (f64s(&x), f64s(&w));
        let dloss = 1.0 / rows as f32;
        let start_dx = rand(rows * dim, 1.0);
        let start_dw = rand(vocab * dim, 1.0);
        for softcap in [None, Some(3.0f32)] {
            let s = ClassifierShape {
                rows,
                dim,
                vocab,
                softcap,
            };
            let cap = softcap.map(f64::from);
            let (mut want_loss, mut want_lse) = (vec![0.0; rows], vec![0.0; rows]);
            reference::classifier_loss_forward(
                &mut want_loss,
                &mut want_lse,
                &x64,
                &w64,
                &targets,
                dim,
                vocab,
                cap,
            );
            let lse32: Vec<f32> = want_lse.iter().map(|&v| v as f32).collect();
            let lse64 = f64s(&lse32);
            let (mut want_dx, mut want_dw) = (f64s(&start_dx), f64s(&start_dw));
            reference::classifier_loss_backward(
                &mut want_dx,
                &mut want_dw,
                &x64,
                &w64,
                &lse64,
                &targets,
                dim,
                vocab,
                cap,
                dloss as f64,
                Accumulate::Add,
            );
            for (isa, kernel) in kernels() {
                // f32: sums of 40-term products in another order, a few ulps; bf16: each
                // logit within 2⁻⁸·Σ|x·w| ≈ 2⁻⁸·5 of exact (see the backend's tolerance).
                let (atol, rtol) = if kernel.is_bf16() {
                    (3e-2, 1e-2)
                } else {
                    (2e-5, 1e-4)
                };
                let close = |what: &str, got: &[f32], want: &[f64]| {
                    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= atol + rtol * w.abs(),
                            "{kernel:?} cap {softcap:?} {what}[{i}]: {g} vs {w}"
                        );
                    }
                };
                // The weight packed whole, as the backend keeps it: each chunk is then a
                // window of it.
                let mut fwd = Packed::default();
                let b = Mat {
                    data: &w,
                    rs: 1,
                    cs: dim,
                };
                fwd.pack_b(&pool, kernel, b, dim, vocab);
                let packed = Weight {
                    values: &w,
                    forward: Some(&fwd),
                };
                // Recomputing the logits from the weight (packed per chunk or a window of
                // its copy), or reading the forward's saved logits.
                for (weight, keep) in [
                    (Weight::unpacked(&w), false),
                    (packed, false),
                    (Weight::unpacked(&w), true),
                ] {
                    let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
                    let kept = Kept::of(kernel, s).len(s, chunk);
                    let mut saved = vec![f32::NAN; if keep { kept } else { 0 }];
                    let out = (&mut lse[..], keep.then_some(&mut saved[..]));
                    forward_in_chunks(
                        isa, kernel, &pool, &mut loss, out, &x, weight, &targets, s, chunk,
                    );
                    close("loss", &loss, &want_loss);
                    close("logsumexp", &lse, &want_lse);
                    let (mut dx, mut dw) = (start_dx.clone(), start_dw.clone());
                    let (dxr, dwr, t) = (&mut dx, &mut dw, &targets);
                    let (mode, state) = (Accumulate::Add, (&lse32[..], keep.then_some(&saved[..])));
                    backward_in_chunks(
                        isa, kernel, &pool, dxr, dwr, &x, weight, state, t, s, dloss, mode, chunk,
                    );
                    close("dinp", &dx, &want_dx);
                    close("dweight", &dw, &want_dw);
                    // The gradients' own part (what was added to the start), whose size the
                    // start's hides from the element-wise bounds: its normalized squared error.
                    // bf16 rounds x, w and the logits' gradient (and kept exponentials) to 8
                    // significant bits, each a relative 2⁻⁹, so about 4 · (2⁻⁹)² ≈ 1.5e-5
                    // (measured at most 4.5e-6; bound 1e-4); f32 differs by summation order
                    // (bound 1e-9).
                    let bound = if kernel.is_bf16() { 1e-4 } else { 1e-9 };
                    for (what, got, want, start) in [
                        ("dinp", &dx, &want_dx, &start_dx),
                        ("dweight", &dw, &want_dw, &start_dw),
                    ] {
                        let (mut err, mut norm) = (0.0, 0.0);
                        for ((&g, &w), &s0) in got.iter().zip(want.iter()).zip(start.iter()) {
                            let (g, w) = (g as f64 - s0 as f64, w - s0 as f64);
                            err += (g - w) * (g - w);
                            norm += w * w;
                        }
                        let nmse = err / norm;
                        assert!(
                            nmse <= bound,
                            "{kernel:?} cap {softcap:?} keep {keep} {what}: NMSE {nmse:.2e}"
                        );
                    }
                }
            }
        }
    }

    /// The backward gives the same bits every time on the same pool, however its threads'
    /// timing falls: forty chunks over two threads, twelve times. (The per-thread
    /// accumulators this replaced summed the chunks in the order the threads happened to
    /// take them, and two training runs from one seed drifted apart from the first step.)
    #[test]
    fn the_backward_is_the_same_every_time() {
        let pool = ThreadPool::new(2);
        let (rows, dim, vocab, chunk) = (96, 64, 40 * 32, 32);
        let wave = |len: usize, k: usize| -> Vec<f32> {
            (0..len).map(|i| (i * k % 97) as f32 / 97.0 - 0.5).collect()
        };
        let (x, w) = (wave(rows * dim, 31), wave(vocab * dim, 17));
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 53 + 11) % vocab) as u32).collect();
        let s = ClassifierShape {
            rows,
            dim,
            vocab,
            softcap: None,
        };
        let (isa, kernel) = kernels()[0];
        let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
        let weight = Weight::unpacked(&w);
        let out = (&mut lse[..], None);
        forward_in_chunks(
            isa, kernel, &pool, &mut loss, out, &x, weight, &targets, s, chunk,
        );
        let run = || {
            let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; vocab * dim]);
            let (state, t, mode) = ((&lse[..], None), &targets, Accumulate::Overwrite);
            let d = 1.0 / rows as f32;
            backward_in_chunks(
                isa, kernel, &pool, &mut dx, &mut dw, &x, weight, state, t, s, d, mode, chunk,
            );
            (dx, dw)
        };
        let first = run();
        for time in 1..12 {
            assert!(run() == first, "run {time} differs from the first");
        }
    }
}
