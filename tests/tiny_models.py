"""Tiny random configs of every supported architecture (shared by the tests)."""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "phi": lambda: PhiConfig(**_COMMON, partial_rotary_factor=0.5),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "bert": lambda: BertConfig(**_COMMON),
}
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "phi", "gpt_neox", "gpt2"]
ROPE_DECODERS = ["llama", "mistral", "qwen2", "qwen3", "phi", "gpt_neox"]
KINDS = ["rope", "nope", "alibi", "t5_bias", "cope"]


def tiny_config(arch: str):
    return CONFIGS[arch]()


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0):
    """A random tiny model in eval mode (fp32); the same seed gives the same weights."""
    torch.manual_seed(seed)
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = auto.from_config(copy.deepcopy(tiny_config(arch)), attn_implementation=attn_implementation)
    return model.eval()


def randomize_position_tables(model, seed: int = 1) -> None:
    """Give fresh (zero) learned position tables random values so tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".posenc." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def input_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
