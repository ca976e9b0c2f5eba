//! The conformance suite run on the fast CPU backend at every tier this machine has (each
//! lower tier through an explicit cap, as `KILN_ISA` does), in each precision the tier
//! offers: the kernel-case table against the f64 reference kernels, memory, the PyTorch
//! whole-model fixtures, the training smoke test and a 200-step loss curve against the
//! reference backend's. Tiers the machine lacks are named as
//! skipped, so the log says what was covered. With `KILN_ISA` set, only the tier that cap
//! selects runs, the one `kiln train` would use under it:
//! `KILN_ISA=avx2 cargo test -p kiln-cpu --test conformance -- --nocapture`.

use std::path::PathBuf;

use kiln_conformance::ModelTolerance;
use kiln_core::cpu::{self, Isa};
use kiln_cpu::{CpuBackend, Logits, Precision};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Every (tier, precision) this machine can run, or under `KILN_ISA` the tier it selects.
fn backends() -> Vec<CpuBackend> {
    let capped = cpu::isa_cap().unwrap_or_else(|e| panic!("{e}")).is_some();
    let selected = cpu::selected_isa().unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for isa in Isa::ALL {
        if let Some(why) = cpu::features().missing(isa) {
            println!("tier {isa}: skipped ({why})");
            continue;
        }
        if capped && Some(isa) != selected {
            println!("tier {isa}: skipped (KILN_ISA selects another tier)");
            continue;
        }
        for precision in [Precision::F32, Precision::Bf16] {
            if let Ok(backend) = CpuBackend::with(isa, precision, 2) {
                println!("tier {isa}, {precision:?}: running, logits kept and recomputed");
                out.push(backend.clone().keeping(Logits::Recompute));
                out.push(backend.keeping(Logits::Keep));
            }
        }
    }
    assert!(
        !out.is_empty(),
        "no tier of the CPU backend runs on this machine"
    );
    out
}

#[test]
fn kernels_match_the_f64_reference_at_every_tier() {
    for backend in backends() {
        let report = kiln_conformance::check_kernels(&backend)
            .unwrap_or_else(|e| panic!("{}: {e:#}", kiln_core::backend::Backend::name(&backend)));
        assert!(
            report.declined.is_empty(),
            "declined: {:?}",
            report.declined
        );
        kiln_conformance::check_memory(&backend).unwrap();
    }
}

#[test]
fn whole_models_match_pytorch_at_every_tier() {
    for backend in backends() {
        for name in kiln_conformance::FIXTURES {
            let path = fixture(&format!("model_{name}.safetensors"));
            let result = match backend.precision() {
                // f32 throughout: element-wise, as the reference backend.
                Precision::F32 => kiln_conformance::check_fixture(backend.clone(), &path),
                // bf16 matmul and attention inputs (relative error 2⁻⁹ each, so 2⁻⁸ per
                // product): one matmul's output has a normalized squared error near (2⁻⁸)² ≈
                // 1.5e-5; the logits pass through 2 blocks of 7 matmuls, attention and the
                // classifier (measured up to 1.3e-4 on tiny-gqa, bound 1e-3), the gradients
                // through twice as many (measured up to 2.7e-3, tiny-golf's four-value q gain,
                // whose gradient is a sum that cancels; bound 1e-2), through either head; the
                // AdamW losses stay near 5 and drift little (measured 4.5e-6, bound 1e-4).
                Precision::Bf16 => kiln_conformance::check_fixture_within(
                    backend.clone(),
                    &path,
                    ModelTolerance::Nmse {
                        outputs: 1e-3,
                        gradients: 1e-2,
                        trajectory: 1e-4,
                    },
                ),
            };
            result.unwrap_or_else(|e| {
                panic!(
                    "{} on {name}: {e:#}",
                    kiln_core::backend::Backend::name(&backend)
                )
            });
        }
    }
}

#[test]
fn twenty_training_steps_make_the_loss_fall_at_every_tier() {
    for backend in backends() {
        for preset in ["tiny-mha", "tiny-gqa", "tiny-golf"] {
            kiln_conformance::check_training_smoke(backend.clone(), preset).unwrap();
        }
    }
}

/// 200 AdamW steps (warm-up, clipping, weight decay) of tiny-gqa on a bigram chain, from the
/// same initialisation and batches as the reference backend: each tier's loss curve must
/// track the reference's. f32 runs the same arithmetic in another summation order, so the
/// curves differ by f32 rounding carried through 200 steps (measured at most 4.8e-7 on Zen 5):
/// every step within 1e-4. bf16 rounds every product's inputs (2⁻⁸ per product): the losses
/// differ by up to a few thousandths step to step (measured 1.9e-3) while the curve stays on
/// the reference's (20-step means within 2.2e-4): every step within 2e-2, every 20-step mean
/// within 5e-3, and both curves fall from ln 64 ≈ 4.16 to about 1.96.
#[test]
fn two_hundred_training_steps_track_the_reference_at_every_tier() {
    let steps = 200;
    let reference =
        kiln_conformance::training_curve(kiln_reference::ReferenceBackend, "tiny-gqa", steps)
            .unwrap();
    assert!(
        reference[steps - 1] < 0.6 * reference[0],
        "the reference curve should fall: {:?}",
        &reference[steps - 20..]
    );
    let mean = |c: &[f32], i: usize| c[i..i + 20].iter().sum::<f32>() / 20.0;
    for backend in backends() {
        let name = kiln_core::backend::Backend::name(&backend);
        let (step_tol, window_tol) = match backend.precision() {
            Precision::F32 => (1e-4, 1e-4),
            Precision::Bf16 => (2e-2, 5e-3),
        };
        let got = kiln_conformance::training_curve(backend, "tiny-gqa", steps).unwrap();
        for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
            assert!(
                (g - r).abs() <= step_tol,
                "{name}: step {i} loss {g} vs the reference's {r}"
            );
        }
        for i in (0..steps).step_by(20) {
            let (g, r) = (mean(&got, i), mean(&reference, i));
            assert!(
                (g - r).abs() <= window_tol,
                "{name}: steps {i}..{}: mean loss {g} vs the reference's {r}",
                i + 20
            );
        }
        println!(
            "{name}: 200 steps, final 20-step mean {:.4}",
            mean(&got, steps - 20)
        );
    }
}
