//! llama2.c checkpoints: the legacy headerless format that `run.c` reads, and the v1 format
//! with its 256-byte header (export.py `legacy_export` / `version1_export`), fp32 throughout.
//!
//! Legacy: 7 × i32 `(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)`,
//! a negative vocab_size meaning an untied classifier; then the embedding, every layer's
//! attention norm, wq, wk, wv, wo, ffn norm, w1, w2, w3 (each group for all layers in turn),
//! the final norm, the RoPE tables `freq_cis_real/imag (seq_len, head_dim/2)`, and the
//! classifier if untied.
//! v1: u32 magic "ak42", i32 version 1, the same 7 ints, u8 shared-classifier flag, zero
//! padding to 256 bytes; then all attention norms, all ffn norms, the final norm, the
//! embedding, wq…w3 per group, and the classifier if untied.
//! v2 (export.py `version2_export`, what `runq.c` reads): the v1 header with version 2 and an
//! i32 group size after the flag; the norms in f32 as v1, then the embedding, wq…w3 and an
//! untied classifier as int8: each tensor's codes, then its f32 scales, one per group of
//! consecutive values (`kiln_core::quant::quantize_groups`).
//!
//! llama2.c pairs RoPE dimensions as neighbours (`2i`, `2i+1`); kiln pairs `i` with `i + D/2`
//! (Hugging Face). The q and k rows of each head are permuted on the way in and out, exactly
//! as Hugging Face's conversion script and llama2.c's `export.py` do.
//! Not supported (on export): anything `run.c` cannot run.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use kiln_core::bytes::{le_at, le_floats, FloatWidth};
use kiln_core::config::ModelConfig;
use kiln_core::layout::LayerParams;
use kiln_core::layout::{ParamLayout, Region};

const MAGIC: u32 = 0x616b_3432; // "ak42"

/// Row `r` of the half-split (kiln/HF) layout comes from this row of the interleaved layout:
/// within a head, HF row `j·D/2 + i` is llama2.c row `2i + j`.
fn interleaved_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / (head_dim / 2), within % (head_dim / 2));
    head * head_dim + 2 * i + j
}

/// Interleaved (llama2.c) → half-split (kiln) rows of a q or k projection `(heads·D, C)`.
pub fn to_half_split(w: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        let src = interleaved_row(r, head_dim);
        out[r * cols..(r + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
    }
    out
}

/// Half-split (kiln) → interleaved (llama2.c) rows: the inverse of [`to_half_split`].
pub fn to_interleaved(w: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        let dst = interleaved_row(r, head_dim);
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    out
}

/// One tensor of every layer, in llama2.c's group order; `rotary` marks q and k, whose rows
/// are permuted between RoPE conventions.
/// Export refuses golf-family models (see `interop::export`) before these are read.
const LLAMA: &str = "a Llama block has norm gains and a gate";

#[derive(Clone, Copy)]
struct Group {
    pick: fn(&LayerParams) -> Region,
    rotary: bool,
}

/// llama2.c's per-layer tensor groups, in file order: attention norm, wq, wk, wv, wo, ffn
/// norm, w1 (gate), w2 (down), w3 (up).
const GROUPS: [Group; 9] = [
    Group {
        pick: |w| w.attn_norm.expect(LLAMA),
        rotary: false,
    },
    Group {
        pick: |w| w.wq,
        rotary: true,
    },
    Group {
        pick: |w| w.wk,
        rotary: true,
    },
    Group {
        pick: |w| w.wv,
        rotary: false,
    },
    Group {
        pick: |w| w.wo,
        rotary: false,
    },
    Group {
        pick: |w| w.ffn_norm.expect(LLAMA),
        rotary: false,
    },
    Group {
        pick: |w| w.w_gate.expect(LLAMA),
        rotary: false,
    },
    Group {
        pick: |w| w.w_down,
        rotary: false,
    },
    Group {
        pick: |w| w.w_up,
        rotary: false,
    },
];

struct Cursor<'a> {
    floats: &'a [f32],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [f32] {
        let s = &self.floats[self.at..self.at + n];
        self.at += n;
        s
    }
}

/// A model read from a llama2.c file: its config and kiln-layout weights.
pub struct Llama2cModel {
    pub config: ModelConfig,
    pub weights: Vec<f32>,
    pub version: u32,
}

/// The model shape from the header's 7 ints. The legacy format marks an untied classifier by a
/// negative vocab_size; v1 stores a flag byte instead (`shared`).
fn config_from_header(
    ints: &[i32],
    shared: Option<bool>,
    path: &Path,
) -> Result<(ModelConfig, bool)> {
    let p = path.display();
    let [dim, hidden, layers, heads, kv_heads, vocab, seq] = ints[..7] else {
        unreachable!()
    };
    for (name, v) in [
        ("dim", dim),
        ("hidden_dim", hidden),
        ("n_layers", layers),
        ("n_heads", heads),
        ("n_kv_heads", kv_heads),
        ("seq_len", seq),
    ] {
        ensure!(
            v > 0 && v < 1 << 24,
            "{p}: header field {name} = {v} is not plausible: not a llama2.c checkpoint"
        );
    }
    ensure!(
        vocab != 0 && vocab.unsigned_abs() < 1 << 24,
        "{p}: header vocab_size = {vocab} is not plausible"
    );
    ensure!(
        dim % heads == 0,
        "{p}: dim {dim} is not a multiple of n_heads {heads}"
    );
    let shared = shared.unwrap_or(vocab > 0);
    let config = ModelConfig {
        dim: dim as usize,
        n_layers: layers as usize,
        n_heads: heads as usize,
        n_kv_heads: kv_heads as usize,
        head_dim: (dim / heads) as usize,
        hidden_dim: hidden as usize,
        vocab_size: vocab.unsigned_abs() as usize,
        max_seq_len: seq as usize,
        // run.c's fixed constants.
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        qk_norm: false,
        tie_embeddings: shared,
        arch: Default::default(),
    };
    config
        .validate()
        .with_context(|| format!("{p}: invalid model shape"))?;
    Ok((config, shared))
}

/// Reads a legacy or v1 llama2.c checkpoint.
pub fn read(path: &Path) -> Result<Llama2cModel> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let p = path.display();
    ensure!(
        bytes.len() >= 28,
        "{p}: {} bytes, too short for a llama2.c header",
        bytes.len()
    );
    let int_at = |i: usize| le_at::<i32>(&bytes, i).unwrap_or(0);
    let (version, header_ints, payload_start) = if le_at::<u32>(&bytes, 0) == Some(MAGIC) {
        let version = int_at(4);
        ensure!(
            version == 1 || version == 2,
            "{p}: llama2.c format version {version} is not supported (kiln reads the legacy \
             format, v1 (f32) and v2 (int8))"
        );
        (
            version as u32,
            (0..7).map(|i| int_at(8 + 4 * i)).collect::<Vec<_>>(),
            256,
        )
    } else {
        (0, (0..7).map(|i| int_at(4 * i)).collect(), 28)
    };
    let flag = if version >= 1 {
        ensure!(
            bytes.len() >= 256,
            "{p}: shorter than the 256-byte v1 header"
        );
        Some(bytes[36] != 0)
    } else {
        None
    };
    let (config, shared) = config_from_header(&header_ints, flag, path)?;
    super::check_fits(&config, bytes.len(), path)?;
    if version == 2 {
        let group = int_at(37);
        return read_int8(&bytes[payload_start..], config, shared, group, path);
    }
    let layout = ParamLayout::new(&config);
    let floats: Vec<f32> = le_floats(&bytes[payload_start..], FloatWidth::F32);
    let (c, f, v, l) = (
        config.dim,
        config.hidden_dim,
        config.vocab_size,
        config.n_layers,
    );
    let (q, kv) = (config.q_dim(), config.kv_dim());
    let rope_tables = if version == 0 {
        config.max_seq_len * config.head_dim
    } else {
        0
    };
    let expected = v * c
        + l * (2 * c + q * c + 2 * kv * c + c * q + 3 * f * c)
        + c
        + rope_tables
        + if shared { 0 } else { v * c };
    ensure!(
        floats.len() == expected && (bytes.len() - payload_start) % 4 == 0,
        "{p}: {} weight values after the header, but the header's shape needs {expected}{}",
        floats.len(),
        if floats.len() < expected {
            " (truncated?)"
        } else {
            ""
        }
    );

    let mut weights = vec![0f32; layout.total_len()];
    let mut cursor = Cursor {
        floats: &floats,
        at: 0,
    };
    let hd = config.head_dim;
    // Each group holds one tensor of every layer, in layer order.
    let read_group = |weights: &mut [f32], cursor: &mut Cursor, group: Group| {
        for layer in &layout.layers {
            let region = (group.pick)(layer);
            let values = cursor.take(region.len);
            let values = if group.rotary {
                to_half_split(values, c, hd)
            } else {
                values.to_vec()
            };
            weights[region.offset..][..region.len].copy_from_slice(&values);
        }
    };
    let put = |weights: &mut [f32], cursor: &mut Cursor, region: Region| {
        weights[region.offset..][..region.len].copy_from_slice(cursor.take(region.len));
    };
    let g = GROUPS;
    if version == 0 {
        put(&mut weights, &mut cursor, layout.embedding);
        for group in g {
            read_group(&mut weights, &mut cursor, group);
        }
        put(&mut weights, &mut cursor, layout.final_norm.expect(LLAMA));
        cursor.take(rope_tables);
    } else {
        read_group(&mut weights, &mut cursor, g[0]);
        read_group(&mut weights, &mut cursor, g[5]);
        put(&mut weights, &mut cursor, layout.final_norm.expect(LLAMA));
        put(&mut weights, &mut cursor, layout.embedding);
        for group in [g[1], g[2], g[3], g[4], g[6], g[7], g[8]] {
            read_group(&mut weights, &mut cursor, group);
        }
    }
    if !shared {
        put(&mut weights, &mut cursor, layout.classifier);
    }
    Ok(Llama2cModel {
        config,
        weights,
        version,
    })
}

/// The v2 payload (int8, groups of `group`) dequantized into kiln's layout.
fn read_int8(
    payload: &[u8],
    config: ModelConfig,
    shared: bool,
    group: i32,
    path: &Path,
) -> Result<Llama2cModel> {
    let p = path.display();
    let layout = ParamLayout::new(&config);
    let (c, hd) = (config.dim, config.head_dim);
    ensure!(
        group > 0
            && c.is_multiple_of(group as usize)
            && config.hidden_dim.is_multiple_of(group as usize),
        "{p}: int8 group size {group} does not divide dim {c} and hidden_dim {}",
        config.hidden_dim
    );
    let group = group as usize;
    // Every value takes at least a byte: a header that promises more is refused before its
    // arena is allocated.
    ensure!(
        layout.total_len() <= payload.len(),
        "{p}: the header describes {} parameters, more than the file's {} bytes hold \
         (truncated?)",
        layout.total_len(),
        payload.len()
    );
    let mut weights = vec![0f32; layout.total_len()];
    let mut at = 0usize;
    let mut take = |n: usize, what: &str| -> Result<&[u8]> {
        let bytes = payload
            .get(at..at + n)
            .with_context(|| format!("{p}: the file ends inside {what} (truncated?)"))?;
        at += n;
        Ok(bytes)
    };
    let mut floats = |weights: &mut [f32], region: Region, what: &str| -> Result<()> {
        let values = le_floats(take(4 * region.len, what)?, FloatWidth::F32);
        weights[region.offset..][..region.len].copy_from_slice(&values);
        Ok(())
    };
    let g = GROUPS;
    for (i, norm) in [g[0], g[5]].into_iter().enumerate() {
        for layer in &layout.layers {
            floats(
                &mut weights,
                (norm.pick)(layer),
                ["an attention norm", "an ffn norm"][i],
            )?;
        }
    }
    floats(
        &mut weights,
        layout.final_norm.expect(LLAMA),
        "the final norm",
    )?;
    let mut int8 = |weights: &mut [f32], region: Region, rotary: bool, what: &str| -> Result<()> {
        let codes = take(region.len, what)?.to_vec();
        let scales = le_floats(take(4 * (region.len / group), what)?, FloatWidth::F32);
        let values: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| q as i8 as f32 * scales[i / group])
            .collect();
        let values = if rotary {
            to_half_split(&values, c, hd)
        } else {
            values
        };
        weights[region.offset..][..region.len].copy_from_slice(&values);
        Ok(())
    };
    int8(&mut weights, layout.embedding, false, "the embedding")?;
    for group in [g[1], g[2], g[3], g[4], g[6], g[7], g[8]] {
        for layer in &layout.layers {
            int8(
                &mut weights,
                (group.pick)(layer),
                group.rotary,
                "a block matrix",
            )?;
        }
    }
    if !shared {
        int8(&mut weights, layout.classifier, false, "the classifier")?;
    }
    ensure!(
        at == payload.len(),
        "{p}: {} bytes after the weights the header's shape needs",
        payload.len() - at
    );
    Ok(Llama2cModel {
        config,
        weights,
        version: 2,
    })
}

/// Whether `run.c` can run this model; the reason if not.
pub fn check_exportable(config: &ModelConfig) -> Result<()> {
    if config.qk_norm {
        bail!("llama2.c has no qk-norm: a model with qk_norm cannot be exported to llama2.c");
    }
    if config.head_dim * config.n_heads != config.dim {
        bail!("llama2.c needs head_dim = dim / n_heads; this model has head_dim {} with dim {} and {} heads", config.head_dim, config.dim, config.n_heads);
    }
    if config.rope_theta != 10000.0 {
        bail!(
            "llama2.c's run.c fixes rope_theta at 10000; this model has rope_theta {}",
            config.rope_theta
        );
    }
    if (config.norm_eps - 1e-5).abs() > 1e-12 {
        bail!(
            "llama2.c's run.c fixes norm_eps at 1e-5; this model has norm_eps {}",
            config.norm_eps
        );
    }
    Ok(())
}

/// Writes the legacy format `run.c` reads. `weights` are in kiln's layout for `config`.
pub fn write_legacy(path: &Path, config: &ModelConfig, weights: &[f32]) -> Result<()> {
    check_exportable(config)?;
    let layout = ParamLayout::new(config);
    let c = config.dim;
    let vocab = config.vocab_size as i32;
    let header = [
        c as i32,
        config.hidden_dim as i32,
        config.n_layers as i32,
        config.n_heads as i32,
        config.n_kv_heads as i32,
        if config.tie_embeddings { vocab } else { -vocab },
        config.max_seq_len as i32,
    ];
    let mut out: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    let mut write = |values: &[f32]| out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    let get = |r: Region| &weights[r.offset..][..r.len];
    write(get(layout.embedding));
    let hd = config.head_dim;
    for group in GROUPS {
        for layer in &layout.layers {
            let values = get((group.pick)(layer));
            if group.rotary {
                write(&to_interleaved(values, c, hd));
            } else {
                write(values);
            }
        }
    }
    write(get(layout.final_norm.expect(LLAMA)));
    // freq_cis_real and freq_cis_imag, as llama2.c's precompute_freqs_cis makes them (run.c
    // skips them and computes RoPE itself).
    let half = hd / 2;
    let mut cos = Vec::with_capacity(config.max_seq_len * half);
    let mut sin = Vec::with_capacity(config.max_seq_len * half);
    for t in 0..config.max_seq_len {
        for i in 0..half {
            let freq = 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32);
            let angle = t as f32 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    write(&cos);
    write(&sin);
    if !config.tie_embeddings {
        write(get(layout.classifier));
    }
    crate::fsutil::write_atomic(path, &out)
}

/// Writes the v2 format `runq.c` reads: the matrices as int8 in groups of 64 (halved until
/// they divide `dim`, `hidden_dim` and the attention width, as export.py does), the norms in
/// f32. `weights` are in kiln's layout for `config`; returns the group size.
pub fn write_int8(path: &Path, config: &ModelConfig, weights: &[f32]) -> Result<usize> {
    check_exportable(config)?;
    let layout = ParamLayout::new(config);
    let c = config.dim;
    let mut group = 64;
    while [c, config.hidden_dim, config.q_dim()]
        .iter()
        .any(|w| w % group != 0)
    {
        group /= 2;
    }
    let ints = [
        c as i32,
        config.hidden_dim as i32,
        config.n_layers as i32,
        config.n_heads as i32,
        config.n_kv_heads as i32,
        config.vocab_size as i32,
        config.max_seq_len as i32,
    ];
    let mut out: Vec<u8> = MAGIC.to_le_bytes().to_vec();
    out.extend(2i32.to_le_bytes());
    out.extend(ints.iter().flat_map(|h| h.to_le_bytes()));
    out.push(config.tie_embeddings as u8);
    out.extend((group as i32).to_le_bytes());
    out.resize(256, 0);
    let get = |r: Region| &weights[r.offset..][..r.len];
    let floats = |out: &mut Vec<u8>, values: &[f32]| {
        out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    };
    let g = GROUPS;
    for norm in [g[0], g[5]] {
        for layer in &layout.layers {
            floats(&mut out, get((norm.pick)(layer)));
        }
    }
    floats(&mut out, get(layout.final_norm.expect(LLAMA)));
    let int8 = |out: &mut Vec<u8>, values: &[f32]| {
        let (codes, scales) = kiln_core::quant::quantize_groups(values, group);
        out.extend(codes.iter().map(|&q| q as u8));
        out.extend(scales.iter().flat_map(|x| x.to_le_bytes()));
    };
    int8(&mut out, get(layout.embedding));
    let hd = config.head_dim;
    for group in [g[1], g[2], g[3], g[4], g[6], g[7], g[8]] {
        for layer in &layout.layers {
            let values = get((group.pick)(layer));
            if group.rotary {
                int8(&mut out, &to_interleaved(values, c, hd));
            } else {
                int8(&mut out, values);
            }
        }
    }
    if !config.tie_embeddings {
        int8(&mut out, get(layout.classifier));
    }
    crate::fsutil::write_atomic(path, &out)?;
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutations_are_inverse_and_match_huggingface() {
        // Hugging Face's permute: view(heads, D/2, 2, C).transpose(1, 2): interleaved row
        // 2i + j of a head becomes half-split row j·D/2 + i.
        let (cols, head_dim) = (1, 4);
        let interleaved: Vec<f32> = (0..8).map(|x| x as f32).collect(); // 2 heads
        let half = to_half_split(&interleaved, cols, head_dim);
        assert_eq!(half, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(to_interleaved(&half, cols, head_dim), interleaved);
    }
}
