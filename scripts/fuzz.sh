#!/usr/bin/env bash
# A long fuzzing campaign over every parser (tests/fuzz.rs): N mutated inputs per parser
# (default 100000), in a release build, from stream SEED (default 1; `cargo test` runs
# stream 0). Prints each parser's counts; fails on any panic or over-cap allocation.
#   scripts/fuzz.sh [N] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_FUZZ_INPUTS="${1:-100000}" KILN_FUZZ_SEED="${2:-1}" \
    cargo test --release --locked --test fuzz -- --nocapture
