#!/usr/bin/env python3
"""The PyTorch peer of `kiln bench decode`: greedy decoding of a llama2.c model file
(the legacy format run.c reads) with a KV cache, in eager PyTorch on the CPU. The model is
llama2.c's `model.py` Llama (RMSNorm, RoPE on interleaved pairs, causal attention with
grouped kv heads, SwiGLU); the cache is preallocated for the whole run and each step
attends to the filled part. Prints one JSON line: the prompt's tokens/s (one batched pass)
and decoding's (one token at a time), and the greedy tokens.

Modes: f32, bf16 (the weights and the computation in bfloat16).

Usage: python3 bench/peers/decode.py MODEL.bin --prompt 256 --tokens 128 --mode f32
"""

import argparse
import json
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F


def load(path):
    """The legacy llama2.c file: 7 ints, then the tensors in llama2.c's order."""
    raw = open(path, "rb").read()
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("7i", raw, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // heads
    floats = np.frombuffer(raw, dtype="<f4", offset=28)
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        t = torch.from_numpy(floats[at:at + n].copy()).reshape(shape)
        at += n
        return t

    w = {"embed": take(vocab, dim)}
    w["attn_norm"] = take(layers, dim)
    w["wq"] = take(layers, heads * head_dim, dim)
    w["wk"] = take(layers, kv_heads * head_dim, dim)
    w["wv"] = take(layers, kv_heads * head_dim, dim)
    w["wo"] = take(layers, dim, heads * head_dim)
    w["ffn_norm"] = take(layers, dim)
    w["w1"] = take(layers, hidden, dim)
    w["w2"] = take(layers, dim, hidden)
    w["w3"] = take(layers, hidden, dim)
    w["norm"] = take(dim)
    take(seq, head_dim // 2)
    take(seq, head_dim // 2)
    w["cls"] = w["embed"] if shared else take(vocab, dim)
    shape = dict(dim=dim, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 vocab=vocab, seq=seq)
    return shape, w


def rmsnorm(x, weight, eps=1e-5):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope(x, cos, sin):
    """Interleaved pairs (2i, 2i+1), as llama2.c: x (T, H, D), cos/sin (T, D/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Llama:
    def __init__(self, shape, w, dtype, capacity):
        self.s = shape
        self.w = {k: v.to(dtype) for k, v in w.items()}
        d, hd = shape["dim"], shape["head_dim"]
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(capacity).float(), freqs)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        kv = (shape["layers"], capacity, shape["kv_heads"], hd)
        self.k = torch.zeros(kv, dtype=dtype)
        self.v = torch.zeros(kv, dtype=dtype)
        self.dtype = dtype

    def forward(self, tokens, pos):
        """Logits of the last of `tokens`, which sit at positions pos..; fills the cache."""
        s, w = self.s, self.w
        t = len(tokens)
        h, kvh, hd = s["heads"], s["kv_heads"], s["head_dim"]
        x = w["embed"][tokens]
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]
        for l in range(s["layers"]):
            xn = rmsnorm(x, w["attn_norm"][l])
            q = (xn @ w["wq"][l].T).view(t, h, hd)
            k = (xn @ w["wk"][l].T).view(t, kvh, hd)
            v = (xn @ w["wv"][l].T).view(t, kvh, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            self.k[l, pos:pos + t] = k
            self.v[l, pos:pos + t] = v
            keys = self.k[l, :pos + t].repeat_interleave(h // kvh, dim=1)
            values = self.v[l, :pos + t].repeat_interleave(h // kvh, dim=1)
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                is_causal=False,
                attn_mask=torch.ones(t, pos + t, dtype=torch.bool).tril(pos))
            x = x + att.transpose(0, 1).reshape(t, h * hd) @ w["wo"][l].T
            xn = rmsnorm(x, w["ffn_norm"][l])
            x = x + (F.silu(xn @ w["w1"][l].T) * (xn @ w["w3"][l].T)) @ w["w2"][l].T
        return rmsnorm(x[-1:], w["norm"]) @ w["cls"].T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--mode", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape, weights = load(args.model)
    dtype = torch.float32 if args.mode == "f32" else torch.bfloat16
    vocab = shape["vocab"]
    # BOS, then arbitrary tokens: with --prompt 1 the greedy tokens are `kiln sample
    # --prompt "" --temperature 0`'s (and run.c's).
    prompt = [1] + [(i * 7919 + 13) % vocab for i in range(1, args.prompt)]
    with torch.inference_mode():
        # A warm-up pass, as kiln's bench.
        Llama(shape, weights, dtype, args.prompt + 1).forward(torch.tensor(prompt), 0)
        model = Llama(shape, weights, dtype, args.prompt + args.tokens)
        started = time.perf_counter()
        logits = model.forward(torch.tensor(prompt), 0)
        prefill = time.perf_counter() - started
        out = []
        started = time.perf_counter()
        for i in range(args.tokens):
            nxt = int(logits[0].float().argmax())
            out.append(nxt)
            logits = model.forward(torch.tensor([nxt]), args.prompt + i)
        decode = time.perf_counter() - started
    print(json.dumps({
        "peer": f"pytorch {torch.__version__} eager {args.mode}, {args.threads} threads",
        "prefill_tokens_per_s": args.prompt / prefill,
        "decode_tokens_per_s": args.tokens / decode,
        "tokens": out,
    }))


if __name__ == "__main__":
    main()
