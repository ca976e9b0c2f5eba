//! GGUF (version 3), the file llama.cpp and the tools built on it load: a Llama-shaped model
//! with llama2.c's tokenizer in its metadata (`kiln export --format gguf [--quantize
//! bf16|q8_0]`), and read back ([`read`]: llama-architecture files with f32, f16, bf16 or
//! Q8_0 tensors, from kiln or elsewhere; the tokenizer comes from beside the file).
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

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use kiln_core::config::ModelConfig;
use kiln_core::layout::{ParamLayout, Region};

use super::llama2c::{check_exportable, to_half_split, to_interleaved};
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

/// The vocabulary a GGUF file carries, in llama.cpp's terms.
#[derive(Clone, Debug)]
pub enum Vocab {
    /// llama2.c's `tokenizer.bin` (SentencePiece): pieces (a space where SentencePiece writes
    /// "▁") and scores, in id order; ids 0, 1 and 2 unknown, BOS and EOS.
    SentencePiece(Vec<(Vec<u8>, f32)>),
    /// A byte-level BPE `tokenizer.json` (GPT-2's pre-tokenizer, as kiln trains them):
    /// tokens in id order, merges as "a b", the special tokens' ids, and the document token
    /// that starts and ends a text.
    Bpe {
        tokens: Vec<String>,
        merges: Vec<String>,
        special: Vec<u32>,
        bos: u32,
    },
}

impl Vocab {
    fn len(&self) -> usize {
        match self {
            Vocab::SentencePiece(pieces) => pieces.len(),
            Vocab::Bpe { tokens, .. } => tokens.len(),
        }
    }
}

/// The vocabulary GGUF export writes for `tokenizer`: llama2.c's SentencePiece, or a
/// byte-level BPE `tokenizer.json`; others are refused by name.
pub fn vocab(tokenizer: &Tokenizer) -> Result<Vocab> {
    let json = match tokenizer {
        Tokenizer::Llama2c { vocab, .. } => {
            return Ok(Vocab::SentencePiece(
                vocab.entries().map(|(p, s)| (p.to_vec(), s)).collect(),
            ))
        }
        Tokenizer::Hf { .. } => String::from_utf8(tokenizer.to_bytes())?,
    };
    let value: serde_json::Value = serde_json::from_str(&json)?;
    let model = &value["model"];
    let byte_level = value["pre_tokenizer"].to_string().contains("ByteLevel");
    if model["type"] != "BPE" || !byte_level {
        bail!(
            "GGUF export writes llama2.c's SentencePiece or a byte-level BPE tokenizer.json; \
             this tokenizer.json is a {} model{}",
            model["type"],
            if byte_level {
                ""
            } else {
                " without the byte-level pre-tokenizer"
            }
        );
    }
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut put = |id: usize, text: &str| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(text.to_string());
    };
    for (text, id) in model["vocab"]
        .as_object()
        .context("tokenizer.json: no model.vocab")?
    {
        put(
            id.as_u64().context("tokenizer.json: a vocab id")? as usize,
            text,
        );
    }
    let mut special = Vec::new();
    for added in value["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        put(id as usize, text);
        if added["special"] == true {
            special.push(id as u32);
        }
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.with_context(|| format!("tokenizer.json: no token {id}")))
        .collect::<Result<Vec<_>>>()?;
    let merges = model["merges"]
        .as_array()
        .context("tokenizer.json: no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            _ => bail!("tokenizer.json: a merge is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<Vec<_>>>()?;
    let bos = tokenizer
        .bos()
        .context("a BPE tokenizer.json without a document token (<|endoftext|>, <s>)")?;
    Ok(Vocab::Bpe {
        tokens,
        merges,
        special,
        bos,
    })
}

/// Writes `weights` (kiln's layout for `config`) as a GGUF file with `vocab` in its metadata.
pub fn write(
    path: &Path,
    config: &ModelConfig,
    weights: &[f32],
    vocab: &Vocab,
    kind: GgufType,
) -> Result<()> {
    check_exportable(config)?;
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
    write_vocab(&mut w, vocab);
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

/// The tokenizer metadata: llama.cpp's `llama` (SentencePiece) or `gpt2` (byte-level BPE)
/// vocabulary, with token types 1 normal, 2 unknown, 3 control, 6 byte.
fn write_vocab(w: &mut Writer, vocab: &Vocab) {
    let strings = |items: &mut dyn Iterator<Item = String>| {
        let mut out = Vec::new();
        let mut n = 0;
        for item in items {
            string(&mut out, &item);
            n += 1;
        }
        (n, out)
    };
    let ints =
        |values: &[i32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    match vocab {
        Vocab::SentencePiece(pieces) => {
            w.string("tokenizer.ggml.model", "llama");
            let texts: Vec<String> = pieces
                .iter()
                .map(|(p, _)| String::from_utf8_lossy(p).replace(' ', "\u{2581}"))
                .collect();
            let types: Vec<i32> = texts
                .iter()
                .enumerate()
                .map(|(id, t)| match id {
                    0 => 2,
                    1 | 2 => 3,
                    _ if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') => 6,
                    _ => 1,
                })
                .collect();
            let (n, tokens) = strings(&mut texts.into_iter());
            w.array("tokenizer.ggml.tokens", 8, n, &tokens);
            let scores: Vec<u8> = pieces.iter().flat_map(|(_, s)| s.to_le_bytes()).collect();
            w.array("tokenizer.ggml.scores", 6, n, &scores);
            w.array("tokenizer.ggml.token_type", 5, n, &ints(&types));
            w.u32("tokenizer.ggml.bos_token_id", 1);
            w.u32("tokenizer.ggml.eos_token_id", 2);
            w.u32("tokenizer.ggml.unknown_token_id", 0);
        }
        Vocab::Bpe {
            tokens,
            merges,
            special,
            bos,
        } => {
            w.string("tokenizer.ggml.model", "gpt2");
            w.string("tokenizer.ggml.pre", "gpt-2");
            let types: Vec<i32> = (0..tokens.len() as u32)
                .map(|id| if special.contains(&id) { 3 } else { 1 })
                .collect();
            let (n, bytes) = strings(&mut tokens.iter().cloned());
            w.array("tokenizer.ggml.tokens", 8, n, &bytes);
            w.array("tokenizer.ggml.token_type", 5, n, &ints(&types));
            let (m, bytes) = strings(&mut merges.iter().cloned());
            w.array("tokenizer.ggml.merges", 8, m, &bytes);
            // kiln starts a prompt with the document token and stops at it.
            w.u32("tokenizer.ggml.bos_token_id", *bos);
            w.u32("tokenizer.ggml.eos_token_id", *bos);
            w.key("tokenizer.ggml.add_bos_token", 7);
            w.metadata.push(1);
        }
    }
}

/// A metadata value kiln reads (others are skipped).
#[derive(Clone, Debug)]
enum Value {
    Int(u64),
    Float(f64),
    Text(String),
    Other,
}

/// A cursor over the file's bytes; running off the end is an error naming the file.
struct Bytes<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "{}: the file ends at byte {} inside its header (truncated?)",
                self.path.display(),
                self.bytes.len()
            );
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        ensure!(
            len < 1 << 30,
            "{}: a string of {len} bytes in the header: not a GGUF file kiln can read",
            self.path.display()
        );
        Ok(String::from_utf8_lossy(self.take(len as usize)?).into_owned())
    }
    /// A value of GGUF type `kind` (arrays skipped).
    fn value(&mut self, kind: u32) -> Result<Value> {
        let size = |k: u32| match k {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        Ok(match kind {
            0 | 2 | 4 | 10 => {
                let b = self.take(size(kind).expect("sized"))?;
                let mut v = [0u8; 8];
                v[..b.len()].copy_from_slice(b);
                Value::Int(u64::from_le_bytes(v))
            }
            1 | 3 | 5 | 11 | 7 => {
                let b = self.take(size(kind).expect("sized"))?;
                Value::Int(match b.len() {
                    1 => b[0] as i8 as i64,
                    2 => i16::from_le_bytes([b[0], b[1]]) as i64,
                    4 => i32::from_le_bytes(b.try_into().expect("4")) as i64,
                    _ => i64::from_le_bytes(b.try_into().expect("8")),
                } as u64)
            }
            // An f32 read as the shortest decimal that gives it back (1e-5, not
            // 9.99999974e-6), as the value that was written.
            6 => {
                let v = f32::from_le_bytes(self.take(4)?.try_into().expect("4"));
                Value::Float(v.to_string().parse().unwrap_or(v as f64))
            }
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            8 => Value::Text(self.string()?),
            9 => {
                let (elem, count) = (self.u32()?, self.u64()?);
                for _ in 0..count {
                    self.value(elem)?;
                }
                Value::Other
            }
            other => bail!(
                "{}: metadata value type {other} is not GGUF's",
                self.path.display()
            ),
        })
    }
}

/// One tensor's entry: dimensions innermost first, ggml type, offset in the data section.
struct TensorInfo {
    dims: Vec<usize>,
    kind: u32,
    offset: usize,
}

/// A GGUF file's model, in kiln's layout.
pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: Vec<f32>,
    /// `general.file_type`'s tensor type, for messages.
    pub file_type: String,
}

/// Reads a llama-architecture GGUF file (version 2 or 3) with f32, f16, bf16 or Q8_0 tensors.
pub fn read(path: &Path) -> Result<GgufModel> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {p}"))?;
    let mut b = Bytes {
        bytes: &bytes,
        at: 0,
        path,
    };
    ensure!(b.take(4)? == b"GGUF", "{p}: not a GGUF file (bad magic)");
    let version = b.u32()?;
    ensure!(
        version == 2 || version == 3,
        "{p}: GGUF version {version}; kiln reads versions 2 and 3"
    );
    let (tensors, entries) = (b.u64()?, b.u64()?);
    ensure!(
        tensors < 1 << 20 && entries < 1 << 20,
        "{p}: {tensors} tensors and {entries} metadata entries: not a GGUF file kiln can read"
    );
    let mut meta = HashMap::new();
    for _ in 0..entries {
        let key = b.string()?;
        let kind = b.u32()?;
        meta.insert(key, b.value(kind)?);
    }
    let mut infos = HashMap::new();
    for _ in 0..tensors {
        let name = b.string()?;
        let n = b.u32()? as usize;
        ensure!(n <= 4, "{p}: tensor '{name}' has {n} dimensions");
        let dims = (0..n)
            .map(|_| b.u64().map(|d| d as usize))
            .collect::<Result<_>>()?;
        let (kind, offset) = (b.u32()?, b.u64()? as usize);
        infos.insert(name, TensorInfo { dims, kind, offset });
    }
    let int = |key: &str| -> Result<usize> {
        match meta.get(key) {
            Some(Value::Int(v)) => Ok(*v as usize),
            _ => bail!("{p}: no integer '{key}' in the metadata"),
        }
    };
    let float = |key: &str, default: f64| match meta.get(key) {
        Some(Value::Float(v)) => *v,
        _ => default,
    };
    match meta.get("general.architecture") {
        Some(Value::Text(a)) if a == "llama" => {}
        Some(Value::Text(a)) => bail!("{p}: architecture '{a}'; kiln reads llama GGUF files"),
        _ => bail!("{p}: no general.architecture in the metadata"),
    }
    let alignment = match meta.get("general.alignment") {
        Some(Value::Int(a)) if *a > 0 => *a as usize,
        _ => ALIGNMENT,
    };
    let data = b.at.next_multiple_of(alignment);
    let (dim, heads) = (
        int("llama.embedding_length")?,
        int("llama.attention.head_count")?,
    );
    let embedding = infos
        .get("token_embd.weight")
        .with_context(|| format!("{p}: no token_embd.weight"))?;
    ensure!(
        embedding.dims.len() == 2 && embedding.dims[0] == dim,
        "{p}: token_embd.weight is {:?}, not (dim {dim}, vocab)",
        embedding.dims
    );
    ensure!(
        heads > 0 && dim.is_multiple_of(heads),
        "{p}: dim {dim} and {heads} heads"
    );
    let config = ModelConfig {
        dim,
        n_layers: int("llama.block_count")?,
        n_heads: heads,
        n_kv_heads: int("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: dim / heads,
        hidden_dim: int("llama.feed_forward_length")?,
        vocab_size: embedding.dims[1],
        max_seq_len: int("llama.context_length")?,
        rope_theta: float("llama.rope.freq_base", 10000.0),
        norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        qk_norm: false,
        tie_embeddings: !infos.contains_key("output.weight"),
        arch: Default::default(),
    };
    config
        .validate()
        .with_context(|| format!("{p}: invalid model shape"))?;
    super::check_fits(&config, bytes.len(), path)?;
    if let Ok(rope) = int("llama.rope.dimension_count") {
        ensure!(
            rope == config.head_dim,
            "{p}: RoPE over {rope} of {} head dimensions; kiln rotates them all",
            config.head_dim
        );
    }
    let layout = ParamLayout::new(&config);
    // Every value takes at least a byte in the file: a header that promises more is refused
    // before its arena is allocated.
    ensure!(
        layout.total_len() <= bytes.len(),
        "{p}: the header describes {} parameters, more than the file's {} bytes hold",
        layout.total_len(),
        bytes.len()
    );
    let mut weights = vec![0f32; layout.total_len()];
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let info = infos
            .get(name)
            .with_context(|| format!("{p}: no tensor '{name}'"))?;
        let want: Vec<usize> = shape.iter().rev().copied().collect();
        ensure!(
            info.dims == want,
            "{p}: tensor '{name}' is {:?} (innermost first), the model needs {want:?}",
            info.dims
        );
        let n: usize = shape.iter().product();
        let size = match info.kind {
            0 => 4 * n,
            1 | 30 => 2 * n,
            8 if n.is_multiple_of(32) => n / 32 * 34,
            8 => bail!("{p}: Q8_0 tensor '{name}' of {n} values is not whole blocks"),
            other => bail!(
                "{p}: tensor '{name}' has ggml type {other}; kiln reads f32, f16, bf16 and Q8_0"
            ),
        };
        let start = data + info.offset;
        let raw = bytes
            .get(start..start + size)
            .with_context(|| format!("{p}: tensor '{name}' runs past the end (truncated?)"))?;
        let two = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
        Ok(match info.kind {
            0 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
            1 => raw
                .chunks_exact(2)
                .map(|c| f16::from_bits(two(c)).to_f32())
                .collect(),
            30 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((two(c) as u32) << 16))
                .collect(),
            _ => raw
                .chunks_exact(34)
                .flat_map(|block| {
                    let d = f16::from_bits(two(block)).to_f32();
                    block[2..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect(),
        })
    };
    let c = &config;
    let mut put =
        |r: Region, values: Vec<f32>| weights[r.offset..][..r.len].copy_from_slice(&values);
    put(
        layout.embedding,
        tensor("token_embd.weight", &[c.vocab_size, dim])?,
    );
    const LLAMA: &str = "a Llama block has norm gains and a gate";
    for (i, l) in layout.layers.iter().enumerate() {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        put(
            l.attn_norm.expect(LLAMA),
            tensor(&name("attn_norm"), &[dim])?,
        );
        let q = tensor(&name("attn_q"), &[c.q_dim(), dim])?;
        put(l.wq, to_half_split(&q, dim, c.head_dim));
        let k = tensor(&name("attn_k"), &[c.kv_dim(), dim])?;
        put(l.wk, to_half_split(&k, dim, c.head_dim));
        put(l.wv, tensor(&name("attn_v"), &[c.kv_dim(), dim])?);
        put(l.wo, tensor(&name("attn_output"), &[dim, c.q_dim()])?);
        put(l.ffn_norm.expect(LLAMA), tensor(&name("ffn_norm"), &[dim])?);
        put(
            l.w_gate.expect(LLAMA),
            tensor(&name("ffn_gate"), &[c.hidden_dim, dim])?,
        );
        put(l.w_up, tensor(&name("ffn_up"), &[c.hidden_dim, dim])?);
        put(l.w_down, tensor(&name("ffn_down"), &[dim, c.hidden_dim])?);
    }
    put(
        layout.final_norm.expect(LLAMA),
        tensor("output_norm.weight", &[dim])?,
    );
    if !c.tie_embeddings {
        put(
            layout.classifier,
            tensor("output.weight", &[c.vocab_size, dim])?,
        );
    }
    let file_type = match meta.get("general.file_type") {
        Some(Value::Int(0)) => "f32",
        Some(Value::Int(1)) => "f16",
        Some(Value::Int(7)) => "Q8_0",
        Some(Value::Int(32)) => "bf16",
        _ => "mixed",
    };
    Ok(GgufModel {
        config,
        weights,
        file_type: file_type.into(),
    })
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

    /// A byte-level BPE as kiln trains it becomes llama.cpp's `gpt2` vocabulary: every token
    /// in id order (its own bytes in GPT-2's byte alphabet), every merge as "a b", the
    /// document token special and the BOS; a llama2.c tokenizer stays SentencePiece.
    #[test]
    fn bpe_vocabulary_for_gguf() {
        let text = "the quick brown fox jumps over the lazy dog; the dog sleeps. ".repeat(50);
        let tokenizer = Tokenizer::train_bpe([text.as_str()].into_iter(), 300).unwrap();
        let Vocab::Bpe {
            tokens,
            merges,
            special,
            bos,
        } = vocab(&tokenizer).unwrap()
        else {
            panic!("a byte-level BPE");
        };
        assert_eq!(tokens.len(), tokenizer.vocab_size());
        assert_eq!(tokens[bos as usize], "<|endoftext|>");
        assert_eq!(special, vec![bos]);
        assert!(tokens.iter().any(|t| t == "Ġthe"), "GPT-2's byte alphabet");
        assert!(!merges.is_empty() && merges.iter().all(|m| m.split(' ').count() == 2));
        // Every merge's result is a token.
        for m in &merges {
            assert!(tokens.contains(&m.replace(' ', "")), "merge {m}");
        }
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
