"""Small models and inputs shared by the tests of scoring and decoding."""

from __future__ import annotations

import torch


def encode(tok, contents):
    """Chat-templated user prompts, left-padded, as the datamodule renders them."""
    msgs = [[{"role": "user", "content": c}] for c in contents]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                   return_dict=True)


def random_lm(kind: str, dtype=torch.float32):
    """A small random Qwen2 (q/k/v biases), Llama (no biases, head size set apart from hidden / heads) or
    Llama with biases on every attention projection (o_proj's included) and yarn rope scaling (attention
    factor != 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=kind == "qwen2")
    torch.manual_seed(11)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=16, rope_theta=500.0))
    else:
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 500.0}
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, rope_parameters=yarn))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8) if p.dim() == 2 else p.normal_(0, 0.5)  # logits far from uniform, biases non-zero
    return model.to(dtype).eval()


def scored_batch(V=50, B=4, P=7, R=6, seed=0, layout="left_padded"):
    """Prompts and responses as a rollout leaves them: responses right-padded after an 'EOS'; prompts
    ``left_padded``, ``unpadded``, or ``shared_prefix`` (every row opens with the same 4 tokens, as a chat
    template or a system prompt does)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g)
    mask = torch.ones_like(ids)
    if layout == "left_padded":
        mask[0, :3] = 0
        mask[2, :1] = 0
    elif layout == "shared_prefix":
        ids[:, :4] = ids[0, :4]
    mask[1, P + 2:] = 0  # a response that ended early
    ids[3, P + 1] = 0  # the padding id sampled as a token (see the gradient test)
    return ids, mask, P
