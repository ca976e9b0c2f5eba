//! The training loop: AdamW with warmup and cosine decay to a floor, global-norm clipping,
//! gradient accumulation, step / token / wall-clock budgets, periodic validation (loss and
//! bits per byte), samples and checkpoints, non-finite step skipping, exact resume, and
//! telemetry with an end-of-run efficiency report.
//!
//! A run directory holds `train.json` (this configuration), the tokenizer, `telemetry.jsonl`,
//! `checkpoints/` and, at the end, `report.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backend::Backend;
use crate::checkpoint::{self, Manifest};
use crate::config::ModelConfig;
use crate::data::{Dataset, Loader, Split};
use crate::eval::{evaluate, EvalResult};
use crate::fsutil::write_atomic;
use crate::model::{AdamW, Model, MuonAdam};
use crate::packed::PackRule;
use crate::runlog::StageMs;
use crate::sample::{complete, SamplingParams};
use crate::telemetry::{measure_matmul_peak, memory_mib, Telemetry};
use crate::tokenizer::Tokenizer;
use crate::vocab::VocabMap;

/// `eprintln!` unless the terminal belongs to someone else (a dashboard).
macro_rules! say {
    ($echo:expr, $($arg:tt)*) => {
        if $echo {
            eprintln!($($arg)*);
        }
    };
}

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
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
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
    /// `kiln::interop::import` reads.
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
    /// Steps whose gradients are overwritten with NaN, to exercise the non-finite path (tests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poison_steps: Vec<u64>,
}

fn default_warmdown() -> u64 {
    1200
}

/// The optimizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    /// Muon (blocks' matrices) + Adam (embeddings, classifier, gains, control tensors).
    Muon,
}

/// The learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
            keep_last: 2,
            sample_every: 0,
            sample_tokens: 64,
            sample_prompt: String::new(),
            compact_vocab: false,
            max_bad_steps: 5,
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
        }
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq * self.accumulation) as u64
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0 && self.seq > 0 && self.accumulation > 0,
            "batch, seq and accumulation must be positive"
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
        Ok(())
    }

    /// Fraction of the budget spent after `step` steps and `elapsed` seconds (the furthest
    /// along of the budgets set).
    fn progress(&self, step: u64, elapsed: f64) -> f64 {
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

/// What a finished run reports (also `report.json`).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub steps: u64,
    pub skipped_steps: u64,
    pub tokens: u64,
    pub wall_seconds: f64,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
    pub tflops: f64,
    pub mfu: f64,
    pub peak_gflops: f64,
    /// Seconds per stage over the run.
    pub stage_seconds: serde_json::Value,
    pub final_loss: f32,
    pub val: Option<EvalResult>,
    pub peak_memory_mib: Option<f64>,
    pub losses: Vec<f32>,
}

/// Seconds spent per stage.
#[derive(Default, Clone, Copy)]
struct Stages {
    data: f64,
    forward: f64,
    backward: f64,
    optimizer: f64,
    eval: f64,
    checkpoint: f64,
}

impl Stages {
    fn json(&self) -> serde_json::Value {
        json!({"data": self.data, "forward": self.forward, "backward": self.backward,
               "optimizer": self.optimizer, "eval": self.eval, "checkpoint": self.checkpoint})
    }
    fn ms_json(&self) -> serde_json::Value {
        let ms = |s: f64| (s * 1e4).round() / 10.0;
        json!({"data": ms(self.data), "forward": ms(self.forward), "backward": ms(self.backward),
               "optimizer": ms(self.optimizer), "eval": ms(self.eval), "checkpoint": ms(self.checkpoint)})
    }
    fn total(&self) -> f64 {
        self.data + self.forward + self.backward + self.optimizer + self.eval + self.checkpoint
    }
}

fn seconds_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Human form of a duration: "1h02m", "3m05s", "12s".
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A run being trained: model, data, run directory, telemetry.
pub struct Trainer<B: Backend> {
    pub config: TrainConfig,
    pub model: Model<B>,
    pub run_dir: PathBuf,
    dataset: Dataset,
    vocab_map: Option<VocabMap>,
    loader: Loader,
    telemetry: Telemetry,
    step: u64,
    skipped: u64,
    elapsed_before: f64,
    /// Print a progress line every this many steps (0: never).
    pub print_every: u64,
    /// Print anything on the terminal (off when a dashboard owns it; telemetry is unaffected).
    pub echo: bool,
}

impl<B: Backend> Trainer<B> {
    /// Starts a new run in `run_dir` (which must not hold one already).
    pub fn create(backend: B, mut config: TrainConfig, run_dir: &Path) -> Result<Self> {
        if run_dir.join("train.json").exists() {
            bail!(
                "{} already holds a run; resume it with --resume {0}, or choose another --out",
                run_dir.display()
            );
        }
        let dataset = Dataset::open(&config.data)?;
        let vocab_map = if config.compact_vocab {
            let mut corpora = dataset.read_all(Split::Train)?;
            corpora.extend(dataset.read_all(Split::Val)?);
            let always: Vec<u32> = dataset.tokenizer.bos().into_iter().collect();
            Some(VocabMap::from_corpora(
                dataset.manifest.vocab_size,
                [&corpora[..]],
                &always,
            ))
        } else {
            None
        };
        config.model.vocab_size = vocab_map
            .as_ref()
            .map_or(dataset.manifest.vocab_size, |m| m.model_vocab());
        if let Some(rows) = config.vocab_size_override {
            ensure!(
                vocab_map.is_none(),
                "--vocab-size and --compact-vocab contradict each other"
            );
            ensure!(
                rows >= dataset.manifest.vocab_size,
                "--vocab-size {rows} is smaller than the tokenizer's {} tokens",
                dataset.manifest.vocab_size
            );
            config.model.vocab_size = rows;
        }
        config.validate()?;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        write_atomic(
            &run_dir.join("train.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        if let Some(map) = &vocab_map {
            write_atomic(
                &run_dir.join("vocab_map.json"),
                serde_json::to_string(map.full_ids())?.as_bytes(),
            )?;
        }
        dataset.tokenizer.save(run_dir)?;
        let mut model = Model::new(backend, config.model.clone())?;
        model.init_random(config.seed);
        if let Some(path) = &config.init_from {
            let imported = crate::interop::import(path, None)?;
            if let Some(tok) = &imported.tokenizer {
                ensure!(
                    tok.hash() == dataset.manifest.tokenizer_sha256,
                    "{} comes with another tokenizer than the one {} was prepared with; prepare the data with --tokenizer set to the model's tokenizer",
                    imported.source,
                    config.data.display()
                );
            }
            ensure!(
                imported.vocab_map.is_none(),
                "{}: start from an uncompacted model (export it first)",
                imported.source
            );
            let mut full = config.model.clone();
            full.vocab_size = dataset.manifest.vocab_size;
            let differences = checkpoint::config_differences(&imported.config, &full);
            ensure!(
                differences.is_empty(),
                "{} does not fit this run: {}",
                imported.source,
                differences.join(", ")
            );
            let weights = match &vocab_map {
                Some(map) => crate::interop::compact(&imported.config, &imported.weights, map).1,
                None => imported.weights,
            };
            model.upload_params(&weights);
            eprintln!("initialised from {}", imported.source);
        }
        Self::prepare_model(&mut model, &config)?;
        let loader = Loader::new(
            dataset.shard_paths(Split::Train),
            dataset.manifest.vocab_size,
            config.batch,
            config.seq,
        )?;
        Self::assemble(
            config,
            model,
            run_dir,
            dataset,
            vocab_map,
            loader,
            (0, 0, 0.0),
        )
    }

    /// Opens the run's telemetry (and TensorBoard files) and puts a trainer together at
    /// `(step, skipped steps, seconds already trained)`.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: TrainConfig,
        model: Model<B>,
        run_dir: &Path,
        dataset: Dataset,
        vocab_map: Option<VocabMap>,
        loader: Loader,
        (step, skipped, elapsed_before): (u64, u64, f64),
    ) -> Result<Self> {
        let mut telemetry = Telemetry::open(&run_dir.join("telemetry.jsonl"))?;
        if config.tensorboard {
            telemetry.enable_tensorboard(&run_dir.join("tensorboard"))?;
        }
        Ok(Trainer {
            config,
            model,
            run_dir: run_dir.to_path_buf(),
            dataset,
            vocab_map,
            loader,
            telemetry,
            step,
            skipped,
            elapsed_before,
            print_every: 1,
            echo: true,
        })
    }

    /// Reopens a run at its newest checkpoint; training continues exactly where it stopped.
    /// `more_steps` raises the step budget (to train past the original end).
    pub fn resume(backend: B, run_dir: &Path, max_steps: Option<u64>) -> Result<Self> {
        let path = run_dir.join("train.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a kiln run (no train.json)", run_dir.display()))?;
        let mut config: TrainConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed", path.display()))?;
        if max_steps.is_some() {
            config.max_steps = max_steps;
        }
        let dataset = Dataset::open(&config.data)?;
        let checkpoint_dir = checkpoint::resolve(run_dir)?;
        let mut model = Model::new(backend, config.model.clone())?;
        Self::prepare_model(&mut model, &config)?;
        let manifest = checkpoint::load_into(
            &mut model,
            &checkpoint_dir,
            Some(&dataset.manifest.tokenizer_sha256),
            true,
        )?;
        let vocab_map = manifest
            .vocab_map
            .map(|full| VocabMap::from_full_ids(dataset.manifest.vocab_size, full));
        let mut loader = Loader::new(
            dataset.shard_paths(Split::Train),
            dataset.manifest.vocab_size,
            config.batch,
            config.seq,
        )?;
        loader.seek(manifest.data_position)?;
        let (step, skipped, elapsed) = (
            manifest.step,
            manifest.skipped_steps,
            manifest.elapsed_seconds,
        );
        let mut trainer = Self::assemble(
            config,
            model,
            run_dir,
            dataset,
            vocab_map,
            loader,
            (step, skipped, elapsed),
        )?;
        trainer.telemetry.emit(
            "resume",
            json!({"step": step, "checkpoint": checkpoint_dir}),
        )?;
        eprintln!(
            "resuming {} at step {step} from {}",
            run_dir.display(),
            checkpoint_dir.display()
        );
        Ok(trainer)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.dataset.tokenizer
    }

    fn manifest(&self, elapsed: f64, val: Option<EvalResult>) -> Manifest {
        Manifest {
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            step: self.step,
            optimizer_steps: self.model.step,
            tokens_seen: self.step * self.config.tokens_per_step(),
            skipped_steps: self.skipped,
            elapsed_seconds: elapsed,
            data_position: self.loader.position,
            seed: self.config.seed,
            tokenizer_sha256: self.dataset.manifest.tokenizer_sha256.clone(),
            model: self.model.config.clone(),
            train: serde_json::to_value(&self.config).unwrap_or_default(),
            val_loss: val.map(|v| v.loss),
            val_bpb: val.map(|v| v.bits_per_byte),
            vocab_map: self.vocab_map.as_ref().map(|m| m.full_ids().to_vec()),
        }
    }

    fn save_checkpoint(&mut self, elapsed: f64, val: Option<EvalResult>) -> Result<PathBuf> {
        let manifest = self.manifest(elapsed, val);
        let dir = self.run_dir.join("checkpoints");
        let path = checkpoint::save(&self.model, &manifest, &dir)?;
        checkpoint::rotate(&dir, self.config.keep_last, &manifest)?;
        Ok(path)
    }

    /// Validation of the weights the run will deliver: the moving average when there is one
    /// (quantized under QAT).
    fn validate_now(
        &mut self,
        val_acts: &crate::model::Activations<B>,
        val_tokens: &[u32],
    ) -> Result<EvalResult> {
        self.model.swap_ema()?;
        let result = evaluate(
            &self.model,
            val_acts,
            val_tokens,
            &self.dataset.tokenizer,
            self.vocab_map.as_ref(),
            self.config.eval_batches,
            &mut |_, _| {},
        );
        self.model.swap_ema()?;
        result
    }

    /// Turns on what the run's configuration asks of the model beyond its weights.
    fn prepare_model(model: &mut Model<B>, config: &TrainConfig) -> Result<()> {
        if let Some(decay) = config.ema_decay {
            ensure!(
                (0.0..1.0).contains(&decay),
                "--ema decay must be in [0, 1), got {decay}"
            );
            model.enable_ema(decay);
        }
        if let Some(rule) = config.qat {
            model.enable_qat(rule)?;
        }
        Ok(())
    }

    /// A text sample from the current weights, with the engine's own sampler.
    pub fn sample_text(&self, seed: u64) -> Result<String> {
        let tok = &self.dataset.tokenizer;
        let mut prompt: Vec<u32> = tok.bos().into_iter().collect();
        prompt.extend(tok.encode(&self.config.sample_prompt)?);
        if prompt.is_empty() {
            prompt.push(0);
        }
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed,
        };
        let (text, _) = complete(
            &self.model,
            tok,
            self.vocab_map.as_ref(),
            &prompt,
            self.config.sample_tokens,
            &params,
            false,
            |_| {},
        )?;
        Ok(format!("{}{text}", self.config.sample_prompt))
    }

    /// Trains until a budget is reached. Returns the run's report.
    pub fn run(&mut self) -> Result<RunReport> {
        self.run_until(None)
    }

    /// Trains until a budget is reached or, if given, until step `stop_at` — as if the process
    /// were stopped there (the budget and schedule stay those of the whole run).
    pub fn run_until(&mut self, stop_at: Option<u64>) -> Result<RunReport> {
        let cfg = self.config.clone();
        let peak_gflops = measure_matmul_peak(&self.model.backend, 512);
        let flops_per_step =
            cfg.model.train_flops_per_token(cfg.seq) * cfg.tokens_per_step() as f64;
        self.telemetry.emit(
            "start",
            json!({"step": self.step, "backend": self.model.backend.name(), "parameters": self.model.param_count(),
                   "model": cfg.model, "train": cfg, "peak_gflops": peak_gflops, "flops_per_step": flops_per_step,
                   "tokens_per_step": cfg.tokens_per_step(), "max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens,
                   "time_budget_seconds": cfg.time_budget_seconds}),
        )?;
        say!(
            self.echo,
            "training {} parameters on {} | {} tokens/step | measured matmul peak {:.1} GFLOP/s",
            self.model.param_count(),
            self.model.backend.name(),
            cfg.tokens_per_step(),
            peak_gflops
        );
        let acts = self.model.activations(cfg.batch, cfg.seq)?;
        let val_tokens = self.dataset.read_all(Split::Val)?;
        let started = Instant::now();
        let elapsed = |s: &Self| s.elapsed_before + seconds_since(started);
        let mut stages = Stages::default();
        let mut losses = Vec::new();
        let mut consecutive_bad = 0u64;
        let mut last_val = None;
        let steps_at_start = self.step;
        let mut last_loss = f32::NAN;

        // Stop when a budget is spent, when the next step would overrun the time budget, or at
        // `stop_at`.
        let finished = |step: u64, elapsed: f64, step_seconds: f64| {
            cfg.progress(step, elapsed) >= 1.0
                || cfg
                    .time_budget_seconds
                    .is_some_and(|b| elapsed + step_seconds > b)
                || stop_at.is_some_and(|s| step >= s)
        };
        let mut last_step_seconds = 0.0;
        while !finished(self.step, elapsed(self), last_step_seconds) {
            let step_started = Instant::now();
            let before = stages;
            self.model.zero_grad();
            let mut loss_sum = 0f32;
            for _ in 0..cfg.accumulation {
                let t = Instant::now();
                let (x, y) = self.loader.next_batch()?;
                let (x, y) = match &self.vocab_map {
                    Some(m) => (m.to_model(&x)?, m.to_model(&y)?),
                    None => (x, y),
                };
                stages.data += seconds_since(t);
                let t = Instant::now();
                loss_sum += self
                    .model
                    .forward(&acts, &x, Some(&y))
                    .expect("targets given");
                stages.forward += seconds_since(t);
                let t = Instant::now();
                self.model
                    .backward(&acts, &x, &y, 1.0 / cfg.accumulation as f32);
                stages.backward += seconds_since(t);
            }
            let loss = loss_sum / cfg.accumulation as f32;
            let t = Instant::now();
            if cfg.poison_steps.contains(&self.step) {
                let n = self.model.param_count();
                self.model.backend.upload(
                    crate::backend::View::whole(&self.model.grads, n),
                    &vec![f32::NAN; n],
                );
            }
            let grad_norm = self.model.grad_norm();
            let lr_mult = cfg.lr_multiplier(self.step, elapsed(self));
            let lr = match cfg.optimizer {
                OptimizerKind::Adamw => cfg.learning_rate * lr_mult,
                OptimizerKind::Muon => cfg.muon.matrix_lr * lr_mult,
            };
            let finite = loss.is_finite() && grad_norm.is_finite();
            if finite {
                let scale = if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip as f64 {
                    (cfg.grad_clip as f64 / grad_norm) as f32
                } else {
                    1.0
                };
                match cfg.optimizer {
                    OptimizerKind::Adamw => {
                        let hp = AdamW {
                            learning_rate: lr,
                            beta1: cfg.beta1,
                            beta2: cfg.beta2,
                            eps: cfg.adam_eps,
                            weight_decay: cfg.weight_decay,
                        };
                        self.model.adamw_step(&hp, scale);
                    }
                    OptimizerKind::Muon => {
                        let m = &cfg.muon;
                        let hp = MuonAdam {
                            matrix_lr: m.matrix_lr * lr_mult,
                            momentum: m.momentum_at(self.step),
                            ns_steps: m.ns_steps,
                            weight_decay: cfg.weight_decay,
                            embed_lr: m.embed_lr * lr_mult,
                            head_lr: m.head_lr * lr_mult,
                            scalar_lr: m.scalar_lr * lr_mult,
                            beta1: cfg.beta1,
                            beta2: cfg.beta2,
                            eps: cfg.adam_eps,
                        };
                        self.model.muon_adam_step(&hp, scale);
                    }
                }
                self.model.update_ema();
                self.model.refresh_weights()?;
                consecutive_bad = 0;
            } else {
                self.skipped += 1;
                consecutive_bad += 1;
            }
            stages.optimizer += seconds_since(t);
            self.step += 1;
            last_loss = loss;
            losses.push(loss);

            let step_seconds = seconds_since(step_started);
            let tokens_per_s = cfg.tokens_per_step() as f64 / step_seconds;
            let tflops = flops_per_step / step_seconds / 1e12;
            let progress = cfg.progress(self.step, elapsed(self));
            let done = finished(self.step, elapsed(self), step_seconds);
            last_step_seconds = step_seconds;
            if self.print_every > 0 && (self.step % self.print_every == 0 || done) {
                let eta = if progress > 0.0 {
                    elapsed(self) * (1.0 - progress) / progress
                } else {
                    0.0
                };
                say!(self.echo,
                    "step {:>6} | loss {:.4} | lr {:.2e} | norm {:.3} | {:.0} tok/s | {:.0} ms/step | {:.3} TFLOP/s | {:.0}% eta {}",
                    self.step, loss, lr, grad_norm, tokens_per_s, step_seconds * 1e3, tflops, progress * 100.0, human_duration(eta)
                );
            }
            let stop_for_bad_steps = !finite && consecutive_bad >= cfg.max_bad_steps;
            if !finite {
                say!(self.echo, "step {}: non-finite loss {loss} or gradient norm {grad_norm}; step skipped ({} so far)", self.step, self.skipped);
            }
            let step_now = self.step;
            let due =
                |every: u64| !stop_for_bad_steps && (done || (every > 0 && step_now % every == 0));
            if due(cfg.eval_every) {
                let t = Instant::now();
                // The step's activations are spent: validation reuses the same arena.
                let result = self.validate_now(&acts, &val_tokens)?;
                stages.eval += seconds_since(t);
                self.telemetry.emit("eval", json!({"step": self.step, "val_loss": result.loss, "val_bpb": result.bits_per_byte,
                    "tokens": result.tokens, "bytes": result.bytes, "ms": seconds_since(t) * 1e3}))?;
                say!(
                    self.echo,
                    "step {:>6} | val loss {:.4} | val bits/byte {:.4}",
                    self.step,
                    result.loss,
                    result.bits_per_byte
                );
                last_val = Some(result);
            }
            if due(cfg.sample_every) && cfg.sample_tokens > 0 {
                let t = Instant::now();
                let text = self.sample_text(cfg.seed + self.step)?;
                stages.eval += seconds_since(t);
                self.telemetry
                    .emit("sample", json!({"step": self.step, "text": text}))?;
            }
            if due(cfg.checkpoint_every) {
                let t = Instant::now();
                let val_here = if due(cfg.eval_every) { last_val } else { None };
                let path = self.save_checkpoint(elapsed(self), val_here)?;
                stages.checkpoint += seconds_since(t);
                self.telemetry.emit(
                    "checkpoint",
                    json!({"step": self.step, "path": path, "ms": seconds_since(t) * 1e3}),
                )?;
            }
            // One line per step, with every stage this step spent time in (eval, sampling and
            // checkpointing only on the steps that do them).
            let delta = Stages {
                data: stages.data - before.data,
                forward: stages.forward - before.forward,
                backward: stages.backward - before.backward,
                optimizer: stages.optimizer - before.optimizer,
                eval: stages.eval - before.eval,
                checkpoint: stages.checkpoint - before.checkpoint,
            };
            self.telemetry.emit(
                "step",
                json!({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": !finite,
                       "skipped_total": self.skipped, "tokens": self.step * cfg.tokens_per_step(),
                       "tokens_per_s": tokens_per_s, "ms_per_step": step_seconds * 1e3, "ms": delta.ms_json(),
                       "tflops": tflops, "mfu": tflops * 1e3 / peak_gflops, "rss_mib": memory_mib().map(|m| m.0),
                       "elapsed_s": elapsed(self), "progress": progress}),
            )?;
            if stop_for_bad_steps {
                self.telemetry.emit("stopped", json!({"step": self.step, "reason": "non-finite", "consecutive": consecutive_bad}))?;
                bail!(
                    "stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient; the weights were not updated by them, and the last good checkpoint in {} is intact",
                    self.run_dir.join("checkpoints").display()
                );
            }
        }

        let wall = seconds_since(started);
        let steps = self.step - steps_at_start;
        let compute = stages.total() - stages.eval - stages.checkpoint;
        let tokens = steps * cfg.tokens_per_step();
        let tflops = if compute > 0.0 {
            flops_per_step * steps as f64 / compute / 1e12
        } else {
            0.0
        };
        let report = RunReport {
            steps: self.step,
            skipped_steps: self.skipped,
            tokens: self.step * cfg.tokens_per_step(),
            wall_seconds: wall,
            ms_per_step: if steps > 0 {
                compute / steps as f64 * 1e3
            } else {
                0.0
            },
            tokens_per_second: if compute > 0.0 {
                tokens as f64 / compute
            } else {
                0.0
            },
            tflops,
            mfu: tflops * 1e3 / peak_gflops,
            peak_gflops,
            stage_seconds: stages.json(),
            final_loss: last_loss,
            val: last_val,
            peak_memory_mib: memory_mib().map(|m| m.1),
            losses,
        };
        self.telemetry
            .emit("report", serde_json::to_value(&report)?)?;
        write_atomic(
            &self.run_dir.join("report.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        Ok(report)
    }
}

/// Prints the end-of-run efficiency report.
pub fn print_report(report: &RunReport) {
    let stages = &report.stage_seconds;
    let total: f64 = StageMs::NAMES
        .iter()
        .map(|k| stages[k].as_f64().unwrap_or(0.0))
        .sum();
    eprintln!();
    eprintln!("=== efficiency report ===");
    eprintln!(
        "wall time        {:>10}",
        human_duration(report.wall_seconds)
    );
    eprintln!(
        "steps            {:>10} ({} skipped)",
        report.steps, report.skipped_steps
    );
    eprintln!(
        "ms/step          {:>10.1}   (training stages only)",
        report.ms_per_step
    );
    eprintln!("tokens/s         {:>10.0}", report.tokens_per_second);
    eprintln!(
        "TFLOP/s          {:>10.4}   MFU {:.1}% of the measured {:.1} GFLOP/s matmul peak",
        report.tflops,
        report.mfu * 100.0,
        report.peak_gflops
    );
    if let Some(mem) = report.peak_memory_mib {
        eprintln!("peak memory      {:>10.0} MiB", mem);
    }
    for key in StageMs::NAMES {
        let s = stages[key].as_f64().unwrap_or(0.0);
        eprintln!(
            "  {key:<12} {:>9.1} s  {:>5.1}%",
            s,
            if total > 0.0 { 100.0 * s / total } else { 0.0 }
        );
    }
    eprintln!("final loss       {:>10.4}", report.final_loss);
    if let Some(val) = report.val {
        eprintln!(
            "val loss         {:>10.4}   bits/byte {:.4}",
            val.loss, val.bits_per_byte
        );
    }
}
