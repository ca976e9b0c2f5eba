#!/usr/bin/env bash
# kiln's decoding against llama2.c's run.c (f32) and runq.c (int8), and, given a llama.cpp
# build, llama.cpp's llama-bench (f32, bf16, Q8_0), on one llama2.c model file, back to back
# on this machine. The peers are built outside the repository (never committed):
#   - run.c and runq.c from a llama2.c checkout (LLAMA2C_DIR), `-Ofast -march=native
#     -fopenmp`; runq.c runs kiln's int8 export (`kiln export --format llama2c --quantize
#     int8`, byte for byte export.py's file); greedy, 2 threads, 256 positions;
#   - llama-bench (LLAMA_CPP_BIN, optional: the directory holding it, e.g. llama.cpp from the
#     `llama-cpp-python` source package built with CMake) on kiln's GGUF exports (`kiln
#     export --format gguf [--quantize bf16|q8_0]`): `-t 2 -p 256 -n 128`, i.e. a 256-token
#     prompt's tokens/s and 128 tokens generated from an empty context.
#   - PyTorch (eager, 2 threads, with a KV cache; `bench/peers/decode.py`), f32 and bf16, when
#     `import torch` works: a 255-token prompt and 128 tokens from a 1-token prompt.
# kiln runs `bench decode --weights f32|bf16|int8` (bf16 only where the CPU has a native bf16
# dot): a 1-token prompt and 254 tokens against llama2.c; a 255-token prompt (so stories15M's
# 256 positions hold it and one more), and 128 tokens from a 1-token prompt, against
# llama.cpp and PyTorch. Prints tokens/s of each and kiln's ratio to the
# peer of its format.
#
# Usage: [LLAMA_CPP_BIN=DIR] scripts/decode_side_by_side.sh MODEL.bin LLAMA2C_DIR [RUNS]
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
llama="${LLAMA_CPP_BIN:-}"
if [ -n "$llama" ]; then
  "$kiln" export --format gguf "$model" "$out/gguf-f32" >/dev/null 2>&1
  "$kiln" export --format gguf --quantize bf16 "$model" "$out/gguf-bf16" >/dev/null 2>&1
  "$kiln" export --format gguf --quantize q8_0 "$model" "$out/gguf-int8" >/dev/null 2>&1
fi
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $model; results in $out"
peer() { # name binary model
  OMP_NUM_THREADS=2 "$2" "$3" -z "$tokenizer" -t 0 -n 256 -i "Once" 2>&1 >/dev/null \
    | grep -ao "achieved tok/s: [0-9.]*" | sed "s/achieved tok\/s: /$1: /" | tee -a "$out/$1.txt"
}
bench() { # weights name args...
  local weights="$1" name="$2"
  shift 2
  if KILN_WEIGHTS="$weights" RUST_BACKTRACE=0 "$kiln" bench decode --model "$model" "$@" \
      --json "$out/$name.json" >/dev/null 2>"$out/err.txt"; then
    python3 -c "import json,sys; f=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: prefill {f[\"prefill_tokens_per_s\"]:.1f} decode {f[\"decode_tokens_per_s\"]:.1f}')" \
      "$out/$name.json" "$name"
  else
    echo "$name: skipped ($(tail -1 "$out/err.txt"))"
  fi
}
for i in $(seq "$runs"); do
  peer run.c "$out/run" "$model"
  peer runq.c "$out/runq" "$out/int8/model.bin"
  for weights in f32 bf16 int8; do
    bench "$weights" "kiln-$weights-$i" --prompt 1 --tokens 254
    if [ "$weights" != int8 ] && python3 -c "import torch" 2>/dev/null; then
      python3 "$repo/bench/peers/decode.py" "$model" --prompt 255 --tokens 1 --mode "$weights" \
        >"$out/torch-prompt-$weights-$i.json"
      python3 "$repo/bench/peers/decode.py" "$model" --prompt 1 --tokens 128 --mode "$weights" \
        >"$out/torch-gen-$weights-$i.json"
    fi
    if [ -n "$llama" ] || python3 -c "import torch" 2>/dev/null; then
      bench "$weights" "kiln-prompt-$weights-$i" --prompt 255 --tokens 1
      bench "$weights" "kiln-gen-$weights-$i" --prompt 1 --tokens 128
    fi
    if [ -n "$llama" ]; then
      "$llama/llama-bench" -m "$out/gguf-$weights/model.gguf" -t 2 -p 256 -n 128 -r 1 -o json \
        2>/dev/null >"$out/llama-$weights-$i.json" || true
    fi
  done
done
python3 - "$out" <<'PY'
import glob, json, re, statistics, sys
out = sys.argv[1]
def peer(name):
    return statistics.median(float(x) for x in re.findall(r"[0-9.]+$", open(f"{out}/{name}.txt").read(), re.M))
def kiln(name, key):
    rates = [json.load(open(p))[key] for p in glob.glob(f"{out}/{name}-*.json")]
    return statistics.median(rates) if rates else None
peers = {"run.c": peer("run.c"), "runq.c": peer("runq.c")}
print()
for name, rate in peers.items():
    print(f"{name} median {rate:.1f} tokens/s")
for weights, against in [("f32", "run.c"), ("bf16", "run.c"), ("int8", "runq.c")]:
    m = kiln(f"kiln-{weights}", "decode_tokens_per_s")
    if m:
        print(f"kiln {weights} median {m:.1f} tokens/s: {m / peers[against]:.2f}x {against}")
llama = {}
for path in glob.glob(f"{out}/llama-*.json"):
    weights = path.split("llama-")[1].rsplit("-", 1)[0]
    try:
        for test in json.load(open(path)):
            key = "prompt" if test["n_prompt"] else "gen"
            llama.setdefault((weights, key), []).append(test["avg_ts"])
    except (ValueError, KeyError):
        pass
for weights in ["f32", "bf16", "int8"]:
    for key, field, what in [("prompt", "prefill_tokens_per_s", "prompt of 255-256"),
                             ("gen", "decode_tokens_per_s", "128 generated")]:
        theirs, ours = llama.get((weights, key)), kiln(f"kiln-{key}-{weights}", field)
        if theirs and ours:
            t = statistics.median(theirs)
            name = {"f32": "f32", "bf16": "bf16", "int8": "Q8_0"}[weights]
            print(f"{what}, {weights}: kiln {ours:.1f}, llama.cpp {name} {t:.1f}: {ours / t:.2f}x")
for weights in ["f32", "bf16"]:
    for key, field, what in [("prompt", "prefill_tokens_per_s", "prompt of 255-256"),
                             ("gen", "decode_tokens_per_s", "128 generated")]:
        theirs = [json.load(open(p))[field] for p in glob.glob(f"{out}/torch-{key}-{weights}-*.json")]
        ours = kiln(f"kiln-{key}-{weights}", field)
        if theirs and ours:
            t = statistics.median(theirs)
            print(f"{what}, {weights}: kiln {ours:.1f}, PyTorch {t:.1f}: {ours / t:.2f}x")
PY
