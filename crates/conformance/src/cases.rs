//! The table of kernel cases: every method of the backend trait at one set of sizes, with its
//! inputs, how to call it on a backend, and what the reference kernels say it must produce
//! (computed in f64). The conformance suite runs it at small, awkward sizes against a
//! tolerance; `kiln bench kernels` runs the very same table at a model's sizes and times it
//! (llm.c's `dev/cuda` pattern: validate, then benchmark, from the same case).
//!
//! Each case names its buffers in call order. Outputs that accumulate (`+=`) start from
//! random values, so a backend that overwrites instead fails.

use kiln_core::backend::{
    Accumulate, AdamWStep, AttentionShape, Backend, ClassifierShape, DecodeShape, FakeQuant,
    Kernel, MatmulShape, MatrixShape, MuonStep, NormShape, Qkv, RopeShape, ScaleShape, ShapeHint,
    View,
};
use kiln_core::config::ModelConfig;
use kiln_core::quant::{self, Scheme};
use kiln_reference::{
    activation, adamw, attention, classifier, embed, matmul, muon, rmsnorm, rope, scale, swiglu,
    xent,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use Accumulate::{Add, Overwrite};

/// The sizes one table is built at.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Values per optimizer case (AdamW, EMA, the sum of squares).
    pub params: usize,
    pub rope_theta: f32,
}

impl Dims {
    /// The conformance sizes: small, odd and unaligned (7 query rows of 9, GQA 4 over 2, a
    /// vocabulary of 19), so a backend that only handles tile multiples fails.
    pub fn conformance() -> Self {
        Dims {
            batch: 2,
            seq: 9,
            dim: 12,
            hidden: 13,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            vocab: 19,
            params: 301,
            // A large base, as Qwen3 uses.
            rope_theta: 1e6,
        }
    }

    /// A model's sizes at (batch, seq), for the benchmark.
    pub fn of_model(config: &ModelConfig, batch: usize, seq: usize) -> Self {
        Dims {
            batch,
            seq,
            dim: config.dim,
            hidden: config.hidden_dim,
            heads: config.n_heads,
            kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
            params: kiln_core::layout::parameter_count(config),
            rope_theta: config.rope_theta as f32,
        }
    }

    fn rows(&self) -> usize {
        self.batch * self.seq
    }

    fn attention(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            seq: self.seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// What a case's work is counted in, for the benchmark's rate.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    Flops(f64),
    /// Bytes read plus written (memory-bound kernels).
    Bytes(f64),
}

/// How a buffer takes part in the call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    /// Read only; random values of this magnitude.
    Input(f64),
    /// Written by the call; starts from random values of this magnitude (so `+=` and `=`
    /// differ) and is compared with the reference.
    Output(f64),
    /// The backend's own saved state for an attention or classifier backward: its length is
    /// the backend's (`attention_saved_len`, `classifier_saved_len`); filled by the case's
    /// untimed preparation (or the forward itself), never compared.
    Saved,
    /// The forward output a preparation step writes, never compared.
    Scratch,
}

/// One buffer of a case.
#[derive(Clone, Debug)]
pub struct Buffer {
    pub name: &'static str,
    pub len: usize,
    pub role: Role,
}

/// Which trait method a case calls, with its shape.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    MatmulForward(MatmulShape),
    MatmulBackward(MatmulShape, Accumulate),
    EmbeddingForward {
        dim: usize,
    },
    EmbeddingBackward {
        dim: usize,
    },
    RmsNormForward(NormShape),
    RmsNormBackward(NormShape, Accumulate),
    RopeForward(RopeShape),
    RopeBackward(RopeShape),
    AttentionForward(AttentionShape),
    AttentionBackward(AttentionShape),
    AttentionDecode(DecodeShape),
    SwiGluForward,
    SwiGluBackward,
    XsaForward(AttentionShape),
    XsaBackward(AttentionShape),
    GateForward {
        dim: usize,
        scale: f32,
    },
    GateBackward {
        dim: usize,
        scale: f32,
    },
    Relu2Forward {
        slope: f32,
    },
    Relu2Backward {
        slope: f32,
    },
    SoftcapForward {
        cap: f32,
    },
    SoftcapBackward {
        cap: f32,
    },
    ScaleForward(ScaleShape, Accumulate),
    ScaleBackward(ScaleShape, Accumulate),
    Residual,
    Accumulate,
    CrossEntropyForward {
        vocab: usize,
    },
    CrossEntropyBackward {
        vocab: usize,
        dloss: f32,
    },
    /// With a rotation block: quantized in the block Hadamard rotation, rotated back.
    FakeQuant(FakeQuant, Option<usize>),
    ClassifierLossForward(ClassifierShape),
    ClassifierLossBackward(ClassifierShape, f32, Accumulate),
    SumSquares,
    AdamW(AdamWStep),
    Ema {
        decay: f32,
    },
    Muon(MatrixShape, MuonStep),
}

/// One kernel call at one shape.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub kernel: Kernel,
    pub op: Op,
    pub buffers: Vec<Buffer>,
    /// Token ids (embedding) or targets (cross-entropy).
    pub ids: Vec<u32>,
    pub work: Work,
    /// Whether `kiln bench kernels` times it (variants that only exercise another mode are
    /// checked, not timed).
    pub bench: bool,
    /// A factor on the backend's tolerance for this case, and why.
    pub tolerance_factor: Option<(f64, &'static str)>,
}

fn buf(name: &'static str, len: usize, role: Role) -> Buffer {
    Buffer { name, len, role }
}

fn input(name: &'static str, len: usize) -> Buffer {
    buf(name, len, Role::Input(1.0))
}

fn output(name: &'static str, len: usize) -> Buffer {
    buf(name, len, Role::Output(1.0))
}

impl Case {
    fn new(name: String, kernel: Kernel, op: Op, buffers: Vec<Buffer>, work: Work) -> Self {
        Case {
            name,
            kernel,
            op,
            buffers,
            ids: Vec::new(),
            work,
            bench: true,
            tolerance_factor: None,
        }
    }

    fn variant(mut self) -> Self {
        self.bench = false;
        self
    }

    fn ids(mut self, ids: Vec<u32>) -> Self {
        self.ids = ids;
        self
    }

    /// The shape facts a backend sees in [`Backend::supports`] for this case.
    pub fn hint(&self) -> ShapeHint {
        let first = self.buffers.first().map_or(0, |b| b.len);
        match self.op {
            Op::MatmulForward(s) | Op::MatmulBackward(s, _) => ShapeHint {
                rows: s.rows,
                cols: s.in_dim,
                ..Default::default()
            },
            Op::AttentionForward(s) | Op::AttentionBackward(s) => ShapeHint {
                rows: s.batch * s.seq,
                head_dim: s.head_dim,
                seq_len: s.seq,
                ..Default::default()
            },
            Op::AttentionDecode(s) => ShapeHint {
                rows: s.batch,
                head_dim: s.head_dim,
                seq_len: s.len,
                ..Default::default()
            },
            Op::Muon(s, _) => ShapeHint {
                rows: s.rows,
                cols: s.cols,
                ..Default::default()
            },
            _ => ShapeHint {
                rows: first,
                ..Default::default()
            },
        }
    }

    /// Each buffer's length on `backend` (a saved-state buffer's is the backend's to say).
    pub fn lengths<B: Backend>(&self, backend: &B) -> Vec<usize> {
        self.buffers
            .iter()
            .map(|b| match (b.role, self.op) {
                (Role::Saved, Op::AttentionForward(s) | Op::AttentionBackward(s)) => {
                    backend.attention_saved_len(s)
                }
                (
                    Role::Saved,
                    Op::ClassifierLossForward(s) | Op::ClassifierLossBackward(s, _, _),
                ) => backend.classifier_saved_len(s),
                _ => b.len,
            })
            .collect()
    }

    /// Host values for every buffer, rounded to f32 so the f64 reference sees exactly what
    /// the backend sees; derived inputs (a saved rstd, a log-sum-exp, a capped output, a
    /// second moment) are made consistent with the others.
    pub fn inputs(&self, seed: u64) -> Vec<Vec<f64>> {
        self.inputs_with(seed, true)
    }

    /// [`Case::inputs`] for timing: the same values, but the fused classifier's log-sum-exp
    /// is left to [`Case::prepare`], which the backend computes. On the host that one is the
    /// whole classifier product in f64: 1.6·10¹² multiply-adds at stories110m's 256 × 256.
    pub fn bench_inputs(&self, seed: u64) -> Vec<Vec<f64>> {
        self.inputs_with(seed, false)
    }

    fn inputs_with(&self, seed: u64, classifier_on_host: bool) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut values: Vec<Vec<f64>> = self
            .buffers
            .iter()
            .map(|b| match b.role {
                Role::Input(scale) | Role::Output(scale) => (0..b.len)
                    .map(|_| rng.random_range(-1.0..1.0f64) * scale)
                    .map(|v| v as f32 as f64)
                    .collect(),
                Role::Saved | Role::Scratch => Vec::new(),
            })
            .collect();
        let round = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x as f32 as f64).collect() };
        match self.op {
            Op::RmsNormBackward(s, _) => {
                // [dinp, dweight, dout, inp, weight, rstd]
                let (mut out, mut rstd) = (vec![0.0; s.rows * s.dim], vec![0.0; s.rows]);
                let eps = s.eps as f64;
                rmsnorm::rmsnorm_forward(&mut out, &mut rstd, &values[3], &values[4], s.dim, eps);
                values[5] = round(rstd);
            }
            Op::CrossEntropyBackward { vocab, .. } => {
                // [dlogits, logits, logsumexp]
                let rows = values[2].len();
                let (mut losses, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
                xent::cross_entropy_forward(&mut losses, &mut lse, &values[1], &self.ids, vocab);
                values[2] = round(lse);
            }
            Op::ClassifierLossBackward(s, _, _) if classifier_on_host => {
                // [dinp, dweight, inp, weight, logsumexp]
                let (mut losses, mut lse) = (vec![0.0; s.rows], vec![0.0; s.rows]);
                let (x, w, cap) = (&values[2], &values[3], s.softcap.map(f64::from));
                classifier::classifier_loss_forward(
                    &mut losses,
                    &mut lse,
                    x,
                    w,
                    &self.ids,
                    s.dim,
                    s.vocab,
                    cap,
                );
                values[4] = round(lse);
            }
            Op::SoftcapBackward { cap } => {
                // [dinp, dout, out]: the forward's output, cap·tanh(z/cap).
                let mut out = vec![0.0; values[2].len()];
                activation::softcap_forward(&mut out, &values[2], cap as f64);
                values[2] = round(out);
            }
            Op::AdamW(_) => {
                // [params, grads, m, v]: a second moment is never negative.
                values[3]
                    .iter_mut()
                    .for_each(|v| *v = (*v * *v) as f32 as f64);
            }
            _ => {}
        }
        values
    }

    /// The reference's value of every output buffer (`None` for the others).
    pub fn expected(&self, inputs: &[Vec<f64>]) -> Vec<Option<Vec<f64>>> {
        let mut out: Vec<Option<Vec<f64>>> = vec![None; inputs.len()];
        let take = |i: usize| inputs[i].clone();
        match self.op {
            Op::MatmulForward(s) => {
                let mut o = vec![0.0; s.rows * s.out_dim];
                matmul::matmul_forward(&mut o, &inputs[0], &inputs[1], s.rows, s.in_dim, s.out_dim);
                out[2] = Some(o);
            }
            Op::MatmulBackward(s, mode) => {
                let (mut di, mut dw) = (take(0), take(1));
                let (dy, x, w) = (&inputs[2], &inputs[3], &inputs[4]);
                matmul::matmul_backward(
                    &mut di, &mut dw, dy, x, w, s.rows, s.in_dim, s.out_dim, mode,
                );
                (out[0], out[1]) = (Some(di), Some(dw));
            }
            Op::EmbeddingForward { dim } => {
                let mut o = vec![0.0; self.ids.len() * dim];
                embed::embedding_forward(&mut o, &inputs[0], &self.ids, dim);
                out[1] = Some(o);
            }
            Op::EmbeddingBackward { dim } => {
                let mut dt = take(0);
                embed::embedding_backward(&mut dt, &inputs[1], &self.ids, dim);
                out[0] = Some(dt);
            }
            Op::RmsNormForward(s) => {
                let (mut o, mut r) = (vec![0.0; s.rows * s.dim], vec![0.0; s.rows]);
                let eps = s.eps as f64;
                rmsnorm::rmsnorm_forward(&mut o, &mut r, &inputs[0], &inputs[1], s.dim, eps);
                (out[2], out[3]) = (Some(o), Some(r));
            }
            Op::RmsNormBackward(s, mode) => {
                let (mut di, mut dw) = (take(0), take(1));
                let (dy, x, w, r) = (&inputs[2], &inputs[3], &inputs[4], &inputs[5]);
                rmsnorm::rmsnorm_backward(&mut di, &mut dw, dy, x, w, r, s.dim, mode);
                (out[0], out[1]) = (Some(di), Some(dw));
            }
            Op::RopeForward(s) => {
                let mut o = vec![0.0; inputs[0].len()];
                let (seq, theta) = (s.seq, s.theta as f64);
                let (heads, hd, rot) = (s.heads, s.head_dim, s.rot_dims);
                rope::rope_forward(&mut o, &inputs[0], s.start_pos, seq, heads, hd, rot, theta);
                out[1] = Some(o);
            }
            Op::RopeBackward(s) => {
                let mut d = vec![0.0; inputs[0].len()];
                let theta = s.theta as f64;
                rope::rope_backward(
                    &mut d, &inputs[0], s.seq, s.heads, s.head_dim, s.rot_dims, theta,
                );
                out[1] = Some(d);
            }
            Op::AttentionForward(s) => {
                let (o, _) = reference_attention(inputs, s);
                out[3] = Some(o);
            }
            Op::AttentionBackward(s) => {
                // [q, k, v, dout, out (scratch), saved, dq, dk, dv]
                let (_, probs) = reference_attention(inputs, s);
                let (mut dq, mut dk, mut dv) = (take(6), take(7), take(8));
                let (q, k, v, dy) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
                attention::attention_backward(&mut dq, &mut dk, &mut dv, dy, q, k, v, &probs, s);
                (out[6], out[7], out[8]) = (Some(dq), Some(dk), Some(dv));
            }
            Op::AttentionDecode(s) => {
                let shape = AttentionShape {
                    batch: s.batch,
                    seq: 1,
                    heads: s.heads,
                    kv_heads: s.kv_heads,
                    head_dim: s.head_dim,
                };
                let mut o = vec![0.0; inputs[0].len()];
                let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
                attention::attention_decode(&mut o, q, k, v, s.len, s.capacity, shape);
                out[3] = Some(o);
            }
            Op::SwiGluForward => {
                let mut o = vec![0.0; inputs[0].len()];
                swiglu::swiglu_forward(&mut o, &inputs[0], &inputs[1]);
                out[2] = Some(o);
            }
            Op::SwiGluBackward => {
                let (mut dg, mut du) = (take(0), take(1));
                swiglu::swiglu_backward(&mut dg, &mut du, &inputs[2], &inputs[3], &inputs[4]);
                (out[0], out[1]) = (Some(dg), Some(du));
            }
            Op::Relu2Forward { slope } => {
                let mut o = vec![0.0; inputs[0].len()];
                activation::relu2_forward(&mut o, &inputs[0], slope as f64);
                out[1] = Some(o);
            }
            Op::Relu2Backward { slope } => {
                let mut d = vec![0.0; inputs[0].len()];
                activation::relu2_backward(&mut d, &inputs[1], &inputs[2], slope as f64);
                out[0] = Some(d);
            }
            Op::XsaForward(s) => {
                let mut o = vec![0.0; inputs[0].len()];
                let dims = (s.heads, s.kv_heads, s.head_dim);
                kiln_reference::xsa::xsa_forward(&mut o, &inputs[0], &inputs[1], dims);
                out[2] = Some(o);
            }
            Op::XsaBackward(s) => {
                let (mut dy, mut dv) = (vec![0.0; inputs[3].len()], vec![0.0; inputs[4].len()]);
                let dims = (s.heads, s.kv_heads, s.head_dim);
                let (dz, y, v) = (&inputs[2], &inputs[3], &inputs[4]);
                kiln_reference::xsa::xsa_backward(&mut dy, &mut dv, dz, y, v, dims);
                (out[0], out[1]) = (Some(dy), Some(dv));
            }
            Op::GateForward { dim, scale } => {
                let mut o = vec![0.0; inputs[0].len() / dim];
                activation::gate_forward(&mut o, &inputs[0], &inputs[1], dim, scale as f64);
                out[2] = Some(o);
            }
            Op::GateBackward { dim, scale } => {
                let (mut da, mut db) = (vec![0.0; inputs[4].len()], vec![0.0; inputs[5].len()]);
                let (dout, g, a, b) = (&inputs[2], &inputs[3], &inputs[4], &inputs[5]);
                activation::gate_backward(&mut da, &mut db, dout, g, a, b, dim, scale as f64);
                (out[0], out[1]) = (Some(da), Some(db));
            }
            Op::SoftcapForward { cap } => {
                let mut o = vec![0.0; inputs[0].len()];
                activation::softcap_forward(&mut o, &inputs[0], cap as f64);
                out[1] = Some(o);
            }
            Op::SoftcapBackward { cap } => {
                let mut d = vec![0.0; inputs[0].len()];
                activation::softcap_backward(&mut d, &inputs[1], &inputs[2], cap as f64);
                out[0] = Some(d);
            }
            Op::ScaleForward(s, mode) => {
                let mut o = take(2);
                scale::scale_forward(&mut o, &inputs[0], &inputs[1], s.inner, mode);
                out[2] = Some(o);
            }
            Op::ScaleBackward(s, mode) => {
                let (mut di, mut ds) = (take(0), take(1));
                let (dy, x, sc) = (&inputs[2], &inputs[3], &inputs[4]);
                scale::scale_backward(&mut di, &mut ds, dy, x, sc, s.inner, mode);
                (out[0], out[1]) = (Some(di), Some(ds));
            }
            Op::Residual => {
                let mut o = vec![0.0; inputs[0].len()];
                swiglu::residual_forward(&mut o, &inputs[0], &inputs[1]);
                out[2] = Some(o);
            }
            Op::Accumulate => {
                let mut o = take(0);
                swiglu::accumulate(&mut o, &inputs[1]);
                out[0] = Some(o);
            }
            Op::CrossEntropyForward { vocab } => {
                let rows = self.ids.len();
                let (mut l, mut s) = (vec![0.0; rows], vec![0.0; rows]);
                xent::cross_entropy_forward(&mut l, &mut s, &inputs[0], &self.ids, vocab);
                (out[1], out[2]) = (Some(l), Some(s));
            }
            Op::CrossEntropyBackward { vocab, dloss } => {
                let mut d = vec![0.0; inputs[1].len()];
                let (z, lse) = (&inputs[1], &inputs[2]);
                xent::cross_entropy_backward(&mut d, z, lse, &self.ids, vocab, dloss as f64);
                out[0] = Some(d);
            }
            Op::ClassifierLossForward(s) => {
                let (mut l, mut lse) = (vec![0.0; s.rows], vec![0.0; s.rows]);
                let (x, w, cap) = (&inputs[0], &inputs[1], s.softcap.map(f64::from));
                classifier::classifier_loss_forward(
                    &mut l, &mut lse, x, w, &self.ids, s.dim, s.vocab, cap,
                );
                (out[2], out[3]) = (Some(l), Some(lse));
            }
            Op::ClassifierLossBackward(s, dloss, mode) => {
                let (mut di, mut dw) = (take(0), take(1));
                let (x, w, lse, cap) =
                    (&inputs[2], &inputs[3], &inputs[4], s.softcap.map(f64::from));
                let (ids, dloss) = (&self.ids, dloss as f64);
                classifier::classifier_loss_backward(
                    &mut di, &mut dw, x, w, lse, ids, s.dim, s.vocab, cap, dloss, mode,
                );
                (out[0], out[1]) = (Some(di), Some(dw));
            }
            Op::FakeQuant(q, rotation) => {
                // The export's path: rotate, quantize to codes and scales, dequantize, rotate
                // back (the packed writer's and reader's steps).
                let (scheme, cols) = match q {
                    FakeQuant::Ternary { .. } => (Scheme::Ternary, inputs[0].len()),
                    FakeQuant::Int {
                        bits,
                        percentile,
                        cols,
                    } => (Scheme::Int { bits, percentile }, cols),
                    FakeQuant::F16 => (Scheme::F16, inputs[0].len()),
                };
                let mut values: Vec<f32> = inputs[0].iter().map(|&v| v as f32).collect();
                let (n, rows) = (values.len(), values.len() / cols);
                if let Some(block) = rotation {
                    quant::hadamard_rows(&mut values, n, block);
                }
                let q = quant::quantize(scheme, &values, rows, cols).expect("a valid scheme");
                let mut back = q.dequantize();
                if let Some(block) = rotation {
                    quant::hadamard_rows(&mut back, n, block);
                }
                out[1] = Some(back.into_iter().map(f64::from).collect());
            }
            Op::SumSquares => out[1] = Some(vec![adamw::sum_squares(&inputs[0])]),
            Op::AdamW(hp) => {
                let (mut p, mut m, mut v) = (take(0), take(2), take(3));
                adamw::adamw_step(&mut p, &inputs[1], &mut m, &mut v, &hp);
                (out[0], out[2], out[3]) = (Some(p), Some(m), Some(v));
            }
            Op::Ema { decay } => {
                let mut e = take(0);
                adamw::ema_update(&mut e, &inputs[1], decay);
                out[0] = Some(e);
            }
            Op::Muon(s, hp) => {
                let (mut p, mut m) = (take(0), take(2));
                muon::muon_step(&mut p, &inputs[1], &mut m, s.rows, s.cols, &hp);
                (out[0], out[2]) = (Some(p), Some(m));
            }
        }
        out
    }

    /// Untimed work before [`Case::run`]: an attention or classifier backward needs the
    /// backend's own saved state, so its forward runs first (the classifier's also rewrites
    /// the log-sum-exps with the backend's own, which match the reference's within its
    /// tolerance).
    pub fn prepare<B: Backend>(&self, backend: &B, views: &[View<B>]) {
        if let Op::ClassifierLossBackward(s, _, _) = self.op {
            // [dinp, dweight, inp, weight, logsumexp, saved, losses (scratch)]
            let v = views;
            backend.classifier_loss_forward(v[6], v[4], v[5], v[2], v[3], &self.ids, s);
        }
        if let Op::AttentionBackward(s) = self.op {
            let inputs = Qkv {
                q: views[0],
                k: views[1],
                v: views[2],
            };
            backend.attention_forward(views[4], views[5], inputs, s);
        }
    }

    /// The call itself, on `views` (one per buffer, in order). The sum of squares, which
    /// returns a number, uploads it into its one-value output buffer.
    pub fn run<B: Backend>(&self, backend: &B, views: &[View<B>]) -> anyhow::Result<()> {
        let v = views;
        match self.op {
            Op::MatmulForward(s) => backend.matmul_forward(v[2], v[0], v[1], s),
            Op::MatmulBackward(s, mode) => {
                backend.matmul_backward(v[0], v[1], v[2], v[3], v[4], s, mode)
            }
            Op::EmbeddingForward { dim } => backend.embedding_forward(v[1], v[0], &self.ids, dim),
            Op::EmbeddingBackward { dim } => backend.embedding_backward(v[0], v[1], &self.ids, dim),
            Op::RmsNormForward(s) => backend.rmsnorm_forward(v[2], v[3], v[0], v[1], s),
            Op::RmsNormBackward(s, mode) => {
                backend.rmsnorm_backward(v[0], v[1], v[2], v[3], v[4], v[5], s, mode)
            }
            Op::RopeForward(s) => backend.rope_forward(v[1], v[0], s),
            Op::RopeBackward(s) => backend.rope_backward(v[1], v[0], s),
            Op::AttentionForward(s) => {
                let inputs = Qkv {
                    q: v[0],
                    k: v[1],
                    v: v[2],
                };
                backend.attention_forward(v[3], v[4], inputs, s)
            }
            Op::AttentionBackward(s) => {
                let inputs = Qkv {
                    q: v[0],
                    k: v[1],
                    v: v[2],
                };
                let grads = Qkv {
                    q: v[6],
                    k: v[7],
                    v: v[8],
                };
                backend.attention_backward(grads, v[3], inputs, v[5], s)
            }
            Op::AttentionDecode(s) => backend.attention_decode(v[3], v[0], v[1], v[2], s),
            Op::SwiGluForward => backend.swiglu_forward(v[2], v[0], v[1]),
            Op::SwiGluBackward => backend.swiglu_backward(v[0], v[1], v[2], v[3], v[4]),
            Op::Relu2Forward { slope } => backend.relu2_forward(v[1], v[0], slope),
            Op::Relu2Backward { slope } => backend.relu2_backward(v[0], v[1], v[2], slope),
            Op::XsaForward(s) => backend.xsa_forward(v[2], v[0], v[1], s),
            Op::XsaBackward(s) => backend.xsa_backward(v[0], v[1], v[2], v[3], v[4], s),
            Op::GateForward { dim, scale } => backend.gate_forward(v[2], v[0], v[1], dim, scale),
            Op::GateBackward { dim, scale } => {
                backend.gate_backward(v[0], v[1], v[2], v[3], v[4], v[5], dim, scale)
            }
            Op::SoftcapForward { cap } => backend.softcap_forward(v[1], v[0], cap),
            Op::SoftcapBackward { cap } => backend.softcap_backward(v[0], v[1], v[2], cap),
            Op::ScaleForward(s, mode) => backend.scale_forward(v[2], v[0], v[1], s, mode),
            Op::ScaleBackward(s, mode) => {
                backend.scale_backward(v[0], v[1], v[2], v[3], v[4], s, mode)
            }
            Op::Residual => backend.residual_forward(v[2], v[0], v[1]),
            Op::Accumulate => backend.accumulate(v[0], v[1]),
            Op::CrossEntropyForward { vocab } => {
                backend.cross_entropy_forward(v[1], v[2], v[0], &self.ids, vocab)
            }
            Op::CrossEntropyBackward { vocab, dloss } => {
                backend.cross_entropy_backward(v[0], v[1], v[2], &self.ids, vocab, dloss)
            }
            Op::ClassifierLossForward(s) => {
                backend.classifier_loss_forward(v[2], v[3], v[4], v[0], v[1], &self.ids, s)
            }
            Op::ClassifierLossBackward(s, dloss, mode) => backend.classifier_loss_backward(
                v[0],
                v[1],
                v[2],
                v[3],
                (v[4], v[5]),
                &self.ids,
                s,
                dloss,
                mode,
            ),
            Op::FakeQuant(q, rotation) => backend.fake_quantize(v[1], v[0], q, rotation),
            Op::SumSquares => {
                let sum = backend.sum_squares(v[0]);
                backend.upload(v[1], &[sum as f32])?;
            }
            Op::AdamW(hp) => backend.adamw_step(v[0], v[1], v[2], v[3], &hp),
            Op::Ema { decay } => backend.ema_update(v[0], v[1], decay),
            Op::Muon(s, hp) => backend.muon_step(v[0], v[1], v[2], s, &hp),
        }
        Ok(())
    }
}

/// The reference forward in f64: the output and the probabilities `(B, H, T, T)`.
fn reference_attention(inputs: &[Vec<f64>], s: AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![0.0; s.batch * s.seq * s.heads * s.head_dim];
    let mut probs = vec![0.0; s.batch * s.heads * s.seq * s.seq];
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    attention::attention_forward(&mut o, &mut probs, q, k, v, s);
    (o, probs)
}

/// Every trait method at `dims`: the block's matmuls and the classifier in both directions,
/// embedding, RMSNorm, RoPE (whole and partial heads), attention (GQA) with its backward and
/// its KV-cache decode, SwiGLU, (leaky) ReLU², the soft cap, broadcast scales, the residual
/// add and accumulate, cross-entropy, the sum of squares, AdamW, the EMA and Muon.
pub fn cases(d: &Dims) -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(matmul_cases(d));
    all.extend(norm_and_embedding_cases(d));
    all.extend(rope_cases(d));
    all.extend(attention_cases(d));
    all.extend(elementwise_cases(d));
    all.extend(scale_cases(d));
    all.extend(cross_entropy_cases(d));
    all.extend(classifier_loss_cases(d));
    all.extend(fake_quant_cases(d));
    all.extend(optimizer_cases(d));
    all
}

fn matmul_cases(d: &Dims) -> Vec<Case> {
    let n = d.rows();
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut all = Vec::new();
    for (name, out_dim, in_dim) in [
        ("q_proj", q, d.dim),
        ("k_proj", kv, d.dim),
        ("o_proj", d.dim, q),
        ("gate_proj", d.hidden, d.dim),
        ("down_proj", d.dim, d.hidden),
        ("classifier", d.vocab, d.dim),
    ] {
        let s = MatmulShape {
            rows: n,
            in_dim,
            out_dim,
        };
        let flops = 2.0 * (n * in_dim * out_dim) as f64;
        all.push(Case::new(
            format!("matmul {name} forward ({n}×{in_dim} · {in_dim}×{out_dim})"),
            Kernel::Matmul,
            Op::MatmulForward(s),
            vec![
                input("inp", n * in_dim),
                input("weight", out_dim * in_dim),
                output("out", n * out_dim),
            ],
            Work::Flops(flops),
        ));
        if name == "q_proj" {
            // One row, as decoding runs it (a backend may skip packing for a few rows).
            let one = MatmulShape { rows: 1, ..s };
            all.push(
                Case::new(
                    format!("matmul {name} forward (1 row)"),
                    Kernel::Matmul,
                    Op::MatmulForward(one),
                    vec![
                        input("inp", in_dim),
                        input("weight", out_dim * in_dim),
                        output("out", out_dim),
                    ],
                    Work::Flops(2.0 * (in_dim * out_dim) as f64),
                )
                .variant(),
            );
        }
        for mode in [Overwrite, Add] {
            let case = Case::new(
                format!("matmul {name} backward (dinp {mode:?})"),
                Kernel::Matmul,
                Op::MatmulBackward(s, mode),
                vec![
                    output("dinp", n * in_dim),
                    output("dweight", out_dim * in_dim),
                    input("dout", n * out_dim),
                    input("inp", n * in_dim),
                    input("weight", out_dim * in_dim),
                ],
                Work::Flops(2.0 * flops),
            );
            all.push(if mode == Add { case.variant() } else { case });
        }
    }
    all
}

fn norm_and_embedding_cases(d: &Dims) -> Vec<Case> {
    let (n, c) = (d.rows(), d.dim);
    // Every token id once, then a repeat, so the backward's accumulation is exercised.
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % d.vocab) as u32).collect();
    let s = NormShape {
        rows: n,
        dim: c,
        eps: 1e-5,
    };
    let mut all = vec![
        Case::new(
            format!("embedding forward ({n} tokens × {c})"),
            Kernel::Embedding,
            Op::EmbeddingForward { dim: c },
            vec![input("table", d.vocab * c), output("out", n * c)],
            Work::Bytes((8 * n * c) as f64),
        )
        .ids(tokens.clone()),
        Case::new(
            "embedding backward".into(),
            Kernel::Embedding,
            Op::EmbeddingBackward { dim: c },
            vec![output("dtable", d.vocab * c), input("dout", n * c)],
            Work::Bytes((12 * n * c) as f64),
        )
        .ids(tokens),
        Case::new(
            format!("rmsnorm forward ({n}×{c})"),
            Kernel::RmsNorm,
            Op::RmsNormForward(s),
            vec![
                buf("inp", n * c, Role::Input(2.0)),
                input("weight", c),
                output("out", n * c),
                output("rstd", n),
            ],
            Work::Bytes((8 * n * c) as f64),
        ),
    ];
    for mode in [Overwrite, Add] {
        let case = Case::new(
            format!("rmsnorm backward (dinp {mode:?})"),
            Kernel::RmsNorm,
            Op::RmsNormBackward(s, mode),
            vec![
                output("dinp", n * c),
                output("dweight", c),
                input("dout", n * c),
                buf("inp", n * c, Role::Input(2.0)),
                input("weight", c),
                input("rstd", n),
            ],
            Work::Bytes((16 * n * c) as f64),
        );
        all.push(if mode == Overwrite {
            case.variant()
        } else {
            case
        });
    }
    all
}

fn rope_cases(d: &Dims) -> Vec<Case> {
    let (n, q) = (d.rows(), d.heads * d.head_dim);
    let mut all = Vec::new();
    // Whole heads, and partial RoPE (half of each head rotates).
    for rot in [d.head_dim, (d.head_dim / 2).max(2) & !1] {
        let shape = |start_pos| RopeShape {
            batch: d.batch,
            seq: d.seq,
            heads: d.heads,
            head_dim: d.head_dim,
            rot_dims: rot,
            theta: d.rope_theta,
            start_pos,
        };
        let partial = rot < d.head_dim;
        let label = if partial { " partial" } else { "" };
        // The forward at a non-zero start position, as decoding with a KV cache uses.
        let fwd = Case::new(
            format!("rope{label} forward (q, {n}×{q}, rot {rot})"),
            Kernel::Rope,
            Op::RopeForward(shape(3)),
            vec![input("inp", n * q), output("out", n * q)],
            Work::Bytes((8 * n * q) as f64),
        );
        let bwd = Case::new(
            format!("rope{label} backward"),
            Kernel::Rope,
            Op::RopeBackward(shape(0)),
            vec![input("dout", n * q), output("dinp", n * q)],
            Work::Bytes((8 * n * q) as f64),
        );
        all.extend(if partial {
            [fwd.variant(), bwd.variant()]
        } else {
            [fwd, bwd]
        });
    }
    all
}

fn attention_cases(d: &Dims) -> Vec<Case> {
    let s = d.attention();
    let (n, q, kv) = (d.rows(), d.heads * d.head_dim, d.kv_heads * d.head_dim);
    // Causal: half of the T×T scores, two products (QKᵀ, PV) of 2·D FLOPs each.
    let flops = (d.batch * d.heads * d.seq * d.seq * d.head_dim * 2) as f64;
    let qkv = || vec![input("q", n * q), input("k", n * kv), input("v", n * kv)];
    let mut forward = qkv();
    forward.extend([output("out", n * q), buf("saved", 0, Role::Saved)]);
    let mut backward = qkv();
    backward.extend([
        input("dout", n * q),
        buf("out", n * q, Role::Scratch),
        buf("saved", 0, Role::Saved),
        output("dq", n * q),
        output("dk", n * kv),
        output("dv", n * kv),
    ]);
    // Decoding: the newest of `len` positions in a cache with spare capacity.
    let (len, capacity) = (d.seq, d.seq + 3);
    let decode = DecodeShape {
        batch: d.batch,
        len,
        capacity,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
    };
    let cache = d.batch * capacity * kv;
    vec![
        Case::new(
            format!(
                "attention forward (B{} H{}/{} T{} D{})",
                d.batch, d.heads, d.kv_heads, d.seq, d.head_dim
            ),
            Kernel::Attention,
            Op::AttentionForward(s),
            forward,
            Work::Flops(flops),
        ),
        Case::new(
            "attention backward".into(),
            Kernel::Attention,
            Op::AttentionBackward(s),
            backward,
            Work::Flops(2.0 * flops),
        ),
        Case::new(
            format!("attention decode (B{} at {len} of {capacity})", d.batch),
            Kernel::Attention,
            Op::AttentionDecode(decode),
            vec![
                input("q", d.batch * q),
                input("k_cache", cache),
                input("v_cache", cache),
                output("out", d.batch * q),
            ],
            Work::Bytes((8 * d.batch * len * kv) as f64),
        ),
    ]
}

fn elementwise_cases(d: &Dims) -> Vec<Case> {
    let (nf, nc, nv) = (d.rows() * d.hidden, d.rows() * d.dim, d.rows() * d.vocab);
    let mut all = vec![
        Case::new(
            format!("swiglu forward ({nf} values)"),
            Kernel::SwiGlu,
            Op::SwiGluForward,
            vec![
                buf("gate", nf, Role::Input(4.0)),
                input("up", nf),
                output("out", nf),
            ],
            Work::Bytes((12 * nf) as f64),
        ),
        Case::new(
            "swiglu backward".into(),
            Kernel::SwiGlu,
            Op::SwiGluBackward,
            vec![
                output("dgate", nf),
                output("dup", nf),
                input("dout", nf),
                buf("gate", nf, Role::Input(4.0)),
                input("up", nf),
            ],
            Work::Bytes((20 * nf) as f64),
        ),
    ];
    // Plain and leaky ReLU², on both sides of zero.
    for slope in [0.0f32, 0.5] {
        let fwd = Case::new(
            format!("relu2 forward (slope {slope}, {nf} values)"),
            Kernel::Relu2,
            Op::Relu2Forward { slope },
            vec![buf("inp", nf, Role::Input(3.0)), output("out", nf)],
            Work::Bytes((8 * nf) as f64),
        );
        let bwd = Case::new(
            format!("relu2 backward (slope {slope})"),
            Kernel::Relu2,
            Op::Relu2Backward { slope },
            vec![
                output("dinp", nf),
                input("dout", nf),
                buf("inp", nf, Role::Input(3.0)),
            ],
            Work::Bytes((12 * nf) as f64),
        );
        all.extend(if slope > 0.0 {
            [fwd.variant(), bwd.variant()]
        } else {
            [fwd, bwd]
        });
    }
    // Exclusive self attention at the cases' GQA shape (two query heads per kv head).
    let xsa = AttentionShape {
        batch: d.batch,
        seq: d.seq,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
    };
    let (nq, nkv) = (
        d.batch * d.seq * d.heads * d.head_dim,
        d.batch * d.seq * d.kv_heads * d.head_dim,
    );
    all.extend([
        Case::new(
            format!(
                "xsa forward ({} heads over {} kv heads)",
                d.heads, d.kv_heads
            ),
            Kernel::Xsa,
            Op::XsaForward(xsa),
            vec![input("y", nq), input("v", nkv), output("out", nq)],
            Work::Bytes((12 * nq) as f64),
        ),
        Case::new(
            "xsa backward".into(),
            Kernel::Xsa,
            Op::XsaBackward(xsa),
            vec![
                output("dy", nq),
                output("dv", nkv),
                input("dout", nq),
                input("y", nq),
                input("v", nkv),
            ],
            Work::Bytes((20 * nq) as f64),
        ),
    ]);
    // EngramHash's gate over rows of the model width: inputs within ±2 (rmsnormed values are
    // about ±1) and the scale 1/√C, so gates away from 0.5; the backward's `out` is any value
    // within ±1 (its formula, not the sigmoid, is under test).
    let (rows, c) = (d.batch * d.seq, d.dim);
    let scale = 1.0 / (c as f32).sqrt();
    all.extend([
        Case::new(
            format!("gate forward ({rows} rows of {c})"),
            Kernel::Gate,
            Op::GateForward { dim: c, scale },
            vec![
                buf("a", rows * c, Role::Input(2.0)),
                buf("b", rows * c, Role::Input(2.0)),
                output("out", rows),
            ],
            Work::Bytes((8 * rows * c) as f64),
        ),
        Case::new(
            "gate backward".into(),
            Kernel::Gate,
            Op::GateBackward { dim: c, scale },
            vec![
                output("da", rows * c),
                output("db", rows * c),
                input("dout", rows),
                input("out", rows),
                buf("a", rows * c, Role::Input(2.0)),
                buf("b", rows * c, Role::Input(2.0)),
            ],
            Work::Bytes((16 * rows * c) as f64),
        ),
    ]);
    // The logit soft cap, well into tanh's saturation (|z| up to 4× the cap).
    let cap = 3.0;
    all.extend([
        Case::new(
            format!("softcap forward ({nv} logits)"),
            Kernel::Softcap,
            Op::SoftcapForward { cap },
            vec![buf("inp", nv, Role::Input(12.0)), output("out", nv)],
            Work::Bytes((8 * nv) as f64),
        ),
        Case::new(
            "softcap backward".into(),
            Kernel::Softcap,
            Op::SoftcapBackward { cap },
            vec![
                output("dinp", nv),
                input("dout", nv),
                buf("out", nv, Role::Input(12.0)),
            ],
            Work::Bytes((12 * nv) as f64),
        ),
        Case::new(
            format!("residual add ({nc} values)"),
            Kernel::Residual,
            Op::Residual,
            vec![input("a", nc), input("b", nc), output("out", nc)],
            Work::Bytes((12 * nc) as f64),
        ),
        Case::new(
            "accumulate".into(),
            Kernel::Residual,
            Op::Accumulate,
            vec![output("out", nc), input("inp", nc)],
            Work::Bytes((12 * nc) as f64),
        ),
    ]);
    all
}

fn scale_cases(d: &Dims) -> Vec<Case> {
    let n = d.rows();
    let mut all = Vec::new();
    // Per channel (the golf block's branch scales), per head (the q gain), a scalar (the
    // value-residual λ); overwrite and add.
    for (label, groups, inner, mode, bench) in [
        ("per channel", d.dim, 1, Overwrite, true),
        ("per head", d.heads, d.head_dim, Add, false),
        ("scalar", 1, d.kv_heads * d.head_dim, Overwrite, false),
    ] {
        let s = ScaleShape {
            rows: n,
            groups,
            inner,
        };
        let len = n * groups * inner;
        let fwd = Case::new(
            format!("scale {label} forward ({mode:?}, {n}×{groups}×{inner})"),
            Kernel::Scale,
            Op::ScaleForward(s, mode),
            vec![
                input("inp", len),
                input("scale", groups),
                output("out", len),
            ],
            Work::Bytes((12 * len) as f64),
        );
        let bwd = Case::new(
            format!("scale {label} backward ({mode:?})"),
            Kernel::Scale,
            Op::ScaleBackward(s, mode),
            vec![
                output("dinp", len),
                output("dscale", groups),
                input("dout", len),
                input("inp", len),
                input("scale", groups),
            ],
            Work::Bytes((16 * len) as f64),
        );
        all.extend(if bench {
            [fwd, bwd]
        } else {
            [fwd.variant(), bwd.variant()]
        });
    }
    all
}

fn cross_entropy_cases(d: &Dims) -> Vec<Case> {
    let (n, v) = (d.rows(), d.vocab);
    let targets: Vec<u32> = (0..n).map(|i| ((i * 5 + 1) % v) as u32).collect();
    // Logits up to ±50: an unstabilised softmax would overflow exp in f32.
    let logits = || buf("logits", n * v, Role::Input(50.0));
    vec![
        Case::new(
            format!("cross-entropy forward ({n}×{v})"),
            Kernel::CrossEntropy,
            Op::CrossEntropyForward { vocab: v },
            vec![logits(), output("losses", n), output("logsumexp", n)],
            Work::Bytes((4 * n * v) as f64),
        )
        .ids(targets.clone()),
        Case::new(
            "cross-entropy backward".into(),
            Kernel::CrossEntropy,
            Op::CrossEntropyBackward {
                vocab: v,
                dloss: 1.0 / n as f32,
            },
            vec![output("dlogits", n * v), logits(), input("logsumexp", n)],
            Work::Bytes((8 * n * v) as f64),
        )
        .ids(targets),
    ]
}

/// The fused classifier + cross-entropy, plain and soft-capped (Gemma 2's cap of 30), its
/// backward overwriting and adding into `dinp`. Work is counted as the unfused products'
/// FLOPs (2·N·C·V forward, 4·N·C·V backward): the backward's recomputation of the logits is
/// the kernel's own cost, not work done.
fn classifier_loss_cases(d: &Dims) -> Vec<Case> {
    let (n, c, v) = (d.rows(), d.dim, d.vocab);
    let targets: Vec<u32> = (0..n).map(|i| ((i * 5 + 1) % v) as u32).collect();
    let flops = 2.0 * (n * c * v) as f64;
    let mut all = Vec::new();
    for softcap in [None, Some(30.0)] {
        let s = ClassifierShape {
            rows: n,
            dim: c,
            vocab: v,
            softcap,
        };
        let label = if softcap.is_some() {
            " soft-capped"
        } else {
            ""
        };
        // Inputs of ±3 and weights of ±1 make logits of several units, so the softmax is
        // far from uniform and a wrong log-sum-exp shows.
        let x = || buf("inp", n * c, Role::Input(3.0));
        let fwd = Case::new(
            format!("classifier loss{label} forward ({n}×{c} · {c}×{v})"),
            Kernel::ClassifierLoss,
            Op::ClassifierLossForward(s),
            vec![
                x(),
                input("weight", v * c),
                output("losses", n),
                output("logsumexp", n),
                buf("saved", 0, Role::Saved),
            ],
            Work::Flops(flops),
        )
        .ids(targets.clone());
        all.push(if softcap.is_some() {
            fwd.variant()
        } else {
            fwd
        });
        for mode in [Overwrite, Add] {
            let bwd = Case::new(
                format!("classifier loss{label} backward (dinp {mode:?})"),
                Kernel::ClassifierLoss,
                Op::ClassifierLossBackward(s, 1.0 / n as f32, mode),
                vec![
                    output("dinp", n * c),
                    output("dweight", v * c),
                    x(),
                    input("weight", v * c),
                    input("logsumexp", n),
                    buf("saved", 0, Role::Saved),
                    buf("losses", n, Role::Scratch),
                ],
                Work::Flops(2.0 * flops),
            )
            .ids(targets.clone());
            all.push(if softcap.is_none() && mode == Overwrite {
                bwd
            } else {
                bwd.variant()
            });
        }
    }
    all
}

/// Quantization's round trip on a block matrix (hidden × dim): ternary in groups of 128
/// (ragged last group), int8 and int6 per row with a clip percentile, f16.
fn fake_quant_cases(d: &Dims) -> Vec<Case> {
    let (rows, cols) = (d.hidden, d.dim);
    let n = rows * cols;
    let block = quant::hadamard_block(cols);
    let schemes = [
        ("ternary", FakeQuant::Ternary { group: 128 }, None, true),
        (
            "int8",
            FakeQuant::Int {
                bits: 8,
                percentile: 99.99,
                cols,
            },
            None,
            true,
        ),
        (
            "int6",
            FakeQuant::Int {
                bits: 6,
                percentile: 90.0,
                cols,
            },
            None,
            false,
        ),
        ("f16", FakeQuant::F16, None, false),
        (
            "ternary, Hadamard-rotated",
            FakeQuant::Ternary { group: 128 },
            block,
            false,
        ),
        (
            "int8, Hadamard-rotated",
            FakeQuant::Int {
                bits: 8,
                percentile: 99.99,
                cols,
            },
            block,
            false,
        ),
    ];
    schemes
        .into_iter()
        .map(|(name, q, rotation, bench)| {
            let case = Case::new(
                format!("fake quantize {name} ({rows}×{cols})"),
                Kernel::FakeQuant,
                Op::FakeQuant(q, rotation),
                vec![input("src", n), output("dst", n)],
                Work::Bytes((8 * n) as f64),
            );
            if bench {
                case
            } else {
                case.variant()
            }
        })
        .collect()
}

fn optimizer_cases(d: &Dims) -> Vec<Case> {
    let p = d.params;
    // The third step, so bias correction is not trivial; clipping through grad_scale.
    let adamw = AdamWStep {
        learning_rate: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.7,
    };
    let muon = MuonStep {
        learning_rate: 0.05,
        momentum: 0.9,
        nesterov: true,
        ns_steps: 5,
        row_normalize: false,
        weight_decay: 0.01,
        grad_scale: 0.5,
    };
    // A block matrix (hidden × dim): tall, so the rows/cols scaling and the transpose path run.
    let m = MatrixShape {
        rows: d.hidden,
        cols: d.dim,
    };
    let (rows, cols) = (m.rows, m.cols);
    // Newton–Schulz: 5 iterations of 2 products each, about 3 matrix products per iteration.
    let ns_flops = (muon.ns_steps * 6 * rows.min(cols) * rows.min(cols) * rows.max(cols)) as f64;
    let muon_case = |name: &str, hp: MuonStep| {
        Case::new(
            format!("{name} ({rows}×{cols} matrix)"),
            Kernel::Muon,
            Op::Muon(m, hp),
            vec![
                output("params", rows * cols),
                input("grads", rows * cols),
                output("momentum", rows * cols),
            ],
            Work::Flops(ns_flops),
        )
    };
    let muon_eq_r = MuonStep {
        row_normalize: true,
        ..muon
    };
    vec![
        Case::new(
            format!("sum of squares ({p} values)"),
            Kernel::SumSquares,
            Op::SumSquares,
            vec![input("x", p), output("sum", 1)],
            Work::Bytes((4 * p) as f64),
        ),
        Case::new(
            format!("adamw ({p} parameters)"),
            Kernel::AdamW,
            Op::AdamW(adamw),
            vec![
                output("params", p),
                input("grads", p),
                output("m", p),
                output("v", p),
            ],
            Work::Bytes((28 * p) as f64),
        ),
        Case::new(
            format!("ema ({p} parameters)"),
            Kernel::Ema,
            Op::Ema { decay: 0.99 },
            vec![output("ema", p), input("params", p)],
            Work::Bytes((12 * p) as f64),
        ),
        muon_case("muon", muon),
        muon_case("muon, rows normalized (MuonEq-R)", muon_eq_r),
    ]
}
