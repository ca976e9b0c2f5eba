//! Models in and out: Hugging Face directories ([`hf`]), llama2.c checkpoints ([`llama2c`]),
//! and kiln checkpoint directories, all read into one host-side form ([`Imported`]): a config
//! and the weights in kiln's parameter layout, with the tokenizer when one is found. Which
//! checkpoint of a run directory to read is the application's (`kiln::rundir`).
//!
//! Compacted-vocabulary models are expanded back to the full vocabulary on the way out: the
//! rows of tokens the model never saw are zero.

pub mod gguf;
pub mod hf;
pub mod llama2c;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use kiln_core::config::ModelConfig;
use kiln_core::layout::{ParamKind, ParamLayout};
use kiln_core::quant::PackRule;
use kiln_core::vocab::VocabMap;

use crate::checkpoint;
use crate::packed::PackReport;
use crate::tokenizer::Tokenizer;

/// A model read from disk, on the host, in kiln's layout.
pub struct Imported {
    pub config: ModelConfig,
    pub weights: Vec<f32>,
    pub tokenizer: Option<Tokenizer>,
    /// With vocabulary compaction: the map between the model's ids and the tokenizer's.
    pub vocab_map: Option<VocabMap>,
    /// What was read, for messages.
    pub source: String,
}

/// The first `tokenizer.json` or `tokenizer.bin` in `dirs`, loaded.
pub fn find_tokenizer(dirs: &[&Path]) -> Result<Option<Tokenizer>> {
    for dir in dirs {
        for name in ["tokenizer.json", "tokenizer.bin"] {
            let path = dir.join(name);
            if path.exists() {
                return Tokenizer::load(&path).map(Some);
            }
        }
    }
    Ok(None)
}

/// Reads a model: a Hugging Face directory (config.json), a llama2.c `.bin` or a GGUF `.gguf`
/// file (with a `tokenizer.bin` beside it, or `tokenizer`), or a kiln checkpoint directory (its tokenizer
/// given, or found in `tokenizer_dirs`).
pub fn import(path: &Path, tokenizer: Option<&Path>, tokenizer_dirs: &[&Path]) -> Result<Imported> {
    let explicit = tokenizer.map(Tokenizer::load).transpose()?;
    if path.is_dir() && path.join("config.json").exists() {
        let (config, weights) = hf::read(path)?;
        let tokenizer = match explicit {
            Some(t) => Some(t),
            None => find_tokenizer(&[path])?,
        };
        return Ok(Imported {
            config,
            weights,
            tokenizer,
            vocab_map: None,
            source: format!("Hugging Face model {}", path.display()),
        });
    }
    if path.is_file() {
        // A single file: GGUF, or llama2.c; its tokenizer beside it unless one is given.
        let (config, weights, source) = if path.extension().is_some_and(|e| e == "gguf") {
            let model = gguf::read(path)?;
            let source = format!("GGUF model {} ({})", path.display(), model.file_type);
            (model.config, model.weights, source)
        } else {
            ensure!(
                path.extension().is_some_and(|e| e == "bin"),
                "{}: not a model kiln can read (a Hugging Face directory, a llama2.c .bin, a GGUF file, or a kiln run or checkpoint)",
                path.display()
            );
            let model = llama2c::read(path)?;
            let source = format!(
                "llama2.c checkpoint {} (format v{})",
                path.display(),
                model.version
            );
            (model.config, model.weights, source)
        };
        let tokenizer = match explicit {
            Some(t) => Some(t),
            None => find_tokenizer(&[path.parent().unwrap_or(Path::new("."))])?,
        };
        return Ok(Imported {
            config,
            weights,
            tokenizer,
            vocab_map: None,
            source,
        });
    }
    if path.is_dir() && path.join("manifest.json").exists() {
        let dir = path.to_path_buf();
        let manifest = checkpoint::read_manifest(&dir)?;
        let layout = ParamLayout::new(&manifest.model);
        let weights = checkpoint::read_weights(&checkpoint::weights_file(&dir), &layout)?;
        let tokenizer = match explicit {
            Some(t) => Some(t),
            None => find_tokenizer(tokenizer_dirs)?,
        };
        if let Some(t) = &tokenizer {
            ensure!(
                t.hash() == manifest.tokenizer_sha256,
                "{}: the tokenizer found does not match the one the checkpoint was trained with",
                dir.display()
            );
        }
        let vocab_map = match (&manifest.vocab_map, &tokenizer) {
            (Some(full), Some(t)) => Some(VocabMap::from_full_ids(t.vocab_size(), full.clone())),
            (Some(_), None) => bail!(
                "{}: a compacted-vocabulary checkpoint needs its tokenizer",
                dir.display()
            ),
            _ => None,
        };
        return Ok(Imported {
            config: manifest.model,
            weights,
            tokenizer,
            vocab_map,
            source: format!("kiln checkpoint {}", dir.display()),
        });
    }
    if path.is_dir() {
        bail!(
            "{}: not a model kiln can read (no config.json, manifest.json or checkpoints)",
            path.display()
        );
    }
    bail!("{}: no such file or directory", path.display())
}

/// Copies the embedding and classifier rows of `ids` from a full-vocabulary model
/// (`full_config`, `weights`) into a model over just those tokens.
pub fn compact(
    full_config: &ModelConfig,
    weights: &[f32],
    map: &VocabMap,
) -> (ModelConfig, Vec<f32>) {
    let mut config = full_config.clone();
    config.vocab_size = map.model_vocab();
    remap_rows(full_config, weights, &config, |model_row| {
        Some(map.to_full(model_row as u32) as usize)
    })
}

/// Undoes compaction: a full-vocabulary model whose rows for tokens the compacted model does
/// not have are zero.
pub fn expand(
    config: &ModelConfig,
    weights: &[f32],
    map: &VocabMap,
    full_vocab: usize,
) -> (ModelConfig, Vec<f32>) {
    let mut full = config.clone();
    full.vocab_size = full_vocab;
    let (_, out) = remap_rows(config, weights, &full, |full_row| {
        map.to_model(&[full_row as u32]).ok().map(|v| v[0] as usize)
    });
    (full, out)
}

/// A model of shape `to` whose vocabulary rows come from `from`'s rows `source(row)` (zero
/// where `None`); every other tensor is copied.
fn remap_rows(
    from: &ModelConfig,
    weights: &[f32],
    to: &ModelConfig,
    source: impl Fn(usize) -> Option<usize>,
) -> (ModelConfig, Vec<f32>) {
    let (src, dst) = (ParamLayout::new(from), ParamLayout::new(to));
    let mut out = vec![0f32; dst.total_len()];
    let c = to.dim;
    for (s, d) in src.specs.iter().zip(&dst.specs) {
        let (from_values, to_values) = (
            &weights[s.region.offset..][..s.region.len],
            &mut out[d.region.offset..][..d.region.len],
        );
        // The rows of the token embedding and an untied classifier are the vocabulary's.
        if s.region == src.embedding || s.kind == ParamKind::Classifier {
            for (row, chunk) in to_values.chunks_exact_mut(c).enumerate() {
                if let Some(r) = source(row) {
                    chunk.copy_from_slice(&from_values[r * c..(r + 1) * c]);
                }
            }
        } else {
            to_values.copy_from_slice(from_values);
        }
    }
    (to.clone(), out)
}

/// Output formats of `kiln export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ExportFormat {
    /// A Hugging Face directory (`transformers.AutoModelForCausalLM.from_pretrained`).
    Hf,
    /// llama2.c's legacy `.bin` (what `run.c` runs) and its `tokenizer.bin`.
    Llama2c,
    /// A GGUF file (`model.gguf`, what llama.cpp runs) with llama2.c's tokenizer inside.
    Gguf,
    /// A quantized, compressed kiln artifact (`model.kiln`) for size-budgeted models: written
    /// by [`export_packed`], which takes the packing rule.
    Packed,
}

/// Refuses a header that describes more parameters than `file_bytes` could hold at one byte
/// each (a Llama's count, worked out in u128 so no field overflows it), before any
/// per-layer table or arena is made from it: a damaged or hostile header is an error, not
/// an allocation that kills the process.
pub(crate) fn check_fits(config: &ModelConfig, file_bytes: usize, path: &Path) -> Result<()> {
    let c = config;
    let (d, f, v, l) = (
        c.dim as u128,
        c.hidden_dim as u128,
        c.vocab_size as u128,
        c.n_layers as u128,
    );
    let (q, kv) = (
        (c.n_heads * c.head_dim) as u128,
        (c.n_kv_heads * c.head_dim) as u128,
    );
    let per_layer = 2 * d + 2 * q * d + 2 * kv * d + 3 * f * d;
    let total = v * d + l * per_layer + d;
    ensure!(
        total <= file_bytes as u128,
        "{}: describes a model of {total} parameters, more than the {} bytes of its weights \
         hold (damaged or truncated?)",
        path.display(),
        file_bytes
    );
    Ok(())
}

/// What `kiln export --quantize` writes the matrices as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Quantize {
    /// int8 in groups of 64 with f32 scales: llama2.c's v2 file, which `runq.c` runs.
    Int8,
    /// GGUF: the matrices in bf16.
    Bf16,
    /// GGUF: the matrices in ggml's Q8_0 (blocks of 32, an f16 scale each).
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
}

/// `kiln export`: writes an imported model to `out` as a Hugging Face directory or a
/// llama2.c file; returns the path written. (A packed artifact needs a rule:
/// [`export_packed`].)
pub fn export(imported: &Imported, format: ExportFormat, out: &Path) -> Result<PathBuf> {
    export_quantized(imported, format, None, out)
}

/// [`export`], the matrices quantized as `quantize` says (llama2.c: int8, the v2 file).
pub fn export_quantized(
    imported: &Imported,
    format: ExportFormat,
    quantize: Option<Quantize>,
    out: &Path,
) -> Result<PathBuf> {
    match (format, quantize) {
        (_, None) | (ExportFormat::Llama2c, Some(Quantize::Int8)) => {}
        (ExportFormat::Gguf, Some(Quantize::Bf16 | Quantize::Q8_0)) => {}
        (_, Some(q)) => bail!(
            "--quantize {q:?}: int8 goes with --format llama2c (runq.c's file), bf16 and q8_0 \
             with --format gguf"
        ),
    }
    if format == ExportFormat::Packed {
        bail!("a packed artifact needs a packing rule: use export_packed");
    }
    let (config, weights) = match (&imported.vocab_map, &imported.tokenizer) {
        (Some(map), Some(tok)) => {
            expand(&imported.config, &imported.weights, map, tok.vocab_size())
        }
        _ => (imported.config.clone(), imported.weights.clone()),
    };
    ensure!(
        config.arch.is_llama(),
        "{}: this model uses golf-family architecture options ({}), which the {} format cannot hold; export it with --format packed",
        imported.source,
        serde_json::to_string(&config.arch)?,
        match format {
            ExportFormat::Hf => "Hugging Face",
            ExportFormat::Llama2c => "llama2.c",
            ExportFormat::Gguf => "GGUF",
            ExportFormat::Packed => unreachable!("refused above"),
        }
    );
    match format {
        ExportFormat::Hf => {
            let bos = imported.tokenizer.as_ref().and_then(Tokenizer::bos);
            hf::write(out, &config, &weights, bos)?;
            if let Some(tok) = &imported.tokenizer {
                tok.save(out)?;
                if tok.file_name() != "tokenizer.json" {
                    eprintln!("note: the tokenizer is llama2.c's tokenizer.bin; transformers needs a tokenizer.json, which kiln does not convert to");
                }
            }
            Ok(out.to_path_buf())
        }
        ExportFormat::Packed => unreachable!("refused above"),
        ExportFormat::Gguf => {
            let tok = imported
                .tokenizer
                .as_ref()
                .with_context(|| format!("{}: GGUF export needs the tokenizer", imported.source))?;
            let kind = match quantize {
                None => gguf::GgufType::F32,
                Some(Quantize::Bf16) => gguf::GgufType::Bf16,
                Some(Quantize::Q8_0) => gguf::GgufType::Q8_0,
                Some(Quantize::Int8) => unreachable!("refused above"),
            };
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let path = out.join("model.gguf");
            gguf::write(&path, &config, &weights, &gguf::vocab(tok)?, kind)?;
            tok.save(out)?;
            Ok(path)
        }
        ExportFormat::Llama2c => {
            llama2c::check_exportable(&config)?;
            let tok = imported.tokenizer.as_ref();
            if let Some(t) = tok {
                ensure!(
                    t.file_name() == "tokenizer.bin",
                    "llama2.c's run.c hard-codes the Llama 2 vocabulary's conventions (BOS 1, EOS 2, byte fallback at ids 3..258): export a model trained with a llama2.c tokenizer.bin"
                );
            }
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let model_path = out.join("model.bin");
            match quantize {
                None => llama2c::write_legacy(&model_path, &config, &weights)?,
                Some(Quantize::Int8) => {
                    let group = llama2c::write_int8(&model_path, &config, &weights)?;
                    eprintln!("int8 in groups of {group} (llama2.c v2, runq.c)");
                }
                Some(Quantize::Bf16 | Quantize::Q8_0) => unreachable!("refused above"),
            }
            if let Some(t) = tok {
                t.save(out)?;
            }
            Ok(model_path)
        }
    }
}

/// `kiln export --format packed`: quantizes an imported model by `rule` into
/// `out/model.kiln` (with the tokenizer beside it); returns the artifact's path and its size
/// table.
pub fn export_packed(
    imported: &Imported,
    out: &Path,
    rule: PackRule,
    options: crate::packed::PackOptions,
) -> Result<(PathBuf, PackReport)> {
    export_packed_calibrated(imported, out, (rule, options), &[])
}

/// [`export_packed`] with a calibration's per-tensor choices
/// ([`crate::packed::write_calibrated`]).
pub fn export_packed_calibrated(
    imported: &Imported,
    out: &Path,
    (rule, options): (PackRule, crate::packed::PackOptions),
    calibration: &[kiln_core::quant::Calibrated],
) -> Result<(PathBuf, PackReport)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("model.kiln");
    let tokenizer_hash = imported.tokenizer.as_ref().map(Tokenizer::hash);
    let vocab_map = imported.vocab_map.as_ref().map(|m| m.full_ids().to_vec());
    let report = crate::packed::write_calibrated(
        &path,
        &imported.config,
        &imported.weights,
        (rule, options),
        calibration,
        (tokenizer_hash, vocab_map),
    )?;
    if let Some(t) = &imported.tokenizer {
        t.save(out)?;
    }
    Ok((path, report))
}
