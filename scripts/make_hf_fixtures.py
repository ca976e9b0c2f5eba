#!/usr/bin/env python3
"""Writes kiln's interop fixtures under tests/fixtures/hf/ with Hugging Face transformers.

Independent of kiln: transformers builds tiny random models, saves them as Hugging Face
directories and computes the logits kiln must reproduce after importing them.

  llama/        LlamaForCausalLM: GQA (4 query / 2 kv heads), untied lm_head, f32
  llama-bf16/   the same weights in bfloat16, sharded (model.safetensors.index.json)
  qwen3/        Qwen3ForCausalLM: GQA, head_dim 16 != hidden/heads, qk-norm, tied, f32
  llama2c/      the llama/ model as llama2.c checkpoints: model_legacy.bin (run.c's format)
                and model_v1.bin (export.py version1_export), q/k rows permuted to
                llama2.c's interleaved RoPE as its export.py does

Each model directory holds expected.safetensors: input_ids (1, T) and logits (T, V) from
transformers in float32 (eager attention), computed from the stored weights (the bf16
model's logits from its bf16 weights widened to f32).

Usage: pip install torch transformers safetensors && python3 scripts/make_hf_fixtures.py
"""

import json
import pathlib
import struct

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
VOCAB = 96
SEQ = 12
TEXT = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
        "a jumbo feline; pack my box with five dozen liquor jugs. ") * 20


def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def randomize(model, gen):
    # transformers initialises norms to 1; random gains and larger weights make every tensor
    # matter to the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def expected(model, directory, input_ids):
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
    save_file({"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
              str(directory / "expected.safetensors"))


def llama2c_files(model, directory):
    """The model in llama2.c's legacy and v1 formats, following llama2.c's export.py."""
    c = model.config
    dim, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = dim // heads

    def to_interleaved(w, n_heads):
        # Inverse of Hugging Face's permute (convert_llama_weights_to_hf.py).
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    sd = {k: v.float() for k, v in model.state_dict().items()}
    layers = range(c.num_hidden_layers)
    L = lambda name: [sd[f"model.layers.{i}.{name}.weight"] for i in layers]
    wq = [to_interleaved(w, heads) for w in L("self_attn.q_proj")]
    wk = [to_interleaved(w, kv_heads) for w in L("self_attn.k_proj")]
    shared = c.tie_word_embeddings
    ints = [dim, c.intermediate_size, c.num_hidden_layers, heads, kv_heads,
            c.vocab_size if shared else -c.vocab_size, c.max_position_embeddings]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(c.max_position_embeddings).float(), freqs)

    def dump(path, header, tensors):
        with open(path, "wb") as f:
            f.write(header)
            for t in tensors:
                f.write(t.contiguous().numpy().astype("<f4").tobytes())

    legacy = [sd["model.embed_tokens.weight"], *L("input_layernorm"), *wq, *wk, *L("self_attn.v_proj"),
              *L("self_attn.o_proj"), *L("post_attention_layernorm"), *L("mlp.gate_proj"),
              *L("mlp.down_proj"), *L("mlp.up_proj"), sd["model.norm.weight"], angles.cos(), angles.sin()]
    if not shared:
        legacy.append(sd["lm_head.weight"])
    dump(directory / "model_legacy.bin", struct.pack("7i", *ints), legacy)

    header = struct.pack("I", 0x616B3432) + struct.pack("i", 1) + struct.pack("7i", *[abs(x) for x in ints])
    header += struct.pack("B", int(shared))
    header += b"\0" * (256 - len(header))
    v1 = [*L("input_layernorm"), *L("post_attention_layernorm"), sd["model.norm.weight"],
          sd["model.embed_tokens.weight"], *wq, *wk, *L("self_attn.v_proj"), *L("self_attn.o_proj"),
          *L("mlp.gate_proj"), *L("mlp.down_proj"), *L("mlp.up_proj")]
    if not shared:
        v1.append(sd["lm_head.weight"])
    dump(directory / "model_v1.bin", header, v1)


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2024)
    tok = tokenizer()
    input_ids = torch.randint(3, VOCAB, (1, SEQ), generator=gen)

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")).eval()
    randomize(llama, gen)
    d = OUT / "llama"
    llama.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    expected(llama, d, input_ids)

    bf16 = LlamaForCausalLM(llama.config).eval()
    bf16.load_state_dict(llama.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    d = OUT / "llama-bf16"
    bf16.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    tok.save(str(d / "tokenizer.json"))
    # Reference: a fresh f32 model holding the bf16-rounded weights. (Casting the bf16 model
    # back with .to(float32) would also keep transformers' RoPE inv_freq buffer rounded to bf16.)
    widened = LlamaForCausalLM(llama.config).eval()
    widened.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    expected(widened, d, input_ids)

    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager")).eval()
    randomize(qwen, gen)
    d = OUT / "qwen3"
    qwen.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    expected(qwen, d, input_ids)

    d = OUT / "llama2c"
    d.mkdir(parents=True, exist_ok=True)
    llama2c_files(llama, d)
    expected(llama, d, input_ids)

    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(OUT.parent.parent.parent)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
