//! The reference backend's training is bit-identical to what it was before the layering
//! refactor (issue 12): the golden file `tests/fixtures/bit_identity.json` was written by the
//! code before the refactor (commit acff307), and every later build must reproduce it exactly.
//!
//! Three short runs through the whole trainer, each recorded as the f32 bits of every step's
//! loss and the sha256 of the final weights:
//! - tiny-gqa with AdamW, warmup and cosine decay, gradient clipping and two micro-batches;
//! - tiny-golf (every golf option) with Muon + Adam, the warmdown schedule and an EMA;
//! - tiny-golf with ternary quantization-aware training.
//!
//! Regenerate (only when a change of numerics is intended, and say so in the commit) with
//! `KILN_WRITE_GOLDEN=1 cargo test --test bit_identity`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use kiln::train::{OptimizerKind, Schedule, TrainConfig, Trainer};
use kiln_core::config::ModelConfig;
use kiln_core::quant::PackRule;
use kiln_core::quant::Scheme;
use kiln_reference::ReferenceBackend;

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("bits", name)
}

/// A small corpus of pseudo-random words, prepared with a 320-token BPE.
fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "king", "queen", "speaks", "to", "a", "fool", "in", "winter", "and", "sings",
    ];
    common::word_corpus(dir, &words, 11, 4000)
}

fn base(preset: &str, data: PathBuf, steps: u64) -> TrainConfig {
    let mut config = TrainConfig::new(ModelConfig::preset(preset).unwrap(), data);
    config.batch = 2;
    config.seq = 16;
    config.max_steps = Some(steps);
    config.eval_every = 0;
    config.eval_batches = 0;
    config.checkpoint_every = 0;
    config
}

fn golf(data: PathBuf, steps: u64) -> TrainConfig {
    let mut config = base("tiny-golf", data, steps);
    config.optimizer = OptimizerKind::Muon;
    config.schedule = Schedule::Warmdown;
    config.warmdown_steps = 3;
    config.warmup_steps = 0;
    config.weight_decay = 0.0;
    config.grad_clip = 0.0;
    config.muon.matrix_lr = 0.02;
    config.muon.embed_lr = 0.02;
    config.muon.scalar_lr = 0.02;
    config
}

/// Each step's loss as f32 bits (hex), and the sha256 of the final weights' little-endian bytes.
fn record(config: TrainConfig, run: &Path) -> serde_json::Value {
    let mut trainer = Trainer::create(ReferenceBackend, config, run).unwrap();
    trainer.print_every = 0;
    let report = trainer.run().unwrap();
    let losses: Vec<String> = report
        .losses
        .iter()
        .map(|l| format!("{:08x}", l.to_bits()))
        .collect();
    let mut hash = Sha256::new();
    for w in trainer.model.download_params().unwrap() {
        hash.update(w.to_le_bytes());
    }
    let weights: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "losses": losses, "weights_sha256": weights })
}

#[test]
fn reference_training_is_bit_identical_to_before_the_refactor() {
    let dir = temp_dir("runs");
    let data = corpus(&dir);
    let mut runs = BTreeMap::new();

    let mut adamw = base("tiny-gqa", data.clone(), 10);
    adamw.accumulation = 2;
    adamw.learning_rate = 3e-3;
    adamw.warmup_steps = 3;
    adamw.grad_clip = 0.5;
    runs.insert("adamw_tiny_gqa", record(adamw, &dir.join("adamw")));

    let mut muon = golf(data.clone(), 10);
    muon.ema_decay = Some(0.9);
    runs.insert("muon_ema_tiny_golf", record(muon, &dir.join("muon")));

    let mut qat = golf(data, 6);
    qat.qat = Some(PackRule {
        matrices: Scheme::Ternary,
        embedding: Scheme::Int {
            bits: 8,
            percentile: 99.99984,
        },
        small_max: 64,
        hadamard: false,
    });
    runs.insert("qat_ternary_tiny_golf", record(qat, &dir.join("qat")));

    let got = serde_json::to_value(&runs).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bit_identity.json");
    if std::env::var_os("KILN_WRITE_GOLDEN").is_some() {
        fs::write(&golden, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&golden).unwrap()).unwrap();
    // Exact equality: the refactor moves code, it must not change one bit of arithmetic.
    assert_eq!(
        got, want,
        "training is no longer bit-identical to the golden run"
    );
    let _ = fs::remove_dir_all(&dir);
}
