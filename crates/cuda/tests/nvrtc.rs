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
