//! GGUF (version 3), the file llama.cpp and the tools built on it load: a Llama-shaped model
//! with llama2.c's tokenizer in its metadata (`kiln export --format gguf [--quantize
//! bf16|q8_0]`).
//!
//! Layout (ggml's `docs/gguf.md`): magic "GGUF", u32 version 3, u64 tensor count, u64
//! metadata count; each metadata entry a string key, a u32 value type and the value; each
//! tensor's name, u32 dimension count, u64 dimensions innermost first, u32 ggml type and u64
//! offset into the data section; the data section starts at the next multiple of 32 bytes,
//! and each tensor within it too. Strings are a u64 length and UTF-8 bytes.
//!
//! Tensor names and metadata keys are llama.cpp's `llama` architecture's; q and k rows are
//! permuted back to the interleaved RoPE pairing, as its `convert_hf_to_gguf.py` does. The
//! norms stay f32 (llama.cpp requires it); the matrices are f32, bf16 (rounded to nearest
//! even, as `ggml_fp32_to_bf16`) or Q8_0 (blocks of 32 along a row: an f16 scale
//! max|x|/127 and 32 codes round(x · 127/max|x|), as ggml's `quantize_row_q8_0_ref`).

use std::path::Path;

use anyhow::{ensure, Result};
use half::f16;

use kiln_core::config::ModelConfig;
use kiln_core::layout::{ParamLayout, Region};

use super::llama2c::{check_exportable, to_interleaved};
use crate::tokenizer::Tokenizer;

const ALIGNMENT: usize = 32;

/// The matrices' ggml type in a GGUF export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    Bf16,
    Q8_0,
}

impl GgufType {
    /// ggml's type id.
    fn id(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::Q8_0 => 8,
            GgufType::Bf16 => 30,
        }
    }

    /// llama.cpp's `general.file_type` (ALL_F32, MOSTLY_Q8_0, MOSTLY_BF16).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::Q8_0 => 7,
            GgufType::Bf16 => 32,
        }
    }

    /// `values` (rows of `cols`) in this type's bytes.
    fn encode(self, values: &[f32], cols: usize) -> Vec<u8> {
        match self {
            GgufType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            GgufType::Bf16 => values
                .iter()
                .flat_map(|&x| bf16_bits(x).to_le_bytes())
                .collect(),
            GgufType::Q8_0 => {
                assert!(cols.is_multiple_of(32), "Q8_0 rows of {cols}");
                let mut out = Vec::with_capacity(values.len() / 32 * 34);
                for block in values.chunks_exact(32) {
                    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = max / 127.0;
                    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                    out.extend(block.iter().map(|&x| (x * inverse).round() as i8 as u8));
                }
                out
            }
        }
    }
}

/// f32 to bf16 bits, rounded to nearest even (NaN kept quiet), as ggml's.
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// A GGUF file being assembled.
#[derive(Default)]
struct Writer {
    metadata: Vec<u8>,
    entries: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    tensors: u64,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    fn key(&mut self, key: &str, kind: u32) {
        string(&mut self.metadata, key);
        self.metadata.extend(kind.to_le_bytes());
        self.entries += 1;
    }
    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.metadata.extend(v.to_le_bytes());
    }
    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, 6);
        self.metadata.extend(v.to_le_bytes());
    }
    fn string(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        string(&mut self.metadata, v);
    }
    /// An array of `count` elements of type `kind`, already encoded in `values`.
    fn array(&mut self, key: &str, kind: u32, count: usize, values: &[u8]) {
        self.key(key, 9);
        self.metadata.extend(kind.to_le_bytes());
        self.metadata.extend((count as u64).to_le_bytes());
        self.metadata.extend(values);
    }
    /// A tensor of `shape` (outermost first, as kiln's) in `kind`.
    fn tensor(&mut self, name: &str, shape: &[usize], kind: GgufType, values: &[f32]) {
        string(&mut self.infos, name);
        self.infos.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            self.infos.extend((d as u64).to_le_bytes());
        }
        self.infos.extend(kind.id().to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        let cols = *shape.last().expect("a shape");
        self.data.extend(kind.encode(values, cols));
        self.data
            .resize(self.data.len().next_multiple_of(ALIGNMENT), 0);
        self.tensors += 1;
    }
    fn finish(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensors.to_le_bytes());
        out.extend(self.entries.to_le_bytes());
        out.extend(self.metadata);
        out.extend(self.infos);
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        out.extend(self.data);
        out
    }
}

/// Writes `weights` (kiln's layout for `config`) as a GGUF file with llama2.c's tokenizer
/// (`tokenizer.bin`, SentencePiece pieces and scores) in its metadata.
pub fn write(
    path: &Path,
    config: &ModelConfig,
    weights: &[f32],
    tokenizer: &Tokenizer,
    kind: GgufType,
) -> Result<()> {
    check_exportable(config)?;
    let Tokenizer::Llama2c { vocab, .. } = tokenizer else {
        anyhow::bail!(
            "GGUF export writes llama2.c's tokenizer.bin (SentencePiece) into the file: export \
             a model trained with a llama2.c tokenizer.bin"
        );
    };
    ensure!(
        vocab.len() == config.vocab_size,
        "the tokenizer has {} tokens, the model {}",
        vocab.len(),
        config.vocab_size
    );
    if kind == GgufType::Q8_0 {
        ensure!(
            config.dim.is_multiple_of(32) && config.hidden_dim.is_multiple_of(32),
            "Q8_0 needs rows that divide into blocks of 32 (dim {}, hidden_dim {})",
            config.dim,
            config.hidden_dim
        );
    }
    let mut w = Writer::default();
    let c = config;
    w.string("general.architecture", "llama");
    w.string("general.name", "kiln");
    w.u32("general.alignment", ALIGNMENT as u32);
    w.u32("general.file_type", kind.file_type());
    w.u32("llama.context_length", c.max_seq_len as u32);
    w.u32("llama.embedding_length", c.dim as u32);
    w.u32("llama.block_count", c.n_layers as u32);
    w.u32("llama.feed_forward_length", c.hidden_dim as u32);
    w.u32("llama.rope.dimension_count", c.head_dim as u32);
    w.u32("llama.attention.head_count", c.n_heads as u32);
    w.u32("llama.attention.head_count_kv", c.n_kv_heads as u32);
    w.f32("llama.attention.layer_norm_rms_epsilon", c.norm_eps as f32);
    w.f32("llama.rope.freq_base", c.rope_theta as f32);
    w.u32("llama.vocab_size", c.vocab_size as u32);
    // SentencePiece's vocabulary as llama.cpp's `llama` tokenizer reads it: pieces with
    // "▁" for the space tokenizer.bin stores, scores, and types (1 normal, 2 unknown,
    // 3 control, 6 byte).
    w.string("tokenizer.ggml.model", "llama");
    let mut tokens = Vec::new();
    let mut scores = Vec::new();
    let mut types = Vec::new();
    for (id, (piece, score)) in vocab.entries().enumerate() {
        let text = String::from_utf8_lossy(piece).replace(' ', "\u{2581}");
        string(&mut tokens, &text);
        scores.extend(score.to_le_bytes());
        let byte = text.len() == 6 && text.starts_with("<0x") && text.ends_with('>');
        let kind: i32 = match id {
            0 => 2,
            1 | 2 => 3,
            _ if byte => 6,
            _ => 1,
        };
        types.extend(kind.to_le_bytes());
    }
    let n = vocab.len();
    w.array("tokenizer.ggml.tokens", 8, n, &tokens);
    w.array("tokenizer.ggml.scores", 6, n, &scores);
    w.array("tokenizer.ggml.token_type", 5, n, &types);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.u32("tokenizer.ggml.unknown_token_id", 0);

    let layout = ParamLayout::new(c);
    let get = |r: Region| &weights[r.offset..][..r.len];
    let (dim, hd) = (c.dim, c.head_dim);
    let matrix = |w: &mut Writer, name: &str, r: Region, rows: usize, cols: usize| {
        w.tensor(name, &[rows, cols], kind, get(r));
    };
    w.tensor(
        "token_embd.weight",
        &[c.vocab_size, dim],
        kind,
        get(layout.embedding),
    );
    const LLAMA: &str = "a Llama block has norm gains and a gate";
    for (i, l) in layout.layers.iter().enumerate() {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        let norm = l.attn_norm.expect(LLAMA);
        w.tensor(&name("attn_norm"), &[dim], GgufType::F32, get(norm));
        let q = to_interleaved(get(l.wq), dim, hd);
        w.tensor(&name("attn_q"), &[c.q_dim(), dim], kind, &q);
        let k = to_interleaved(get(l.wk), dim, hd);
        w.tensor(&name("attn_k"), &[c.kv_dim(), dim], kind, &k);
        matrix(&mut w, &name("attn_v"), l.wv, c.kv_dim(), dim);
        matrix(&mut w, &name("attn_output"), l.wo, dim, c.q_dim());
        let norm = l.ffn_norm.expect(LLAMA);
        w.tensor(&name("ffn_norm"), &[dim], GgufType::F32, get(norm));
        let gate = l.w_gate.expect(LLAMA);
        matrix(&mut w, &name("ffn_gate"), gate, c.hidden_dim, dim);
        matrix(&mut w, &name("ffn_up"), l.w_up, c.hidden_dim, dim);
        matrix(&mut w, &name("ffn_down"), l.w_down, dim, c.hidden_dim);
    }
    let norm = layout.final_norm.expect(LLAMA);
    w.tensor("output_norm.weight", &[dim], GgufType::F32, get(norm));
    if !c.tie_embeddings {
        matrix(
            &mut w,
            "output.weight",
            layout.classifier,
            c.vocab_size,
            dim,
        );
    }
    crate::fsutil::write_atomic(path, &w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16: round to nearest, ties to even, as ggml (values chosen by hand from the bits).
    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 0x3f80 and 0x3f81: even wins.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 0x3f81 + half: up to the even 0x3f82.
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
    }

    /// Q8_0: one block by hand: max |x| = 2.54, d = 0.02 (stored as f16), codes x / d.
    #[test]
    fn q8_0_block_by_hand() {
        let mut x = [0f32; 32];
        x[0] = 2.54;
        x[1] = -1.27;
        x[2] = 0.01; // 0.5 code: rounds away from zero, as roundf
        x[3] = 0.02;
        let bytes = GgufType::Q8_0.encode(&x, 32);
        assert_eq!(bytes.len(), 34);
        let d = f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32();
        assert!((d - 0.02).abs() < 1e-5, "{d}");
        let codes: Vec<i8> = bytes[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(&codes[..5], &[127, -64, 1, 1, 0]);
    }
}
