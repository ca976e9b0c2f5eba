#!/usr/bin/env bash
# Two processes of one thread (mpirun) against one process of two threads, in turn, on the
# same model, data and tokens per step: the README's "Training across processes" table.
#
#   bash scripts/mpi_side_by_side.sh DATA [MODEL] [STEPS] [REPEATS]
#
# DATA: a prepared corpus (kiln data prepare); MODEL: a preset (default stories15m); STEPS per
# run (default 20); REPEATS of the three configurations (default 3). Each run trains
# 8 sequences of 256 tokens per step: 1 process --batch 4 --accum 2, 1 process --batch 8, and
# 2 processes --batch 4. Figures are the runs' report.json (training stages only).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:?usage: $0 DATA [MODEL] [STEPS] [REPEATS]}"
model="${2:-stories15m}"
steps="${3:-20}"
repeats="${4:-3}"
cargo build --release --features mpi --quiet
kiln="$PWD/target/release/kiln"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
common=(--data "$data" --model "$model" --seq 256 --steps "$steps" --eval-every 0
    --eval-batches 1 --checkpoint-every 0 --print-every 1000)
report() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2] + "/report.json"))
s, n = r["stage_seconds"], r["steps"]
print(f"{sys.argv[1]:<32} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_second']:8.0f} tokens/s"
      f"  all-reduce {1e3 * s.get('allreduce', 0) / n:6.1f} ms/step"
      f"  optimizer {1e3 * s['optimizer'] / n:5.1f} ms/step")
EOF
}
for rep in $(seq "$repeats"); do
    KILN_THREADS=2 "$kiln" train "${common[@]}" --batch 4 --accum 2 --out "$work/a$rep" >/dev/null 2>&1
    report "1 process x 2 threads, accum 2" "$work/a$rep"
    KILN_THREADS=2 "$kiln" train "${common[@]}" --batch 8 --out "$work/c$rep" >/dev/null 2>&1
    report "1 process x 2 threads, batch 8" "$work/c$rep"
    KILN_THREADS=1 mpirun -np 2 "$kiln" train "${common[@]}" --batch 4 --out "$work/b$rep" >/dev/null 2>&1
    report "2 processes x 1 thread" "$work/b$rep"
done
