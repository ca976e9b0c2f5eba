#!/usr/bin/env bash
# NVRTC (CUDA 13's run-time compiler) from PyPI, so `cargo test` compiles every CUDA kernel to
# PTX on a machine without a GPU (crates/cuda/tests/nvrtc.rs). The wheel puts
# libnvrtc.so.13 under site-packages/nvidia/cu13/lib, where kiln looks for it. Installs only
# when python3 cannot already see it.
set -euo pipefail
if python3 -c 'import glob, site, sys; sys.exit(0 if any(glob.glob(p + "/nvidia/cu13/lib/libnvrtc.so.13") for p in site.getsitepackages() + [site.getusersitepackages()]) else 1)'; then
    echo "NVRTC is installed"
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check 'nvidia-cuda-nvrtc>=13,<14'
