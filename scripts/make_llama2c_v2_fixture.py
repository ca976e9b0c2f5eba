#!/usr/bin/env python3
"""Writes tests/fixtures/hf/llama2c/model_v2.bin: the llama2c fixture model in llama2.c's
version 2 format (int8, what runq.c reads), following llama2.c's export.py `version2_export`
and `quantize_q80` in PyTorch, independently of kiln.

It reads model_v1.bin (written by make_hf_fixtures.py, f32, the same tensor order: norms,
final norm, embedding, wq, wk, wv, wo, w1, w2, w3, classifier if untied) and quantizes each
matrix in groups of `group_size` consecutive values: scale = max|w| / 127, codes
round(w / scale). export.py starts from a group of 64 and halves it until it divides dim.

Usage: pip install torch && python3 scripts/make_llama2c_v2_fixture.py
"""

import pathlib
import struct

import torch

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf" / "llama2c"


def quantize_q80(w, group_size):
    w = w.float().reshape(-1, group_size)
    scale = torch.abs(w).max(dim=1).values / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def main():
    raw = (DIR / "model_v1.bin").read_bytes()
    magic, version = struct.unpack_from("Ii", raw, 0)
    assert magic == 0x616B3432 and version == 1
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("7i", raw, 8)
    shared = raw[36]
    head_dim = dim // heads
    floats = torch.frombuffer(bytearray(raw[256:]), dtype=torch.float32)
    at = 0

    def take(n):
        nonlocal at
        t = floats[at:at + n]
        at += n
        return t

    norms = [take(dim) for _ in range(2 * layers)] + [take(dim)]
    sizes = [vocab * dim] + [dim * heads * head_dim] * layers + [dim * kv_heads * head_dim] * layers * 2
    sizes += [heads * head_dim * dim] * layers + [dim * hidden] * layers * 3
    if not shared:
        sizes.append(vocab * dim)
    matrices = [take(n) for n in sizes]
    assert at == floats.numel()

    group_size = 64
    while dim % group_size != 0:
        group_size //= 2
    out = struct.pack("I", 0x616B3432) + struct.pack("i", 2)
    out += struct.pack("7i", dim, hidden, layers, heads, kv_heads, vocab, seq)
    out += struct.pack("B", shared) + struct.pack("i", group_size)
    out += b"\0" * (256 - len(out))
    out += b"".join(t.numpy().astype("<f4").tobytes() for t in norms)
    for w in matrices:
        q, s = quantize_q80(w, group_size)
        out += q.numpy().tobytes() + s.numpy().astype("<f4").tobytes()
    (DIR / "model_v2.bin").write_bytes(out)
    print(f"wrote {DIR / 'model_v2.bin'} ({len(out)} bytes, groups of {group_size})")


if __name__ == "__main__":
    main()
