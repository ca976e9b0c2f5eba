#!/usr/bin/env bash
# The CUDA backend's whole check on a GPU machine, in one command (a lent GPU machine has no
# Rust toolchain, so the binaries are built here first and carried there):
#
#   bash scripts/gpu_check.sh stage     # here: release binaries, stripped, into .dev/
#   bash scripts/gpu_check.sh run       # there, from the repository root, .dev/ carried
#
# `run` prints the GPU and kiln doctor's view; compiles every kernel (NVRTC); runs the
# conformance suite on the GPU (KILN_REQUIRE_CUDA=1: no GPU is a failure); times training
# steps of stories110m and golf-baseline with `kiln bench train --backend cuda` and each kernel
# with `kiln bench kernels`, with each attention path (KILN_CUDA_ATTENTION=flash, gemm), then the
# PyTorch peer (bench/peers/train_step.py --device cuda, eager bf16 and torch.compile bf16)
# on the same model and batch, and prints kiln's tokens/s over PyTorch's; trains golf-baseline
# through NCCL with world size 1 (`kiln train --gpus 1`) on a corpus made of this repository's
# text, under a time budget (KILN_GPU_TIME=10m for the challenge's), exports it as an int8
# artifact under 16 MB and scores the round trip. Results go to $OUT (or
# .dev/out). Environment: KILN_GPU_BATCH/SEQ (default 256 × 256), KILN_GPU_TIME (60s).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
case "${1:-}" in
stage)
  set -e
  cargo build --release --locked
  out="$(cargo test --release --locked -p kiln-cuda --no-run 2>&1)"
  mkdir -p .dev
  strip -o .dev/kiln target/release/kiln
  for t in conformance nvrtc; do
    bin="$(echo "$out" | grep -o "target/release/deps/$t-[0-9a-f]*" | head -1)"
    strip -o ".dev/cuda-$t" "$bin"
  done
  grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
  ls -la .dev
  ;;
run)
  out="${OUT:-.dev/out}"; mkdir -p "$out"
  batch="${KILN_GPU_BATCH:-256}"; seq="${KILN_GPU_SEQ:-256}"; budget="${KILN_GPU_TIME:-60s}"
  kiln=.dev/kiln
  # The test binaries find the fixtures at the path they were built in.
  built="$(strings .dev/cuda-conformance | grep -o '/[^ ]*/crates/cuda' | head -1)"
  if [ -n "$built" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$(dirname "$built")")"; ln -sfn "$repo" "$(dirname "$(dirname "$built")")"; fi
  nvidia-smi -L; nvidia-smi --query-gpu=driver_version,clocks.max.sm,memory.total --format=csv
  "$kiln" doctor | tail -14
  export KILN_REQUIRE_CUDA=1 KILN_REQUIRE_NVRTC=1
  timeout 60 .dev/cuda-nvrtc --nocapture 2>&1 | tail -4
  timeout 300 .dev/cuda-conformance --nocapture --test-threads 1 2>&1 | tee "$out/conformance.log" | grep -v '^\s*[0-9]*: \|^\s*at ' | tail -30
  for attn in flash gemm; do
    for preset in stories110m golf-baseline; do
      echo "== kiln cuda $preset, batch $batch × seq $seq, $attn attention"
      KILN_CUDA_ATTENTION="$attn" timeout 120 "$kiln" bench train --backend cuda --preset "$preset" \
        --batch "$batch" --seq "$seq" --steps 5 --json "$out/kiln-$preset-$attn.json" 2>&1 | tail -2
    done
  done
  echo "== kiln cuda kernels, stories110m batch 64 × 256 (where the step's time goes)"
  for attn in flash gemm; do
    KILN_CUDA_ATTENTION="$attn" timeout 150 "$kiln" bench kernels --backend cuda --preset stories110m \
      --batch 64 --seq 256 --reps 2 > "$out/kernels-$attn.txt" 2>&1; tail -40 "$out/kernels-$attn.txt"
  done
  for mode in bf16 compile-bf16; do
    echo "== pytorch $mode stories110m"
    timeout 200 python3 bench/peers/train_step.py --device cuda --mode "$mode" --preset stories110m \
      --batch "$batch" --seq "$seq" --steps 5 > "$out/torch-$mode.json" 2> "$out/torch-$mode.log"
    cat "$out/torch-$mode.json"
  done
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for attn in ("flash", "gemm"):
    try:
        k = json.load(open(f"{out}/kiln-stories110m-{attn}.json"))
        for mode in ("bf16", "compile-bf16"):
            t = json.load(open(f"{out}/torch-{mode}.json"))
            print(f"stories110m, {attn} attention: kiln {k['ms_per_step']:.1f} ms/step, PyTorch {mode} "
                  f"{t['ms_per_step']:.1f}: kiln's tokens/s are {t['ms_per_step'] / k['ms_per_step']:.3f}× PyTorch's")
    except Exception as e:
        print(f"no ratio for {attn} attention: {e}")
PY
  echo "== NCCL, world size 1: golf-baseline for $budget on this repository's text"
  mkdir -p "$out/text" && cp README.md "$out/text/" && find crates src -name '*.rs' -exec cat {} + > "$out/text/code.txt"
  "$kiln" data prepare --input "$out/text" --out "$out/data" --tokenizer bpe:1024 2>&1 | tail -2
  timeout 300 "$kiln" train --gpus 1 --data "$out/data" --model golf-baseline --out "$out/golf" \
    --time "$budget" --eval-every 0 --print-every 50 2>&1 | tail -8
  grep -h '"tokens"' "$out/golf/telemetry.jsonl" 2>/dev/null | tail -1 | cut -c1-300
  echo "== the round trip: int8 artifact under 16 MB, reloaded alone and scored"
  timeout 120 "$kiln" export --format packed "$out/golf" "$out/golf-artifact" --scheme int8 \
    --budget 16MB 2>&1 | tail -4
  timeout 120 "$kiln" eval --backend cuda --artifact "$out/golf-artifact/model.kiln" \
    --run "$out/golf" 2>&1 | tail -4
  ;;
*)
  echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
