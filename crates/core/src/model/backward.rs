//! The backward pass: the forward's kernels in reverse, each with its backward twin.
//!
//! The accumulation rule: parameter gradients `+=` (micro-batches and a tied embedding add
//! up), activation gradients `=`, except the residual stream's gradient `d.residual`, one
//! buffer every branch adds its input gradient back into (that is the whole backward of the
//! residual add).

use super::{bigram_ids, download, engram_ids, mlp_slope, view, Activations, Model};
use crate::backend::{
    Accumulate, AttentionShape, Backend, MatmulShape, NormShape, Qkv, RopeShape, ScaleShape, View,
};
use crate::config::{Capsules, Mlp};
use crate::layout::{
    skip_source, CapsuleActivations, CapsuleParams, CapsulePass, Head, LayerActivations,
    LayerParams, Region,
};
use crate::Result;

use Accumulate::{Add, Overwrite};

/// Shape helpers for one backward call: every kernel of a step sees the same N = B·T rows.
struct Shapes {
    /// The weight of the objective (`loss_weight`): the load-balancing loss's gradient
    /// carries it too.
    loss_weight: f32,
    batch: usize,
    seq: usize,
    n: usize,
    eps: f32,
    rot_dims: usize,
    theta: f32,
    head_dim: usize,
}

impl Shapes {
    fn mm(&self, in_dim: usize, out_dim: usize) -> MatmulShape {
        MatmulShape {
            rows: self.n,
            in_dim,
            out_dim,
        }
    }

    fn norm(&self, rows: usize, dim: usize) -> NormShape {
        NormShape {
            rows,
            dim,
            eps: self.eps,
        }
    }

    fn rope(&self, heads: usize) -> RopeShape {
        RopeShape {
            batch: self.batch,
            seq: self.seq,
            heads,
            head_dim: self.head_dim,
            rot_dims: self.rot_dims,
            theta: self.theta,
            start_pos: 0,
        }
    }

    fn scale(&self, groups: usize, inner: usize) -> ScaleShape {
        ScaleShape {
            rows: self.n,
            groups,
            inner,
        }
    }
}

impl<B: Backend> Model<B> {
    /// Accumulates (`+=`) into `grads` the gradient of `loss_weight · mean loss` of the last
    /// [`Model::forward`] (which must have had targets). `loss_weight` is 1 for one micro-batch,
    /// 1/accumulation steps to average several, or the fp16 loss scale.
    pub fn backward(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: &[u32],
        loss_weight: f32,
    ) -> Result<()> {
        self.backward_dropping(acts, tokens, targets, loss_weight, &[])
    }

    /// [`Model::backward`] of a [`Model::forward_dropping`] with the same `dropped`: a dropped
    /// layer's gradient passes straight through, and its weights get none.
    pub fn backward_dropping(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: &[u32],
        loss_weight: f32,
        dropped: &[bool],
    ) -> Result<()> {
        let cfg = &self.config;
        let arch = &cfg.arch;
        let be = &self.backend;
        let a = |r: Region| view::<B>(&acts.memory, r);
        let (al, d) = (&acts.layout, &acts.layout.grads);
        crate::require!(
            al.head != Head::Last,
            Shape,
            "backward: a last-position arena (prefill) keeps no gradients"
        );
        crate::require!(
            arch.capsules
                .and_then(|k| k.koopman)
                .is_none_or(|m| m.halt.is_none()),
            Config,
            "backward: adaptive halting (arch.capsules.koopman.halt) is for evaluation; \
             it has no gradient"
        );
        crate::require!(
            arch.capsules
                .and_then(|k| k.koopman)
                .is_none_or(|m| m.carry.is_none()),
            Config,
            "backward: capsule carry (arch.capsules.koopman.carry) is for evaluation: \
             training runs each window on its own"
        );
        crate::require!(
            crate::backend::DeviceMemory::len(&self.grads) == self.layout.total_len(),
            Shape,
            "backward: an inference model (Model::for_inference) has no gradients"
        );
        let n = al.batch * al.seq;
        crate::require!(
            tokens.len() == n && targets.len() == n,
            Shape,
            "backward: {} tokens and {} targets for a {}×{} batch",
            tokens.len(),
            targets.len(),
            al.batch,
            al.seq
        );
        let mut shapes = self.shapes(acts);
        shapes.loss_weight = loss_weight;
        let encoders = crate::layout::unet_encoders(cfg);

        if arch.value_residual {
            be.zero(a(d.v_first));
        }
        if arch.resid_mix {
            be.zero(a(d.x0));
        }
        if let Some(f) = &al.feedback {
            // The passes after the first add to the skips' and the encoder output's gradients.
            for &skip in &d.skips {
                be.zero(a(skip));
            }
            be.zero(a(f.d_encoded));
        }
        self.head_backward(acts, targets, loss_weight, &shapes);
        // A block that depth recurrence runs more than once adds each run's gradient into its
        // weights' (parameter gradients are `+=`).
        for (l, (&block, s)) in self.layout.order.iter().zip(&al.layers).enumerate().rev() {
            let w = &self.layout.layers[block];
            // An encoder block's output also fed a U-Net skip: add that gradient first.
            if arch.unet_skips && l < encoders {
                let i = encoders - 1 - l;
                if i < d.skips.len() {
                    be.accumulate(a(d.residual), a(d.skips[i]));
                }
            }
            let pass = cfg.feedback_pass(l).filter(|&(p, _)| p > 0);
            if let Some((p, _)) = pass {
                self.adapter_backward(acts, l, p, &shapes);
            }
            if dropped.get(l) == Some(&true) {
                // The identity: d.residual passes through. A decoder's skip added nothing.
                if let Some((i, _)) = skip_source(cfg, l) {
                    be.zero(a(d.skips[i]));
                }
            } else {
                // d.residual holds dL/d(block output); each branch reads it and adds back.
                // Attention reads dL/d(its output) = dL/d(x_mid): after the MLP's input
                // gradient is added, unless the MLP ran beside it (a parallel residual), when
                // both read the output's gradient, kept aside.
                let dout = if cfg.parallel(l) {
                    be.copy(a(d.parallel), a(d.residual));
                    d.parallel
                } else {
                    d.residual
                };
                self.mlp_backward(acts, l, (w, s), dout, &shapes);
                self.attention_backward(acts, l, (w, s), dout, &shapes);
                self.block_input_backward(acts, l, w, s, &shapes);
            }
            // d.residual holds dL/d(the layer's input). A feedback pass's first layer read
            // the encoder's output: its gradient joins that one's, and the stream the pass
            // before left gets its gradient through the pass's sketch.
            if let Some((p, true)) = pass {
                let f = al
                    .feedback
                    .as_ref()
                    .expect("a feedback model's activations");
                be.accumulate(a(f.d_encoded), a(d.residual));
                self.sketch_backward(acts, l, p, &shapes);
            }
            if cfg
                .feedback_span()
                .is_some_and(|(encoders, ..)| encoders == l)
            {
                let f = al
                    .feedback
                    .as_ref()
                    .expect("a feedback model's activations");
                be.accumulate(a(d.residual), a(f.d_encoded));
            }
            // Through EngramHash at its layer.
            if arch.engram.is_some_and(|e| e.layer == l) {
                self.engram_backward(acts, l, tokens, &shapes);
            }
            if arch.capsules.is_some_and(|k| k.layer == l) {
                self.capsule_backward(acts, l, &shapes)?;
            }
        }
        if arch.resid_mix {
            be.accumulate(a(d.residual), a(d.x0));
        }
        if arch.embed_norm {
            let c = cfg.dim;
            be.rmsnorm_backward(
                a(d.embed),
                self.ones_sink(c),
                a(d.residual),
                a(al.embed),
                self.ones(c),
                a(al.rstd_embed),
                shapes.norm(shapes.n, c),
                Overwrite,
            );
        }
        let g = |r: Region| view::<B>(&self.grads, r);
        be.embedding_backward(g(self.layout.embedding), a(d.embed), tokens, cfg.dim);
        if let Some(table) = self.layout.bigram {
            let ids = bigram_ids(tokens, shapes.seq, &[], arch.bigram_buckets);
            be.embedding_backward(g(table), a(d.embed), &ids, cfg.dim);
        }
        Ok(())
    }

    fn shapes(&self, acts: &Activations<B>) -> Shapes {
        let (batch, seq) = (acts.layout.batch, acts.layout.seq);
        Shapes {
            loss_weight: 1.0,
            batch,
            seq,
            n: batch * seq,
            eps: self.config.norm_eps as f32,
            rot_dims: self.config.rope_dims(),
            theta: self.config.rope_theta as f32,
            head_dim: self.config.head_dim,
        }
    }

    /// The gain of an RMSNorm (ones when weightless) and where its gradient goes.
    fn gain_and_grad(&self, r: Option<Region>, len: usize) -> (View<'_, B>, View<'_, B>) {
        match r {
            Some(r) => (view::<B>(self.weights(), r), view::<B>(&self.grads, r)),
            None => (self.ones(len), self.ones_sink(len)),
        }
    }

    /// dL/d(a branch's projection output) from dL/d(the branch's output) `dout`: through the
    /// branch scale (its gradient accumulated) into `grad`, the gradient region beside the
    /// projection's saved output `proj`; or `dout` itself without a scale.
    fn branch_scale_backward(
        &self,
        acts: &Activations<B>,
        dout: Region,
        scale: Option<Region>,
        (proj, grad): (Region, Region),
        sh: &Shapes,
    ) -> Region {
        let Some(sc) = scale else {
            return dout;
        };
        let a = |r: Region| view::<B>(&acts.memory, r);
        let (p, g) = (view::<B>(self.weights(), sc), view::<B>(&self.grads, sc));
        let shape = sh.scale(self.config.dim, 1);
        self.backend
            .scale_backward(a(grad), g, a(dout), a(proj), p, shape, Overwrite);
        grad
    }

    /// The gain of layer `l`'s attention or MLP norm ([`Model::block_gain`]) and where its
    /// gradient goes.
    fn block_gain_and_grad(&self, r: Option<Region>, l: usize) -> (View<'_, B>, View<'_, B>) {
        match r {
            Some(r) => (view::<B>(self.weights(), r), view::<B>(&self.grads, r)),
            None => (self.block_gain(None, l), self.ones_sink(self.config.dim)),
        }
    }

    /// Cross-entropy, the soft cap, the classifier and the final norm: leaves dL/d(last
    /// block's output) in `d.residual`.
    fn head_backward(&self, acts: &Activations<B>, targets: &[u32], loss_weight: f32, sh: &Shapes) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let (al, d) = (&acts.layout, &acts.layout.grads);
        let (n, c, vocab) = (sh.n, cfg.dim, cfg.vocab_size);
        let classifier = self.layout.classifier;
        let (dw, w) = (
            view::<B>(&self.grads, classifier),
            view::<B>(self.weights(), classifier),
        );
        if al.head == Head::Loss {
            let shape = self.classifier_shape(n);
            let (xn, state) = (a(al.xn_final), (a(al.logsumexp), a(al.classifier_saved)));
            let dloss = loss_weight / n as f32;
            be.classifier_loss_backward(
                a(d.xn),
                dw,
                xn,
                w,
                state,
                targets,
                shape,
                dloss,
                Overwrite,
            );
        } else {
            be.cross_entropy_backward(
                a(d.logits),
                a(al.logits),
                a(al.logsumexp),
                targets,
                vocab,
                loss_weight / n as f32,
            );
            if let Some(cap) = cfg.arch.logit_softcap {
                be.softcap_backward(a(d.logits_raw), a(d.logits), a(al.logits), cap as f32);
            }
            let (dx, dy, x) = (a(d.xn), a(d.logits_raw), a(al.xn_final));
            be.matmul_backward(dx, dw, dy, x, w, sh.mm(c, vocab), Overwrite);
        }
        let (gain, gain_grad) = self.gain_and_grad(self.layout.final_norm, c);
        let last = a(al.last_stream());
        let rstd = a(al.rstd_final);
        let shape = sh.norm(n, c);
        be.rmsnorm_backward(
            a(d.residual),
            gain_grad,
            a(d.xn),
            last,
            gain,
            rstd,
            shape,
            Overwrite,
        );
    }

    /// EngramHash at layer `l`: from dL/d(its output) in `d.residual` to dL/d(residual[l])
    /// (the identity plus the gate's path through the stream's norm), and the gradients of
    /// its tables and matrices.
    /// The capsule bank's backward ([`Model::capsule_forward`]), pass after pass from the
    /// last: from dL/d(the pass's output) in `d.residual` (which passes on unchanged to its
    /// input, the identity's share) through the gate, W_W, the Koopman blend (to the last
    /// pass's capsules, [`Model::koopman_backward`]), the attention (the prototypes' gradient
    /// summed over the rows by the embedding's backward; the keys' and values' gradients both
    /// `r`'s), W_R and the norm, added into `d.residual`, which then holds dL/d(the pass's
    /// input); last, the blend's logits `α`.
    fn capsule_backward(&self, acts: &Activations<B>, l: usize, sh: &Shapes) -> Result<()> {
        let (cfg, be) = (&self.config, &self.backend);
        let (Some(k), Some(w), Some(s)) = (
            cfg.arch.capsules,
            self.layout.capsules,
            acts.layout.capsules.as_ref(),
        ) else {
            unreachable!("a capsule model has its parameters and activations");
        };
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (n, c, width) = (sh.n, cfg.dim, k.count * k.dim);
        if let Some(m) = k.koopman {
            be.zero(a(s.d_mix));
            be.zero(a(s.d_diag));
            // The consistency term's gradient per element: 2·weight/(passes·elements).
            let elements = (m.passes * n * width) as f64;
            let kappa = (2.0 * m.consistency / elements) as f32 * sh.loss_weight;
            let mut factors = vec![kappa; k.dim];
            factors.extend(std::iter::repeat_n(-kappa, k.dim));
            be.upload(a(s.consistency), &factors)
                .unwrap_or_else(|err| panic!("the consistency factors: {err}"));
        }
        let (last, row0) = (s.passes.len() - 1, vec![0; n]);
        for (pass, at) in s.passes.iter().enumerate().rev() {
            let (dout, write) = (a(d.residual), a(at.write));
            be.scale_backward(
                a(s.d_write),
                g(w.gate),
                dout,
                write,
                p(w.gate),
                sh.scale(c, 1),
                Overwrite,
            );
            // A pass before the last already holds the Koopman path's share of its gradient.
            let mode = if pass == last { Overwrite } else { Add };
            let (dc, caps) = (a(at.d_capsules), a(at.capsules));
            be.matmul_backward(
                dc,
                g(w.write),
                a(s.d_write),
                caps,
                p(w.write),
                sh.mm(width, c),
                mode,
            );
            let d_observed = match pass {
                0 => at.d_capsules,
                _ => {
                    self.koopman_backward(acts, (k, w, s), (&s.passes[pass - 1], at), sh);
                    s.d_observed
                }
            };
            let grads = Qkv {
                q: a(s.d_queries),
                k: a(s.d_keys),
                v: a(s.d_values),
            };
            let inputs = Qkv {
                q: a(s.queries),
                k: a(at.read),
                v: a(at.read),
            };
            let shape = AttentionShape {
                batch: sh.batch,
                seq: sh.seq,
                heads: k.count,
                kv_heads: 1,
                head_dim: k.dim,
            };
            be.attention_backward(grads, a(d_observed), inputs, a(at.saved), shape);
            be.accumulate(a(s.d_keys), a(s.d_values));
            be.embedding_backward(g(w.prototypes), a(s.d_queries), &row0, width);
            let (dr, xn) = (a(s.d_keys), a(at.stream_norm));
            be.matmul_backward(
                a(s.d_stream_norm),
                g(w.read),
                dr,
                xn,
                p(w.read),
                sh.mm(c, k.dim),
                Overwrite,
            );
            let h = match pass {
                0 => a(acts.layout.residual[l]),
                _ => a(s.passes[pass - 1].out),
            };
            let (ones, sink) = (self.ones(c), self.ones_sink(c));
            let (dxn, rstd) = (a(s.d_stream_norm), a(at.rstd));
            be.rmsnorm_backward(a(d.residual), sink, dxn, h, ones, rstd, sh.norm(n, c), Add);
        }
        if let Some(m) = w.koopman {
            // α from σ(α) and σ(−α): the gate kernel's backward with rows of one value.
            let (dim, ones, sink) = (k.dim, self.ones(k.dim), self.ones_sink(k.dim));
            let (mix, d_mix, d_alpha) = (a(s.mix), a(s.d_mix), a(s.d_alpha));
            for (half, sign) in [(0, 1.0), (1, -1.0)] {
                let (da, dm) = (d_alpha.slice(half * dim, dim), d_mix.slice(half * dim, dim));
                let out = mix.slice(half * dim, dim);
                be.gate_backward(da, sink, dm, out, p(m.alpha), ones, 1, sign);
                be.accumulate(g(m.alpha), da);
            }
            if s.d_diag.len > 0 {
                // The clamp passes D's gradient only where it did not clamp (torch.clamp's
                // rule: the bounds themselves pass).
                let bound = crate::config::KOOPMAN_CLAMP;
                let diag = download(be, p(m.diag))?;
                let mut grad = download(be, a(s.d_diag))?;
                for (dg, d) in grad.iter_mut().zip(&diag) {
                    if d.abs() > bound {
                        *dg = 0.0;
                    }
                }
                be.upload(a(s.d_diag), &grad)?;
                be.accumulate(g(m.diag), a(s.d_diag));
            }
        }
        Ok(())
    }

    /// The feedback adapter after layer `l` (pass `p`): from dL/d(its output) in
    /// `d.residual` to dL/d(the layer's output) (the identity plus the query's path through
    /// its norm), the gradients of W_Q, W_K, W_V and the gate, and the keys' and values'
    /// share of the pass's sketch gradient (overwritten by the pass's last adapter, the first
    /// the backward meets).
    fn adapter_backward(&self, acts: &Activations<B>, l: usize, p: usize, sh: &Shapes) {
        let (Some(f), Some(w)) = (acts.layout.feedback.as_ref(), self.layout.feedback.as_ref())
        else {
            unreachable!("a feedback model has its parameters and activations");
        };
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let pw = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (c, fd) = (cfg.dim, cfg.arch.feedback.map_or(0, |f| f.dim));
        let j = l - cfg.n_layers;
        let decoder = w.adapters.len();
        let (at, params) = (&f.adapters[j], &w.adapters[j % decoder]);
        be.scale_backward(
            a(f.d_att),
            g(params.gate),
            a(d.residual),
            a(at.att),
            pw(params.gate),
            sh.scale(c, 1),
            Overwrite,
        );
        let grads = Qkv {
            q: a(f.d_q),
            k: a(f.d_k),
            v: a(f.d_v),
        };
        let inputs = Qkv {
            q: a(at.q),
            k: a(at.k),
            v: a(at.v),
        };
        let shape = AttentionShape {
            batch: sh.batch,
            seq: sh.seq,
            heads: cfg.n_heads,
            kv_heads: cfg.n_heads,
            head_dim: cfg.head_dim,
        };
        be.attention_backward(grads, a(f.d_att), inputs, a(at.saved), shape);
        let (dxn, xn) = (a(f.d_stream_norm), a(at.xn));
        let wq = (g(params.q), pw(params.q));
        be.matmul_backward(dxn, wq.0, a(f.d_q), xn, wq.1, sh.mm(c, c), Overwrite);
        let x = a(acts.layout.residual[l + 1]);
        let (ones, sink, rstd) = (self.ones(c), self.ones_sink(c), a(at.rstd));
        let norm = sh.norm(sh.n, c);
        be.rmsnorm_backward(a(d.residual), sink, dxn, x, ones, rstd, norm, Add);
        let sketch = a(f.sketches[p - 1].sketch);
        let last_of_pass = (j + 1).is_multiple_of(decoder);
        let mode = if last_of_pass { Overwrite } else { Add };
        be.matmul_backward(
            a(f.d_sketch),
            g(params.k),
            a(f.d_k),
            sketch,
            pw(params.k),
            sh.mm(fd, c),
            mode,
        );
        be.matmul_backward(
            a(f.d_sketch),
            g(params.v),
            a(f.d_v),
            sketch,
            pw(params.v),
            sh.mm(fd, c),
            Add,
        );
    }

    /// The sketch before pass `p` (first layer `l`): from its gradient, summed over the pass's
    /// adapters, to `W_F`'s and to dL/d(the stream the pass before left), which replaces
    /// `d.residual` (that stream fed nothing else).
    fn sketch_backward(&self, acts: &Activations<B>, l: usize, p: usize, sh: &Shapes) {
        let (Some(f), Some(w)) = (acts.layout.feedback.as_ref(), self.layout.feedback.as_ref())
        else {
            unreachable!("a feedback model has its parameters and activations");
        };
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let d = &acts.layout.grads;
        let (c, fd) = (cfg.dim, cfg.arch.feedback.map_or(0, |f| f.dim));
        let sk = &f.sketches[p - 1];
        let (dw, weights) = (
            view::<B>(&self.grads, w.sketch),
            view::<B>(self.weights(), w.sketch),
        );
        let (dxn, ds, xn) = (a(f.d_stream_norm), a(f.d_sketch), a(sk.stream_norm));
        be.matmul_backward(dxn, dw, ds, xn, weights, sh.mm(c, fd), Overwrite);
        let prev = a(acts.layout.stream_after(l - 1));
        let (ones, sink) = (self.ones(c), self.ones_sink(c));
        let (dres, rstd) = (a(d.residual), a(sk.rstd));
        be.rmsnorm_backward(
            dres,
            sink,
            dxn,
            prev,
            ones,
            rstd,
            sh.norm(sh.n, c),
            Overwrite,
        );
    }

    /// Koopman dynamics' backward ([`Model::koopman_forward`]) for pass `at`: from dL/dc in
    /// its `d_capsules` to the observed capsules' gradient (`d_observed`), the blend weights'
    /// (`d_mix`, summed), `D`'s, `U`'s and `Vᵀ`'s, and the pass before's capsules'
    /// (`prev.d_capsules`, overwritten). The prediction's gradient also gets the consistency
    /// term's, `κ·(K(c_prev) − c)` (`c` held constant: the submission's stop-gradient).
    fn koopman_backward(
        &self,
        acts: &Activations<B>,
        (k, w, s): (Capsules, CapsuleParams, &CapsuleActivations),
        (prev, at): (&CapsulePass, &CapsulePass),
        sh: &Shapes,
    ) {
        let (Some(km), Some(m)) = (k.koopman, w.koopman) else {
            return;
        };
        let be = &self.backend;
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let (rows, dim) = (sh.n * k.count, k.dim);
        let per_channel = ScaleShape {
            rows,
            groups: dim,
            inner: 1,
        };
        let (mix, d_mix, dc) = (a(s.mix), a(s.d_mix), a(at.d_capsules));
        fn half<B: Backend>(v: View<'_, B>, i: usize, dim: usize) -> View<'_, B> {
            v.slice(i * dim, dim)
        }
        be.scale_backward(
            a(s.d_observed),
            half(d_mix, 0, dim),
            dc,
            a(at.observed),
            half(mix, 0, dim),
            per_channel,
            Overwrite,
        );
        be.scale_backward(
            a(s.d_predicted),
            half(d_mix, 1, dim),
            dc,
            a(at.predicted),
            half(mix, 1, dim),
            per_channel,
            Overwrite,
        );
        let factors = a(s.consistency);
        let (dp, pred, caps) = (a(s.d_predicted), a(at.predicted), a(at.capsules));
        be.scale_forward(dp, pred, half(factors, 0, dim), per_channel, Add);
        be.scale_forward(dp, caps, half(factors, 1, dim), per_channel, Add);
        let square = MatmulShape {
            rows,
            in_dim: dim,
            out_dim: dim,
        };
        // H is symmetric: the rotation's backward is the rotation.
        self.rotate(a(s.d_evolved), a(s.d_predicted), square);
        let (de, rotated) = (a(s.d_evolved), a(at.rotated));
        let d_diag = match s.d_diag.len {
            0 => g(m.diag),
            _ => a(s.d_diag),
        };
        let diag = self.koopman_diag(acts, s, m);
        be.scale_backward(
            a(s.d_rotated),
            d_diag,
            de,
            rotated,
            diag,
            per_channel,
            Overwrite,
        );
        let up = MatmulShape {
            rows,
            in_dim: km.rank,
            out_dim: dim,
        };
        be.matmul_backward(a(s.d_low), g(m.u), de, a(at.low), p(m.u), up, Overwrite);
        let down = MatmulShape {
            rows,
            in_dim: dim,
            out_dim: km.rank,
        };
        be.matmul_backward(
            a(s.d_rotated),
            g(m.v),
            a(s.d_low),
            rotated,
            p(m.v),
            down,
            Add,
        );
        self.rotate(a(prev.d_capsules), a(s.d_rotated), square);
    }

    fn engram_backward(&self, acts: &Activations<B>, l: usize, tokens: &[u32], sh: &Shapes) {
        let (cfg, be) = (&self.config, &self.backend);
        let (Some(e), Some(w), Some(s)) = (cfg.arch.engram, self.layout.engram, acts.layout.engram)
        else {
            unreachable!("an EngramHash model has its parameters and activations");
        };
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (n, c) = (sh.n, cfg.dim);
        let per_row = ScaleShape {
            rows: 1,
            groups: n,
            inner: c,
        };
        be.zero(a(s.d_gate));
        let (dout, value, gate) = (a(d.residual), a(s.value), a(s.gate));
        be.scale_backward(
            a(s.d_value),
            a(s.d_gate),
            dout,
            value,
            gate,
            per_row,
            Overwrite,
        );
        let scale = 1.0 / (c as f32).sqrt();
        let (hn, kn) = (a(s.stream_norm), a(s.key_norm));
        let (dhn, dkn) = (a(s.d_stream_norm), a(s.d_key_norm));
        be.gate_backward(dhn, dkn, a(s.d_gate), gate, hn, kn, c, scale);
        let h = a(acts.layout.residual[l]);
        let (ones, sink) = (self.ones(c), self.ones_sink(c));
        let norm = sh.norm(n, c);
        be.rmsnorm_backward(
            a(d.residual),
            sink,
            dhn,
            h,
            ones,
            a(s.rstd_stream),
            norm,
            Add,
        );
        let (key, rstd_key) = (a(s.key), a(s.rstd_key));
        be.rmsnorm_backward(a(s.d_key), sink, dkn, key, ones, rstd_key, norm, Overwrite);
        let (dm, m) = (a(s.d_memory), a(s.memory));
        let mm = sh.mm(e.dim, c);
        be.matmul_backward(dm, g(w.proj), a(s.d_value), m, p(w.proj), mm, Overwrite);
        be.matmul_backward(dm, g(w.key), a(s.d_key), m, p(w.key), mm, Add);
        let ids = engram_ids(tokens, sh.seq, (&[], &[]), &e);
        be.embedding_backward(g(w.tables), dm, &ids, e.row());
    }

    /// The MLP branch of layer `l`: from dL/d(its output) in `dout` to dL/d(its input), added
    /// into `d.residual` (its input is x_mid, or x_blk with a parallel residual).
    fn mlp_backward(
        &self,
        acts: &Activations<B>,
        l: usize,
        (w, s): (&LayerParams, &LayerActivations),
        dout: Region,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let d = &acts.layout.grads;
        let c = cfg.dim;
        let dproj =
            self.branch_scale_backward(acts, dout, w.mlp_scale, (s.mlp_proj, d.mlp_proj), sh);
        if let Some(moe) = w.moe {
            self.moe_backward(acts, l, &moe, s, dproj, sh);
        } else {
            self.dense_mlp_backward(acts, w, s, dproj, sh);
        }
        let (gain, gain_grad) = self.block_gain_and_grad(w.ffn_norm, l);
        let input = if cfg.parallel(l) { s.x_blk } else { s.x_mid };
        let (x, rstd) = (a(input), a(s.rstd_ffn));
        let shape = sh.norm(sh.n, c);
        be.rmsnorm_backward(a(d.residual), gain_grad, a(d.xn), x, gain, rstd, shape, Add);
    }

    /// The dense MLP's backward: from dL/d(down_proj's output) in `dproj` to dL/d(xn_ffn) in
    /// `d.xn`.
    fn dense_mlp_backward(
        &self,
        acts: &Activations<B>,
        w: &LayerParams,
        s: &LayerActivations,
        dproj: Region,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (c, f) = (cfg.dim, cfg.hidden_dim);
        let (dw_down, w_down) = (g(w.w_down), p(w.w_down));
        let (dout, hidden) = (a(dproj), a(s.hidden));
        be.matmul_backward(
            a(d.hidden),
            dw_down,
            dout,
            hidden,
            w_down,
            sh.mm(f, c),
            Overwrite,
        );
        let mut up_mode = Overwrite;
        match (cfg.arch.mlp, w.w_gate) {
            (Mlp::Swiglu, Some(w_gate)) => {
                be.swiglu_backward(a(d.gate), a(d.up), a(d.hidden), a(s.gate), a(s.up));
                let (dgate, xn) = (a(d.gate), a(s.xn_ffn));
                let shape = sh.mm(c, f);
                be.matmul_backward(a(d.xn), g(w_gate), dgate, xn, p(w_gate), shape, Overwrite);
                up_mode = Add;
            }
            (mlp, _) => be.relu2_backward(a(d.up), a(d.hidden), a(s.up), mlp_slope(mlp)),
        }
        let (dup, xn) = (a(d.up), a(s.xn_ffn));
        be.matmul_backward(a(d.xn), g(w.w_up), dup, xn, p(w.w_up), sh.mm(c, f), up_mode);
    }

    /// The backward of [`Model::moe_forward`]: from dL/d(mlp_proj) in `dproj` to dL/d(xn_ffn)
    /// in `d.xn`, through the scatter (a gather), the gates (the per-row scale's backward,
    /// which also gives each gate's gradient), each expert's MLP, the gather (a scatter-add)
    /// and the router (its logits' gradient from the gates' and the load-balancing loss's, on
    /// the host: [`Routing::router_grad`]).
    fn moe_backward(
        &self,
        acts: &Activations<B>,
        l: usize,
        moe: &crate::layout::MoeParams,
        s: &LayerActivations,
        dproj: Region,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (c, f, e, n) = (cfg.dim, cfg.hidden_dim, moe.experts, sh.n);
        let all = acts.routing.lock().unwrap();
        let routing = &all[l];
        assert_eq!(
            routing.perm.len(),
            n,
            "moe_backward: no routing from the forward"
        );
        let mm = |rows, in_dim, out_dim| MatmulShape {
            rows,
            in_dim,
            out_dim,
        };
        be.embedding_forward(a(d.moe_gated), a(dproj), &routing.perm, c);
        let per_row = ScaleShape {
            rows: 1,
            groups: n,
            inner: c,
        };
        be.zero(a(d.moe_gates));
        let (dy, dgates) = (a(d.moe_y), a(d.moe_gates));
        let (dgated, y, gates) = (a(d.moe_gated), a(s.moe_y), a(s.moe_gates));
        be.scale_backward(dy, dgates, dgated, y, gates, per_row, Overwrite);
        let slope = mlp_slope(cfg.arch.mlp);
        for expert in 0..e {
            let (start, end) = (routing.offsets[expert], routing.offsets[expert + 1]);
            let k = end - start;
            if k == 0 {
                continue;
            }
            let rows = |r: Region, width: usize| a(r).slice(start * width, k * width);
            be.matmul_backward(
                rows(d.hidden, f),
                g(moe.down(expert)),
                rows(d.moe_y, c),
                rows(s.hidden, f),
                p(moe.down(expert)),
                mm(k, f, c),
                Overwrite,
            );
            be.relu2_backward(rows(d.up, f), rows(d.hidden, f), rows(s.up, f), slope);
            be.matmul_backward(
                rows(d.moe_x, c),
                g(moe.up(expert)),
                rows(d.up, f),
                rows(s.moe_x, c),
                p(moe.up(expert)),
                mm(k, c, f),
                Overwrite,
            );
        }
        be.zero(a(d.xn));
        be.embedding_backward(a(d.xn), a(d.moe_x), &routing.perm, c);
        let mut host_dgates = vec![0.0; n];
        be.download(dgates, &mut host_dgates)
            .unwrap_or_else(|err| panic!("the gates' gradient: {err}"));
        let aux = cfg.arch.moe.map_or(0.0, |m| m.aux_weight as f32) * sh.loss_weight;
        let dz = routing.router_grad(&host_dgates, aux);
        be.upload(a(d.router), &dz)
            .unwrap_or_else(|err| panic!("the router's gradient: {err}"));
        let (xn, router) = (a(s.xn_ffn), p(moe.router));
        be.matmul_backward(
            a(d.xn),
            g(moe.router),
            a(d.router),
            xn,
            router,
            mm(n, c, e),
            Add,
        );
    }

    /// The attention branch of layer `l`: from dL/d(its output) in `dout` to dL/d(x_blk),
    /// added into `d.residual`.
    fn attention_backward(
        &self,
        acts: &Activations<B>,
        l: usize,
        (w, s): (&LayerParams, &LayerActivations),
        dout: Region,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let (al, d) = (&acts.layout, &acts.layout.grads);
        let (c, hd) = (cfg.dim, cfg.head_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let dproj =
            self.branch_scale_backward(acts, dout, w.attn_scale, (s.attn_proj, d.attn_proj), sh);
        let (dout, out) = (a(dproj), a(s.attn_used));
        // o_proj's input gradient: of XSA's output with XSA, then through XSA.
        let xsa = cfg.xsa(l);
        let d_used = if xsa { d.xsa } else { d.attn_out };
        be.matmul_backward(
            a(d_used),
            g(w.wo),
            dout,
            out,
            p(w.wo),
            sh.mm(nh * hd, c),
            Overwrite,
        );
        let rows = AttentionShape {
            batch: sh.n,
            seq: 1,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        if xsa {
            let (y, v) = (a(s.attn_out), a(s.v_used));
            be.xsa_backward(a(d.attn_out), a(d.xsa_v), a(d.xsa), y, v, rows);
        }
        let grads = Qkv {
            q: a(d.q),
            k: a(d.k),
            v: a(d.v),
        };
        let inputs = Qkv {
            q: a(s.q),
            k: a(s.k),
            v: a(s.v_used),
        };
        let shape = AttentionShape {
            batch: sh.batch,
            seq: sh.seq,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        be.attention_backward(grads, a(d.attn_out), inputs, a(s.attn_saved), shape);
        if xsa {
            // XSA read the values too.
            be.accumulate(a(d.v), a(d.xsa_v));
        }
        if let Some(gn) = w.q_gain {
            let (dq, q_rope) = (a(d.q), a(s.q_rope));
            be.scale_backward(
                a(d.q_rope),
                g(gn),
                dq,
                q_rope,
                p(gn),
                sh.scale(nh, hd),
                Overwrite,
            );
        }
        be.rope_backward(a(d.q_pre), a(d.q_rope), sh.rope(nh));
        be.rope_backward(a(d.k_pre), a(d.k), sh.rope(nkv));
        let kvd = nkv * hd;
        if let Some(mix) = w.v_mix {
            // v_used = λ₀·v + λ₁·v_first: λ₀ part to this block's v, λ₁ part saved for
            // the first block.
            let (l0, l1) = (p(mix).slice(0, 1), p(mix).slice(1, 1));
            let (g0, g1) = (g(mix).slice(0, 1), g(mix).slice(1, 1));
            let v_first = a(al.layers[0].v);
            let shape = sh.scale(1, kvd);
            be.scale_backward(a(d.v_lin), g0, a(d.v), a(s.v), l0, shape, Overwrite);
            be.scale_backward(a(d.v_first), g1, a(d.v), v_first, l1, shape, Add);
        } else if cfg.arch.value_residual {
            // The first block: its values were also every later block's v_first.
            debug_assert_eq!(l, 0);
            be.residual_forward(a(d.v_lin), a(d.v), a(d.v_first));
        }
        self.qkv_backward(acts, l, w, s, sh);
    }

    /// The q/k norms, the q, k, v projections and the attention norm, back to dL/d(x_blk)
    /// (added into `d.residual`).
    fn qkv_backward(
        &self,
        acts: &Activations<B>,
        l: usize,
        w: &LayerParams,
        s: &LayerActivations,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let d = &acts.layout.grads;
        let (n, c, hd) = (sh.n, cfg.dim, cfg.head_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let kvd = nkv * hd;
        if let (Some(qr), Some(kr)) = (s.q_rstd, s.k_rstd) {
            let (q_gain, q_grad) = self.gain_and_grad(w.q_norm, hd);
            let (k_gain, k_grad) = self.gain_and_grad(w.k_norm, hd);
            let (dq, q_lin) = (a(d.q_pre), a(s.q_lin));
            let (dk, k_lin) = (a(d.k_pre), a(s.k_lin));
            let (q_shape, k_shape) = (sh.norm(n * nh, hd), sh.norm(n * nkv, hd));
            be.rmsnorm_backward(
                a(d.q_lin),
                q_grad,
                dq,
                q_lin,
                q_gain,
                a(qr),
                q_shape,
                Overwrite,
            );
            be.rmsnorm_backward(
                a(d.k_lin),
                k_grad,
                dk,
                k_lin,
                k_gain,
                a(kr),
                k_shape,
                Overwrite,
            );
        }
        let xn = a(s.xn_attn);
        be.matmul_backward(
            a(d.xn),
            g(w.wq),
            a(d.q_lin),
            xn,
            p(w.wq),
            sh.mm(c, nh * hd),
            Overwrite,
        );
        be.matmul_backward(
            a(d.xn),
            g(w.wk),
            a(d.k_lin),
            xn,
            p(w.wk),
            sh.mm(c, kvd),
            Add,
        );
        be.matmul_backward(
            a(d.xn),
            g(w.wv),
            a(d.v_lin),
            xn,
            p(w.wv),
            sh.mm(c, kvd),
            Add,
        );
        let (gain, gain_grad) = self.block_gain_and_grad(w.attn_norm, l);
        let (x_blk, rstd) = (a(s.x_blk), a(s.rstd_attn));
        let shape = sh.norm(n, c);
        be.rmsnorm_backward(
            a(d.residual),
            gain_grad,
            a(d.xn),
            x_blk,
            gain,
            rstd,
            shape,
            Add,
        );
    }

    /// From dL/d(x_blk) through resid_mix (to x_in, and to x0 collected in `d.x0`) and the
    /// U-Net skip (to the encoder output); the identity to residual[l] stays in `d.residual`.
    fn block_input_backward(
        &self,
        acts: &Activations<B>,
        l: usize,
        w: &LayerParams,
        s: &LayerActivations,
        sh: &Shapes,
    ) {
        let (cfg, be) = (&self.config, &self.backend);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let (al, d) = (&acts.layout, &acts.layout.grads);
        let c = cfg.dim;
        let shape = sh.scale(c, 1);
        if let Some(mix) = w.resid_mix {
            let (m0, m1) = (p(mix).slice(0, c), p(mix).slice(c, c));
            let (g0, g1) = (g(mix).slice(0, c), g(mix).slice(c, c));
            let x0 = a(al.residual[0]);
            be.scale_backward(a(d.xn), g0, a(d.residual), a(s.x_in), m0, shape, Overwrite);
            be.scale_backward(a(d.x0), g1, a(d.residual), x0, m1, shape, Add);
            be.copy(a(d.residual), a(d.xn));
        }
        if let Some((i, j)) = skip_source(cfg, l) {
            // Feedback passes add to a skip's gradient once per pass (zeroed at the start).
            let mode = match cfg.arch.feedback {
                Some(_) => Add,
                None => Overwrite,
            };
            be.scale_backward(
                a(d.skips[i]),
                self.skip_row(&self.grads, i),
                a(d.residual),
                a(al.residual[j + 1]),
                self.skip_row(self.weights(), i),
                shape,
                mode,
            );
        }
    }
}
