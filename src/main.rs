//! The `kiln` command line: `data prepare`, `train`, `sample`, `eval`, `model info`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use kiln::backend::reference::ReferenceBackend;
use kiln::checkpoint;
use kiln::config::ModelConfig;
use kiln::data::{Dataset, Split, TokenizerSpec};
use kiln::eval::evaluate_sliding;
use kiln::model::{Model, ParamLayout};
use kiln::sample::SamplingParams;
use kiln::tokenizer::Tokenizer;
use kiln::train::{print_report, MuonConfig, OptimizerKind, Schedule, TrainConfig, Trainer};
use kiln::vocab::VocabMap;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train small language models from scratch, fast, on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare corpora.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a model (or resume a run).
    Train(Box<TrainArgs>),
    /// Generate text from a run or checkpoint.
    Sample(SampleArgs),
    /// Validation loss and bits per byte of a run or checkpoint.
    Eval(EvalArgs),
    /// Write a run, checkpoint or imported model as a Hugging Face directory or a llama2.c file.
    Export {
        /// hf: config.json + model.safetensors + tokenizer; llama2c: model.bin (the legacy
        /// format run.c reads) + tokenizer.bin.
        #[arg(long, value_enum)]
        format: FormatArg,
        /// A run directory, checkpoint directory, Hugging Face directory or llama2.c .bin.
        source: PathBuf,
        /// Output directory.
        out: PathBuf,
        /// packed: the scheme of the block matrices.
        #[arg(long, value_enum, default_value = "int8")]
        scheme: QuantChoice,
        /// packed: the scheme of the embedding (and an untied classifier).
        #[arg(long, value_enum, default_value = "int8")]
        embedding_scheme: QuantChoice,
        /// packed: tensors of at most this many values stay f16.
        #[arg(long, default_value_t = 65536)]
        small_max: usize,
        /// packed: fail if the artifact exceeds this size (bytes; or 16MB = 16,000,000).
        #[arg(long, value_parser = parse_bytes)]
        budget: Option<u64>,
    },
    /// Benchmarks (use a release build).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Terminal dashboard of a live or finished run (reads only the run directory).
    Dashboard {
        run: PathBuf,
        /// Tokens to sample from each new checkpoint (0: no sampling).
        #[arg(long, default_value_t = 48)]
        sample_tokens: usize,
        /// Leave when the run has finished instead of waiting for `q`.
        #[arg(long)]
        exit_when_finished: bool,
    },
    /// PNG/SVG plots and a Markdown summary of one or more runs (overlaid when several).
    Report {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output directory (default: RUN/report for one run, ./kiln-report for several).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Inspect model configurations.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text files into train/validation shards.
    Prepare {
        /// Text files or directories (walked in name order).
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// `bpe:VOCAB` trains a byte-level BPE on the training split; or a tokenizer.json
        /// (Hugging Face) or tokenizer.bin (llama2.c) file.
        #[arg(long, default_value = "bpe:4096")]
        tokenizer: String,
        /// Share of the corpus (the tail, cut at a line) held out for validation.
        #[arg(long, default_value_t = 0.05)]
        val_fraction: f64,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Continue the run in this directory from its newest checkpoint (other options except
    /// --steps are taken from the run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Prepared corpus directory.
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Model preset or JSON config file (its vocab_size is replaced by the data's).
    #[arg(long, default_value = "stories15m")]
    model: String,
    /// Give the model this many vocabulary rows instead of the tokenizer's (at least the
    /// tokenizer's): e.g. Qwen3-0.6B's 151,936-row classifier on data from a smaller tokenizer.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Start from these weights (fine-tuning) instead of random ones: a Hugging Face
    /// directory, a llama2.c .bin, or a kiln run or checkpoint. Its shape replaces --model.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Run directory to create.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many training tokens.
    #[arg(long)]
    tokens: Option<u64>,
    /// Stop after this much wall-clock time: 90s, 5m, 1h.
    #[arg(long, alias = "time-budget", value_parser = parse_duration)]
    time: Option<f64>,
    /// adamw, or muon: Muon for the blocks' matrices (--matrix-lr) and Adam for the
    /// embeddings (--embed-lr), an untied classifier (--head-lr) and scalars (--scalar-lr).
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    #[arg(long, default_value_t = 0.04)]
    matrix_lr: f32,
    #[arg(long, default_value_t = 0.05)]
    embed_lr: f32,
    #[arg(long, default_value_t = 0.008)]
    head_lr: f32,
    #[arg(long, default_value_t = 0.04)]
    scalar_lr: f32,
    /// Steps over which Muon's momentum rises from 0.85 to 0.95.
    #[arg(long, default_value_t = 500)]
    momentum_warmup: u64,
    /// cosine (to --min-lr-ratio), or warmdown: constant, then linear to zero over the last
    /// --warmdown-steps (a time, from the measured step time, under --time).
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 1200)]
    warmdown_steps: u64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999);
    /// validation and exports use it.
    #[arg(long)]
    ema: Option<f32>,
    /// Quantization-aware training: compute with the block matrices quantized by this scheme
    /// (straight-through gradients), as `kiln export --format packed --scheme` will.
    #[arg(long, value_enum)]
    qat: Option<QuantChoice>,
    /// With --qat: the embedding's scheme.
    #[arg(long, value_enum, default_value = "int8")]
    qat_embedding: QuantChoice,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// The cosine decays to lr × this.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Validation batches per evaluation (0: the whole split).
    #[arg(long, default_value_t = 20)]
    eval_batches: usize,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
    /// Write a text sample to the telemetry every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    sample_every: u64,
    #[arg(long, default_value_t = 64)]
    sample_tokens: usize,
    #[arg(long, default_value = "")]
    sample_prompt: String,
    /// Train the embedding and classifier only over tokens that occur in the corpus.
    #[arg(long)]
    compact_vocab: bool,
    /// Print a progress line every N steps.
    #[arg(long, default_value_t = 1)]
    print_every: u64,
    /// Show the live dashboard while training (the training runs in a background thread).
    #[arg(long)]
    dashboard: bool,
    /// Also write TensorBoard event files into RUN/tensorboard/.
    #[arg(long)]
    tensorboard: bool,
}

#[derive(Args)]
struct ModelSource {
    /// A run directory (its newest checkpoint) or a checkpoint directory.
    #[arg(long, conflicts_with = "model")]
    run: Option<PathBuf>,
    /// Use the run's best checkpoint by validation loss instead of the newest.
    #[arg(long, requires = "run")]
    best: bool,
    /// An imported model: a Hugging Face directory or a llama2.c .bin (tokenizer beside it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The tokenizer, when it is not beside the model (tokenizer.json or tokenizer.bin).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct SampleArgs {
    #[command(flatten)]
    source: ModelSource,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalArgs {
    /// A packed artifact (`kiln export --format packed`), reloaded alone (its tokenizer beside
    /// it); with --run too, the gap to that unquantized model is reported.
    #[arg(long)]
    artifact: Option<PathBuf>,
    #[command(flatten)]
    source: ModelSource,
    /// Prepared corpus to evaluate on (default: the run's own).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Batches to score (0: the whole validation split).
    #[arg(long, default_value_t = 0)]
    batches: usize,
    /// Sliding-window evaluation: a window starts every S tokens and scores only its last S
    /// targets, so each is scored with at least seq − S tokens of context (default: seq,
    /// plain consecutive windows).
    #[arg(long)]
    stride: Option<usize>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Each kernel of a training step on a model's shapes: ms and GFLOP/s or GB/s, against
    /// the matmul peak measured in the same run.
    Kernels {
        /// Model preset or config file.
        #[arg(long, default_value = "stories15m")]
        preset: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Override the vocabulary size (e.g. a 4096-token BPE).
        #[arg(long)]
        vocab_size: Option<usize>,
        /// Repetitions per kernel (the best is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also write the figures, with the machine's description, as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameter count with a per-tensor breakdown.
    Info {
        /// A preset name (stories15m, stories42m, stories110m, qwen3-0.6b, tiny-mha, tiny-gqa)
        /// or a JSON config file.
        model: String,
        /// Print the configuration as JSON as well.
        #[arg(long)]
        json: bool,
    },
    /// Logits of a model for given token ids, as JSON (to compare with another implementation).
    Logits {
        /// A run, checkpoint, Hugging Face directory or llama2.c .bin.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids (the model's own ids).
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<u32>,
    },
}

/// `kiln export --format`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FormatArg {
    /// A Hugging Face directory (`transformers.AutoModelForCausalLM.from_pretrained`).
    Hf,
    /// llama2.c's legacy `.bin` (what `run.c` runs) and its `tokenizer.bin`.
    Llama2c,
    /// A quantized, compressed kiln artifact (`model.kiln`) for size-budgeted models.
    Packed,
}

impl FormatArg {
    /// The library's format for the formats `kiln::interop::export` writes.
    fn library(self) -> kiln::interop::ExportFormat {
        match self {
            FormatArg::Hf => kiln::interop::ExportFormat::Hf,
            FormatArg::Llama2c => kiln::interop::ExportFormat::Llama2c,
            FormatArg::Packed => unreachable!("packed export has its own arm"),
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OptimizerArg {
    Adamw,
    Muon,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ScheduleArg {
    Cosine,
    Warmdown,
}

/// A quantization scheme on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum QuantChoice {
    Ternary,
    Int8,
    Int6,
    F16,
}

impl QuantChoice {
    fn scheme(self) -> kiln::quant::Scheme {
        use kiln::quant::Scheme;
        // The clip percentile of parameter-golf's int8 baseline.
        const CLIP_PERCENTILE: f32 = 99.99984;
        match self {
            QuantChoice::Ternary => Scheme::Ternary,
            QuantChoice::Int8 => Scheme::Int {
                bits: 8,
                percentile: CLIP_PERCENTILE,
            },
            QuantChoice::Int6 => Scheme::Int {
                bits: 6,
                percentile: CLIP_PERCENTILE,
            },
            QuantChoice::F16 => Scheme::F16,
        }
    }
}

/// "16MB" (decimal, as the size challenge counts), "500KB", "1.5GB", or plain bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let (number, scale) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(unit, scale)| {
            upper
                .strip_suffix(unit)
                .map(|n| (n.trim().to_string(), *scale))
        })
        .unwrap_or((upper.clone(), 1.0));
    number
        .parse::<f64>()
        .map(|n| (n * scale) as u64)
        .map_err(|_| format!("'{s}' is not a size like 16MB or 15000000"))
}

/// "90s", "5m", "1.5h", or plain seconds.
fn parse_duration(s: &str) -> Result<f64, String> {
    let (number, unit) = match s.find(|c: char| c.is_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 90s, 5m or 1h"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m or h)")),
    };
    Ok(value * scale)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Data {
            command:
                DataCommand::Prepare {
                    input,
                    out,
                    tokenizer,
                    val_fraction,
                },
        } => {
            let manifest = kiln::data::prepare(
                &input,
                &out,
                tokenizer.parse::<TokenizerSpec>()?,
                val_fraction,
            )?;
            println!(
                "{}: {} train tokens, {} validation tokens ({} bytes of text), vocabulary {}",
                out.display(),
                manifest.train_tokens,
                manifest.val_tokens,
                manifest.val_bytes,
                manifest.vocab_size
            );
            Ok(())
        }
        Command::Train(args) => train(*args),
        Command::Sample(args) => sample(args),
        Command::Eval(args) => eval(args),
        Command::Bench {
            command:
                BenchCommand::Kernels {
                    preset,
                    batch,
                    seq,
                    vocab_size,
                    reps,
                    json,
                },
        } => {
            let mut config = ModelConfig::from_preset_or_file(&preset)?;
            if let Some(v) = vocab_size {
                config.vocab_size = v;
            }
            let figures = kiln::bench::kernels(&ReferenceBackend, &config, batch, seq, reps)?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Dashboard {
            run,
            sample_tokens,
            exit_when_finished,
        } => kiln::dashboard::run(
            &run,
            kiln::dashboard::Options {
                sample_tokens,
                exit_when_finished,
            },
        ),
        Command::Report { runs, out } => {
            let out = out.unwrap_or_else(|| {
                if runs.len() == 1 {
                    runs[0].join("report")
                } else {
                    PathBuf::from("kiln-report")
                }
            });
            for file in kiln::report::write(&runs, &out)? {
                println!("wrote {}", file.display());
            }
            Ok(())
        }
        Command::Export {
            format: FormatArg::Packed,
            source,
            out,
            scheme,
            embedding_scheme,
            small_max,
            budget,
        } => {
            let rule = kiln::packed::PackRule {
                matrices: scheme.scheme(),
                embedding: embedding_scheme.scheme(),
                small_max,
            };
            let (path, report) = kiln::interop::export_packed(&source, &out, rule)?;
            kiln::packed::print_table(&report);
            println!("wrote {}", path.display());
            if let Some(limit) = budget {
                let spare = kiln::packed::check_budget(&path, &report, limit)?;
                println!("within the budget of {limit} bytes ({spare} to spare)");
            }
            Ok(())
        }
        Command::Export {
            format,
            source,
            out,
            ..
        } => {
            let written = kiln::interop::export(&source, format.library(), &out)?;
            println!("wrote {}", written.display());
            Ok(())
        }
        Command::Model {
            command: ModelCommand::Info { model, json },
        } => model_info(&model, json),
        Command::Model {
            command: ModelCommand::Logits { model, tokens },
        } => {
            let imported = kiln::interop::import(&model, None)?;
            let m = Model::new(ReferenceBackend, imported.config)?;
            m.upload_params(&imported.weights);
            let acts = m.activations(1, tokens.len())?;
            m.forward(&acts, &tokens, None);
            println!("{}", serde_json::to_string(&m.download_logits(&acts))?);
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let mut trainer = match &args.resume {
        Some(run) => Trainer::resume(ReferenceBackend, run, args.steps)?,
        None => {
            let data = args.data.clone().context("--data is required")?;
            let model = match &args.init_from {
                Some(path) => kiln::interop::import(path, None)?.config,
                None => ModelConfig::from_preset_or_file(&args.model)?,
            };
            let mut config = TrainConfig::new(model, data);
            config.init_from = args.init_from.clone();
            config.vocab_size_override = args.vocab_size;
            config.tensorboard = args.tensorboard;
            config.batch = args.batch;
            config.seq = args.seq;
            config.accumulation = args.accum;
            config.max_steps = args.steps;
            config.max_tokens = args.tokens;
            config.time_budget_seconds = args.time;
            config.learning_rate = args.lr;
            config.min_lr_ratio = args.min_lr_ratio;
            config.warmup_steps = args.warmup;
            config.weight_decay = args.weight_decay;
            config.grad_clip = args.grad_clip;
            config.seed = args.seed;
            config.eval_every = args.eval_every;
            config.eval_batches = args.eval_batches;
            config.checkpoint_every = args.checkpoint_every;
            config.keep_last = args.keep_last;
            config.sample_every = args.sample_every;
            config.sample_tokens = args.sample_tokens;
            config.sample_prompt = args.sample_prompt.clone();
            config.compact_vocab = args.compact_vocab;
            config.optimizer = match args.optimizer {
                OptimizerArg::Adamw => OptimizerKind::Adamw,
                OptimizerArg::Muon => OptimizerKind::Muon,
            };
            config.muon = MuonConfig {
                matrix_lr: args.matrix_lr,
                embed_lr: args.embed_lr,
                head_lr: args.head_lr,
                scalar_lr: args.scalar_lr,
                momentum_warmup_steps: args.momentum_warmup,
                ..MuonConfig::default()
            };
            config.schedule = match args.schedule {
                ScheduleArg::Cosine => Schedule::Cosine,
                ScheduleArg::Warmdown => Schedule::Warmdown,
            };
            config.warmdown_steps = args.warmdown_steps;
            config.ema_decay = args.ema;
            config.qat = args.qat.map(|scheme| kiln::packed::PackRule {
                matrices: scheme.scheme(),
                embedding: args.qat_embedding.scheme(),
                small_max: 65536,
            });
            Trainer::create(
                ReferenceBackend,
                config,
                args.out.as_deref().context("--out is required")?,
            )?
        }
    };
    trainer.print_every = args.print_every;
    if !args.dashboard {
        let report = trainer.run()?;
        print_report(&report);
        eprintln!("run directory: {}", trainer.run_dir.display());
        return Ok(());
    }
    // The dashboard owns the terminal; training runs beside it and reports through telemetry.
    trainer.echo = false;
    let run_dir = trainer.run_dir.clone();
    let training = std::thread::spawn(move || {
        let result = trainer.run();
        (trainer, result)
    });
    kiln::dashboard::run(
        &run_dir,
        kiln::dashboard::Options {
            sample_tokens: 48,
            exit_when_finished: false,
        },
    )?;
    if !training.is_finished() {
        eprintln!("dashboard closed; training goes on in {} (Ctrl-C stops it; `kiln dashboard {0}` reopens the view)", run_dir.display());
    }
    let (trainer, result) = training
        .join()
        .map_err(|_| anyhow::anyhow!("the training thread panicked"))?;
    print_report(&result?);
    eprintln!("run directory: {}", trainer.run_dir.display());
    Ok(())
}

/// A trained model with what it needs to read and write text.
struct Loaded {
    model: Model<ReferenceBackend>,
    tokenizer: Tokenizer,
    vocab_map: Option<VocabMap>,
    /// Present when loaded from a kiln checkpoint.
    manifest: Option<checkpoint::Manifest>,
}

fn load(source: &ModelSource) -> Result<Loaded> {
    let path = match (&source.run, &source.model) {
        (Some(run), _) if source.best => checkpoint::best(run)?,
        (Some(run), _) => checkpoint::resolve(run)?,
        (None, Some(model)) => model.clone(),
        (None, None) => bail!("give --run or --model"),
    };
    let imported = kiln::interop::import(&path, source.tokenizer.as_deref())?;
    let tokenizer = imported.tokenizer.with_context(|| {
        format!(
            "no tokenizer found for {}; pass --tokenizer",
            imported.source
        )
    })?;
    let model = Model::new(ReferenceBackend, imported.config)?;
    model.upload_params(&imported.weights);
    let manifest = checkpoint::read_manifest(&path).ok();
    eprintln!("loaded {}", imported.source);
    Ok(Loaded {
        model,
        tokenizer,
        vocab_map: imported.vocab_map,
        manifest,
    })
}

fn sample(args: SampleArgs) -> Result<()> {
    let Loaded {
        model,
        tokenizer,
        vocab_map,
        ..
    } = load(&args.source)?;
    let mut prompt: Vec<u32> = tokenizer.bos().into_iter().collect();
    prompt.extend(tokenizer.encode(&args.prompt)?);
    if prompt.is_empty() {
        bail!("give a --prompt: this tokenizer has no BOS token to start from");
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut stdout = std::io::stdout();
    print!("{}", args.prompt);
    let started = std::time::Instant::now();
    let (_, tokens) = kiln::sample::complete(
        &model,
        &tokenizer,
        vocab_map.as_ref(),
        &prompt,
        args.max_tokens,
        &params,
        true,
        |text| {
            print!("{text}");
            let _ = stdout.flush();
        },
    )?;
    println!();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{tokens} tokens in {seconds:.2} s ({:.1} tokens/s)",
        tokens as f64 / seconds
    );
    Ok(())
}

/// A packed artifact, reloaded alone with the tokenizer saved beside it.
fn load_artifact(path: &std::path::Path) -> Result<Loaded> {
    let unpacked = kiln::packed::read(path)?;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tokenizer = kiln::interop::find_tokenizer(&[dir])?.with_context(|| {
        format!(
            "no tokenizer.json or tokenizer.bin beside {}",
            path.display()
        )
    })?;
    if unpacked
        .tokenizer_sha256
        .as_deref()
        .is_some_and(|h| h != tokenizer.hash())
    {
        bail!(
            "the tokenizer beside {} is not the one it was made with",
            path.display()
        );
    }
    let model = Model::new(ReferenceBackend, unpacked.config)?;
    model.upload_params(&unpacked.weights);
    let vocab_map = unpacked
        .vocab_map
        .map(|full| VocabMap::from_full_ids(tokenizer.vocab_size(), full));
    eprintln!("loaded artifact {}", path.display());
    Ok(Loaded {
        model,
        tokenizer,
        vocab_map,
        manifest: None,
    })
}

fn eval(args: EvalArgs) -> Result<()> {
    let mut scored: Vec<(&str, Loaded)> = Vec::new();
    if let Some(path) = &args.artifact {
        scored.push(("artifact, reloaded alone", load_artifact(path)?));
    }
    if args.source.run.is_some() || args.source.model.is_some() {
        scored.push(("model", load(&args.source)?));
    }
    anyhow::ensure!(!scored.is_empty(), "give --run, --model or --artifact");
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None => PathBuf::from(
            scored
                .iter()
                .find_map(|(_, l)| {
                    l.manifest
                        .as_ref()
                        .and_then(|m| m.train["data"].as_str().map(String::from))
                })
                .context("the model does not name its data directory; pass --data")?,
        ),
    };
    let dataset = Dataset::open(&data_dir)?;
    let tokens = dataset.read_all(Split::Val)?;
    let mut results = Vec::new();
    for (what, loaded) in &scored {
        if dataset.manifest.tokenizer_sha256 != loaded.tokenizer.hash() {
            bail!(
                "{} was tokenized with another tokenizer than the {what}'s",
                data_dir.display()
            );
        }
        let seq = args.seq.min(loaded.model.config.max_seq_len);
        let acts = loaded.model.activations(args.batch, seq)?;
        let started = std::time::Instant::now();
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "scoring {bar:40} {pos}/{len} batches, eta {eta}",
            )
            .expect("valid template"),
        );
        let result = evaluate_sliding(
            &loaded.model,
            &acts,
            &tokens,
            &loaded.tokenizer,
            loaded.vocab_map.as_ref(),
            args.stride.unwrap_or(seq),
            args.batches,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        println!(
            "{what}: val loss {:.4} | bits/byte {:.4} | {} tokens, {} bytes | {:.1} s",
            result.loss,
            result.bits_per_byte,
            result.tokens,
            result.bytes,
            started.elapsed().as_secs_f64()
        );
        println!("{}", serde_json::json!({"what": what, "result": result}));
        results.push(result);
    }
    if let [artifact, model] = results.as_slice() {
        println!(
            "round-trip gap: {:+.4} bits/byte ({:+.4} nats/token) from quantization and packing",
            artifact.bits_per_byte - model.bits_per_byte,
            artifact.loss - model.loss
        );
    }
    Ok(())
}

/// Groups a number's digits in threes: 15191712 → "15,191,712".
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn model_info(spec: &str, json: bool) -> Result<()> {
    let config = ModelConfig::from_preset_or_file(spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    }
    let layout = ParamLayout::new(&config);
    println!("{:<48} {:>16} {:>14}", "tensor", "shape", "parameters");
    // Block 0 tensor by tensor, the other blocks summarised: 28 copies of the same lines help
    // nobody.
    for spec in &layout.specs {
        if spec.name.starts_with("model.layers.") && !spec.name.starts_with("model.layers.0.") {
            continue;
        }
        println!(
            "{:<48} {:>16} {:>14}",
            spec.name,
            format!("{:?}", spec.shape),
            grouped(spec.region.len)
        );
    }
    let per_block: usize = layout
        .specs
        .iter()
        .filter(|s| s.name.starts_with("model.layers.0."))
        .map(|s| s.region.len)
        .sum();
    let others = config.n_layers - 1;
    if others > 0 {
        println!(
            "{:<48} {:>16} {:>14}",
            format!("model.layers.1..{} (as layer 0)", config.n_layers - 1),
            format!("{others} × block"),
            grouped(per_block * others)
        );
    }
    let total = layout.total_len();
    println!();
    println!("parameters:                  {:>14}", grouped(total));
    println!(
        "  without the embedding:     {:>14}",
        grouped(total - layout.embedding.len)
    );
    println!(
        "  classifier:                {}",
        if config.tie_embeddings {
            "tied to the embedding (counted once)"
        } else {
            "separate lm_head"
        }
    );
    if !config.arch.is_llama() {
        println!(
            "  architecture options:      {}",
            serde_json::to_string(&config.arch)?
        );
    }
    println!(
        "training FLOPs per token at seq {}: {:.3e}",
        config.max_seq_len.min(256),
        config.train_flops_per_token(config.max_seq_len.min(256))
    );
    Ok(())
}
