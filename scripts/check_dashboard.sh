#!/usr/bin/env bash
# Drives `kiln train --dashboard` under tmux against a short training run and asserts on the
# captured screen: curves drawn, the stage bar, a text sample; then replays the finished run
# with `kiln dashboard`, switches the x axis and the curve with keys, and quits with `q`.
# Also checks `kiln report` and the TensorBoard files exist. Needs tmux (installs it with
# apt-get when missing and run as root). Leaves the screens in $OUT (default: a temp dir).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kiln="${KILN:-${CARGO_TARGET_DIR:-$repo/target}/release/kiln}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
if ! command -v tmux >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq tmux >/dev/null; else echo "tmux is required" >&2; exit 1; fi
fi
[ -x "$kiln" ] || (cd "$repo" && cargo build --release --locked)

work="$(mktemp -d)"
session="kiln-check-$$"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A small corpus: kiln's own sources.
"$kiln" data prepare --input "$repo/src" --out "$work/data" --tokenizer bpe:512 >/dev/null 2>&1
cat > "$work/model.json" <<'JSON'
{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_dim": 128, "vocab_size": 512,
 "max_seq_len": 64, "rope_theta": 10000.0, "norm_eps": 1e-5, "qk_norm": false, "tie_embeddings": true}
JSON
run="$work/run"
tmux new-session -d -s "$session" -x 150 -y 48 \
  "'$kiln' train --data '$work/data' --model '$work/model.json' --out '$run' --batch 8 --seq 64 --time 25s \
     --lr 3e-3 --warmup 10 --eval-every 40 --eval-batches 4 --checkpoint-every 40 --tensorboard --dashboard; sleep 600"

fail() { echo "FAIL: $1"; echo "--- screen:"; cat "$2"; exit 1; }
expect() { # expect SCREEN_FILE PATTERN DESCRIPTION
  grep -q -- "$2" "$1" || fail "$3 (no '$2' on screen)" "$1"
  echo "ok: $3"
}

sleep 15
tmux capture-pane -t "$session" -p > "$out/live.txt"
tmux capture-pane -t "$session" -p -e > "$out/live.ansi"
expect "$out/live.txt" "loss vs step" "live: the loss chart is titled"
python3 -c 'import sys; t = open(sys.argv[1], encoding="utf-8").read(); sys.exit(0 if sum(0x2801 <= ord(c) <= 0x28FF for c in t) > 50 else 1)' "$out/live.txt" \
  || fail "live: no curve drawn (no braille cells)" "$out/live.txt"
echo "ok: live: curves are drawn"
expect "$out/live.txt" "forward" "live: the stage bar names the forward pass"
expect "$out/live.txt" "backward" "live: the stage bar names the backward pass"
expect "$out/live.txt" "tokens/s" "live: throughput is shown"
expect "$out/live.txt" "cpu0" "live: per-core CPU use is shown"
expect "$out/live.txt" "eta" "live: progress and ETA are shown"

sleep 20
tmux capture-pane -t "$session" -p > "$out/finished.txt"
tmux capture-pane -t "$session" -p -e > "$out/finished.ansi"
expect "$out/finished.txt" "finished" "end: the run is marked finished"
expect "$out/finished.txt" "sample · step" "end: a text sample from a checkpoint is shown"
tmux send-keys -t "$session" q
sleep 2
tmux capture-pane -t "$session" -p > "$out/after-q.txt"
expect "$out/after-q.txt" "efficiency report" "q leaves the dashboard and training prints its report"
tmux kill-session -t "$session"

# Replay the finished run; switch the x axis and the curve.
tmux new-session -d -s "$session" -x 150 -y 48 "'$kiln' dashboard '$run' --sample-tokens 0; sleep 600"
sleep 3
tmux send-keys -t "$session" x
tmux send-keys -t "$session" c
sleep 2
tmux capture-pane -t "$session" -p > "$out/replay.txt"
expect "$out/replay.txt" "learning rate vs tokens" "replay: x switches to tokens and c to the learning rate"
tmux send-keys -t "$session" q
sleep 1

"$kiln" report "$run" --out "$out/report" >/dev/null
for f in loss_vs_steps.png loss_vs_tokens.svg throughput.png learning_rate.png report.md; do
  [ -s "$out/report/$f" ] || { echo "FAIL: kiln report wrote no $f"; exit 1; }
done
echo "ok: kiln report wrote plots and report.md"
ls "$run"/tensorboard/events.out.tfevents.* >/dev/null && echo "ok: TensorBoard event file written"
cp -r "$run/tensorboard" "$run/telemetry.jsonl" "$out/"
echo "dashboard check passed; screens in $out"
