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
//! The golf options reshape this loop: the layers run the blocks in `layout.order` (depth
//! recurrence runs some twice, their gradients summed); EngramHash adds its gated memory to
//! one layer's input ([`crate::layout::ActivationLayout::input`]); a parallel-residual layer's
//! MLP reads the layer's input; `ln_scale` damps layer l's norms by 1/√(l + 1); and
//! [`Model::forward_dropping`] skips layers (stochastic depth).
//!
//! Parameters, gradients and the two AdamW moments are each one arena laid out by
//! [`ParamLayout`]; a step's activations are one arena laid out by [`ActivationLayout`].
//! The forward is in `forward.rs`, the backward in `backward.rs`; the optimizer steps that
//! update these arenas are [`crate::optim`]'s.

mod backward;
mod forward;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::backend::{Backend, DType, View};
use crate::config::{Mlp, ModelConfig};
pub use crate::layout::{ActivationLayout, Head, Init, ParamKind, ParamLayout, ParamSpec, Region};
use crate::quant::PackRule;
use crate::Result;

macro_rules! bail {
    ($($message:tt)*) => { $crate::fail!(Shape, $($message)*) };
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
    qat: Option<(PackRule, B::Memory)>,
    /// Exponential moving average of the weights, with its decay.
    pub ema: Option<(f32, B::Memory)>,
    /// max(C, D) ones: the gain of a weightless RMSNorm; then, with `arch.ln_scale`, each
    /// layer l's C values of 1/√(l + 1), its damped norms' gain.
    ones: B::Memory,
    /// Where the backward writes a weightless RMSNorm's gain gradient (discarded), and the
    /// gradients of other constants.
    ones_grad: B::Memory,
    /// Koopman dynamics' rotation `H (dim, dim)`: the orthonormal Hadamard matrix when the
    /// capsule dim is a power of two (none otherwise: no rotation).
    rotation: Option<B::Memory>,
    /// AdamW steps taken (bias correction).
    pub step: u64,
    /// The last prompt's prefill arena, reused by the next prompt of the same length: a
    /// fresh arena is a fresh allocation whose every page faults on first touch (a fifth of
    /// stories110M's 256-token prefill went to the kernel's page faults).
    prefill_arena: std::cell::RefCell<Option<Activations<B>>>,
    /// Ternary noise's scratch (the noised copy of one tensor), kept from step to step.
    noise_scratch: std::cell::RefCell<Option<B::Memory>>,
}

/// A step's activation arena at one (batch, seq).
pub struct Activations<B: Backend> {
    pub layout: ActivationLayout,
    pub memory: B::Memory,
    /// Each mixture-of-experts layer's routing in the last forward (for its backward).
    routing: std::sync::Mutex<Vec<Routing>>,
}

impl<B: Backend> Activations<B> {
    fn new(layout: ActivationLayout, memory: B::Memory) -> Self {
        let layers = layout.layers.len();
        Activations {
            layout,
            memory,
            routing: std::sync::Mutex::new(vec![Routing::default(); layers]),
        }
    }
}

/// Top-1 routing of one mixture-of-experts layer's rows, decided on the host from the router's
/// logits: each row's softmax over the experts and its expert (the first largest
/// probability), and the rows sorted by expert.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub experts: usize,
    /// `(N, E)` each row's probabilities.
    pub probs: Vec<f32>,
    /// Each row's expert.
    pub expert: Vec<u32>,
    /// Rows in expert order: expert e's are `perm[offsets[e]..offsets[e + 1]]`.
    pub perm: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl Routing {
    /// The routing of `(N, E)` router logits.
    pub fn of_logits(logits: &[f32], experts: usize) -> Self {
        let rows = logits.len() / experts;
        let mut probs = vec![0.0; logits.len()];
        let mut expert = vec![0u32; rows];
        for r in 0..rows {
            let z = &logits[r * experts..(r + 1) * experts];
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p = &mut probs[r * experts..(r + 1) * experts];
            let mut sum = 0.0;
            for (p, &z) in p.iter_mut().zip(z) {
                *p = (z - max).exp();
                sum += *p;
            }
            let mut best = 0;
            for e in 0..experts {
                p[e] /= sum;
                if p[e] > p[best] {
                    best = e;
                }
            }
            expert[r] = best as u32;
        }
        let mut offsets = vec![0usize; experts + 1];
        for &e in &expert {
            offsets[e as usize + 1] += 1;
        }
        for e in 0..experts {
            offsets[e + 1] += offsets[e];
        }
        let mut next = offsets.clone();
        let mut perm = vec![0u32; rows];
        for (r, &e) in expert.iter().enumerate() {
            perm[next[e as usize]] = r as u32;
            next[e as usize] += 1;
        }
        Routing {
            experts,
            probs,
            expert,
            perm,
            offsets,
        }
    }

    /// Each row's gate (its expert's probability), in expert order.
    pub fn gates(&self) -> Vec<f32> {
        self.perm
            .iter()
            .map(|&r| self.probs[r as usize * self.experts + self.expert[r as usize] as usize])
            .collect()
    }

    /// The gradient of the router's logits `(N, E)`, in row order, from the gates' gradient
    /// `dgates` (in expert order) and the load-balancing loss `weight · E · Σ_e f_e·P_e` (the
    /// softmax's backward: `dz_j = Σ_e dp_e · p_e (δ_ej − p_j)`).
    pub fn router_grad(&self, dgates: &[f32], weight: f32) -> Vec<f32> {
        let (n, e) = (self.expert.len(), self.experts);
        // f_e: the share of rows routed to each expert (no gradient).
        let share: Vec<f32> = (0..e)
            .map(|i| (self.offsets[i + 1] - self.offsets[i]) as f32 / n as f32)
            .collect();
        let mut dz = vec![0.0; n * e];
        let mut dp = vec![0.0; e];
        for (i, &r) in self.perm.iter().enumerate() {
            let r = r as usize;
            let p = &self.probs[r * e..(r + 1) * e];
            // d(aux)/dp_j = weight · E · f_j / N
            for j in 0..e {
                dp[j] = weight * e as f32 * share[j] / n as f32;
            }
            dp[self.expert[r] as usize] += dgates[i];
            let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
            for j in 0..e {
                dz[r * e + j] = p[j] * (dp[j] - dot);
            }
        }
        dz
    }
}

/// Keys and values of every position decoded so far, for `batch` sequences decoded together
/// (each weight read then serves every sequence), for sampling one token at a time without
/// recomputing the context.
pub struct KvCache<B: Backend> {
    /// Per layer: keys then values, each `(batch, capacity, Hkv·D)`.
    memory: B::Memory,
    keys: Vec<Region>,
    values: Vec<Region>,
    /// A capsule bank's keys (= values), `(batch, capacity, dim)`.
    capsules: Option<Region>,
    /// Feedback adapters' keys then values, each adapter's `(batch, capacity, C)`.
    feedback: Option<Region>,
    batch: usize,
    capacity: usize,
    /// Positions filled (the same in every sequence).
    pub len: usize,
    /// Each sequence's last token (the hashed bigram embedding pairs it with the next);
    /// empty before the first.
    last_tokens: Vec<u32>,
    /// Each sequence's token before that (EngramHash's trigrams); empty before the second.
    before_last: Vec<u32>,
    /// Activations of one token per sequence.
    acts: Activations<B>,
}

impl<B: Backend> KvCache<B> {
    /// Feedback adapter `j`'s keys (`half` 0) or values (1), `(batch, capacity, c)`, as a
    /// view of the cache.
    fn feedback_keys(&self, j: usize, half: usize, c: usize) -> View<'_, B> {
        let region = self.feedback.expect("a cache for feedback adapters");
        let one = self.batch * self.capacity * c;
        view::<B>(&self.memory, region).slice((2 * j + half) * one, one)
    }
}

/// Where a forward pass reads and writes its keys and values when decoding.
struct CacheSlot<'a, B: Backend> {
    cache: &'a KvCache<B>,
    pos: usize,
}

fn view<B: Backend>(memory: &B::Memory, region: Region) -> View<'_, B> {
    View::new(memory, region.offset, region.len)
}

/// A view's values on the host.
fn download<B: Backend>(backend: &B, src: View<B>) -> Result<Vec<f32>> {
    let mut host = vec![0.0; src.len()];
    backend.download(src, &mut host)?;
    Ok(host)
}

/// Refuses `bytes` for `what` when the backend says it has less available, naming both and
/// what to change (`hint`).
fn check_memory<B: Backend>(backend: &B, bytes: u128, what: &str, hint: &str) -> Result<()> {
    let Some(available) = backend.memory_available() else {
        return Ok(());
    };
    crate::require!(
        bytes <= available as u128,
        Memory,
        "{what}: {} needed, and {} has {} available: {hint}",
        gigabytes(bytes),
        backend.name(),
        gigabytes(available as u128)
    );
    Ok(())
}

/// Bytes as gigabytes, "12.3 GB".
fn gigabytes(bytes: u128) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

impl<B: Backend> Model<B> {
    /// A zero-initialised model (call [`Model::init_random`] or load weights).
    pub fn new(backend: B, config: ModelConfig) -> Result<Self> {
        Self::with_state(backend, config, true)
    }

    /// A model that only runs forward (sampling, evaluation, decoding benchmarks): no
    /// gradients and no optimizer state, three times the weights' memory saved (1.3 GB for
    /// stories110M). Its backward and optimizer steps are refused.
    pub fn for_inference(backend: B, config: ModelConfig) -> Result<Self> {
        Self::with_state(backend, config, false)
    }

    fn with_state(backend: B, config: ModelConfig, trainable: bool) -> Result<Self> {
        config.validate()?;
        let layout = ParamLayout::new(&config);
        let n = layout.total_len();
        // The parameters, with gradients and two AdamW moments to train, and a host copy of
        // the weights as they are initialised or loaded.
        let copies = if trainable { 5 } else { 2 };
        let what = if trainable {
            "its weights, gradients and optimizer state"
        } else {
            "its weights"
        };
        check_memory(
            &backend,
            4 * copies * n as u128,
            &format!("the model ({n} parameters: {what})"),
            "choose a smaller model",
        )?;
        let params = backend.alloc(n, DType::F32)?;
        let state = if trainable { n } else { 0 };
        let grads = backend.alloc(state, DType::F32)?;
        let optimizer = backend.alloc(2 * state, DType::F32)?;
        // Capsule dims are at most 128, so a Koopman rotation's gradient sink fits in 16,384.
        let capsule_dim = config.arch.capsules.map_or(0, |k| k.dim);
        let widest = config.dim.max(config.head_dim).max(capsule_dim);
        let mut gains = vec![1.0; widest];
        if config.arch.ln_scale {
            for l in 0..config.depth() {
                let damping = 1.0 / ((l + 1) as f32).sqrt();
                gains.extend(std::iter::repeat_n(damping, config.dim));
            }
        }
        let ones = backend.alloc(gains.len(), DType::F32)?;
        backend.upload(View::whole(&ones), &gains)?;
        let ones_grad = backend.alloc(widest.max(capsule_dim * capsule_dim), DType::F32)?;
        let rotation = match config.arch.capsules {
            Some(k) if k.koopman.is_some() && k.dim.is_power_of_two() && k.dim > 1 => {
                let mut h = vec![0.0; k.dim * k.dim];
                for i in 0..k.dim {
                    h[i * k.dim + i] = 1.0;
                }
                crate::quant::hadamard_rows(&mut h, k.dim, k.dim);
                let memory = backend.alloc(h.len(), DType::F32)?;
                backend.upload(View::whole(&memory), &h)?;
                Some(memory)
            }
            _ => None,
        };
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
            rotation,
            step: 0,
            prefill_arena: Default::default(),
            noise_scratch: Default::default(),
        })
    }

    /// Each tensor as its [`Init`] says: by default llama2.c / GPT-2's matrices N(0, 0.02),
    /// residual-output matrices N(0, 0.02/√(2L)) so the residual stream's variance does not
    /// grow with depth, gains 1; the golf block's own values (see [`ParamLayout::new`]).
    pub fn init_random(&mut self, seed: u64) -> Result<()> {
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
        self.upload_params(&host)
    }

    /// The weights the forward pass reads: the quantized shadow under QAT, else the parameters.
    pub fn weights(&self) -> &B::Memory {
        self.qat.as_ref().map_or(&self.params, |(_, shadow)| shadow)
    }

    /// Turns on quantization-aware training with `rule` (the export's rule, so training and
    /// export quantize identically).
    pub fn enable_qat(&mut self, rule: PackRule) -> Result<()> {
        let shadow = self.backend.alloc(self.param_count(), DType::F32)?;
        self.qat = Some((rule, shadow));
        self.refresh_weights()
    }

    /// Re-quantizes the shadow weights from the parameters (after every optimizer step or
    /// load). A no-op without QAT.
    pub fn refresh_weights(&self) -> Result<()> {
        let Some((rule, shadow)) = &self.qat else {
            return Ok(());
        };
        // On the backend, tensor by tensor: the parameters never leave it.
        for spec in &self.layout.specs {
            let scheme = rule.scheme_for(spec.kind, spec.region.len);
            scheme.check()?;
            let (src, dst) = (
                view::<B>(&self.params, spec.region),
                view::<B>(shadow, spec.region),
            );
            let (_, cols) = crate::quant::quant_shape(spec);
            let rotation = crate::quant::rotation_for(spec, scheme, rule.hadamard);
            match scheme.fake(cols) {
                Some(q) => self.backend.fake_quantize(dst, src, q, rotation),
                None => self.backend.copy(dst, src),
            }
        }
        Ok(())
    }

    /// Ternary noise (training only): re-quantizes every ternary tensor of the shadow from
    /// `params + n`, `n` Gaussian with standard deviation `sigma` drawn afresh from `seed` (the
    /// trainer derives it from the run's seed and the step, so a resume draws the same), as
    /// the ternary submission's `TERNARY_NOISE_SCALE` does before its absmean quantization:
    /// the forward sees `Q(w + n)`, the gradient reaches `w` straight through. Other tensors
    /// keep their noise-free quantization; [`Model::refresh_weights`] removes the noise (the
    /// trainer calls it after every optimizer step, so evaluation never sees noise). Returns
    /// how many values were perturbed. A no-op without QAT.
    pub fn refresh_weights_noisy(&self, sigma: f32, seed: u64) -> Result<usize> {
        let Some((rule, shadow)) = &self.qat else {
            return Ok(0);
        };
        let normal = Normal::new(0.0f32, sigma)
            .map_err(|e| crate::error::Error::Config(format!("ternary noise {sigma}: {e}")))?;
        let mut scratch = self.noise_scratch.borrow_mut();
        let mut perturbed = 0;
        for (index, spec) in self.layout.specs.iter().enumerate() {
            let scheme = rule.scheme_for(spec.kind, spec.region.len);
            let (_, cols) = crate::quant::quant_shape(spec);
            let Some(q @ crate::backend::FakeQuant::Ternary { .. }) = scheme.fake(cols) else {
                continue;
            };
            let len = spec.region.len;
            if scratch
                .as_ref()
                .is_none_or(|m| crate::backend::DeviceMemory::len(m) < len)
            {
                *scratch = Some(self.backend.alloc(len, DType::F32)?);
            }
            let noisy = View::new(scratch.as_ref().unwrap(), 0, len);
            // One stream per tensor, so the draws do not depend on the order tensors are visited.
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let noise: Vec<f32> = (0..len).map(|_| normal.sample(&mut rng)).collect();
            self.backend.upload(noisy, &noise)?;
            let src = view::<B>(&self.params, spec.region);
            self.backend.accumulate(noisy, src);
            let rotation = crate::quant::rotation_for(spec, scheme, rule.hadamard);
            self.backend
                .fake_quantize(view::<B>(shadow, spec.region), noisy, q, rotation);
            perturbed += len;
        }
        Ok(perturbed)
    }

    /// Keeps an exponential moving average of the weights, starting from the current ones.
    pub fn enable_ema(&mut self, decay: f32) -> Result<()> {
        let ema = self.backend.alloc(self.param_count(), DType::F32)?;
        self.backend
            .copy(View::whole(&ema), View::whole(&self.params));
        self.ema = Some((decay, ema));
        Ok(())
    }

    /// `ema ← d·ema + (1 − d)·params` (after an optimizer step).
    pub fn update_ema(&self) {
        if let Some((decay, ema)) = &self.ema {
            self.backend
                .ema_update(View::whole(ema), View::whole(&self.params), *decay);
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

    pub fn upload_params(&self, host: &[f32]) -> Result<()> {
        Ok(self.backend.upload(View::whole(&self.params), host)?)
    }

    pub fn download_params(&self) -> Result<Vec<f32>> {
        download(&self.backend, View::whole(&self.params))
    }

    pub fn download_grads(&self) -> Result<Vec<f32>> {
        download(&self.backend, View::whole(&self.grads))
    }

    /// Both moments (the first, then the second), as checkpoints store them.
    pub fn download_optimizer(&self) -> Result<Vec<f32>> {
        download(&self.backend, View::whole(&self.optimizer))
    }

    pub fn upload_optimizer(&self, host: &[f32]) -> Result<()> {
        Ok(self.backend.upload(View::whole(&self.optimizer), host)?)
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
            .upload(view::<B>(&self.params, spec.region), values)?;
        Ok(())
    }

    /// An activation arena for steps of `batch` sequences of `seq` tokens that keeps the
    /// logits (see [`Head`]).
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations<B>> {
        self.activations_with(batch, seq, Head::Logits)
    }

    /// An activation arena whose head leaves only the losses: the classifier and the
    /// cross-entropy run fused, without the `(B·T, V)` logits (training and evaluation).
    pub fn loss_activations(&self, batch: usize, seq: usize) -> Result<Activations<B>> {
        self.activations_with(batch, seq, Head::Loss)
    }

    fn activations_with(&self, batch: usize, seq: usize, head: Head) -> Result<Activations<B>> {
        if seq > self.config.max_seq_len {
            bail!(
                "sequence length {seq} exceeds the model's max_seq_len {}",
                self.config.max_seq_len
            );
        }
        // A bound of the arena's size in wide arithmetic first, so the layout's own products
        // cannot overflow for any batch the caller asks for.
        let c = &self.config;
        let rows = batch as u128 * seq as u128;
        let per_row = (c.vocab_size + c.hidden_dim + c.dim + c.q_dim()) as u128;
        crate::require!(
            rows * per_row * (c.depth() as u128 + 1) * 16 < 1 << 62,
            Memory,
            "a batch of {batch} × {seq} tokens is beyond any machine's memory: lower --batch or \
             --seq"
        );
        let saved = self
            .backend
            .attention_saved_len(crate::backend::AttentionShape {
                batch,
                seq,
                heads: self.config.n_heads,
                kv_heads: self.config.n_kv_heads,
                head_dim: self.config.head_dim,
            });
        let classifier = self
            .backend
            .classifier_saved_len(self.classifier_shape(batch * seq));
        let capsule_saved = self.config.arch.capsules.map_or(0, |k| {
            self.backend
                .attention_saved_len(crate::backend::AttentionShape {
                    batch,
                    seq,
                    heads: k.count,
                    kv_heads: 1,
                    head_dim: k.dim,
                })
        });
        // The feedback adapters' attention: every head its own keys and values.
        let feedback_saved = self.config.arch.feedback.map_or(0, |_| {
            self.backend
                .attention_saved_len(crate::backend::AttentionShape {
                    batch,
                    seq,
                    heads: self.config.n_heads,
                    kv_heads: self.config.n_heads,
                    head_dim: self.config.head_dim,
                })
        });
        let layout = ActivationLayout::new(
            &self.config,
            batch,
            seq,
            (saved, capsule_saved, feedback_saved),
            (head, classifier),
        );
        let vocab = self.config.vocab_size;
        let logits = 4 * rows * vocab as u128;
        check_memory(
            &self.backend,
            4 * layout.total_len() as u128,
            &format!("the activations of a batch of {batch} × {seq} tokens"),
            &format!(
                "lower --batch or --seq, or train with --compact-vocab (a vocabulary of {vocab}; \
                 one set of logits takes {})",
                gigabytes(logits)
            ),
        )?;
        let memory = self.backend.alloc(layout.total_len(), DType::F32)?;
        Ok(Activations::new(layout, memory))
    }

    /// The fused head's shape for `rows` positions.
    pub(super) fn classifier_shape(&self, rows: usize) -> crate::backend::ClassifierShape {
        crate::backend::ClassifierShape {
            rows,
            dim: self.config.dim,
            vocab: self.config.vocab_size,
            softcap: self.config.arch.logit_softcap.map(|cap| cap as f32),
        }
    }

    /// An empty KV cache for up to `capacity` positions (at most `max_seq_len`).
    pub fn kv_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        self.kv_cache_batch(1, capacity)
    }

    /// An empty KV cache for `batch` sequences decoded together, up to `capacity` positions
    /// (at most `max_seq_len`) each.
    pub fn kv_cache_batch(&self, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        if batch == 0 {
            bail!("a KV cache needs at least one sequence");
        }
        let capacity = capacity.min(self.config.max_seq_len);
        let row = batch * capacity * self.config.kv_dim();
        let l = self.config.depth();
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
        let layout = ActivationLayout::new(&self.config, batch, 1, (0, 0, 0), (Head::Logits, 0));
        let memory = self.backend.alloc(layout.total_len(), DType::F32)?;
        let acts = Activations::new(layout, memory);
        // Every pass of a capsule bank keeps its own reads: (passes, batch, capacity, dim).
        let capsules = self.config.arch.capsules.map(|k| Region {
            offset: 2 * l * row,
            len: k.passes() * batch * capacity * k.dim,
        });
        let after = 2 * l * row + capsules.map_or(0, |r| r.len);
        let feedback = self
            .config
            .feedback_span()
            .map(|(_, passes, decoder)| Region {
                offset: after,
                len: 2 * passes * decoder * batch * capacity * self.config.dim,
            });
        let total = after + feedback.map_or(0, |r| r.len);
        Ok(KvCache {
            memory: self.backend.alloc(total, DType::F32)?,
            keys,
            values,
            capsules,
            feedback,
            batch,
            capacity,
            len: 0,
            last_tokens: Vec::new(),
            before_last: Vec::new(),
            acts,
        })
    }

    /// Feeds one token at the cache's next position; returns the logits `(V)` that predict the
    /// token after it.
    pub fn decode_step(&self, cache: &mut KvCache<B>, token: u32) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.decode_step_into(cache, token, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::decode_step`] into `logits` (resized to `V`), so a decoding loop allocates
    /// nothing per token: a fresh 128 KB vector per token cost page faults every time.
    pub fn decode_step_into(
        &self,
        cache: &mut KvCache<B>,
        token: u32,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.decode_batch_into(cache, &[token], logits)
    }

    /// One position of every sequence of a batched cache: `tokens` holds one token per
    /// sequence; `logits` becomes `(batch, V)`.
    pub fn decode_batch_into(
        &self,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if tokens.len() != cache.batch {
            bail!(
                "{} tokens for a KV cache of {} sequences",
                tokens.len(),
                cache.batch
            );
        }
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
        self.forward_with(&cache.acts, tokens, None, Some(slot), &[], &[])?;
        cache.len += 1;
        cache.before_last = std::mem::replace(&mut cache.last_tokens, tokens.to_vec());
        let src = view::<B>(&cache.acts.memory, cache.acts.layout.logits);
        logits.resize(src.len(), 0.0);
        self.backend.download(src, logits)?;
        Ok(())
    }

    /// Feeds `tokens` into an empty cache in one batched pass (the prompt through the
    /// matmul and attention kernels at once, not one token at a time) and stores every
    /// position's keys and values, in every sequence of a batched cache; returns the logits
    /// `(V)` that predict the next token, as [`Model::decode_step`] on each token in turn
    /// would.
    pub fn prefill(&self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<Vec<f32>> {
        if cache.len != 0 {
            bail!(
                "prefill needs an empty KV cache ({} positions filled)",
                cache.len
            );
        }
        if tokens.is_empty() || tokens.len() > cache.capacity {
            bail!(
                "a prompt of {} tokens for a KV cache of {} positions",
                tokens.len(),
                cache.capacity
            );
        }
        let n = tokens.len();
        // The last position's logits only: no other position's are needed.
        let mut arena = self.prefill_arena.borrow_mut();
        if arena.as_ref().is_none_or(|a| a.layout.seq != n) {
            *arena = None;
            *arena = Some(self.activations_with(1, n, Head::Last)?);
        }
        let acts = arena.as_ref().expect("made above");
        self.forward(acts, tokens, None)?;
        // The keys after RoPE and the values attention used, position by position, as
        // decoding stores them; every sequence of a batched cache starts from this prompt.
        let row = self.config.n_kv_heads * self.config.head_dim;
        let per_sequence = cache.capacity * row;
        for (l, s) in acts.layout.layers.iter().enumerate() {
            for b in 0..cache.batch {
                let at = |r: Region| view::<B>(&cache.memory, r).slice(b * per_sequence, n * row);
                self.backend
                    .copy(at(cache.keys[l]), view::<B>(&acts.memory, s.k));
                self.backend
                    .copy(at(cache.values[l]), view::<B>(&acts.memory, s.v_used));
            }
        }
        if let (Some(region), Some(k), Some(s)) = (
            cache.capsules,
            self.config.arch.capsules,
            acts.layout.capsules.as_ref(),
        ) {
            let per_pass = cache.batch * cache.capacity * k.dim;
            for (p, pass) in s.passes.iter().enumerate() {
                for b in 0..cache.batch {
                    let at = p * per_pass + b * cache.capacity * k.dim;
                    let at = view::<B>(&cache.memory, region).slice(at, n * k.dim);
                    self.backend.copy(at, view::<B>(&acts.memory, pass.read));
                }
            }
        }
        if let Some(f) = acts.layout.feedback.as_ref() {
            let c = self.config.dim;
            for (j, adapter) in f.adapters.iter().enumerate() {
                for (half, src) in [(0, adapter.k), (1, adapter.v)] {
                    let keys = cache.feedback_keys(j, half, c);
                    for b in 0..cache.batch {
                        let dst = keys.slice(b * cache.capacity * c, n * c);
                        self.backend.copy(dst, view::<B>(&acts.memory, src));
                    }
                }
            }
        }
        cache.len = n;
        cache.last_tokens = vec![tokens[n - 1]; cache.batch];
        cache.before_last = match n {
            1 => Vec::new(),
            _ => vec![tokens[n - 2]; cache.batch],
        };
        self.download_logits(acts)
    }

    pub fn zero_grad(&self) {
        self.backend.zero(View::whole(&self.grads));
    }

    /// The global L2 norm of the accumulated gradients.
    pub fn grad_norm(&self) -> f64 {
        self.backend.sum_squares(View::whole(&self.grads)).sqrt()
    }

    /// Per-position losses `(B·T)` of the last forward with targets, on the host.
    pub fn download_losses(&self, acts: &Activations<B>) -> Result<Vec<f32>> {
        download(&self.backend, view::<B>(&acts.memory, acts.layout.losses))
    }

    /// Logits `(B·T, V)` of the last forward, on the host.
    pub fn download_logits(&self, acts: &Activations<B>) -> Result<Vec<f32>> {
        if acts.layout.head == Head::Loss {
            bail!("these activations keep only the losses (the head runs fused): no logits");
        }
        download(&self.backend, view::<B>(&acts.memory, acts.layout.logits))
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
pub fn bigram_ids(tokens: &[u32], seq: usize, prev: &[u32], buckets: usize) -> Vec<u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &cur)| {
            // Within a sequence its previous token; at a sequence's start the token before it
            // (decoding: `prev`, one per sequence), if any.
            let before = if i % seq > 0 {
                Some(tokens[i - 1])
            } else {
                prev.get(i / seq).copied()
            };
            let code = before.map_or(0, |p| p as u64 + 1);
            ((code * 1_000_003 + cur as u64) % buckets as u64) as u32
        })
        .collect()
}

/// splitmix64's finalizer: EngramHash's mixing of a hash into a bucket, and its multipliers.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// EngramHash's table rows ([`crate::config::Engram`]): for each position, for each order
/// n = 2..=max_order and head h, the row of table `(n − 2)·heads + h` (offset by that table's
/// start in the concatenated tables) that the position's last n tokens hash to. A token is
/// coded as id + 1, one before the sequence's start as 0 unless the decoder knows it
/// (`prev`: each sequence's token before `tokens`' first, `prev2`: the one before that); the
/// codes, oldest first, make `hash = hash·m + code` (wrapping, `m` = mix64(1000·n + h) | 1),
/// and the row is mix64(hash) mod buckets. `N · tables` ids, position by position, so the
/// looked-up rows concatenate into each position's memory. `scripts/make_fixtures.py`
/// computes the same.
pub fn engram_ids(
    tokens: &[u32],
    seq: usize,
    (prev, prev2): (&[u32], &[u32]),
    e: &crate::config::Engram,
) -> Vec<u32> {
    let mut ids = Vec::with_capacity(tokens.len() * e.tables());
    for (i, _) in tokens.iter().enumerate() {
        let (s, p) = (i / seq, i % seq);
        // The code of the token `back` positions before position i.
        let code = |back: usize| -> u64 {
            let token = if back <= p {
                Some(tokens[i - back])
            } else if back - p == 1 {
                prev.get(s).copied()
            } else if back - p == 2 {
                prev2.get(s).copied()
            } else {
                None
            };
            token.map_or(0, |t| t as u64 + 1)
        };
        for n in 2..=e.max_order {
            for h in 0..e.heads {
                let m = mix64((1000 * n + h) as u64) | 1;
                let hash = (0..n).rev().fold(0u64, |acc, back| {
                    acc.wrapping_mul(m).wrapping_add(code(back))
                });
                let table = (n - 2) * e.heads + h;
                let row = mix64(hash) % e.buckets as u64;
                ids.push((table * e.buckets) as u32 + row as u32);
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::Routing;

    /// Three experts over seven rows: the rows in expert order, each row's first largest
    /// probability chosen (a tie goes to the lower expert, as `argmax` does), the gates.
    #[test]
    fn routing_sorts_rows_by_expert_and_gates_by_their_probability() {
        let logits = [
            0.0, 2.0, 1.0, // → 1
            3.0, 0.0, 0.0, // → 0
            0.0, 0.0, 5.0, // → 2
            1.0, 1.0, 0.0, // tie → 0
            0.0, 4.0, 0.0, // → 1
            -1.0, -2.0, 0.5, // → 2
            0.0, 0.0, 0.0, // tie → 0
        ];
        let r = Routing::of_logits(&logits, 3);
        assert_eq!(r.expert, [1, 0, 2, 0, 1, 2, 0]);
        assert_eq!(r.offsets, [0, 3, 5, 7]);
        assert_eq!(r.perm, [1, 3, 6, 0, 4, 2, 5]);
        let softmax = |z: &[f64]| {
            let s: f64 = z.iter().map(|x| x.exp()).sum();
            z.iter().map(|x| x.exp() / s).collect::<Vec<f64>>()
        };
        for (gate, &row) in r.gates().iter().zip(&r.perm) {
            let z: Vec<f64> = logits[row as usize * 3..][..3]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let want = softmax(&z)[r.expert[row as usize] as usize];
            assert!(
                (*gate as f64 - want).abs() < 1e-6,
                "row {row}: {gate} vs {want}"
            );
        }
    }

    /// The router's gradient against central differences in f64 of the objective it is the
    /// gradient of, `Σ_i dgate_i · p_{perm_i, e_i} + w · E · Σ_e f_e · mean_r p_{r,e}` (the
    /// routing held fixed, as it is piecewise constant): within 1e-4 relative (f32 arithmetic
    /// against f64 differences with h = 1e-4).
    #[test]
    fn the_router_gradient_matches_finite_differences() {
        let (n, e) = (6, 3);
        let logits: Vec<f32> = (0..n * e)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.37)
            .collect();
        let r = Routing::of_logits(&logits, e);
        let dgates: Vec<f32> = (0..n).map(|i| (i as f32 - 2.5) * 0.3).collect();
        let weight = 0.7;
        let objective = |z: &[f64]| -> f64 {
            let probs: Vec<f64> = z
                .chunks_exact(e)
                .flat_map(|row| {
                    let s: f64 = row.iter().map(|x| x.exp()).sum();
                    row.iter().map(move |x| x.exp() / s).collect::<Vec<_>>()
                })
                .collect();
            let mut total = 0.0;
            for (i, &row) in r.perm.iter().enumerate() {
                let row = row as usize;
                total += dgates[i] as f64 * probs[row * e + r.expert[row] as usize];
            }
            for j in 0..e {
                let share = (r.offsets[j + 1] - r.offsets[j]) as f64 / n as f64;
                let mean: f64 = (0..n).map(|row| probs[row * e + j]).sum::<f64>() / n as f64;
                total += weight as f64 * e as f64 * share * mean;
            }
            total
        };
        let got = r.router_grad(&dgates, weight);
        let z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let h = 1e-4;
        for k in 0..n * e {
            let (mut up, mut down) = (z.clone(), z.clone());
            up[k] += h;
            down[k] -= h;
            let want = (objective(&up) - objective(&down)) / (2.0 * h);
            let err = (got[k] as f64 - want).abs();
            assert!(
                err <= 1e-6 + 1e-4 * want.abs(),
                "dz[{k}] = {} vs {want}",
                got[k]
            );
        }
    }
}
