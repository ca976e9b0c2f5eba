//! Import and export against fixtures written by `scripts/make_hf_fixtures.py` (transformers)
//! and `scripts/make_llama2c_v2_fixture.py` (llama2.c's int8 export in PyTorch): imported
//! models must give transformers' logits, and export → import must be bit-exact (int8: the
//! file export.py writes, and the values it stands for).

use std::fs;
use std::path::{Path, PathBuf};

use kiln_conformance::assert_close;
use kiln_core::backend::Tolerance;
use kiln_core::bytes::le_values;
use kiln_core::model::Model;
use kiln_core::vocab::VocabMap;
use kiln_formats::interop::{self, ExportFormat, Quantize};
use kiln_reference::ReferenceBackend;

/// A Hugging Face directory or llama2.c file, as the formats crate reads it.
fn import(path: &Path) -> anyhow::Result<interop::Imported> {
    interop::import(path, None, &[])
}

/// Reads `source` and writes it as `format` into `out`.
fn export(source: &Path, format: ExportFormat, out: &Path) -> anyhow::Result<PathBuf> {
    interop::export(&import(source)?, format, out)
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-interop-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// transformers' logits for the fixture's input ids, and kiln's for the imported model.
fn logits_match(model_path: &Path, expected_dir: &Path) {
    let imported = import(model_path).unwrap();
    // expected.safetensors: input_ids (1, T) int64 and logits (T, V) f32 from transformers.
    let bytes = fs::read(expected_dir.join("expected.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = le_values::<i64>(tensors.tensor("input_ids").unwrap().data())
        .into_iter()
        .map(|id| id as u32)
        .collect();
    let want: Vec<f64> = le_values::<f32>(tensors.tensor("logits").unwrap().data())
        .into_iter()
        .map(f64::from)
        .collect();
    let model = Model::new(ReferenceBackend, imported.config.clone()).unwrap();
    model.upload_params(&imported.weights).unwrap();
    let acts = model.activations(1, ids.len()).unwrap();
    model.forward(&acts, &ids, None).unwrap();
    // Both sides compute in f32 with different summation orders over ~100-term dot products;
    // logits are O(10).
    let tol = Tolerance {
        atol: 1e-4,
        rtol: 1e-4,
    };
    assert_close(
        &format!("{} logits", model_path.display()),
        &model.download_logits(&acts).unwrap(),
        &want,
        tol,
    )
    .unwrap();
}

#[test]
fn hugging_face_llama_and_qwen3_give_transformers_logits() {
    for name in ["llama", "llama-bf16", "qwen3"] {
        logits_match(&fixtures().join(name), &fixtures().join(name));
    }
    let qwen = import(&fixtures().join("qwen3")).unwrap();
    assert!(qwen.config.qk_norm && qwen.config.tie_embeddings && qwen.config.head_dim == 16);
    assert_eq!(qwen.config.rope_theta, 1e6);
    assert!(qwen.tokenizer.is_some(), "tokenizer.json must come along");
}

#[test]
fn llama2c_legacy_and_v1_checkpoints_give_the_same_logits() {
    let dir = fixtures().join("llama2c");
    logits_match(&dir.join("model_legacy.bin"), &dir);
    logits_match(&dir.join("model_v1.bin"), &dir);
}

/// llama2.c's v2 file (int8 in groups, what `runq.c` runs): kiln's export of the fixture model
/// is byte for byte the file export.py's `version2_export` writes (the fixture, made in
/// PyTorch); reading it back gives each value within half a quantization step of the f32
/// original (max |w| / 254 over its group of 32, the fixture's group: dim is 32), and reading
/// the fixture gives the same weights as reading kiln's file.
#[test]
fn llama2c_int8_export_is_export_py_file_and_reads_back() {
    let dir = temp_dir("int8");
    let source = fixtures().join("llama2c/model_legacy.bin");
    let original = import(&source).unwrap();
    let path =
        interop::export_quantized(&original, ExportFormat::Llama2c, Some(Quantize::Int8), &dir)
            .unwrap();
    let fixture = fixtures().join("llama2c/model_v2.bin");
    assert!(
        fs::read(&path).unwrap() == fs::read(&fixture).unwrap(),
        "kiln's v2 file differs from export.py's"
    );
    let back = import(&path).unwrap();
    assert_eq!(back.config, original.config);
    assert_eq!(back.weights, import(&fixture).unwrap().weights);
    // Half a step of each group of 32 (with f32 rounding of the scale's product).
    assert_within_blocks(&original, &back, |max| max / 254.0 * (1.0 + 1e-6), "v2");
    // A v2 file cut short, or with a group that does not divide the rows, is refused by name.
    let bytes = fs::read(&fixture).unwrap();
    let cut = dir.join("cut.bin");
    fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = format!("{:#}", import(&cut).err().unwrap());
    assert!(
        err.contains("cut.bin") && err.contains("truncated"),
        "{err}"
    );
    let mut bad = bytes.clone();
    bad[37..41].copy_from_slice(&24i32.to_le_bytes());
    fs::write(&cut, &bad).unwrap();
    let err = format!("{:#}", import(&cut).err().unwrap());
    assert!(err.contains("group size 24"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

/// GGUF: files written by llama.cpp's own Python package (`scripts/make_gguf_fixture.py`,
/// gguf-py) read into the transformers fixture model: f32 gives transformers' logits (as
/// the llama2.c files do) and the llama2.c file's weights bit for bit; Q8_0 gives each value
/// within half a step of its block of 32 (max|w|/254) plus the f16 scale's rounding
/// (max|w|·2⁻¹¹). kiln's own exports read back the same: f32 bit for bit, Q8_0 exactly what
/// gguf-py's quantizer wrote, bf16 within bf16 rounding (2⁻⁸ relative: 8 significant bits).
#[test]
fn gguf_files_read_back_and_kiln_writes_what_gguf_py_writes() {
    let dir = fixtures().join("llama2c");
    logits_match(&dir.join("model_f32.gguf"), &dir);
    let original = import(&dir.join("model_legacy.bin")).unwrap();
    let f32_file = import(&dir.join("model_f32.gguf")).unwrap();
    assert_eq!(f32_file.config, original.config);
    assert_eq!(f32_file.weights, original.weights);
    let q8 = import(&dir.join("model_q8_0.gguf")).unwrap();
    // Half a step of each block of 32, plus the f16 scale's rounding.
    assert_within_blocks(&original, &q8, |max| max / 254.0 + max / 2048.0, "Q8_0");
    // kiln's writer, with a vocabulary of the model's 96 tokens in the metadata.
    let out = temp_dir("gguf");
    fs::create_dir_all(&out).unwrap();
    let vocab: Vec<(Vec<u8>, f32)> = (0..original.config.vocab_size)
        .map(|id| (format!(" t{id}").into_bytes(), -(id as f32)))
        .collect();
    use kiln_formats::interop::gguf::{write, GgufType, Vocab};
    let (c, w) = (&original.config, &original.weights);
    for (kind, name) in [
        (GgufType::F32, "f32"),
        (GgufType::Q8_0, "q8_0"),
        (GgufType::Bf16, "bf16"),
    ] {
        let path = out.join(format!("kiln-{name}.gguf"));
        write(&path, c, w, &Vocab::SentencePiece(vocab.clone()), kind).unwrap();
        let back = import(&path).unwrap();
        assert_eq!(&back.config, c, "{name}");
        match kind {
            GgufType::F32 => assert_eq!(&back.weights, w, "f32"),
            GgufType::Q8_0 => assert_eq!(back.weights, q8.weights, "kiln's Q8_0 against gguf-py's"),
            GgufType::Bf16 => {
                for (x, y) in w.iter().zip(&back.weights) {
                    assert!(
                        (x - y).abs() <= x.abs() / 256.0,
                        "bf16: {x} read back as {y}"
                    );
                }
            }
        }
    }
    // A truncated file and a foreign architecture are refused by name.
    let bytes = fs::read(dir.join("model_f32.gguf")).unwrap();
    let cut = out.join("cut.gguf");
    fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!("{:#}", import(&cut).err().unwrap());
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    fs::remove_dir_all(out).unwrap();
}

/// Hostile GGUF and llama2.c v2 files: every truncation point and single-byte corruptions of
/// the headers give an error or a model, never a panic or an abort (a header promising a
/// huge model is refused before its arena is allocated).
#[test]
fn damaged_gguf_and_v2_files_are_errors_not_crashes() {
    let dir = temp_dir("hostile");
    fs::create_dir_all(&dir).unwrap();
    for name in ["model_f32.gguf", "model_q8_0.gguf", "model_v2.bin"] {
        let bytes = fs::read(fixtures().join("llama2c").join(name)).unwrap();
        let ext = if name.ends_with(".gguf") {
            "gguf"
        } else {
            "bin"
        };
        let path = dir.join(format!("damaged.{ext}"));
        let mut cases: Vec<Vec<u8>> = (0..bytes.len())
            .step_by(97)
            .map(|cut| bytes[..cut].to_vec())
            .collect();
        for at in 0..bytes.len().min(1200) {
            for value in [0x00, 0x7f, 0xff] {
                let mut b = bytes.clone();
                b[at] = value;
                cases.push(b);
            }
        }
        for case in cases {
            fs::write(&path, &case).unwrap();
            let result = std::panic::catch_unwind(|| import(&path).map(|m| m.weights.len()));
            assert!(result.is_ok(), "{name}: a damaged file panicked the reader");
        }
    }
    fs::remove_dir_all(dir).unwrap();
}

/// Every norm of `back` equals `original`'s; every matrix value is within `bound(max |w|)`
/// of the original, per block of 32 consecutive values.
fn assert_within_blocks(
    original: &interop::Imported,
    back: &interop::Imported,
    bound: impl Fn(f32) -> f32,
    what: &str,
) {
    let layout = kiln_core::layout::ParamLayout::new(&original.config);
    for spec in &layout.specs {
        let r = spec.region;
        let (o, b) = (
            &original.weights[r.offset..][..r.len],
            &back.weights[r.offset..][..r.len],
        );
        if spec.shape.len() == 1 {
            assert_eq!(o, b, "{what} {}: norms stay f32", spec.name);
            continue;
        }
        for (og, bg) in o.chunks(32).zip(b.chunks(32)) {
            let limit = bound(og.iter().fold(0f32, |m, v| m.max(v.abs())));
            for (x, y) in og.iter().zip(bg) {
                assert!(
                    (x - y).abs() <= limit,
                    "{what} {}: {x} came back as {y} (bound {limit})",
                    spec.name
                );
            }
        }
    }
}

#[test]
fn export_then_import_is_bit_exact() {
    let dir = temp_dir("roundtrip");
    for source in ["llama", "qwen3"] {
        let original = import(&fixtures().join(source)).unwrap();
        let out = dir.join(format!("{source}-hf"));
        export(&fixtures().join(source), ExportFormat::Hf, &out).unwrap();
        let back = import(&out).unwrap();
        assert_eq!(back.config, original.config, "{source}");
        assert!(
            back.weights
                .iter()
                .zip(&original.weights)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{source}: weights differ"
        );
        assert!(out.join("tokenizer.json").exists());
    }
    // llama2.c: through the RoPE permutation and back.
    let original = import(&fixtures().join("llama2c/model_legacy.bin")).unwrap();
    let out = dir.join("llama2c");
    let path = export(
        &fixtures().join("llama2c/model_legacy.bin"),
        ExportFormat::Llama2c,
        &out,
    )
    .unwrap();
    let back = import(&path).unwrap();
    assert_eq!(back.config, original.config);
    assert_eq!(back.weights, original.weights);
    // The file is the one llama2.c's export writes (the fixture): byte for byte, except the
    // RoPE tables (which run.c skips), whose cos/sin may differ in the last bit between libms.
    let (ours, theirs) = (
        fs::read(&path).unwrap(),
        fs::read(fixtures().join("llama2c/model_legacy.bin")).unwrap(),
    );
    assert_eq!(ours.len(), theirs.len());
    let c = &original.config;
    let classifier = if c.tie_embeddings {
        0
    } else {
        c.vocab_size * c.dim * 4
    };
    let tables =
        (ours.len() - classifier - c.max_seq_len * c.head_dim * 4)..(ours.len() - classifier);
    assert_eq!(ours[..tables.start], theirs[..tables.start]);
    assert_eq!(ours[tables.end..], theirs[tables.end..]);
    let ours = le_values::<f32>(&ours[tables.clone()]);
    for (a, b) in ours.into_iter().zip(le_values::<f32>(&theirs[tables])) {
        assert!((a - b).abs() <= 1e-6, "RoPE table {a} vs {b}");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_models_are_refused_by_name() {
    let dir = temp_dir("refuse");
    let source = fixtures().join("llama");
    let cases = [
        (
            "architectures",
            serde_json::json!(["MistralForCausalLM"]),
            "MistralForCausalLM",
        ),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
    ];
    for (field, value, expected) in cases {
        let case = dir.join(field);
        fs::create_dir_all(&case).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            fs::copy(source.join(f), case.join(f)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
        config[field] = value;
        fs::write(case.join("config.json"), config.to_string()).unwrap();
        let error = format!("{:#}", import(&case).err().unwrap());
        assert!(
            error.contains(expected) && error.contains("config.json"),
            "{error}"
        );
    }
    // A llama2.c file cut short names the file and the problem.
    let bytes = fs::read(fixtures().join("llama2c/model_legacy.bin")).unwrap();
    fs::write(dir.join("short.bin"), &bytes[..bytes.len() - 8]).unwrap();
    let error = import(&dir.join("short.bin")).err().unwrap().to_string();
    assert!(
        error.contains("short.bin") && error.contains("truncated"),
        "{error}"
    );
    // Qwen3 (qk-norm) cannot go to llama2.c.
    let error = export(
        &fixtures().join("qwen3"),
        ExportFormat::Llama2c,
        &dir.join("x"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(error.contains("qk-norm"), "{error}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn compaction_and_expansion_are_inverse_on_kept_rows() {
    let imported = import(&fixtures().join("llama")).unwrap();
    let map = VocabMap::from_full_ids(96, vec![1, 5, 7, 40, 95]);
    let (small, weights) = interop::compact(&imported.config, &imported.weights, &map);
    assert_eq!(small.vocab_size, 5);
    let (full, expanded) = interop::expand(&small, &weights, &map, 96);
    assert_eq!(full, imported.config);
    let c = full.dim;
    let embed = |w: &[f32], row: usize| w[row * c..(row + 1) * c].to_vec();
    assert_eq!(embed(&expanded, 40), embed(&imported.weights, 40));
    assert!(
        embed(&expanded, 2).iter().all(|&x| x == 0.0),
        "rows of dropped tokens are zero"
    );
}
