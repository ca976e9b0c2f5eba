#!/usr/bin/env python3
"""Reads a kiln run's TensorBoard event files back with the `tensorboard` package and checks
that its scalars are the run's telemetry: every step's loss, learning rate and gradient norm,
and every validation loss and bits-per-byte, at the right steps (to f32 precision, which is
what event files store).

Usage: pip install tensorboard && python3 scripts/check_tensorboard.py RUN_DIR
(`kiln train --tensorboard` writes RUN_DIR/tensorboard/; scripts/check_dashboard.sh makes one.)
"""

import json
import math
import pathlib
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = pathlib.Path(sys.argv[1])
acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
acc.Reload()
tags = set(acc.Tags()["scalars"])
lines = [json.loads(l) for l in (run / "telemetry.jsonl").read_text().splitlines() if l.strip()]
expected = {
    "train/loss": [(l["step"], l["loss"]) for l in lines if l["type"] == "step"],
    "train/learning_rate": [(l["step"], l["lr"]) for l in lines if l["type"] == "step"],
    "train/grad_norm": [(l["step"], l["grad_norm"]) for l in lines if l["type"] == "step"],
    "val/loss": [(l["step"], l["val_loss"]) for l in lines if l["type"] == "eval"],
    "val/bits_per_byte": [(l["step"], l["val_bpb"]) for l in lines if l["type"] == "eval"],
}
failures = 0
for tag, want in expected.items():
    if tag not in tags:
        print(f"FAIL: no scalar '{tag}' in the event files (found {sorted(tags)})")
        failures += 1
        continue
    got = [(e.step, e.value) for e in acc.Scalars(tag)]
    same = len(got) == len(want) and all(
        gs == ws and math.isclose(gv, wv, rel_tol=1e-6, abs_tol=1e-7) for (gs, gv), (ws, wv) in zip(got, want))
    print(f"{'ok' if same else 'FAIL'}: {tag}: {len(got)} values read back, {len(want)} in telemetry")
    failures += not same
sys.exit(1 if failures else 0)
