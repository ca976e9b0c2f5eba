//! Model configuration: the shape of a Llama-family transformer, named presets, validation,
//! and the parameter count that follows from it.
//!
//! This is only the *shape* of a model; training settings (batch, learning rate, …) live with
//! the trainer. A config is parsed from JSON text or taken from a preset by name; reading a
//! config file is the formats crate's.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

macro_rules! bail {
    ($($message:tt)*) => { $crate::fail!(Config, $($message)*) };
}

/// The architecture of a Llama-family decoder (Llama 2 / TinyStories, Qwen3).
///
/// Shape letters used across kiln: C = `dim`, L = `n_layers`, H = `n_heads`,
/// Hkv = `n_kv_heads`, D = `head_dim`, F = `hidden_dim`, V = `vocab_size`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the residual stream (C).
    pub dim: usize,
    /// Number of transformer blocks (L).
    pub n_layers: usize,
    /// Query heads (H).
    pub n_heads: usize,
    /// Key/value heads (Hkv); `n_heads` must be a multiple (grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one attention head (D). Not always `dim / n_heads` (Qwen3-0.6B: 1024 / 16 ≠ 128).
    pub head_dim: usize,
    /// Width of the SwiGLU hidden layer (F).
    pub hidden_dim: usize,
    /// Vocabulary size (V).
    pub vocab_size: usize,
    /// Longest sequence the model is trained or sampled at (RoPE table length).
    pub max_seq_len: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// RMSNorm (with a learned D-wide gain) on each head's q and k before RoPE, as Qwen3 does.
    pub qk_norm: bool,
    /// The classifier reuses the token embedding matrix.
    pub tie_embeddings: bool,
    /// Departures from the Llama block (the compact-model "golf" family); absent from the
    /// JSON of a plain Llama/Qwen3 model.
    #[serde(default, skip_serializing_if = "Arch::is_llama")]
    pub arch: Arch,
}

/// The MLP's nonlinearity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    /// `down(silu(gate(x)) ∘ up(x))`: Llama, Qwen3.
    #[default]
    Swiglu,
    /// `down(relu(up(x))²)`: the parameter-golf baseline (no gate matrix).
    Relu2,
    /// `down(leaky_relu(up(x), slope)²)`.
    LeakyRelu2 { slope: f64 },
}

/// Architecture options beyond the Llama block, all off by default. The `golf-baseline` preset
/// turns on the set used by the OpenAI parameter-golf baseline (`train_gpt.py`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Arch {
    pub mlp: Mlp,
    /// RMSNorms carry learned gains (Llama). Off: every norm is a plain `x / rms(x)`.
    pub norm_weights: bool,
    /// RMSNorm on the embedding output; the normalised embedding is `x0`.
    pub embed_norm: bool,
    /// A learnable per-head gain on q after qk-norm and RoPE, initialised to this value.
    pub q_gain: Option<f64>,
    /// Logits become `cap · tanh(logits / cap)` before the cross-entropy.
    pub logit_softcap: Option<f64>,
    /// U-Net skips: the first ⌊L/2⌋ blocks' outputs are added, in reverse order and scaled by
    /// learnable per-channel weights (init 1), to the inputs of the last blocks.
    pub unet_skips: bool,
    /// Each block's input is `mix₀ ⊙ x + mix₁ ⊙ x0` with learnable per-channel `mix`
    /// (init 1 and 0).
    pub resid_mix: bool,
    /// Learnable per-channel scales (init 1) on the attention and MLP outputs.
    pub branch_scales: bool,
    /// The output projections (o_proj, down_proj) start at zero.
    pub zero_init_out: bool,
    /// Standard deviation of the embedding's initialisation (0.02 when unset).
    pub embed_init_std: Option<f64>,
    /// Partial RoPE: rotate only the first `rope_dims` dimensions of each head (all when unset).
    pub rope_dims: Option<usize>,
    /// Value residual (ResFormer): blocks after the first use `λ₀·v + λ₁·v_first`, with
    /// learnable scalars λ (init 0.5, 0.5) and `v_first` the first block's values.
    pub value_residual: bool,
    /// A hashed bigram embedding `(buckets, C)` added to the token embedding (0: none).
    pub bigram_buckets: usize,
    /// Depth recurrence: blocks `start..end` run again, `repeats` more times, after their
    /// first pass, with the same weights: a deeper network for the same parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Recurrence>,
    /// EngramHash: a hashed n-gram memory added, through a context gate, to one layer's input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engram: Option<Engram>,
    /// Norm-scale damping: layer l's attention and MLP norms (weightless) scaled by
    /// 1/√(l + 1).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ln_scale: bool,
    /// Parallel residual from this layer on: the MLP reads the layer's input, as attention
    /// does, instead of attention's output: `out = x + attn(norm(x)) + mlp(norm(x))`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_from: Option<usize>,
    /// Exclusive self attention from this layer on: each head's output loses its component
    /// along its own token's value vector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xsa_from: Option<usize>,
    /// Mixture of experts in the MLPs of the upper layers ([`Moe`]).
    pub moe: Option<Moe>,
    /// A causal capsule bank added to one layer's input ([`Capsules`]).
    pub capsules: Option<Capsules>,
    /// Feedback passes: the decoder half run again with adapters that read a sketch of the
    /// pass before it ([`Feedback`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<Feedback>,
}

/// Feedback passes, the causal form of the ternary submission's feedback adapters. The
/// decoder half (layers `E = n_layers/2` on) runs `1 + passes` times, each pass again from the
/// encoder's output `e` (the stream layer E reads) with the U-Net skips. Before pass p ≥ 1,
/// each position t gets a sketch of where the pass before left its stream, `s_t = W_F ·
/// rmsnorm(y_t)` (`dim` values), and after each decoder layer i of the pass the stream `x`
/// becomes `x + g_i ⊙ attn(W_Q,i·rmsnorm(x), W_K,i·s, W_V,i·s)`: causal attention (the
/// model's heads, no rotation) of each position over the sketches at or before it, so no
/// position reads a later one. The adapters (one per decoder layer, shared by the passes)
/// start closed (`g_i` = 0). The logits come from the last pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    pub dim: usize,
    #[serde(default = "default_feedback_passes")]
    pub passes: usize,
}

fn default_feedback_passes() -> usize {
    1
}

/// A causal capsule bank: `count` capsules of `dim` values, each a learned prototype `p_k`
/// that pools the sequence's prefix. Before layer `layer` runs, its input stream `h` becomes
/// `h + g ⊙ W_W·c_t`, `c_t` position t's capsules concatenated, capsule k being
/// `Σ_{s≤t} softmax_s(p_k·r_s/√dim) r_s` with `r_s = W_R·rmsnorm(h_s)`: causal attention with
/// the prototypes as constant queries over one key/value head `r`. `g` (C) starts at zero (the
/// bank closed). The ternary submission's bank pools over the whole sequence instead (every
/// position then reads the tokens after it); this is its causal form.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capsules {
    pub count: usize,
    pub dim: usize,
    pub layer: usize,
    /// Koopman dynamics between passes of the bank ([`Koopman`]); none: one pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub koopman: Option<Koopman>,
}

impl Capsules {
    /// How many times the bank runs: once, plus the Koopman passes.
    pub fn passes(&self) -> usize {
        1 + self.koopman.map_or(0, |k| k.passes)
    }
}

/// Koopman dynamics in capsule space (the ternary submission's `KoopmanDynamics`), run
/// between passes of the capsule bank: pass p ≥ 1 pools the stream the pass before it left
/// (`c_obs`), predicts the capsules from the last pass's `c` by a linear map `K(c) = H·(D ⊙
/// H·c + U·Vᵀ·H·c)` per capsule (`H` the orthonormal Hadamard matrix when `dim` is a power
/// of two, else the identity; `D (dim)` starting at `diag_init`, `U`, `V (dim, rank)` at
/// N(0, 0.01/√rank)), and blends them, `c = a ⊙ c_obs + (1 − a) ⊙ K(c_prev)` with `a =
/// σ(α)`, `α (dim)` starting at −5 (the observation nearly off). Each pass writes `g ⊙ W_W·c`
/// into the stream again. The objective gains `consistency · mean_p mean((K(c_{p−1}) −
/// sg(c_p))²)`, which trains the map to predict the next pass; the loss kiln reports stays
/// the cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Koopman {
    pub rank: usize,
    #[serde(default = "default_koopman_passes")]
    pub passes: usize,
    #[serde(default = "default_koopman_consistency")]
    pub consistency: f64,
    #[serde(default = "default_koopman_diag")]
    pub diag_init: f64,
    /// Adaptive halting, for evaluation only (`kiln eval --capsule-halt`): each position
    /// keeps the stream of the first pass after the first whose capsules moved by less than
    /// this fraction of their norm, `‖c_p − c_{p−1}‖ < halt·‖c_{p−1}‖` (else the last pass's).
    /// A position's choice reads its own capsules only, so it stays causal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt: Option<f64>,
    /// Capsule carry, for evaluation only (`kiln eval --capsule-carry DECAY`): each window's
    /// first pass blends its pooled capsules with `K(carry)`, as later passes do with the
    /// pass before them, `carry` being its stream's earlier windows' capsules (each the last
    /// position's, of the last pass) averaged with this decay. Windows are then scored in
    /// order along each stream ([`crate::eval`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry: Option<f64>,
    /// The submission's stability clamp: `D` enters `K` clamped to ±[`KOOPMAN_CLAMP`] (no
    /// gradient where it is clamped), in training and evaluation alike, so that `K` composed
    /// many times (capsule carry composes it once per window) cannot grow without bound.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clamp: bool,
}

/// [`Koopman::clamp`]'s bound on `|D|`, the submission's.
pub const KOOPMAN_CLAMP: f32 = 0.999;

fn default_koopman_passes() -> usize {
    1
}

fn default_koopman_consistency() -> f64 {
    0.005
}

fn default_koopman_diag() -> f64 {
    0.9
}

/// A mixture of experts: from layer `from_layer` on, the MLP is `experts` MLPs of the block's
/// shape and a router `W_R (E, C)`; each token goes to its top-1 expert `e = argmax p`, `p =
/// softmax(W_R·x̂)` of its normalized input `x̂`, and the MLP's output is `p_e · expert_e(x̂)`
/// (Switch Transformer). A load-balancing loss `aux_weight · E · Σ_e f_e·P_e` (`f_e`: the
/// share of tokens routed to `e`, `P_e`: the mean of `p_e`) joins the objective's gradient;
/// the loss kiln reports stays the cross-entropy alone.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Moe {
    pub experts: usize,
    pub from_layer: usize,
    #[serde(default = "default_aux_weight")]
    pub aux_weight: f64,
}

fn default_aux_weight() -> f64 {
    0.01
}

/// EngramHash, a hashed n-gram memory. Each position's last n tokens, for n = 2 up to
/// `max_order`, are hashed by `heads` hash functions each into a table of `buckets` rows of
/// `dim / ((max_order − 1)·heads)` values; the rows, concatenated, are the position's memory
/// `m (dim)`. Before layer `layer` runs, its input stream `h` becomes
/// `h + σ(rmsnorm(h)·rmsnorm(W_K·m)/√C) · W_P·m`: the gate opens where the looked-up memory
/// agrees with the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engram {
    pub buckets: usize,
    pub heads: usize,
    pub max_order: usize,
    pub dim: usize,
    pub layer: usize,
}

impl Engram {
    /// The (order, head) tables: `(max_order − 1) · heads`.
    pub fn tables(&self) -> usize {
        (self.max_order - 1) * self.heads
    }

    /// Values of one table row.
    pub fn row(&self) -> usize {
        self.dim / self.tables()
    }
}

/// Which blocks depth recurrence repeats: the forward runs blocks `0..end`, then `start..end`
/// `repeats` more times, then `end..n_layers` ([`ModelConfig::block_order`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recurrence {
    pub start: usize,
    pub end: usize,
    pub repeats: usize,
}

impl Default for Arch {
    fn default() -> Self {
        Arch {
            mlp: Mlp::Swiglu,
            norm_weights: true,
            embed_norm: false,
            q_gain: None,
            logit_softcap: None,
            unet_skips: false,
            resid_mix: false,
            branch_scales: false,
            zero_init_out: false,
            embed_init_std: None,
            rope_dims: None,
            value_residual: false,
            bigram_buckets: 0,
            recurrence: None,
            engram: None,
            ln_scale: false,
            parallel_from: None,
            xsa_from: None,
            moe: None,
            capsules: None,
            feedback: None,
        }
    }
}

impl Arch {
    /// The plain Llama/Qwen3 block, which Hugging Face and llama2.c formats can hold.
    pub fn is_llama(&self) -> bool {
        *self == Arch::default()
    }

    /// The parameter-golf baseline's block.
    pub fn golf() -> Self {
        Arch {
            mlp: Mlp::Relu2,
            norm_weights: false,
            embed_norm: true,
            q_gain: Some(1.5),
            logit_softcap: Some(30.0),
            unet_skips: true,
            resid_mix: true,
            branch_scales: true,
            zero_init_out: true,
            embed_init_std: Some(0.005),
            ..Arch::default()
        }
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "stories15m",
    "stories42m",
    "stories110m",
    "qwen3-0.6b",
    "tiny-mha",
    "tiny-gqa",
    "golf-baseline",
    "golf",
    "tiny-golf",
    "tiny-golf-recurrent",
    "tiny-golf-engram",
    "tiny-golf-moe",
    "tiny-golf-capsules",
    "tiny-golf-koopman",
    "tiny-golf-parallel",
];

/// The most blocks a model may have.
pub const MAX_LAYERS: usize = 4096;
/// The most any width (dim, heads, head_dim, hidden_dim, context, bigram buckets) may be.
pub const MAX_WIDTH: usize = 1 << 24;
/// The most parameters a shape may have: 2^40, 4.4 TB in f32.
pub const MAX_PARAMETERS: u128 = 1 << 40;

impl ModelConfig {
    /// A named preset. The `stories*` presets are llama2.c's TinyStories models; `tiny-*` are
    /// the configurations the PyTorch fixtures and the tests use.
    pub fn preset(name: &str) -> Result<Self> {
        let llama2c = |dim, n_layers, n_heads, hidden_dim| ModelConfig {
            dim,
            n_layers,
            n_heads,
            n_kv_heads: n_heads,
            head_dim: dim / n_heads,
            hidden_dim,
            vocab_size: 32000,
            max_seq_len: 1024,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            qk_norm: false,
            tie_embeddings: true,
            arch: Arch::default(),
        };
        let config = match name {
            "stories15m" => llama2c(288, 6, 6, 768),
            "stories42m" => llama2c(512, 8, 8, 1376),
            "stories110m" => llama2c(768, 12, 12, 2048),
            "qwen3-0.6b" => ModelConfig {
                dim: 1024,
                n_layers: 28,
                n_heads: 16,
                n_kv_heads: 8,
                head_dim: 128,
                hidden_dim: 3072,
                vocab_size: 151936,
                max_seq_len: 40960,
                rope_theta: 1e6,
                norm_eps: 1e-6,
                qk_norm: true,
                tie_embeddings: true,
                arch: Arch::default(),
            },
            // Multi-head attention, untied classifier: the llama2.c shape in miniature.
            "tiny-mha" => ModelConfig {
                dim: 32,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 8,
                hidden_dim: 64,
                vocab_size: 64,
                max_seq_len: 32,
                rope_theta: 10000.0,
                norm_eps: 1e-5,
                qk_norm: false,
                tie_embeddings: false,
                arch: Arch::default(),
            },
            // Grouped-query attention with qk-norm, head_dim ≠ dim / heads, tied: Qwen3 in miniature.
            "tiny-gqa" => ModelConfig {
                dim: 32,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                hidden_dim: 48,
                vocab_size: 64,
                max_seq_len: 32,
                rope_theta: 1e6,
                norm_eps: 1e-6,
                qk_norm: true,
                tie_embeddings: true,
                arch: Arch::default(),
            },
            // The OpenAI parameter-golf baseline (train_gpt.py): 17,059,912 parameters.
            "golf-baseline" => ModelConfig {
                dim: 512,
                n_layers: 9,
                n_heads: 8,
                n_kv_heads: 4,
                head_dim: 64,
                hidden_dim: 1024,
                vocab_size: 1024,
                max_seq_len: 1024,
                rope_theta: 10000.0,
                // F.rms_norm's default: the float32 machine epsilon.
                norm_eps: f32::EPSILON as f64,
                qk_norm: true,
                tie_embeddings: true,
                arch: Arch::golf(),
            },
            // kiln's golf model: the baseline plus EngramHash at the U-Net bottleneck (the first
            // decoder layer, where the 4-layer ablations and the ternary submission put it),
            // the one option whose gain cleared the seeds' noise at 300 and at 900 steps.
            "golf" => {
                let mut config = ModelConfig::preset("golf-baseline")?;
                config.arch.engram = Some(Engram {
                    buckets: 4096,
                    heads: 4,
                    max_order: 3,
                    dim: 128,
                    layer: config.n_layers / 2,
                });
                config
            }
            // Every golf option at once, small enough for the PyTorch fixture and gradcheck:
            // 5 layers (2 skips and an unpaired block), GQA, partial RoPE, leaky ReLU²,
            // value residual and a hashed bigram embedding.
            "tiny-golf" => ModelConfig {
                dim: 32,
                n_layers: 5,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                hidden_dim: 64,
                vocab_size: 64,
                max_seq_len: 32,
                rope_theta: 10000.0,
                norm_eps: 1e-6,
                qk_norm: true,
                tie_embeddings: true,
                arch: Arch {
                    mlp: Mlp::LeakyRelu2 { slope: 0.5 },
                    rope_dims: Some(4),
                    value_residual: true,
                    bigram_buckets: 37,
                    // Not zero: a zero output projection would make most gradients vanish
                    // and the fixture test blind to them.
                    zero_init_out: false,
                    ..Arch::golf()
                },
            },
            // tiny-golf with depth recurrence: 4 blocks run as 6 layers (0 1 2 1 2 3).
            "tiny-golf-recurrent" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.n_layers = 4;
                config.arch.recurrence = Some(Recurrence {
                    start: 1,
                    end: 3,
                    repeats: 1,
                });
                config
            }
            // tiny-golf with two feedback passes over its decoder (layers 2-4) and sketches
            // of 8 values.
            "tiny-golf-feedback" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.arch.feedback = Some(Feedback { dim: 8, passes: 2 });
                config
            }
            // tiny-golf with norm-scale damping, exclusive self attention from layer 2 and
            // parallel residuals from layer 3.
            "tiny-golf-parallel" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.arch.ln_scale = true;
                config.arch.parallel_from = Some(3);
                config.arch.xsa_from = Some(2);
                config
            }
            // tiny-golf with a causal capsule bank of 3 capsules of 8 values before layer 2.
            "tiny-golf-capsules" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.arch.capsules = Some(Capsules {
                    count: 3,
                    dim: 8,
                    layer: 2,
                    koopman: None,
                });
                config
            }
            // The same bank run three times, with Koopman dynamics of rank 2 between the
            // passes and a large consistency weight, so that its gradient is well measured.
            "tiny-golf-koopman" => {
                let mut config = ModelConfig::preset("tiny-golf-capsules")?;
                if let Some(k) = config.arch.capsules.as_mut() {
                    k.koopman = Some(Koopman {
                        rank: 2,
                        passes: 2,
                        consistency: 0.5,
                        diag_init: 0.9,
                        halt: None,
                        carry: None,
                        clamp: false,
                    });
                }
                config
            }
            // The same with the stability clamp on D (the fixture's D straddles 0.999).
            "tiny-golf-koopman-clamp" => {
                let mut config = ModelConfig::preset("tiny-golf-koopman")?;
                if let Some(m) = config
                    .arch
                    .capsules
                    .as_mut()
                    .and_then(|k| k.koopman.as_mut())
                {
                    m.clamp = true;
                }
                config
            }
            // tiny-golf with a mixture of three experts in layers 3 and 4 (the upper third and
            // more of five), routed top-1, with the load-balancing loss.
            "tiny-golf-moe" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.arch.moe = Some(Moe {
                    experts: 3,
                    from_layer: 3,
                    aux_weight: 0.01,
                });
                config
            }
            // tiny-golf with EngramHash before layer 2: bigram and trigram tables, two hash
            // heads each, 13 buckets of 4 values.
            "tiny-golf-engram" => {
                let mut config = ModelConfig::preset("tiny-golf")?;
                config.arch.engram = Some(Engram {
                    buckets: 13,
                    heads: 2,
                    max_order: 3,
                    dim: 16,
                    layer: 2,
                });
                config
            }
            _ => bail!(
                "unknown model preset '{name}'; known presets: {}",
                PRESETS.join(", ")
            ),
        };
        Ok(config)
    }

    /// A config from JSON text (a `config.json` kiln wrote, or one a user wrote), validated.
    /// The formats crate reads the file and adds its name to the error.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: ModelConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not a valid kiln model config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the shape is one kiln can build; every message names the offending field.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("hidden_dim", self.hidden_dim),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                bail!("{name} must be positive");
            }
        }
        // Bounds no model kiln can hold comes near, so that the sizes computed from these
        // fields never overflow and no allocation is asked for a size read from a damaged file.
        if self.n_layers > MAX_LAYERS {
            bail!("n_layers ({}) is over {MAX_LAYERS}", self.n_layers);
        }
        for (name, value) in [
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("hidden_dim", self.hidden_dim),
            ("max_seq_len", self.max_seq_len),
            ("arch.bigram_buckets", self.arch.bigram_buckets),
        ] {
            if value > MAX_WIDTH {
                bail!("{name} ({value}) is over {MAX_WIDTH}");
            }
        }
        let parameters = self.parameter_bound();
        if parameters > MAX_PARAMETERS {
            bail!(
                "the shape has about {parameters} parameters ({:.1} TB in f32), over kiln's \
                 limit of {MAX_PARAMETERS}",
                parameters as f64 * 4e-12
            );
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!(
                "n_heads ({}) must be a multiple of n_kv_heads ({}) for grouped-query attention",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even: RoPE rotates pairs",
                self.head_dim
            );
        }
        if self.vocab_size > u32::MAX as usize {
            bail!(
                "vocab_size ({}) does not fit token ids in u32",
                self.vocab_size
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta must be a positive number, got {}",
                self.rope_theta
            );
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps must be a positive number, got {}", self.norm_eps);
        }
        let arch = &self.arch;
        if let Some(k) = arch.rope_dims {
            if k == 0 || k > self.head_dim || k % 2 != 0 {
                bail!(
                    "arch.rope_dims ({k}) must be even and between 2 and head_dim ({})",
                    self.head_dim
                );
            }
        }
        if let Some(cap) = arch.logit_softcap {
            if !(cap.is_finite() && cap > 0.0) {
                bail!("arch.logit_softcap must be a positive number, got {cap}");
            }
        }
        if let Mlp::LeakyRelu2 { slope } = arch.mlp {
            if !(slope.is_finite() && (0.0..1.0).contains(&slope)) {
                bail!("arch.mlp leaky_relu2 slope must be in [0, 1), got {slope}");
            }
        }
        if arch.q_gain.is_some() && !self.qk_norm {
            bail!("arch.q_gain needs qk_norm: the gain scales the normalised queries");
        }
        if let Some(Recurrence {
            start,
            end,
            repeats,
        }) = arch.recurrence
        {
            if !(start < end && end <= self.n_layers) {
                bail!(
                    "arch.recurrence repeats blocks start..end: it needs start < end ≤ n_layers \
                     ({}), got {start}..{end}",
                    self.n_layers
                );
            }
            if repeats == 0 || repeats > MAX_LAYERS {
                bail!("arch.recurrence.repeats must be between 1 and {MAX_LAYERS}, got {repeats}");
            }
            if self.depth() > MAX_LAYERS {
                bail!(
                    "arch.recurrence makes {} layers, over {MAX_LAYERS}",
                    self.depth()
                );
            }
            if arch.value_residual && start == 0 {
                bail!(
                    "arch.recurrence cannot repeat block 0 with arch.value_residual: block 0's \
                     values are every later block's v_first"
                );
            }
        }
        if arch.ln_scale && arch.norm_weights {
            bail!(
                "arch.ln_scale damps the weightless norms of the golf block; with norm_weights \
                 the learned gains do that"
            );
        }
        for (name, from) in [
            ("parallel_from", arch.parallel_from),
            ("xsa_from", arch.xsa_from),
        ] {
            if let Some(from) = from.filter(|&f| f >= self.depth()) {
                bail!(
                    "arch.{name} ({from}) must be a layer, below {}",
                    self.depth()
                );
            }
        }
        if let Some(k) = arch.capsules {
            if !(1..=64).contains(&k.count) {
                bail!(
                    "arch.capsules.count must be between 1 and 64, got {}",
                    k.count
                );
            }
            if !(1..=128).contains(&k.dim) {
                bail!("arch.capsules.dim must be between 1 and 128, got {}", k.dim);
            }
            if k.layer >= self.depth() {
                bail!(
                    "arch.capsules.layer ({}) must be a layer, below {}",
                    k.layer,
                    self.depth()
                );
            }
            if arch.engram.is_some_and(|e| e.layer == k.layer) {
                bail!("arch.capsules.layer and arch.engram.layer must differ");
            }
            if let Some(m) = k.koopman {
                if !(1..=k.dim).contains(&m.rank) {
                    bail!(
                        "arch.capsules.koopman.rank must be between 1 and the capsule dim {}, got {}",
                        k.dim,
                        m.rank
                    );
                }
                if !(1..=4).contains(&m.passes) {
                    bail!(
                        "arch.capsules.koopman.passes must be between 1 and 4, got {}",
                        m.passes
                    );
                }
                if !(m.consistency >= 0.0 && m.consistency.is_finite()) {
                    bail!(
                        "arch.capsules.koopman.consistency must be a finite weight ≥ 0, got {}",
                        m.consistency
                    );
                }
                if !m.diag_init.is_finite() {
                    bail!("arch.capsules.koopman.diag_init must be finite");
                }
                if m.halt.is_some_and(|h| !(h > 0.0 && h.is_finite())) {
                    bail!("arch.capsules.koopman.halt must be a finite fraction above 0");
                }
                if m.carry.is_some_and(|d| !(0.0..1.0).contains(&d)) {
                    bail!(
                        "arch.capsules.koopman.carry is a decay: it must be at least 0 and \
                         below 1, got {}",
                        m.carry.unwrap_or_default()
                    );
                }
            }
        }
        if let Some(m) = arch.moe {
            if !(2..=64).contains(&m.experts) {
                bail!(
                    "arch.moe.experts must be between 2 and 64, got {}",
                    m.experts
                );
            }
            if m.from_layer >= self.n_layers {
                bail!(
                    "arch.moe.from_layer ({}) must be a layer, below {}",
                    m.from_layer,
                    self.n_layers
                );
            }
            if arch.recurrence.is_some() {
                bail!("arch.moe and arch.recurrence cannot be combined");
            }
            if self.arch.mlp == Mlp::Swiglu {
                bail!("arch.moe needs a relu² MLP (arch.mlp relu2 or leaky_relu2)");
            }
            if !(m.aux_weight >= 0.0 && m.aux_weight.is_finite()) {
                bail!(
                    "arch.moe.aux_weight must be at least 0, got {}",
                    m.aux_weight
                );
            }
        }
        if let Some(e) = arch.engram {
            if !(2..=3).contains(&e.max_order) {
                bail!(
                    "arch.engram.max_order must be 2 (bigrams) or 3 (bigrams and trigrams), got {}",
                    e.max_order
                );
            }
            for (name, value) in [("buckets", e.buckets), ("heads", e.heads), ("dim", e.dim)] {
                if value == 0 || value > MAX_WIDTH {
                    bail!("arch.engram.{name} must be between 1 and {MAX_WIDTH}, got {value}");
                }
            }
            if !e.dim.is_multiple_of(e.tables()) {
                bail!(
                    "arch.engram.dim ({}) must be a multiple of its {} tables ((max_order − 1) × \
                     heads)",
                    e.dim,
                    e.tables()
                );
            }
            if e.tables() as u128 * e.buckets as u128 > u32::MAX as u128 {
                bail!(
                    "arch.engram: {} tables of {} buckets are more rows than u32 ids reach",
                    e.tables(),
                    e.buckets
                );
            }
            if e.layer == 0 || e.layer >= self.depth() {
                bail!(
                    "arch.engram.layer ({}) must be an inner layer, between 1 and {}",
                    e.layer,
                    self.depth() - 1
                );
            }
        }
        if let Some(f) = arch.feedback {
            let encoders = self.n_layers / 2;
            if !(1..=3).contains(&f.passes) {
                bail!(
                    "arch.feedback.passes must be between 1 and 3, got {}",
                    f.passes
                );
            }
            if f.dim == 0 || f.dim > MAX_WIDTH {
                bail!(
                    "arch.feedback.dim must be between 1 and {MAX_WIDTH}, got {}",
                    f.dim
                );
            }
            if self.n_layers < 2 || self.n_heads * self.head_dim != self.dim {
                bail!(
                    "arch.feedback needs at least 2 layers and n_heads × head_dim = dim (its \
                     adapters' attention adds to the stream)"
                );
            }
            // Options that number layers differently, or sit inside the decoder, are not
            // combined with the decoder's reruns.
            if arch.recurrence.is_some()
                || arch.moe.is_some()
                || arch.ln_scale
                || arch.parallel_from.is_some()
                || arch.xsa_from.is_some()
            {
                bail!(
                    "arch.feedback cannot be combined with arch.recurrence, moe, ln_scale, \
                     parallel_from or xsa_from"
                );
            }
            let inside = |layer: Option<usize>| layer.is_some_and(|l| l > encoders);
            if inside(arch.engram.map(|e| e.layer)) || inside(arch.capsules.map(|k| k.layer)) {
                bail!(
                    "with arch.feedback, EngramHash and the capsule bank must sit at or below \
                     layer {encoders}, where the decoder's passes start"
                );
            }
        }
        Ok(())
    }

    /// The decoder's first layer with feedback passes (`n_layers/2`), the passes, and the
    /// decoder's length.
    pub fn feedback_span(&self) -> Option<(usize, usize, usize)> {
        self.arch.feedback.map(|f| {
            let encoders = self.n_layers / 2;
            (encoders, f.passes, self.n_layers - encoders)
        })
    }

    /// Whether layer `l`'s attention is exclusive (XSA).
    pub fn xsa(&self, l: usize) -> bool {
        self.arch.xsa_from.is_some_and(|from| l >= from)
    }

    /// Whether layer `l` runs its MLP beside attention (a parallel residual).
    pub fn parallel(&self, l: usize) -> bool {
        self.arch.parallel_from.is_some_and(|from| l >= from)
    }

    /// Layers the forward runs: `n_layers`, plus the blocks depth recurrence runs again, or
    /// the decoder's feedback passes.
    pub fn depth(&self) -> usize {
        if let Some((_, passes, decoder)) = self.feedback_span() {
            return self.n_layers + passes.saturating_mul(decoder);
        }
        match self.arch.recurrence {
            Some(r) => self.n_layers + r.repeats.saturating_mul(r.end.saturating_sub(r.start)),
            None => self.n_layers,
        }
    }

    /// The block each layer of the forward runs, in order (`0..n_layers` without recurrence
    /// or feedback passes).
    pub fn block_order(&self) -> Vec<usize> {
        if let Some((encoders, passes, _)) = self.feedback_span() {
            return (0..self.n_layers)
                .chain((0..passes).flat_map(|_| encoders..self.n_layers))
                .collect();
        }
        match self.arch.recurrence {
            Some(r) => (0..r.end)
                .chain((0..r.repeats).flat_map(|_| r.start..r.end))
                .chain(r.end..self.n_layers)
                .collect(),
            None => (0..self.n_layers).collect(),
        }
    }

    /// With feedback passes, layer `l`'s pass (0 for the encoder and the first decoder pass)
    /// and whether it starts its pass (reads the encoder's output) — `None` without.
    pub fn feedback_pass(&self, l: usize) -> Option<(usize, bool)> {
        let (_, _, decoder) = self.feedback_span()?;
        if l < self.n_layers {
            return Some((0, false));
        }
        let i = l - self.n_layers;
        Some((1 + i / decoder, i.is_multiple_of(decoder)))
    }

    /// An upper bound of the parameter count, in wide arithmetic that cannot overflow for any
    /// field values: the embeddings and classifier, and per block the attention and MLP
    /// matrices and every vector.
    pub fn parameter_bound(&self) -> u128 {
        let [c, l, h, kv, d, f, v, b] = [
            self.dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.hidden_dim,
            self.vocab_size,
            self.arch.bigram_buckets,
        ]
        .map(|x| x as u128);
        let block = c * d * (2 * h + 2 * kv) + 3 * c * f + 8 * c + 4 * d + h + 2;
        // The U-Net skips' rows follow the depth, which recurrence may raise to MAX_LAYERS.
        let depth = l.max(self.arch.recurrence.map_or(0, |_| MAX_LAYERS as u128));
        // EngramHash: its tables (at most orders·heads·buckets rows of dim values) and its two
        // (C, dim) matrices.
        // (Before validation: any field values.)
        let engram = self.arch.engram.map_or(0, |e| {
            let t = e.max_order.saturating_sub(1) as u128 * e.heads as u128;
            let d = e.dim as u128;
            (t.saturating_mul(e.buckets as u128).saturating_mul(d)).saturating_add(2 * c * d)
        });
        // A mixture of experts: every expert's MLP and the router, in every layer at most.
        let moe = self.arch.moe.map_or(0, |m| {
            let e = (m.experts as u128).min(64);
            l * (e * (3 * c * f + c))
        });
        // A capsule bank: prototypes, W_R, W_W and the gate, at most 64 × 128 wide.
        let capsules = self.arch.capsules.map_or(0, |k| {
            let (n, d) = ((k.count as u128).min(64), (k.dim as u128).min(128));
            let koopman = k
                .koopman
                .map_or(0, |m| 2 * d + 2 * d * (m.rank as u128).min(d));
            n * d + d * c + c * n * d + c + koopman
        });
        // Feedback passes: the sketch, and per decoder layer an adapter (W_Q, W_K, W_V, gate).
        let feedback = self.arch.feedback.map_or(0, |fb| {
            let d = fb.dim as u128;
            d.saturating_mul(c)
                .saturating_add(l.saturating_mul(c * c + 2 * c * d + c))
        });
        (2 * v * c + b * c + l * block + depth * c)
            .saturating_add(engram)
            .saturating_add(moe)
            .saturating_add(capsules)
            .saturating_add(feedback)
    }

    /// Whether layer `l`'s MLP is a mixture of experts.
    pub fn moe(&self, l: usize) -> bool {
        self.arch.moe.is_some_and(|m| l >= m.from_layer)
    }

    /// Width of all query heads together (H · D).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together (Hkv · D).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of the rotated part of each head (partial RoPE), or the whole head.
    pub fn rope_dims(&self) -> usize {
        self.arch.rope_dims.unwrap_or(self.head_dim)
    }

    /// Matrices in the MLP: gate, up and down for SwiGLU; up and down for ReLU².
    pub fn mlp_matrices(&self) -> usize {
        match self.arch.mlp {
            Mlp::Swiglu => 3,
            Mlp::Relu2 | Mlp::LeakyRelu2 { .. } => 2,
        }
    }

    /// Forward + backward FLOPs to train on one token at context length `seq` (matmuls and
    /// attention; the elementwise work is noise). 6 per weight per token for the matmuls, plus
    /// attention's QKᵀ and PV: 2·2·T·D per head forward, twice that backward, causal half.
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let engram = self.arch.engram.map_or(0, |e| 2 * self.dim * e.dim);
        // A token runs one expert, plus the router.
        let router = (0..self.depth())
            .filter(|&l| self.moe(l))
            .map(|_| self.arch.moe.map_or(0, |m| m.experts) * self.dim)
            .sum::<usize>();
        // Every pass of the capsule bank reads and writes; the Koopman map is per capsule.
        let capsules = self.arch.capsules.map_or(0, |k| {
            let koopman = k.koopman.map_or(0, |m| {
                m.passes * k.count * (2 * k.dim * k.dim + 2 * k.dim * m.rank)
            });
            k.passes() * self.dim * k.dim * (1 + k.count) + koopman
        });
        let matmul_params = engram
            + capsules
            + router
            + self.depth()
                * (self.dim * (self.q_dim() + 2 * self.kv_dim())
                    + self.q_dim() * self.dim
                    + self.mlp_matrices() * self.dim * self.hidden_dim)
            + self.vocab_size * self.dim;
        let capsule_attention = self
            .arch
            .capsules
            .map_or(0, |k| k.passes() * k.count * k.dim * seq * 6);
        let attention = self.depth() * self.n_heads * self.head_dim * seq * 6 + capsule_attention;
        (6 * matmul_params + attention) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_parameter_counts() {
        // Counts published for these models (llama2.c README; Qwen3-0.6B model card, tied).
        for (name, count) in [
            ("stories15m", 15_191_712),
            ("stories110m", 109_529_856),
            ("qwen3-0.6b", 596_049_920),
            // The parameter-golf baseline's printed `model_params`.
            ("golf-baseline", 17_059_912),
            // The baseline plus EngramHash: 8 tables of 4096 × 16, and W_K, W_P (512 × 128).
            ("golf", 17_059_912 + 8 * 4096 * 16 + 2 * 512 * 128),
        ] {
            assert_eq!(
                crate::layout::parameter_count(&ModelConfig::preset(name).unwrap()),
                count,
                "{name}"
            );
        }
    }

    #[test]
    fn every_preset_validates() {
        for name in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn invalid_configs_are_refused_naming_the_field() {
        let mut config = ModelConfig::preset("tiny-gqa").unwrap();
        config.n_kv_heads = 3;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("n_kv_heads"), "{message}");

        let mut config = ModelConfig::preset("tiny-gqa").unwrap();
        config.head_dim = 7;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head_dim"));

        let mut config = ModelConfig::preset("tiny-gqa").unwrap();
        config.dim = 0;
        assert!(config.validate().unwrap_err().to_string().contains("dim"));
    }

    /// A mixture of experts: each impossible setting named; its parameters counted (three
    /// experts in two of five layers: the MLP thrice and a router in each).
    #[test]
    fn mixture_of_experts_settings_are_checked_and_counted() {
        let moe = ModelConfig::preset("tiny-golf-moe").unwrap();
        let plain = ModelConfig::preset("tiny-golf").unwrap();
        let (c, f) = (moe.dim, moe.hidden_dim);
        assert_eq!(
            crate::layout::parameter_count(&moe),
            crate::layout::parameter_count(&plain) + 2 * (2 * 2 * c * f + 3 * c)
        );
        assert!(!moe.moe(2) && moe.moe(3) && moe.moe(4));
        let refused = |edit: &dyn Fn(&mut Moe), field: &str| {
            let mut config = moe.clone();
            edit(config.arch.moe.as_mut().unwrap());
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{field}: {message}");
        };
        refused(&|m| m.experts = 1, "arch.moe.experts");
        refused(&|m| m.experts = 65, "arch.moe.experts");
        refused(&|m| m.from_layer = 5, "arch.moe.from_layer");
        refused(&|m| m.aux_weight = -1.0, "arch.moe.aux_weight");
        refused(&|m| m.aux_weight = f64::NAN, "arch.moe.aux_weight");
        let mut swiglu = moe.clone();
        swiglu.arch.mlp = Mlp::Swiglu;
        assert!(swiglu.validate().unwrap_err().to_string().contains("relu²"));
    }

    /// A capsule bank: each impossible setting named; its parameters counted.
    #[test]
    fn capsule_settings_are_checked_and_counted() {
        let caps = ModelConfig::preset("tiny-golf-capsules").unwrap();
        let plain = ModelConfig::preset("tiny-golf").unwrap();
        let (c, n, d) = (caps.dim, 3, 8);
        assert_eq!(
            crate::layout::parameter_count(&caps),
            crate::layout::parameter_count(&plain) + n * d + d * c + c * n * d + c
        );
        let refused = |edit: &dyn Fn(&mut ModelConfig), field: &str| {
            let mut config = caps.clone();
            edit(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{field}: {message}");
        };
        let capsules =
            |f: fn(&mut Capsules)| move |c: &mut ModelConfig| f(c.arch.capsules.as_mut().unwrap());
        refused(&capsules(|k| k.count = 0), "arch.capsules.count");
        refused(&capsules(|k| k.dim = 129), "arch.capsules.dim");
        refused(&capsules(|k| k.layer = 5), "arch.capsules.layer");
        // Koopman dynamics: 2·dim + 2·dim·rank more parameters; each setting checked.
        let koopman = ModelConfig::preset("tiny-golf-koopman").unwrap();
        assert_eq!(
            crate::layout::parameter_count(&koopman),
            crate::layout::parameter_count(&caps) + 2 * d + 2 * d * 2
        );
        let refused_koopman = |f: fn(&mut Koopman), field: &str| {
            let mut config = koopman.clone();
            f(config
                .arch
                .capsules
                .as_mut()
                .unwrap()
                .koopman
                .as_mut()
                .unwrap());
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{field}: {message}");
        };
        refused_koopman(|m| m.rank = 0, "arch.capsules.koopman.rank");
        refused_koopman(|m| m.rank = 9, "arch.capsules.koopman.rank");
        refused_koopman(|m| m.passes = 0, "arch.capsules.koopman.passes");
        refused_koopman(|m| m.passes = 5, "arch.capsules.koopman.passes");
        refused_koopman(
            |m| m.consistency = -1.0,
            "arch.capsules.koopman.consistency",
        );
        refused_koopman(
            |m| m.diag_init = f64::NAN,
            "arch.capsules.koopman.diag_init",
        );
        // The defaults are the submission's: one pass, weight 0.005, D from 0.9.
        let parsed: Capsules =
            serde_json::from_str(r#"{"count": 2, "dim": 4, "layer": 0, "koopman": {"rank": 1}}"#)
                .unwrap();
        let m = parsed.koopman.unwrap();
        assert_eq!((m.passes, m.consistency, m.diag_init), (1, 0.005, 0.9));
        assert_eq!(parsed.passes(), 2);
        refused(
            &|c: &mut ModelConfig| {
                c.arch.engram = ModelConfig::preset("tiny-golf-engram").unwrap().arch.engram;
            },
            "must differ",
        );
    }

    /// Depth recurrence and EngramHash: each impossible setting named, before any size is
    /// computed from it (no overflow, no division by zero).
    #[test]
    fn recurrence_and_engram_settings_are_checked() {
        let refused = |edit: &dyn Fn(&mut ModelConfig), field: &str| {
            let mut config = ModelConfig::preset("tiny-golf-engram").unwrap();
            edit(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{field}: {message}");
        };
        let recurrence = |start, end, repeats| {
            move |c: &mut ModelConfig| {
                c.arch.recurrence = Some(Recurrence {
                    start,
                    end,
                    repeats,
                })
            }
        };
        refused(&recurrence(3, 2, 1), "arch.recurrence");
        refused(&recurrence(1, 9, 1), "arch.recurrence");
        refused(&recurrence(1, 3, 0), "arch.recurrence.repeats");
        refused(&recurrence(1, 3, usize::MAX), "arch.recurrence.repeats");
        refused(&recurrence(0, 2, 1), "value_residual");
        let engram = |f: fn(&mut Engram)| {
            move |c: &mut ModelConfig| {
                let mut e = c.arch.engram.unwrap();
                f(&mut e);
                c.arch.engram = Some(e);
            }
        };
        refused(&engram(|e| e.max_order = 4), "arch.engram.max_order");
        refused(&engram(|e| e.heads = 0), "arch.engram.heads");
        refused(&engram(|e| e.dim = 18), "arch.engram.dim");
        refused(&engram(|e| e.layer = 0), "arch.engram.layer");
        refused(&engram(|e| e.layer = 5), "arch.engram.layer");
        refused(&engram(|e| e.buckets = 0), "arch.engram.buckets");
        // Any sizes at all: refused by name, no arithmetic overflow on the way.
        refused(
            &engram(|e| (e.heads, e.dim) = (usize::MAX, usize::MAX)),
            "parameters",
        );
        refused(&|c| c.arch.parallel_from = Some(5), "arch.parallel_from");
        refused(&|c| c.arch.xsa_from = Some(9), "arch.xsa_from");
        refused(
            &|c| (c.arch.ln_scale, c.arch.norm_weights) = (true, true),
            "arch.ln_scale",
        );
        // A recurrence makes EngramHash's layer index reach the added layers.
        let mut deep = ModelConfig::preset("tiny-golf-engram").unwrap();
        recurrence(1, 3, 1)(&mut deep);
        deep.arch.engram.as_mut().unwrap().layer = 6;
        deep.validate().unwrap();
    }

    #[test]
    fn a_config_with_an_unknown_field_names_the_field() {
        let mut value = serde_json::to_value(ModelConfig::preset("tiny-mha").unwrap()).unwrap();
        value["n_experts"] = 8.into();
        let message = ModelConfig::from_json(&value.to_string())
            .unwrap_err()
            .to_string();
        assert!(message.contains("n_experts"), "{message}");
    }
}
