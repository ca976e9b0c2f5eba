//! The conformance suite (`kiln_conformance`) run on the reference backend: every case of the
//! kernel table against the reference kernels in f64, the memory methods, the PyTorch
//! whole-model fixtures, and a training smoke test.

use std::path::PathBuf;

use kiln_reference::ReferenceBackend;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

#[test]
fn kernels_match_the_f64_reference() {
    let report = kiln_conformance::check_kernels(&ReferenceBackend).unwrap();
    println!("{} kernel cases passed", report.passed);
    // The reference backend runs every shape: it is what the others fall back to.
    assert!(
        report.declined.is_empty(),
        "declined: {:?}",
        report.declined
    );
    // Every trait method that computes has at least one case (27 ops, plus variants).
    assert!(report.passed >= 40, "only {} cases", report.passed);
}

#[test]
fn memory_transfers_and_conversions_are_exact() {
    kiln_conformance::check_memory(&ReferenceBackend).unwrap();
}

#[test]
fn tiny_mha_matches_pytorch() {
    kiln_conformance::check_fixture(ReferenceBackend, &fixture("model_tiny-mha.safetensors"))
        .unwrap();
}

#[test]
fn tiny_gqa_with_qk_norm_matches_pytorch() {
    kiln_conformance::check_fixture(ReferenceBackend, &fixture("model_tiny-gqa.safetensors"))
        .unwrap();
}

#[test]
fn tiny_golf_with_every_option_matches_pytorch() {
    kiln_conformance::check_fixture(ReferenceBackend, &fixture("model_tiny-golf.safetensors"))
        .unwrap();
}

/// Depth recurrence: blocks 1 and 2 run twice, so their gradients sum both runs'.
#[test]
fn tiny_golf_with_depth_recurrence_matches_pytorch() {
    let path = fixture("model_tiny-golf-recurrent.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// EngramHash: the hashed bigram and trigram rows, the gate and both projections.
#[test]
fn tiny_golf_with_engram_hash_matches_pytorch() {
    let path = fixture("model_tiny-golf-engram.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// Norm-scale damping in every layer, exclusive self attention in the last three and
/// parallel residuals in the last two.
#[test]
fn tiny_golf_with_parallel_residuals_matches_pytorch() {
    let path = fixture("model_tiny-golf-parallel.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// A mixture of three experts in the last two layers, top-1 routed, with the load-balancing
/// loss in the gradients.
#[test]
fn tiny_golf_with_a_mixture_of_experts_matches_pytorch() {
    let path = fixture("model_tiny-golf-moe.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// A causal capsule bank before layer 2: 3 capsules of 8 values pooling each prefix.
#[test]
fn tiny_golf_with_a_causal_capsule_bank_matches_pytorch() {
    let path = fixture("model_tiny-golf-capsules.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// The same bank run three times with Koopman dynamics between the passes, the consistency
/// term in the gradients.
#[test]
fn tiny_golf_with_koopman_capsule_dynamics_matches_pytorch() {
    let path = fixture("model_tiny-golf-koopman.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// Two feedback passes over tiny-golf's decoder, each layer of them followed by its adapter.
#[test]
fn tiny_golf_with_feedback_passes_matches_pytorch() {
    let path = fixture("model_tiny-golf-feedback.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

/// The same with the stability clamp on D, whose values straddle the bound: the clamped
/// ones get no gradient.
#[test]
fn tiny_golf_with_the_koopman_clamp_matches_pytorch() {
    let path = fixture("model_tiny-golf-koopman-clamp.safetensors");
    kiln_conformance::check_fixture(ReferenceBackend, &path).unwrap();
}

#[test]
fn twenty_training_steps_make_the_loss_fall() {
    for preset in kiln_conformance::FIXTURES {
        let losses = kiln_conformance::check_training_smoke(ReferenceBackend, preset).unwrap();
        println!("{preset}: {losses:?}");
    }
}

/// The capsule bank is causal, with Koopman passes and with adaptive halting: a change to the
/// last token changes no earlier position's logits (the ternary submission's bank, pooling
/// the whole sequence, fails this), and cached decoding, one position at a time, gives the
/// full forward's logits; while the bank does reach the logits (a closed gate, its initial
/// state, would pass trivially, so the gate is opened).
#[test]
fn the_capsule_bank_reads_no_later_token() {
    use kiln_core::config::ModelConfig;
    for preset in ["tiny-golf-capsules", "tiny-golf-koopman"] {
        the_bank_reads_no_later_token(ModelConfig::preset(preset).unwrap());
    }
    // Adaptive halting, each position on its own capsules: this model's positions move by
    // 0.048 to 0.050 of their norm in the first Koopman pass, so at 0.049 some stop there and
    // the others run every pass.
    let mut halting = ModelConfig::preset("tiny-golf-koopman").unwrap();
    if let Some(m) = halting
        .arch
        .capsules
        .as_mut()
        .and_then(|k| k.koopman.as_mut())
    {
        m.halt = Some(0.049);
    }
    the_bank_reads_no_later_token(halting);
}

/// The same of feedback passes (the ternary submission's adapters read a sketch pooled over
/// the whole sequence, which fails this), their adapters' gates opened.
#[test]
fn feedback_passes_read_no_later_token() {
    let config = kiln_core::config::ModelConfig::preset("tiny-golf-feedback").unwrap();
    the_bank_reads_no_later_token(config);
}

fn the_bank_reads_no_later_token(config: kiln_core::config::ModelConfig) {
    use kiln_core::model::Model;
    let preset = format!("{:?} {:?}", config.arch.capsules, config.arch.feedback);
    let mut model = Model::new(ReferenceBackend, config.clone()).unwrap();
    model.init_random(3).unwrap();
    // The capsule bank's gate or the feedback adapters' gates.
    let gates: Vec<_> = match (&model.layout.capsules, &model.layout.feedback) {
        (Some(k), _) => vec![k.gate],
        (_, Some(f)) => f.adapters.iter().map(|a| a.gate).collect(),
        _ => unreachable!("a model with a capsule bank or feedback passes"),
    };
    let mut params = model.download_params().unwrap();
    for gate in &gates {
        params[gate.offset..gate.offset + gate.len].fill(0.5);
    }
    // The Koopman blend half open, so each position's capsules move by their own amount.
    if let Some(m) = model.layout.capsules.and_then(|k| k.koopman) {
        params[m.alpha.offset..m.alpha.offset + m.alpha.len].fill(0.0);
    }
    model.upload_params(&params).unwrap();
    let t = 12;
    let logits = |tokens: &[u32]| {
        let acts = model.activations(1, t).unwrap();
        model.forward(&acts, tokens, None).unwrap();
        model.download_logits(&acts).unwrap()
    };
    let a: Vec<u32> = (0..t as u32).map(|i| (i * 7 + 3) % 64).collect();
    let mut b = a.clone();
    b[t - 1] = (b[t - 1] + 1) % 64;
    let (la, lb) = (logits(&a), logits(&b));
    let v = config.vocab_size;
    assert_eq!(
        la[..(t - 1) * v],
        lb[..(t - 1) * v],
        "{preset}: an earlier position read the last token"
    );
    assert_ne!(la[(t - 1) * v..], lb[(t - 1) * v..]);
    // Decoding one position at a time (each halting decision then sees only its own row)
    // gives the full forward's logits: the forward decides per position too. f32 rounding
    // of the same kernels in another order, as tests/sampling.rs allows.
    let mut cache = model.kv_cache(t).unwrap();
    for (pos, &token) in a.iter().enumerate() {
        let step = model.decode_step(&mut cache, token).unwrap();
        let want: Vec<f64> = la[pos * v..][..v].iter().map(|&x| x as f64).collect();
        let tol = kiln_core::backend::Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        };
        let what = format!("{preset} decoding position {pos}");
        kiln_conformance::assert_close(&what, &step, &want, tol).unwrap();
    }
    // Without the gates open, the same model's logits differ: the bank or the adapters
    // contribute.
    for gate in &gates {
        params[gate.offset..gate.offset + gate.len].fill(0.0);
    }
    model.upload_params(&params).unwrap();
    assert_ne!(logits(&a), la, "{preset} must reach the logits");
}
