//! Packed, compressed model artifacts for size-budgeted models (`kiln export --format packed`)
//! and their reloading (`kiln eval --artifact`): every tensor quantized by the scheme a
//! [`PackRule`] gives it (`kiln_core::quant`), the packed bytes concatenated and compressed with
//! whichever of zstd, xz and brotli is smallest.
//!
//! File layout: `b"KILNPACK"`, u32 version, u32 manifest length, the manifest (JSON: model
//! config, tokenizer hash, vocabulary map, codec, and per tensor its name, shape, scheme and
//! byte range in the decompressed payload), then the compressed payload. The size table
//! accounts for every byte of the file.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use kiln_core::bytes::le_at;
use kiln_core::config::ModelConfig;
use kiln_core::layout::{Branch, ParamKind, ParamLayout, Region};
pub use kiln_core::quant::PackRule;
use kiln_core::quant::{hadamard_rows, Calibrated, ExportQuant, Quantized, Scheme};

use crate::compress::{compress_smallest, decompress, Codec};

const MAGIC: &[u8; 8] = b"KILNPACK";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    scheme: Scheme,
    offset: usize,
    len: usize,
    /// The rows were rotated by the Hadamard matrix of blocks of this size before they were
    /// quantized: the reader rotates the dequantized rows back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    model: ModelConfig,
    tokenizer_sha256: Option<String>,
    vocab_map: Option<Vec<u32>>,
    codec: Codec,
    rule: PackRule,
    /// How the codes were chosen (a record: the reader needs nothing from it).
    #[serde(default)]
    options: PackOptions,
    entries: Vec<Entry>,
}

/// Export-time choices beyond the [`PackRule`]'s schemes, each judged by round-trip bits
/// per byte (`kiln ablate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackOptions {
    /// Choose each integer row's clip and each ternary group's scale by the least squared
    /// error against the unclipped values (`kiln_core::quant::quantize_with`).
    #[serde(default)]
    pub clip_search: bool,
    /// Rotate each quantized matrix's rows by a block Hadamard matrix before quantizing
    /// (`kiln_core::quant::hadamard_rows`), and back after dequantizing at load: outliers
    /// spread over the block. The reloaded model computes with the rotated-back values, so
    /// these matrices do not run on their codes.
    #[serde(default)]
    pub hadamard: bool,
    /// Calibrate each quantized tensor's scale on training text (`kiln export --calibrate`,
    /// the `calibrate` module of the kiln crate); resolved before [`write_calibrated`].
    #[serde(default)]
    pub calibrate: bool,
}

/// One row of the size table: a group of tensors and its packed (uncompressed) bytes.
#[derive(Clone, Debug, Serialize)]
pub struct SizeRow {
    pub group: String,
    pub tensors: usize,
    pub parameters: usize,
    pub packed_bytes: usize,
}

/// What an export produced.
#[derive(Clone, Debug, Serialize)]
pub struct PackReport {
    pub groups: Vec<SizeRow>,
    /// Header (magic, version, length) plus manifest.
    pub header_bytes: usize,
    pub payload_packed_bytes: usize,
    pub payload_compressed_bytes: usize,
    pub codec: Codec,
    pub codec_sizes: Vec<(Codec, usize)>,
    pub file_bytes: usize,
}

fn group_of(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Embedding | ParamKind::Classifier => "embedding / classifier",
        ParamKind::BlockMatrix {
            branch: Branch::Attention,
            ..
        } => "attention matrices",
        ParamKind::BlockMatrix {
            branch: Branch::Mlp,
            ..
        } => "MLP matrices",
        ParamKind::BlockMatrix {
            branch: Branch::Memory,
            ..
        } => "memory matrices (EngramHash, capsules, feedback)",
        ParamKind::NormGain | ParamKind::Control(_) => "norms and control tensors",
    }
}

/// Quantizes, packs and compresses `weights` (kiln layout for `config`) into `path`.
pub fn write(
    path: &Path,
    config: &ModelConfig,
    weights: &[f32],
    (rule, options): (PackRule, PackOptions),
    tokenizer_sha256: Option<String>,
    vocab_map: Option<Vec<u32>>,
) -> Result<PackReport> {
    let artifact = (tokenizer_sha256, vocab_map);
    write_calibrated(path, config, weights, (rule, options), &[], artifact)
}

/// [`write`] with tensor `i` quantized under `calibration[i]` (the plain rule where it is
/// short): a calibration's choices (`kiln export --calibrate`). The format is unchanged.
pub fn write_calibrated(
    path: &Path,
    config: &ModelConfig,
    weights: &[f32],
    (rule, options): (PackRule, PackOptions),
    calibration: &[Calibrated],
    (tokenizer_sha256, vocab_map): (Option<String>, Option<Vec<u32>>),
) -> Result<PackReport> {
    let layout = ParamLayout::new(config);
    let mut payload = Vec::new();
    let mut entries = Vec::new();
    let mut groups: Vec<SizeRow> = Vec::new();
    // The run's own rotation under QAT (the rule's), or one asked of this export.
    let quant = ExportQuant {
        rule,
        search: options.clip_search,
        rotate: rule.hadamard || options.hadamard,
    };
    for (i, spec) in layout.specs.iter().enumerate() {
        let values = &weights[spec.region.offset..][..spec.region.len];
        let cal = calibration.get(i).copied().unwrap_or(Calibrated::PLAIN);
        let (q, rotation) = quant.quantize(spec, values, cal)?;
        let (scheme, bytes) = (q.scheme, q.pack());
        entries.push(Entry {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            scheme,
            offset: payload.len(),
            len: bytes.len(),
            rotation,
        });
        let group = group_of(spec.kind);
        match groups.iter_mut().find(|g| g.group == group) {
            Some(g) => {
                g.tensors += 1;
                g.parameters += spec.region.len;
                g.packed_bytes += bytes.len();
            }
            None => groups.push(SizeRow {
                group: group.into(),
                tensors: 1,
                parameters: spec.region.len,
                packed_bytes: bytes.len(),
            }),
        }
        payload.extend(bytes);
    }
    let (codec, compressed, codec_sizes) = compress_smallest(&payload)?;
    let manifest = serde_json::to_vec(&Manifest {
        model: config.clone(),
        tokenizer_sha256,
        vocab_map,
        codec,
        rule,
        options,
        entries,
    })?;
    let mut file = MAGIC.to_vec();
    file.extend(VERSION.to_le_bytes());
    file.extend((manifest.len() as u32).to_le_bytes());
    file.extend(&manifest);
    let header_bytes = file.len();
    file.extend(&compressed);
    crate::fsutil::write_atomic(path, &file)?;
    Ok(PackReport {
        groups,
        header_bytes,
        payload_packed_bytes: payload.len(),
        payload_compressed_bytes: compressed.len(),
        codec,
        codec_sizes,
        file_bytes: file.len(),
    })
}

/// A model reloaded from an artifact alone.
pub struct Unpacked {
    pub config: ModelConfig,
    pub weights: Vec<f32>,
    /// The matrices stored as integer codes (ternary, int6, int8), as stored: `weights`
    /// holds exactly what they dequantize to.
    pub codes: Vec<(Region, Quantized)>,
    pub tokenizer_sha256: Option<String>,
    pub vocab_map: Option<Vec<u32>>,
}

/// Reads an artifact written by [`write`] and dequantizes every tensor.
pub fn read(path: &Path) -> Result<Unpacked> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let p = path.display();
    ensure!(
        bytes.len() >= 16 && &bytes[..8] == MAGIC,
        "{p} is not a kiln packed artifact (bad magic)"
    );
    let version = le_at::<u32>(&bytes, 8).unwrap_or(0);
    ensure!(
        version == VERSION,
        "{p}: packed format version {version}, kiln reads {VERSION}"
    );
    let len = le_at::<u32>(&bytes, 12).unwrap_or(0) as usize;
    ensure!(bytes.len() >= 16 + len, "{p}: truncated manifest");
    let manifest: Manifest = serde_json::from_slice(&bytes[16..16 + len])
        .with_context(|| format!("{p}: malformed manifest"))?;
    manifest
        .model
        .validate()
        .with_context(|| format!("{p}: the model shape is invalid"))?;
    // The payload holds the entries' bytes and no more.
    let ends = manifest
        .entries
        .iter()
        .map(|e| e.offset.saturating_add(e.len));
    let payload = decompress(manifest.codec, &bytes[16 + len..], ends.max().unwrap_or(0))
        .with_context(|| format!("{p}: the payload does not decompress"))?;
    let layout = ParamLayout::new(&manifest.model);
    // Every tensor's entry checked before the weights are allocated: disjoint ranges of the
    // payload, at least a byte per 5 values (ternary's packing, the densest scheme), so the
    // payload bounds the model.
    let mut ranges = Vec::with_capacity(layout.specs.len());
    for spec in &layout.specs {
        let Some(e) = manifest.entries.iter().find(|e| e.name == spec.name) else {
            bail!("{p}: no tensor '{}'", spec.name);
        };
        ensure!(
            e.shape == spec.shape
                && e.offset
                    .checked_add(e.len)
                    .is_some_and(|end| end <= payload.len())
                && e.len.saturating_mul(5) >= spec.region.len,
            "{p}: entry '{}' does not fit",
            e.name
        );
        ranges.push((e.offset, e.len));
    }
    ranges.sort_unstable();
    ensure!(
        ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
        "{p}: entries overlap"
    );
    let mut weights = vec![0f32; layout.total_len()];
    let mut codes = Vec::new();
    for spec in &layout.specs {
        let e = manifest
            .entries
            .iter()
            .find(|e| e.name == spec.name)
            .expect("checked above");
        let (rows, cols) = match spec.shape.as_slice() {
            [r, c] => (*r, *c),
            _ => (1, spec.region.len),
        };
        let q = Quantized::unpack(e.scheme, rows, cols, &payload[e.offset..e.offset + e.len])
            .with_context(|| format!("{p}: tensor '{}'", e.name))?;
        let values = &mut weights[spec.region.offset..][..spec.region.len];
        values.copy_from_slice(&q.dequantize());
        match e.rotation {
            Some(block) => {
                ensure!(
                    spec.shape.len() == 2 && block.is_power_of_two() && cols.is_multiple_of(block),
                    "{p}: tensor '{}' names a rotation of blocks of {block} for rows of {cols}",
                    e.name
                );
                hadamard_rows(values, cols, block);
            }
            // Rotated matrices compute with their rotated-back values, not their codes.
            None if spec.shape.len() == 2 && !q.codes.is_empty() => codes.push((spec.region, q)),
            None => {}
        }
    }
    Ok(Unpacked {
        config: manifest.model,
        weights,
        codes,
        tokenizer_sha256: manifest.tokenizer_sha256,
        vocab_map: manifest.vocab_map,
    })
}

/// Enforces a size budget on a written artifact: the bytes to spare, or an error saying by how
/// much it is over — and the artifact is removed, so an over-budget file is never used.
pub fn check_budget(path: &Path, report: &PackReport, limit: u64) -> Result<u64> {
    let size = report.file_bytes as u64;
    if size > limit {
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
        bail!(
            "the artifact is {size} bytes, over the budget of {limit} bytes by {}; removed {}",
            size - limit,
            path.display()
        );
    }
    Ok(limit - size)
}

/// Prints the size table: every byte of the file is in one of its rows.
pub fn print_table(report: &PackReport) {
    println!(
        "{:<26} {:>8} {:>12} {:>14}",
        "group", "tensors", "parameters", "packed bytes"
    );
    for g in &report.groups {
        println!(
            "{:<26} {:>8} {:>12} {:>14}",
            g.group, g.tensors, g.parameters, g.packed_bytes
        );
    }
    println!(
        "{:<26} {:>8} {:>12} {:>14}",
        "payload before compression", "", "", report.payload_packed_bytes
    );
    let sizes: Vec<String> = report
        .codec_sizes
        .iter()
        .map(|(c, n)| format!("{c:?} {n}"))
        .collect();
    println!(
        "payload compressed ({:?}; tried {}): {} bytes",
        report.codec,
        sizes.join(", "),
        report.payload_compressed_bytes
    );
    println!("header and manifest: {} bytes", report.header_bytes);
    println!(
        "artifact: {} bytes = {} + {}",
        report.file_bytes, report.header_bytes, report.payload_compressed_bytes
    );
}
