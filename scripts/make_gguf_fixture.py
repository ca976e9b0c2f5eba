#!/usr/bin/env python3
"""Writes tests/fixtures/hf/llama2c/model_{f32,q8_0}.gguf: the llama2c fixture model as GGUF
files written by llama.cpp's own Python package (gguf-py's GGUFWriter and its Q8_0
quantizer), independently of kiln, for kiln's GGUF reader to be held to.

It reads model_v1.bin (make_hf_fixtures.py; f32, llama2.c's order, q and k rows already in
the interleaved RoPE pairing GGUF uses) and writes the llama architecture's tensors and
metadata (no tokenizer: kiln reads it from beside the file).

Usage: PYTHONPATH=LLAMA_CPP/gguf-py python3 scripts/make_gguf_fixture.py
  (gguf-py ships with llama.cpp, e.g. the llama-cpp-python 0.3.36 source package's
  vendor/llama.cpp/gguf-py; it needs numpy)
"""

import pathlib
import struct

import numpy as np
import gguf

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf" / "llama2c"


def main():
    raw = (DIR / "model_v1.bin").read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("7i", raw, 8)
    shared = raw[36]
    head_dim = dim // heads
    floats = np.frombuffer(raw[256:], dtype="<f4")
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        t = floats[at:at + n].reshape(shape)
        at += n
        return t

    attn_norm = [take(dim) for _ in range(layers)]
    ffn_norm = [take(dim) for _ in range(layers)]
    out_norm = take(dim)
    embed = take(vocab, dim)
    wq = [take(heads * head_dim, dim) for _ in range(layers)]
    wk = [take(kv_heads * head_dim, dim) for _ in range(layers)]
    wv = [take(kv_heads * head_dim, dim) for _ in range(layers)]
    wo = [take(dim, heads * head_dim) for _ in range(layers)]
    w1 = [take(hidden, dim) for _ in range(layers)]
    w2 = [take(dim, hidden) for _ in range(layers)]
    w3 = [take(hidden, dim) for _ in range(layers)]
    output = None if shared else take(vocab, dim)
    assert at == floats.size

    for name, kind in [("f32", gguf.GGMLQuantizationType.F32), ("q8_0", gguf.GGMLQuantizationType.Q8_0)]:
        w = gguf.GGUFWriter(str(DIR / f"model_{name}.gguf"), "llama")
        w.add_context_length(seq)
        w.add_embedding_length(dim)
        w.add_block_count(layers)
        w.add_feed_forward_length(hidden)
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)

        def matrix(tensor_name, t):
            t = np.ascontiguousarray(t, dtype=np.float32)
            if kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tensor_name, t)
            else:
                w.add_tensor(tensor_name, gguf.quants.quantize(t, kind), raw_dtype=kind)

        matrix("token_embd.weight", embed)
        for i in range(layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ascontiguousarray(attn_norm[i]))
            matrix(f"blk.{i}.attn_q.weight", wq[i])
            matrix(f"blk.{i}.attn_k.weight", wk[i])
            matrix(f"blk.{i}.attn_v.weight", wv[i])
            matrix(f"blk.{i}.attn_output.weight", wo[i])
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ascontiguousarray(ffn_norm[i]))
            matrix(f"blk.{i}.ffn_gate.weight", w1[i])
            matrix(f"blk.{i}.ffn_down.weight", w2[i])
            matrix(f"blk.{i}.ffn_up.weight", w3[i])
        w.add_tensor("output_norm.weight", np.ascontiguousarray(out_norm))
        if output is not None:
            matrix("output.weight", output)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"wrote {DIR / f'model_{name}.gguf'}")


if __name__ == "__main__":
    main()
