#!/usr/bin/env bash
# The fast CPU backend's whole check on another machine's CPU, in one command: for a tier this
# machine lacks (AMX; an AVX2-only CPU; AVX-512 without AVX512-BF16), e.g. on the host CPU of a
# lent GPU machine, which has no Rust toolchain, so the binaries are built here and carried:
#
#   bash scripts/cpu_check.sh stage     # here: release binaries, stripped, into .dev/
#   bash scripts/cpu_check.sh run       # there, from the repository root, .dev/ carried
#
# `run` prints the CPU's model and vector flags and kiln doctor's view (the tier, and why any
# tier is unusable); runs kiln-cpu's unit tests (the GEMMs of every kernel the CPU has: the AMX
# tile kernel for real where CPUID, XCR0 and the OS allow it, emulated elsewhere) and its
# conformance suite at every tier the CPU has; the register-only peaks (`kiln bench peak`);
# `kiln bench kernels` on stories15m's shapes at the best tier; and
# scripts/train_side_by_side.sh for stories15m (4 × 256) and stories110m (1 × 256): every
# tier and precision against PyTorch (f32, bf16 autocast, torch.compile) where python3 has
# torch. About 3 minutes on 16 cores, 8 on 2. Results go to $OUT (or .dev/out); CPUS (a
# taskset list such as 0-1) pins kiln and PyTorch to those CPUs.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source scripts/dev_binaries.sh
case "${1:-}" in
stage)
  set -e
  stage_binaries kiln-cpu cpu kiln_cpu conformance
  ;;
run)
  out="${OUT:-.dev/out}"; mkdir -p "$out"
  pin=(); [ -n "${CPUS:-}" ] && pin=(taskset -c "$CPUS")
  link_fixtures .dev/cpu-conformance cpu
  grep -m1 'model name' /proc/cpuinfo; nproc
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|amx|fma)' | tr '\n' ' '; echo
  .dev/kiln doctor 2>&1 | sed -n '1,/^backends/p' | head -30
  echo "== kiln-cpu unit tests"
  timeout 300 "${pin[@]}" .dev/cpu-kiln_cpu --nocapture > "$out/unit.log" 2>&1
  echo "unit tests: exit $?"; grep -E 'test result|panicked|skipped' -A2 "$out/unit.log" | head -20
  echo "== conformance at every tier this CPU has"
  timeout 600 "${pin[@]}" .dev/cpu-conformance --nocapture --test-threads 1 > "$out/conformance.log" 2>&1
  echo "conformance: exit $?"; grep -oE 'tier [a-z0-9]+(, [A-Za-z0-9]+: running|: skipped.*)' "$out/conformance.log" | sort | uniq -c
  grep -E 'test result|panicked' -A2 "$out/conformance.log" | head -20
  echo "== peaks"
  "${pin[@]}" .dev/kiln bench peak 2>&1 | tail -8
  echo "== kernels at the best tier, stories15m's shapes"
  timeout 300 "${pin[@]}" .dev/kiln bench kernels --preset stories15m --batch 4 --seq 256 > "$out/kernels.log" 2>&1
  grep -E 'backend|matmul|classifier loss|attention (forward|backward)|adamw' "$out/kernels.log"
  for shape in "stories15m 4" "stories110m 1"; do
    set -- $shape
    echo "== side by side: $1, batch $2 × 256"
    KILN_BIN="$repo/.dev/kiln" timeout 900 "${pin[@]}" bash scripts/train_side_by_side.sh "$1" "$2" 256 5 \
      > "$out/side-$1.log" 2>&1
    sed -n '/ms\/step/,$p' "$out/side-$1.log"
  done
  ;;
*)
  echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
