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

use crate::backend::{Accumulate, AdamWStep, Backend, MuonStep, View};
use crate::config::{Mlp, ModelConfig};
use layout::skip_source;
pub use layout::{ActivationLayout, Init, ParamKind, ParamLayout, ParamSpec, Region};

/// AdamW hyper-parameters for one optimizer step (the schedule lives with the trainer).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Learning rates and constants of [`Model::muon_adam_step`] for one step (the schedule's
/// multiplier already applied to the rates).
#[derive(Clone, Copy, Debug)]
pub struct MuonAdam {
    pub matrix_lr: f32,
    pub momentum: f32,
    pub ns_steps: usize,
    pub weight_decay: f32,
    pub embed_lr: f32,
    pub head_lr: f32,
    pub scalar_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// A model's parameters, gradients and optimizer state on one backend.
pub struct Model<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    pub layout: ParamLayout,
    pub params: B::Memory,    // (P) every parameter, laid out by `layout`
    pub grads: B::Memory,     // (P) same layout; accumulated (+=) by backward
    pub optimizer: B::Memory, // (2P) AdamW first moments, then second moments
    /// With quantization-aware training: the weights the forward and backward read, each
    /// tensor quantized and dequantized by the rule's scheme (straight-through estimator:
    /// gradients flow to `params` as if the rounding were the identity).
    qat: Option<(crate::packed::PackRule, B::Memory)>,
    /// Exponential moving average of the weights, with its decay.
    pub ema: Option<(f32, B::Memory)>,
    /// max(C, D) ones: the gain of a weightless RMSNorm.
    ones: B::Memory,
    /// Where the backward writes a weightless RMSNorm's gain gradient (discarded).
    ones_grad: B::Memory,
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
    /// The last token fed (the hashed bigram embedding pairs it with the next).
    last_token: Option<u32>,
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
        let widest = config.dim.max(config.head_dim);
        let ones = backend.alloc(widest);
        backend.upload(View::whole(&ones, widest), &vec![1.0; widest]);
        let ones_grad = backend.alloc(widest);
        Ok(Model {
            backend,
            config,
            layout,
            params,
            grads,
            optimizer,
            qat: None,
            ema: None,
            ones,
            ones_grad,
            step: 0,
        })
    }

    /// Each tensor as its [`Init`] says: by default llama2.c / GPT-2's matrices N(0, 0.02),
    /// residual-output matrices N(0, 0.02/√(2L)) so the residual stream's variance does not
    /// grow with depth, gains 1; the golf block's own values (see [`ParamLayout::new`]).
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut host = vec![0f32; self.layout.total_len()];
        for spec in &self.layout.specs {
            let values = &mut host[spec.region.offset..][..spec.region.len];
            match &spec.init {
                Init::Normal(std) if *std == 0.0 => values.fill(0.0),
                Init::Normal(std) => {
                    let normal = Normal::new(0.0, *std).expect("finite std");
                    values.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
                }
                Init::Rows(rows) => {
                    let width = values.len() / rows.len();
                    for (chunk, &value) in values.chunks_mut(width).zip(rows) {
                        chunk.fill(value);
                    }
                }
            }
        }
        self.upload_params(&host);
    }

    /// The weights the forward pass reads: the quantized shadow under QAT, else the parameters.
    pub fn weights(&self) -> &B::Memory {
        self.qat.as_ref().map_or(&self.params, |(_, shadow)| shadow)
    }

    /// Turns on quantization-aware training with `rule` (the export's rule, so training and
    /// export quantize identically).
    pub fn enable_qat(&mut self, rule: crate::packed::PackRule) -> Result<()> {
        let shadow = self.backend.alloc(self.param_count());
        self.qat = Some((rule, shadow));
        self.refresh_weights()
    }

    /// Re-quantizes the shadow weights from the parameters (after every optimizer step or
    /// load). A no-op without QAT.
    pub fn refresh_weights(&self) -> Result<()> {
        let Some((rule, shadow)) = &self.qat else {
            return Ok(());
        };
        let mut host = self.download_params();
        crate::packed::fake_quantize(&self.layout, rule, &mut host)?;
        self.backend
            .upload(view::<B>(shadow, self.all(&self.params)), &host);
        Ok(())
    }

    /// Keeps an exponential moving average of the weights, starting from the current ones.
    pub fn enable_ema(&mut self, decay: f32) {
        let n = self.param_count();
        let ema = self.backend.alloc(n);
        self.backend
            .copy(View::whole(&ema, n), View::whole(&self.params, n));
        self.ema = Some((decay, ema));
    }

    /// `ema ← d·ema + (1 − d)·params` (after an optimizer step).
    pub fn update_ema(&self) {
        if let Some((decay, ema)) = &self.ema {
            let n = self.param_count();
            self.backend
                .ema_update(View::whole(ema, n), View::whole(&self.params, n), *decay);
        }
    }

    /// Exchanges the parameters and their moving average (to evaluate or save the average;
    /// call again to swap back). Re-quantizes under QAT.
    pub fn swap_ema(&mut self) -> Result<()> {
        if let Some((_, ema)) = &mut self.ema {
            std::mem::swap(ema, &mut self.params);
            self.refresh_weights()?;
        }
        Ok(())
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
            last_token: None,
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
        cache.last_token = Some(token);
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
        let arch = &cfg.arch;
        let (c, hd, f) = (cfg.dim, cfg.head_dim, cfg.hidden_dim);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let gain = |r: Option<Region>, len: usize| r.map_or(self.ones(len), p);
        let al = &acts.layout;
        let eps = cfg.norm_eps as f32;
        let theta = cfg.rope_theta as f32;
        let rot = cfg.rope_dims();
        use Accumulate::{Add, Overwrite};

        be.embedding_forward(a(al.emb_tok), p(self.layout.embedding), tokens, c);
        if let Some(table) = self.layout.bigram {
            let prev = slot.as_ref().and_then(|s| s.cache.last_token);
            let ids = bigram_ids(tokens, t, prev, arch.bigram_buckets);
            be.embedding_forward(a(al.emb_bigram), p(table), &ids, c);
            be.residual_forward(a(al.embed), a(al.emb_tok), a(al.emb_bigram), n * c);
        }
        if arch.embed_norm {
            let x0 = a(al.residual[0]);
            be.rmsnorm_forward(x0, a(al.rstd_embed), a(al.embed), self.ones(c), n, c, eps);
        }
        let x0 = a(al.residual[0]);
        for (l, (w, s)) in self.layout.layers.iter().zip(&al.layers).enumerate() {
            if let Some((i, j)) = skip_source(cfg, l) {
                let weights = self.skip_row(self.weights(), i);
                be.copy(a(s.x_in), a(al.residual[l]));
                be.scale_forward(a(s.x_in), a(al.residual[j + 1]), weights, n, c, 1, Add);
            }
            if let Some(mix) = w.resid_mix {
                let (m0, m1) = (p(mix).slice(0, c), p(mix).slice(c, c));
                be.scale_forward(a(s.x_blk), a(s.x_in), m0, n, c, 1, Overwrite);
                be.scale_forward(a(s.x_blk), x0, m1, n, c, 1, Add);
            }
            let x = a(s.x_blk);
            let attn_norm = gain(w.attn_norm, c);
            be.rmsnorm_forward(a(s.xn_attn), a(s.rstd_attn), x, attn_norm, n, c, eps);
            be.matmul_forward(a(s.q_lin), a(s.xn_attn), p(w.wq), n, c, nh * hd);
            be.matmul_forward(a(s.k_lin), a(s.xn_attn), p(w.wk), n, c, nkv * hd);
            be.matmul_forward(a(s.v), a(s.xn_attn), p(w.wv), n, c, nkv * hd);
            if let (Some(qr), Some(kr)) = (s.q_rstd, s.k_rstd) {
                let (qn, kn) = (gain(w.q_norm, hd), gain(w.k_norm, hd));
                be.rmsnorm_forward(a(s.q_pre), a(qr), a(s.q_lin), qn, n * nh, hd, eps);
                be.rmsnorm_forward(a(s.k_pre), a(kr), a(s.k_lin), kn, n * nkv, hd, eps);
            }
            let start_pos = slot.as_ref().map_or(0, |c| c.pos);
            be.rope_forward(a(s.q_rope), a(s.q_pre), b, t, nh, hd, rot, theta, start_pos);
            be.rope_forward(a(s.k), a(s.k_pre), b, t, nkv, hd, rot, theta, start_pos);
            if let Some(g) = w.q_gain {
                be.scale_forward(a(s.q), a(s.q_rope), p(g), n, nh, hd, Overwrite);
            }
            if let Some(mix) = w.v_mix {
                let v_first = a(al.layers[0].v);
                let (l0, l1) = (p(mix).slice(0, 1), p(mix).slice(1, 1));
                be.scale_forward(a(s.v_used), a(s.v), l0, n, 1, nkv * hd, Overwrite);
                be.scale_forward(a(s.v_used), v_first, l1, n, 1, nkv * hd, Add);
            }
            match &slot {
                None => be.attention_forward(
                    a(s.attn_out),
                    a(s.attn_saved),
                    a(s.q),
                    a(s.k),
                    a(s.v_used),
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
                    be.copy(at(cache.values[l]), a(s.v_used));
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
            be.matmul_forward(a(s.attn_proj), a(s.attn_out), p(w.wo), n, nh * hd, c);
            self.branch_add(a(s.x_mid), x, a(s.attn_proj), w.attn_scale, n);
            let ffn_norm = gain(w.ffn_norm, c);
            be.rmsnorm_forward(a(s.xn_ffn), a(s.rstd_ffn), a(s.x_mid), ffn_norm, n, c, eps);
            be.matmul_forward(a(s.up), a(s.xn_ffn), p(w.w_up), n, c, f);
            match (arch.mlp, w.w_gate) {
                (Mlp::Swiglu, Some(w_gate)) => {
                    be.matmul_forward(a(s.gate), a(s.xn_ffn), p(w_gate), n, c, f);
                    be.swiglu_forward(a(s.hidden), a(s.gate), a(s.up), n * f);
                }
                (mlp, _) => be.relu2_forward(a(s.hidden), a(s.up), n * f, mlp_slope(mlp)),
            }
            be.matmul_forward(a(s.mlp_proj), a(s.hidden), p(w.w_down), n, f, c);
            let out = a(al.residual[l + 1]);
            self.branch_add(out, a(s.x_mid), a(s.mlp_proj), w.mlp_scale, n);
        }
        let last = a(al.residual[cfg.n_layers]);
        let final_norm = gain(self.layout.final_norm, c);
        be.rmsnorm_forward(
            a(al.xn_final),
            a(al.rstd_final),
            last,
            final_norm,
            n,
            c,
            eps,
        );
        let vocab = cfg.vocab_size;
        let classifier = p(self.layout.classifier);
        be.matmul_forward(a(al.logits_raw), a(al.xn_final), classifier, n, c, vocab);
        if let Some(cap) = arch.logit_softcap {
            be.softcap_forward(a(al.logits), a(al.logits_raw), n * vocab, cap as f32);
        }
        let targets = targets?;
        assert_eq!(targets.len(), n, "forward: expected {b}×{t} targets");
        be.cross_entropy_forward(a(al.losses), a(al.logsumexp), a(al.logits), targets, vocab);
        let mut losses = vec![0.0; n];
        be.download(a(al.losses), &mut losses);
        Some((losses.iter().map(|&x| x as f64).sum::<f64>() / n as f64) as f32)
    }

    /// `out = x + branch`, or `x + scale ⊙ branch` with a branch scale.
    fn branch_add(
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
                self.backend
                    .scale_forward(out, branch, sc, n, c, 1, Accumulate::Add);
            }
            None => self.backend.residual_forward(out, x, branch, n * c),
        }
    }

    /// The constant gain of a weightless RMSNorm: `len` ones.
    fn ones(&self, len: usize) -> View<'_, B> {
        view::<B>(&self.ones, Region { offset: 0, len })
    }

    /// Where a weightless RMSNorm's (discarded) gain gradient goes.
    fn ones_sink(&self, len: usize) -> View<'_, B> {
        view::<B>(&self.ones_grad, Region { offset: 0, len })
    }

    /// Row `i` of the U-Net skip weights in `memory` (parameters or gradients).
    fn skip_row<'m>(&self, memory: &'m B::Memory, i: usize) -> View<'m, B> {
        let c = self.config.dim;
        let r = self.layout.skip_weights.expect("a model with U-Net skips");
        view::<B>(memory, r).slice(i * c, c)
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
        let arch = &cfg.arch;
        let (c, hd, f, vocab) = (cfg.dim, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size);
        let (nh, nkv) = (cfg.n_heads, cfg.n_kv_heads);
        let be = &self.backend;
        let p = |r: Region| view::<B>(self.weights(), r);
        let g = |r: Region| view::<B>(&self.grads, r);
        let a = |r: Region| view::<B>(&acts.memory, r);
        let gain = |r: Option<Region>, len: usize| r.map_or(self.ones(len), p);
        let gain_grad = |r: Option<Region>, len: usize| r.map_or(self.ones_sink(len), g);
        let al = &acts.layout;
        let d = &al.grads;
        let theta = cfg.rope_theta as f32;
        let rot = cfg.rope_dims();
        let encoders = cfg.n_layers / 2;
        use Accumulate::{Add, Overwrite};

        if arch.value_residual {
            be.zero(a(d.v_first));
        }
        if arch.resid_mix {
            be.zero(a(d.x0));
        }
        be.cross_entropy_backward(
            a(d.logits),
            a(al.logits),
            a(al.logsumexp),
            targets,
            vocab,
            loss_weight / n as f32,
        );
        if let Some(cap) = arch.logit_softcap {
            be.softcap_backward(
                a(d.logits_raw),
                a(d.logits),
                a(al.logits),
                n * vocab,
                cap as f32,
            );
        }
        be.matmul_backward(
            a(d.xn),
            g(self.layout.classifier),
            a(d.logits_raw),
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
            gain_grad(self.layout.final_norm, c),
            a(d.xn),
            last,
            gain(self.layout.final_norm, c),
            a(al.rstd_final),
            n,
            c,
            Overwrite,
        );

        for (l, (w, s)) in self.layout.layers.iter().zip(&al.layers).enumerate().rev() {
            // An encoder block's output also fed a U-Net skip: add that gradient first.
            if arch.unet_skips && l < encoders {
                let i = encoders - 1 - l;
                if i < d.skips.len() {
                    be.accumulate(a(d.residual), a(d.skips[i]));
                }
            }
            // d.residual holds dL/d(block output); the MLP branch reads it and adds back.
            if let Some(sc) = w.mlp_scale {
                be.scale_backward(
                    a(d.mlp_proj),
                    g(sc),
                    a(d.residual),
                    a(s.mlp_proj),
                    p(sc),
                    n,
                    c,
                    1,
                    Overwrite,
                );
            }
            be.matmul_backward(
                a(d.hidden),
                g(w.w_down),
                a(d.mlp_proj),
                a(s.hidden),
                p(w.w_down),
                n,
                f,
                c,
                Overwrite,
            );
            let mut up_mode = Overwrite;
            match (arch.mlp, w.w_gate) {
                (Mlp::Swiglu, Some(w_gate)) => {
                    be.swiglu_backward(a(d.gate), a(d.up), a(d.hidden), a(s.gate), a(s.up), n * f);
                    be.matmul_backward(
                        a(d.xn),
                        g(w_gate),
                        a(d.gate),
                        a(s.xn_ffn),
                        p(w_gate),
                        n,
                        c,
                        f,
                        Overwrite,
                    );
                    up_mode = Add;
                }
                (mlp, _) => be.relu2_backward(a(d.up), a(d.hidden), a(s.up), n * f, mlp_slope(mlp)),
            }
            be.matmul_backward(
                a(d.xn),
                g(w.w_up),
                a(d.up),
                a(s.xn_ffn),
                p(w.w_up),
                n,
                c,
                f,
                up_mode,
            );
            be.rmsnorm_backward(
                a(d.residual),
                gain_grad(w.ffn_norm, c),
                a(d.xn),
                a(s.x_mid),
                gain(w.ffn_norm, c),
                a(s.rstd_ffn),
                n,
                c,
                Add,
            );
            // Now dL/d(x_mid); the attention branch likewise.
            if let Some(sc) = w.attn_scale {
                be.scale_backward(
                    a(d.attn_proj),
                    g(sc),
                    a(d.residual),
                    a(s.attn_proj),
                    p(sc),
                    n,
                    c,
                    1,
                    Overwrite,
                );
            }
            be.matmul_backward(
                a(d.attn_out),
                g(w.wo),
                a(d.attn_proj),
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
                a(s.v_used),
                a(s.attn_saved),
                b,
                t,
                nh,
                nkv,
                hd,
            );
            if let Some(gn) = w.q_gain {
                be.scale_backward(
                    a(d.q_rope),
                    g(gn),
                    a(d.q),
                    a(s.q_rope),
                    p(gn),
                    n,
                    nh,
                    hd,
                    Overwrite,
                );
            }
            be.rope_backward(a(d.q_pre), a(d.q_rope), b, t, nh, hd, rot, theta);
            be.rope_backward(a(d.k_pre), a(d.k), b, t, nkv, hd, rot, theta);
            if let Some(mix) = w.v_mix {
                // v_used = λ₀·v + λ₁·v_first: λ₀ part to this block's v, λ₁ part saved for
                // the first block.
                let kvd = nkv * hd;
                let (l0, l1) = (p(mix).slice(0, 1), p(mix).slice(1, 1));
                let (g0, g1) = (g(mix).slice(0, 1), g(mix).slice(1, 1));
                let v_first = a(al.layers[0].v);
                be.scale_backward(a(d.v_lin), g0, a(d.v), a(s.v), l0, n, 1, kvd, Overwrite);
                be.scale_backward(a(d.v_first), g1, a(d.v), v_first, l1, n, 1, kvd, Add);
            } else if arch.value_residual {
                // The first block: its values were also every later block's v_first.
                be.residual_forward(a(d.v_lin), a(d.v), a(d.v_first), n * nkv * hd);
            }
            if let (Some(qr), Some(kr)) = (s.q_rstd, s.k_rstd) {
                be.rmsnorm_backward(
                    a(d.q_lin),
                    gain_grad(w.q_norm, hd),
                    a(d.q_pre),
                    a(s.q_lin),
                    gain(w.q_norm, hd),
                    a(qr),
                    n * nh,
                    hd,
                    Overwrite,
                );
                be.rmsnorm_backward(
                    a(d.k_lin),
                    gain_grad(w.k_norm, hd),
                    a(d.k_pre),
                    a(s.k_lin),
                    gain(w.k_norm, hd),
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
                a(d.v_lin),
                a(s.xn_attn),
                p(w.wv),
                n,
                c,
                nkv * hd,
                Add,
            );
            be.rmsnorm_backward(
                a(d.residual),
                gain_grad(w.attn_norm, c),
                a(d.xn),
                a(s.x_blk),
                gain(w.attn_norm, c),
                a(s.rstd_attn),
                n,
                c,
                Add,
            );
            // Now dL/d(x_blk). Through resid_mix to x_in (and to x0, collected in d.x0).
            if let Some(mix) = w.resid_mix {
                let (m0, m1) = (p(mix).slice(0, c), p(mix).slice(c, c));
                let (g0, g1) = (g(mix).slice(0, c), g(mix).slice(c, c));
                let x0 = a(al.residual[0]);
                be.scale_backward(
                    a(d.xn),
                    g0,
                    a(d.residual),
                    a(s.x_in),
                    m0,
                    n,
                    c,
                    1,
                    Overwrite,
                );
                be.scale_backward(a(d.x0), g1, a(d.residual), x0, m1, n, c, 1, Add);
                be.copy(a(d.residual), a(d.xn));
            }
            // Now dL/d(x_in); through the skip to the encoder output, identity to residual[l].
            if let Some((i, j)) = skip_source(cfg, l) {
                be.scale_backward(
                    a(d.skips[i]),
                    self.skip_row(&self.grads, i),
                    a(d.residual),
                    a(al.residual[j + 1]),
                    self.skip_row(self.weights(), i),
                    n,
                    c,
                    1,
                    Overwrite,
                );
            }
        }
        if arch.resid_mix {
            be.accumulate(a(d.residual), a(d.x0));
        }
        if arch.embed_norm {
            be.rmsnorm_backward(
                a(d.embed),
                self.ones_sink(c),
                a(d.residual),
                a(al.embed),
                self.ones(c),
                a(al.rstd_embed),
                n,
                c,
                Overwrite,
            );
        }
        be.embedding_backward(g(self.layout.embedding), a(d.embed), tokens, c);
        if let Some(table) = self.layout.bigram {
            let ids = bigram_ids(tokens, t, None, arch.bigram_buckets);
            be.embedding_backward(g(table), a(d.embed), &ids, c);
        }
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

    /// One step of the parameter-golf baseline's optimizer split: Muon for the blocks' 2-D
    /// matrices, Adam (no weight decay) for the embeddings (`embed_lr`), an untied classifier
    /// (`head_lr`) and the gains and control tensors (`scalar_lr`). Muon keeps its momentum in
    /// the first-moment half of the optimizer arena.
    pub fn muon_adam_step(&mut self, hp: &MuonAdam, grad_scale: f32) {
        self.step += 1;
        let n = self.param_count();
        for spec in &self.layout.specs {
            let r = spec.region;
            let m = view::<B>(&self.optimizer, r);
            let v = view::<B>(
                &self.optimizer,
                Region {
                    offset: n + r.offset,
                    len: r.len,
                },
            );
            let (p, g) = (view::<B>(&self.params, r), view::<B>(&self.grads, r));
            let in_block = spec.name.starts_with("model.layers.");
            let lr = match spec.kind {
                ParamKind::Matrix | ParamKind::ResidualMatrix if in_block => {
                    let step = MuonStep {
                        learning_rate: hp.matrix_lr,
                        momentum: hp.momentum,
                        nesterov: true,
                        ns_steps: hp.ns_steps,
                        weight_decay: hp.weight_decay,
                        grad_scale,
                    };
                    let (rows, cols) = (spec.shape[0], spec.shape[1]);
                    self.backend.muon_step(p, g, m, rows, cols, &step);
                    continue;
                }
                ParamKind::Embedding => hp.embed_lr,
                ParamKind::Matrix | ParamKind::ResidualMatrix => hp.head_lr,
                ParamKind::NormGain | ParamKind::Control => hp.scalar_lr,
            };
            let step = AdamWStep {
                learning_rate: lr,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                weight_decay: 0.0,
                step: self.step,
                grad_scale,
            };
            self.backend.adamw_step(p, g, m, v, &step);
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

/// The slope of the MLP's (leaky) ReLU²; 0 for the plain one.
fn mlp_slope(mlp: Mlp) -> f32 {
    match mlp {
        Mlp::LeakyRelu2 { slope } => slope as f32,
        Mlp::Relu2 | Mlp::Swiglu => 0.0,
    }
}

/// Bucket of each position's (previous, current) token pair in the hashed bigram embedding:
/// `((prev + 1) · 1000003 + cur) mod buckets`, with `prev + 1 = 0` at a sequence's first
/// position (`prev` is the token before `tokens[0]` when decoding one token at a time).
/// `bench/peers/golf.py` computes the same.
pub fn bigram_ids(tokens: &[u32], seq: usize, prev: Option<u32>, buckets: usize) -> Vec<u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &cur)| {
            let before = if i % seq > 0 {
                Some(tokens[i - 1])
            } else {
                prev
            };
            let code = before.map_or(0, |p| p as u64 + 1);
            ((code * 1_000_003 + cur as u64) % buckets as u64) as u32
        })
        .collect()
}
