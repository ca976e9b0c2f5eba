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

#[test]
fn twenty_training_steps_make_the_loss_fall() {
    for preset in kiln_conformance::FIXTURES {
        let losses = kiln_conformance::check_training_smoke(ReferenceBackend, preset).unwrap();
        println!("{preset}: {losses:?}");
    }
}
