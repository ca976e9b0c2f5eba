#!/usr/bin/env bash
# The fault tests (tests/faults.rs) with N SIGKILLs (default 100) at random moments of a run
# that checkpoints every step, in a release build; the other faults (Ctrl-C twice, a full
# disk, a second trainer) run once. Fails if a kill leaves the newest checkpoint unloadable
# or the resumed run's losses differ from an uninterrupted one's.
#   scripts/faults.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_KILLS="${1:-100}" cargo test --release --locked --test faults -- --nocapture --test-threads 1
