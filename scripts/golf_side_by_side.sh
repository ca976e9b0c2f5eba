#!/usr/bin/env bash
# kiln vs the PyTorch peer (bench/peers/golf.py) on `golf-baseline`, side by side: the same
# prepared shards, the same wall-clock budget, the same batch and schedule, then each one's
# int8 export reloaded and scored on the same validation windows. Prints the steps each
# reached and the two round-trip bits-per-byte. Run it on an otherwise idle machine, one
# engine after the other.
#
#   scripts/golf_side_by_side.sh DATA_DIR [BUDGET_SECONDS] [BATCH] [WARMDOWN_STEPS]
#
# DATA_DIR comes from `kiln data prepare --tokenizer bpe:1024`. Needs torch and tokenizers
# (pip) for the peer.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$1"
budget="${2:-600}"
batch="${3:-8}"
warmdown="${4:-100}"
seq=256
kiln="${CARGO_TARGET_DIR:-$repo/target}/release/kiln"
out="${GOLF_OUT:-$repo/runs/golf-side-by-side-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
(cd "$repo" && cargo build --release --locked)

echo "== kiln: golf-baseline for ${budget}s"
"$kiln" train --data "$data" --model golf-baseline --out "$out/kiln" --batch "$batch" --seq "$seq" \
  --time "${budget}s" --optimizer muon --schedule warmdown --warmdown-steps "$warmdown" --warmup 0 \
  --grad-clip 0 --weight-decay 0 --eval-every 0 --eval-batches 0 --checkpoint-every 0 --print-every 10
"$kiln" export --format packed "$out/kiln" "$out/kiln-packed" --scheme int8 --budget 16MB
"$kiln" eval --artifact "$out/kiln-packed/model.kiln" --run "$out/kiln" --batch 8 --seq "$seq" \
  | tee "$out/kiln-eval.txt"

echo "== PyTorch peer: the same for ${budget}s"
python3 "$repo/bench/peers/golf.py" --data "$data" --time "$budget" --batch "$batch" --seq "$seq" \
  --warmdown-steps "$warmdown" --eval-batch 8 --json "$out/peer.json"

python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
report = json.load(open(out / "kiln" / "report.json"))
lines = [json.loads(l) for l in open(out / "kiln-eval.txt") if l.startswith("{")]
art = next(l["result"] for l in lines if l["what"].startswith("artifact"))
mod = next(l["result"] for l in lines if l["what"] == "model")
peer = json.load(open(out / "peer.json"))
size = (out / "kiln-packed" / "model.kiln").stat().st_size
print()
print(f"{'':<10}{'steps':>8}{'ms/step':>10}{'val bpb':>10}{'round-trip bpb':>16}{'artifact bytes':>16}")
print(f"{'kiln':<10}{report['steps']:>8}{report['ms_per_step']:>10.0f}{mod['bits_per_byte']:>10.4f}{art['bits_per_byte']:>16.4f}{size:>16,}")
print(f"{'pytorch':<10}{peer['steps']:>8}{peer['ms_per_step']:>10.0f}{peer['val_bpb']:>10.4f}{peer['roundtrip_bpb']:>16.4f}{peer['artifact_bytes']:>16,}")
print(f"steps ratio kiln/pytorch: {report['steps'] / peer['steps']:.2f}")
PY
