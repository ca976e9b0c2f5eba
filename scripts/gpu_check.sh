#!/usr/bin/env bash
# The CUDA backend's whole check on a GPU machine, in one command (a lent GPU machine has no
# Rust toolchain, so the binaries are built here first and carried there):
#
#   bash scripts/gpu_check.sh stage     # here: release binaries, stripped, into .dev/
#   bash scripts/gpu_check.sh run       # there, from the repository root, .dev/ carried
#
# `run` prints the GPU and kiln doctor's view; compiles every kernel (NVRTC); runs the
# conformance suite on the GPU (KILN_REQUIRE_CUDA=1: no GPU is a failure); times training
# steps of stories110m and golf-baseline with `kiln bench train --backend cuda` on each
# attention path (KILN_CUDA_ATTENTION=mma, the default, and gemm) and on f32 operands, then
# the PyTorch peer (bench/peers/train_step.py --device cuda --mode compile-bf16) on the same
# model and batch, and prints kiln's tokens/s over PyTorch's; prints where the default step's
# device time goes (KILN_CUDA_PROFILE=1); trains golf-baseline through NCCL with world size 1
# (`kiln train --gpus 1`, 64 × 1,024) on a corpus made of this repository's text, under a
# time budget (KILN_GPU_TIME=10m for the challenge's), exports it as an int8 artifact under
# 16 MB and scores the round trip. About 5 minutes with the default 75-second budget.
# Results go to $OUT (or .dev/out). Environment: KILN_GPU_BATCH/SEQ (default 256 × 256),
# KILN_GPU_TIME (75s).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source scripts/dev_binaries.sh
case "${1:-}" in
stage)
  set -e
  stage_binaries kiln-cuda cuda conformance nvrtc
  ;;
run)
  out="${OUT:-.dev/out}"; mkdir -p "$out"
  batch="${KILN_GPU_BATCH:-256}"; seq="${KILN_GPU_SEQ:-256}"; budget="${KILN_GPU_TIME:-75s}"
  kiln=.dev/kiln
  work="$(mktemp -d)"  # the golf run's corpus, run and artifact (only small files go to $out)
  link_fixtures .dev/cuda-conformance cuda
  nvidia-smi -L; nvidia-smi --query-gpu=driver_version,clocks.max.sm,memory.total --format=csv
  "$kiln" doctor | grep -A8 '^  libcuda'
  export KILN_REQUIRE_CUDA=1 KILN_REQUIRE_NVRTC=1
  timeout 60 .dev/cuda-nvrtc --nocapture 2>&1 | tail -4
  timeout 200 .dev/cuda-conformance --nocapture --test-threads 1 > "$out/conformance.log" 2>&1
  echo "conformance: exit $?"; grep -E 'test result|panicked' -A2 "$out/conformance.log" | head -20
  bench() { timeout 60 "$kiln" bench train --backend cuda --batch "$batch" --seq "$seq" --steps 3 "$@" 2>&1 | tail -1; }
  for preset in stories110m golf-baseline; do
    for attn in mma gemm; do
      echo "== kiln $preset, batch $batch × seq $seq, $attn attention"
      KILN_CUDA_ATTENTION="$attn" bench --preset "$preset" --json "$out/kiln-$preset-$attn.json"
    done
  done
  echo "== kiln stories110m, mma attention, f32 operands"
  KILN_CUDA_OPERANDS=f32 bench --preset stories110m
  echo "== pytorch compile-bf16 stories110m"
  timeout 200 python3 bench/peers/train_step.py --device cuda --mode compile-bf16 --preset stories110m \
    --batch "$batch" --seq "$seq" --steps 5 > "$out/torch.json" 2> "$out/torch.log"
  cat "$out/torch.json"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
t = json.load(open(f"{out}/torch.json"))
for attn in ("mma", "gemm"):
    try:
        k = json.load(open(f"{out}/kiln-stories110m-{attn}.json"))
        print(f"stories110m, {attn} attention: kiln {k['ms_per_step']:.1f} ms/step, PyTorch compile-bf16 "
              f"{t['ms_per_step']:.1f}: kiln's tokens/s are {t['ms_per_step'] / k['ms_per_step']:.3f}× PyTorch's")
    except Exception as e:
        print(f"no ratio for {attn} attention: {e}")
PY
  echo "== where the default step's device time goes"
  KILN_CUDA_PROFILE=1 timeout 60 "$kiln" bench train --backend cuda --preset stories110m \
    --batch "$batch" --seq "$seq" --steps 2 2>&1 | sed -n '/^device time/,/^median/p' | head -24
  echo "== NCCL, world size 1: golf-baseline for $budget, 64 × 1,024, on this repository's text"
  mkdir -p "$work/text" && cp README.md "$work/text/" && find crates src -name '*.rs' -exec cat {} + > "$work/text/code.txt"
  "$kiln" data prepare --input "$work/text" --out "$work/data" --tokenizer bpe:1024 2>&1 | tail -1
  timeout 900 "$kiln" train --gpus 1 --data "$work/data" --model golf-baseline --out "$work/golf" \
    --batch 64 --seq 1024 --time "$budget" --eval-every 0 --checkpoint-every 2m \
    --print-every 200 2>&1 | tail -10
  grep -h '"report"' "$work/golf/telemetry.jsonl" 2>/dev/null | tail -1 | cut -c1-300
  echo "== the round trip: int8 artifact under 16 MB, reloaded alone and scored"
  timeout 120 "$kiln" export --format packed "$work/golf" "$work/golf-artifact" --scheme int8 \
    --budget 16MB 2>&1 | tail -2
  timeout 120 "$kiln" eval --backend cuda --artifact "$work/golf-artifact/model.kiln" \
    --run "$work/golf" 2>&1 | tail -3
  ;;
*)
  echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
