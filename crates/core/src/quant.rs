//! Low-bit quantizers and the packed byte formats of compact-model export (the "parameter
//! golf" work). One quantizer per scheme, so training (fake quantization with a
//! straight-through estimator) and export can never disagree about what a weight becomes.
//!
//! - **Ternary** (BitNet b1.58): per group of 128 consecutive values, the scale is the mean
//!   absolute value (absmean) and each value becomes round(w / scale) clamped to {−1, 0, +1}.
//!   Packed 5 values per byte in base 3 (3⁵ = 243 ≤ 256), scales as f16.
//! - **Int8 / int6** per row: the row's clip is a percentile of |w| (outliers beyond it
//!   saturate); scale = clip / qmax (127 or 31), values round(w / scale) clamped to ±qmax.
//!   int8 is stored as bytes, int6 bit-packed 4 values per 3 bytes; scales as f16.
//! - [`PackRule`] says which scheme each tensor gets; [`fake_quantize`] is QAT's forward.
//!
//! Compression of the packed bytes is the formats crate's (`kiln_formats::packed`).
//!
//! Scales are rounded to f16 *before* quantizing, so the dequantized weights are exactly what
//! a reader of the packed bytes reconstructs.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::backend::FakeQuant;
use crate::bytes::{le_floats, le_values, FloatWidth};
use crate::layout::{ParamKind, ParamLayout, ParamSpec};
use crate::Result;

macro_rules! bail {
    ($($message:tt)*) => { $crate::fail!(Quant, $($message)*) };
}
macro_rules! ensure {
    ($cond:expr, $($message:tt)*) => { $crate::require!($cond, Quant, $($message)*) };
}

/// Values per ternary scale group.
pub const TERNARY_GROUP: usize = 128;

/// A quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase")]
pub enum Scheme {
    /// {−1, 0, +1} × a per-128-value absmean scale.
    Ternary,
    /// Signed integers of `bits` (6 or 8) × a per-row scale; the clip is the `percentile`
    /// (e.g. 99.99) of the row's absolute values.
    Int { bits: u32, percentile: f32 },
    /// Kept as f16.
    F16,
    /// Kept as f32.
    F32,
}

impl std::fmt::Display for Scheme {
    /// As the command line names it: ternary, int8, int6, f16, f32.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Scheme::Ternary => write!(f, "ternary"),
            Scheme::Int { bits, .. } => write!(f, "int{bits}"),
            Scheme::F16 => write!(f, "f16"),
            Scheme::F32 => write!(f, "f32"),
        }
    }
}

/// The clip percentile of parameter-golf's int8 baseline.
pub const CLIP_PERCENTILE: f32 = 99.99984;

/// The schemes by name, as the command line takes them (`--scheme`, `--qat`), and as files
/// name them (`"int8"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    Ternary,
    Int8,
    Int6,
    F16,
}

impl SchemeName {
    pub fn scheme(self) -> Scheme {
        match self {
            SchemeName::Ternary => Scheme::Ternary,
            SchemeName::Int8 => Scheme::Int {
                bits: 8,
                percentile: CLIP_PERCENTILE,
            },
            SchemeName::Int6 => Scheme::Int {
                bits: 6,
                percentile: CLIP_PERCENTILE,
            },
            SchemeName::F16 => Scheme::F16,
        }
    }
}

/// A quantized tensor: integer codes and f16 scales (none for the float schemes).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub scheme: Scheme,
    pub rows: usize,
    pub cols: usize,
    /// Ternary: −1/0/1; int: ±qmax. Empty for the float schemes.
    pub codes: Vec<i8>,
    /// Ternary: one per group of 128 (in flat order); int: one per row.
    pub scales: Vec<f16>,
    /// The float schemes' values (rounded to f16 for F16).
    pub floats: Vec<f32>,
}

fn qmax(bits: u32) -> i32 {
    (1 << (bits - 1)) - 1
}

/// The `percentile` (0–100) of |row|, by rank (nearest-rank method): the element a full
/// sort would put at that rank, found by selection in linear time (QAT re-quantizes every
/// tensor after every step, so this runs over all the weights each step).
fn abs_percentile(row: &[f32], percentile: f32) -> f32 {
    let mut a: Vec<f32> = row.iter().map(|x| x.abs()).collect();
    let rank = ((percentile / 100.0) * a.len() as f32).ceil() as usize;
    let index = rank.clamp(1, a.len()) - 1;
    *a.select_nth_unstable_by(index, f32::total_cmp).1
}

/// Quantizes `values`, a `(rows, cols)` row-major tensor.
pub fn quantize(scheme: Scheme, values: &[f32], rows: usize, cols: usize) -> Result<Quantized> {
    quantize_with(scheme, values, rows, cols, false)
}

/// Clip ratios of a row's largest |w| that [`quantize_with`]'s search tries for the integer
/// schemes, after the scheme's own percentile clip.
const CLIP_RATIOS: [f32; 12] = [
    1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.85, 0.82, 0.8, 0.75, 0.7,
];

/// Multiples of a group's mean |w| that the search tries as the ternary scale, after the
/// mean itself.
const TERNARY_RATIOS: [f32; 10] = [0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5];

/// `Σ (w − s·clamp(round(w/s), ±m))²`: the squared error of a group or row quantized with the
/// stored (f16) scale `s`, against the unclipped values.
fn squared_error(values: &[f32], s: f32, m: f32) -> f64 {
    values
        .iter()
        .map(|&w| {
            let q = if s > 0.0 {
                (w / s).round().clamp(-m, m) * s
            } else {
                0.0
            };
            ((w - q) as f64).powi(2)
        })
        .sum()
}

/// The f16 scale among `candidates` (applied to `values`) whose quantization has the least
/// squared error against the unclipped values; the first on ties, so the scheme's own scale
/// (first) is kept unless another is strictly better.
fn best_scale(values: &[f32], m: f32, candidates: impl Iterator<Item = f32>) -> f16 {
    let mut best = (f64::INFINITY, f16::ZERO);
    for candidate in candidates {
        let scale = f16::from_f32(candidate);
        let error = squared_error(values, scale.to_f32(), m);
        if error < best.0 {
            best = (error, scale);
        }
    }
    best.1
}

/// [`quantize`], or with `search`, each integer row's clip and each ternary group's scale
/// chosen among a few candidates (the scheme's own first) as the one with the least squared
/// error against the unclipped values: parameter-golf's "GPTQ-lite" clip search. The codes
/// and scales are stored as without it, so a reader needs nothing new; quantization-aware
/// training keeps the scheme's own rule, so this is an export-time choice.
pub fn quantize_with(
    scheme: Scheme,
    values: &[f32],
    rows: usize,
    cols: usize,
    search: bool,
) -> Result<Quantized> {
    quantize_scaled(scheme, values, rows, cols, search, Calibrated::PLAIN)
}

/// One tensor's calibration (an export's `--calibrate`): every scale the quantizer chooses
/// multiplied by `scale` before the values are rounded, and for ternary the rounding
/// threshold: `|w/s|` at or above it stores ±1 (0.5, the default, is rounding to nearest).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibrated {
    pub scale: f32,
    pub threshold: f32,
}

impl Calibrated {
    /// The scheme's own rule.
    pub const PLAIN: Calibrated = Calibrated {
        scale: 1.0,
        threshold: 0.5,
    };
}

/// [`quantize_with`] under a calibration ([`Calibrated::PLAIN`] changes nothing). A
/// ternary group's threshold moves with its scale; an integer row clips at the multiplied
/// scale (the threshold is ternary's alone).
pub fn quantize_scaled(
    scheme: Scheme,
    values: &[f32],
    rows: usize,
    cols: usize,
    search: bool,
    cal: Calibrated,
) -> Result<Quantized> {
    ensure!(
        cal.scale.is_finite() && cal.scale > 0.0,
        "quantize: a scale multiplier must be positive, got {}",
        cal.scale
    );
    ensure!(
        cal.threshold > 0.0 && cal.threshold < 1.5,
        "quantize: a ternary threshold must be in (0, 1.5), got {}",
        cal.threshold
    );
    let scaled = |scale: f16| match cal.scale {
        1.0 => scale,
        m => f16::from_f32(scale.to_f32() * m),
    };
    ensure!(
        values.len() == rows * cols,
        "quantize: {} values for a {rows}×{cols} tensor",
        values.len()
    );
    let mut q = Quantized {
        scheme,
        rows,
        cols,
        codes: Vec::new(),
        scales: Vec::new(),
        floats: Vec::new(),
    };
    match scheme {
        Scheme::Ternary => {
            for group in values.chunks(TERNARY_GROUP) {
                let absmean = group.iter().map(|x| x.abs()).sum::<f32>() / group.len() as f32;
                let scale = scaled(if search {
                    let ratios = std::iter::once(1.0).chain(TERNARY_RATIOS);
                    best_scale(group, 1.0, ratios.map(|r| r * absmean))
                } else {
                    f16::from_f32(absmean)
                });
                let s = scale.to_f32();
                q.scales.push(scale);
                let threshold = cal.threshold;
                q.codes.extend(group.iter().map(|&w| {
                    if s <= 0.0 {
                        0
                    } else if threshold == 0.5 {
                        (w / s).round().clamp(-1.0, 1.0) as i8
                    } else if (w / s).abs() >= threshold {
                        w.signum() as i8
                    } else {
                        0
                    }
                }));
            }
        }
        Scheme::Int { bits, percentile } => {
            scheme.check()?;
            let m = qmax(bits) as f32;
            for row in values.chunks(cols) {
                let clip = abs_percentile(row, percentile);
                let scale = scaled(if search {
                    let max = row.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let clips = std::iter::once(clip).chain(CLIP_RATIOS.map(|r| r * max));
                    best_scale(row, m, clips.map(|c| c / m))
                } else {
                    f16::from_f32(clip / m)
                });
                let s = scale.to_f32();
                q.scales.push(scale);
                q.codes.extend(row.iter().map(|&w| {
                    if s > 0.0 {
                        (w / s).round().clamp(-m, m) as i8
                    } else {
                        0
                    }
                }));
            }
        }
        Scheme::F16 => q.floats = values.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        Scheme::F32 => q.floats = values.to_vec(),
    }
    Ok(q)
}

impl Quantized {
    /// The weights a reader reconstructs.
    pub fn dequantize(&self) -> Vec<f32> {
        match self.scheme {
            Scheme::Ternary => self
                .codes
                .chunks(TERNARY_GROUP)
                .zip(&self.scales)
                .flat_map(|(g, s)| g.iter().map(move |&c| c as f32 * s.to_f32()))
                .collect(),
            Scheme::Int { .. } => self
                .codes
                .chunks(self.cols)
                .zip(&self.scales)
                .flat_map(|(r, s)| r.iter().map(move |&c| c as f32 * s.to_f32()))
                .collect(),
            Scheme::F16 | Scheme::F32 => self.floats.clone(),
        }
    }

    /// The packed bytes: codes then scales (f16, little-endian), or the floats.
    pub fn pack(&self) -> Vec<u8> {
        let mut out = match self.scheme {
            Scheme::Ternary => pack_ternary(&self.codes),
            Scheme::Int { bits: 6, .. } => pack_int6(&self.codes),
            Scheme::Int { .. } => self.codes.iter().map(|&c| c as u8).collect(),
            Scheme::F16 => self
                .floats
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            Scheme::F32 => self.floats.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        out.extend(self.scales.iter().flat_map(|s| s.to_le_bytes()));
        out
    }

    /// Reads bytes written by [`Quantized::pack`] for a tensor of this scheme and shape.
    pub fn unpack(scheme: Scheme, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let n = rows * cols;
        let (code_bytes, scale_count) = match scheme {
            Scheme::Ternary => (n.div_ceil(5), n.div_ceil(TERNARY_GROUP)),
            Scheme::Int { bits: 6, .. } => ((n * 6).div_ceil(8), rows),
            Scheme::Int { .. } => (n, rows),
            Scheme::F16 => (2 * n, 0),
            Scheme::F32 => (4 * n, 0),
        };
        ensure!(
            bytes.len() == code_bytes + 2 * scale_count,
            "packed {scheme:?} {rows}×{cols} tensor: {} bytes, expected {}",
            bytes.len(),
            code_bytes + 2 * scale_count
        );
        let (body, scale_bytes) = bytes.split_at(code_bytes);
        let scales = le_values::<f16>(scale_bytes);
        let mut q = Quantized {
            scheme,
            rows,
            cols,
            codes: Vec::new(),
            scales,
            floats: Vec::new(),
        };
        match scheme {
            Scheme::Ternary => q.codes = unpack_ternary(body, n)?,
            Scheme::Int { bits: 6, .. } => q.codes = unpack_int6(body, n),
            Scheme::Int { .. } => q.codes = body.iter().map(|&b| b as i8).collect(),
            Scheme::F16 => q.floats = le_floats(body, FloatWidth::F16),
            Scheme::F32 => q.floats = le_floats(body, FloatWidth::F32),
        }
        Ok(q)
    }
}

/// The block of a Hadamard rotation along rows of `cols` values: the largest power of two
/// that divides `cols`, at most 256; `None` when that is 1 (odd rows).
pub fn hadamard_block(cols: usize) -> Option<usize> {
    let block = (1usize << cols.trailing_zeros().min(8)).min(cols.max(1));
    (block > 1).then_some(block)
}

/// Multiplies every row of `values` (rows of `cols`) by the block-diagonal orthonormal
/// Hadamard matrix of blocks of `block` (Sylvester's construction scaled by 1/√block): the
/// fast Walsh–Hadamard transform, O(n log n) per block. The matrix is symmetric and its own
/// inverse, so applying this twice restores the values. Rotating a row before quantizing
/// spreads its outliers over the block (QuaRot's and QuIP#'s incoherence processing).
pub fn hadamard_rows(values: &mut [f32], cols: usize, block: usize) {
    assert!(
        block.is_power_of_two() && cols.is_multiple_of(block),
        "hadamard block {block} for rows of {cols}"
    );
    let norm = 1.0 / (block as f32).sqrt();
    for chunk in values.chunks_mut(block) {
        let mut h = 1;
        while h < block {
            for start in (0..block).step_by(2 * h) {
                for i in start..start + h {
                    let (a, b) = (chunk[i], chunk[i + h]);
                    chunk[i] = a + b;
                    chunk[i + h] = a - b;
                }
            }
            h *= 2;
        }
        for x in chunk.iter_mut() {
            *x *= norm;
        }
    }
}

/// Five trits per byte: `Σ (code_i + 1) · 3^i` for i = 0..5 (the last byte zero-padded).
pub fn pack_ternary(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(5)
        .map(|c| c.iter().rev().fold(0u8, |acc, &t| acc * 3 + (t + 1) as u8))
        .collect()
}

/// The inverse of [`pack_ternary`] for `n` codes; refuses bytes over 242.
pub fn unpack_ternary(bytes: &[u8], n: usize) -> Result<Vec<i8>> {
    let mut out = Vec::with_capacity(n);
    for &b in bytes {
        if b > 242 {
            bail!("byte {b} is not a base-3 pack of 5 trits (max 242)");
        }
        let mut v = b;
        for _ in 0..5 {
            out.push((v % 3) as i8 - 1);
            v /= 3;
        }
    }
    out.truncate(n);
    Ok(out)
}

/// Signed 6-bit codes, 4 per 3 bytes, little-endian bit order (two's complement in 6 bits).
pub fn pack_int6(codes: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((codes.len() * 6).div_ceil(8));
    let (mut acc, mut bits) = (0u32, 0);
    for &c in codes {
        acc |= ((c as u8 & 0x3f) as u32) << bits;
        bits += 6;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    out
}

/// The inverse of [`pack_int6`] for `n` codes.
pub fn unpack_int6(bytes: &[u8], n: usize) -> Vec<i8> {
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut bits) = (0u32, 0);
    for &b in bytes {
        acc |= (b as u32) << bits;
        bits += 8;
        while bits >= 6 && out.len() < n {
            let v = (acc & 0x3f) as u8;
            out.push(((v << 2) as i8) >> 2); // sign-extend 6 bits
            acc >>= 6;
            bits -= 6;
        }
    }
    out
}

/// Which scheme each tensor gets: the one rule that quantization-aware training and packed
/// export share, so a QAT run exports bit-identically to the weights its forward used.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackRule {
    /// Matrices of the blocks (attention and MLP projections), and an untied classifier.
    pub matrices: Scheme,
    /// The token and bigram embeddings: sensitive, often kept at 8 bits.
    pub embedding: Scheme,
    /// Tensors of at most this many values are kept in f16 (norm gains, tiny matrices).
    pub small_max: usize,
    /// Matrices stored as integers or trits are quantized in a block Hadamard rotation of
    /// their rows and rotated back after dequantizing ([`rotation_for`]). Under QAT the
    /// forward then computes with exactly those weights.
    #[serde(default)]
    pub hadamard: bool,
}

impl PackRule {
    pub fn scheme_for(&self, kind: ParamKind, len: usize) -> Scheme {
        match kind {
            // The golf block's scales, mixes and gains: few values, large effect (the
            // baseline keeps its "control tensors" in f32 too).
            ParamKind::Control(_) => Scheme::F32,
            _ if len <= self.small_max => Scheme::F16,
            ParamKind::NormGain => Scheme::F16,
            ParamKind::Embedding => self.embedding,
            ParamKind::Classifier | ParamKind::BlockMatrix { .. } => self.matrices,
        }
    }
}

/// The Hadamard block a tensor is rotated by under `scheme` when rotation is asked for: a
/// matrix stored as codes (ternary or integers) whose rows have an even length; `None` for
/// everything else (f16 and f32 tensors, vectors, odd rows). Training and export both ask
/// this, so they rotate the same tensors.
pub fn rotation_for(spec: &ParamSpec, scheme: Scheme, hadamard: bool) -> Option<usize> {
    let coded = matches!(scheme, Scheme::Ternary | Scheme::Int { .. });
    if !(hadamard && coded && spec.shape.len() == 2) {
        return None;
    }
    hadamard_block(quant_shape(spec).1)
}

/// The rows and columns a tensor is quantized as: a matrix's own, a vector as one row.
pub fn quant_shape(spec: &ParamSpec) -> (usize, usize) {
    match spec.shape.as_slice() {
        [r, c] => (*r, *c),
        _ => (1, spec.region.len),
    }
}

impl Scheme {
    /// Whether kiln can quantize with this scheme (6 or 8 bits, a percentile in (0, 100]).
    pub fn check(self) -> Result<()> {
        if let Scheme::Int { bits, percentile } = self {
            ensure!(
                bits == 6 || bits == 8,
                "int quantization supports 6 or 8 bits, not {bits}"
            );
            ensure!(
                (0.0..=100.0).contains(&percentile) && percentile > 0.0,
                "the clip percentile must be in (0, 100]"
            );
        }
        Ok(())
    }

    /// The round trip of this scheme on a `(rows, cols)` tensor, for
    /// [`crate::backend::Backend::fake_quantize`]; `None` for f32 (the values as they are).
    pub fn fake(self, cols: usize) -> Option<FakeQuant> {
        match self {
            Scheme::Ternary => Some(FakeQuant::Ternary {
                group: TERNARY_GROUP,
            }),
            Scheme::Int { bits, percentile } => Some(FakeQuant::Int {
                bits,
                percentile,
                cols,
            }),
            Scheme::F16 => Some(FakeQuant::F16),
            Scheme::F32 => None,
        }
    }
}

/// `dst = dequantize(quantize(src))` under `q`, without the codes: the same arithmetic as
/// [`quantize`] then [`Quantized::dequantize`], value for value (`src` holds whole groups
/// or rows). Backends run it on blocks of groups or rows. With a `rotation` block (whole
/// blocks in `src`), the values are rotated by [`hadamard_rows`] first and the result
/// rotated back: the packed writer's and reader's steps.
pub fn round_trip(q: FakeQuant, rotation: Option<usize>, src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "round trip: lengths");
    if let Some(block) = rotation {
        let mut rotated = src.to_vec();
        hadamard_rows(&mut rotated, src.len(), block);
        round_trip(q, None, &rotated, dst);
        hadamard_rows(dst, src.len(), block);
        return;
    }
    let rounded = |w: f32, s: f32, m: f32| {
        if s > 0.0 {
            // Through the i8 code, as the export stores it (so −0 comes back as +0).
            ((w / s).round().clamp(-m, m) as i8) as f32 * s
        } else {
            0.0
        }
    };
    match q {
        FakeQuant::Ternary { group } => {
            for (g, d) in src.chunks(group).zip(dst.chunks_mut(group)) {
                let absmean = g.iter().map(|x| x.abs()).sum::<f32>() / g.len() as f32;
                let s = f16::from_f32(absmean).to_f32();
                d.iter_mut()
                    .zip(g)
                    .for_each(|(d, &w)| *d = rounded(w, s, 1.0));
            }
        }
        FakeQuant::Int {
            bits,
            percentile,
            cols,
        } => {
            let m = qmax(bits) as f32;
            for (r, d) in src.chunks(cols).zip(dst.chunks_mut(cols)) {
                let s = f16::from_f32(abs_percentile(r, percentile) / m).to_f32();
                d.iter_mut()
                    .zip(r)
                    .for_each(|(d, &w)| *d = rounded(w, s, m));
            }
        }
        FakeQuant::F16 => {
            for (d, &w) in dst.iter_mut().zip(src) {
                *d = f16::from_f32(w).to_f32();
            }
        }
    }
}

/// Inference int8 (`--weights int8`, llama2.c's `runq.c` and its version-2 file): symmetric
/// groups of `group` consecutive values, scale = max |w| / 127 (f32), codes round(w / scale).
/// Returns `(codes, scales)`, one scale per group; `values.len()` is a multiple of `group`.
pub fn quantize_groups(values: &[f32], group: usize) -> (Vec<i8>, Vec<f32>) {
    assert!(
        group > 0 && values.len().is_multiple_of(group),
        "int8 groups: {} values in groups of {group}",
        values.len()
    );
    let mut codes = vec![0i8; values.len()];
    let mut scales = vec![0f32; values.len() / group];
    for ((g, c), s) in values
        .chunks_exact(group)
        .zip(codes.chunks_exact_mut(group))
        .zip(&mut scales)
    {
        let max = g.iter().fold(0f32, |m, x| m.max(x.abs()));
        *s = max / 127.0;
        if max > 0.0 {
            c.iter_mut()
                .zip(g)
                .for_each(|(c, &w)| *c = (w / *s).round() as i8);
        }
    }
    (codes, scales)
}

/// The widest group of [`quantize_groups`] (64, as `runq.c`'s export, halved until it
/// divides) that divides every product's input width of a model of width `dim`, MLP width
/// `hidden` and attention width `heads · head_dim`; `None` below 32 (the kernels read 32-byte
/// halves).
pub fn int8_group(widths: &[usize]) -> Option<usize> {
    let mut group = 64;
    while widths.iter().any(|w| w % group != 0) {
        group /= 2;
    }
    (group >= 32).then_some(group)
}

/// Replaces every matrix of `weights` (embeddings, classifier, block matrices) whose rows
/// have an [`int8_group`] by its round trip through [`quantize_groups`] in that group: with
/// `--weights int8` the products of many rows (prefill, evaluation) compute with exactly the
/// values the int8 kernels of decoding hold (the CPU backend picks the same group per
/// weight). Returns how many values were rounded.
pub fn round_trip_groups(layout: &ParamLayout, weights: &mut [f32]) -> usize {
    use rayon::prelude::*;
    let matrices: Vec<_> = layout
        .specs
        .iter()
        .filter(|spec| !matches!(spec.kind, ParamKind::NormGain | ParamKind::Control(_)))
        .filter_map(|spec| Some((spec.region, int8_group(&[*spec.shape.last()?])?)))
        .collect();
    let rounded: Vec<(usize, Vec<f32>)> = matrices
        .par_iter()
        .map(|&(region, group)| {
            let values = &weights[region.offset..][..region.len];
            let (codes, scales) = quantize_groups(values, group);
            let back = codes
                .chunks_exact(group)
                .zip(&scales)
                .flat_map(|(c, &s)| c.iter().map(move |&q| q as f32 * s))
                .collect();
            (region.offset, back)
        })
        .collect();
    let mut count = 0;
    for (offset, values) in rounded {
        count += values.len();
        weights[offset..][..values.len()].copy_from_slice(&values);
    }
    count
}

/// Replaces every tensor of `weights` by its quantize → dequantize round trip under `rule`:
/// the weights quantization-aware training computes with, and exactly what
/// `kiln eval --artifact` will reload from the export (same function, same scheme).
pub fn fake_quantize(layout: &ParamLayout, rule: &PackRule, weights: &mut [f32]) -> Result<()> {
    let export = ExportQuant {
        rule: *rule,
        search: false,
        rotate: rule.hadamard,
    };
    export_round_trip(layout, &export, &[], weights)
}

/// How an export quantizes: the rule, the clip search, and the Hadamard rotation (the rule's
/// own, or asked of the export).
#[derive(Clone, Copy, Debug)]
pub struct ExportQuant {
    pub rule: PackRule,
    pub search: bool,
    pub rotate: bool,
}

impl ExportQuant {
    /// One tensor's values as the export stores and its reader reconstructs them, under the
    /// calibration `cal`; `None` for a tensor kept in f32 (as it is).
    pub fn round_trip(
        &self,
        spec: &ParamSpec,
        values: &[f32],
        cal: Calibrated,
    ) -> Result<Option<Vec<f32>>> {
        if self.rule.scheme_for(spec.kind, spec.region.len) == Scheme::F32 {
            return Ok(None);
        }
        let (q, rotation) = self.quantize(spec, values, cal)?;
        let mut back = q.dequantize();
        if let Some(block) = rotation {
            hadamard_rows(&mut back, q.cols, block);
        }
        Ok(Some(back))
    }

    /// One tensor as the export stores it: its codes and scales (in the rotation, if any)
    /// and the rotation's block, which its reader undoes after dequantizing.
    pub fn quantize(
        &self,
        spec: &ParamSpec,
        values: &[f32],
        cal: Calibrated,
    ) -> Result<(Quantized, Option<usize>)> {
        let scheme = self.rule.scheme_for(spec.kind, spec.region.len);
        let (rows, cols) = quant_shape(spec);
        let rotation = rotation_for(spec, scheme, self.rotate);
        let q = match rotation {
            Some(block) => {
                let mut rotated = values.to_vec();
                hadamard_rows(&mut rotated, cols, block);
                quantize_scaled(scheme, &rotated, rows, cols, self.search, cal)?
            }
            None => quantize_scaled(scheme, values, rows, cols, self.search, cal)?,
        };
        Ok((q, rotation))
    }
}

/// Replaces every tensor of `weights` by what the export `quant` stores of it, tensor `i`
/// (of `layout.specs`) under `calibration[i]` (the plain rule where it is short).
pub fn export_round_trip(
    layout: &ParamLayout,
    quant: &ExportQuant,
    calibration: &[Calibrated],
    weights: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    let rounded: Vec<(usize, Option<Vec<f32>>)> = layout
        .specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let values = &weights[spec.region.offset..][..spec.region.len];
            let cal = calibration.get(i).copied().unwrap_or(Calibrated::PLAIN);
            Ok((spec.region.offset, quant.round_trip(spec, values, cal)?))
        })
        .collect::<Result<_>>()?;
    for (offset, values) in rounded {
        if let Some(values) = values {
            weights[offset..][..values.len()].copy_from_slice(&values);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A calibration: the scale × its factor, and ternary's threshold on |w|/scale (0.5 is
    /// the scheme's own rounding, bit for bit).
    #[test]
    fn a_calibration_scales_and_moves_the_ternary_threshold() {
        let values = [0.1, -0.5, 0.9, 0.02, 0.3, -0.2];
        let plain = quantize(Scheme::Ternary, &values, 1, 6).unwrap();
        let cal = |scale, threshold| {
            let c = Calibrated { scale, threshold };
            quantize_scaled(Scheme::Ternary, &values, 1, 6, false, c).unwrap()
        };
        assert_eq!(cal(1.0, 0.5), plain);
        // absmean 0.3366…: |w|/s = 0.30, 1.49, 2.67, 0.06, 0.89, 0.59.
        let s = plain.scales[0].to_f32();
        assert!((s - 0.33667).abs() < 1e-3);
        assert_eq!(plain.codes, [0, -1, 1, 0, 1, -1]);
        assert_eq!(cal(1.0, 0.25).codes, [1, -1, 1, 0, 1, -1]);
        assert_eq!(cal(1.0, 0.9).codes, [0, -1, 1, 0, 0, 0]);
        // × 2: the scale doubles (as f16), |w|/s halves, so 0.59 and 0.89 fall below 0.5.
        let doubled = cal(2.0, 0.5);
        assert_eq!(doubled.scales[0], f16::from_f32(s * 2.0));
        assert_eq!(doubled.codes, [0, -1, 1, 0, 0, 0]);
        assert!(quantize_scaled(
            Scheme::Ternary,
            &values,
            1,
            6,
            false,
            Calibrated {
                scale: 0.0,
                threshold: 0.5
            }
        )
        .is_err());
    }

    #[test]
    fn ternary_is_absmean_scaled_and_rounds_to_three_levels() {
        // absmean of [0.1, -0.5, 0.9, 0.02] is 0.38: 0.1/0.38 → 0, −0.5/0.38 → −1,
        // 0.9/0.38 → +1 (clamped from 2.4), 0.02 → 0.
        let q = quantize(Scheme::Ternary, &[0.1, -0.5, 0.9, 0.02], 1, 4).unwrap();
        assert_eq!(q.codes, [0, -1, 1, 0]);
        assert_eq!(q.scales, [f16::from_f32(0.38)]);
        let s = f16::from_f32(0.38).to_f32();
        assert_eq!(q.dequantize(), [0.0, -s, s, 0.0]);
        // Groups of 128: 300 values have three scales.
        let v: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 100.0).collect();
        assert_eq!(
            quantize(Scheme::Ternary, &v, 3, 100).unwrap().scales.len(),
            3
        );
    }

    #[test]
    fn int_quantization_clips_at_the_percentile_and_bounds_the_error() {
        let mut row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        row[7] = 50.0; // an outlier beyond the 99.9th percentile saturates
        for (bits, m) in [(8, 127), (6, 31)] {
            let q = quantize(
                Scheme::Int {
                    bits,
                    percentile: 99.9,
                },
                &row,
                1,
                1000,
            )
            .unwrap();
            assert!(q.codes.iter().all(|&c| (c as i32).abs() <= m));
            assert_eq!(q.codes[7] as i32, m, "the outlier saturates at qmax");
            let s = q.scales[0].to_f32();
            let back = q.dequantize();
            for (i, (&w, &d)) in row.iter().zip(&back).enumerate() {
                if i != 7 {
                    assert!(
                        (w - d).abs() <= s / 2.0 + 1e-6,
                        "{bits}-bit: {w} → {d} with scale {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn packing_round_trips_every_scheme_exactly() {
        let v: Vec<f32> = (0..777)
            .map(|i| ((i * 7919 % 1000) as f32 / 300.0) - 1.6)
            .collect();
        for scheme in [
            Scheme::Ternary,
            Scheme::Int {
                bits: 8,
                percentile: 99.99,
            },
            Scheme::Int {
                bits: 6,
                percentile: 100.0,
            },
            Scheme::F16,
            Scheme::F32,
        ] {
            let q = quantize(scheme, &v, 7, 111).unwrap();
            let bytes = q.pack();
            let back = Quantized::unpack(scheme, 7, 111, &bytes).unwrap();
            assert_eq!(back, q, "{scheme:?}");
            assert_eq!(back.dequantize(), q.dequantize());
        }
        // Sizes: ternary 5 codes per byte, int6 4 per 3 bytes, plus f16 scales.
        assert_eq!(
            quantize(Scheme::Ternary, &v, 7, 111).unwrap().pack().len(),
            777usize.div_ceil(5) + 2 * 7
        );
        assert_eq!(
            quantize(
                Scheme::Int {
                    bits: 6,
                    percentile: 100.0
                },
                &v,
                7,
                111
            )
            .unwrap()
            .pack()
            .len(),
            (777 * 6usize).div_ceil(8) + 2 * 7
        );
        assert!(Quantized::unpack(Scheme::Ternary, 7, 111, &[0; 3]).is_err());
    }

    /// Squared error of a quantized tensor against the original values, computed here from
    /// the dequantized values (not by the search's own error function).
    fn error(q: &Quantized, values: &[f32]) -> f64 {
        let back = q.dequantize();
        values
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    }

    #[test]
    fn the_clip_search_never_loses_to_the_schemes_own_rule_and_wins_where_it_can() {
        // Rows of a heavy-tailed distribution (a cubed uniform: most values small, a few
        // large), as trained matrices' rows are, and one row of uniform values.
        let (rows, cols) = (9, 256);
        let mut state = 12345u64;
        let mut values: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * u * u
            })
            .collect();
        for (i, v) in values[..cols].iter_mut().enumerate() {
            *v = i as f32 / cols as f32 - 0.5;
        }
        for scheme in [
            Scheme::Ternary,
            SchemeName::Int8.scheme(),
            SchemeName::Int6.scheme(),
        ] {
            let plain = quantize(scheme, &values, rows, cols).unwrap();
            let searched = quantize_with(scheme, &values, rows, cols, true).unwrap();
            // The same format: the searched tensor packs and unpacks as any other.
            let bytes = searched.pack();
            assert_eq!(bytes.len(), plain.pack().len());
            let back = Quantized::unpack(scheme, rows, cols, &bytes).unwrap();
            assert_eq!(back.dequantize(), searched.dequantize());
            // Never worse, row by row (group by group for ternary: each is its own choice).
            let unit = if scheme == Scheme::Ternary {
                TERNARY_GROUP
            } else {
                cols
            };
            for (k, chunk) in values.chunks(unit).enumerate() {
                let pick = |q: &Quantized| -> Vec<f32> {
                    q.dequantize()[k * unit..][..chunk.len()].to_vec()
                };
                let sse = |d: Vec<f32>| -> f64 {
                    chunk
                        .iter()
                        .zip(&d)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum()
                };
                assert!(
                    sse(pick(&searched)) <= sse(pick(&plain)),
                    "{scheme:?}, part {k}"
                );
            }
            // Over the whole tensor (measured: ternary 125.0 → 77.1, int6 0.157 → 0.154,
            // int8 unchanged at 0.0094): the mean |w| is far from the best ternary scale on
            // heavy tails; int6's coarse steps gain from a clip; int8's 255 levels over 256
            // values are best unclipped, so its search must at least not lose.
            let (e0, e1) = (error(&plain, &values), error(&searched, &values));
            eprintln!("{scheme:?}: squared error {e0:.4} → {e1:.4}");
            match scheme {
                Scheme::Ternary => assert!(e1 < 0.8 * e0, "ternary: {e0} → {e1}"),
                Scheme::Int { bits: 6, .. } => assert!(e1 < 0.99 * e0, "int6: {e0} → {e1}"),
                _ => assert!(e1 <= e0, "{scheme:?}: {e0} → {e1}"),
            }
        }
    }

    /// The fast transform against the matrix itself, built by Sylvester's recursion
    /// H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]] and multiplied out naively; then its own inverse.
    #[test]
    fn the_hadamard_rotation_is_sylvesters_matrix_and_its_own_inverse() {
        assert_eq!(hadamard_block(288), Some(32));
        assert_eq!(hadamard_block(1024), Some(256));
        assert_eq!(hadamard_block(6), Some(2));
        assert_eq!(hadamard_block(7), None);
        let (cols, block) = (48, 16);
        let mut h = vec![vec![1f64]];
        while h.len() < block {
            let n = h.len();
            let mut next = vec![vec![0f64; 2 * n]; 2 * n];
            for i in 0..n {
                for j in 0..n {
                    next[i][j] = h[i][j];
                    next[i][j + n] = h[i][j];
                    next[i + n][j] = h[i][j];
                    next[i + n][j + n] = -h[i][j];
                }
            }
            h = next;
        }
        let values: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut rotated = values.clone();
        hadamard_rows(&mut rotated, cols, block);
        for (r, row) in values.chunks(block).enumerate() {
            for j in 0..block {
                let want: f64 = (0..block).map(|i| row[i] as f64 * h[i][j]).sum::<f64>()
                    / (block as f64).sqrt();
                // f32 butterflies of values below 2: a few ulps of 16 summed terms.
                assert!(
                    (rotated[r * block + j] as f64 - want).abs() < 1e-5,
                    "{r} {j}"
                );
            }
        }
        hadamard_rows(&mut rotated, cols, block);
        for (a, b) in values.iter().zip(&rotated) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
    }

    #[test]
    fn bit_packing_matches_hand_computed_bytes() {
        // Trits (−1, 0, 1, 1, −1) → digits (0, 1, 2, 2, 0): 0 + 1·3 + 2·9 + 2·27 + 0·81 = 75.
        assert_eq!(pack_ternary(&[-1, 0, 1, 1, -1]), [75]);
        assert_eq!(unpack_ternary(&[75], 5).unwrap(), [-1, 0, 1, 1, -1]);
        // Int6 codes 1, −1, 31, −32 are the 6-bit fields 0x01, 0x3f, 0x1f, 0x20, laid
        // end to end from the lowest bit of a 24-bit little-endian word.
        let bytes = pack_int6(&[1, -1, 31, -32]);
        let word = bytes[0] as u32 | (bytes[1] as u32) << 8 | (bytes[2] as u32) << 16;
        assert_eq!(word, 1 | 0x3f << 6 | 0x1f << 12 | 0x20 << 18);
        assert_eq!(unpack_int6(&bytes, 4), [1, -1, 31, -32]);
    }
}
