//! Every parser fuzzed on stable Rust: valid files (fixtures, and files kiln writes in a tiny
//! run made here) mutated at random — bit flips, truncations, extended lengths, huge counts
//! written into headers, random bytes, and for JSON numbers swapped for zero, negative or huge
//! ones and broken structure — and read back through the same entry points the commands use.
//! Every input must end in `Ok` or an error: a panic fails the test (each is listed with its
//! parser, mutation and message), and so does any single allocation over [`CAP`] (the
//! allocator below refuses it, naming the input, and the process aborts): a parser must check
//! a size against the file before allocating for it.
//!
//! `cargo test` runs [`DEFAULT_INPUTS`] inputs per parser; `scripts/fuzz.sh N` runs N per
//! parser (`KILN_FUZZ_INPUTS`, with `KILN_FUZZ_SEED` for another stream) in a release build.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use kiln::train::{TrainConfig, Trainer};
use kiln_core::config::ModelConfig;
use kiln_core::model::Model;
use kiln_formats::data::{self, Dataset, Split};
use kiln_formats::tokenizer::Tokenizer;
use kiln_reference::ReferenceBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inputs per parser in `cargo test`.
const DEFAULT_INPUTS: usize = 300;

/// The largest single allocation a parser may make. Every seed is under 200 KB and a mutation
/// at most doubles a file plus 4 KB, so a larger request can only come from a count or size
/// read from the file and trusted.
const CAP: usize = 256 << 20;

/// Bytes allocated now and at the peak, and the input being parsed (for the refusal's message).
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INPUT: AtomicUsize = AtomicUsize::new(0);
static PARSER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, counting, with a cap on any one allocation.
struct Capped;

#[global_allocator]
static ALLOCATOR: Capped = Capped;

impl Capped {
    fn admit(&self, size: usize) -> bool {
        if size <= CAP {
            return true;
        }
        // No allocation here: the message is put together in a stack buffer.
        let mut buffer = [0u8; 160];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            let n = bytes.len().min(buffer.len() - at);
            buffer[at..at + n].copy_from_slice(&bytes[..n]);
            at += n;
        };
        put(b"fuzz: an allocation of ");
        put(digits(size, &mut [0; 20]));
        put(b" bytes, over the cap, by parser ");
        put(digits(PARSER.load(Ordering::Relaxed), &mut [0; 20]));
        put(b" on input ");
        put(digits(INPUT.load(Ordering::Relaxed), &mut [0; 20]));
        put(b"\n");
        // SAFETY: writing a valid buffer to standard error.
        unsafe { libc::write(2, buffer.as_ptr().cast(), at) };
        false
    }

    fn count(&self, added: usize) {
        let now = LIVE.fetch_add(added, Ordering::Relaxed) + added;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

/// `n` in decimal, in `out`.
fn digits(mut n: usize, out: &mut [u8; 20]) -> &[u8] {
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[at..];
        }
    }
}

// SAFETY: every call is passed to the system allocator unchanged, or refused with null.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            self.count(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            self.count(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.admit(new_size) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            self.count(new_size);
        }
        p
    }
}

/// A parser's entry point: reads the directory it is given.
type Parse = Box<dyn Fn(&Path) -> Result<()>>;

/// A parser and the valid files it starts from.
struct Parser {
    name: &'static str,
    /// The directory the parser reads, holding the seed files.
    dir: PathBuf,
    /// The files that are mutated, one per input (relative to `dir`).
    files: Vec<&'static str>,
    parse: Parse,
}

/// What a mutation did, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Mutation {
    BitFlips,
    Truncation,
    Extension,
    HugeCount,
    RandomBytes,
    JsonNumber,
    JsonStructure,
}

/// Values written over a header word: zero, one, the signed and unsigned extremes, and sizes
/// no file here holds.
const HUGE: [u64; 9] = [
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    0xffff_fffe,
];

/// Numbers swapped into JSON.
const NUMBERS: [&str; 10] = [
    "0",
    "-1",
    "1",
    "4294967297",
    "18446744073709551617",
    "1e300",
    "99999999999",
    "0.5",
    "-0",
    "65536",
];

/// Text spliced into JSON.
const STRUCTURE: [&str; 8] = ["null", "[]", "{}", "\"x\"", "[1,", "}", "\u{fffd}", "true"];

fn mutate(seed: &[u8], json: bool, rng: &mut ChaCha8Rng) -> (Vec<u8>, Mutation) {
    let kinds: &[Mutation] = if json {
        &[
            Mutation::BitFlips,
            Mutation::Truncation,
            Mutation::Extension,
            Mutation::JsonNumber,
            Mutation::JsonNumber,
            Mutation::JsonStructure,
            Mutation::RandomBytes,
        ]
    } else {
        &[
            Mutation::BitFlips,
            Mutation::Truncation,
            Mutation::Extension,
            Mutation::HugeCount,
            Mutation::HugeCount,
            Mutation::RandomBytes,
        ]
    };
    let kind = kinds[rng.random_range(0..kinds.len())];
    let mut out = seed.to_vec();
    // Headers sit at the start: half the positions are drawn from the first 512 bytes.
    let position = |rng: &mut ChaCha8Rng, len: usize| {
        if len == 0 {
            0
        } else if rng.random_bool(0.5) {
            rng.random_range(0..len.min(512))
        } else {
            rng.random_range(0..len)
        }
    };
    match kind {
        Mutation::BitFlips => {
            for _ in 0..rng.random_range(1..=8) {
                if !out.is_empty() {
                    let at = position(rng, out.len());
                    out[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        Mutation::Truncation => out.truncate(rng.random_range(0..seed.len().max(1))),
        Mutation::Extension => {
            if rng.random_bool(0.5) && !seed.is_empty() {
                let from = rng.random_range(0..seed.len());
                let to = rng.random_range(from..=seed.len().min(from + 4096));
                out.extend_from_slice(&seed[from..to]);
            } else {
                out.extend((0..rng.random_range(1..4096)).map(|_| rng.random::<u8>()));
            }
        }
        Mutation::HugeCount => {
            let value = HUGE[rng.random_range(0..HUGE.len())];
            let width = if rng.random_bool(0.5) { 4 } else { 8 };
            let at = position(rng, out.len()) & !3;
            let bytes = value.to_le_bytes();
            for (i, b) in bytes[..width].iter().enumerate() {
                if let Some(o) = out.get_mut(at + i) {
                    *o = *b;
                }
            }
        }
        Mutation::RandomBytes => {
            // The seed's first bytes kept half the time, so the format is still recognised.
            let keep = if rng.random_bool(0.5) {
                8.min(seed.len())
            } else {
                0
            };
            out.truncate(keep);
            let len = rng.random_range(0..=seed.len().max(64));
            out.extend((keep..len).map(|_| rng.random::<u8>()));
        }
        Mutation::JsonNumber => {
            let text = String::from_utf8_lossy(seed).into_owned();
            let runs: Vec<(usize, usize)> = number_runs(&text);
            if let Some(&(from, to)) = runs.get(rng.random_range(0..runs.len().max(1))) {
                let number = NUMBERS[rng.random_range(0..NUMBERS.len())];
                out = [&text[..from], number, &text[to..]].concat().into_bytes();
            }
        }
        Mutation::JsonStructure => {
            let text = String::from_utf8_lossy(seed).into_owned();
            let at = text
                .char_indices()
                .map(|(i, _)| i)
                .nth(rng.random_range(0..text.chars().count().max(1)))
                .unwrap_or(0);
            let end = text[at..]
                .char_indices()
                .map(|(i, _)| at + i)
                .nth(rng.random_range(0..16))
                .unwrap_or(text.len());
            let splice = STRUCTURE[rng.random_range(0..STRUCTURE.len())];
            out = [&text[..at], splice, &text[end..]].concat().into_bytes();
        }
    }
    (out, kind)
}

/// The byte ranges of the numbers in a JSON text.
fn number_runs(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit()
            || (bytes[i] == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || b".eE+-".contains(&bytes[i])) {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A tokenizer read, and a text with a non-ASCII character through it and back.
fn tokenizer_round_trip(path: &Path) -> Result<()> {
    let tokenizer = Tokenizer::load(path)?;
    let ids = tokenizer.encode("the king ü sings 🎶")?;
    let _ = tokenizer.decode(&ids);
    Ok(())
}

/// Every parser, with its seeds in `root`.
fn parsers(root: &Path) -> Vec<Parser> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let mut parsers = Vec::new();

    // A prepared corpus (shards, data.json, its BPE tokenizer.json) and a tiny run on it with a
    // checkpoint each step: the files kiln itself writes.
    let corpus = root.join("corpus");
    let words = [
        "the", "king", "speaks", "to", "a", "fool", "in", "winter", "and", "sings",
    ];
    let data_dir = common::word_corpus(&corpus, &words, 9, 800);
    let mut config = TrainConfig::new(ModelConfig::preset("tiny-golf").unwrap(), data_dir.clone());
    (config.batch, config.seq, config.max_steps) = (2, 8, Some(2));
    (
        config.eval_every,
        config.eval_batches,
        config.checkpoint_every,
    ) = (1, 1, 1);
    let run = root.join("run");
    let mut trainer = Trainer::create(ReferenceBackend, config.clone(), &run).unwrap();
    trainer.print_every = 0;
    trainer.run().unwrap();
    let checkpoint = kiln_formats::checkpoint::list(&run.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap()
        .1;

    let dataset = Dataset::open(&data_dir).unwrap();
    let shard = dataset.shard_paths(Split::Train)[0].clone();
    let vocab = dataset.manifest.vocab_size;
    let shard_dir = root.join("shard");
    fs::create_dir_all(&shard_dir).unwrap();
    fs::copy(&shard, shard_dir.join("shard.bin")).unwrap();
    parsers.push(Parser {
        name: "token shard",
        dir: shard_dir,
        files: vec!["shard.bin"],
        parse: Box::new(move |dir| data::read_shard(&dir.join("shard.bin"), vocab).map(drop)),
    });

    let data_copy = root.join("data");
    copy_dir(&data_dir, &data_copy);
    let shard_name = shard.file_name().unwrap().to_str().unwrap().to_string();
    parsers.push(Parser {
        name: "prepared corpus",
        dir: data_copy,
        files: vec!["data.json", Box::leak(shard_name.into_boxed_str())],
        parse: Box::new(|dir| {
            let dataset = Dataset::open(dir)?;
            dataset.read_all(Split::Val)?;
            let shards = dataset.shard_paths(Split::Train);
            let mut loader = data::Loader::new(shards, dataset.manifest.vocab_size, 2, 8)?;
            loader.next_batch().map(drop)
        }),
    });

    let tokenizer_json = root.join("tokenizer-json");
    fs::create_dir_all(&tokenizer_json).unwrap();
    fs::copy(
        data_dir.join("tokenizer.json"),
        tokenizer_json.join("tokenizer.json"),
    )
    .unwrap();
    parsers.push(Parser {
        name: "tokenizer.json",
        dir: tokenizer_json,
        files: vec!["tokenizer.json"],
        parse: Box::new(|dir| tokenizer_round_trip(&dir.join("tokenizer.json"))),
    });

    let tokenizer_bin = root.join("tokenizer-bin");
    fs::create_dir_all(&tokenizer_bin).unwrap();
    fs::write(
        tokenizer_bin.join("tokenizer.bin"),
        common::small_tokenizer_bin(),
    )
    .unwrap();
    parsers.push(Parser {
        name: "tokenizer.bin",
        dir: tokenizer_bin,
        files: vec!["tokenizer.bin"],
        parse: Box::new(|dir| tokenizer_round_trip(&dir.join("tokenizer.bin"))),
    });

    let model_config = root.join("model-config");
    fs::create_dir_all(&model_config).unwrap();
    let json = serde_json::to_string_pretty(&ModelConfig::preset("tiny-golf").unwrap()).unwrap();
    fs::write(model_config.join("config.json"), json).unwrap();
    parsers.push(Parser {
        name: "model config",
        dir: model_config,
        files: vec!["config.json"],
        parse: Box::new(|dir| {
            let config = kiln_formats::model_config::from_file(&dir.join("config.json"))?;
            kiln_core::layout::ParamLayout::new(&config);
            Ok(())
        }),
    });

    for fixture in ["llama", "qwen3"] {
        let dir = root.join(format!("hf-{fixture}"));
        copy_dir(&fixtures.join(fixture), &dir);
        parsers.push(Parser {
            name: if fixture == "llama" {
                "Hugging Face (Llama)"
            } else {
                "Hugging Face (Qwen3)"
            },
            dir,
            files: vec!["config.json", "model.safetensors", "tokenizer.json"],
            parse: Box::new(|dir| kiln_formats::interop::import(dir, None, &[]).map(drop)),
        });
    }

    for (name, file) in [
        ("llama2.c legacy", "model_legacy.bin"),
        ("llama2.c v1", "model_v1.bin"),
        ("llama2.c v2 (int8)", "model_v2.bin"),
        ("GGUF f32", "model_f32.gguf"),
        ("GGUF Q8_0", "model_q8_0.gguf"),
    ] {
        let dir = root.join(file.replace('.', "-"));
        fs::create_dir_all(&dir).unwrap();
        fs::copy(fixtures.join("llama2c").join(file), dir.join(file)).unwrap();
        parsers.push(Parser {
            name,
            dir,
            files: vec![file],
            parse: Box::new(move |dir| {
                kiln_formats::interop::import(&dir.join(file), None, &[]).map(drop)
            }),
        });
    }

    let checkpoint_copy = root.join("checkpoint");
    copy_dir(&checkpoint, &checkpoint_copy);
    let golf = kiln_formats::checkpoint::read_manifest(&checkpoint)
        .unwrap()
        .model;
    parsers.push(Parser {
        name: "checkpoint",
        dir: checkpoint_copy,
        files: vec![
            "manifest.json",
            "model.safetensors",
            "optimizer.safetensors",
        ],
        parse: Box::new(move |dir| {
            kiln_formats::interop::import(dir, None, &[])?;
            let mut model = Model::new(ReferenceBackend, golf.clone())?;
            kiln_formats::checkpoint::load_into(&mut model, dir, None, true).map(drop)
        }),
    });

    let artifact = root.join("artifact");
    let imported = kiln::rundir::import(&run, None).unwrap();
    let rule = kiln_formats::packed::PackRule {
        matrices: kiln_core::quant::Scheme::Ternary,
        embedding: kiln_core::quant::Scheme::Int {
            bits: 8,
            percentile: 99.99,
        },
        small_max: 64,
        hadamard: false,
    };
    kiln_formats::interop::export_packed(&imported, &artifact, rule, Default::default()).unwrap();
    parsers.push(Parser {
        name: "packed artifact",
        dir: artifact,
        files: vec!["model.kiln"],
        parse: Box::new(|dir| kiln_formats::packed::read(&dir.join("model.kiln")).map(drop)),
    });

    let telemetry = root.join("telemetry");
    fs::create_dir_all(&telemetry).unwrap();
    fs::copy(
        run.join("telemetry.jsonl"),
        telemetry.join("telemetry.jsonl"),
    )
    .unwrap();
    parsers.push(Parser {
        name: "telemetry",
        dir: telemetry,
        files: vec!["telemetry.jsonl"],
        parse: Box::new(|dir| kiln::runlog::RunLog::load(dir).map(drop)),
    });
    parsers
}

#[test]
fn no_input_makes_a_parser_panic_or_allocate_without_bound() {
    let inputs: usize = std::env::var("KILN_FUZZ_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_INPUTS);
    let stream: u64 = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let root = common::temp_dir("fuzz", "seeds");
    let parsers = parsers(&root);
    for parser in &parsers {
        // The seeds themselves must parse.
        (parser.parse)(&parser.dir)
            .unwrap_or_else(|e| panic!("{}: the seed fails: {e:#}", parser.name));
    }
    // Panics are caught and listed; the hook keeps their message instead of printing it.
    static LAST_PANIC: Mutex<String> = Mutex::new(String::new());
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
    let mut panics = Vec::new();
    println!(
        "{inputs} inputs per parser, stream {stream}, allocation cap {CAP} bytes, seeds and \
         the input being read in {}",
        root.display()
    );
    for (p, parser) in parsers.iter().enumerate() {
        PARSER.store(p, Ordering::Relaxed);
        let seeds: Vec<Vec<u8>> = parser
            .files
            .iter()
            .map(|f| fs::read(parser.dir.join(f)).unwrap())
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(stream.wrapping_mul(1000) + p as u64);
        let (mut errors, started) = (0, std::time::Instant::now());
        for input in 0..inputs {
            INPUT.store(input, Ordering::Relaxed);
            let f = rng.random_range(0..parser.files.len());
            let name = parser.files[f];
            let json = name.ends_with(".json") || name.ends_with(".jsonl");
            let (bytes, mutation) = mutate(&seeds[f], json, &mut rng);
            let path = parser.dir.join(name);
            fs::write(&path, &bytes).unwrap();
            match catch_unwind(AssertUnwindSafe(|| (parser.parse)(&parser.dir))) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => errors += 1,
                Err(_) => {
                    let message = LAST_PANIC.lock().unwrap().clone();
                    let kept = root.join(format!("panic-{p}-{input}-{name}"));
                    fs::write(&kept, &bytes).unwrap();
                    panics.push(format!(
                        "{} #{input} ({name}, {mutation:?}; kept as {}): {message}",
                        parser.name,
                        kept.display()
                    ));
                }
            }
            fs::write(&path, &seeds[f]).unwrap();
        }
        println!(
            "{:<22} {inputs} inputs, {errors} refused with an error, {} panics, {:.1} s",
            parser.name,
            panics.iter().filter(|m| m.starts_with(parser.name)).count(),
            started.elapsed().as_secs_f64()
        );
    }
    std::panic::set_hook(default_hook);
    println!(
        "{} inputs in all, peak heap {:.1} MiB",
        inputs * parsers.len(),
        PEAK.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
    );
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    fs::remove_dir_all(&root).ok();
}
