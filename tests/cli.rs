//! The command line's backend switch end to end: `--backend` and `KILN_BACKEND` reach the
//! commands that compute, a backend that is not in this build is refused with the reason,
//! and `kiln doctor` reports the machine and the backends.

mod common;

use std::path::Path;

use common::kiln;

fn logits_args(backend: &str) -> Vec<String> {
    let model = Path::new("tests/fixtures/hf/llama").display().to_string();
    [
        "--backend",
        backend,
        "model",
        "logits",
        "--model",
        &model,
        "--tokens",
        "1,2,3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn logits(backend: &str, env: &[(&str, &str)]) -> Vec<f32> {
    let args = logits_args(backend);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = kiln(&args, env);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_switch_reaches_the_command_and_the_backends_agree() {
    let reference = logits("reference", &[]);
    assert!(!reference.is_empty());
    // The environment variable is the same switch as the flag.
    let args = logits_args("reference");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = kiln(&args[2..], &[("KILN_BACKEND", "reference")]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Vec<f32>>(&out).unwrap(), reference);
    if kiln_core::cpu::features().best().is_none() {
        return;
    }
    // The CPU backend in f32 at its lowest tier: f32 sums in another order (1e-4 on logits
    // of magnitude ~1); in its default precision (bf16 matmuls where the CPU has them): the
    // fixture's logits through two blocks of bf16 products (0.1).
    let f32_avx2 = logits("cpu", &[("KILN_ISA", "avx2"), ("KILN_PRECISION", "f32")]);
    let default = logits("cpu", &[]);
    for (got, tol) in [(f32_avx2, 1e-4), (default, 0.1)] {
        assert_eq!(got.len(), reference.len());
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= tol,
            "cpu logits differ from the reference by {worst}"
        );
    }
}

#[test]
fn a_backend_not_usable_here_is_refused_with_the_reason() {
    // The CUDA backend on a machine without a GPU (as CI's): refused, naming what is missing
    // (a GPU machine runs it: crates/cuda/tests/conformance.rs).
    if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
        let backend = "cuda";
        let args = logits_args(backend);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = kiln(&args, &[]);
        assert!(!ok);
        assert!(
            err.contains(&format!("backend '{backend}' is not usable"))
                && err.contains("no CUDA driver found"),
            "{err}"
        );
        // The environment variable is the same switch.
        let (ok, _, err) = kiln(&args[2..], &[("KILN_BACKEND", backend)]);
        assert!(
            !ok && err.contains(&format!("backend '{backend}'")),
            "{err}"
        );
    }
    // `kiln train --gpus N` trains on the cuda backend only, and checks the GPUs first.
    let train = [
        "train", "--data", "nowhere", "--out", "nowhere", "--gpus", "2",
    ];
    let (ok, _, err) = kiln(&[&["--backend", "cpu"], &train[..]].concat(), &[]);
    assert!(
        !ok && err.contains("--gpus trains on the cuda backend"),
        "{err}"
    );
    if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
        let (ok, _, err) = kiln(&train, &[]);
        assert!(
            !ok && err.contains("--gpus 2: the cuda backend is not usable: no CUDA driver found"),
            "{err}"
        );
    }
    let (ok, _, err) = kiln(&["--backend", "tpu", "doctor"], &[]);
    assert!(!ok && err.contains("possible values"), "{err}");
}

#[test]
fn doctor_reports_the_machine_and_the_backends() {
    let (ok, out, err) = kiln(&["doctor"], &[]);
    assert!(ok, "{err}");
    for needle in [
        "machine",
        "cpu ",
        "avx2 + fma",
        "amx-bf16",
        "memory",
        "backends",
        "reference  usable",
        "auto       picks",
    ] {
        assert!(out.contains(needle), "no '{needle}' in:\n{out}");
    }
    // Whether this kiln can train across processes, and the MPI library it was built with.
    let mpi = if cfg!(feature = "mpi") {
        "data parallel    MPI compiled in: "
    } else {
        "data parallel    no MPI in this build (cargo build --release --features mpi)"
    };
    assert!(out.contains(mpi), "no '{mpi}' in:\n{out}");
    // The tier cap shows, whatever this CPU is.
    let (ok, out, _) = kiln(&["doctor"], &[("KILN_ISA", "nonsense")]);
    assert!(
        ok && out.contains("KILN_ISA=nonsense is not a tier"),
        "{out}"
    );
}

/// `kiln bench decode` runs a random preset through the KV cache and writes its figures.
#[test]
fn decode_bench_writes_its_figures() {
    let dir = std::env::temp_dir().join(format!("kiln-decode-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("decode.json");
    let json_arg = json.display().to_string();
    let args = [
        "bench", "decode", "--preset", "tiny-gqa", "--prompt", "3", "--tokens", "5", "--json",
        &json_arg,
    ];
    let (ok, out, err) = kiln(&args, &[]);
    assert!(ok && out.contains("tokens/s"), "{out}\n{err}");
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(figures["new_tokens"], 5);
    assert!(figures["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // tiny-gqa's block matrices and its classifier, each read once per token, at 4 bytes
    // (f32) or 2 (the CPU backend's bf16 copies).
    let c = kiln_core::config::ModelConfig::preset("tiny-gqa").unwrap();
    let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim);
    let per_layer = q * d + 2 * kv * d + d * q + 2 * f * d + d * f;
    let elements = (c.n_layers * per_layer + c.vocab_size * d) as f64;
    let bytes = figures["weight_bytes_per_token"].as_f64().unwrap();
    assert!(
        bytes == 4.0 * elements || bytes == 2.0 * elements,
        "{bytes} bytes for {elements} matrix elements"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A packed artifact runs on its own codes by default where the backend has the integer
/// kernels (every matrix the forward multiplies by: tiny Llama's 2 × 7 and its untied
/// classifier, ternary scale groups straddling its rows of 32 and 64), on its dequantized
/// values with `--weights f32`, and on the reference backend, which has no integer kernels.
#[test]
fn artifacts_run_on_their_codes_by_default_where_the_backend_can() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-artifact-{}", std::process::id()));
    let out = dir.display().to_string();
    let export = [
        "export",
        "--format",
        "packed",
        "tests/fixtures/hf/llama",
        &out,
        "--scheme",
        "ternary",
        "--small-max",
        "0",
    ];
    let (ok, _, err) = kiln(&export, &[]);
    assert!(ok, "{err}");
    let artifact = dir.join("model.kiln").display().to_string();
    let sample = |flags: &[&str]| {
        let mut args = flags.to_vec();
        args.extend([
            "sample",
            "--artifact",
            &artifact,
            "--prompt",
            "a",
            "--max-tokens",
            "3",
        ]);
        let (ok, _, err) = kiln(&args, &[]);
        assert!(ok, "{args:?}: {err}");
        err
    };
    let coded = "packed weights: 15 of the 15 quantized matrices the forward multiplies by run \
                 on their codes";
    let cpu_here = kiln_core::cpu::features().best().is_some();
    if cpu_here {
        let err = sample(&["--backend", "cpu"]);
        assert!(err.contains(coded), "{err}");
        let err = sample(&["--backend", "cpu", "--weights", "f32"]);
        assert!(!err.contains("packed weights"), "{err}");
    }
    let err = sample(&["--backend", "reference"]);
    assert!(!err.contains("packed weights"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Started by `mpirun` as one of two processes, a kiln built without the `mpi` feature says
/// so and how to build one with it, instead of training alone twice into the same run.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_kiln_without_mpi_refuses_to_be_one_of_several_processes() {
    let dir = common::temp_dir("cli", "no-mpi");
    let out = dir.join("run");
    let (ok, _, err) = common::kiln(
        &[
            "train",
            "--data",
            dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
        ],
        &[("OMPI_COMM_WORLD_SIZE", "2")],
    );
    assert!(!ok);
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}
