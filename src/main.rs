//! The `kiln` command line: argument parsing and dispatch. The commands themselves live in
//! the library (`kiln::commands`, `kiln::train`, …); the backend is resolved once, by
//! `kiln::backends`, from `--backend` or `KILN_BACKEND`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use kiln::backends::{BackendChoice, Precision, Selection, Weights};
use kiln::commands::{EvalOptions, SampleOptions, Source};
use kiln::train::{print_report, MuonConfig, OptimizerKind, Schedule, TrainConfig, Trainer};
use kiln::with_backend;
use kiln_core::backend::Backend;
use kiln_core::quant::{PackRule, SchemeName};
use kiln_core::sample::SamplingParams;
use kiln_formats::data::TokenizerSpec;
use kiln_formats::interop::{ExportFormat, Quantize};
use kiln_formats::model_config::from_preset_or_file;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train small language models from scratch, fast, on the CPU"
)]
struct Cli {
    /// The backend that computes: auto (the fastest usable here), reference, cpu, cuda.
    /// `kiln doctor` says which are usable on this machine.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "KILN_BACKEND",
        default_value = "auto"
    )]
    backend: BackendChoice,
    /// The matmuls' precision: bf16 (f32 accumulation), f16 (f32 accumulation; the cuda
    /// backend, training with loss scaling) or f32 (the cpu backend). Default: bf16 on cuda
    /// and where the CPU has a native bf16 dot product, f32 elsewhere.
    #[arg(long, global = true, value_enum, env = "KILN_PRECISION")]
    precision: Option<Precision>,
    /// The weights' format for inference (sample, eval, bench decode): f32, bf16, int8
    /// (groups of 64 as llama2.c's runq.c; every product through int8 dot products), or
    /// packed (an --artifact's own codes); int8 and packed on the cpu backend. Default: packed
    /// for an --artifact on the cpu backend, else as --precision.
    #[arg(long, global = true, value_enum, env = "KILN_WEIGHTS")]
    weights: Option<Weights>,
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
    /// A multi-seed ablation: a base configuration and its variants (plan.json), each trained
    /// with several seeds, exported and scored after the round trip; a table of the results
    /// (Markdown and JSON) and the loss curves. Rerunning resumes the sweep.
    Ablate {
        /// The plan: {"data": DIR, "base": [train flags], "variants": [{"name", "flags"}],
        /// "seeds": 3, "scheme": "int8", "embedding_scheme": "int8"}.
        #[arg(long)]
        plan: PathBuf,
        /// The sweep's directory (a run per configuration and seed, and the table).
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text from a run or checkpoint.
    Sample(SampleArgs),
    /// Validation loss and bits per byte of a run or checkpoint.
    Eval(EvalArgs),
    /// Write a run, checkpoint or imported model as a Hugging Face directory or a llama2.c file.
    Export {
        /// hf: config.json + model.safetensors + tokenizer; llama2c: model.bin (the legacy
        /// format run.c reads, or with --quantize int8 the v2 file runq.c reads) +
        /// tokenizer.bin; gguf: model.gguf (what llama.cpp runs), llama2.c's tokenizer
        /// inside.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// A run directory, checkpoint directory, Hugging Face directory or llama2.c .bin.
        source: PathBuf,
        /// Output directory.
        out: PathBuf,
        /// packed: the scheme of the block matrices.
        #[arg(long, value_enum, default_value = "int8")]
        scheme: SchemeName,
        /// packed: the scheme of the embedding (and an untied classifier).
        #[arg(long, value_enum, default_value = "int8")]
        embedding_scheme: SchemeName,
        /// packed: tensors of at most this many values stay f16.
        #[arg(long, default_value_t = 65536)]
        small_max: usize,
        /// packed: fail if the artifact exceeds this size (bytes; or 16MB = 16,000,000).
        #[arg(long, value_parser = parse_bytes)]
        budget: Option<u64>,
        /// packed: choose each integer row's clip and each ternary group's scale by the least
        /// squared error against the unclipped weights (parameter-golf's GPTQ-lite clip
        /// search), instead of the scheme's own rule; the format is unchanged.
        #[arg(long)]
        clip_search: bool,
        /// packed: rotate each quantized matrix's rows by a block Hadamard matrix before
        /// quantizing, and back at load (outliers spread over the block; such matrices then
        /// run on their dequantized values, not their codes).
        #[arg(long)]
        hadamard: bool,
        /// packed: calibrate each quantized tensor's scales (kept, or × 0.7 … 2), then a
        /// ternary tensor's rounding threshold (0.35 … 0.7 of the scale),
        /// by the exported model's loss on the first 8,192 tokens of the training split,
        /// the tensors that cost the most first; the format is unchanged.
        #[arg(long)]
        calibrate: bool,
        /// packed, with --calibrate: the data directory whose training split calibrates
        /// (default: the run's own).
        #[arg(long)]
        calibration_data: Option<PathBuf>,
        /// llama2c: int8, matrices in groups of 64, the v2 file llama2.c's runq.c runs
        /// (default: f32, the legacy file run.c runs). gguf: bf16 or q8_0 matrices (default:
        /// f32).
        #[arg(long, value_enum)]
        quantize: Option<Quantize>,
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
    /// The machine as kiln sees it (CPU, ISA features, memory, GPU) and which backends can
    /// run here.
    Doctor,
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
    /// A sequence-length curriculum, START:STEPS: the first STEPS steps train on sequences
    /// of START, 2·START, … tokens (an equal share of the steps each, the same tokens per
    /// step in more, shorter sequences), then --seq. START is --seq halved one or more times.
    #[arg(long)]
    seq_warmup: Option<kiln::run_config::SeqWarmup>,
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
    optimizer: OptimizerKind,
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
    /// Stochastic depth: while training, skip layer l of L in each micro-batch with
    /// probability P·l/(L − 1) (the first never, the last with P); evaluation runs them all.
    #[arg(long, value_name = "P")]
    stochastic_depth: Option<f32>,
    /// Loss scaling, for f16 products: `dynamic` (from 2^16, halved on each overflow, doubled
    /// after 2000 clean steps), a fixed power of two (halved only on an overflow), or `off`.
    /// Default: dynamic with --precision f16, off otherwise.
    #[arg(long, value_name = "dynamic|N|off", value_parser = parse_loss_scale)]
    loss_scale: Option<LossScale>,
    /// Ternary noise: under --qat ternary, each training step quantizes the ternary tensors
    /// from the weights plus fresh Gaussian noise of this standard deviation (the ternary
    /// submission's TERNARY_NOISE_SCALE, 0.02 to 0.05 there); evaluation is noise-free.
    #[arg(long, value_name = "SIGMA")]
    ternary_noise: Option<f32>,
    /// MuonEq-R: Muon divides each row of its update by the row's L2 norm before
    /// Newton–Schulz (with --optimizer muon).
    #[arg(long)]
    muon_eq_r: bool,
    /// cosine (to --min-lr-ratio), or warmdown: constant, then linear to zero over the last
    /// --warmdown-steps (a time, from the measured step time, under --time).
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Schedule,
    #[arg(long, default_value_t = 1200)]
    warmdown_steps: u64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999);
    /// validation and exports use it.
    #[arg(long)]
    ema: Option<f32>,
    /// Quantization-aware training: compute with the block matrices quantized by this scheme
    /// (straight-through gradients), as `kiln export --format packed --scheme` will.
    #[arg(long, value_enum)]
    qat: Option<SchemeName>,
    /// With --qat: the embedding's scheme.
    #[arg(long, value_enum, default_value = "int8")]
    qat_embedding: SchemeName,
    /// With --qat: quantize the matrices in a block Hadamard rotation of their rows (and
    /// rotate back), as `kiln export --hadamard` stores them; export such a run with
    /// --hadamard.
    #[arg(long)]
    qat_hadamard: bool,
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
    /// Checkpoint every N steps, or every DURATION of training (90s, 5m, 1h); 0: only at the
    /// end. A checkpoint is always written at the end.
    #[arg(long, default_value = "100", value_parser = parse_cadence)]
    checkpoint_every: Cadence,
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
    /// Under `mpirun`: stop every process when a collective waits this long for the others
    /// (a process died or hangs). It must exceed rank 0's longest solo work (validation, a
    /// sample, a checkpoint): 90s, 5m.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    rank_timeout: f64,
    /// Train data-parallel on N GPUs of this machine: one process per GPU (the cuda backend),
    /// gradients all-reduced over NCCL, rank 0 writing the run.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
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
    /// Sequences decoded together from the prompt (each weight read serves all of them);
    /// sample i uses seed + i. Above 1 the samples are printed when all are done.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// A packed artifact instead (`kiln export --format packed`; on the cpu backend run
    /// from its own codes unless --weights says otherwise).
    #[arg(long)]
    artifact: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// A packed artifact (`kiln export --format packed`), reloaded alone (its tokenizer beside
    /// it; on the cpu backend scored from its own codes unless --weights says otherwise);
    /// with --run too, the gap to that unquantized model is reported.
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
    /// How bits per byte counts the text: utf8, its true bytes; or challenge, the
    /// parameter-golf challenge's SentencePiece table (each inner `▁` of a piece counted as
    /// its 3 UTF-8 bytes), for figures that compare with its leaderboard.
    #[arg(long, value_enum, default_value = "utf8")]
    bytes: kiln_formats::tokenizer::ByteRule,
    /// Evaluation-time n-gram cache, ORDER:WEIGHT (e.g. 3:0.1): each target's probability
    /// mixed with what the already-scored validation tokens say follows its last ORDER − 1
    /// tokens. A token joins the cache only after it is scored (the challenge's score-first
    /// rule); off by default.
    #[arg(long)]
    ngram_cache: Option<kiln_core::eval::NgramCache>,
    /// Evaluation-time temperature scaling: each batch of windows scored with the
    /// temperature fitted (by Newton's method) to the targets scored before it; off by
    /// default.
    #[arg(long)]
    temperature: bool,
    /// Score-first test-time training, LR:STEPS[:memory] (e.g. 1e-4:1): after each batch of
    /// windows is scored, that many AdamW steps on it at that rate, and the next batch is
    /// scored with the weights so trained; `:memory` trains the hashed n-gram memories alone
    /// (EngramHash, the bigram embedding: an evaluation-time engram); off by default.
    #[arg(long)]
    ttt: Option<kiln_core::eval::TestTimeTraining>,
    /// A model with Koopman capsule dynamics scored with this many Koopman passes instead of
    /// those it trained with (same weights; the submission scored with 2 after training with
    /// 1).
    #[arg(long)]
    capsule_passes: Option<usize>,
    /// Adaptive halting of a Koopman capsule model's passes: each position keeps the stream
    /// of the first pass whose capsules moved by less than this fraction of their norm (the
    /// submission's 0.05, with --capsule-passes 3 its maximum); evaluation only.
    #[arg(long, value_name = "FRACTION")]
    capsule_halt: Option<f64>,
    /// Capsule carry for a Koopman capsule model: the windows are split into one run per
    /// batch row, each run scored in order, and each window's first pass blends with the
    /// capsule state of its run's earlier windows averaged with this decay (the submission's
    /// 0.8); evaluation only.
    #[arg(long, value_name = "DECAY")]
    capsule_carry: Option<f64>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Each usable tier's arithmetic peak from a register-only probe (f32 FMA, bf16 dot),
    /// per core and on every thread.
    Peak {
        /// Threads for the all-threads figure (default: every CPU this process may use).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Whole training steps on random tokens: ms per step, tokens/s, TFLOP/s, MFU against the
    /// hardware peak of the precision in use, time per stage, peak RSS (release builds).
    Train {
        #[arg(long, default_value = "stories15m")]
        preset: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        accum: usize,
        /// Timed steps after one warm-up step (the median is reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Override the vocabulary size (default: the preset's, 32000 for stories*).
        #[arg(long)]
        vocab_size: Option<usize>,
        /// The peak (GFLOP/s) to report MFU against, instead of probing it now (e.g. a
        /// figure from `kiln bench peak` on a quiet machine).
        #[arg(long)]
        peak: Option<f64>,
        /// Also write the figures, with the machine, tier and commit, as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Decoding speed: a prompt, then greedy tokens one at a time through the KV cache;
    /// tokens/s, the weights each token reads, and their share of the memory read bandwidth
    /// measured in the same run (release builds).
    Decode {
        #[command(flatten)]
        source: ModelSource,
        /// A preset or config file with random weights, when no --run or --model is given.
        #[arg(long, default_value = "stories15m")]
        preset: String,
        /// Prompt tokens (prefilled in one batched pass).
        #[arg(long, default_value_t = 256)]
        prompt: usize,
        /// Tokens to decode after the prompt, per sequence.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Sequences decoded together (each weight read serves all of them).
        #[arg(long, default_value_t = 1)]
        num_samples: usize,
        /// A packed artifact instead (`kiln export --format packed`; on the cpu backend run
        /// from its own codes unless --weights says otherwise).
        #[arg(long)]
        artifact: Option<PathBuf>,
        /// Also write the figures, with the machine, backend and commit, as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
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
/// `--loss-scale`: off, or the scaler a run starts with.
#[derive(Clone, Copy, Debug)]
struct LossScale(Option<kiln_core::optim::LossScaler>);

fn parse_loss_scale(s: &str) -> Result<LossScale, String> {
    use kiln_core::optim::LossScaler;
    match s {
        "off" => Ok(LossScale(None)),
        "dynamic" => Ok(LossScale(Some(LossScaler::dynamic()))),
        n => {
            let scale: f32 = n
                .parse()
                .map_err(|_| format!("{n}: expected dynamic, off or a power of two"))?;
            if !(1.0..=LossScaler::MAX_SCALE).contains(&scale) || scale.log2().fract() != 0.0 {
                return Err(format!(
                    "{n}: a loss scale is a power of two from 1 to 2^24 (so scaling is exact)"
                ));
            }
            Ok(LossScale(Some(LossScaler::fixed(scale))))
        }
    }
}

/// A cadence: every N steps, or every so many seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cadence {
    Steps(u64),
    Seconds(f64),
}

/// `100` (steps) or a duration (`90s`, `5m`, `1h`).
fn parse_cadence(s: &str) -> Result<Cadence, String> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(Cadence::Steps(n));
    }
    match parse_duration(s) {
        Ok(t) if t > 0.0 => Ok(Cadence::Seconds(t)),
        Ok(_) => Err(format!("'{s}': a duration must be positive")),
        Err(_) => Err(format!(
            "'{s}' is neither a number of steps nor a duration like 90s, 5m or 1h"
        )),
    }
}

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

impl ModelSource {
    /// The source, with the weights' format the selection asks for.
    fn source(&self, selection: Selection) -> Source {
        Source {
            int8: selection.int8(),
            artifact: None,
            packed: selection.packed(),
            run: self.run.clone(),
            best: self.best,
            model: self.model.clone(),
            tokenizer: self.tokenizer.clone(),
        }
    }
}

/// Bytes the decoding kernels read for one quantized matrix the backend takes: ternary codes
/// in 2 bits, others in a byte, and an f32 scale per group as the backend takes them
/// (`kiln::commands::row_groups`: int, a row; ternary, 128 values or fewer).
fn code_bytes(q: &kiln_core::quant::Quantized) -> f64 {
    let n = q.codes.len() as f64;
    let code = match q.scheme {
        kiln_core::quant::Scheme::Ternary => 0.25,
        _ => 1.0,
    };
    let scales = kiln::commands::row_groups(q).map_or(0, |(_, scales)| scales.len());
    n * code + 4.0 * scales as f64
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let backend = Selection {
        backend: cli.backend,
        precision: cli.precision,
        weights: cli.weights,
    };
    match cli.command {
        Command::Data {
            command:
                DataCommand::Prepare {
                    input,
                    out,
                    tokenizer,
                    val_fraction,
                },
        } => {
            let manifest = kiln_formats::data::prepare(
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
        Command::Train(args) => {
            if backend.weights.is_some() {
                anyhow::bail!(
                    "--weights is for sample, eval and bench decode; training takes --precision"
                );
            }
            if let (Some(gpus), None) = (args.gpus, kiln::distributed::gpu_place()) {
                return launch_on_gpus(gpus, backend);
            }
            with_backend!(backend, |b| train(b, backend, *args))
        }
        Command::Ablate { plan, out } => {
            let plan = kiln::ablate::read_plan(&plan)?;
            with_backend!(backend, |b| ablate(b, backend, &plan, &out))
        }
        Command::Sample(args) => {
            let backend = backend.for_artifact(args.artifact.is_some());
            let options = SampleOptions {
                prompt: args.prompt.clone(),
                max_tokens: args.max_tokens,
                num_samples: args.num_samples,
                params: SamplingParams {
                    temperature: args.temperature,
                    top_k: args.top_k,
                    top_p: args.top_p,
                    seed: args.seed,
                },
            };
            let mut source = args.source.source(backend);
            source.artifact = args.artifact.clone();
            with_backend!(backend, |b| kiln::commands::sample(b, &source, &options))
        }
        Command::Eval(args) => {
            let backend = backend.for_artifact(args.artifact.is_some());
            let options = EvalOptions {
                artifact: args.artifact.clone(),
                source: args.source.source(backend),
                data: args.data.clone(),
                batch: args.batch,
                seq: args.seq,
                batches: args.batches,
                stride: args.stride,
                bytes: args.bytes,
                adapt: kiln_core::eval::EvalTime {
                    ngram_cache: args.ngram_cache,
                    temperature: args.temperature,
                    ttt: args.ttt,
                    capsule_passes: args.capsule_passes,
                    capsule_halt: args.capsule_halt,
                    capsule_carry: args.capsule_carry,
                },
            };
            with_backend!(backend, |b| kiln::commands::eval(b, &options))
        }
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
            let mut config = from_preset_or_file(&preset)?;
            if let Some(v) = vocab_size {
                config.vocab_size = v;
            }
            let peak = kiln::backends::hardware_peak(backend, 0.3)?;
            let figures = with_backend!(backend, |b| kiln::bench::kernels(
                &b,
                &config,
                (batch, seq),
                reps,
                peak
            ))?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&figures)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Decode {
                    source,
                    preset,
                    prompt,
                    tokens,
                    num_samples,
                    artifact,
                    json,
                },
        } => {
            let backend = backend.for_artifact(artifact.is_some());
            // Matrix weights are read as the backend holds them for products: an artifact's
            // codes (ternary in 2 bits, int6 and int8 in a byte, an f32 scale per group) where
            // the backend runs them, int8 codes and an f32 scale per group with `--weights
            // int8`, bf16 copies with the CPU backend's bf16 matmuls, f32 otherwise.
            let resolved = kiln::backends::resolve(backend)?;
            let width = match &resolved {
                kiln::backends::Resolved::Cpu(cpu)
                    if cpu.precision() == kiln_cpu::Precision::Bf16 =>
                {
                    2.0
                }
                _ => 4.0,
            };
            let int8 = move |cols| match kiln_core::quant::int8_group(&[cols]) {
                Some(group) => 1.0 + 4.0 / group as f64,
                None => width,
            };
            // Bytes per weight of each matrix run on its codes, by where it starts.
            let coded: std::collections::HashMap<usize, f64> = match &artifact {
                Some(path) if backend.packed() => kiln_formats::packed::read(path)?
                    .codes
                    .iter()
                    .filter(|(_, q)| kiln::commands::row_groups(q).is_some())
                    .map(|(region, q)| (region.offset, code_bytes(q) / q.codes.len() as f64))
                    .collect(),
                _ => Default::default(),
            };
            let bytes: &dyn Fn(usize, usize) -> f64 = match &resolved {
                kiln::backends::Resolved::Cpu(_) if backend.packed() => {
                    &|offset, _| coded.get(&offset).copied().unwrap_or(width)
                }
                kiln::backends::Resolved::Cpu(cpu) if cpu.int8_weights() => &|_, cols| int8(cols),
                _ => &|_, _| width,
            };
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let memory = kiln_cpu::probe::memory_read_gbs(threads, 512, 0.6);
            let mut source = source.source(backend);
            source.artifact = artifact.clone();
            let figures = with_backend!(backend, |b| {
                let model = if source.run.is_some()
                    || source.model.is_some()
                    || source.artifact.is_some()
                {
                    kiln::commands::load(b, &source)?.model
                } else {
                    let mut model =
                        kiln_core::model::Model::for_inference(b, from_preset_or_file(&preset)?)?;
                    model.init_random(1)?;
                    if source.int8 {
                        let mut weights = model.download_params()?;
                        kiln::commands::round_to_int8(&model.config, &mut weights);
                        model.upload_params(&weights)?;
                    }
                    model
                };
                kiln::bench::decode(&model, (prompt, tokens, num_samples), bytes, memory)
            })?;
            write_json(json, &figures)
        }
        Command::Bench {
            command: BenchCommand::Peak { threads, json },
        } => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let figures = kiln::bench::peak(threads);
            write_json(json, &(kiln::machine::describe(), figures))
        }
        Command::Bench {
            command:
                BenchCommand::Train {
                    preset,
                    batch,
                    seq,
                    accum,
                    steps,
                    vocab_size,
                    peak,
                    json,
                },
        } => {
            let mut config = from_preset_or_file(&preset)?;
            if let Some(v) = vocab_size {
                config.vocab_size = v;
            }
            // A peak given on the command line is not probed again (the probe spins every core).
            let (peak, probe) = match peak {
                Some(given) => {
                    let label = kiln::backends::peak_label(&kiln::backends::resolve(backend)?);
                    (given, format!("{label}, given"))
                }
                None => {
                    let (probed, probe) = kiln::backends::hardware_peak(backend, 0.3)?;
                    (probed, probe.to_string())
                }
            };
            println!("peak of the precision in use: {peak:.1} GFLOP/s ({probe}, all threads)");
            let peak = (peak, probe);
            let figures = with_backend!(backend, |b| {
                kiln::bench::train(b, &config, batch, seq, accum, steps, peak.clone())
            })?;
            write_json(json, &figures)
        }
        Command::Dashboard {
            run,
            sample_tokens,
            exit_when_finished,
        } => kiln::dashboard::run(
            &run,
            kiln::dashboard::Options {
                backend,
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
            format,
            source,
            out,
            scheme,
            embedding_scheme,
            small_max,
            budget,
            clip_search,
            hadamard,
            calibrate,
            calibration_data,
            quantize,
        } => {
            let rule = PackRule {
                matrices: scheme.scheme(),
                embedding: embedding_scheme.scheme(),
                small_max,
                hadamard: false,
            };
            let options = kiln_formats::packed::PackOptions {
                clip_search,
                hadamard,
                calibrate,
            };
            let calibration = (backend, calibration_data);
            export(
                format,
                quantize,
                &source,
                &out,
                (rule, options, budget),
                calibration,
            )
        }
        Command::Model {
            command: ModelCommand::Info { model, json },
        } => kiln::commands::model_info(&from_preset_or_file(&model)?, json),
        Command::Model {
            command: ModelCommand::Logits { model, tokens },
        } => {
            let logits = with_backend!(backend, |b| kiln::commands::logits(b, &model, &tokens))?;
            println!("{}", serde_json::to_string(&logits)?);
            Ok(())
        }
        Command::Doctor => {
            kiln::doctor::run();
            Ok(())
        }
    }
}

/// The run's configuration from the command line (`choice`: the backend selection, whose
/// precision decides whether the loss is scaled by default).
fn train_config(args: &TrainArgs, choice: Selection) -> Result<TrainConfig> {
    let data = args.data.clone().context("--data is required")?;
    let model = match &args.init_from {
        Some(path) => kiln::rundir::import(path, None)?.config,
        None => from_preset_or_file(&args.model)?,
    };
    let mut config = TrainConfig::new(model, data);
    config.init_from = args.init_from.clone();
    config.vocab_size_override = args.vocab_size;
    config.tensorboard = args.tensorboard;
    config.batch = args.batch;
    config.seq = args.seq;
    config.accumulation = args.accum;
    config.seq_warmup = args.seq_warmup;
    config.stochastic_depth = args.stochastic_depth;
    config.ternary_noise = args.ternary_noise;
    config.loss_scale = match args.loss_scale {
        Some(given) => given.0,
        None if choice.precision == Some(Precision::F16) => {
            Some(kiln_core::optim::LossScaler::dynamic())
        }
        None => None,
    };
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
    (config.checkpoint_every, config.checkpoint_seconds) = match args.checkpoint_every {
        Cadence::Steps(n) => (n, 0.0),
        Cadence::Seconds(t) => (0, t),
    };
    config.keep_last = args.keep_last;
    config.sample_every = args.sample_every;
    config.sample_tokens = args.sample_tokens;
    config.sample_prompt = args.sample_prompt.clone();
    config.compact_vocab = args.compact_vocab;
    config.optimizer = args.optimizer;
    config.muon = MuonConfig {
        matrix_lr: args.matrix_lr,
        embed_lr: args.embed_lr,
        head_lr: args.head_lr,
        scalar_lr: args.scalar_lr,
        momentum_warmup_steps: args.momentum_warmup,
        row_normalize: args.muon_eq_r,
        ..MuonConfig::default()
    };
    if args.muon_eq_r && args.optimizer != OptimizerKind::Muon {
        anyhow::bail!("--muon-eq-r changes Muon's update: it needs --optimizer muon");
    }
    config.schedule = args.schedule;
    config.warmdown_steps = args.warmdown_steps;
    config.ema_decay = args.ema;
    config.qat = args.qat.map(|scheme| PackRule {
        matrices: scheme.scheme(),
        embedding: args.qat_embedding.scheme(),
        small_max: 65536,
        hadamard: args.qat_hadamard,
    });
    if args.qat_hadamard && args.qat.is_none() {
        anyhow::bail!(
            "--qat-hadamard rotates what quantization-aware training quantizes: it needs --qat"
        );
    }
    Ok(config)
}

fn train<B: Backend + 'static>(backend: B, choice: Selection, args: TrainArgs) -> Result<()> {
    let timeout = std::time::Duration::from_secs_f64(args.rank_timeout);
    if let Some(place) = kiln::distributed::gpu_place() {
        let communicator = nccl_communicator(&backend, &place, timeout)?;
        return train_together(backend, choice, &args, communicator);
    }
    if let Some(team) = kiln::distributed::join(timeout)? {
        return match train_together(backend, choice, &args, team.communicator::<B>()) {
            Ok(()) => Ok(()),
            Err(error) => {
                // The other processes may be waiting in a collective: stop them all.
                eprintln!(
                    "kiln process {} of {}: error: {error:#}",
                    team.rank(),
                    team.size()
                );
                team.abort(1)
            }
        };
    }
    let mut trainer = match &args.resume {
        Some(run) => Trainer::resume(backend, run, args.steps)?,
        None => {
            let out = args.out.as_deref().context("--out is required")?;
            Trainer::create(backend, train_config(&args, choice)?, out)?
        }
    };
    trainer.print_every = args.print_every;
    // Ctrl-C or SIGTERM: a checkpoint at the next step boundary, then a clean stop; a second
    // one exits at once.
    trainer.interrupt = Some(kiln::interrupt::install()?);
    // MFU against the hardware's peak for the precision in use (a register-only probe, ~0.5 s).
    trainer.peak_gflops = kiln::backends::hardware_peak(choice, 0.15)
        .ok()
        .map(|p| p.0);
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
            backend: choice,
            sample_tokens: 48,
            exit_when_finished: false,
        },
    )?;
    if !training.is_finished() {
        eprintln!("dashboard closed; training goes on in {} (Ctrl-C saves a checkpoint and stops it; `kiln dashboard {0}` reopens the view)", run_dir.display());
    }
    let (trainer, result) = training
        .join()
        .map_err(|_| anyhow::anyhow!("the training thread panicked"))?;
    print_report(&result?);
    eprintln!("run directory: {}", trainer.run_dir.display());
    Ok(())
}

/// `kiln train --gpus N`, as the launcher: checks the GPUs are there, then starts this command
/// once per GPU (without `--gpus`) and waits for the processes.
fn launch_on_gpus(gpus: usize, choice: Selection) -> Result<()> {
    anyhow::ensure!(
        matches!(choice.backend, BackendChoice::Auto | BackendChoice::Cuda),
        "--gpus trains on the cuda backend, not '{}'",
        choice.backend.name()
    );
    #[cfg(feature = "cuda")]
    {
        let have = kiln_cuda::CudaBackend::device_count().map_err(|why| {
            anyhow::anyhow!("--gpus {gpus}: the cuda backend is not usable: {why}")
        })?;
        anyhow::ensure!(
            have >= gpus,
            "--gpus {gpus}: this machine has {have} GPU(s)"
        );
        kiln_cuda::nccl::version().map_err(|why| anyhow::anyhow!("--gpus {gpus}: {why}"))?;
    }
    if cfg!(not(feature = "cuda")) {
        anyhow::bail!("--gpus {gpus}: this kiln was compiled without the cuda feature");
    }
    // This command again, without `--gpus N` / `--gpus=N`.
    let mut args = Vec::new();
    let mut skip = false;
    for arg in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        match arg.to_str() {
            Some("--gpus") => skip = true,
            Some(a) if a.starts_with("--gpus=") => {}
            _ => args.push(arg),
        }
    }
    let program = std::env::current_exe()?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    kiln::distributed::launch_gpus(gpus, &program, &args, visible.as_deref())
}

/// The NCCL communicator of a process `kiln train --gpus N` started (the backend must be the
/// cuda one: the communicator's buffers are its device memory).
fn nccl_communicator<B: Backend + 'static>(
    backend: &B,
    place: &kiln::distributed::GpuPlace,
    timeout: std::time::Duration,
) -> Result<Box<dyn kiln_core::backend::Communicator<B> + Send>> {
    #[cfg(feature = "cuda")]
    {
        use kiln_core::backend::Communicator;
        use std::any::Any;
        let Some(cuda) = (backend as &dyn Any).downcast_ref::<kiln_cuda::CudaBackend>() else {
            anyhow::bail!(
                "--gpus trains on the cuda backend; this process resolved {}",
                backend.name()
            );
        };
        let nccl =
            kiln_cuda::nccl::Nccl::join(cuda, place.rank, place.size, &place.id_file, timeout)
                .map_err(anyhow::Error::msg)?;
        let communicator: Box<dyn Communicator<kiln_cuda::CudaBackend> + Send> = Box::new(nccl);
        // `B` is the cuda backend (checked above), so this is the same type.
        let any: Box<dyn Any> = Box::new(communicator);
        Ok(*any
            .downcast::<Box<dyn Communicator<B> + Send>>()
            .map_err(|_| anyhow::anyhow!("the NCCL communicator is the cuda backend's"))?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (backend, place, timeout);
        anyhow::bail!("--gpus: this kiln was compiled without the cuda feature")
    }
}

/// `kiln train` as one of several processes (started by `mpirun`, or by `kiln train --gpus`):
/// each trains on its own batches, the gradients are summed across them every step through
/// `communicator`, rank 0 writes the run.
fn train_together<B: Backend + 'static>(
    backend: B,
    choice: Selection,
    args: &TrainArgs,
    communicator: Box<dyn kiln_core::backend::Communicator<B> + Send>,
) -> Result<()> {
    anyhow::ensure!(
        !args.dashboard,
        "--dashboard is for a run of one process; watch a run of several with \
         `kiln dashboard RUN` in another terminal"
    );
    let rank = communicator.rank();
    let mut trainer = match &args.resume {
        Some(run) => Trainer::resume_in(backend, run, args.steps, communicator)?,
        None => {
            let out = args.out.as_deref().context("--out is required")?;
            Trainer::create_in(backend, train_config(args, choice)?, out, communicator)?
        }
    };
    if rank == 0 {
        trainer.print_every = args.print_every;
    }
    trainer.interrupt = Some(kiln::interrupt::install()?);
    trainer.peak_gflops = kiln::backends::hardware_peak(choice, 0.15)
        .ok()
        .map(|p| p.0);
    let report = trainer.run()?;
    if rank == 0 {
        print_report(&report);
        eprintln!("run directory: {}", trainer.run_dir.display());
    }
    Ok(())
}

/// `kiln train`'s flags alone, as `kiln ablate` passes them for each run: a variant's flag
/// after the base's same flag overrides it.
#[derive(Parser)]
#[command(name = "kiln train", args_override_self = true)]
struct TrainOnly {
    #[command(flatten)]
    args: TrainArgs,
}

/// `kiln ablate`: every run of the plan trained on `backend` (Ctrl-C stops the sweep at a run's
/// step boundary; the same command resumes it).
fn ablate<B: Backend + Clone + 'static>(
    backend: B,
    choice: Selection,
    plan: &kiln::ablate::Plan,
    out: &std::path::Path,
) -> Result<()> {
    let interrupt = kiln::interrupt::install()?;
    let peak = kiln::backends::hardware_peak(choice, 0.15)
        .ok()
        .map(|p| p.0);
    let train = |flags: &[String]| -> Result<Option<kiln::telemetry::RunReport>> {
        let argv = std::iter::once("kiln train".to_string()).chain(flags.iter().cloned());
        let args = TrainOnly::try_parse_from(argv)
            .map_err(|e| anyhow::anyhow!("the plan's flags {flags:?}: {e}"))?
            .args;
        let out = args.out.as_deref().context("--out is required")?;
        let mut trainer = Trainer::create(backend.clone(), train_config(&args, choice)?, out)?;
        trainer.print_every = args.print_every;
        trainer.peak_gflops = peak;
        trainer.interrupt = Some(interrupt.clone());
        let report = trainer.run()?;
        let stopped = interrupt.load(std::sync::atomic::Ordering::Relaxed);
        Ok((!stopped).then_some(report))
    };
    kiln::ablate::run(&backend, plan, out, &train)?;
    Ok(())
}

/// `kiln export`: a Hugging Face directory, a llama2.c file, or a packed artifact by `rule`
/// (refused and removed when over `budget` bytes).
fn export(
    format: ExportFormat,
    quantize: Option<Quantize>,
    source: &std::path::Path,
    out: &std::path::Path,
    (rule, options, budget): (PackRule, kiln_formats::packed::PackOptions, Option<u64>),
    (backend, calibration_data): (Selection, Option<PathBuf>),
) -> Result<()> {
    let imported = kiln::rundir::import(source, None)?;
    anyhow::ensure!(
        !options.calibrate || format == ExportFormat::Packed,
        "--calibrate calibrates a packed artifact's scales: use --format packed"
    );
    if format != ExportFormat::Packed {
        let written = kiln_formats::interop::export_quantized(&imported, format, quantize, out)?;
        println!("wrote {}", written.display());
        return Ok(());
    }
    if let Some(trained) = kiln::rundir::qat_rule(source) {
        let rotated = rule.hadamard || options.hadamard;
        if (trained.matrices, trained.embedding, trained.hadamard)
            != (rule.matrices, rule.embedding, rotated)
        {
            eprintln!(
                "warning: {} trained through {} matrices and {} embeddings{}; this export \
                 quantizes with {} and {}{}: its weights will not be the ones training \
                 computed with, so the round trip loses bits per byte (give the same \
                 --scheme, --embedding-scheme{})",
                source.display(),
                trained.matrices,
                trained.embedding,
                if trained.hadamard {
                    ", Hadamard-rotated"
                } else {
                    ""
                },
                rule.matrices,
                rule.embedding,
                if rotated { ", Hadamard-rotated" } else { "" },
                if trained.hadamard {
                    " and --hadamard"
                } else {
                    " and no --hadamard"
                },
            );
        }
    }
    let calibration = if options.calibrate {
        let data = calibration_data
            .or_else(|| kiln::rundir::train_data(source))
            .context("--calibrate needs training text: give --calibration-data DIR")?;
        let settings = (rule, options);
        let c = with_backend!(backend, |b| kiln::calibrate::calibrate_export(
            b, &imported, settings, &data
        ))?;
        c.choices
    } else {
        Vec::new()
    };
    let settings = (rule, options);
    let (path, report) =
        kiln_formats::interop::export_packed_calibrated(&imported, out, settings, &calibration)?;
    kiln_formats::packed::print_table(&report);
    println!("wrote {}", path.display());
    if let Some(limit) = budget {
        let spare = kiln_formats::packed::check_budget(&path, &report, limit)?;
        println!("within the budget of {limit} bytes ({spare} to spare)");
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path`, if given.
fn write_json(path: Option<PathBuf>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_cadence_is_steps_or_a_duration() {
        assert_eq!(parse_cadence("100"), Ok(Cadence::Steps(100)));
        assert_eq!(parse_cadence("0"), Ok(Cadence::Steps(0)));
        assert_eq!(parse_cadence("90s"), Ok(Cadence::Seconds(90.0)));
        assert_eq!(parse_cadence("5m"), Ok(Cadence::Seconds(300.0)));
        assert_eq!(parse_cadence("1.5h"), Ok(Cadence::Seconds(5400.0)));
        for bad in ["0s", "-3", "5 parsecs", "often"] {
            assert!(parse_cadence(bad).is_err(), "{bad} must be refused");
        }
    }
}
