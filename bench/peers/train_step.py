#!/usr/bin/env python3
"""The PyTorch peer of `kiln bench train`: the same Llama-family model (llama2.c's TinyStories
shapes: RMSNorm, RoPE, causal attention, SwiGLU, a tied classifier; Qwen3-0.6B's adds grouped
query heads, a head width apart from dim/heads, RMSNorm on each head of q and k, and RoPE base
1e6), the same batch, sequence length and vocabulary (the preset's unless --vocab), random
tokens, AdamW; prints ms per training step (median of the timed steps after warm-up) and peak
RSS as one JSON line.

Modes: f32 (eager), bf16 (eager under torch.autocast), compile (torch.compile, f32),
compile-bf16 (torch.compile under bf16 autocast: the GPU peer). `--device cuda` runs on the GPU
(fused AdamW; every timed step ends in a synchronising `loss.item()`).

Usage: python3 bench/peers/train_step.py --preset stories15m --batch 4 --seq 256 --mode f32
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# llama2.c's TinyStories models and Qwen3-0.6B (kiln's presets of the same names).
PRESETS = {
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768),
    "stories42m": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376),
    "stories110m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
    "qwen3-0.6b": dict(dim=1024, n_layers=28, n_heads=16, hidden_dim=3072, n_kv_heads=8,
                       head_dim=128, qk_norm=True, rope_theta=1e6, eps=1e-6, vocab=151936),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    # Half-split pairing, as Hugging Face Llama and kiln.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, n_heads, hidden_dim, n_kv_heads, head_dim, qk_norm, eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.attn_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        h = self.attn_norm(x)
        q_shape = (b, t, self.n_heads, self.head_dim)
        kv_shape = (b, t, self.n_kv_heads, self.head_dim)
        q = rope(self.q_norm(self.wq(h).view(q_shape)).transpose(1, 2), cos, sin)
        k = rope(self.k_norm(self.wk(h).view(kv_shape)).transpose(1, 2), cos, sin)
        v = self.wv(h).view(kv_shape).transpose(1, 2)
        gqa = self.n_heads != self.n_kv_heads
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Model(nn.Module):
    def __init__(self, dim, n_layers, n_heads, hidden_dim, vocab, seq, n_kv_heads=None,
                 head_dim=None, qk_norm=False, rope_theta=10000.0, eps=1e-5):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or dim // n_heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, hidden_dim, n_kv_heads, head_dim, qk_norm, eps)
            for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)
        inv = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        # llama2.c's initialisation (kiln's too): N(0, 0.02), output projections scaled down.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.norm(x) @ self.embed.weight.t()  # tied classifier
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="stories15m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: the preset's, 32000 for the stories models)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mode", default="f32", choices=["f32", "bf16", "compile", "compile-bf16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = dict(PRESETS[args.preset])
    preset_vocab = shape.pop("vocab", 32000)
    args.vocab = args.vocab or preset_vocab
    model = Model(**shape, vocab=args.vocab, seq=args.seq).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=args.device == "cuda")
    step_fn = model
    if args.mode.startswith("compile"):
        step_fn = torch.compile(model)

    def step():
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq)).to(args.device)
        targets = torch.randint(0, args.vocab, (args.batch, args.seq)).to(args.device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16,
                            enabled=args.mode in ("bf16", "compile-bf16")):
            loss = step_fn(tokens, targets)
        loss.backward()
        opt.step()
        return loss.item()

    warmups = 3 if args.mode.startswith("compile") else 1
    for _ in range(warmups):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t) * 1e3)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peer": f"pytorch {torch.__version__} {args.mode}", "preset": args.preset,
                      "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                      "ms_per_step": statistics.median(times), "ms_best": min(times),
                      "peak_rss_mib": rss_mib, "device": gpu or "cpu", "loss": loss if math.isfinite(loss) else None}))


if __name__ == "__main__":
    main()
