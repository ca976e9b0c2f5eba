//! Where each tensor lives in the arenas: named, shape-documented regions of one allocation
//! (llm.c `malloc_and_point_parameters`). Parameters, their gradients and each optimizer
//! moment share one [`ParamLayout`]; a step's activations have an [`ActivationLayout`].

use crate::config::ModelConfig;

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

/// What a parameter tensor is, which decides its initialisation and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// The token embedding (V, C); also the classifier when tied.
    Embedding,
    /// A weight matrix read by a matmul.
    Matrix,
    /// A matrix whose output is added into the residual stream (o_proj, down_proj):
    /// initialised smaller, GPT-2 style.
    ResidualMatrix,
    /// An RMSNorm gain (initialised to 1, never decayed).
    NormGain,
}

/// One named parameter tensor.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Hugging Face's name for it (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    pub region: Region,
    pub kind: ParamKind,
}

impl ParamSpec {
    /// Decoupled weight decay applies to matrices and embeddings, not to norm gains.
    pub fn decays(&self) -> bool {
        self.kind != ParamKind::NormGain
    }
}

/// Regions of one transformer block's parameters.
#[derive(Clone, Copy, Debug)]
pub struct LayerParams {
    pub attn_norm: Region,      // (C)
    pub wq: Region,             // (H·D, C)
    pub wk: Region,             // (Hkv·D, C)
    pub wv: Region,             // (Hkv·D, C)
    pub wo: Region,             // (C, H·D)
    pub q_norm: Option<Region>, // (D), with qk_norm
    pub k_norm: Option<Region>, // (D), with qk_norm
    pub ffn_norm: Region,       // (C)
    pub w_gate: Region,         // (F, C)
    pub w_up: Region,           // (F, C)
    pub w_down: Region,         // (C, F)
}

/// Every parameter of a model, in arena order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub embedding: Region, // (V, C)
    pub layers: Vec<LayerParams>,
    pub final_norm: Region, // (C)
    /// The classifier (V, C): the embedding's region when tied.
    pub classifier: Region,
    total: usize,
}

impl ParamLayout {
    pub fn new(config: &ModelConfig) -> Self {
        let (c, d, f, v) = (
            config.dim,
            config.head_dim,
            config.hidden_dim,
            config.vocab_size,
        );
        let (q, kv) = (config.q_dim(), config.kv_dim());
        let mut cursor = Cursor::default();
        let mut specs = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, kind: ParamKind| {
            let region = cursor.take(shape.iter().product());
            specs.push(ParamSpec {
                name,
                shape,
                region,
                kind,
            });
            region
        };
        use ParamKind::*;
        let embedding = add("model.embed_tokens.weight".into(), vec![v, c], Embedding);
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            let attn_norm = add(p("input_layernorm"), vec![c], NormGain);
            let wq = add(p("self_attn.q_proj"), vec![q, c], Matrix);
            let wk = add(p("self_attn.k_proj"), vec![kv, c], Matrix);
            let wv = add(p("self_attn.v_proj"), vec![kv, c], Matrix);
            let wo = add(p("self_attn.o_proj"), vec![c, q], ResidualMatrix);
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(add(p("self_attn.q_norm"), vec![d], NormGain)),
                    Some(add(p("self_attn.k_norm"), vec![d], NormGain)),
                )
            } else {
                (None, None)
            };
            let ffn_norm = add(p("post_attention_layernorm"), vec![c], NormGain);
            let w_gate = add(p("mlp.gate_proj"), vec![f, c], Matrix);
            let w_up = add(p("mlp.up_proj"), vec![f, c], Matrix);
            let w_down = add(p("mlp.down_proj"), vec![c, f], ResidualMatrix);
            layers.push(LayerParams {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                q_norm,
                k_norm,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            });
        }
        let final_norm = add("model.norm.weight".into(), vec![c], NormGain);
        let classifier = if config.tie_embeddings {
            embedding
        } else {
            add("lm_head.weight".into(), vec![v, c], Matrix)
        };
        ParamLayout {
            specs,
            embedding,
            layers,
            final_norm,
            classifier,
            total: cursor.next,
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

/// Regions of one block's saved activations. `N = B·T` rows.
#[derive(Clone, Copy, Debug)]
pub struct LayerActivations {
    pub xn_attn: Region,   // (N, C)   input_layernorm output
    pub rstd_attn: Region, // (N)
    pub q_lin: Region,     // (N, H·D) q_proj output
    pub k_lin: Region,     // (N, Hkv·D)
    pub v: Region,         // (N, Hkv·D)
    /// q, k after qk-norm: the RoPE inputs (the `*_lin` regions themselves without qk-norm).
    pub q_pre: Region, // (N, H·D)
    pub k_pre: Region,     // (N, Hkv·D)
    pub q_rstd: Option<Region>, // (N·H)
    pub k_rstd: Option<Region>, // (N·Hkv)
    pub q: Region,         // (N, H·D)   after RoPE
    pub k: Region,         // (N, Hkv·D) after RoPE
    pub attn_saved: Region, // backend-defined (attention_saved_len)
    pub attn_out: Region,  // (N, H·D)
    pub x_mid: Region,     // (N, C)   residual after attention
    pub xn_ffn: Region,    // (N, C)
    pub rstd_ffn: Region,  // (N)
    pub gate: Region,      // (N, F)
    pub up: Region,        // (N, F)
    pub hidden: Region,    // (N, F)   silu(gate) * up
}

/// Gradient scratch for one block, reused by every block during the backward pass.
#[derive(Clone, Copy, Debug)]
pub struct LayerGradients {
    pub residual: Region, // (N, C)   dL/d(residual stream), accumulated into by every branch
    pub xn: Region,       // (N, C)
    pub attn_out: Region, // (N, H·D)
    pub q: Region,        // (N, H·D)
    pub k: Region,        // (N, Hkv·D)
    pub v: Region,        // (N, Hkv·D)
    pub q_pre: Region,    // (N, H·D)
    pub k_pre: Region,    // (N, Hkv·D)
    /// Gradients of q_proj/k_proj outputs: the `*_pre` regions themselves without qk-norm.
    pub q_lin: Region, // (N, H·D)
    pub k_lin: Region,    // (N, Hkv·D)
    pub hidden: Region,   // (N, F)
    pub gate: Region,     // (N, F)
    pub up: Region,       // (N, F)
    pub logits: Region,   // (N, V)
}

/// Every activation of one step at (batch, seq), in one arena.
#[derive(Clone, Debug)]
pub struct ActivationLayout {
    pub batch: usize,
    pub seq: usize,
    /// Residual stream entering block l (`residual[L]` leaves the last block). (N, C) each.
    pub residual: Vec<Region>,
    pub layers: Vec<LayerActivations>,
    pub xn_final: Region,   // (N, C)
    pub rstd_final: Region, // (N)
    pub logits: Region,     // (N, V)
    pub losses: Region,     // (N)
    pub logsumexp: Region,  // (N)
    pub grads: LayerGradients,
    total: usize,
}

impl ActivationLayout {
    pub fn new(config: &ModelConfig, batch: usize, seq: usize, attention_saved_len: usize) -> Self {
        let n = batch * seq;
        let (c, f, v) = (config.dim, config.hidden_dim, config.vocab_size);
        let (q, kv) = (n * config.q_dim(), n * config.kv_dim());
        let mut cur = Cursor::default();
        let residual = (0..=config.n_layers).map(|_| cur.take(n * c)).collect();
        let layers = (0..config.n_layers)
            .map(|_| {
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
                LayerActivations {
                    xn_attn,
                    rstd_attn,
                    q_lin,
                    k_lin,
                    v: v_,
                    q_pre,
                    k_pre,
                    q_rstd,
                    k_rstd,
                    q: cur.take(q),
                    k: cur.take(kv),
                    attn_saved: cur.take(attention_saved_len),
                    attn_out: cur.take(q),
                    x_mid: cur.take(n * c),
                    xn_ffn: cur.take(n * c),
                    rstd_ffn: cur.take(n),
                    gate: cur.take(n * f),
                    up: cur.take(n * f),
                    hidden: cur.take(n * f),
                }
            })
            .collect();
        let xn_final = cur.take(n * c);
        let rstd_final = cur.take(n);
        let logits = cur.take(n * v);
        let losses = cur.take(n);
        let logsumexp = cur.take(n);
        let (q_pre, k_pre) = (cur.take(q), cur.take(kv));
        let (q_lin, k_lin) = if config.qk_norm {
            (cur.take(q), cur.take(kv))
        } else {
            (q_pre, k_pre)
        };
        let grads = LayerGradients {
            residual: cur.take(n * c),
            xn: cur.take(n * c),
            attn_out: cur.take(q),
            q: cur.take(q),
            k: cur.take(kv),
            v: cur.take(kv),
            q_pre,
            k_pre,
            q_lin,
            k_lin,
            hidden: cur.take(n * f),
            gate: cur.take(n * f),
            up: cur.take(n * f),
            logits: cur.take(n * v),
        };
        ActivationLayout {
            batch,
            seq,
            residual,
            layers,
            xn_final,
            rstd_final,
            logits,
            losses,
            logsumexp,
            grads,
            total: cur.next,
        }
    }

    pub fn total_len(&self) -> usize {
        self.total
    }
}
