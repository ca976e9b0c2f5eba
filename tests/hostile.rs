//! Inputs that once ended in a panic or an abort, each now refused with an error that names
//! the file or the flag and the problem (issue 14's list), and sampling past the context,
//! which now says where it stopped. Through the binary where a user meets them, else through
//! the library call the commands make; every run is checked for the absence of a panic.

mod common;

use std::fs;
use std::path::Path;

use common::kiln;
use kiln_core::config::ModelConfig;
use kiln_core::model::Model;
use kiln_reference::ReferenceBackend;

const LLAMA: &str = "tests/fixtures/hf/llama";

/// `kiln args…` fails with a message containing each of `wants`, and no panic.
fn refused(args: &[&str], wants: &[&str]) {
    let (ok, out, err) = kiln(args, &[]);
    assert!(!ok, "{args:?} succeeded: {out}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for want in wants {
        assert!(err.contains(want), "{args:?}: no '{want}' in: {err}");
    }
}

#[test]
fn token_ids_the_model_cannot_take_are_refused() {
    refused(
        &["model", "logits", "--model", LLAMA],
        &["no tokens", "--tokens"],
    );
    refused(
        &["model", "logits", "--model", LLAMA, "--tokens", "1,99999"],
        &["token id 99999", "vocabulary of 96"],
    );
}

#[test]
fn damaged_model_files_are_refused_by_name() {
    let dir = common::temp_dir("hostile", "models");
    // A Hugging Face config with no attention heads.
    let hf = dir.join("hf");
    fs::create_dir_all(&hf).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        fs::copy(Path::new(LLAMA).join(file), hf.join(file)).unwrap();
    }
    let config = fs::read_to_string(hf.join("config.json")).unwrap();
    let config = config.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0");
    fs::write(hf.join("config.json"), config).unwrap();
    let hf = hf.display().to_string();
    refused(
        &["model", "logits", "--model", &hf, "--tokens", "1"],
        &["config.json", "n_heads must be positive"],
    );
    // A llama2.c file cut inside its header.
    let v1 = fs::read("tests/fixtures/hf/llama2c/model_v1.bin").unwrap();
    let cut = dir.join("cut.bin");
    fs::write(&cut, &v1[..20]).unwrap();
    let cut = cut.display().to_string();
    refused(
        &["model", "logits", "--model", &cut, "--tokens", "1"],
        &["cut.bin", "too short"],
    );
    // A config whose parameters need terabytes, and one that fits the limit but not this
    // machine (or any machine CI runs on: 2.6 TB to train).
    let mut huge = ModelConfig::preset("stories110m").unwrap();
    (huge.dim, huge.hidden_dim, huge.n_layers) = (65536, 262144, 200);
    let path = dir.join("huge.json");
    fs::write(&path, serde_json::to_string(&huge).unwrap()).unwrap();
    refused(
        &["model", "info", path.to_str().unwrap()],
        &["huge.json", "TB in f32", "over kiln's limit"],
    );
    let mut big = huge.clone();
    (big.dim, big.hidden_dim, big.n_layers) = (8192, 32768, 128);
    let error = Model::new(ReferenceBackend, big).err().expect("refused");
    let message = error.to_string();
    for want in ["parameters", "GB needed", "available", "smaller model"] {
        assert!(message.contains(want), "no '{want}' in: {message}");
    }
    fs::remove_dir_all(&dir).ok();
}

/// An activation arena beyond the machine's memory names `--batch`, `--seq` and
/// `--compact-vocab`; one beyond any machine's is refused before the layout is computed.
#[test]
fn batches_that_cannot_fit_say_what_to_lower() {
    let model = Model::new(ReferenceBackend, ModelConfig::preset("tiny-gqa").unwrap()).unwrap();
    // 2^24 sequences of 32 tokens: over a terabyte of activations.
    let refusal = |batch| {
        model
            .activations(batch, 32)
            .err()
            .expect("refused")
            .to_string()
    };
    let message = refusal(1 << 24);
    for want in [
        "16777216 × 32",
        "GB needed",
        "available",
        "--batch",
        "--compact-vocab",
    ] {
        assert!(message.contains(want), "no '{want}' in: {message}");
    }
    let message = refusal(usize::MAX / 2);
    assert!(message.contains("--batch"), "{message}");
    // A batch of zero sequences cannot be evaluated.
    let acts = model.loss_activations(0, 8).unwrap();
    let tokens: Vec<u32> = (0..100).map(|i| i % 50).collect();
    let text =
        kiln_formats::tokenizer::Tokenizer::load(Path::new(LLAMA).join("tokenizer.json").as_path())
            .unwrap();
    let error = kiln_core::eval::evaluate(&model, &acts, &tokens, &text, None, 0, &mut |_, _| {})
        .expect_err("refused");
    assert!(error.to_string().contains("batch of 0"), "{error}");
}

#[test]
fn a_llama2c_tokenizer_without_the_space_piece_is_refused() {
    let dir = common::temp_dir("hostile", "tokenizer");
    let good = dir.join("tokenizer.bin");
    fs::write(&good, common::small_tokenizer_bin()).unwrap();
    kiln_formats::tokenizer::Tokenizer::load(&good).expect("the intact file loads");
    // The same pieces with the space spelled otherwise.
    let mut pieces: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>"]
        .map(|s| s.as_bytes().to_vec())
        .into();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
    pieces.extend((0..41).map(|i| format!("w{i}").into_bytes()));
    let bad = dir.join("nospace.bin");
    fs::write(&bad, common::llama2c_tokenizer(&pieces)).unwrap();
    let error = kiln_formats::tokenizer::Tokenizer::load(&bad)
        .err()
        .expect("refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("nospace.bin") && message.contains("\" \" piece"),
        "{message}"
    );
    fs::remove_dir_all(&dir).ok();
}

/// A corpus of two-byte characters whose validation cut falls inside one prepares.
#[test]
fn a_non_ascii_corpus_splits_at_a_character_boundary() {
    let dir = common::temp_dir("hostile", "utf8");
    let input = dir.join("text");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("a.txt"), "é".repeat(2001) + "\nüö\n").unwrap();
    let out = dir.join("data");
    let (input, out) = (input.display().to_string(), out.display().to_string());
    let args = [
        "data",
        "prepare",
        "--input",
        &input,
        "--out",
        &out,
        "--tokenizer",
        "bpe:300",
    ];
    let (ok, _, err) = kiln(&args, &[]);
    assert!(ok && !err.contains("panicked"), "{err}");
    fs::remove_dir_all(&dir).ok();
}

/// A packed artifact whose manifest says a dimension is zero.
#[test]
fn a_packed_artifact_with_a_zero_dimension_is_refused() {
    let dir = common::temp_dir("hostile", "packed");
    let out = dir.display().to_string();
    let args = [
        "export", "--format", "packed", LLAMA, &out, "--scheme", "int8",
    ];
    let (ok, _, err) = kiln(&args, &[]);
    assert!(ok, "{err}");
    let path = dir.join("model.kiln");
    let bytes = fs::read(&path).unwrap();
    // Magic (8 bytes), version, manifest length, the manifest's JSON, the payload.
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let manifest = String::from_utf8(bytes[16..16 + len].to_vec()).unwrap();
    let zero = manifest.replacen("\"dim\":32", "\"dim\":0", 1);
    assert_ne!(zero, manifest, "the manifest names dim");
    let mut damaged = bytes[..12].to_vec();
    damaged.extend((zero.len() as u32).to_le_bytes());
    damaged.extend(zero.as_bytes());
    damaged.extend(&bytes[16 + len..]);
    fs::write(&path, damaged).unwrap();
    let error = kiln_formats::packed::read(&path).err().expect("refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("model.kiln") && message.contains("dim must be positive"),
        "{message}"
    );
    fs::remove_dir_all(&dir).ok();
}

/// More tokens than the context holds: the text ends there and kiln says so.
#[test]
fn sampling_past_the_context_says_where_it_stopped() {
    for samples in ["1", "2"] {
        let args = [
            "sample",
            "--model",
            LLAMA,
            "--prompt",
            "hello",
            "--max-tokens",
            "100",
            "--num-samples",
            samples,
            "--temperature",
            "0",
        ];
        let (ok, _, err) = kiln(&args, &[]);
        assert!(ok, "{err}");
        assert!(
            err.contains("stopped at the model's context length: 64 positions"),
            "{samples} samples: {err}"
        );
    }
}
