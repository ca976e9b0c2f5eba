//! The training loop: AdamW with warmup and cosine decay to a floor, global-norm clipping,
//! gradient accumulation, step / token / wall-clock budgets, periodic validation (loss and
//! bits per byte), samples and checkpoints, non-finite step skipping, exact resume, and
//! telemetry with an end-of-run efficiency report.
//!
//! - `crate::run_config`: what defines a run (`train.json`) and its schedule;
//! - this file: a run's assembly (create, resume, checkpoints, validation, samples);
//! - `step.rs`: the loop, one step at a time, and the report.
//!
//! A run directory's layout is `crate::rundir`'s.

mod step;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use kiln_core::backend::{Backend, Communicator, SingleProcess};
use kiln_core::eval::{evaluate, EvalResult};
use kiln_core::model::{Activations, Model};
use kiln_core::sample::{complete, SamplingParams};
use kiln_core::vocab::VocabMap;
use kiln_formats::checkpoint::{self, Manifest};
use kiln_formats::data::{Dataset, Loader, Split};
use kiln_formats::fsutil::write_atomic;
use kiln_formats::interop;
use kiln_formats::tokenizer::Tokenizer;

pub use crate::run_config::{MuonConfig, OptimizerKind, Schedule, TrainConfig};
pub use crate::telemetry::human_duration;
pub use crate::telemetry::RunReport;
use crate::telemetry::{Event, Telemetry};
pub use step::print_report;

/// `eprintln!` unless the terminal belongs to someone else (a dashboard).
macro_rules! say {
    ($echo:expr, $($arg:tt)*) => {
        if $echo {
            eprintln!($($arg)*);
        }
    };
}
use say;

/// A run being trained: model, data, run directory, telemetry.
pub struct Trainer<B: Backend> {
    pub config: TrainConfig,
    pub model: Model<B>,
    pub run_dir: PathBuf,
    dataset: Dataset,
    vocab_map: Option<VocabMap>,
    loader: Loader,
    telemetry: Telemetry,
    /// Sums the gradient arena across data-parallel processes (the identity alone).
    communicator: Box<dyn Communicator<B> + Send>,
    step: u64,
    skipped: u64,
    elapsed_before: f64,
    /// Loss scaling's state (`config.loss_scale` at the start, the checkpoint's on resume).
    loss_scale: Option<kiln_core::optim::LossScaler>,
    /// Print a progress line every this many steps (0: never).
    pub print_every: u64,
    /// Print anything on the terminal (off when a dashboard owns it; telemetry is unaffected).
    pub echo: bool,
    /// The hardware peak (GFLOP/s) of the precision in use that MFU is reported against, from
    /// `kiln bench peak`'s probes; `None`: the backend's own matmul, measured at start.
    pub peak_gflops: Option<f64>,
    /// Set (by a signal handler, [`crate::interrupt`]) to stop at the next step boundary after
    /// saving a checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// The run directory's lock, held while this trainer lives ([`lock_run`]); rank 0's
    /// alone in a data-parallel run.
    _lock: Option<File>,
}

/// Takes the run directory's lock (`run_dir/.lock`, an advisory exclusive lock the kernel
/// drops when the process ends, however it ends), so a second trainer on the same run is
/// refused instead of interleaving checkpoints. The holder's pid is written in it, for the
/// refusal's message.
fn lock_run(run_dir: &Path) -> Result<File> {
    let path = run_dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{} is being trained by another kiln process (pid {}); wait for it to finish, \
                 or stop it (Ctrl-C saves a checkpoint) and resume",
                run_dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    file.set_len(0)?;
    file.write_all(std::process::id().to_string().as_bytes())?;
    Ok(file)
}

/// Refuses data too small for the processes: with fewer batches in a pass than one step of
/// `world_size` processes × `accumulation` micro-batches reads, processes would train on the
/// same tokens within a step.
fn check_data_for_world(loader: &Loader, config: &TrainConfig) -> Result<()> {
    let world = config.world_size;
    let per_step = (world * config.accumulation) as u64;
    ensure!(
        world == 1 || loader.batches_per_pass() >= per_step,
        "{}: the training split holds {} batches of {}×{} tokens, fewer than the {} that one \
         step of {world} processes × {} micro-batches reads, so processes would train on the \
         same tokens; use fewer processes, a smaller --batch or --seq, or more data",
        config.data.display(),
        loader.batches_per_pass(),
        config.batch,
        config.seq,
        per_step,
        config.accumulation
    );
    Ok(())
}

impl<B: Backend> Trainer<B> {
    /// Starts a new run in `run_dir` (which must not hold one already).
    pub fn create(backend: B, config: TrainConfig, run_dir: &Path) -> Result<Self> {
        Self::create_in(backend, config, run_dir, Box::new(SingleProcess))
    }

    /// Starts a new run trained data-parallel by every process of `communicator`: each one
    /// calls this with the same arguments; rank 0 alone writes the run directory.
    pub fn create_in(
        backend: B,
        mut config: TrainConfig,
        run_dir: &Path,
        communicator: Box<dyn Communicator<B> + Send>,
    ) -> Result<Self> {
        let lead = communicator.rank() == 0;
        config.world_size = communicator.world_size();
        if lead && run_dir.join("train.json").exists() {
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
        let loader = Loader::new(
            dataset.shard_paths(Split::Train),
            dataset.manifest.vocab_size,
            config.batch,
            config.seq,
        )?;
        check_data_for_world(&loader, &config)?;
        let lock = if lead {
            std::fs::create_dir_all(run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            let lock = lock_run(run_dir)?;
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
            Some(lock)
        } else {
            None
        };
        let mut model = Model::new(backend, config.model.clone())?;
        model.init_random(config.seed)?;
        if let Some(path) = &config.init_from {
            let imported = crate::rundir::import(path, None)?;
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
                Some(map) => interop::compact(&imported.config, &imported.weights, map).1,
                None => imported.weights,
            };
            model.upload_params(&weights)?;
            if lead {
                eprintln!("initialised from {}", imported.source);
            }
        }
        Self::prepare_model(&mut model, &config)?;
        Self::assemble(
            config,
            model,
            (run_dir, lock),
            dataset,
            vocab_map,
            loader,
            (0, 0, 0.0),
            communicator,
        )
    }

    /// Opens the run's telemetry (and TensorBoard files) and puts a trainer together at
    /// `(step, skipped steps, seconds already trained)`, holding the run's `lock` (rank 0;
    /// other ranks write nothing).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: TrainConfig,
        model: Model<B>,
        (run_dir, lock): (&Path, Option<File>),
        dataset: Dataset,
        vocab_map: Option<VocabMap>,
        loader: Loader,
        (step, skipped, elapsed_before): (u64, u64, f64),
        communicator: Box<dyn Communicator<B> + Send>,
    ) -> Result<Self> {
        // Rank 0 (or the only process) writes the run; the others write nothing.
        let lead = lock.is_some();
        let telemetry = if lead {
            // Partial checkpoints a killed process left: no other process writes here now.
            if let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') && name.contains(".tmp-") {
                        std::fs::remove_dir_all(entry.path()).with_context(|| {
                            format!(
                                "cannot remove a partial checkpoint {}",
                                entry.path().display()
                            )
                        })?;
                    }
                }
            }
            let mut telemetry = Telemetry::open(&run_dir.join("telemetry.jsonl"))?;
            if config.tensorboard {
                telemetry.enable_tensorboard(&run_dir.join("tensorboard"))?;
            }
            telemetry
        } else {
            Telemetry::discard()
        };
        let loss_scale = config.loss_scale;
        Ok(Trainer {
            config,
            model,
            run_dir: run_dir.to_path_buf(),
            dataset,
            vocab_map,
            loader,
            telemetry,
            communicator,
            loss_scale,
            step,
            skipped,
            elapsed_before,
            print_every: u64::from(lead),
            echo: lead,
            peak_gflops: None,
            interrupt: None,
            _lock: lock,
        })
    }

    /// Reopens a run at its newest checkpoint; training continues exactly where it stopped.
    /// `more_steps` raises the step budget (to train past the original end).
    pub fn resume(backend: B, run_dir: &Path, max_steps: Option<u64>) -> Result<Self> {
        Self::resume_in(backend, run_dir, max_steps, Box::new(SingleProcess))
    }

    /// [`Self::resume`] by every process of `communicator` (each reads the run directory;
    /// rank 0 alone writes it). Another world size than the run's is taken only where each
    /// step can read the same batches in the same order: the run's processes × micro-batches
    /// must divide among the new processes, which then take that many micro-batches each.
    pub fn resume_in(
        backend: B,
        run_dir: &Path,
        max_steps: Option<u64>,
        communicator: Box<dyn Communicator<B> + Send>,
    ) -> Result<Self> {
        let lead = communicator.rank() == 0;
        let path = run_dir.join("train.json");
        ensure!(
            path.exists(),
            "{} is not a kiln run (no train.json)",
            run_dir.display()
        );
        let lock = if lead { Some(lock_run(run_dir)?) } else { None };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a kiln run (no train.json)", run_dir.display()))?;
        let mut config: TrainConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed", path.display()))?;
        if max_steps.is_some() {
            config.max_steps = max_steps;
        }
        let world = communicator.world_size();
        if config.world_size != world {
            let batches = config.world_size * config.accumulation;
            ensure!(
                batches.is_multiple_of(world),
                "{} was trained by {} processes × {} micro-batches = {batches} batches per \
                 step, which {world} processes cannot share evenly, so the data order would \
                 change; resume with a number of processes that divides {batches}",
                run_dir.display(),
                config.world_size,
                config.accumulation
            );
            if lead {
                eprintln!(
                    "{}: {} processes × {} micro-batches before, {world} × {} now: the same \
                     batches in the same order",
                    run_dir.display(),
                    config.world_size,
                    config.accumulation,
                    batches / world
                );
            }
            config.accumulation = batches / world;
            config.world_size = world;
            if lead {
                write_atomic(&path, serde_json::to_string_pretty(&config)?.as_bytes())?;
            }
        }
        let dataset = Dataset::open(&config.data)?;
        let checkpoint_dir = crate::rundir::resolve(run_dir)?;
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
        check_data_for_world(&loader, &config)?;
        let (step, skipped, elapsed) = (
            manifest.step,
            manifest.skipped_steps,
            manifest.elapsed_seconds,
        );
        let mut trainer = Self::assemble(
            config,
            model,
            (run_dir, lock),
            dataset,
            vocab_map,
            loader,
            (step, skipped, elapsed),
            communicator,
        )?;
        if manifest.loss_scale.is_some() {
            trainer.loss_scale = manifest.loss_scale;
        }
        trainer.telemetry.emit(Event::Resume {
            step,
            checkpoint: checkpoint_dir.clone(),
        })?;
        if lead {
            eprintln!(
                "resuming {} at step {step} from {}",
                run_dir.display(),
                checkpoint_dir.display()
            );
        }
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
            loss_scale: self.loss_scale,
        }
    }

    fn save_checkpoint(&mut self, elapsed: f64, val: Option<EvalResult>) -> Result<PathBuf> {
        let manifest = self.manifest(elapsed, val);
        let dir = self.run_dir.join("checkpoints");
        let path = checkpoint::save(&self.model, &manifest, &dir)?;
        crate::rundir::rotate(&dir, self.config.keep_last, &manifest)?;
        Ok(path)
    }

    /// Validation of the weights the run will deliver: the moving average when there is one
    /// (quantized under QAT).
    fn validate_now(
        &mut self,
        val_acts: &Activations<B>,
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
        Ok(result?)
    }

    /// Turns on what the run's configuration asks of the model beyond its weights.
    fn prepare_model(model: &mut Model<B>, config: &TrainConfig) -> Result<()> {
        if let Some(decay) = config.ema_decay {
            ensure!(
                (0.0..1.0).contains(&decay),
                "--ema decay must be in [0, 1), got {decay}"
            );
            model.enable_ema(decay)?;
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
}
