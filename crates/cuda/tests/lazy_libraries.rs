//! A machine without an NVIDIA driver loads none of CUDA's other libraries when kiln asks
//! whether the CUDA backend can run (as `--backend auto` does on every run): PyTorch's wheels
//! put cuBLASLt, NVRTC and NCCL on many CPU-only machines, and loading them cost each run
//! about 190 MiB of resident memory. Its own test binary, so no other test has loaded them.

#[test]
fn without_a_driver_the_probe_loads_no_other_cuda_library() {
    let why = match kiln_cuda::probe() {
        Ok(gpu) => {
            println!("skipped: this machine has a GPU ({})", gpu.name);
            return;
        }
        Err(why) => why,
    };
    if !why.starts_with("no CUDA driver found") {
        println!("skipped: the driver is here ({why})");
        return;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for lib in ["libnvrtc", "libcublasLt", "libnccl"] {
        assert!(!maps.contains(lib), "{lib} was loaded without a driver");
    }
}
