//! What defines a run (`train.json`): the model, the data, budgets, the optimizer and its
//! schedule. The trainer reads it, and the telemetry's `start` event carries it.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use kiln_core::config::ModelConfig;
use kiln_core::quant::PackRule;
use serde::{Deserialize, Serialize};

/// Everything that defines a run (saved as `train.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model's shape; `vocab_size` is the data's (or the compacted) vocabulary.
    pub model: ModelConfig,
    /// Prepared corpus directory (`kiln data prepare`).
    pub data: PathBuf,
    /// Sequences per micro-batch (B).
    pub batch: usize,
    /// Tokens per sequence (T).
    pub seq: usize,
    /// Micro-batches per optimizer step, in each process.
    pub accumulation: usize,
    /// Data-parallel processes (MPI ranks) training together; each takes its own
    /// micro-batches, so a step reads `world_size × accumulation` batches.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Budgets: the run stops at the first one reached (at least one must be set).
    pub max_steps: Option<u64>,
    pub max_tokens: Option<u64>,
    pub time_budget_seconds: Option<f64>,
    pub learning_rate: f32,
    /// The cosine decays to `learning_rate · min_lr_ratio`.
    pub min_lr_ratio: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f32,
    pub seed: u64,
    /// Validate every N steps (0: only at the end), on at most `eval_batches` batches (0: all).
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end); keep the newest `keep_last`.
    pub checkpoint_every: u64,
    /// Also checkpoint once this many seconds of the run's clock have passed since the last
    /// checkpoint or the (re)start (0: off): a cadence that suits steps of any length, where
    /// every 100 steps of 10 ms spent a fifth of a GPU run saving.
    #[serde(default)]
    pub checkpoint_seconds: f64,
    pub keep_last: usize,
    /// Generate a sample every N steps (0: only at the end) of `sample_tokens` tokens.
    pub sample_every: u64,
    pub sample_tokens: usize,
    pub sample_prompt: String,
    /// Train the embedding and classifier only over tokens that occur in the corpus.
    pub compact_vocab: bool,
    /// Stop after this many consecutive non-finite steps.
    pub max_bad_steps: u64,
    /// More vocabulary rows than the tokenizer has (the extra rows are never a target).
    #[serde(default)]
    pub vocab_size_override: Option<usize>,
    /// Weights to start from instead of random ones (fine-tuning): anything
    /// `kiln::rundir::import` reads.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Also write TensorBoard event files into `RUN/tensorboard/`.
    #[serde(default)]
    pub tensorboard: bool,
    /// AdamW for everything, or Muon for the blocks' matrices with Adam for the rest.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Muon's settings (used with `optimizer: muon`).
    #[serde(default)]
    pub muon: MuonConfig,
    /// Cosine to a floor, or constant then a linear warmdown to zero.
    #[serde(default)]
    pub schedule: Schedule,
    /// Warmdown length in steps; under a time budget it becomes a time, from the measured
    /// step time (the parameter-golf baseline's rule).
    #[serde(default = "default_warmdown")]
    pub warmdown_steps: u64,
    /// Keep an exponential moving average of the weights with this decay; validation,
    /// checkpoints' `ema.safetensors` and exports use the average.
    #[serde(default)]
    pub ema_decay: Option<f32>,
    /// Quantization-aware training: the forward computes with the weights as this rule
    /// quantizes them (straight-through gradients); export with the same rule.
    #[serde(default)]
    pub qat: Option<PackRule>,
    /// A sequence-length curriculum: the first steps train on shorter sequences (more of
    /// them, the same tokens per step), doubling up to `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_warmup: Option<SeqWarmup>,
    /// Stochastic depth (`--stochastic-depth P`): while training, layer l of L is skipped in
    /// a micro-batch with probability P·l/(L − 1) (never the first, the last with P), each
    /// draw from the seed and the micro-batch's place in the run; evaluation runs every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stochastic_depth: Option<f32>,
    /// Steps whose gradients are overwritten with NaN, to exercise the non-finite path (tests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poison_steps: Vec<u64>,
    /// Loss scaling (`--loss-scale`), for fp16 products: the scale the run starts from and
    /// how it grows. `None`: the loss is not scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<kiln_core::optim::LossScaler>,
    /// Ternary noise (`--ternary-noise SIGMA`): under ternary QAT, each step's forward sees
    /// every ternary tensor quantized from the weights plus fresh Gaussian noise of this
    /// standard deviation (evaluation never does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ternary_noise: Option<f32>,
}

/// A sequence-length curriculum (`--seq-warmup START:STEPS`): over the first `steps` steps the
/// sequences are `start`, `2·start`, … tokens, each length an equal share of those steps, then
/// the run's `seq`; each micro-batch keeps `batch × seq` tokens (more, shorter sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqWarmup {
    pub start: usize,
    pub steps: u64,
}

impl std::str::FromStr for SeqWarmup {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed =
            kiln_core::eval::parse_pair(s).map(|(start, steps)| SeqWarmup { start, steps });
        parsed.ok_or_else(|| format!("'{s}' is not START:STEPS (e.g. 64:300)"))
    }
}

fn one() -> usize {
    1
}

fn default_warmdown() -> u64 {
    1200
}

/// The optimizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    /// Muon (blocks' matrices) + Adam (embeddings, classifier, gains, control tensors).
    Muon,
}

/// The learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine from the peak to `min_lr_ratio` of it over the budget.
    #[default]
    Cosine,
    /// Constant, then linear to zero over the last `warmdown_steps`.
    Warmdown,
}

/// Muon + Adam settings; the defaults are the parameter-golf baseline's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuonConfig {
    pub matrix_lr: f32,
    pub momentum: f32,
    /// Momentum starts here and rises linearly to `momentum` over `momentum_warmup_steps`.
    pub momentum_warmup_start: f32,
    pub momentum_warmup_steps: u64,
    pub ns_steps: usize,
    /// MuonEq-R: each row of the update normalized before Newton–Schulz (`--muon-eq-r`).
    pub row_normalize: bool,
    /// Adam's rate for the (tied) embedding and the bigram table.
    pub embed_lr: f32,
    /// Adam's rate for an untied classifier.
    pub head_lr: f32,
    /// Adam's rate for gains and control tensors.
    pub scalar_lr: f32,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            matrix_lr: 0.04,
            momentum: 0.95,
            momentum_warmup_start: 0.85,
            momentum_warmup_steps: 500,
            ns_steps: 5,
            row_normalize: false,
            embed_lr: 0.05,
            head_lr: 0.008,
            scalar_lr: 0.04,
        }
    }
}

impl MuonConfig {
    /// Momentum at 0-based `step`.
    pub fn momentum_at(&self, step: u64) -> f32 {
        let frac = if self.momentum_warmup_steps == 0 {
            1.0
        } else {
            (step as f32 / self.momentum_warmup_steps as f32).min(1.0)
        };
        (1.0 - frac) * self.momentum_warmup_start + frac * self.momentum
    }
}

impl TrainConfig {
    /// Defaults for a model and a corpus; callers then override what they set.
    pub fn new(model: ModelConfig, data: PathBuf) -> Self {
        TrainConfig {
            model,
            data,
            batch: 8,
            seq: 256,
            accumulation: 1,
            max_steps: None,
            max_tokens: None,
            time_budget_seconds: None,
            learning_rate: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            eval_every: 100,
            eval_batches: 20,
            checkpoint_every: 100,
            checkpoint_seconds: 0.0,
            keep_last: 2,
            sample_every: 0,
            sample_tokens: 64,
            sample_prompt: String::new(),
            compact_vocab: false,
            max_bad_steps: 5,
            world_size: 1,
            seq_warmup: None,
            stochastic_depth: None,
            init_from: None,
            vocab_size_override: None,
            tensorboard: false,
            optimizer: OptimizerKind::Adamw,
            muon: MuonConfig::default(),
            schedule: Schedule::Cosine,
            warmdown_steps: default_warmdown(),
            ema_decay: None,
            qat: None,
            poison_steps: Vec::new(),
            loss_scale: None,
            ternary_noise: None,
        }
    }

    /// `(batch, seq)` of the micro-batches of 0-based `step`: the run's own, or during a
    /// sequence-length warmup shorter sequences, more of them, with the same tokens.
    pub fn batch_shape_at(&self, step: u64) -> (usize, usize) {
        let Some(w) = self.seq_warmup.filter(|w| step < w.steps) else {
            return (self.batch, self.seq);
        };
        let lengths = (self.seq / w.start).ilog2() as u64 + 1;
        let seq = w.start << (step * lengths / w.steps);
        (self.batch * self.seq / seq, seq)
    }

    /// Stochastic depth's draw for micro-batch `index` of the run (counted over every process
    /// and micro-batch, in the order one process would read them): which of the model's
    /// layers it skips; empty without stochastic depth.
    pub fn dropped_layers(&self, index: u64) -> Vec<bool> {
        use rand::{Rng, SeedableRng};
        let Some(p) = self.stochastic_depth else {
            return Vec::new();
        };
        let depth = self.model.depth();
        let seed = self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..depth)
            .map(|l| {
                let chance = p as f64 * l as f64 / (depth - 1).max(1) as f64;
                rng.random::<f64>() < chance
            })
            .collect()
    }

    /// Tokens per optimizer step, over all processes.
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq * self.accumulation * self.world_size) as u64
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0 && self.seq > 0 && self.accumulation > 0 && self.world_size > 0,
            "batch, seq, accumulation and the world size must be positive"
        );
        let koopman = self.model.arch.capsules.and_then(|k| k.koopman);
        ensure!(
            koopman.is_none_or(|m| m.halt.is_none()),
            "arch.capsules.koopman.halt (adaptive halting) is for evaluation (kiln eval \
             --capsule-halt); training runs every pass"
        );
        ensure!(
            self.stochastic_depth.is_none() || self.model.arch.feedback.is_none(),
            "--stochastic-depth and feedback passes (arch.feedback) cannot be combined"
        );
        ensure!(
            koopman.is_none_or(|m| m.carry.is_none()),
            "arch.capsules.koopman.carry (capsule carry) is for evaluation (kiln eval \
             --capsule-carry); training runs each window on its own"
        );
        ensure!(
            self.max_steps.is_some()
                || self.max_tokens.is_some()
                || self.time_budget_seconds.is_some(),
            "give a budget: --steps, --tokens or --time"
        );
        ensure!(
            self.seq <= self.model.max_seq_len,
            "--seq {} exceeds the model's max_seq_len {}",
            self.seq,
            self.model.max_seq_len
        );
        ensure!(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "the learning rate must be positive"
        );
        if let Some(p) = self.stochastic_depth {
            ensure!(
                (0.0..1.0).contains(&p),
                "--stochastic-depth {p}: the deepest layer's drop probability must be in [0, 1)"
            );
        }
        if let Some(sigma) = self.ternary_noise {
            ensure!(
                sigma > 0.0 && sigma.is_finite(),
                "--ternary-noise {sigma}: the noise's standard deviation must be positive"
            );
            ensure!(
                self.qat
                    .is_some_and(|rule| rule.matrices == kiln_core::quant::Scheme::Ternary),
                "--ternary-noise perturbs what ternary QAT quantizes: it needs --qat ternary"
            );
        }
        if let Some(w) = self.seq_warmup {
            ensure!(
                w.start > 0
                    && w.start < self.seq
                    && self.seq.is_multiple_of(w.start)
                    && (self.seq / w.start).is_power_of_two()
                    && w.steps > 0,
                "--seq-warmup {}:{}: the start must be --seq {} halved one or more times, and \
                 the steps positive",
                w.start,
                w.steps,
                self.seq
            );
        }
        Ok(())
    }

    /// Fraction of the budget spent after `step` steps and `elapsed` seconds (the furthest
    /// along of the budgets set).
    pub fn progress(&self, step: u64, elapsed: f64) -> f64 {
        let mut p: f64 = 0.0;
        if let Some(max) = self.max_steps {
            p = p.max(step as f64 / max as f64);
        }
        if let Some(max) = self.max_tokens {
            p = p.max((step * self.tokens_per_step()) as f64 / max as f64);
        }
        if let Some(budget) = self.time_budget_seconds {
            p = p.max(elapsed / budget);
        }
        p
    }

    /// Linear warmup over `warmup_steps`, then cosine from the peak to the floor over the rest
    /// of the budget. `step` is 0-based (the step about to be taken).
    pub fn learning_rate_at(&self, step: u64, progress: f64) -> f32 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let floor = self.learning_rate * self.min_lr_ratio;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos()) as f32;
        floor + (self.learning_rate - floor) * cosine
    }

    /// The schedule's multiplier of every peak rate at 0-based `step`, `elapsed` seconds in.
    pub fn lr_multiplier(&self, step: u64, elapsed: f64) -> f32 {
        match self.schedule {
            Schedule::Cosine => {
                self.learning_rate_at(step, self.progress(step, elapsed)) / self.learning_rate
            }
            Schedule::Warmdown => {
                let warm = if step < self.warmup_steps {
                    (step + 1) as f32 / self.warmup_steps as f32
                } else {
                    1.0
                };
                warm * self.warmdown(step, elapsed) as f32
            }
        }
    }

    /// 1 until the last `warmdown_steps` of the budget, then linearly to 0. Under a time
    /// budget the warmdown lasts `warmdown_steps` × the mean step time so far.
    fn warmdown(&self, step: u64, elapsed: f64) -> f64 {
        let n = self.warmdown_steps as f64;
        if n == 0.0 {
            return 1.0;
        }
        let mut fraction: f64 = 1.0;
        if let Some(budget) = self.time_budget_seconds {
            let step_seconds = elapsed / step.max(1) as f64;
            let window = n * step_seconds;
            let remaining = (budget - elapsed).max(0.0);
            if step > 0 && remaining <= window {
                fraction = fraction.min(remaining / window);
            }
        }
        if let Some(max) = self.max_steps {
            let remaining = max.saturating_sub(step) as f64;
            fraction = fraction.min((remaining / n).min(1.0));
        }
        fraction
    }
}
