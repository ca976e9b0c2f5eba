//! The Llama-family transformer (Llama 2 / TinyStories, Qwen3), forward and backward written
//! once against [`Backend`] as explicit kernel calls — no autograd tape.
//!
//! Block l, with N = B·T rows and the residual stream `x`:
//! ```text
//! xn = rmsnorm(x)                      q, k, v = xn·Wqᵀ, xn·Wkᵀ, xn·Wvᵀ
//! q, k = rmsnorm_per_head(q, k)        (qk_norm only)
//! q, k = rope(q), rope(k)              a = attention(q, k, v)
//! x = x + a·Woᵀ
//! xn = rmsnorm(x)                      x = x + (silu(xn·Wgateᵀ) ∘ xn·Wupᵀ)·Wdownᵀ
//! ```
//! then `logits = rmsnorm(x)·Wclsᵀ` and the mean cross-entropy.
//!
//! Parameters, gradients and the two AdamW moments are each one arena laid out by
//! [`ParamLayout`]; a step's activations are one arena laid out by [`ActivationLayout`].

pub mod layout;

use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::backend::{Accumulate, AdamWStep, Backend, View};
use crate::config::ModelConfig;
pub use layout::{ActivationLayout, ParamKind, ParamLayout, ParamSpec, Region};

/// AdamW hyper-parameters for one optimizer step (the schedule lives with the trainer).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// A model's parameters, gradients and optimizer state on one backend.
pub struct Model<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub params: B::Memory,    // (P) every parameter, laid out by `layout`
    pub grads: B::Memory,     // (P) same layout; accumulated (+=) by backward
    pub optimizer: B::Memory, // (2P) AdamW first moments, then second moments
    /// AdamW steps taken (bias correction).
    pub step: u64,
}

/// A step's activation arena at one (batch, seq).
pub struct Activations<B: Backend> {
    pub layout: ActivationLayout,
    pub memory: B::Memory,
}

/// Keys and values of every position decoded so far (batch 1), for sampling one token at a
/// time without recomputing the context.
pub struct KvCache<B: Backend> {
    /// Per layer: keys then values, each `(capacity, Hkv·D)`.
    memory: B::Memory,
    keys: Vec<Region>,
    values: Vec<Region>,
    capacity: usize,
    /// Positions filled.
    pub len: usize,
    /// Activations of one token.
    acts: Activations<B>,
}

/// Where a forward pass reads and writes its keys and values when decoding.
struct CacheSlot<'a, B: Backend> {
    cache: &'a KvCache<B>,
    pos: usize,
}

fn view<B: Backend>(memory: &B::Memory, region: Region) -> View<'_, B> {
    View {
        memory,
        offset: region.offset,
        len: region.len,
    }
}

impl<B: Backend> Model<B> {
    /// A zero-initialised model (call [`Model::init_random`] or load weights).
    pub fn new(backend: B, config: ModelConfig) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        let n = layout.total_len();
        let params = backend.alloc(n);
        let grads = backend.alloc(n);
        let optimizer = backend.alloc(2 * n);
        Ok(Model {
            backend,
            config,
            layout,
            params,
            grads,
            optimizer,
            step: 0,
        })
    }

    /// llama2.c / GPT-2 initialisation: matrices N(0, 0.02), residual-output matrices
    /// N(0, 0.02/√(2L)) so the residual stream's variance does not grow with depth, gains 1.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let residual_std = 0.02 / (2.0 * self.config.n_layers as f32).sqrt();
        let mut host = vec![0f32; self.layout.total_len()];
        for spec in &self.layout.specs {
            let values = &mut host[spec.region.offset..][..spec.region.len];
            let std = match spec.kind {
                ParamKind::NormGain => {
                    values.fill(1.0);
                    continue;
                }
                ParamKind::ResidualMatrix => residual_std,
                ParamKind::Matrix | ParamKind::Embedding => 0.02,
            };
            let normal = Normal::new(0.0, std).expect("finite std");
            values.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
        }
        self.upload_params(&host);
    }

    pub fn param_count(&self) -> usize {
        self.layout.total_len()
    }

    fn all(&self, memory: &B::Memory) -> Region {
        let len = if std::ptr::eq(memory, &self.optimizer) {
            2
        } else {
            1
        } * self.param_count();
        Region { offset: 0, len }
    }

    pub fn upload_params(&self, host: &[f32]) {
        self.backend
            .upload(view::<B>(&self.params, self.all(&self.params)), host);
    }

    pub fn download_params(&self) -> Vec<f32> {
        let mut host = vec![0.0; self.param_count()];
        self.backend
            .download(view::<B>(&self.params, self.all(&self.params)), &mut host);
        host
    }

    pub fn download_grads(&self) -> Vec<f32> {
        let mut host = vec![0.0; self.param_count()];
        self.backend
            .download(view::<B>(&self.grads, self.all(&self.grads)), &mut host);
        host
    }

    pub fn upload_optimizer(&self, host: &[f32]) {
        self.backend
            .upload(view::<B>(&self.optimizer, self.all(&self.optimizer)), host);
    }

    /// Writes one named tensor.
    pub fn set_param(&self, name: &str, values: &[f32]) -> Result<()> {
        let Some(spec) = self.layout.find(name) else {
            bail!("model has no parameter named '{name}'");
        };
        if spec.region.len != values.len() {
            bail!(
                "parameter '{name}' has shape {:?} ({} values), got {} values",
                spec.shape,
                spec.region.len,
                values.len()
            );
        }
        self.backend
            .upload(view::<B>(&self.params, spec.region), values);
        Ok(())
    }

    /// An activation arena for steps of `batch` sequences of `seq` tokens.
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations<B>> {
        if seq > self.config.max_seq_len {
            bail!(
                "sequence length {seq} exceeds the model's max_seq_len {}",
                self.config.max_seq_len
            );
        }
        let saved = self
            .backend
            .attention_saved_len(batch, seq, self.config.n_heads);
        let layout = ActivationLayout::new(&self.config, batch, seq, saved);
        let memory = self.backend.alloc(layout.total_len());
        Ok(Activations { layout, memory })
    }

    /// An empty KV cache for up to `capacity` positions (at most `max_seq_len`).
    pub fn kv_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        let capacity = capacity.min(self.config.max_seq_len);
        let row = capacity * self.config.kv_dim();
        let l = self.config.n_layers;
        let keys = (0..l)
            .map(|i| Region {
                offset: 2 * i * row,
                len: row,
            })
            .collect();
        let values = (0..l)
            .map(|i| Region {
                offset: (2 * i + 1) * row,
                len: row,
            })
            .collect();
        let layout = ActivationLayout::new(&self.config, 1, 1, 0);
        let acts = Activations {
            memory: self.backend.alloc(layout.total_len()),
            layout,
        };
        Ok(KvCache {
            memory: self.backend.alloc(2 * l * row),
            keys,
            values,
            capacity,
            len: 0,
            acts,
        })
    }

    /// Feeds one token at the cache's next position; returns the logits `(V)` that predict the
    /// token after it.
    pub fn decode_step(&self, cache: &mut KvCache<B>, token: u32) -> Result<Vec<f32>> {
        if cache.len >= cache.capacity {
            bail!(
                "the KV cache is full ({} positions; max_seq_len {})",
                cache.capacity,
                self.config.max_seq_len
            );
        }
        let slot = CacheSlot {
            cache,
            pos: cache.len,
        };
        self.forward_with(&cache.acts, &[token], None, Some(slot));
        cache.len += 1;
        Ok(self.download_logits(&cache.acts))
    }

    pub fn zero_grad(&self) {
        self.backend
            .zero(view::<B>(&self.grads, self.all(&self.grads)));
    }

    /// Runs the model on `tokens (B·T)`, leaving logits in the arena; with `targets`, also the
    /// per-position losses, and returns their mean.
    pub fn forward(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
    ) -> Option<f32> {
        self.forward_with(acts, tokens, targets, None)
    }

    /// The forward pass; with a cache slot, `tokens` is one token at position `slot.pos`, its
    /// keys and values are stored in the cache, and attention reads the cache.
    fn forward_with(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: Option<&[u32]>,
        slot: Option<CacheSlot<B>>,
    ) -> Option<f32> {
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let n = b * t;
        assert_eq!(tokens.len(), n, "forward: expected {b}×{t} tokens");
        let cfg = &self.config;
        let (c, hd, f) = (cfg.dim, cfg.head_dim, cfg.hidden_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let be = &self.backend;
        let p = |r: Region| view::<B>(&self.params, r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let al = &acts.layout;
        let eps = cfg.norm_eps as f32;
        let theta = cfg.rope_theta as f32;

        be.embedding_forward(a(al.residual[0]), p(self.layout.embedding), tokens, c);
        for (l, (w, s)) in self.layout.layers.iter().zip(&al.layers).enumerate() {
            let x = a(al.residual[l]);
            be.rmsnorm_forward(a(s.xn_attn), a(s.rstd_attn), x, p(w.attn_norm), n, c, eps);
            be.matmul_forward(a(s.q_lin), a(s.xn_attn), p(w.wq), n, c, nh * hd);
            be.matmul_forward(a(s.k_lin), a(s.xn_attn), p(w.wk), n, c, nkv * hd);
            be.matmul_forward(a(s.v), a(s.xn_attn), p(w.wv), n, c, nkv * hd);
            if let (Some(qn), Some(kn), Some(qr), Some(kr)) =
                (w.q_norm, w.k_norm, s.q_rstd, s.k_rstd)
            {
                be.rmsnorm_forward(a(s.q_pre), a(qr), a(s.q_lin), p(qn), n * nh, hd, eps);
                be.rmsnorm_forward(a(s.k_pre), a(kr), a(s.k_lin), p(kn), n * nkv, hd, eps);
            }
            let start_pos = slot.as_ref().map_or(0, |c| c.pos);
            be.rope_forward(a(s.q), a(s.q_pre), b, t, nh, hd, theta, start_pos);
            be.rope_forward(a(s.k), a(s.k_pre), b, t, nkv, hd, theta, start_pos);
            match &slot {
                None => be.attention_forward(
                    a(s.attn_out),
                    a(s.attn_saved),
                    a(s.q),
                    a(s.k),
                    a(s.v),
                    b,
                    t,
                    nh,
                    nkv,
                    hd,
                ),
                Some(CacheSlot { cache, pos }) => {
                    let row = nkv * hd;
                    let at = |r: Region| {
                        view::<B>(
                            &cache.memory,
                            Region {
                                offset: r.offset + pos * row,
                                len: row,
                            },
                        )
                    };
                    be.copy(at(cache.keys[l]), a(s.k));
                    be.copy(at(cache.values[l]), a(s.v));
                    let keys = view::<B>(&cache.memory, cache.keys[l]);
                    let values = view::<B>(&cache.memory, cache.values[l]);
                    be.attention_decode(
                        a(s.attn_out),
                        a(s.q),
                        keys,
                        values,
                        1,
                        pos + 1,
                        cache.capacity,
                        nh,
                        nkv,
                        hd,
                    );
                }
            }
            // The attention projection goes into `xn_ffn` as scratch before the residual add.
            be.matmul_forward(a(s.xn_ffn), a(s.attn_out), p(w.wo), n, nh * hd, c);
            be.residual_forward(a(s.x_mid), x, a(s.xn_ffn), n * c);
            be.rmsnorm_forward(
                a(s.xn_ffn),
                a(s.rstd_ffn),
                a(s.x_mid),
                p(w.ffn_norm),
                n,
                c,
                eps,
            );
            be.matmul_forward(a(s.gate), a(s.xn_ffn), p(w.w_gate), n, c, f);
            be.matmul_forward(a(s.up), a(s.xn_ffn), p(w.w_up), n, c, f);
            be.swiglu_forward(a(s.hidden), a(s.gate), a(s.up), n * f);
            // The MLP output likewise uses `xn_final` as scratch: it is free until the end.
            be.matmul_forward(a(al.xn_final), a(s.hidden), p(w.w_down), n, f, c);
            be.residual_forward(a(al.residual[l + 1]), a(s.x_mid), a(al.xn_final), n * c);
        }
        let last = a(al.residual[cfg.n_layers]);
        be.rmsnorm_forward(
            a(al.xn_final),
            a(al.rstd_final),
            last,
            p(self.layout.final_norm),
            n,
            c,
            eps,
        );
        be.matmul_forward(
            a(al.logits),
            a(al.xn_final),
            p(self.layout.classifier),
            n,
            c,
            cfg.vocab_size,
        );
        let targets = targets?;
        assert_eq!(targets.len(), n, "forward: expected {b}×{t} targets");
        be.cross_entropy_forward(
            a(al.losses),
            a(al.logsumexp),
            a(al.logits),
            targets,
            cfg.vocab_size,
        );
        let mut losses = vec![0.0; n];
        be.download(a(al.losses), &mut losses);
        Some((losses.iter().map(|&x| x as f64).sum::<f64>() / n as f64) as f32)
    }

    /// Accumulates (`+=`) into `grads` the gradient of `loss_weight · mean loss` of the last
    /// [`Model::forward`] (which must have had targets). `loss_weight` is 1 for one micro-batch,
    /// 1/accumulation steps to average several, or the fp16 loss scale.
    pub fn backward(
        &self,
        acts: &Activations<B>,
        tokens: &[u32],
        targets: &[u32],
        loss_weight: f32,
    ) {
        let (b, t) = (acts.layout.batch, acts.layout.seq);
        let n = b * t;
        let cfg = &self.config;
        let (c, hd, f, vocab) = (cfg.dim, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let be = &self.backend;
        let p = |r: Region| view::<B>(&self.params, r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let al = &acts.layout;
        let d = &al.grads;
        let theta = cfg.rope_theta as f32;
        use Accumulate::{Add, Overwrite};

        be.cross_entropy_backward(
            a(d.logits),
            a(al.logits),
            a(al.logsumexp),
            targets,
            vocab,
            loss_weight / n as f32,
        );
        be.matmul_backward(
            a(d.xn),
            g(self.layout.classifier),
            a(d.logits),
            a(al.xn_final),
            p(self.layout.classifier),
            n,
            c,
            vocab,
            Overwrite,
        );
        let last = a(al.residual[cfg.n_layers]);
        be.rmsnorm_backward(
            a(d.residual),
            g(self.layout.final_norm),
            a(d.xn),
            last,
            p(self.layout.final_norm),
            a(al.rstd_final),
            n,
            c,
            Overwrite,
        );

        for (l, (w, s)) in self.layout.layers.iter().zip(&al.layers).enumerate().rev() {
            // d.residual holds dL/d(block output); the MLP branch reads it and adds back.
            be.matmul_backward(
                a(d.hidden),
                g(w.w_down),
                a(d.residual),
                a(s.hidden),
                p(w.w_down),
                n,
                f,
                c,
                Overwrite,
            );
            be.swiglu_backward(a(d.gate), a(d.up), a(d.hidden), a(s.gate), a(s.up), n * f);
            be.matmul_backward(
                a(d.xn),
                g(w.w_gate),
                a(d.gate),
                a(s.xn_ffn),
                p(w.w_gate),
                n,
                c,
                f,
                Overwrite,
            );
            be.matmul_backward(
                a(d.xn),
                g(w.w_up),
                a(d.up),
                a(s.xn_ffn),
                p(w.w_up),
                n,
                c,
                f,
                Add,
            );
            be.rmsnorm_backward(
                a(d.residual),
                g(w.ffn_norm),
                a(d.xn),
                a(s.x_mid),
                p(w.ffn_norm),
                a(s.rstd_ffn),
                n,
                c,
                Add,
            );
            // Now dL/d(x_mid); the attention branch likewise.
            be.matmul_backward(
                a(d.attn_out),
                g(w.wo),
                a(d.residual),
                a(s.attn_out),
                p(w.wo),
                n,
                nh * hd,
                c,
                Overwrite,
            );
            be.attention_backward(
                a(d.q),
                a(d.k),
                a(d.v),
                a(d.attn_out),
                a(s.q),
                a(s.k),
                a(s.v),
                a(s.attn_saved),
                b,
                t,
                nh,
                nkv,
                hd,
            );
            be.rope_backward(a(d.q_pre), a(d.q), b, t, nh, hd, theta);
            be.rope_backward(a(d.k_pre), a(d.k), b, t, nkv, hd, theta);
            if let (Some(qn), Some(kn), Some(qr), Some(kr)) =
                (w.q_norm, w.k_norm, s.q_rstd, s.k_rstd)
            {
                be.rmsnorm_backward(
                    a(d.q_lin),
                    g(qn),
                    a(d.q_pre),
                    a(s.q_lin),
                    p(qn),
                    a(qr),
                    n * nh,
                    hd,
                    Overwrite,
                );
                be.rmsnorm_backward(
                    a(d.k_lin),
                    g(kn),
                    a(d.k_pre),
                    a(s.k_lin),
                    p(kn),
                    a(kr),
                    n * nkv,
                    hd,
                    Overwrite,
                );
            }
            be.matmul_backward(
                a(d.xn),
                g(w.wq),
                a(d.q_lin),
                a(s.xn_attn),
                p(w.wq),
                n,
                c,
                nh * hd,
                Overwrite,
            );
            be.matmul_backward(
                a(d.xn),
                g(w.wk),
                a(d.k_lin),
                a(s.xn_attn),
                p(w.wk),
                n,
                c,
                nkv * hd,
                Add,
            );
            be.matmul_backward(
                a(d.xn),
                g(w.wv),
                a(d.v),
                a(s.xn_attn),
                p(w.wv),
                n,
                c,
                nkv * hd,
                Add,
            );
            let x = a(al.residual[l]);
            be.rmsnorm_backward(
                a(d.residual),
                g(w.attn_norm),
                a(d.xn),
                x,
                p(w.attn_norm),
                a(s.rstd_attn),
                n,
                c,
                Add,
            );
        }
        be.embedding_backward(g(self.layout.embedding), a(d.residual), tokens, c);
    }

    /// The global L2 norm of the accumulated gradients.
    pub fn grad_norm(&self) -> f64 {
        self.backend
            .sum_squares(view::<B>(&self.grads, self.all(&self.grads)))
            .sqrt()
    }

    /// One AdamW step over every parameter; `grad_scale` multiplies the gradients first
    /// (clipping, loss-scale removal). Weight decay only where [`ParamSpec::decays`].
    pub fn adamw_step(&mut self, hp: &AdamW, grad_scale: f32) {
        self.step += 1;
        let n = self.param_count();
        for spec in &self.layout.specs {
            let r = spec.region;
            let step = AdamWStep {
                learning_rate: hp.learning_rate,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                weight_decay: if spec.decays() { hp.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            let m = Region {
                offset: r.offset,
                len: r.len,
            };
            let v = Region {
                offset: n + r.offset,
                len: r.len,
            };
            self.backend.adamw_step(
                view::<B>(&self.params, r),
                view::<B>(&self.grads, r),
                view::<B>(&self.optimizer, m),
                view::<B>(&self.optimizer, v),
                &step,
            );
        }
    }

    /// Per-position losses `(B·T)` of the last forward with targets, on the host.
    pub fn download_losses(&self, acts: &Activations<B>) -> Vec<f32> {
        let r = acts.layout.losses;
        let mut host = vec![0.0; r.len];
        self.backend.download(view::<B>(&acts.memory, r), &mut host);
        host
    }

    /// Logits `(B·T, V)` of the last forward, on the host.
    pub fn download_logits(&self, acts: &Activations<B>) -> Vec<f32> {
        let r = acts.layout.logits;
        let mut host = vec![0.0; r.len];
        self.backend.download(view::<B>(&acts.memory, r), &mut host);
        host
    }
}
