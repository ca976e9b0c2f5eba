//! Where each tensor lives in the arenas: named, shape-documented regions of one allocation
//! (llm.c `malloc_and_point_parameters`). Parameters, their gradients and each optimizer
//! moment share one [`ParamLayout`]; a step's activations have an [`ActivationLayout`].

use crate::config::{Mlp, ModelConfig};

/// A window of an arena: `len` values starting at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: usize,
    pub len: usize,
}

/// Hands out consecutive regions of an arena.
#[derive(Default)]
struct Cursor {
    next: usize,
}

impl Cursor {
    fn take(&mut self, len: usize) -> Region {
        let region = Region {
            offset: self.next,
            len,
        };
        self.next += len;
        region
    }
}

/// What a parameter tensor is: the one place that decides its optimizer group, its weight
/// decay, its initialisation and its packing. Nothing else guesses this from tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// The token embedding (V, C), also the classifier when tied; the hashed bigram embedding.
    Embedding,
    /// An untied classifier (`lm_head`, (V, C)).
    Classifier,
    /// A weight matrix of a block, read by a matmul. `output` marks the matrices whose result
    /// is added into the residual stream (o_proj, down_proj): initialised smaller, GPT-2
    /// style (or zero in the golf block).
    BlockMatrix { branch: Branch, output: bool },
    /// An RMSNorm gain (initialised to 1, never decayed).
    NormGain,
    /// A small learnable control tensor of the golf block: never decayed, kept in f32 when
    /// packed.
    Control(Control),
}

/// Which branch of a block a matrix belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    Attention,
    Mlp,
    /// EngramHash's key and output projections.
    Memory,
}

/// The golf block's control tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Per-head gain on the normalised queries (H), initialised to `arch.q_gain`.
    QGain,
    /// Value-residual λ₀, λ₁ (2), initialised to 0.5, 0.5.
    ValueMix,
    /// Per-channel scale of a branch's output (C), initialised to 1.
    BranchScale,
    /// Mix of the block input with the embedding output x0 (2, C), initialised to 1 and 0.
    ResidMix,
    /// The U-Net skip weights (S, C), initialised to 1.
    SkipWeights,
    /// A capsule bank's output gate (C), initialised to 0 (the bank starts closed).
    CapsuleGate,
    /// Koopman dynamics' diagonal `D (dim)`, initialised to `diag_init`.
    KoopmanDiag,
    /// Koopman dynamics' low-rank factors `U (dim, rank)` and `Vᵀ (rank, dim)`, initialised
    /// to N(0, 0.01/√rank).
    KoopmanFactor,
    /// Koopman dynamics' blend logit `α (dim)`, initialised to −5 (σ(α) ≈ 0.007: each pass's
    /// observation nearly off).
    KoopmanBlend,
    /// A feedback adapter's output gate (C), initialised to 0 (the adapter starts closed).
    FeedbackGate,
}

/// How a parameter tensor starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// N(0, std²).
    Normal(f32),
    /// Row `r` of the tensor filled with `rows[r]` (one value fills the whole tensor).
    Rows(Vec<f32>),
}

/// One named parameter tensor.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Hugging Face's name for it (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub region: Region,
    pub kind: ParamKind,
    /// The block it belongs to (`None`: embeddings, final norm, classifier, skip weights).
    pub layer: Option<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// Decoupled weight decay applies to matrices and embeddings, not to gains and controls.
    pub fn decays(&self) -> bool {
        !matches!(self.kind, ParamKind::NormGain | ParamKind::Control(_))
    }
}

/// Regions of one transformer block's parameters (`None`: the architecture has no such
/// tensor).
#[derive(Clone, Copy, Debug)]
pub struct LayerParams {
    pub attn_norm: Option<Region>,  // (C), with arch.norm_weights
    pub wq: Region,                 // (H·D, C)
    pub wk: Region,                 // (Hkv·D, C)
    pub wv: Region,                 // (Hkv·D, C)
    pub wo: Region,                 // (C, H·D)
    pub q_norm: Option<Region>,     // (D), with qk_norm and norm weights
    pub k_norm: Option<Region>,     // (D), with qk_norm and norm weights
    pub q_gain: Option<Region>,     // (H), arch.q_gain
    pub v_mix: Option<Region>,      // (2) value-residual λ, blocks after the first
    pub attn_scale: Option<Region>, // (C), arch.branch_scales
    pub ffn_norm: Option<Region>,   // (C), with norm weights
    pub w_gate: Option<Region>,     // (F, C), SwiGLU only
    pub w_up: Region,               // (F, C)
    pub w_down: Region,             // (C, F)
    pub mlp_scale: Option<Region>,  // (C), arch.branch_scales
    pub resid_mix: Option<Region>,  // (2, C), arch.resid_mix
    /// A mixture of experts in place of the MLP (`w_up`, `w_down` are then expert 0's).
    pub moe: Option<MoeParams>,
}

/// A mixture of experts' parameters ([`crate::config::Moe`]): the router and each expert's
/// matrices, expert after expert.
#[derive(Clone, Copy, Debug)]
pub struct MoeParams {
    pub experts: usize,
    /// `W_R (E, C)`.
    pub router: Region,
    /// The experts' up projections, `(F, C)` each, one after another.
    pub up: Region,
    /// The experts' down projections, `(C, F)` each.
    pub down: Region,
}

impl MoeParams {
    /// Expert `e`'s up projection.
    pub fn up(&self, e: usize) -> Region {
        let len = self.up.len / self.experts;
        Region {
            offset: self.up.offset + e * len,
            len,
        }
    }

    /// Expert `e`'s down projection.
    pub fn down(&self, e: usize) -> Region {
        let len = self.down.len / self.experts;
        Region {
            offset: self.down.offset + e * len,
            len,
        }
    }
}

/// EngramHash's parameters ([`crate::config::Engram`]).
#[derive(Clone, Copy, Debug)]
pub struct EngramParams {
    /// Every (order, head) table, one after another: `(tables · buckets, row)`.
    pub tables: Region,
    /// `W_K (C, dim)`: the memory's key, compared with the stream by the gate.
    pub key: Region,
    /// `W_P (C, dim)`: what the memory adds to the stream.
    pub proj: Region,
}

/// A causal capsule bank's parameters ([`crate::config::Capsules`]).
#[derive(Clone, Copy, Debug)]
pub struct CapsuleParams {
    /// `(count, dim)`: each capsule's query.
    pub prototypes: Region,
    /// `W_R (dim, C)`: the stream read into capsule space.
    pub read: Region,
    /// `W_W (C, count·dim)`: the capsules written back.
    pub write: Region,
    /// `g (C)`.
    pub gate: Region,
    /// Koopman dynamics between the bank's passes.
    pub koopman: Option<KoopmanParams>,
}

/// Koopman dynamics' parameters ([`crate::config::Koopman`]).
#[derive(Clone, Copy, Debug)]
pub struct KoopmanParams {
    /// `D (dim)`.
    pub diag: Region,
    /// `U (dim, rank)`.
    pub u: Region,
    /// `Vᵀ (rank, dim)`.
    pub v: Region,
    /// `α (dim)`: the blend's logit.
    pub alpha: Region,
}

/// Feedback passes' parameters ([`crate::config::Feedback`]).
#[derive(Clone, Debug)]
pub struct FeedbackParams {
    /// `W_F (dim, C)`: the sketch of the stream.
    pub sketch: Region,
    /// One adapter per decoder layer, shared by the passes.
    pub adapters: Vec<AdapterParams>,
}

/// A feedback adapter's parameters.
#[derive(Clone, Copy, Debug)]
pub struct AdapterParams {
    pub q: Region,    // W_Q (C, C)
    pub k: Region,    // W_K (C, dim)
    pub v: Region,    // W_V (C, dim)
    pub gate: Region, // g (C)
}

/// Every parameter of a model, in arena order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub embedding: Region,      // (V, C)
    pub bigram: Option<Region>, // (buckets, C)
    pub engram: Option<EngramParams>,
    pub capsules: Option<CapsuleParams>,
    pub feedback: Option<FeedbackParams>,
    /// The blocks (L of them).
    pub layers: Vec<LayerParams>,
    /// The block each layer of the forward runs ([`ModelConfig::block_order`]): `0..L`, or
    /// with depth recurrence some blocks again.
    pub order: Vec<usize>,
    pub skip_weights: Option<Region>, // (S, C), arch.unet_skips
    pub final_norm: Option<Region>,   // (C)
    /// The classifier (V, C): the embedding's region when tied.
    pub classifier: Region,
    total: usize,
}

/// Number of parameters, counting a tied embedding once.
pub fn parameter_count(config: &ModelConfig) -> usize {
    ParamLayout::new(config).total_len()
}

/// The U-Net wiring: layer `l ≥ L/2` (decoder `i = l − ⌊L/2⌋`) adds, with skip weight row
/// `i`, the output of encoder layer `⌊L/2⌋ − 1 − i`, while there are encoder outputs left
/// (the baseline's push/pop stack). L counts layers as the forward runs them
/// ([`ModelConfig::depth`]: with depth recurrence, more than the blocks).
pub fn skip_source(config: &ModelConfig, l: usize) -> Option<(usize, usize)> {
    if !config.arch.unet_skips {
        return None;
    }
    let encoders = unet_encoders(config);
    // Each feedback pass runs the decoder again, with the same skips.
    let l = match config.feedback_span() {
        Some((_, _, decoder)) if l >= config.n_layers => encoders + (l - config.n_layers) % decoder,
        _ => l,
    };
    let i = l.checked_sub(encoders)?;
    (i < skip_count(config)).then(|| (i, encoders - 1 - i))
}

/// How many U-Net skips (rows of `skip_weights`).
pub fn skip_count(config: &ModelConfig) -> usize {
    let encoders = unet_encoders(config);
    let layers = match config.feedback_span() {
        Some(_) => config.n_layers,
        None => config.depth(),
    };
    encoders.min(layers - encoders)
}

/// The U-Net's encoder layers: the first half of the layers the forward runs (of one pass,
/// with feedback passes).
pub fn unet_encoders(config: &ModelConfig) -> usize {
    match config.feedback_span() {
        Some((encoders, _, _)) => encoders,
        None => config.depth() / 2,
    }
}

/// Appends parameter specs in arena order, each with its initial values.
struct SpecBuilder<'c> {
    config: &'c ModelConfig,
    cursor: Cursor,
    specs: Vec<ParamSpec>,
}

impl SpecBuilder<'_> {
    /// How a tensor of `kind` starts: llama2.c / GPT-2's N(0, 0.02) for matrices; residual-
    /// output matrices N(0, 0.02/√(2L)) (or zero in the golf block); the golf block's
    /// embedding std; gains 1; the control tensors' own values.
    fn init(&self, kind: ParamKind) -> Init {
        let arch = &self.config.arch;
        match kind {
            ParamKind::Embedding => Init::Normal(arch.embed_init_std.unwrap_or(0.02) as f32),
            ParamKind::Classifier => Init::Normal(0.02),
            ParamKind::BlockMatrix { output: false, .. } => Init::Normal(0.02),
            ParamKind::BlockMatrix { output: true, .. } if arch.zero_init_out => Init::Normal(0.0),
            ParamKind::BlockMatrix { output: true, .. } => {
                Init::Normal(0.02 / (2.0 * self.config.depth() as f32).sqrt())
            }
            ParamKind::NormGain => Init::Rows(vec![1.0]),
            ParamKind::Control(Control::QGain) => {
                Init::Rows(vec![arch.q_gain.unwrap_or(1.0) as f32])
            }
            ParamKind::Control(Control::ResidMix) => Init::Rows(vec![1.0, 0.0]),
            ParamKind::Control(Control::ValueMix) => Init::Rows(vec![0.5, 0.5]),
            ParamKind::Control(Control::CapsuleGate | Control::FeedbackGate) => {
                Init::Rows(vec![0.0])
            }
            ParamKind::Control(Control::KoopmanBlend) => Init::Rows(vec![-5.0]),
            ParamKind::Control(kind @ (Control::KoopmanDiag | Control::KoopmanFactor)) => {
                let koopman = arch.capsules.and_then(|k| k.koopman);
                let (diag, rank) = koopman.map_or((0.9, 1), |m| (m.diag_init as f32, m.rank));
                match kind {
                    Control::KoopmanDiag => Init::Rows(vec![diag]),
                    _ => Init::Normal(0.01 / (rank as f32).sqrt()),
                }
            }
            ParamKind::Control(Control::BranchScale | Control::SkipWeights) => {
                Init::Rows(vec![1.0])
            }
        }
    }

    fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        kind: ParamKind,
        layer: Option<usize>,
    ) -> Region {
        let region = self.cursor.take(shape.iter().product());
        let init = self.init(kind);
        self.specs.push(ParamSpec {
            name,
            shape,
            region,
            kind,
            layer,
            init,
        });
        region
    }

    /// Block `l`'s tensors, in Hugging Face's order.
    fn block(&mut self, l: usize) -> LayerParams {
        let config = self.config;
        let arch = &config.arch;
        let (c, d, f) = (config.dim, config.head_dim, config.hidden_dim);
        let (q, kv) = (config.q_dim(), config.kv_dim());
        let norms = arch.norm_weights;
        let attention = |output| ParamKind::BlockMatrix {
            branch: Branch::Attention,
            output,
        };
        let mlp = |output| ParamKind::BlockMatrix {
            branch: Branch::Mlp,
            output,
        };
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let name = |s: &str| format!("model.layers.{l}.{s}");
        let (gain, control, at) = (ParamKind::NormGain, ParamKind::Control, Some(l));
        let attn_norm = norms.then(|| self.add(p("input_layernorm"), vec![c], gain, at));
        let wq = self.add(p("self_attn.q_proj"), vec![q, c], attention(false), at);
        let wk = self.add(p("self_attn.k_proj"), vec![kv, c], attention(false), at);
        let wv = self.add(p("self_attn.v_proj"), vec![kv, c], attention(false), at);
        let wo = self.add(p("self_attn.o_proj"), vec![c, q], attention(true), at);
        let (q_norm, k_norm) = if config.qk_norm && norms {
            (
                Some(self.add(p("self_attn.q_norm"), vec![d], gain, at)),
                Some(self.add(p("self_attn.k_norm"), vec![d], gain, at)),
            )
        } else {
            (None, None)
        };
        let q_gain = arch.q_gain.map(|_| {
            let shape = vec![config.n_heads];
            self.add(name("self_attn.q_gain"), shape, control(Control::QGain), at)
        });
        let v_mix = (arch.value_residual && l > 0).then(|| {
            self.add(
                name("self_attn.v_mix"),
                vec![2],
                control(Control::ValueMix),
                at,
            )
        });
        let scale = control(Control::BranchScale);
        let attn_scale = arch
            .branch_scales
            .then(|| self.add(name("attn_scale"), vec![c], scale, at));
        let ffn_norm = norms.then(|| self.add(p("post_attention_layernorm"), vec![c], gain, at));
        let w_gate = (arch.mlp == Mlp::Swiglu)
            .then(|| self.add(p("mlp.gate_proj"), vec![f, c], mlp(false), at));
        let (w_up, w_down, moe) = match arch.moe.filter(|_| config.moe(l)) {
            None => (
                self.add(p("mlp.up_proj"), vec![f, c], mlp(false), at),
                self.add(p("mlp.down_proj"), vec![c, f], mlp(true), at),
                None,
            ),
            Some(m) => {
                let e = m.experts;
                let router = self.add(p("mlp.router"), vec![e, c], mlp(false), at);
                let expert = |i: usize, s: &str| p(&format!("mlp.experts.{i}.{s}"));
                let ups: Vec<Region> = (0..e)
                    .map(|i| self.add(expert(i, "up_proj"), vec![f, c], mlp(false), at))
                    .collect();
                let downs: Vec<Region> = (0..e)
                    .map(|i| self.add(expert(i, "down_proj"), vec![c, f], mlp(true), at))
                    .collect();
                let whole = |r: &[Region]| Region {
                    offset: r[0].offset,
                    len: r.iter().map(|x| x.len).sum(),
                };
                let moe = MoeParams {
                    experts: e,
                    router,
                    up: whole(&ups),
                    down: whole(&downs),
                };
                (ups[0], downs[0], Some(moe))
            }
        };
        let mlp_scale = arch
            .branch_scales
            .then(|| self.add(name("mlp_scale"), vec![c], scale, at));
        let resid_mix = arch.resid_mix.then(|| {
            self.add(
                name("resid_mix"),
                vec![2, c],
                control(Control::ResidMix),
                at,
            )
        });
        LayerParams {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            q_norm,
            k_norm,
            q_gain,
            v_mix,
            attn_scale,
            ffn_norm,
            w_gate,
            w_up,
            w_down,
            mlp_scale,
            resid_mix,
            moe,
        }
    }
}

impl ParamLayout {
    /// Every parameter of `config`'s model, in the order of Hugging Face's checkpoints:
    /// embeddings, the blocks, the skip weights, the final norm, an untied classifier.
    pub fn new(config: &ModelConfig) -> Self {
        let (c, v) = (config.dim, config.vocab_size);
        let arch = &config.arch;
        let mut b = SpecBuilder {
            config,
            cursor: Cursor::default(),
            specs: Vec::new(),
        };
        use ParamKind::{Classifier, Embedding, NormGain};
        let embedding = b.add(
            "model.embed_tokens.weight".into(),
            vec![v, c],
            Embedding,
            None,
        );
        let bigram = (arch.bigram_buckets > 0).then(|| {
            let shape = vec![arch.bigram_buckets, c];
            b.add("model.bigram_embed.weight".into(), shape, Embedding, None)
        });
        let engram = arch.engram.map(|e| {
            let memory = |output| ParamKind::BlockMatrix {
                branch: Branch::Memory,
                output,
            };
            let shape = vec![e.tables() * e.buckets, e.row()];
            EngramParams {
                tables: b.add("model.engram.tables.weight".into(), shape, Embedding, None),
                key: b.add(
                    "model.engram.key.weight".into(),
                    vec![c, e.dim],
                    memory(false),
                    None,
                ),
                proj: b.add(
                    "model.engram.proj.weight".into(),
                    vec![c, e.dim],
                    memory(true),
                    None,
                ),
            }
        });
        let capsules = arch.capsules.map(|k| {
            let memory = ParamKind::BlockMatrix {
                branch: Branch::Memory,
                output: false,
            };
            let name = |s: &str| format!("model.capsules.{s}");
            let width = k.count * k.dim;
            CapsuleParams {
                prototypes: b.add(name("prototypes"), vec![k.count, k.dim], Embedding, None),
                read: b.add(name("read.weight"), vec![k.dim, c], memory, None),
                write: b.add(name("write.weight"), vec![c, width], memory, None),
                gate: b.add(
                    name("gate"),
                    vec![c],
                    ParamKind::Control(Control::CapsuleGate),
                    None,
                ),
                koopman: k.koopman.map(|m| {
                    let control = |c| ParamKind::Control(c);
                    let (d, r) = (k.dim, m.rank);
                    KoopmanParams {
                        diag: b.add(
                            name("koopman.diag"),
                            vec![d],
                            control(Control::KoopmanDiag),
                            None,
                        ),
                        u: b.add(
                            name("koopman.u"),
                            vec![d, r],
                            control(Control::KoopmanFactor),
                            None,
                        ),
                        v: b.add(
                            name("koopman.v"),
                            vec![r, d],
                            control(Control::KoopmanFactor),
                            None,
                        ),
                        alpha: b.add(
                            name("koopman.alpha"),
                            vec![d],
                            control(Control::KoopmanBlend),
                            None,
                        ),
                    }
                }),
            }
        });
        let feedback = config.feedback_span().map(|(_, _, decoder)| {
            let memory = ParamKind::BlockMatrix {
                branch: Branch::Memory,
                output: false,
            };
            let fd = arch.feedback.map_or(0, |f| f.dim);
            let sketch = b.add(
                "model.feedback.sketch.weight".into(),
                vec![fd, c],
                memory,
                None,
            );
            let adapters = (0..decoder)
                .map(|i| {
                    let name = |s: &str| format!("model.feedback.adapters.{i}.{s}");
                    AdapterParams {
                        q: b.add(name("q_proj.weight"), vec![c, c], memory, None),
                        k: b.add(name("k_proj.weight"), vec![c, fd], memory, None),
                        v: b.add(name("v_proj.weight"), vec![c, fd], memory, None),
                        gate: b.add(
                            name("gate"),
                            vec![c],
                            ParamKind::Control(Control::FeedbackGate),
                            None,
                        ),
                    }
                })
                .collect();
            FeedbackParams { sketch, adapters }
        });
        let layers = (0..config.n_layers).map(|l| b.block(l)).collect();
        let skip_weights = arch.unet_skips.then(|| {
            let shape = vec![skip_count(config), c];
            let kind = ParamKind::Control(Control::SkipWeights);
            b.add("model.skip_weights".into(), shape, kind, None)
        });
        let final_norm = arch
            .norm_weights
            .then(|| b.add("model.norm.weight".into(), vec![c], NormGain, None));
        let classifier = if config.tie_embeddings {
            embedding
        } else {
            b.add("lm_head.weight".into(), vec![v, c], Classifier, None)
        };
        ParamLayout {
            specs: b.specs,
            embedding,
            bigram,
            engram,
            capsules,
            feedback,
            layers,
            order: config.block_order(),
            skip_weights,
            final_norm,
            classifier,
            total: b.cursor.next,
        }
    }

    /// Values in the arena (a tied embedding counted once).
    pub fn total_len(&self) -> usize {
        self.total
    }

    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
}

/// Regions of one block's saved activations. `N = B·T` rows. A region that the architecture
/// does not need is an alias of the one it would copy (noted `= …`), so the forward and
/// backward passes read the same names either way.
#[derive(Clone, Copy, Debug)]
pub struct LayerActivations {
    pub x_in: Region, // (N, C)   input plus the U-Net skip; = the layer's input without one
    pub x_blk: Region, // (N, C)   after resid_mix; = x_in without it
    pub xn_attn: Region, // (N, C)   input_layernorm output
    pub rstd_attn: Region, // (N)
    pub q_lin: Region, // (N, H·D) q_proj output
    pub k_lin: Region, // (N, Hkv·D)
    pub v: Region,    // (N, Hkv·D)
    /// q, k after qk-norm: the RoPE inputs (the `*_lin` regions themselves without qk-norm).
    pub q_pre: Region, // (N, H·D)
    pub k_pre: Region, // (N, Hkv·D)
    pub q_rstd: Option<Region>, // (N·H)
    pub k_rstd: Option<Region>, // (N·Hkv)
    pub q_rope: Region, // (N, H·D)   after RoPE
    pub q: Region,    // (N, H·D)   after the q gain; = q_rope without it
    pub k: Region,    // (N, Hkv·D) after RoPE
    pub v_used: Region, // (N, Hkv·D) after the value residual; = v without it
    pub attn_saved: Region, // backend-defined (attention_saved_len)
    pub attn_out: Region, // (N, H·D)
    /// (N, H·D) what o_proj reads: XSA's output; = attn_out without XSA.
    pub attn_used: Region,
    pub attn_proj: Region, // (N, C)   o_proj output (saved with branch scales, else scratch)
    pub x_mid: Region,     // (N, C)   residual after attention
    pub xn_ffn: Region,    // (N, C)
    pub rstd_ffn: Region,  // (N)
    pub gate: Region,      // (N, F)   SwiGLU only (empty otherwise)
    pub up: Region,        // (N, F)
    pub hidden: Region,    // (N, F)   silu(gate) * up, or relu(up)²
    pub mlp_proj: Region,  // (N, C)   down_proj output (saved with branch scales, else scratch)
    /// A mixture-of-experts layer's (empty elsewhere): the normalized input gathered in
    /// expert order (N, C); the experts' outputs in that order before (N, C) and after (N, C)
    /// their gates; the gates (N). `up` and `hidden` then hold the experts' rows in expert
    /// order too. (The router's logits are the host's.)
    pub moe_x: Region,
    pub moe_y: Region,
    pub moe_gated: Region,
    pub moe_gates: Region,
}

/// Gradient scratch for one block, reused by every block during the backward pass.
#[derive(Clone, Debug)]
pub struct LayerGradients {
    pub residual: Region, // (N, C)   dL/d(residual stream), accumulated into by every branch
    pub xn: Region,       // (N, C)
    pub attn_proj: Region, // (N, C)  = residual without branch scales
    pub mlp_proj: Region, // (N, C)   = residual without branch scales
    pub attn_out: Region, // (N, H·D)
    pub q: Region,        // (N, H·D)
    pub q_rope: Region,   // (N, H·D) = q without the q gain
    pub k: Region,        // (N, Hkv·D)
    pub v: Region,        // (N, Hkv·D) gradient of v_used
    pub v_lin: Region,    // (N, Hkv·D) gradient of v_proj's output; = v without value residual
    pub v_first: Region,  // (N, Hkv·D) accumulated gradient of the first block's values
    pub q_pre: Region,    // (N, H·D)
    pub k_pre: Region,    // (N, Hkv·D)
    /// Gradients of q_proj/k_proj outputs: the `*_pre` regions themselves without qk-norm.
    pub q_lin: Region, // (N, H·D)
    pub k_lin: Region,    // (N, Hkv·D)
    pub hidden: Region,   // (N, F)
    pub gate: Region,     // (N, F)
    pub up: Region,       // (N, F)
    pub x0: Region,       // (N, C)   accumulated gradient of x0 (resid_mix)
    /// (N, C) a parallel-residual layer's output gradient, which both branches read
    /// (empty without parallel residuals).
    pub parallel: Region,
    /// (N, H·D) the gradient of an XSA layer's output, and (N, Hkv·D) its values' share
    /// (empty without XSA).
    pub xsa: Region,
    pub xsa_v: Region,
    /// A mixture of experts' (empty without one): the gradients of the experts' gated
    /// outputs (N, C), of their outputs (N, C) and inputs (N, C), all in expert order, of the
    /// gates (N) and of the router's logits (N, E).
    pub moe_gated: Region,
    pub moe_y: Region,
    pub moe_x: Region,
    pub moe_gates: Region,
    pub router: Region,
    /// Per U-Net skip: the gradient of encoder block j's output through the skip. (N, C) each.
    pub skips: Vec<Region>,
    pub embed: Region, // (N, C)   gradient of the raw embedding; = residual without embed_norm
    pub logits: Region, // (N, V)
    pub logits_raw: Region, // (N, V) before the soft cap; = logits without one
}

/// What the model's head leaves in an activation arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// The `(N, V)` logits, and room for their gradient: sampling, `kiln model logits`, the
    /// PyTorch fixtures' logits check.
    Logits,
    /// Only each position's loss: the classifier and the cross-entropy run fused
    /// ([`crate::backend::Backend::classifier_loss_forward`]), a backend holds at most a
    /// vocabulary chunk of logits at a time. Training and evaluation.
    Loss,
    /// Only each sequence's last position's logits `(B, V)`, no targets, no backward: a
    /// prompt's prefill, which needs nothing but the next token's distribution (the classifier
    /// over every position was a fifth of stories110M's prefill).
    Last,
}

/// Every activation of one step at (batch, seq), in one arena.
#[derive(Clone, Debug)]
pub struct ActivationLayout {
    pub batch: usize,
    pub seq: usize,
    pub head: Head,
    pub emb_tok: Region, // (N, C) token embedding rows; = embed without a bigram table
    pub emb_bigram: Region, // (N, C) bigram embedding rows (empty without one)
    pub embed: Region,   // (N, C) raw embedding; = residual[0] without embed_norm
    pub rstd_embed: Region, // (N)
    /// Residual stream entering layer l (`residual[L]` leaves the last; L is the depth, the
    /// forward's layers, one activation set each). (N, C) each.
    /// `residual[0]` is `x0`, the (normalised) embedding.
    pub residual: Vec<Region>,
    /// EngramHash's activations and gradients, at its layer.
    pub engram: Option<EngramActivations>,
    pub engram_layer: Option<usize>,
    pub capsules: Option<CapsuleActivations>,
    pub capsule_layer: Option<usize>,
    pub feedback: Option<FeedbackActivations>,
    /// The stream each layer reads ([`ActivationLayout::input`]).
    inputs: Vec<Region>,
    pub layers: Vec<LayerActivations>,
    pub xn_final: Region,   // (N, C)
    pub rstd_final: Region, // (N)
    pub logits_raw: Region, // (N, V) before the soft cap; = logits without one
    pub logits: Region,     // (N, V)
    pub losses: Region,     // (N)
    pub logsumexp: Region,  // (N)
    /// What the fused head's forward keeps for its backward (backend-defined,
    /// `classifier_saved_len`; empty with [`Head::Logits`]).
    pub classifier_saved: Region,
    pub grads: LayerGradients,
    total: usize,
}

/// A capsule bank's activations at its layer (N rows), then their gradients.
#[derive(Clone, Debug)]
pub struct CapsuleActivations {
    pub queries: Region, // (N, count·dim) the prototypes, every row
    /// Each pass of the bank, the first without Koopman dynamics (unless it is given a
    /// carry).
    pub passes: Vec<CapsulePass>,
    /// (2·dim) σ(α), then σ(−α) = 1 − σ(α): the Koopman blend's two weights (empty without).
    pub mix: Region,
    /// (N, count·dim) with capsule carry ([`crate::config::Koopman::carry`]), each row's
    /// carry at every position of the row: the first pass's `c_prev` (empty without).
    pub carry: Region,
    /// (dim) with the stability clamp ([`crate::config::Koopman::clamp`]), `D` clamped: what
    /// `K` multiplies by; then (dim) its gradient, before the clamp's mask (both empty
    /// without).
    pub diag: Region,
    pub d_diag: Region,
    pub d_observed: Region,    // (N, count·dim)
    pub d_queries: Region,     // (N, count·dim)
    pub d_keys: Region,        // (N, dim), then the read's whole gradient
    pub d_values: Region,      // (N, dim)
    pub d_stream_norm: Region, // (N, C)
    pub d_write: Region,       // (N, C)
    /// The Koopman map's gradients, one pass at a time (empty without Koopman dynamics).
    pub d_predicted: Region, // (N·count, dim)
    pub d_evolved: Region,     // (N·count, dim)
    pub d_low: Region,         // (N·count, rank)
    pub d_rotated: Region,     // (N·count, dim)
    /// (2·dim) the blend weights' gradients; (2·dim) their logits' (α's) before they are
    /// added to α's; (2·dim) the consistency gradient's per-channel factors `κ`, `−κ`.
    pub d_mix: Region,
    pub d_alpha: Region,
    pub consistency: Region,
}

/// The feedback passes' activations ([`crate::config::Feedback`]), then their gradients.
#[derive(Clone, Debug)]
pub struct FeedbackActivations {
    /// Before each pass after the first, the sketch of the stream the pass before left.
    pub sketches: Vec<Sketch>,
    /// After each layer of those passes, in order, its adapter.
    pub adapters: Vec<Adapter>,
    /// (N, C) the adapter's attention output's gradient, then its q, k and v's.
    pub d_att: Region,
    pub d_q: Region,
    pub d_k: Region,
    pub d_v: Region,
    /// (N, dim) a pass's sketch's gradient, summed over its adapters; (N, C) the normalized
    /// stream's; (N, C) the encoder output's, summed over the passes after the first.
    pub d_sketch: Region,
    pub d_stream_norm: Region,
    pub d_encoded: Region,
}

/// A feedback pass's sketch: `s = W_F·rmsnorm(y)` of the stream `y` the pass before left.
#[derive(Clone, Copy, Debug)]
pub struct Sketch {
    pub stream_norm: Region, // (N, C)
    pub rstd: Region,        // (N)
    pub sketch: Region,      // (N, dim)
}

/// A feedback adapter after a layer: `out = x + g ⊙ attn(W_Q·rmsnorm(x), W_K·s, W_V·s)`.
#[derive(Clone, Copy, Debug)]
pub struct Adapter {
    pub xn: Region,    // (N, C) rmsnorm(x)
    pub rstd: Region,  // (N)
    pub q: Region,     // (N, C)
    pub k: Region,     // (N, C)
    pub v: Region,     // (N, C)
    pub att: Region,   // (N, C)
    pub saved: Region, // the backend's attention state (heads H, kv heads H)
    pub out: Region,   // (N, C)
}

/// One pass of a capsule bank: it reads the stream the pass before it left (the layer's
/// input `residual[layer]` for the first) and adds its write to it.
#[derive(Clone, Copy, Debug)]
pub struct CapsulePass {
    pub stream_norm: Region, // (N, C) rmsnorm of the stream read
    pub rstd: Region,        // (N)
    pub read: Region,        // (N, dim)   r = W_R·rmsnorm(h): the capsules' keys and values
    pub observed: Region,    // (N, count·dim) the pooled capsules
    pub saved: Region,       // the backend's attention state for (count heads, 1 kv head)
    /// With Koopman dynamics, after the first pass: the last pass's capsules rotated (y =
    /// H·c), their low-rank code (Vᵀ·y), evolved (D ⊙ y + U·Vᵀ·y) and rotated back: the
    /// prediction `K(c)`. (N·count, dim) each, the code (N·count, rank).
    pub rotated: Region,
    pub low: Region,
    pub evolved: Region,
    pub predicted: Region,
    /// (N, count·dim) the capsules written: `observed` on the first pass, else the blend.
    pub capsules: Region,
    pub write: Region, // (N, C)   W_W·c
    /// (N, C) the stream plus `g ⊙ write`: the next pass's input; the last pass's is the
    /// layer's input in place of `residual[layer]`.
    pub out: Region,
    pub d_capsules: Region, // (N, count·dim)
}

/// EngramHash's activations at its layer (N rows), then their gradients.
#[derive(Clone, Copy, Debug)]
pub struct EngramActivations {
    pub memory: Region,      // (N, dim) the tables' rows, concatenated
    pub key: Region,         // (N, C)   W_K·m
    pub key_norm: Region,    // (N, C) rmsnorm(key)
    pub rstd_key: Region,    // (N)
    pub stream_norm: Region, // (N, C) rmsnorm(h), h = residual[layer]
    pub rstd_stream: Region, // (N)
    pub gate: Region,        // (N)      σ(stream_norm · key_norm / √C)
    pub value: Region,       // (N, C)   W_P·m
    /// (N, C) `h + gate ⊙ value`: the layer's input in place of `residual[layer]`.
    pub out: Region,
    pub d_memory: Region,      // (N, dim)
    pub d_key: Region,         // (N, C)
    pub d_key_norm: Region,    // (N, C)
    pub d_stream_norm: Region, // (N, C)
    pub d_gate: Region,        // (N)
    pub d_value: Region,       // (N, C)
}

impl ActivationLayout {
    /// The stream layer `l` reads: `residual[l]`, or EngramHash's or the capsule bank's
    /// output at its layer; with feedback passes, the encoder's output where a pass starts
    /// and the adapter's output after the layer before elsewhere in them.
    pub fn input(&self, l: usize) -> Region {
        self.inputs[l]
    }

    /// The stream layer `l` leaves: `residual[l + 1]`, or with feedback passes after the
    /// first, its adapter's output.
    pub fn stream_after(&self, l: usize) -> Region {
        let decoder_runs = self.feedback.as_ref().map_or(0, |f| f.adapters.len());
        let first_pass = self.residual.len() - 1 - decoder_runs;
        match &self.feedback {
            Some(f) if l >= first_pass => f.adapters[l - first_pass].out,
            _ => self.residual[l + 1],
        }
    }

    /// The stream the last layer leaves, which the final norm reads.
    pub fn last_stream(&self) -> Region {
        self.stream_after(self.residual.len() - 2)
    }

    pub fn new(
        config: &ModelConfig,
        batch: usize,
        seq: usize,
        (attention_saved_len, capsule_saved_len, feedback_saved_len): (usize, usize, usize),
        (head, classifier_saved_len): (Head, usize),
    ) -> Self {
        let n = batch * seq;
        let (c, f) = (config.dim, config.hidden_dim);
        // The logits and their gradients: none when the head runs fused.
        let v = match head {
            Head::Logits | Head::Last => config.vocab_size,
            Head::Loss => 0,
        };
        // Positions whose logits are kept.
        let rows = if head == Head::Last { batch } else { n };
        let (q, kv) = (n * config.q_dim(), n * config.kv_dim());
        let arch = &config.arch;
        let mut cur = Cursor::default();
        let depth = config.depth();
        let residual: Vec<Region> = (0..=depth).map(|_| cur.take(n * c)).collect();
        // EngramHash's forward activations (its gradients come after `forward_end`).
        let engram_forward = arch.engram.map(|e| {
            [
                cur.take(n * e.dim),
                cur.take(n * c),
                cur.take(n * c),
                cur.take(n),
                cur.take(n * c),
                cur.take(n),
                cur.take(n),
                cur.take(n * c),
                cur.take(n * c),
            ]
        });
        let engram_layer = arch.engram.map(|e| e.layer);
        // The capsule bank's forward activations (its gradients come after `forward_end`).
        let capsule_forward = arch.capsules.map(|k| {
            let width = n * k.count * k.dim;
            let rank = k.koopman.map_or(0, |m| m.rank);
            let queries = cur.take(width);
            // With capsule carry the first pass blends too (with the carry).
            let carried = k.koopman.is_some_and(|m| m.carry.is_some());
            let passes: Vec<CapsulePass> = (0..k.passes())
                .map(|p| {
                    let koopman = if p > 0 || carried { 1 } else { 0 };
                    let (stream_norm, rstd, read) =
                        (cur.take(n * c), cur.take(n), cur.take(n * k.dim));
                    let (observed, saved) = (cur.take(width), cur.take(capsule_saved_len));
                    let (rotated, low) = (
                        cur.take(koopman * width),
                        cur.take(koopman * n * k.count * rank),
                    );
                    let (evolved, predicted) =
                        (cur.take(koopman * width), cur.take(koopman * width));
                    let capsules = if koopman > 0 {
                        cur.take(width)
                    } else {
                        observed
                    };
                    CapsulePass {
                        stream_norm,
                        rstd,
                        read,
                        observed,
                        saved,
                        rotated,
                        low,
                        evolved,
                        predicted,
                        capsules,
                        write: cur.take(n * c),
                        out: cur.take(n * c),
                        d_capsules: Region { offset: 0, len: 0 },
                    }
                })
                .collect();
            let mix = cur.take(if k.koopman.is_some() { 2 * k.dim } else { 0 });
            let carry = cur.take(if carried { width } else { 0 });
            let clamped = k.koopman.is_some_and(|m| m.clamp);
            let diag = cur.take(if clamped { k.dim } else { 0 });
            (queries, passes, mix, carry, diag)
        });
        let capsule_layer = arch.capsules.map(|k| k.layer);
        // The feedback passes' forward activations (their gradients come after
        // `forward_end`): a sketch before each pass after the first, an adapter after each
        // of those passes' layers.
        let feedback_forward = config.feedback_span().map(|(_, passes, decoder)| {
            let fd = arch.feedback.map_or(0, |f| f.dim);
            let sketches: Vec<Sketch> = (0..passes)
                .map(|_| Sketch {
                    stream_norm: cur.take(n * c),
                    rstd: cur.take(n),
                    sketch: cur.take(n * fd),
                })
                .collect();
            let adapters: Vec<Adapter> = (0..passes * decoder)
                .map(|_| Adapter {
                    xn: cur.take(n * c),
                    rstd: cur.take(n),
                    q: cur.take(n * c),
                    k: cur.take(n * c),
                    v: cur.take(n * c),
                    att: cur.take(n * c),
                    saved: cur.take(feedback_saved_len),
                    out: cur.take(n * c),
                })
                .collect();
            (sketches, adapters)
        });
        // The stream each layer reads: EngramHash's or the capsule bank's output at its
        // layer; with feedback passes, the encoder's output where a pass starts, else the
        // adapter after the layer before.
        let mut inputs: Vec<Region> = Vec::with_capacity(depth);
        for l in 0..depth {
            let input = match (engram_forward, capsule_forward.as_ref()) {
                (Some(f), _) if engram_layer == Some(l) => f[8],
                (_, Some((_, passes, ..))) if capsule_layer == Some(l) => {
                    passes[passes.len() - 1].out
                }
                _ => match (config.feedback_pass(l), feedback_forward.as_ref()) {
                    (Some((p, true)), _) if p > 0 => inputs[config.n_layers / 2],
                    (Some((p, false)), Some((_, adapters))) if p > 0 => {
                        adapters[l - 1 - config.n_layers].out
                    }
                    _ => residual[l],
                },
            };
            inputs.push(input);
        }
        let (embed, rstd_embed) = if arch.embed_norm {
            (cur.take(n * c), cur.take(n))
        } else {
            (residual[0], cur.take(0))
        };
        let (emb_tok, emb_bigram) = if arch.bigram_buckets > 0 {
            (cur.take(n * c), cur.take(n * c))
        } else {
            (embed, cur.take(0))
        };
        let scales = arch.branch_scales;
        let layers: Vec<LayerActivations> = (0..depth)
            .map(|l| block_activations(config, &mut cur, &inputs, l, n, attention_saved_len))
            .collect();
        let xn_final = cur.take(n * c);
        let rstd_final = cur.take(n);
        let logits = cur.take(rows * v);
        let logits_raw = if arch.logit_softcap.is_some() {
            cur.take(rows * v)
        } else {
            logits
        };
        let losses = cur.take(n);
        let logsumexp = cur.take(n);
        let classifier_saved = cur.take(match head {
            Head::Logits | Head::Last => 0,
            Head::Loss => classifier_saved_len,
        });
        // down_proj's output without branch scales: `xn_final` is free until the end.
        let layers = layers
            .into_iter()
            .map(|mut s| {
                if !scales {
                    s.mlp_proj = xn_final;
                }
                s
            })
            .collect();
        let (q_pre, k_pre) = (cur.take(q), cur.take(kv));
        let (q_lin, k_lin) = if config.qk_norm {
            (cur.take(q), cur.take(kv))
        } else {
            (q_pre, k_pre)
        };
        // Everything from here on is a gradient.
        let forward_end = cur.next;
        let engram = engram_forward.map(|f| {
            let dim = arch.engram.map_or(0, |e| e.dim);
            EngramActivations {
                memory: f[0],
                key: f[1],
                key_norm: f[2],
                rstd_key: f[3],
                stream_norm: f[4],
                rstd_stream: f[5],
                gate: f[6],
                value: f[7],
                out: f[8],
                d_memory: cur.take(n * dim),
                d_key: cur.take(n * c),
                d_key_norm: cur.take(n * c),
                d_stream_norm: cur.take(n * c),
                d_gate: cur.take(n),
                d_value: cur.take(n * c),
            }
        });
        let capsules = capsule_forward.map(|(queries, mut passes, mix, carry, diag)| {
            let k = arch.capsules.expect("a capsule bank's activations");
            let width = n * k.count * k.dim;
            let koopman = if k.koopman.is_some() { 1 } else { 0 };
            let rank = k.koopman.map_or(0, |m| m.rank);
            for pass in &mut passes {
                pass.d_capsules = cur.take(width);
            }
            CapsuleActivations {
                queries,
                passes,
                mix,
                carry,
                diag,
                d_diag: cur.take(diag.len),
                d_observed: cur.take(width),
                d_queries: cur.take(width),
                d_keys: cur.take(n * k.dim),
                d_values: cur.take(n * k.dim),
                d_stream_norm: cur.take(n * c),
                d_write: cur.take(n * c),
                d_predicted: cur.take(koopman * width),
                d_evolved: cur.take(koopman * width),
                d_low: cur.take(koopman * n * k.count * rank),
                d_rotated: cur.take(koopman * width),
                d_mix: cur.take(koopman * 2 * k.dim),
                d_alpha: cur.take(koopman * 2 * k.dim),
                consistency: cur.take(koopman * 2 * k.dim),
            }
        });
        let feedback = feedback_forward.map(|(sketches, adapters)| {
            let fd = arch.feedback.map_or(0, |f| f.dim);
            FeedbackActivations {
                sketches,
                adapters,
                d_att: cur.take(n * c),
                d_q: cur.take(n * c),
                d_k: cur.take(n * c),
                d_v: cur.take(n * c),
                d_sketch: cur.take(n * fd),
                d_stream_norm: cur.take(n * c),
                d_encoded: cur.take(n * c),
            }
        });
        let residual_grad = cur.take(n * c);
        let (attn_proj, mlp_proj) = if scales {
            (cur.take(n * c), cur.take(n * c))
        } else {
            (residual_grad, residual_grad)
        };
        let dq = cur.take(q);
        let dq_rope = if arch.q_gain.is_some() {
            cur.take(q)
        } else {
            dq
        };
        let dv = cur.take(kv);
        let (dv_lin, dv_first) = if arch.value_residual {
            (cur.take(kv), cur.take(kv))
        } else {
            (dv, cur.take(0))
        };
        // No gradient of the logits where there is no backward (prefill).
        let dv_rows = if head == Head::Last { 0 } else { n * v };
        let moe_experts = arch.moe.map_or(0, |m| m.experts);
        let moe_rows = if moe_experts > 0 && head != Head::Last {
            n
        } else {
            0
        };
        let dlogits = cur.take(dv_rows);
        let grads = LayerGradients {
            residual: residual_grad,
            xn: cur.take(n * c),
            attn_proj,
            mlp_proj,
            attn_out: cur.take(q),
            q: dq,
            q_rope: dq_rope,
            k: cur.take(kv),
            v: dv,
            v_lin: dv_lin,
            v_first: dv_first,
            q_pre,
            k_pre,
            q_lin,
            k_lin,
            hidden: cur.take(n * f),
            gate: cur.take(if arch.mlp == Mlp::Swiglu { n * f } else { 0 }),
            up: cur.take(n * f),
            x0: cur.take(if arch.resid_mix { n * c } else { 0 }),
            parallel: cur.take(if arch.parallel_from.is_some() {
                n * c
            } else {
                0
            }),
            xsa: cur.take(if arch.xsa_from.is_some() { q } else { 0 }),
            xsa_v: cur.take(if arch.xsa_from.is_some() { kv } else { 0 }),
            moe_gated: cur.take(moe_rows * c),
            moe_y: cur.take(moe_rows * c),
            moe_x: cur.take(moe_rows * c),
            moe_gates: cur.take(moe_rows),
            router: cur.take(moe_rows * moe_experts),
            skips: (0..depth)
                .filter(|&l| skip_source(config, l).is_some())
                .map(|_| cur.take(n * c))
                .collect(),
            embed: if arch.embed_norm {
                cur.take(n * c)
            } else {
                residual_grad
            },
            logits: dlogits,
            logits_raw: if arch.logit_softcap.is_some() {
                cur.take(dv_rows)
            } else {
                dlogits
            },
        };
        ActivationLayout {
            batch,
            seq,
            head,
            emb_tok,
            emb_bigram,
            embed,
            rstd_embed,
            residual,
            engram,
            engram_layer,
            capsules,
            capsule_layer,
            feedback,
            inputs,
            layers,
            xn_final,
            rstd_final,
            logits_raw,
            logits,
            losses,
            logsumexp,
            classifier_saved,
            grads,
            // A prefill's arena ends where the gradients begin: it never runs a backward
            // (`Model::backward` refuses it), and its pages are a fresh allocation per prompt.
            total: if head == Head::Last {
                forward_end
            } else {
                cur.next
            },
        }
    }

    pub fn total_len(&self) -> usize {
        self.total
    }
}

/// Block `l`'s activations for `n` rows (one step's B·T), taken from `cur` in arena order.
fn block_activations(
    config: &ModelConfig,
    cur: &mut Cursor,
    inputs: &[Region],
    l: usize,
    n: usize,
    attention_saved_len: usize,
) -> LayerActivations {
    let (c, f) = (config.dim, config.hidden_dim);
    let (q, kv) = (n * config.q_dim(), n * config.kv_dim());
    let arch = &config.arch;
    let scales = arch.branch_scales;
    let x_in = if skip_source(config, l).is_some() {
        cur.take(n * c)
    } else {
        inputs[l]
    };
    let x_blk = if arch.resid_mix {
        cur.take(n * c)
    } else {
        x_in
    };
    let xn_attn = cur.take(n * c);
    let rstd_attn = cur.take(n);
    let q_lin = cur.take(q);
    let k_lin = cur.take(kv);
    let v_ = cur.take(kv);
    let (q_pre, k_pre, q_rstd, k_rstd) = if config.qk_norm {
        (
            cur.take(q),
            cur.take(kv),
            Some(cur.take(n * config.n_heads)),
            Some(cur.take(n * config.n_kv_heads)),
        )
    } else {
        (q_lin, k_lin, None, None)
    };
    let q_rope = cur.take(q);
    let q_ = if arch.q_gain.is_some() {
        cur.take(q)
    } else {
        q_rope
    };
    let k = cur.take(kv);
    let v_used = if arch.value_residual && l > 0 {
        cur.take(kv)
    } else {
        v_
    };
    let attn_saved = cur.take(attention_saved_len);
    let attn_out = cur.take(q);
    // What o_proj reads: XSA's output, or attention's own.
    let attn_used = if config.xsa(l) { cur.take(q) } else { attn_out };
    let x_mid = cur.take(n * c);
    let xn_ffn = cur.take(n * c);
    let rstd_ffn = cur.take(n);
    let gate = cur.take(if config.arch.mlp == Mlp::Swiglu {
        n * f
    } else {
        0
    });
    let up = cur.take(n * f);
    let hidden = cur.take(n * f);
    let moe_n = if config.moe(l) { n } else { 0 };
    let moe_x = cur.take(moe_n * c);
    let moe_y = cur.take(moe_n * c);
    let moe_gated = cur.take(moe_n * c);
    let moe_gates = cur.take(moe_n);
    // Without branch scales the projections are consumed at once: o_proj's output
    // goes through `xn_ffn` (free until the MLP norm) and down_proj's through the
    // next block's `x_in` or `xn_final` scratch, as assigned below.
    let (attn_proj, mlp_proj) = if scales {
        (cur.take(n * c), cur.take(n * c))
    } else {
        (xn_ffn, Region { offset: 0, len: 0 })
    };
    LayerActivations {
        x_in,
        x_blk,
        xn_attn,
        rstd_attn,
        q_lin,
        k_lin,
        v: v_,
        q_pre,
        k_pre,
        q_rstd,
        k_rstd,
        q_rope,
        q: q_,
        k,
        v_used,
        attn_saved,
        attn_out,
        attn_used,
        attn_proj,
        x_mid,
        xn_ffn,
        rstd_ffn,
        gate,
        up,
        hidden,
        mlp_proj,
        moe_x,
        moe_y,
        moe_gated,
        moe_gates,
    }
}
