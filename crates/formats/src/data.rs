//! Token shards, corpus preparation, and the training data loader.
//!
//! Shard format (llm.c's, which parameter-golf also uses): a header of 256 little-endian i32 —
//! `[magic, version, token_count, 0, …]` — then the tokens:
//! - magic 20240520, version 1: u16 tokens (vocabularies up to 65,536);
//! - magic 20240801, version 7: u32 tokens (llm.c's Llama 3 variant, for larger vocabularies).
//!
//! Shards written by those projects load as they are. A prepared corpus is a directory of
//! `train_NNNNNN.bin` and `val_NNNNNN.bin` shards, the tokenizer file, and `data.json`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kiln_core::bytes::{le_at, le_values};

use crate::fsutil::write_atomic;
use crate::tokenizer::Tokenizer;

pub const MAGIC_U16: i32 = 20240520;
pub const VERSION_U16: i32 = 1;
pub const MAGIC_U32: i32 = 20240801;
pub const VERSION_U32: i32 = 7;
const HEADER_INTS: usize = 256;
/// Tokens per shard before a new one is started (llm.c uses 100M too).
const SHARD_TOKENS: usize = 100_000_000;

/// Writes one shard, u16 when every id fits, else the u32 variant.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let wide = vocab_size > 65536;
    let mut header = [0i32; HEADER_INTS];
    header[0] = if wide { MAGIC_U32 } else { MAGIC_U16 };
    header[1] = if wide { VERSION_U32 } else { VERSION_U16 };
    header[2] = i32::try_from(tokens.len()).context("shard over 2^31 tokens")?;
    let mut bytes = Vec::with_capacity(HEADER_INTS * 4 + tokens.len() * if wide { 4 } else { 2 });
    header.iter().for_each(|h| bytes.extend(h.to_le_bytes()));
    for &t in tokens {
        if wide {
            bytes.extend(t.to_le_bytes());
        } else {
            bytes.extend((t as u16).to_le_bytes());
        }
    }
    write_atomic(path, &bytes)
}

/// Reads and validates one shard: magic and version, exact payload length, every id below
/// `vocab_size`. Errors name the file.
pub fn read_shard(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read shard {}", path.display()))?;
    let p = path.display();
    ensure!(
        bytes.len() >= HEADER_INTS * 4,
        "{p}: {} bytes, shorter than the 1024-byte shard header",
        bytes.len()
    );
    let int = |i: usize| le_at::<i32>(&bytes, i * 4).unwrap_or(0);
    let width = match (int(0), int(1)) {
        (MAGIC_U16, VERSION_U16) => 2,
        (MAGIC_U32, VERSION_U32) => 4,
        (MAGIC_U16 | MAGIC_U32, v) => {
            bail!("{p}: unsupported shard version {v} for magic {}", int(0))
        }
        (m, _) => {
            bail!("{p}: wrong magic {m} (expected {MAGIC_U16} or {MAGIC_U32}): not a token shard")
        }
    };
    let count = int(2);
    ensure!(count >= 0, "{p}: negative token count {count}");
    let expected = HEADER_INTS * 4 + count as usize * width;
    ensure!(
        bytes.len() == expected,
        "{p}: header says {count} tokens ({expected} bytes) but the file has {} bytes{}",
        bytes.len(),
        if bytes.len() < expected {
            " (truncated)"
        } else {
            ""
        }
    );
    let payload = &bytes[HEADER_INTS * 4..];
    let tokens: Vec<u32> = if width == 2 {
        le_values::<u16>(payload)
            .into_iter()
            .map(u32::from)
            .collect()
    } else {
        le_values::<u32>(payload)
    };
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        bail!("{p}: token {i} has id {t}, not below the vocabulary size {vocab_size}");
    }
    Ok(tokens)
}

/// `data.json`: what a prepared corpus holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataManifest {
    pub kiln_version: String,
    /// File name of the tokenizer beside the shards.
    pub tokenizer: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub train_shards: Vec<String>,
    pub val_shards: Vec<String>,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// UTF-8 bytes of the validation text.
    pub val_bytes: usize,
    pub documents: usize,
}

/// A prepared corpus on disk.
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: DataManifest,
    pub tokenizer: Tokenizer,
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("data.json");
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a prepared corpus (no data.json; run `kiln data prepare`)",
                dir.display()
            )
        })?;
        let manifest: DataManifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed", path.display()))?;
        let tokenizer = Tokenizer::load(&dir.join(&manifest.tokenizer))?;
        ensure!(
            tokenizer.hash() == manifest.tokenizer_sha256,
            "{}: the tokenizer file does not match the one the shards were made with",
            dir.display()
        );
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
        })
    }

    pub fn shard_paths(&self, split: Split) -> Vec<PathBuf> {
        let names = match split {
            Split::Train => &self.manifest.train_shards,
            Split::Val => &self.manifest.val_shards,
        };
        names.iter().map(|n| self.dir.join(n)).collect()
    }

    /// Every token of a split, in order (validation sets are small; training streams instead).
    pub fn read_all(&self, split: Split) -> Result<Vec<u32>> {
        let mut all = Vec::new();
        for path in self.shard_paths(split) {
            all.extend(read_shard(&path, self.manifest.vocab_size)?);
        }
        Ok(all)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Where a loader is in its stream; saved in checkpoints so a resumed run reads on exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub shard: usize,
    pub offset: usize,
}

/// Reads batches of `batch` rows of `seq + 1` consecutive tokens (inputs and shifted targets)
/// through the shards in order, wrapping around at the end (llm.c's loader).
pub struct Loader {
    shards: Vec<PathBuf>,
    vocab_size: usize,
    batch: usize,
    seq: usize,
    pub position: DataPosition,
    current: Vec<u32>,
    loaded: Option<usize>,
    /// Batches in one pass over the shards.
    batches_per_pass: u64,
}

impl Loader {
    pub fn new(shards: Vec<PathBuf>, vocab_size: usize, batch: usize, seq: usize) -> Result<Self> {
        ensure!(!shards.is_empty(), "no shards to load");
        let mut loader = Loader {
            shards,
            vocab_size,
            batch,
            seq,
            position: DataPosition::default(),
            current: Vec::new(),
            loaded: None,
            batches_per_pass: 0,
        };
        // Validate every shard up front: a bad one should fail now, not an hour in.
        for i in 0..loader.shards.len() {
            loader.load(i)?;
            loader.batches_per_pass += ((loader.current.len() - 1) / (batch * seq)) as u64;
        }
        loader.load(0)?;
        Ok(loader)
    }

    fn load(&mut self, shard: usize) -> Result<()> {
        if self.loaded != Some(shard) {
            let tokens = read_shard(&self.shards[shard], self.vocab_size)?;
            let need = self.batch * self.seq + 1;
            ensure!(
                tokens.len() >= need,
                "{}: {} tokens, shorter than one batch of {}×{} (+1) tokens; use a smaller --batch or --seq",
                self.shards[shard].display(),
                tokens.len(),
                self.batch,
                self.seq
            );
            self.current = tokens;
            self.loaded = Some(shard);
        }
        Ok(())
    }

    pub fn seek(&mut self, position: DataPosition) -> Result<()> {
        ensure!(
            position.shard < self.shards.len(),
            "data position names shard {} of {}",
            position.shard,
            self.shards.len()
        );
        self.position = position;
        self.load(position.shard)
    }

    /// How many batches one pass over the shards holds (a shard's tail shorter than a batch
    /// is not read).
    pub fn batches_per_pass(&self) -> u64 {
        self.batches_per_pass
    }

    /// The next `(inputs, targets)`, each `batch × seq` tokens.
    pub fn next_batch(&mut self) -> Result<(Vec<u32>, Vec<u32>)> {
        let start = self.advance()?;
        let span = self.batch * self.seq;
        let window = &self.current[start..start + span + 1];
        Ok((window[..span].to_vec(), window[1..].to_vec()))
    }

    /// Moves past the next batch without reading it: another data-parallel process trains on
    /// it.
    pub fn skip(&mut self) -> Result<()> {
        self.advance().map(|_| ())
    }

    /// Moves past the next batch (to the next shard when this one has no whole batch left);
    /// returns the batch's offset in the current shard.
    fn advance(&mut self) -> Result<usize> {
        let span = self.batch * self.seq;
        if self.position.offset + span + 1 > self.current.len() {
            self.position.offset = 0;
            self.position.shard += 1;
            if self.position.shard == self.shards.len() {
                self.position.shard = 0;
                self.position.epoch += 1;
            }
            self.load(self.position.shard)?;
        }
        let start = self.position.offset;
        self.position.offset += span;
        Ok(start)
    }
}

/// Text files under the inputs (files as given, directories walked in name order).
fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input)
            .with_context(|| format!("input {} does not exist", input.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            entries.sort();
            files.extend(collect_files(&entries)?);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// How to get a tokenizer for `kiln data prepare`.
pub enum TokenizerSpec {
    /// Train a byte-level BPE of this many tokens on the training split.
    TrainBpe(usize),
    /// Load `tokenizer.json` or `tokenizer.bin`.
    File(PathBuf),
}

impl std::str::FromStr for TokenizerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("bpe:") {
            Some(n) => {
                Ok(TokenizerSpec::TrainBpe(n.parse().with_context(|| {
                    format!("'{s}': expected bpe:VOCAB_SIZE")
                })?))
            }
            None => Ok(TokenizerSpec::File(PathBuf::from(s))),
        }
    }
}

/// Splits documents into train and validation: the last `val_fraction` of all bytes, cut at
/// a line boundary, is validation.
fn split_documents(docs: Vec<String>, val_fraction: f64) -> (Vec<String>, Vec<String>) {
    let total: usize = docs.iter().map(|d| d.len()).sum();
    let mut remaining_train = ((1.0 - val_fraction) * total as f64) as usize;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for doc in docs {
        if remaining_train >= doc.len() {
            remaining_train -= doc.len();
            train.push(doc);
        } else if remaining_train == 0 {
            val.push(doc);
        } else {
            // From the first character boundary at or after the byte count (a cut inside a
            // multi-byte character would not be text), to the end of that line.
            let start = (remaining_train..doc.len())
                .find(|&i| doc.is_char_boundary(i))
                .unwrap_or(doc.len());
            let cut = doc[start..]
                .find('\n')
                .map(|i| start + i + 1)
                .unwrap_or(doc.len());
            let (head, tail) = doc.split_at(cut);
            train.push(head.to_string());
            if !tail.is_empty() {
                val.push(tail.to_string());
            }
            remaining_train = 0;
        }
    }
    (train, val)
}

/// `kiln data prepare`: reads text, gets a tokenizer, writes shards and `data.json`.
pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    spec: TokenizerSpec,
    val_fraction: f64,
) -> Result<DataManifest> {
    ensure!(
        (0.0..1.0).contains(&val_fraction) && val_fraction > 0.0,
        "--val-fraction must be in (0, 1), got {val_fraction}"
    );
    let files = collect_files(inputs)?;
    ensure!(!files.is_empty(), "no input files found in {inputs:?}");
    let mut docs = Vec::with_capacity(files.len());
    for file in &files {
        let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                file.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        if !text.is_empty() {
            docs.push(text);
        }
    }
    let total_bytes: usize = docs.iter().map(|d| d.len()).sum();
    let document_count = docs.len();
    eprintln!(
        "read {} files, {} documents, {:.1} MB",
        files.len(),
        document_count,
        total_bytes as f64 / 1e6
    );
    let (train_docs, val_docs) = split_documents(docs, val_fraction);
    ensure!(
        !val_docs.is_empty(),
        "the corpus is too small to hold out a validation split"
    );

    let tokenizer = match spec {
        TokenizerSpec::TrainBpe(vocab) => {
            eprintln!("training a byte-level BPE of {vocab} tokens on the training split …");
            let t = std::time::Instant::now();
            let tok = Tokenizer::train_bpe(train_docs.iter().map(|s| s.as_str()), vocab)?;
            eprintln!("  trained in {:.1} s", t.elapsed().as_secs_f64());
            tok
        }
        TokenizerSpec::File(path) => Tokenizer::load(&path)?,
    };
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let vocab_size = tokenizer.vocab_size();
    let bos = tokenizer.bos();

    let bar = ProgressBar::new(total_bytes as u64);
    bar.set_style(
        ProgressStyle::with_template("tokenizing {bar:40} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    let encode = |docs: &[String]| -> Result<Vec<u32>> {
        let pieces: Vec<Vec<u32>> = docs
            .par_iter()
            .map(|doc| {
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(tokenizer.encode(doc)?);
                bar.inc(doc.len() as u64);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        Ok(pieces.concat())
    };
    let started = std::time::Instant::now();
    let train = encode(&train_docs)?;
    let val = encode(&val_docs)?;
    bar.finish();
    eprintln!(
        "{} train + {} val tokens in {:.1} s ({:.2} MB/s)",
        train.len(),
        val.len(),
        started.elapsed().as_secs_f64(),
        total_bytes as f64 / 1e6 / started.elapsed().as_secs_f64()
    );

    let write = |prefix: &str, tokens: &[u32]| -> Result<Vec<String>> {
        tokens
            .chunks(SHARD_TOKENS)
            .enumerate()
            .map(|(i, chunk)| {
                let name = format!("{prefix}_{i:06}.bin");
                write_shard(&out.join(&name), chunk, vocab_size)?;
                Ok(name)
            })
            .collect()
    };
    let manifest = DataManifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        tokenizer: tokenizer
            .save(out)?
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into(),
        tokenizer_sha256: tokenizer.hash(),
        vocab_size,
        train_shards: write("train", &train)?,
        val_shards: write("val", &val)?,
        train_tokens: train.len(),
        val_tokens: val.len(),
        val_bytes: val_docs.iter().map(|d| d.len()).sum(),
        documents: document_count,
    };
    write_atomic(
        &out.join("data.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validation cut that falls inside a multi-byte character moves to the next line
    /// boundary after it, for every byte position of a text of two-byte characters.
    #[test]
    fn the_validation_cut_never_splits_a_character() {
        let doc = "éé\nüüü\nöö\n".repeat(3);
        for numerator in 1..40 {
            let fraction = numerator as f64 / 40.0;
            let (train, val) = split_documents(vec![doc.clone()], fraction);
            assert_eq!(train.concat() + &val.concat(), doc, "fraction {fraction}");
            assert!(
                train.concat().ends_with('\n') || val.is_empty(),
                "fraction {fraction}"
            );
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-data-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn shards_round_trip_in_both_widths() {
        let dir = temp_dir("widths");
        let narrow: Vec<u32> = (0..1000).map(|i| (i * 37) % 65536).collect();
        write_shard(&dir.join("a.bin"), &narrow, 65536).unwrap();
        assert_eq!(read_shard(&dir.join("a.bin"), 65536).unwrap(), narrow);
        let wide: Vec<u32> = (0..1000).map(|i| i * 151).collect();
        write_shard(&dir.join("b.bin"), &wide, 151936).unwrap();
        assert_eq!(read_shard(&dir.join("b.bin"), 151936).unwrap(), wide);
        // The u32 variant is llm.c's: magic 20240801, version 7.
        let bytes = fs::read(dir.join("b.bin")).unwrap();
        assert_eq!(&bytes[..4], &20240801i32.to_le_bytes());
        assert_eq!(&bytes[4..8], &7i32.to_le_bytes());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_shard_written_by_llm_c_loads() {
        // Built byte by byte as llm.c's write_datafile does: np.int32 header, np.uint16 tokens.
        let dir = temp_dir("llmc");
        let mut bytes = Vec::new();
        let mut header = [0i32; 256];
        (header[0], header[1], header[2]) = (20240520, 1, 3);
        header.iter().for_each(|h| bytes.extend(h.to_le_bytes()));
        [50256u16, 15496, 11]
            .iter()
            .for_each(|t| bytes.extend(t.to_le_bytes()));
        fs::write(dir.join("fineweb_val_000000.bin"), &bytes).unwrap();
        assert_eq!(
            read_shard(&dir.join("fineweb_val_000000.bin"), 50257).unwrap(),
            [50256, 15496, 11]
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_shards_get_errors_naming_the_file_and_problem() {
        let dir = temp_dir("bad");
        write_shard(&dir.join("good.bin"), &[1, 2, 3, 4], 100).unwrap();
        let good = fs::read(dir.join("good.bin")).unwrap();

        let mut wrong_magic = good.clone();
        wrong_magic[0] = 0;
        fs::write(dir.join("magic.bin"), &wrong_magic).unwrap();
        let e = read_shard(&dir.join("magic.bin"), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic.bin") && e.contains("wrong magic"), "{e}");

        fs::write(dir.join("short.bin"), &good[..good.len() - 1]).unwrap();
        let e = read_shard(&dir.join("short.bin"), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("short.bin") && e.contains("truncated"), "{e}");

        let e = read_shard(&dir.join("good.bin"), 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("good.bin") && e.contains("id 4") && e.contains("vocabulary size 4"),
            "{e}"
        );

        let e = Loader::new(vec![dir.join("good.bin")], 100, 2, 8)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("good.bin") && e.contains("shorter than one batch"),
            "{e}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn loader_batches_are_shifted_windows_and_resume_exactly() {
        let dir = temp_dir("loader");
        let tokens: Vec<u32> = (0..100).collect();
        write_shard(&dir.join("s0.bin"), &tokens[..50], 100).unwrap();
        write_shard(&dir.join("s1.bin"), &tokens[50..], 100).unwrap();
        let shards = vec![dir.join("s0.bin"), dir.join("s1.bin")];
        let mut loader = Loader::new(shards.clone(), 100, 2, 5).unwrap();
        let (x, y) = loader.next_batch().unwrap();
        assert_eq!(x, (0..10).collect::<Vec<_>>());
        assert_eq!(y, (1..11).collect::<Vec<_>>());
        let mut straight = Vec::new();
        for _ in 0..12 {
            straight.push(loader.next_batch().unwrap());
        }
        assert!(
            loader.position.epoch >= 1,
            "must wrap around: {:?}",
            loader.position
        );
        // Resume from a saved position.
        let mut again = Loader::new(shards, 100, 2, 5).unwrap();
        again.next_batch().unwrap();
        for _ in 0..5 {
            again.next_batch().unwrap();
        }
        let saved = again.position;
        let mut resumed =
            Loader::new(vec![dir.join("s0.bin"), dir.join("s1.bin")], 100, 2, 5).unwrap();
        resumed.seek(saved).unwrap();
        for expected in &straight[5..] {
            assert_eq!(&resumed.next_batch().unwrap(), expected);
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prepare_splits_and_records_everything() {
        let dir = temp_dir("prepare");
        let input = dir.join("text");
        fs::create_dir_all(&input).unwrap();
        let play = "ROMEO. But soft, what light through yonder window breaks?\nJULIET. Ay me!\n"
            .repeat(200);
        fs::write(input.join("a.txt"), &play).unwrap();
        fs::write(input.join("b.txt"), play.replace("ROMEO", "HAMLET")).unwrap();
        let out = dir.join("prepared");
        let m = prepare(&[input.clone()], &out, TokenizerSpec::TrainBpe(300), 0.1).unwrap();
        assert_eq!(m.documents, 2);
        let data = Dataset::open(&out).unwrap();
        // The validation text is the corpus tail, cut at a line: decoding its tokens gives it.
        let val = data.read_all(Split::Val).unwrap();
        let text = data.tokenizer.decode(&val);
        assert_eq!(text.len(), m.val_bytes);
        assert!(text.ends_with("JULIET. Ay me!\n") && text.starts_with(|c: char| c.is_uppercase()));
        // A non-UTF-8 file is refused by name.
        fs::write(input.join("c.txt"), [0xff, 0xfe, 0x00]).unwrap();
        let e = prepare(&[input], &out, TokenizerSpec::TrainBpe(300), 0.1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.txt") && e.contains("UTF-8"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
