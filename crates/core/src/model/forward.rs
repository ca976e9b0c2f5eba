//! The forward pass (see the module docs of [`super`] for the block's equations), and the
//! small helpers forward and backward share.

use super::{
    bigram_ids, download, engram_ids, mlp_slope, view, Activations, CacheSlot, Model, Routing,
};
use crate::backend::{
    Accumulate, AttentionShape, Backend, DecodeShape, MatmulShape, NormShape, Qkv, RopeShape,
    ScaleShape, View,
};
use crate::config::{Capsules, Mlp};
use crate::layout::{
    skip_source, CapsuleActivations, CapsuleParams, CapsulePass, Head, LayerActivations,
    LayerParams, Region,
};
use crate::Result;

impl<B: Backend> Model<B> {
    /// Runs the model on `tokens (B·T)`, leaving logits in the arena; with `targets`, also the
    /// per-position losses, and returns their mean. A loss-only arena ([`Head::Loss`]) needs
    /// targets and leaves only the losses.
    pub fn forward(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
    ) -> Result<Option<f32>> {
        self.forward_with(acts, tokens, targets, None, &[], &[])
    }

    /// [`Model::forward`] with capsule carry ([`crate::config::Koopman::carry`], which the
    /// model must be built with): row r's first Koopman pass blends its pooled capsules with
    /// `K(carry[r])` (`count·dim` values, given to every position of the row), as later passes
    /// do with the pass before them; a row given `None` runs as without carry.
    /// [`Model::capsule_state`] reads what a row carries on to its stream's next window.
    pub fn forward_carrying(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
        carry: &[Option<Vec<f32>>],
    ) -> Result<Option<f32>> {
        let bank = self.config.arch.capsules;
        let Some(k) = bank.filter(|k| k.koopman.is_some_and(|m| m.carry.is_some())) else {
            crate::fail!(
                Config,
                "capsule carry needs a model built with it (arch.capsules.koopman.carry)"
            );
        };
        crate::require!(
            carry.len() == acts.layout.batch,
            Shape,
            "forward: a carry for {} rows of a batch of {}",
            carry.len(),
            acts.layout.batch
        );
        if let Some(c) = carry.iter().flatten().find(|c| c.len() != k.count * k.dim) {
            crate::fail!(
                Shape,
                "forward: a carry of {} values for {} capsules of {}",
                c.len(),
                k.count,
                k.dim
            );
        }
        self.forward_with(acts, tokens, targets, None, &[], carry)
    }

    /// Each row's capsule state after a forward: the last pass's capsules at the row's last
    /// position, `(batch, count·dim)` — what capsule carry hands to the stream's next window.
    pub fn capsule_state(&self, acts: &Activations<B>) -> Result<Vec<Vec<f32>>> {
        let (Some(k), Some(s)) = (self.config.arch.capsules, acts.layout.capsules.as_ref()) else {
            crate::fail!(Config, "capsule_state: the model has no capsule bank");
        };
        let (t, width) = (acts.layout.seq, k.count * k.dim);
        let last = s.passes[s.passes.len() - 1].capsules;
        let all = download(&self.backend, view::<B>(&acts.memory, last))?;
        Ok((0..acts.layout.batch)
            .map(|r| all[((r + 1) * t - 1) * width..][..width].to_vec())
            .collect())
    }

    /// [`Model::forward`] with the layers `dropped[l]` skipped (stochastic depth): a dropped
    /// layer passes its input stream through unchanged (no U-Net skip, mix or branch). Give
    /// [`Model::backward_dropping`] the same `dropped`.
    pub fn forward_dropping(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
        dropped: &[bool],
    ) -> Result<Option<f32>> {
        crate::require!(
            dropped.is_empty() || dropped.len() == self.config.depth(),
            Shape,
            "forward: {} layer-drop flags for {} layers",
            dropped.len(),
            self.config.depth()
        );
        crate::require!(
            !(self.config.arch.value_residual && dropped.first() == Some(&true)),
            Shape,
            "forward: layer 0 cannot be dropped with a value residual (its values feed every \
             later layer)"
        );
        crate::require!(
            self.config.arch.feedback.is_none() || !dropped.contains(&true),
            Config,
            "forward: stochastic depth and feedback passes cannot be combined"
        );
        self.forward_with(acts, tokens, targets, None, dropped, &[])
    }

    /// The forward pass; with a cache slot, `tokens` is one token at position `slot.pos`, its
    /// keys and values are stored in the cache, and attention reads the cache. `carry` is
    /// [`Model::forward_carrying`]'s (empty: none).
    pub(super) fn forward_with(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
        slot: Option<CacheSlot<B>>,
        dropped: &[bool],
        carry: &[Option<Vec<f32>>],
    ) -> Result<Option<f32>> {
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let n = b * t;
        if tokens.len() != n {
            crate::fail!(
                Shape,
                "forward: {} tokens for a {b}×{t} batch",
                tokens.len()
            );
        }
        crate::require!(n > 0, Shape, "forward: no tokens");
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            crate::fail!(
                Shape,
                "token id {id} is beyond the model's vocabulary of {vocab}"
            );
        }
        let cfg = &self.config;
        let arch = &cfg.arch;
        let c = cfg.dim;
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let gain = |r: Option<Region>, len: usize| r.map_or(self.ones(len), p);
        let al = &acts.layout;
        let eps = cfg.norm_eps as f32;
        let norm = |rows, dim| NormShape { rows, dim, eps };

        be.embedding_forward(a(al.emb_tok), p(self.layout.embedding), tokens, c);
        if let Some(table) = self.layout.bigram {
            let prev = slot.as_ref().map_or(&[][..], |s| &s.cache.last_tokens[..]);
            let ids = bigram_ids(tokens, t, prev, arch.bigram_buckets);
            be.embedding_forward(a(al.emb_bigram), p(table), &ids, c);
            be.residual_forward(a(al.embed), a(al.emb_tok), a(al.emb_bigram));
        }
        if arch.embed_norm {
            let x0 = a(al.residual[0]);
            be.rmsnorm_forward(x0, a(al.rstd_embed), a(al.embed), self.ones(c), norm(n, c));
        }
        let engram = arch.engram.map(|e| {
            let prev = slot.as_ref().map_or((&[][..], &[][..]), |s| {
                (&s.cache.last_tokens[..], &s.cache.before_last[..])
            });
            (e.layer, engram_ids(tokens, t, prev, &e))
        });
        for (l, (&block, s)) in self.layout.order.iter().zip(&al.layers).enumerate() {
            if let Some((_, ids)) = engram.as_ref().filter(|(at, _)| *at == l) {
                self.engram_forward(acts, l, ids);
            }
            if arch.capsules.is_some_and(|k| k.layer == l) {
                self.capsule_forward(acts, l, slot.as_ref(), carry)?;
            }
            let pass = cfg.feedback_pass(l).filter(|&(p, _)| p > 0);
            if let Some((p, true)) = pass {
                self.sketch_forward(acts, l, p);
            }
            if dropped.get(l) == Some(&true) {
                be.copy(a(al.residual[l + 1]), a(al.input(l)));
                continue;
            }
            let w = &self.layout.layers[block];
            self.block_forward(acts, l, w, s, slot.as_ref());
            if let Some((p, _)) = pass {
                self.adapter_forward(acts, l, p, slot.as_ref());
            }
        }
        let last = a(al.last_stream());
        let final_norm = gain(self.layout.final_norm, c);
        be.rmsnorm_forward(
            a(al.xn_final),
            a(al.rstd_final),
            last,
            final_norm,
            norm(n, c),
        );
        let vocab = cfg.vocab_size;
        let classifier = p(self.layout.classifier);
        if al.head == Head::Last {
            if targets.is_some() {
                crate::fail!(Shape, "forward: a last-position arena takes no targets");
            }
            // Each sequence's last row through the classifier (and the soft cap).
            for s in 0..b {
                let row = a(al.xn_final).slice((s * t + t - 1) * c, c);
                let raw = a(al.logits_raw).slice(s * vocab, vocab);
                let shape = MatmulShape {
                    rows: 1,
                    in_dim: c,
                    out_dim: vocab,
                };
                be.matmul_forward(raw, row, classifier, shape);
                if let Some(cap) = arch.logit_softcap {
                    let logits = a(al.logits).slice(s * vocab, vocab);
                    be.softcap_forward(logits, raw, cap as f32);
                }
            }
            return Ok(None);
        }
        if al.head == Head::Loss {
            let Some(targets) = targets else {
                crate::fail!(Shape, "forward: a loss-only arena needs targets");
            };
            self.check_targets(targets, n, b, t)?;
            let shape = self.classifier_shape(n);
            let (losses, lse, xn) = (a(al.losses), a(al.logsumexp), a(al.xn_final));
            let saved = a(al.classifier_saved);
            be.classifier_loss_forward(losses, lse, saved, xn, classifier, targets, shape);
        } else {
            let shape = MatmulShape {
                rows: n,
                in_dim: c,
                out_dim: vocab,
            };
            be.matmul_forward(a(al.logits_raw), a(al.xn_final), classifier, shape);
            if let Some(cap) = arch.logit_softcap {
                be.softcap_forward(a(al.logits), a(al.logits_raw), cap as f32);
            }
            let Some(targets) = targets else {
                return Ok(None);
            };
            self.check_targets(targets, n, b, t)?;
            be.cross_entropy_forward(a(al.losses), a(al.logsumexp), a(al.logits), targets, vocab);
        }
        let losses = download(be, a(al.losses))?;
        Ok(Some(
            (losses.iter().map(|&x| x as f64).sum::<f64>() / n as f64) as f32,
        ))
    }

    fn check_targets(&self, targets: &[u32], n: usize, b: usize, t: usize) -> Result<()> {
        if targets.len() != n {
            crate::fail!(
                Shape,
                "forward: {} targets for a {b}×{t} batch",
                targets.len()
            );
        }
        Ok(())
    }

    /// EngramHash before layer `l`: the memory rows `ids` looked up, keyed and gated against
    /// the stream `residual[l]`, and added to it as the layer's input.
    fn engram_forward(&self, acts: &Activations<B>, l: usize, ids: &[u32]) {
        let (cfg, be) = (&self.config, &self.backend);
        let (Some(e), Some(w), Some(s)) = (cfg.arch.engram, self.layout.engram, acts.layout.engram)
        else {
            unreachable!("an EngramHash model has its parameters and activations");
        };
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let (n, c) = (acts.layout.batch * acts.layout.seq, cfg.dim);
        let mm = MatmulShape {
            rows: n,
            in_dim: e.dim,
            out_dim: c,
        };
        let norm = NormShape {
            rows: n,
            dim: c,
            eps: cfg.norm_eps as f32,
        };
        be.embedding_forward(a(s.memory), p(w.tables), ids, e.row());
        be.matmul_forward(a(s.key), a(s.memory), p(w.key), mm);
        be.matmul_forward(a(s.value), a(s.memory), p(w.proj), mm);
        let h = a(acts.layout.residual[l]);
        be.rmsnorm_forward(a(s.key_norm), a(s.rstd_key), a(s.key), self.ones(c), norm);
        be.rmsnorm_forward(a(s.stream_norm), a(s.rstd_stream), h, self.ones(c), norm);
        let scale = 1.0 / (c as f32).sqrt();
        be.gate_forward(a(s.gate), a(s.stream_norm), a(s.key_norm), c, scale);
        be.copy(a(s.out), h);
        // The gate is one scale per row: (1, N, C) with one group per row.
        let per_row = ScaleShape {
            rows: 1,
            groups: n,
            inner: c,
        };
        be.scale_forward(a(s.out), a(s.value), a(s.gate), per_row, Accumulate::Add);
    }

    /// Layer `l` (running the block whose weights are `w`): the U-Net skip and resid_mix into
    /// its input, then attention and the MLP, each added back into the residual stream.
    fn block_forward(
        &self,
        acts: &Activations<B>,
        l: usize,
        w: &LayerParams,
        s: &LayerActivations,
        slot: Option<&CacheSlot<B>>,
    ) {
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let n = b * t;
        let cfg = &self.config;
        let arch = &cfg.arch;
        let (c, hd, f) = (cfg.dim, cfg.head_dim, cfg.hidden_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let gain = |r: Option<Region>, len: usize| r.map_or(self.ones(len), p);
        let al = &acts.layout;
        let eps = cfg.norm_eps as f32;
        let mm = |rows, in_dim, out_dim| MatmulShape {
            rows,
            in_dim,
            out_dim,
        };
        let norm = |rows, dim| NormShape { rows, dim, eps };
        let rope = |heads| RopeShape {
            batch: b,
            seq: t,
            heads,
            head_dim: hd,
            rot_dims: cfg.rope_dims(),
            theta: cfg.rope_theta as f32,
            start_pos: slot.map_or(0, |c| c.pos),
        };
        let sc = |rows, groups, inner| ScaleShape {
            rows,
            groups,
            inner,
        };
        use Accumulate::{Add, Overwrite};
        let x0 = a(al.residual[0]);
        if let Some((i, j)) = skip_source(cfg, l) {
            let weights = self.skip_row(self.weights(), i);
            be.copy(a(s.x_in), a(al.input(l)));
            be.scale_forward(a(s.x_in), a(al.residual[j + 1]), weights, sc(n, c, 1), Add);
        }
        if let Some(mix) = w.resid_mix {
            let (m0, m1) = (p(mix).slice(0, c), p(mix).slice(c, c));
            be.scale_forward(a(s.x_blk), a(s.x_in), m0, sc(n, c, 1), Overwrite);
            be.scale_forward(a(s.x_blk), x0, m1, sc(n, c, 1), Add);
        }
        let x = a(s.x_blk);
        let attn_norm = self.block_gain(w.attn_norm, l);
        be.rmsnorm_forward(a(s.xn_attn), a(s.rstd_attn), x, attn_norm, norm(n, c));
        be.matmul_forward(a(s.q_lin), a(s.xn_attn), p(w.wq), mm(n, c, nh * hd));
        be.matmul_forward(a(s.k_lin), a(s.xn_attn), p(w.wk), mm(n, c, nkv * hd));
        be.matmul_forward(a(s.v), a(s.xn_attn), p(w.wv), mm(n, c, nkv * hd));
        if let (Some(qr), Some(kr)) = (s.q_rstd, s.k_rstd) {
            let (qn, kn) = (gain(w.q_norm, hd), gain(w.k_norm, hd));
            be.rmsnorm_forward(a(s.q_pre), a(qr), a(s.q_lin), qn, norm(n * nh, hd));
            be.rmsnorm_forward(a(s.k_pre), a(kr), a(s.k_lin), kn, norm(n * nkv, hd));
        }
        be.rope_forward(a(s.q_rope), a(s.q_pre), rope(nh));
        be.rope_forward(a(s.k), a(s.k_pre), rope(nkv));
        if let Some(g) = w.q_gain {
            be.scale_forward(a(s.q), a(s.q_rope), p(g), sc(n, nh, hd), Overwrite);
        }
        if let Some(mix) = w.v_mix {
            let v_first = a(al.layers[0].v);
            let (l0, l1) = (p(mix).slice(0, 1), p(mix).slice(1, 1));
            be.scale_forward(a(s.v_used), a(s.v), l0, sc(n, 1, nkv * hd), Overwrite);
            be.scale_forward(a(s.v_used), v_first, l1, sc(n, 1, nkv * hd), Add);
        }
        let inputs = Qkv {
            q: a(s.q),
            k: a(s.k),
            v: a(s.v_used),
        };
        match &slot {
            None => {
                let shape = AttentionShape {
                    batch: b,
                    seq: t,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                };
                be.attention_forward(a(s.attn_out), a(s.attn_saved), inputs, shape);
            }
            Some(slot) => self.attend_cached(slot, l, a(s.attn_out), inputs),
        }
        if cfg.xsa(l) {
            // Each head's output less its own token's value direction (the token decoded, or
            // each row's own): (N rows of H heads) against (N rows of Hkv heads).
            let shape = AttentionShape {
                batch: n,
                seq: 1,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            };
            be.xsa_forward(a(s.attn_used), a(s.attn_out), a(s.v_used), shape);
        }
        be.matmul_forward(a(s.attn_proj), a(s.attn_used), p(w.wo), mm(n, nh * hd, c));
        self.branch_add(a(s.x_mid), x, a(s.attn_proj), w.attn_scale, n);
        let ffn_norm = self.block_gain(w.ffn_norm, l);
        // A parallel residual: the MLP reads the layer's input, not attention's output.
        let mlp_in = if cfg.parallel(l) { x } else { a(s.x_mid) };
        be.rmsnorm_forward(a(s.xn_ffn), a(s.rstd_ffn), mlp_in, ffn_norm, norm(n, c));
        if let Some(moe) = w.moe {
            self.moe_forward(acts, l, &moe, s, n);
        } else {
            be.matmul_forward(a(s.up), a(s.xn_ffn), p(w.w_up), mm(n, c, f));
            match (arch.mlp, w.w_gate) {
                (Mlp::Swiglu, Some(w_gate)) => {
                    be.matmul_forward(a(s.gate), a(s.xn_ffn), p(w_gate), mm(n, c, f));
                    be.swiglu_forward(a(s.hidden), a(s.gate), a(s.up));
                }
                (mlp, _) => be.relu2_forward(a(s.hidden), a(s.up), mlp_slope(mlp)),
            }
            be.matmul_forward(a(s.mlp_proj), a(s.hidden), p(w.w_down), mm(n, f, c));
        }
        let out = a(al.residual[l + 1]);
        self.branch_add(out, a(s.x_mid), a(s.mlp_proj), w.mlp_scale, n);
    }

    /// The causal capsule bank before layer `l` ([`crate::config::Capsules`]), each of its
    /// passes: the stream normalized and read into capsule space, the prototypes as every
    /// row's queries (an embedding lookup of row 0), causal attention of `count` query heads
    /// over the one key/value head `r` (with a cache slot, over the cache's rows of that pass
    /// and this one); after the first pass, Koopman dynamics blend the pooled capsules with
    /// the last pass's evolved ([`Model::koopman_forward`]); then `h + g ⊙ W_W·c`, the next
    /// pass's stream and, after the last, the layer's input.
    fn capsule_forward(
        &self,
        acts: &Activations<B>,
        l: usize,
        slot: Option<&CacheSlot<B>>,
        carry: &[Option<Vec<f32>>],
    ) -> Result<()> {
        let cfg = &self.config;
        let (Some(k), Some(w), Some(s)) = (
            cfg.arch.capsules,
            self.layout.capsules,
            acts.layout.capsules.as_ref(),
        ) else {
            return Ok(());
        };
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let (n, c, width) = (b * t, cfg.dim, k.count * k.dim);
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        be.embedding_forward(a(s.queries), p(w.prototypes), &vec![0; n], width);
        if let Some(m) = w.koopman {
            // σ(α) and σ(−α), the blend's weights: the gate kernel with rows of one value.
            let (mix, ones) = (a(s.mix), self.ones(k.dim));
            be.gate_forward(mix.slice(0, k.dim), p(m.alpha), ones, 1, 1.0);
            be.gate_forward(mix.slice(k.dim, k.dim), p(m.alpha), ones, 1, -1.0);
            if s.diag.len > 0 {
                // The stability clamp on D, on the host (dim values).
                let bound = crate::config::KOOPMAN_CLAMP;
                let diag = download(be, p(m.diag))?;
                let clamped: Vec<f32> = diag.iter().map(|d| d.clamp(-bound, bound)).collect();
                be.upload(a(s.diag), &clamped)?;
            }
        }
        for (pass, at) in s.passes.iter().enumerate() {
            let h = match pass {
                0 => a(acts.layout.residual[l]),
                _ => a(s.passes[pass - 1].out),
            };
            let norm = NormShape {
                rows: n,
                dim: c,
                eps: cfg.norm_eps as f32,
            };
            be.rmsnorm_forward(a(at.stream_norm), a(at.rstd), h, self.ones(c), norm);
            let read = MatmulShape {
                rows: n,
                in_dim: c,
                out_dim: k.dim,
            };
            be.matmul_forward(a(at.read), a(at.stream_norm), p(w.read), read);
            let inputs = Qkv {
                q: a(s.queries),
                k: a(at.read),
                v: a(at.read),
            };
            match slot {
                None => {
                    let shape = AttentionShape {
                        batch: b,
                        seq: t,
                        heads: k.count,
                        kv_heads: 1,
                        head_dim: k.dim,
                    };
                    be.attention_forward(a(at.observed), a(at.saved), inputs, shape);
                }
                Some(slot) => {
                    let (cache, pos) = (slot.cache, slot.pos);
                    let region = cache.capsules.expect("a cache for a capsule bank");
                    let per_pass = cache.batch * cache.capacity * k.dim;
                    let keys = view::<B>(&cache.memory, region).slice(pass * per_pass, per_pass);
                    for seq in 0..cache.batch {
                        let row = keys.slice((seq * cache.capacity + pos) * k.dim, k.dim);
                        be.copy(row, a(at.read).slice(seq * k.dim, k.dim));
                    }
                    let shape = DecodeShape {
                        batch: cache.batch,
                        len: pos + 1,
                        capacity: cache.capacity,
                        heads: k.count,
                        kv_heads: 1,
                        head_dim: k.dim,
                    };
                    be.attention_decode(a(at.observed), a(s.queries), keys, keys, shape);
                }
            }
            if pass > 0 {
                self.koopman_forward(acts, (k, w, s), (s.passes[pass - 1].capsules, at), n);
            } else if s.carry.len > 0 {
                self.carry_forward(acts, (k, w, s), at, carry, t)?;
            }
            let write = MatmulShape {
                rows: n,
                in_dim: width,
                out_dim: c,
            };
            be.matmul_forward(a(at.write), a(at.capsules), p(w.write), write);
            self.gated_add(a(at.out), h, a(at.write), p(w.gate), n);
        }
        match k.koopman.and_then(|m| m.halt) {
            Some(halt) => self.capsule_halt(acts, s, (n, c, width), halt),
            None => Ok(()),
        }
    }

    /// Adaptive halting ([`crate::config::Koopman::halt`]): per row, the first pass after the
    /// first whose capsules moved by less than `halt` of their norm; its stream replaces the
    /// last pass's in that row (on the host: evaluation only).
    fn capsule_halt(
        &self,
        acts: &Activations<B>,
        s: &CapsuleActivations,
        (n, c, width): (usize, usize, usize),
        halt: f64,
    ) -> Result<()> {
        let be = &self.backend;
        let a = |r: Region| view::<B>(&acts.memory, r);
        let capsules = s
            .passes
            .iter()
            .map(|pass| download(be, a(pass.capsules)))
            .collect::<Result<Vec<_>>>()?;
        let last = s.passes.len() - 1;
        for row in 0..n {
            let at = |p: usize| &capsules[p][row * width..][..width];
            let moved = |p: usize| {
                let (now, before) = (at(p), at(p - 1));
                let change: f64 = now
                    .iter()
                    .zip(before)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum();
                let norm: f64 = before.iter().map(|&y| (y as f64).powi(2)).sum();
                change.sqrt() < halt * norm.sqrt()
            };
            if let Some(stop) = (1..last).find(|&p| moved(p)) {
                let src = a(s.passes[stop].out).slice(row * c, c);
                be.copy(a(s.passes[last].out).slice(row * c, c), src);
            }
        }
        Ok(())
    }

    /// The sketch before feedback pass `p` (whose first layer is `l`): `s = W_F·rmsnorm(y)`
    /// of the stream `y` the pass before left.
    fn sketch_forward(&self, acts: &Activations<B>, l: usize, p: usize) {
        let (Some(f), Some(w)) = (acts.layout.feedback.as_ref(), self.layout.feedback.as_ref())
        else {
            unreachable!("a feedback model has its parameters and activations");
        };
        let cfg = &self.config;
        let (n, c) = (acts.layout.batch * acts.layout.seq, cfg.dim);
        let fd = cfg.arch.feedback.map_or(0, |f| f.dim);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let sk = &f.sketches[p - 1];
        let prev = a(acts.layout.stream_after(l - 1));
        let norm = NormShape {
            rows: n,
            dim: c,
            eps: cfg.norm_eps as f32,
        };
        let be = &self.backend;
        be.rmsnorm_forward(a(sk.stream_norm), a(sk.rstd), prev, self.ones(c), norm);
        let shape = MatmulShape {
            rows: n,
            in_dim: c,
            out_dim: fd,
        };
        let weights = view::<B>(self.weights(), w.sketch);
        be.matmul_forward(a(sk.sketch), a(sk.stream_norm), weights, shape);
    }

    /// The feedback adapter after layer `l` (of pass `p` ≥ 1): `out = x + g ⊙
    /// attn(W_Q·rmsnorm(x), W_K·s, W_V·s)` with `x` the layer's output and `s` the pass's
    /// sketch; when decoding, its keys and values go to the cache and attention reads it.
    fn adapter_forward(
        &self,
        acts: &Activations<B>,
        l: usize,
        p: usize,
        slot: Option<&CacheSlot<B>>,
    ) {
        let (Some(f), Some(w)) = (acts.layout.feedback.as_ref(), self.layout.feedback.as_ref())
        else {
            unreachable!("a feedback model has its parameters and activations");
        };
        let cfg = &self.config;
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let (n, c) = (b * t, cfg.dim);
        let fd = cfg.arch.feedback.map_or(0, |f| f.dim);
        let j = l - cfg.n_layers;
        let (at, params) = (&f.adapters[j], &w.adapters[j % w.adapters.len()]);
        let be = &self.backend;
        let a = |r: Region| view::<B>(&acts.memory, r);
        let pw = |r: Region| view::<B>(self.weights(), r);
        let x = a(acts.layout.residual[l + 1]);
        let sketch = a(f.sketches[p - 1].sketch);
        let mm = |in_dim, out_dim| MatmulShape {
            rows: n,
            in_dim,
            out_dim,
        };
        let norm = NormShape {
            rows: n,
            dim: c,
            eps: cfg.norm_eps as f32,
        };
        be.rmsnorm_forward(a(at.xn), a(at.rstd), x, self.ones(c), norm);
        be.matmul_forward(a(at.q), a(at.xn), pw(params.q), mm(c, c));
        be.matmul_forward(a(at.k), sketch, pw(params.k), mm(fd, c));
        be.matmul_forward(a(at.v), sketch, pw(params.v), mm(fd, c));
        let (heads, head_dim) = (cfg.n_heads, cfg.head_dim);
        match slot {
            None => {
                let inputs = Qkv {
                    q: a(at.q),
                    k: a(at.k),
                    v: a(at.v),
                };
                let shape = AttentionShape {
                    batch: b,
                    seq: t,
                    heads,
                    kv_heads: heads,
                    head_dim,
                };
                be.attention_forward(a(at.att), a(at.saved), inputs, shape);
            }
            Some(slot) => {
                let (cache, pos) = (slot.cache, slot.pos);
                let (keys, values) = (cache.feedback_keys(j, 0, c), cache.feedback_keys(j, 1, c));
                for seq in 0..cache.batch {
                    let row = (seq * cache.capacity + pos) * c;
                    be.copy(keys.slice(row, c), a(at.k).slice(seq * c, c));
                    be.copy(values.slice(row, c), a(at.v).slice(seq * c, c));
                }
                let shape = DecodeShape {
                    batch: cache.batch,
                    len: pos + 1,
                    capacity: cache.capacity,
                    heads,
                    kv_heads: heads,
                    head_dim,
                };
                be.attention_decode(a(at.att), a(at.q), keys, values, shape);
            }
        }
        self.gated_add(a(at.out), x, a(at.att), pw(params.gate), n);
    }

    /// `out = x + g ⊙ y` with a per-channel gate `g (C)` over `rows` rows.
    fn gated_add(&self, out: View<B>, x: View<B>, y: View<B>, gate: View<B>, rows: usize) {
        let per_channel = ScaleShape {
            rows,
            groups: self.config.dim,
            inner: 1,
        };
        self.backend.copy(out, x);
        self.backend
            .scale_forward(out, y, gate, per_channel, Accumulate::Add);
    }

    /// Capsule carry into the first pass `at`: each row given a carry blends as a later pass
    /// does, with the carry (at every position) as the pass before it; every other row keeps
    /// its pooled capsules.
    fn carry_forward(
        &self,
        acts: &Activations<B>,
        (k, w, s): (Capsules, CapsuleParams, &CapsuleActivations),
        at: &CapsulePass,
        carry: &[Option<Vec<f32>>],
        t: usize,
    ) -> Result<()> {
        let be = &self.backend;
        let a = |r: Region| view::<B>(&acts.memory, r);
        let width = k.count * k.dim;
        let (n, rows) = (s.carry.len / width, t * width);
        if carry.iter().any(Option::is_some) {
            let mut broadcast = vec![0.0; s.carry.len];
            for (row, c) in broadcast.chunks_exact_mut(rows).zip(carry) {
                if let Some(c) = c {
                    row.chunks_exact_mut(width)
                        .for_each(|p| p.copy_from_slice(c));
                }
            }
            be.upload(a(s.carry), &broadcast)?;
            self.koopman_forward(acts, (k, w, s), (s.carry, at), n);
        }
        for r in 0..n / t {
            if carry.get(r).is_none_or(Option::is_none) {
                let src = a(at.observed).slice(r * rows, rows);
                be.copy(a(at.capsules).slice(r * rows, rows), src);
            }
        }
        Ok(())
    }

    /// Koopman dynamics into pass `at` from the pass before it (`prev`), per capsule (rows of
    /// `dim`): `y = H·c_prev`, `K(c_prev) = H·(D ⊙ y + U·Vᵀ·y)`, then the capsules written
    /// `c = σ(α) ⊙ c_observed + σ(−α) ⊙ K(c_prev)` (the submission's `KoopmanDynamics.blend`,
    /// whose Hadamard matrix is also symmetric and its own inverse).
    fn koopman_forward(
        &self,
        acts: &Activations<B>,
        (k, w, s): (Capsules, CapsuleParams, &CapsuleActivations),
        (prev, at): (Region, &CapsulePass),
        n: usize,
    ) {
        let (Some(km), Some(m)) = (k.koopman, w.koopman) else {
            return;
        };
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let rows = n * k.count;
        let square = MatmulShape {
            rows,
            in_dim: k.dim,
            out_dim: k.dim,
        };
        self.rotate(a(at.rotated), a(prev), square);
        let down = MatmulShape {
            rows,
            in_dim: k.dim,
            out_dim: km.rank,
        };
        be.matmul_forward(a(at.low), a(at.rotated), p(m.v), down);
        let per_channel = ScaleShape {
            rows,
            groups: k.dim,
            inner: 1,
        };
        let overwrite = Accumulate::Overwrite;
        be.scale_forward(
            a(at.evolved),
            a(at.rotated),
            self.koopman_diag(acts, s, m),
            per_channel,
            overwrite,
        );
        let up = MatmulShape {
            rows,
            in_dim: km.rank,
            out_dim: k.dim,
        };
        // The low-rank term goes through `predicted` (overwritten just after) on its way.
        be.matmul_forward(a(at.predicted), a(at.low), p(m.u), up);
        be.accumulate(a(at.evolved), a(at.predicted));
        self.rotate(a(at.predicted), a(at.evolved), square);
        let (mix, dim) = (a(s.mix), k.dim);
        be.scale_forward(
            a(at.capsules),
            a(at.observed),
            mix.slice(0, dim),
            per_channel,
            overwrite,
        );
        let add = Accumulate::Add;
        be.scale_forward(
            a(at.capsules),
            a(at.predicted),
            mix.slice(dim, dim),
            per_channel,
            add,
        );
    }

    /// The `D` that `K` multiplies by: clamped with the stability clamp, else the weights'.
    pub(super) fn koopman_diag<'m>(
        &'m self,
        acts: &'m Activations<B>,
        s: &CapsuleActivations,
        m: crate::layout::KoopmanParams,
    ) -> View<'m, B> {
        match s.diag.len {
            0 => view::<B>(self.weights(), m.diag),
            _ => view::<B>(&acts.memory, s.diag),
        }
    }

    /// `out = inp·H` for the Koopman rotation (`H` symmetric), or a copy without one.
    pub(super) fn rotate(&self, out: View<'_, B>, inp: View<'_, B>, s: MatmulShape) {
        match &self.rotation {
            Some(h) => self.backend.matmul_forward(out, inp, View::whole(h), s),
            None => self.backend.copy(out, inp),
        }
    }

    /// A mixture of experts in place of layer `l`'s MLP, from `xn_ffn` into `mlp_proj`: the
    /// router's logits and the top-1 routing, on the host in f32 whatever the backend's
    /// precision ([`Routing`]; a router's decisions are discrete, and a bf16 product would
    /// flip near-ties: the Switch Transformer keeps its router in f32 too), the rows gathered in
    /// expert order (an embedding lookup with the row numbers as ids), each expert's MLP on
    /// its rows, the gates, and the rows scattered back (the embedding's backward: a scatter-
    /// add into zeros).
    fn moe_forward(
        &self,
        acts: &Activations<B>,
        l: usize,
        moe: &crate::layout::MoeParams,
        s: &LayerActivations,
        n: usize,
    ) {
        let cfg = &self.config;
        let (c, f, e) = (cfg.dim, cfg.hidden_dim, moe.experts);
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let mm = |rows, in_dim, out_dim| MatmulShape {
            rows,
            in_dim,
            out_dim,
        };
        let (mut xn, mut router) = (vec![0.0; n * c], vec![0.0; e * c]);
        be.download(a(s.xn_ffn), &mut xn)
            .and_then(|_| be.download(p(moe.router), &mut router))
            .unwrap_or_else(|err| panic!("the router's inputs: {err}"));
        let logits: Vec<f32> = xn
            .chunks_exact(c)
            .flat_map(|x| {
                router.chunks_exact(c).map(move |w| {
                    x.iter()
                        .zip(w)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32
                })
            })
            .collect();
        let routing = Routing::of_logits(&logits, e);
        be.embedding_forward(a(s.moe_x), a(s.xn_ffn), &routing.perm, c);
        let slope = mlp_slope(cfg.arch.mlp);
        for expert in 0..e {
            let (start, rows) = (routing.offsets[expert], routing.offsets[expert + 1]);
            let k = rows - start;
            if k == 0 {
                continue;
            }
            let (up, hidden) = (
                a(s.up).slice(start * f, k * f),
                a(s.hidden).slice(start * f, k * f),
            );
            let x = a(s.moe_x).slice(start * c, k * c);
            be.matmul_forward(up, x, p(moe.up(expert)), mm(k, c, f));
            be.relu2_forward(hidden, up, slope);
            let y = a(s.moe_y).slice(start * c, k * c);
            be.matmul_forward(y, hidden, p(moe.down(expert)), mm(k, f, c));
        }
        be.upload(a(s.moe_gates), &routing.gates())
            .unwrap_or_else(|err| panic!("the gates: {err}"));
        // Each row's output times its gate (a per-row scale: one "group" per row).
        let per_row = ScaleShape {
            rows: 1,
            groups: n,
            inner: c,
        };
        be.scale_forward(
            a(s.moe_gated),
            a(s.moe_y),
            a(s.moe_gates),
            per_row,
            Accumulate::Overwrite,
        );
        be.zero(a(s.mlp_proj));
        be.embedding_backward(a(s.mlp_proj), a(s.moe_gated), &routing.perm, c);
        acts.routing.lock().unwrap()[l] = routing;
    }

    /// Decoding: stores this position's keys and values in the cache's row `pos` of layer
    /// `l`, then attends over the cache's first `pos + 1` rows.
    fn attend_cached(&self, slot: &CacheSlot<B>, l: usize, out: View<B>, inputs: Qkv<B>) {
        let cfg = &self.config;
        let (cache, pos) = (slot.cache, slot.pos);
        let row = cfg.n_kv_heads * cfg.head_dim;
        // Sequence b's row `pos` of `(batch, capacity, row)`.
        for b in 0..cache.batch {
            let at = |r: Region| {
                let start = (b * cache.capacity + pos) * row;
                view::<B>(&cache.memory, r).slice(start, row)
            };
            self.backend
                .copy(at(cache.keys[l]), inputs.k.slice(b * row, row));
            self.backend
                .copy(at(cache.values[l]), inputs.v.slice(b * row, row));
        }
        let keys = view::<B>(&cache.memory, cache.keys[l]);
        let values = view::<B>(&cache.memory, cache.values[l]);
        let shape = DecodeShape {
            batch: cache.batch,
            len: pos + 1,
            capacity: cache.capacity,
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        self.backend
            .attention_decode(out, inputs.q, keys, values, shape);
    }

    /// `out = x + branch`, or `x + scale ⊙ branch` with a branch scale.
    pub(super) fn branch_add(
        &self,
        out: View<B>,
        x: View<B>,
        branch: View<B>,
        scale: Option<Region>,
        n: usize,
    ) {
        let c = self.config.dim;
        match scale {
            Some(sc) => {
                self.backend.copy(out, x);
                let sc = view::<B>(self.weights(), sc);
                let shape = ScaleShape {
                    rows: n,
                    groups: c,
                    inner: 1,
                };
                self.backend
                    .scale_forward(out, branch, sc, shape, Accumulate::Add);
            }
            None => self.backend.residual_forward(out, x, branch),
        }
    }

    /// The constant gain of a weightless RMSNorm: `len` ones.
    pub(super) fn ones(&self, len: usize) -> View<'_, B> {
        View::new(&self.ones, 0, len)
    }

    /// The gain of layer `l`'s attention or MLP norm: its learned one (`r`), else the
    /// constant 1/√(l + 1) with `arch.ln_scale`, else ones.
    pub(super) fn block_gain(&self, r: Option<Region>, l: usize) -> View<'_, B> {
        let c = self.config.dim;
        match r {
            Some(r) => view::<B>(self.weights(), r),
            None if self.config.arch.ln_scale => {
                let widest = c.max(self.config.head_dim);
                View::new(&self.ones, widest + l * c, c)
            }
            None => self.ones(c),
        }
    }

    /// Where a weightless RMSNorm's (discarded) gain gradient goes.
    pub(super) fn ones_sink(&self, len: usize) -> View<'_, B> {
        View::new(&self.ones_grad, 0, len)
    }

    /// Row `i` of the U-Net skip weights in `memory` (parameters or gradients).
    pub(super) fn skip_row<'m>(&self, memory: &'m B::Memory, i: usize) -> View<'m, B> {
        let c = self.config.dim;
        let r = self.layout.skip_weights.expect("a model with U-Net skips");
        view::<B>(memory, r).slice(i * c, c)
    }
}
