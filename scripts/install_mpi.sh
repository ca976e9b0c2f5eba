#!/usr/bin/env bash
# What `cargo build --features mpi` and `mpirun` need, from Debian's packages: Open MPI
# (library, headers, mpirun) and libclang (the MPI binding generates its FFI with bindgen).
# Installs only what is missing; as root, or through sudo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(openmpi-bin libopenmpi-dev libclang-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "Open MPI and libclang are installed"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${missing[*]}"
# A fresh machine may have no package lists yet.
$sudo apt-get install -y -qq "${missing[@]}" || {
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}"
}
