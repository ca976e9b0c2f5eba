//! Every kernel compiles to PTX for compute_80 (A100) and compute_90 (H100, H200) wherever
//! NVRTC can be found; no GPU is needed. `pip install nvidia-cuda-nvrtc` gives NVRTC on any
//! machine; CI installs it and sets `KILN_REQUIRE_NVRTC=1`, so there a missing NVRTC fails the
//! test instead of skipping it, and a compile error in any kernel fails CI everywhere.

use kiln_cuda::compile;

#[test]
fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
    let version = match compile::nvrtc_version() {
        Ok(v) => v,
        Err(why) => {
            assert!(
                std::env::var_os("KILN_REQUIRE_NVRTC").is_none(),
                "KILN_REQUIRE_NVRTC is set but {why}"
            );
            println!("skipped: {why}");
            return;
        }
    };
    println!("NVRTC {}.{}", version.0, version.1);
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile::compile(arch).unwrap_or_else(|log| panic!("{log}"));
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(ptx.contains(&target), "{arch}: no `{target}` in the PTX");
        for name in compile::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from the PTX"
            );
        }
        println!(
            "{arch}: {} kernels, {} bytes of PTX",
            compile::KERNELS.len(),
            ptx.len()
        );
    }
}

/// Every kernel compiles through ptxas to sm_80 and sm_90 machine code without spilling
/// registers to local memory (the tensor-core attention keeps its tiles' accumulators in
/// registers: a wider tile or head dim that spills is a slowdown no test on the CPU would
/// otherwise see); ptxas runs inside NVRTC, so no GPU is needed.
#[test]
fn every_kernel_fits_its_registers_on_sm80_and_sm90() {
    if compile::nvrtc_version().is_err() {
        assert!(
            std::env::var_os("KILN_REQUIRE_NVRTC").is_none(),
            "KILN_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
        );
        println!("skipped: no NVRTC");
        return;
    }
    for gpu in ["sm_80", "sm_90"] {
        let report = compile::machine_code_report(gpu).unwrap_or_else(|log| panic!("{log}"));
        for name in compile::KERNELS {
            let Some((_, registers, spilled)) = report.iter().find(|(n, _, _)| n == name) else {
                panic!("{gpu}: no ptxas report for {name}");
            };
            assert_eq!(
                *spilled, 0,
                "{gpu}: {name} spills {spilled} bytes ({registers} registers)"
            );
        }
        let most = report.iter().max_by_key(|(_, r, _)| *r).unwrap();
        println!(
            "{gpu}: {} kernels, none spills; most registers: {} ({})",
            report.len(),
            most.1,
            most.0
        );
    }
}
