#!/usr/bin/env bash
# kiln's decoding against llama2.c's run.c on one llama2.c model file, back to back on this
# machine: `kiln bench decode` in f32 and (where the CPU has a native bf16 dot) bf16, then
# run.c built here from a llama2.c checkout (never committed: pass its directory). Greedy,
# 2 threads, 256 positions. Prints tokens/s of each and kiln's ratio to run.c.
#
# Usage: scripts/decode_side_by_side.sh MODEL.bin LLAMA2C_DIR [RUNS]
#   MODEL.bin has tokenizer.bin beside it; LLAMA2C_DIR holds run.c.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$1"
llama2c="$2"
runs="${3:-3}"
tokenizer="$(dirname "$model")/tokenizer.bin"
(cd "$repo" && cargo build --release --locked >/dev/null)
kiln="${CARGO_TARGET_DIR:-$repo/target}/release/kiln"
out="$(mktemp -d)"
gcc -Ofast -march=native -fopenmp -o "$out/run" "$llama2c/run.c" -lm
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $model; results in $out"
for i in $(seq "$runs"); do
  OMP_NUM_THREADS=2 "$out/run" "$model" -z "$tokenizer" -t 0 -n 256 -i "Once" 2>&1 >/dev/null \
    | grep -ao "achieved tok/s: [0-9.]*" | sed 's/achieved tok\/s: /run.c f32: /' | tee -a "$out/run.txt"
  for precision in f32 bf16; do
    if KILN_PRECISION="$precision" RUST_BACKTRACE=0 "$kiln" bench decode --model "$model" \
        --prompt 1 --tokens 254 --json "$out/kiln-$precision-$i.json" >/dev/null 2>"$out/err.txt"; then
      python3 -c "import json,sys; f=json.load(open(sys.argv[1])); print(f'kiln {sys.argv[2]}: {f[\"decode_tokens_per_s\"]:.1f}')" \
        "$out/kiln-$precision-$i.json" "$precision"
    else
      echo "kiln $precision: skipped ($(tail -1 "$out/err.txt"))"
    fi
  done
done
python3 - "$out" <<'PY'
import glob, json, re, statistics, sys
out = sys.argv[1]
run = [float(x) for x in re.findall(r"[0-9.]+$", open(f"{out}/run.txt").read(), re.M)]
print(f"\nrun.c f32 median {statistics.median(run):.1f} tokens/s")
for precision in ["f32", "bf16"]:
    rates = [json.load(open(p))["decode_tokens_per_s"] for p in glob.glob(f"{out}/kiln-{precision}-*.json")]
    if rates:
        m = statistics.median(rates)
        print(f"kiln {precision} median {m:.1f} tokens/s: {m / statistics.median(run):.2f}x run.c")
PY
