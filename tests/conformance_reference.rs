//! The conformance suite (`kiln::conformance`) run on the reference backend.

use std::path::PathBuf;

use kiln::backend::reference::ReferenceBackend;
use kiln::backend::Backend;
use kiln::conformance;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn kernels_match_the_f64_reference() {
    conformance::check_kernels(&ReferenceBackend).unwrap();
}

#[test]
fn tiny_mha_matches_pytorch() {
    let backend = ReferenceBackend;
    conformance::check_fixture(
        backend,
        &fixture("model_tiny-mha.safetensors"),
        backend.tolerance(),
    )
    .unwrap();
}

#[test]
fn tiny_gqa_with_qk_norm_matches_pytorch() {
    let backend = ReferenceBackend;
    conformance::check_fixture(
        backend,
        &fixture("model_tiny-gqa.safetensors"),
        backend.tolerance(),
    )
    .unwrap();
}

#[test]
fn tiny_golf_with_every_option_matches_pytorch() {
    let backend = ReferenceBackend;
    conformance::check_fixture(
        backend,
        &fixture("model_tiny-golf.safetensors"),
        backend.tolerance(),
    )
    .unwrap();
}

#[test]
fn twenty_training_steps_make_the_loss_fall() {
    for preset in ["tiny-mha", "tiny-gqa", "tiny-golf"] {
        let losses = conformance::check_training_smoke(ReferenceBackend, preset).unwrap();
        println!("{preset}: {losses:?}");
    }
}
