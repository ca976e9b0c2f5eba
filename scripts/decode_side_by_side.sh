#!/usr/bin/env bash
# kiln's decoding against llama2.c's run.c (f32) and runq.c (int8) on one llama2.c model file,
# back to back on this machine: `kiln bench decode --weights f32|bf16|int8` (bf16 only where
# the CPU has a native bf16 dot), run.c on the file, runq.c on kiln's int8 export of it
# (`kiln export --format llama2c --quantize int8`, byte for byte export.py's file). The peers
# are built here from a llama2.c checkout (never committed: pass its directory). Greedy, 2
# threads, 256 positions. Prints tokens/s of each and kiln's ratio to the peer of its format.
#
# Usage: scripts/decode_side_by_side.sh MODEL.bin LLAMA2C_DIR [RUNS]
#   MODEL.bin has tokenizer.bin beside it; LLAMA2C_DIR holds run.c and runq.c.
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
gcc -Ofast -march=native -fopenmp -o "$out/runq" "$llama2c/runq.c" -lm
"$kiln" export --format llama2c --quantize int8 "$model" "$out/int8" >/dev/null 2>&1
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $model; results in $out"
peer() { # name binary model
  OMP_NUM_THREADS=2 "$2" "$3" -z "$tokenizer" -t 0 -n 256 -i "Once" 2>&1 >/dev/null \
    | grep -ao "achieved tok/s: [0-9.]*" | sed "s/achieved tok\/s: /$1: /" | tee -a "$out/$1.txt"
}
for i in $(seq "$runs"); do
  peer run.c "$out/run" "$model"
  peer runq.c "$out/runq" "$out/int8/model.bin"
  for weights in f32 bf16 int8; do
    if KILN_WEIGHTS="$weights" RUST_BACKTRACE=0 "$kiln" bench decode --model "$model" \
        --prompt 1 --tokens 254 --json "$out/kiln-$weights-$i.json" >/dev/null 2>"$out/err.txt"; then
      python3 -c "import json,sys; f=json.load(open(sys.argv[1])); print(f'kiln {sys.argv[2]}: {f[\"decode_tokens_per_s\"]:.1f}')" \
        "$out/kiln-$weights-$i.json" "$weights"
    else
      echo "kiln $weights: skipped ($(tail -1 "$out/err.txt"))"
    fi
  done
done
python3 - "$out" <<'PY'
import glob, json, re, statistics, sys
out = sys.argv[1]
def peer(name):
    return statistics.median(float(x) for x in re.findall(r"[0-9.]+$", open(f"{out}/{name}.txt").read(), re.M))
peers = {"run.c": peer("run.c"), "runq.c": peer("runq.c")}
print()
for name, rate in peers.items():
    print(f"{name} median {rate:.1f} tokens/s")
for weights, against in [("f32", "run.c"), ("bf16", "run.c"), ("int8", "runq.c")]:
    rates = [json.load(open(p))["decode_tokens_per_s"] for p in glob.glob(f"{out}/kiln-{weights}-*.json")]
    if rates:
        m = statistics.median(rates)
        print(f"kiln {weights} median {m:.1f} tokens/s: {m / peers[against]:.2f}x {against}")
PY
