#!/usr/bin/env python3
"""Writes kiln's PyTorch reference fixtures: tests/fixtures/model_<config>.safetensors.

An independent implementation of kiln's Llama-family model in plain PyTorch (no kiln code, no
transformers), computed in float64 from float32 weights, so the fixture is as close to exact
arithmetic as a test of kiln's float32 kernels needs. For each tiny config it stores:

  weights      every parameter under its Hugging Face name (float32: the values kiln loads)
  tokens, targets   (B, T) int64
  logits       (B*T, V) float64
  loss         (1,) float64, mean cross-entropy
  grad.<name>  d loss / d parameter, float64, for every parameter
  adamw_losses (10,) float64: the loss before each of 10 AdamW steps on the same batch (5 for
               a model whose trajectory turns chaotic sooner, STEPS_OF)
  greedy_prompt, greedy_tokens   int64: 12 tokens decoded greedily (full recompute each
               step, no cache) from the first 4 input tokens, with the initial weights

Conventions the fixture pins down (a kiln bug in any of them fails the test):
  * RoPE pairs dimension i with i + D/2 (Hugging Face rotate_half), not neighbours (llama2.c);
  * qk-norm is an RMSNorm with a D-wide gain on each head of q and k, before RoPE (Qwen3);
  * grouped-query head h reads kv head h // (H // Hkv) (Hugging Face repeat_kv);
  * AdamW decays matrices and embeddings, not norm gains or the golf block's control tensors.

tiny-golf exercises every option of the compact-model ("golf") block as the parameter-golf
baseline (train_gpt.py) writes it: weightless RMSNorm (also on the embedding), relu^2 MLP
(leaky here), q gain after qk-norm and RoPE, partial RoPE, U-Net skips with per-channel
weights, resid_mix with x0, attention/MLP output scales, logit softcap; plus value residual
and a hashed bigram embedding. Its forward is `golf_forward` below.

Usage: python3 scripts/make_fixtures.py [NAME…]   (needs torch and safetensors; ~5 s on a CPU;
names such as tiny-gqa or muon make only those)
"""

import json
import sys
import math
import pathlib

import torch
from safetensors.torch import save_file

FIXTURE_VERSION = 1
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# Must equal kiln's presets of the same name (src/config.rs); the Rust test checks it.
CONFIGS = {
    "tiny-mha": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, hidden_dim=64,
                     vocab_size=64, max_seq_len=32, rope_theta=10000.0, norm_eps=1e-5,
                     qk_norm=False, tie_embeddings=False),
    "tiny-gqa": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=48,
                     vocab_size=64, max_seq_len=32, rope_theta=1e6, norm_eps=1e-6,
                     qk_norm=True, tie_embeddings=True),
    "tiny-golf": dict(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      vocab_size=64, max_seq_len=32, rope_theta=10000.0, norm_eps=1e-6,
                      qk_norm=True, tie_embeddings=True,
                      arch=dict(mlp=dict(leaky_relu2=dict(slope=0.5)), norm_weights=False,
                                embed_norm=True, q_gain=1.5, logit_softcap=30.0,
                                unet_skips=True, resid_mix=True, branch_scales=True,
                                zero_init_out=False, embed_init_std=0.005, rope_dims=4,
                                value_residual=True, bigram_buckets=37)),
}
# tiny-golf with depth recurrence: 4 blocks, blocks 1..3 run twice (layers 0 1 2 1 2 3), so
# the shared blocks' gradients are the sums over both runs and the U-Net skips span 6 layers.
CONFIGS["tiny-golf-recurrent"] = dict(
    CONFIGS["tiny-golf"], n_layers=4,
    arch=dict(CONFIGS["tiny-golf"]["arch"], recurrence=dict(start=1, end=3, repeats=1)))

# tiny-golf with EngramHash: bigram and trigram tables, two hash heads each, 13 buckets of 4
# values (memory width 16), added before layer 2.
CONFIGS["tiny-golf-engram"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"],
              engram=dict(buckets=13, heads=2, max_order=3, dim=16, layer=2)))

# tiny-golf with norm-scale damping (layer l's norms x 1/sqrt(l + 1)), exclusive self
# attention from layer 2 and parallel residuals from layer 3 (the MLP reads the layer's
# input, beside attention).
CONFIGS["tiny-golf-parallel"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"], ln_scale=True, parallel_from=3, xsa_from=2))

# tiny-golf with a mixture of three experts in layers 3 and 4, routed top-1 (Switch), with
# the load-balancing loss (weight 0.01) in the objective the gradients are of.
CONFIGS["tiny-golf-moe"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"],
              moe=dict(experts=3, from_layer=3, aux_weight=0.01)))

# tiny-golf with a causal capsule bank before layer 2: 3 capsules of 8 values, each a learned
# prototype pooling its position's prefix (softmax over earlier positions only).
CONFIGS["tiny-golf-capsules"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"], capsules=dict(count=3, dim=8, layer=2)))

# The same bank run three times, Koopman dynamics of rank 2 between the passes, and the
# consistency term (weight 0.5, large so its gradient is well measured) in the objective.
CONFIGS["tiny-golf-koopman"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"],
              capsules=dict(count=3, dim=8, layer=2,
                            koopman=dict(rank=2, passes=2, consistency=0.5, diag_init=0.9))))
# tiny-golf with two feedback passes over its decoder (layers 2-4), sketches of 8 values.
CONFIGS["tiny-golf-feedback"] = dict(
    CONFIGS["tiny-golf"],
    arch=dict(CONFIGS["tiny-golf"]["arch"], feedback=dict(dim=8, passes=2)))
# The same with the stability clamp: D enters K clamped to +-0.999 (its values, 1 + 0.2 N(0, 1)
# from the Koopman fixture's seed, straddle the bound: four of eight are clamped, so the clamp
# and its gradient's mask both show).
CONFIGS["tiny-golf-koopman-clamp"] = dict(
    CONFIGS["tiny-golf-koopman"],
    arch=dict(CONFIGS["tiny-golf-koopman"]["arch"],
              capsules=dict(CONFIGS["tiny-golf-koopman"]["arch"]["capsules"],
                            koopman=dict(CONFIGS["tiny-golf-koopman"]["arch"]["capsules"]
                                         ["koopman"], clamp=True))))

MASK = (1 << 64) - 1


def mix64(z):
    """splitmix64's finalizer."""
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def engram_ids(tokens, e):
    """(B, T, tables) rows of the concatenated tables: for order n and head h, the position's
    last n tokens coded id + 1 (0 before the sequence), hash = hash * m + code oldest first
    (mod 2^64, m = mix64(1000 n + h) | 1), row mix64(hash) mod buckets of table (n - 2) heads + h."""
    b, t = tokens.shape
    tables = (e["max_order"] - 1) * e["heads"]
    out = torch.zeros(b, t, tables, dtype=torch.long)
    for s in range(b):
        for p in range(t):
            code = lambda back: int(tokens[s, p - back]) + 1 if back <= p else 0
            col = 0
            for n in range(2, e["max_order"] + 1):
                for h in range(e["heads"]):
                    m = mix64(1000 * n + h) | 1
                    value = 0
                    for back in reversed(range(n)):
                        value = (value * m + code(back)) & MASK
                    table = (n - 2) * e["heads"] + h
                    out[s, p, col] = table * e["buckets"] + mix64(value) % e["buckets"]
                    col += 1
    return out


def engram(c, w, x, tokens, norm):
    """EngramHash: x + sigmoid(norm(x) . norm(W_K m) / sqrt(C)) * W_P m."""
    e = c["arch"]["engram"]
    b, t = tokens.shape
    memory = w["model.engram.tables.weight"][engram_ids(tokens, e)].reshape(b, t, -1)
    key = memory @ w["model.engram.key.weight"].T
    value = memory @ w["model.engram.proj.weight"].T
    gate = torch.sigmoid((norm(x) * norm(key)).sum(-1, keepdim=True) / math.sqrt(c["dim"]))
    return x + gate * value


def hadamard(n):
    """The orthonormal Hadamard matrix of order n (a power of two), Sylvester's order."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def capsules(c, w, x, norm):
    """The causal capsule bank: capsule k at position t pools r_s = W_R·norm(x_s) over s <= t
    with weights softmax_s(p_k·r_s / sqrt(dim)); x + g * W_W·(the capsules, concatenated).
    With Koopman dynamics the bank runs again `passes` times on the stream it left, each
    pass blending its pooled capsules with the last pass's evolved by K(c) = H(D*Hc + U V^T Hc):
    c = sigmoid(alpha) * observed + sigmoid(-alpha) * K(c_prev); the consistency term
    mean((K(c_prev) - c.detach())^2), averaged over the passes, joins the objective (AUX)."""
    k = c["arch"]["capsules"]
    b, t, _ = x.shape
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)

    def pool(x):
        r = norm(x) @ w["model.capsules.read.weight"].T
        scores = torch.einsum("bsd,kd->bks", r, w["model.capsules.prototypes"])
        weights = torch.softmax(scores[:, :, None, :] / math.sqrt(k["dim"]) + causal, dim=-1)
        return torch.einsum("bkts,bsd->btkd", weights, r)  # (b, t, count, dim)

    def write(x, caps):
        return x + w["model.capsules.gate"] * (caps.reshape(b, t, -1)
                                                @ w["model.capsules.write.weight"].T)

    km = k.get("koopman")
    if km:
        d = k["dim"]
        rot = hadamard(d) if d & (d - 1) == 0 and d > 1 else torch.eye(d, dtype=torch.float64)
        p = "model.capsules.koopman."
        blend = torch.sigmoid(w[p + "alpha"])

        diag = w[p + "diag"]
        if km.get("clamp"):
            diag = torch.clamp(diag, -0.999, 0.999)

        def predict(c):
            y = c @ rot
            return (diag * y + (y @ w[p + "v"].T) @ w[p + "u"].T) @ rot

    caps = pool(x)
    if CARRY[0] is not None:
        # Capsule carry: the first pass blends with K(carry), the carry (b, count, dim) the
        # same at every position of its row.
        caps = blend * caps + (1 - blend) * predict(CARRY[0][:, None])
    x = write(x, caps)
    if km:
        terms = []
        for _ in range(km["passes"]):
            observed = pool(x)
            predicted = predict(caps)
            caps = blend * observed + (1 - blend) * predicted
            terms.append((predicted - caps.detach()).pow(2).mean())
            x = write(x, caps)
        AUX[0] = AUX[0] + km["consistency"] * sum(terms) / len(terms)
    STATE[0] = caps[:, -1]  # each row's last position, last pass: what carry hands on
    return x


def block_order(c):
    """The block each layer runs: 0..end, then start..end `repeats` more times, then the rest."""
    r, n = c.get("arch", {}).get("recurrence"), c["n_layers"]
    if not r:
        return list(range(n))
    return (list(range(r["end"])) + list(range(r["start"], r["end"])) * r["repeats"]
            + list(range(r["end"], n)))
BATCH, SEQ = 2, 16
ADAMW = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
ADAMW_STEPS = 10
# Seeds other than the first: the clamp's is the Koopman fixture's (the two differ in the clamp
# alone); with feedback passes the first seed's layer-3 v_mix gradient cancels to about 1e-3
# (its terms are ~0.05), so bf16 products' rounding was 3% of it, and the next seed tried by
# 1000s (2243) cancels its q_proj gradients as far.
SEED_OF = {"tiny-golf-koopman-clamp": 1242, "tiny-golf-feedback": 3243}
# Fewer for a model whose trajectory is chaotic sooner: with feedback passes, perturbing the
# initial weights by 1e-7 of themselves (f32 rounding) moved the 8th loss by up to 0.08 in
# float64, while the 5th moved by 1e-4.
STEPS_OF = {"tiny-golf-feedback": 5}
GREEDY_TOKENS = 12


# The golf block's control tensors: (2-D or not) never weight-decayed.
CONTROL = ("q_gain", "v_mix", "attn_scale", "mlp_scale", "resid_mix", "skip_weights")


def golf_param_shapes(c):
    a = c["arch"]
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    dim, hidden = c["dim"], c["hidden_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], dim)}
    if a["bigram_buckets"]:
        shapes["model.bigram_embed.weight"] = (a["bigram_buckets"], dim)
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        shapes[p + "self_attn.q_proj.weight"] = (q, dim)
        shapes[p + "self_attn.k_proj.weight"] = (kv, dim)
        shapes[p + "self_attn.v_proj.weight"] = (kv, dim)
        shapes[p + "self_attn.o_proj.weight"] = (dim, q)
        shapes[p + "self_attn.q_gain"] = (c["n_heads"],)
        if a["value_residual"] and l > 0:
            shapes[p + "self_attn.v_mix"] = (2,)
        shapes[p + "attn_scale"] = (dim,)
        moe = a.get("moe")
        if moe and l >= moe["from_layer"]:
            shapes[p + "mlp.router.weight"] = (moe["experts"], dim)
            for e in range(moe["experts"]):
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (hidden, dim)
            for e in range(moe["experts"]):
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (dim, hidden)
        else:
            shapes[p + "mlp.up_proj.weight"] = (hidden, dim)
            shapes[p + "mlp.down_proj.weight"] = (dim, hidden)
        shapes[p + "mlp_scale"] = (dim,)
        shapes[p + "resid_mix"] = (2, dim)
    depth = len(block_order(c))
    shapes["model.skip_weights"] = (min(depth // 2, depth - depth // 2), dim)
    k = a.get("capsules")
    if k:
        shapes["model.capsules.prototypes"] = (k["count"], k["dim"])
        shapes["model.capsules.read.weight"] = (k["dim"], dim)
        shapes["model.capsules.write.weight"] = (dim, k["count"] * k["dim"])
        shapes["model.capsules.gate"] = (dim,)
        km = k.get("koopman")
        if km:
            shapes["model.capsules.koopman.diag"] = (k["dim"],)
            shapes["model.capsules.koopman.u"] = (k["dim"], km["rank"])
            shapes["model.capsules.koopman.v"] = (km["rank"], k["dim"])
            shapes["model.capsules.koopman.alpha"] = (k["dim"],)
    e = a.get("engram")
    if e:
        tables = (e["max_order"] - 1) * e["heads"]
        shapes["model.engram.tables.weight"] = (tables * e["buckets"], e["dim"] // tables)
        shapes["model.engram.key.weight"] = (dim, e["dim"])
        shapes["model.engram.proj.weight"] = (dim, e["dim"])
    f = a.get("feedback")
    if f:
        shapes["model.feedback.sketch.weight"] = (f["dim"], dim)
        for i in range(c["n_layers"] - c["n_layers"] // 2):
            p = f"model.feedback.adapters.{i}."
            shapes[p + "q_proj.weight"] = (dim, dim)
            shapes[p + "k_proj.weight"] = (dim, f["dim"])
            shapes[p + "v_proj.weight"] = (dim, f["dim"])
            shapes[p + "gate"] = (dim,)
    return shapes


def bigram_ids(tokens, buckets):
    """((prev + 1) * 1000003 + cur) % buckets, prev + 1 = 0 at a sequence's first position."""
    prev = torch.zeros_like(tokens)
    prev[:, 1:] = tokens[:, :-1] + 1
    return (prev * 1000003 + tokens) % buckets


# The load-balancing loss of the last golf_forward (a mixture of experts' auxiliary term).
AUX = [0.0]
# The smallest gap between a token's two largest router logits in the last golf_forward.
ROUTER_GAP = [float("inf")]
# Capsule carry given to the bank's first pass (None: none), and the bank's state it leaves.
CARRY, STATE = [None], [None]
# A mixture of experts' fixture is made from a seed whose routing no rounding can flip: every
# token's two largest router logits at least this far apart in the initial forward (bf16
# products' errors reach a few thousandths there; an arbitrary seed left a token 0.0023 apart,
# and a bf16 backend that routed it to the other expert failed the logits by luck alone).
ROUTER_MARGIN = 0.02


def golf_forward(c, w, tokens):
    a = c["arch"]
    b, t = tokens.shape
    h, hkv, d = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    eps = c["norm_eps"]
    norm = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = w["model.embed_tokens.weight"][tokens]
    if a["bigram_buckets"]:
        x = x + w["model.bigram_embed.weight"][bigram_ids(tokens, a["bigram_buckets"])]
    x = norm(x)
    x0 = x
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    rot = a["rope_dims"] or d
    slope = a["mlp"]["leaky_relu2"]["slope"] if isinstance(a["mlp"], dict) else 0.0
    order = block_order(c)
    encoders = len(order) // 2
    skips, v_first = [], None

    def memory(l, x):
        # EngramHash or a capsule bank before layer l.
        if a.get("engram") and a["engram"]["layer"] == l:
            x = engram(c, w, x, tokens, norm)
        if a.get("capsules") and a["capsules"]["layer"] == l:
            x = capsules(c, w, x, norm)
        return x

    def run(l, block, x, skips):
        nonlocal v_first
        p = f"model.layers.{block}."
        if l >= encoders and skips:
            x = x + w["model.skip_weights"][l - encoders] * skips.pop()
        mix = w[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        damping = 1 / math.sqrt(l + 1) if a.get("ln_scale") else 1.0
        parallel = a.get("parallel_from") is not None and l >= a["parallel_from"]
        x_in = x
        xn = norm(x) * damping
        q = norm((xn @ w[p + "self_attn.q_proj.weight"].T).view(b, t, h, d)).transpose(1, 2)
        k = norm((xn @ w[p + "self_attn.k_proj.weight"].T).view(b, t, hkv, d)).transpose(1, 2)
        v = (xn @ w[p + "self_attn.v_proj.weight"].T).view(b, t, hkv, d).transpose(1, 2)
        q = torch.cat((rope(q[..., :rot], c["rope_theta"]), q[..., rot:]), dim=-1)
        k = torch.cat((rope(k[..., :rot], c["rope_theta"]), k[..., rot:]), dim=-1)
        q = q * w[p + "self_attn.q_gain"][None, :, None, None]
        if l == 0:
            v_first = v
        elif a["value_residual"]:
            lam = w[p + "self_attn.v_mix"]
            v = lam[0] * v + lam[1] * v_first
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
        att = torch.softmax(scores, dim=-1) @ v
        if a.get("xsa_from") is not None and l >= a["xsa_from"]:
            # Exclusive self attention: less each token's own value direction.
            vn = torch.nn.functional.normalize(v, dim=-1)
            att = att - (att * vn).sum(-1, keepdim=True) * vn
        att = att.transpose(1, 2).reshape(b, t, h * d)
        x = x + w[p + "attn_scale"] * (att @ w[p + "self_attn.o_proj.weight"].T)
        xn = norm(x_in if parallel else x) * damping
        mlp = lambda u, d: torch.nn.functional.leaky_relu(xn_e @ u.T, slope).square() @ d.T
        moe = a.get("moe")
        if moe and l >= moe["from_layer"]:
            # Switch routing: each token's top-1 expert (the first largest probability), its
            # output scaled by that probability; the load-balancing loss E * sum_e f_e * P_e.
            router_logits = xn @ w[p + "mlp.router.weight"].T
            top2 = router_logits.detach().topk(2, dim=-1).values
            ROUTER_GAP[0] = min(ROUTER_GAP[0], (top2[..., 0] - top2[..., 1]).min().item())
            probs = torch.softmax(router_logits, dim=-1)
            choice = probs.argmax(dim=-1)
            out = torch.zeros_like(xn)
            for e in range(moe["experts"]):
                chosen = choice == e
                xn_e = xn[chosen]
                y = mlp(w[p + f"mlp.experts.{e}.up_proj.weight"],
                        w[p + f"mlp.experts.{e}.down_proj.weight"])
                out = out.index_put((chosen,), probs[chosen][:, e:e + 1] * y)
                share = chosen.double().mean()
                AUX[0] = AUX[0] + moe["aux_weight"] * moe["experts"] * share * probs[..., e].mean()
        else:
            xn_e = xn
            out = mlp(w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
        x = x + w[p + "mlp_scale"] * out
        if l < encoders:
            skips.append(x)
        return x

    fb = a.get("feedback")
    for l, block in enumerate(order):
        x = memory(l, x)
        if fb and l == encoders:
            # Where each feedback pass starts again: the stream layer E reads, and the
            # encoder outputs for the skips.
            encoded, encoder_outputs = x, list(skips)
        x = run(l, block, x, skips)
    if fb:
        # Feedback passes: the decoder again from the encoder's output, each layer followed
        # by its adapter, which attends (causally, no rotation) from W_Q rmsnorm(x) over the
        # keys and values of the sketch W_F rmsnorm(y) of the stream y the pass before left.
        for _ in range(fb["passes"]):
            sketch = norm(x) @ w["model.feedback.sketch.weight"].T
            x, skips = encoded, list(encoder_outputs)
            for i, l in enumerate(range(encoders, len(order))):
                x = run(l, order[l], x, skips)
                p = f"model.feedback.adapters.{i}."
                q = (norm(x) @ w[p + "q_proj.weight"].T).view(b, t, h, d).transpose(1, 2)
                k = (sketch @ w[p + "k_proj.weight"].T).view(b, t, h, d).transpose(1, 2)
                v = (sketch @ w[p + "v_proj.weight"].T).view(b, t, h, d).transpose(1, 2)
                att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
                x = x + w[p + "gate"] * att.transpose(1, 2).reshape(b, t, h * d)
    x = norm(x)
    logits = (x @ w["model.embed_tokens.weight"].T).reshape(b * t, -1)
    cap = a["logit_softcap"]
    return cap * torch.tanh(logits / cap)


def param_shapes(c):
    if "arch" in c:
        return golf_param_shapes(c)
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    dim, hidden = c["dim"], c["hidden_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], dim)}
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (dim,)
        shapes[p + "self_attn.q_proj.weight"] = (q, dim)
        shapes[p + "self_attn.k_proj.weight"] = (kv, dim)
        shapes[p + "self_attn.v_proj.weight"] = (kv, dim)
        shapes[p + "self_attn.o_proj.weight"] = (dim, q)
        if c["qk_norm"]:
            shapes[p + "self_attn.q_norm.weight"] = (c["head_dim"],)
            shapes[p + "self_attn.k_norm.weight"] = (c["head_dim"],)
        shapes[p + "post_attention_layernorm.weight"] = (dim,)
        shapes[p + "mlp.gate_proj.weight"] = (hidden, dim)
        shapes[p + "mlp.up_proj.weight"] = (hidden, dim)
        shapes[p + "mlp.down_proj.weight"] = (dim, hidden)
    shapes["model.norm.weight"] = (dim,)
    if not c["tie_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], dim)
    return shapes


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x, theta):
    """x: (B, heads, T, D), half-split pairing."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(x.shape[2], dtype=torch.float64), inv_freq)  # (T, D/2)
    emb = torch.cat((angles, angles), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def forward(c, w, tokens):
    b, t = tokens.shape
    h, hkv, d = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    eps = c["norm_eps"]
    x = w["model.embed_tokens.weight"][tokens]  # (B, T, C)
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        xn = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = (xn @ w[p + "self_attn.q_proj.weight"].T).view(b, t, h, d)
        k = (xn @ w[p + "self_attn.k_proj.weight"].T).view(b, t, hkv, d)
        v = (xn @ w[p + "self_attn.v_proj.weight"].T).view(b, t, hkv, d)
        if c["qk_norm"]:
            q = rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
        att = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
        att = att.transpose(1, 2).reshape(b, t, h * d)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        xn = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = xn @ w[p + "mlp.gate_proj.weight"].T
        up = xn @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"], eps)
    classifier = w["model.embed_tokens.weight"] if c["tie_embeddings"] else w["lm_head.weight"]
    return (x @ classifier.T).reshape(b * t, -1)


def forward_any(c, w, tokens):
    AUX[0] = 0.0
    ROUTER_GAP[0] = float("inf")
    return golf_forward(c, w, tokens) if "arch" in c else forward(c, w, tokens)


def make(name, c, seed):
    gen = torch.Generator().manual_seed(seed)
    weights32 = {}
    for pname, shape in param_shapes(c).items():
        if pname.endswith(CONTROL) or pname.endswith("resid_mix"):
            # Control tensors near their initial values (1, or the mix's 1 and 0).
            init = torch.ones(shape)
            if pname.endswith("resid_mix"):
                init[1] = 0.0
            weights32[pname] = init + 0.3 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            # Gains near 1 but not 1, so a kernel that ignores or misapplies them is caught.
            weights32[pname] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            # Larger than training's 0.02 so that attention is far from uniform and the
            # gradients are well above f32 noise.
            weights32[pname] = 0.3 * torch.randn(shape, generator=gen)
    tokens = torch.randint(0, c["vocab_size"], (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, c["vocab_size"], (BATCH, SEQ), generator=gen)

    params = {k: torch.nn.Parameter(v.double().clone()) for k, v in weights32.items()}
    logits = forward_any(c, params, tokens)
    if ROUTER_GAP[0] < ROUTER_MARGIN:
        return False
    loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1))
    # The gradients are of the objective: the loss plus a mixture of experts' balancing term.
    (loss + AUX[0]).backward()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in params.items()}

    # Ten AdamW steps on the same batch, from the same start.
    params = {k: torch.nn.Parameter(v.double().clone()) for k, v in weights32.items()}
    decays = lambda k, p: p.dim() >= 2 and not k.endswith(CONTROL)
    decay = [p for k, p in params.items() if decays(k, p)]
    no_decay = [p for k, p in params.items() if not decays(k, p)]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=ADAMW["weight_decay"]),
         dict(params=no_decay, weight_decay=0.0)],
        lr=ADAMW["learning_rate"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"])
    adamw_losses = []
    for _ in range(STEPS_OF.get(name, ADAMW_STEPS)):
        opt.zero_grad()
        step_loss = torch.nn.functional.cross_entropy(forward_any(c, params, tokens),
                                                      targets.reshape(-1))
        (step_loss + AUX[0]).backward()
        opt.step()
        adamw_losses.append(step_loss.item())

    # Greedy decoding, recomputing the whole context each step (no KV cache), from float64
    # copies of the initial weights.
    initial = {k: v.double() for k, v in weights32.items()}
    prompt = tokens[0, :4].clone()
    context = prompt.clone()
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            next_id = forward_any(c, initial, context.unsqueeze(0))[-1].argmax()
            context = torch.cat((context, next_id.reshape(1)))

    tensors = {k: v.contiguous() for k, v in weights32.items()}
    caps = c.get("arch", {}).get("capsules")
    if caps and caps.get("koopman"):
        # Capsule carry: the logits with a random carry in each row's first pass, and the
        # capsule state that forward leaves (each row's last position, last pass).
        carry = torch.randn(BATCH, caps["count"], caps["dim"], generator=gen)
        CARRY[0] = carry.double()
        with torch.no_grad():
            tensors["carry_logits"] = forward_any(c, initial, tokens).contiguous()
        CARRY[0] = None
        tensors["carry"] = carry.reshape(BATCH, -1).contiguous()
        tensors["carry_state"] = STATE[0].reshape(BATCH, -1).contiguous()
    tensors["greedy_prompt"] = prompt.contiguous()
    tensors["greedy_tokens"] = context[4:].contiguous()
    tensors.update(grads)
    tensors["tokens"] = tokens
    tensors["targets"] = targets
    tensors["logits"] = logits.detach()
    tensors["loss"] = loss.detach().reshape(1)
    tensors["adamw_losses"] = torch.tensor(adamw_losses, dtype=torch.float64)
    metadata = {
        "fixture_version": str(FIXTURE_VERSION),
        "config_name": name,
        "config": json.dumps(c),
        "adamw": json.dumps(ADAMW),
        "generator": f"scripts/make_fixtures.py, torch {torch.__version__}",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"model_{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    print(f"{path.relative_to(OUT.parent.parent)}: loss {loss.item():.6f}, "
          f"adamw {adamw_losses[0]:.4f} -> {adamw_losses[-1]:.4f}, seed {seed}")
    return True


def zeropower_via_newtonschulz5(g, steps, eps=1e-7):
    """parameter-golf train_gpt.py's Newton-Schulz orthogonalisation (in float64 here)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g / (g.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


def make_muon(seed):
    """muon.safetensors: three Muon steps (train_gpt.py's Muon: Nesterov, 5 Newton-Schulz
    iterations, update scaled by sqrt(max(1, rows/cols))) on matrices of three aspect ratios,
    with a different gradient each step. lr 0.05 and momentum 0.9: tests/golf.rs uses them."""
    gen = torch.Generator().manual_seed(seed)
    lr, momentum, steps = 0.05, 0.9, 3
    tensors = {}
    for rows, cols in [(8, 8), (6, 10), (12, 5)]:
        key = f"{rows}x{cols}"
        p = torch.randn(rows, cols, generator=gen)
        grads = torch.randn(steps, rows, cols, generator=gen)
        tensors[f"param.{key}"] = p.clone()
        tensors[f"grads.{key}"] = grads.clone()
        p, buf = p.double(), torch.zeros(rows, cols, dtype=torch.float64)
        for g in grads.double():
            buf = momentum * buf + g
            u = zeropower_via_newtonschulz5(g + momentum * buf, 5)
            p = p - lr * max(1, rows / cols) ** 0.5 * u
        tensors[f"want.{key}"] = p.float()  # f32 rounding (6e-8) is far below the test's 2e-5
    # MuonEq-R (row_normalize): each row of the Nesterov update divided by its L2 norm
    # (clamped at 1e-7) before Newton-Schulz, from the same starting parameters. Its
    # gradients' rows are scaled by factors 0.01-100 (and one row is zero), so that rows of
    # very different norms, which the normalization evens out, decide the result.
    row_gen = torch.Generator().manual_seed(seed + 1)
    for rows, cols in [(8, 8), (6, 10), (12, 5)]:
        key = f"{rows}x{cols}"
        p = tensors[f"param.{key}"].double()
        scale = 10.0 ** (4 * torch.rand(rows, 1, generator=row_gen) - 2)
        grads = torch.randn(steps, rows, cols, generator=row_gen) * scale
        grads[:, 0] = 0.0
        tensors[f"grads_eq_r.{key}"] = grads.float()
        buf = torch.zeros(rows, cols, dtype=torch.float64)
        for g in grads.float().double():
            buf = momentum * buf + g
            u = g + momentum * buf
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            p = p - lr * max(1, rows / cols) ** 0.5 * zeropower_via_newtonschulz5(u, 5)
        tensors[f"want_eq_r.{key}"] = p.float()
    metadata = {"lr": str(lr), "momentum": str(momentum),
                "generator": f"scripts/make_fixtures.py, torch {torch.__version__}"}
    path = OUT / "muon.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    print(f"{path.relative_to(OUT.parent.parent)}: {len(tensors) // 5} matrices")


if __name__ == "__main__":
    torch.set_num_threads(1)
    only = set(sys.argv[1:])
    for i, (name, config) in enumerate(CONFIGS.items()):
        if only and name not in only:
            continue
        # A seed whose routing has its margin (ROUTER_MARGIN); the first for every other model,
        # but those SEED_OF names.
        seed = SEED_OF.get(name, 1234 + i)
        while not make(name, config, seed):
            seed += 1000
    if not only or "muon" in only:
        make_muon(seed=99)
