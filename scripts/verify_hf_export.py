#!/usr/bin/env python3
"""Checks a `kiln export --format hf` directory with Hugging Face transformers.

Loads the directory with AutoModelForCausalLM.from_pretrained (and its tokenizer.json with
PreTrainedTokenizerFast, when present), runs a few tokens through it, runs the same tokens
through `kiln model logits`, and compares. Exits 1 if the largest difference exceeds the
tolerance (f32 on both sides, different summation orders: 1e-3 absolute on O(10) logits).

Usage: python3 scripts/verify_hf_export.py EXPORT_DIR [--kiln target/release/kiln]
"""

import argparse
import json
import pathlib
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

parser = argparse.ArgumentParser()
parser.add_argument("export_dir")
parser.add_argument("--kiln", default="target/release/kiln")
parser.add_argument("--text", default="ROMEO. But soft, what light through yonder window breaks?")
parser.add_argument("--tolerance", type=float, default=1e-3)
args = parser.parse_args()

directory = pathlib.Path(args.export_dir)
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
tokenizer_file = directory / "tokenizer.json"
if tokenizer_file.exists():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    ids = tokenizer.encode(args.text)[:32]
    print(f"tokenizer: {len(ids)} tokens for {args.text!r}; decodes back to {tokenizer.decode(ids)!r}")
else:
    ids = list(range(3, 19))
with torch.no_grad():
    expected = model(torch.tensor([ids])).logits[0]
out = subprocess.run([args.kiln, "model", "logits", "--model", str(directory), "--tokens", ",".join(map(str, ids))],
                     check=True, capture_output=True, text=True).stdout
got = torch.tensor(json.loads(out)).reshape(expected.shape)
diff = (got - expected).abs().max().item()
same_argmax = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
print(f"{model.__class__.__name__}: {len(ids)} positions x {expected.shape[-1]} logits, "
      f"max |kiln - transformers| = {diff:.2e}, same argmax at {same_argmax:.0%} of positions")
sys.exit(0 if diff <= args.tolerance else 1)
