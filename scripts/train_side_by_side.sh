#!/usr/bin/env bash
# kiln against the PyTorch peer on one training step, back to back on this machine:
# `kiln bench train` at every CPU tier the machine has (each lower tier through KILN_ISA) in
# each precision the tier offers, and the reference backend; then bench/peers/train_step.py
# (the same model, batch, sequence and vocabulary: 32000 tokens, or the preset's) in f32 eager, bf16 autocast
# eager and torch.compile. Prints ms per step, tokens/s, peak RSS, and each kiln figure's
# speed-up over PyTorch's best, with the CPU.
#
# Usage: scripts/train_side_by_side.sh [PRESET] [BATCH] [SEQ] [STEPS]
# Needs: a Rust toolchain (or KILN_BIN, a kiln binary built elsewhere: scripts/cpu_check.sh);
# python3 with torch (pip install torch).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
preset="${1:-stories15m}"
batch="${2:-4}"
seq="${3:-256}"
steps="${4:-5}"
cd "$repo"
kiln="${KILN_BIN:-}"
if [ -z "$kiln" ]; then
  cargo build --release --locked >/dev/null
  kiln="${CARGO_TARGET_DIR:-$repo/target}/release/kiln"
fi
out="$(mktemp -d)"
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $preset, batch $batch × seq $seq; results in $out"

run_kiln() { # name, then environment assignments
  local name="$1"; shift
  if env RUST_BACKTRACE=0 "$@" "$kiln" bench train --preset "$preset" --batch "$batch" --seq "$seq" --steps "$steps" \
      --json "$out/kiln-$name.json" >"$out/kiln-$name.log" 2>&1; then
    echo "kiln $name: $(tail -1 "$out/kiln-$name.log" | cut -c1-60)"
  else
    echo "kiln $name: skipped ($(tail -1 "$out/kiln-$name.log"))"
    rm -f "$out/kiln-$name.json"
  fi
}
for tier in avx2 avx512 avx512bf16 amx; do
  for precision in bf16 f32; do
    run_kiln "$tier-$precision" KILN_BACKEND=cpu KILN_ISA="$tier" KILN_PRECISION="$precision"
  done
done
run_kiln reference KILN_BACKEND=reference

for mode in f32 bf16 compile; do
  if python3 bench/peers/train_step.py --preset "$preset" --batch "$batch" --seq "$seq" \
      --steps "$steps" --mode "$mode" >"$out/torch-$mode.json" 2>"$out/torch-$mode.log"; then
    echo "pytorch $mode: $(cut -c1-80 "$out/torch-$mode.json")"
  else
    echo "pytorch $mode: failed ($(tail -1 "$out/torch-$mode.log"))"
    rm -f "$out/torch-$mode.json"
  fi
done

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
torch = {os.path.basename(p)[6:-5]: json.load(open(p)) for p in glob.glob(f"{out}/torch-*.json")}
kiln = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/kiln-*.json"))]
best = min((t["ms_per_step"], m) for m, t in torch.items()) if torch else None
seen = set()
print()
print(f"{'':52} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6} {'RSS MiB':>8} {'vs PyTorch best':>16}")
for k in kiln:
    if k["backend"] in seen:  # KILN_ISA above this machine's best falls back to the best
        continue
    seen.add(k["backend"])
    ratio = f"{best[0] / k['ms_per_step']:.2f}x" if best else "-"
    print(f"kiln {k['backend']:<47} {k['ms_per_step']:9.1f} {k['tokens_per_s']:9.0f} "
          f"{100 * k['mfu']:5.1f}% {k['peak_rss_mib'] or 0:8.0f} {ratio:>16}")
for mode, t in sorted(torch.items()):
    tokens = t["batch"] * t["seq"] / t["ms_per_step"] * 1e3
    print(f"{t['peer']:<57} {t['ms_per_step']:9.1f} {tokens:9.0f} {'':>6} {t['peak_rss_mib']:8.0f}")
if best:
    print(f"PyTorch's best: {best[1]} at {best[0]:.1f} ms/step")
PY
