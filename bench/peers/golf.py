#!/usr/bin/env python3
"""The parameter-golf baseline in plain PyTorch, as kiln's peer for `golf-baseline`.

Modeled on OpenAI parameter-golf's train_gpt.py (the naive baseline): 9 blocks, dim 512,
8 heads / 4 kv heads, relu^2 MLP 2x, tied embedding N(0, 0.005), weightless RMSNorm (also on
the embedding), qk-norm with a learnable per-head q gain (1.5), RoPE base 10000, logit softcap
30, U-Net skips with per-channel weights, resid_mix with x0, attention/MLP output scales,
zero-initialised output projections; Muon (5 Newton-Schulz steps, momentum 0.95 warmed from
0.85 over 500 steps) for the blocks' matrices and Adam (0.9, 0.95) for the embedding and the
scalars; a wall-clock budget with a linear warmdown estimated from the measured step time;
then int8 per-row quantization (clip percentile 99.99984, fp16 scales, small tensors fp16,
control tensors fp32), compression, and the validation bits-per-byte after the round trip.

Differences from train_gpt.py, all so the two engines do the same work on this machine:
single process (no DDP), float32 on the CPU (bf16 autocast on CUDA), RoPE with the
Hugging Face sign convention kiln uses, and the run stops before a step that would overrun
the budget (kiln's rule) instead of after it.

It reads a corpus prepared by `kiln data prepare` (llm.c-format uint16 shards and the
tokenizer.json beside them) and scores the same validation windows `kiln eval` scores, with
bytes per token computed here from the tokenizer (byte-level BPE: one byte per character of
the token's string; special tokens none).

Usage: python3 bench/peers/golf.py --data DIR --time 600 --batch 8 --seq 256 \
           --warmdown-steps 100 --json OUT.json
"""

import argparse
import glob
import io
import json
import lzma
import math
import os
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def read_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1, f"{path}: not a uint16 llm.c shard"
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4, count=int(header[2])).astype(np.int64)


def load_split(data, split):
    manifest = json.load(open(os.path.join(data, "data.json")))
    return np.concatenate([read_shard(os.path.join(data, s)) for s in manifest[f"{split}_shards"]])


def token_bytes(data, vocab):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values()} if hasattr(
        tok, "get_added_tokens_decoder") else set()
    out = np.zeros(vocab, dtype=np.int64)
    for i in range(vocab):
        piece = tok.id_to_token(i)
        out[i] = 0 if piece is None or piece in special else len(piece)
    return out


# ---- model ----------------------------------------------------------------------------

def rms_norm(x, eps):
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rope(x, theta):
    """x: (B, H, T, D), half-split pairing, Hugging Face sign (as kiln)."""
    d = x.size(-1)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    ang = torch.outer(torch.arange(x.size(2), dtype=torch.float32, device=x.device), inv)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, eps):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.eps = heads, kv_heads, dim // heads, eps
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.c_v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((heads,), 1.5))
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.mlp_proj = nn.Linear(hidden, dim, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.mlp_proj.weight)

    def forward(self, x, x0):
        b, t, c = x.shape
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        xn = rms_norm(x, self.eps)
        q = self.c_q(xn).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.c_k(xn).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.c_v(xn).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(rms_norm(q, self.eps), 10000.0), rope(rms_norm(k, self.eps), 10000.0)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.attn_scale * self.proj(y.transpose(1, 2).reshape(b, t, c))
        h = torch.relu(self.fc(rms_norm(x, self.eps))).square()
        return x + self.mlp_scale * self.mlp_proj(h)


class GolfGPT(nn.Module):
    def __init__(self, vocab, dim=512, layers=9, heads=8, kv_heads=4, mlp_mult=2,
                 eps=torch.finfo(torch.float32).eps):
        super().__init__()
        self.eps = eps
        self.tok_emb = nn.Embedding(vocab, dim)
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        self.encoders = layers // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.encoders, layers - self.encoders), dim))
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, mlp_mult * dim, eps)
                                    for _ in range(layers))

    def forward(self, idx):
        x = rms_norm(self.tok_emb(idx), self.eps)
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            if i >= self.encoders and skips:
                x = x + self.skip_weights[i - self.encoders] * skips.pop()
            x = block(x, x0)
            if i < self.encoders:
                skips.append(x)
        logits = F.linear(rms_norm(x, self.eps), self.tok_emb.weight)
        return 30.0 * torch.tanh(logits / 30.0)


# ---- optimizer (train_gpt.py's Muon) ---------------------------------------------------

def zeropower_via_newtonschulz5(g, steps, eps=1e-7):
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum, backend_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                g = g.add(buf, alpha=group["momentum"])
                g = zeropower_via_newtonschulz5(g, group["backend_steps"])
                g *= max(1, g.size(0) / g.size(1)) ** 0.5
                p.add_(g, alpha=-group["lr"])


# ---- int8 export round trip (train_gpt.py's quantize_state_dict_int8) -------------------

CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights")


def quantize_roundtrip(model):
    """Quantizes every tensor as the baseline exports it, returns (compressed bytes, state)."""
    buf, out = io.BytesIO(), {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if any(k in name for k in CONTROL):
            q = t.clone()
            buf.write(t.numpy().tobytes())
        elif t.numel() <= 65536:
            q = t.half().float()
            buf.write(t.half().numpy().tobytes())
        else:
            clip = torch.quantile(t.abs(), 0.9999984, dim=1, keepdim=True) if t.numel() < 2 ** 24 \
                else t.abs().amax(dim=1, keepdim=True)
            scale = (clip / 127.0).clamp_min(1e-12).half().float()
            codes = torch.clamp(torch.round(torch.clamp(t, -clip, clip) / scale), -127, 127)
            q = codes * scale
            buf.write(codes.to(torch.int8).numpy().tobytes())
            buf.write(scale.half().numpy().tobytes())
        out[name] = q
    raw = buf.getvalue()
    compressed = min(len(zlib.compress(raw, 9)), len(lzma.compress(raw, preset=9)))
    return compressed, out


@torch.no_grad()
def evaluate(model, val, tbytes, batch, seq, device):
    model.eval()
    span = batch * seq
    n = (len(val) - 1) // span
    nats, nbytes, count = 0.0, 0, 0
    for i in range(n):
        w = torch.from_numpy(val[i * span: i * span + span + 1])
        x, y = w[:-1].view(batch, seq).to(device), w[1:].view(batch, seq).to(device)
        logits = model(x).float()
        nats += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                reduction="sum").item()
        nbytes += int(tbytes[w[1:].numpy()].sum())
        count += span
    model.train()
    return nats / count, nats / math.log(2) / nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--time", type=float, required=True, help="training budget, seconds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmdown-steps", type=int, default=1200)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, val = load_split(args.data, "train"), load_split(args.data, "val")
    vocab = json.load(open(os.path.join(args.data, "data.json")))["vocab_size"]
    tbytes = token_bytes(args.data, vocab)
    model = GolfGPT(vocab).to(device)
    print(f"peer: {sum(p.numel() for p in model.parameters()):,} parameters on {device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    matrices = [p for n, p in model.blocks.named_parameters() if p.ndim == 2]
    scalars = [p for n, p in model.blocks.named_parameters() if p.ndim < 2] + [model.skip_weights]
    groups = [
        torch.optim.Adam([dict(params=[model.tok_emb.weight], lr=0.05, base_lr=0.05)],
                         betas=(0.9, 0.95), eps=1e-8),
        Muon(matrices, lr=0.04, momentum=0.95),
        torch.optim.Adam([dict(params=scalars, lr=0.04, base_lr=0.04)], betas=(0.9, 0.95), eps=1e-8),
    ]
    for g in groups[1].param_groups:
        g["base_lr"] = 0.04
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    span = args.batch * args.seq
    pos, step, elapsed, last = 0, 0, 0.0, 0.0
    losses = []
    while elapsed + last <= args.time:
        t0 = time.perf_counter()
        if pos + span + 1 > len(train):
            pos = 0
        w = torch.from_numpy(train[pos: pos + span + 1])
        pos += span
        x, y = w[:-1].view(args.batch, args.seq).to(device), w[1:].view(args.batch, args.seq).to(device)
        step_s = elapsed / max(step, 1)
        warmdown = args.warmdown_steps * step_s
        remaining = max(args.time - elapsed, 0.0)
        mult = remaining / warmdown if step > 0 and remaining <= warmdown else 1.0
        frac = min(step / 500, 1.0)
        for g in groups[1].param_groups:
            g["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        for opt in groups:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        for opt in groups:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in groups:
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        last = time.perf_counter() - t0
        elapsed += last
        step += 1
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"peer step {step} | loss {loss.item():.4f} | {last * 1e3:.0f} ms/step | "
                  f"{elapsed:.0f}/{args.time:.0f} s", flush=True)
    val_loss, val_bpb = evaluate(model, val, tbytes, args.eval_batch, args.seq, device)
    size, state = quantize_roundtrip(model)
    model.load_state_dict(state)
    rt_loss, rt_bpb = evaluate(model, val, tbytes, args.eval_batch, args.seq, device)
    result = dict(engine="pytorch", steps=step, train_seconds=elapsed, ms_per_step=elapsed / step * 1e3,
                  final_loss=losses[-1], val_loss=val_loss, val_bpb=val_bpb, roundtrip_loss=rt_loss,
                  roundtrip_bpb=rt_bpb, artifact_bytes=size, torch=torch.__version__, device=device)
    print(json.dumps(result))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
