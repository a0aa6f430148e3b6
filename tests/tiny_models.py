"""Tiny random configs of every supported architecture (shared by the tests).

``CONFIGS`` has one entry per row of ``hf_posenc.ARCHITECTURES`` (``test_architectures`` fails if they
drift apart), and the lists below are derived from the rows, so a new row gets the whole test matrix
by adding its config here. Configs are as small as the architecture allows (2 layers, hidden 32) and
switch on what the architecture does around attention (soft-capping, windows, q/k norms, multipliers).
"""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

import hf_posenc
from hf_posenc import registry
from hf_posenc.architectures import ARCHITECTURES
from hf_posenc.module_tree import calls_attention_interface

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: The sliding window of the tiny configs that have one: shorter than the generate tests' sequences.
WINDOW = 6
#: Falcon's shape; its configs choose the fused qkv layout (new_decoder_architecture, multi_query) and ALiBi.
FALCON = dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bias=True, **_TOKENS)
_ALTERNATING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])


def _config(name: str, **kwargs):
    return getattr(transformers, name)(**kwargs)


CONFIGS = {
    "llama": lambda: _config("LlamaConfig", **_COMMON, num_key_value_heads=2),
    "mistral": lambda: _config("MistralConfig", **_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: _config("Qwen2Config", **_COMMON, num_key_value_heads=2),
    "qwen3": lambda: _config("Qwen3Config", **_COMMON, num_key_value_heads=2, head_dim=8),
    "phi": lambda: _config("PhiConfig", **_COMMON, partial_rotary_factor=0.5),
    "gpt_neox": lambda: _config("GPTNeoXConfig", **_COMMON, rotary_pct=0.5),
    # rotary_dim=4 of head_dim 8: partial interleaved rotary.
    "gptj": lambda: _config("GPTJConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            n_inner=64, rotary_dim=4, **_TOKENS),
    # The new decoder (grouped fused qkv, 2 kv heads) with biases; the other layouts and ALiBi: test_gptj_falcon.
    "falcon": lambda: _config("FalconConfig", **FALCON, new_decoder_architecture=True, num_kv_heads=2),
    "gpt2": lambda: _config("GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "bert": lambda: _config("BertConfig", **_COMMON),
    "gemma": lambda: _config("GemmaConfig", **_COMMON, num_key_value_heads=2, head_dim=8),
    # Soft-capping at 2 (stock: 50) and larger weights, so that the cap changes the logits of a tiny model.
    "gemma2": lambda: _config("Gemma2Config", **_COMMON, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              attn_logit_softcapping=2.0, final_logit_softcapping=5.0, initializer_range=0.2,
                              **_ALTERNATING),
    "gemma3_text": lambda: _config("Gemma3TextConfig", **_COMMON, num_key_value_heads=2, head_dim=8,
                                   query_pre_attn_scalar=8, **_ALTERNATING),
    "phi3": lambda: _config("Phi3Config", **_COMMON, num_key_value_heads=2, partial_rotary_factor=0.5, **_TOKENS),
    "mixtral": lambda: _config("MixtralConfig", **_COMMON, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2),
    "qwen2_moe": lambda: _config("Qwen2MoeConfig", **_COMMON, num_key_value_heads=2, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: _config("Qwen3MoeConfig", **_COMMON, num_key_value_heads=2, head_dim=8, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=16),
    "olmo": lambda: _config("OlmoConfig", **_COMMON, clip_qkv=0.5, **_TOKENS),
    "olmo2": lambda: _config("Olmo2Config", **_COMMON, num_key_value_heads=2, **_TOKENS),
    "granite": lambda: _config("GraniteConfig", **_COMMON, num_key_value_heads=2, attention_multiplier=0.3,
                               embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "stablelm": lambda: _config("StableLmConfig", **_COMMON, num_key_value_heads=2, partial_rotary_factor=0.5,
                                qk_layernorm=True, use_qkv_bias=True, **_TOKENS),
    "starcoder2": lambda: _config("Starcoder2Config", **_COMMON, num_key_value_heads=2, sliding_window=WINDOW,
                                  **_TOKENS),
    "cohere": lambda: _config("CohereConfig", **_COMMON, num_key_value_heads=2, use_qk_norm=True, **_TOKENS),
    "cohere2": lambda: _config("Cohere2Config", **_COMMON, num_key_value_heads=2, head_dim=8, **_ALTERNATING,
                               **_TOKENS),
    "smollm3": lambda: _config("SmolLM3Config", **_COMMON, num_key_value_heads=2, no_rope_layers=[1, 0], **_TOKENS),
    "roberta": lambda: _config("RobertaConfig", **_COMMON),
    "xlm-roberta": lambda: _config("XLMRobertaConfig", **_COMMON),
    "camembert": lambda: _config("CamembertConfig", **_COMMON),
    "electra": lambda: _config("ElectraConfig", **_COMMON, embedding_size=16),
    "ernie": lambda: _config("ErnieConfig", **_COMMON),
    "distilbert": lambda: _config("DistilBertConfig", vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                  max_position_embeddings=128),
    # local_attention=4: a 5-key window (2 each side), shorter than the test sequences.
    "modernbert": lambda: _config("ModernBertConfig", **_COMMON, local_attention=4, global_attn_every_n_layers=2,
                                  cls_token_id=1, sep_token_id=2, **_TOKENS),
}
#: Rows the installed transformers cannot run: GPT-J and Falcon before their attention went through
#: AttentionInterface (transformers 5.5); conversion refuses them there (test_architectures checks the message).
REFUSED_HERE = sorted(a for a in CONFIGS if ARCHITECTURES[a].interface_checked and not calls_attention_interface(a))
#: Every architecture the tests cover (``test_architectures`` keeps it, with ``REFUSED_HERE``, equal to
#: ``ARCHITECTURES``).
TESTED = sorted(a for a in CONFIGS if a not in REFUSED_HERE)
DECODERS = [a for a in TESTED if ARCHITECTURES[a].causal is True]
ENCODERS = [a for a in TESTED if a not in DECODERS]
ROPE_DECODERS = [a for a in DECODERS if ARCHITECTURES[a].rope != "none"]
ROPE_ARCHS = [a for a in TESTED if ARCHITECTURES[a].rope != "none"]
#: Architectures whose tiny config has sliding-window layers.
SLIDING = [a for a in TESTED if getattr(CONFIGS[a](), "sliding_window", None)]
#: Where the expensive generate tests run the full backend x kind matrix; every other decoder runs every
#: kind on one backend (the attention functions are shared, what differs per row is around them).
REPRESENTATIVE = ["llama", "gpt_neox", "gpt2", "gemma2", "phi3"]


def token_kinds() -> list[str]:
    """Every registered kind of token-sequence models, read from the registry now (a kind registered later,
    as by ``test_new_kind``'s toy kind, is in the next call's list)."""
    return [kind for kind in registry.kinds() if not registry.get(kind).capabilities.patch_grid]


#: Every registered kind of token-sequence models: a new kind's registry entry puts it in the whole matrix. Kinds
#: that rotate by an image's patch grid have a matrix of their own (``tests/tiny_vision_models.py``).
KINDS = token_kinds()


def kinds_where(predicate) -> list[str]:
    """The token kinds registered now whose declared capabilities satisfy ``predicate``."""
    return [kind for kind in token_kinds() if predicate(registry.get(kind).capabilities)]


def example_params(kind: str) -> dict:
    """The tested configuration of ``kind`` (its entry's ``Example.params``), as ``PosEncConfig`` keywords."""
    return {"kind": kind, **registry.get(kind).example.params}


#: Kinds that run our attention functions (a route), with an additive bias that encoders take, with learned tables.
ATTENTION_KINDS = kinds_where(lambda c: c.route is not None)
BIAS_KINDS = kinds_where(lambda c: c.route == "bias" and not c.causal_only)
TABLE_KINDS = kinds_where(lambda c: bool(c.tables))
#: Kinds whose freshly converted model is the stock NoPE model: nothing applied, or a bias/attention whose
#: learned tables start as a no-op (CONTRIBUTING: ``reset_parameters``) and that rotate nothing (FoX keeps RoPE).
NOOP_KINDS = kinds_where(lambda c: c.route is None or (bool(c.tables) and c.route != "rotate" and not c.rotates))


def allowed_kinds(arch: str) -> list[str]:
    """The kinds the architecture's tiny config takes (the others are refused: see the refusal tests)."""
    config, row = tiny_config(arch), ARCHITECTURES[arch]
    causal = row.causal if row.causal is not None else config.is_decoder
    def takes(kind: str) -> bool:
        caps = registry.get(kind).capabilities
        return (row.refusal(kind, config) is None and (causal or not caps.causal_only)
                and not (caps.extends_rope and row.rope == "none"))  # nothing to extend on a RoPE-less model

    return [k for k in token_kinds() if takes(k)]


def tiny_config(arch: str):
    return CONFIGS[arch]()


def stock_backend(arch: str, backend: str) -> str:
    """``backend`` if the stock class supports it, else eager (Gemma 2: stock sdpa cannot soft-cap)."""
    config = tiny_config(arch)
    auto = AutoModelForCausalLM if ARCHITECTURES[arch].causal is True else AutoModel
    cls = auto._model_mapping[type(config)]
    return backend if backend != "sdpa" or getattr(cls, "_supports_sdpa", True) else "eager"


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0):
    """A random tiny model in eval mode (fp32); the same seed gives the same weights."""
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if ARCHITECTURES[arch].causal is True else AutoModel
    model = auto.from_config(copy.deepcopy(tiny_config(arch)), attn_implementation=attn_implementation)
    return model.eval()


def converted(arch: str, kind: str, backend: str = "eager", seed: int = 0, **params):
    """A tiny model converted to ``kind`` on our ``backend`` (built on the stock backend it supports)."""
    model = tiny_model(arch, stock_backend(arch, backend), seed)
    return hf_posenc.convert(model, hf_posenc.PosEncConfig(kind=kind, **params), attn_implementation=backend)


def randomize_position_tables(model, seed: int = 1) -> None:
    """Give fresh (zero) learned position tables random values so tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".posenc." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for module in model.modules():
            if not _is_position_module(module):
                continue
            # Tables a paper keeps positive (KERPLE's r1, r2: a negative r1 reads as 0, a bias-free head whose r2
            # gets no gradient) and away from 0 (a power r2 near 0 gives every distance the same bias).
            example = registry.entry_of(module).example
            for table in example.positive_tables:
                getattr(module, table).abs_().add_(0.5)
            for table, value in example.fixed_tables.items():  # a scale the tests' lengths must cross (FIRE's L)
                getattr(module, table).fill_(value)


def _is_position_module(module) -> bool:
    """Whether ``module`` is the module of a registered kind."""
    try:
        registry.entry_of(module)
    except TypeError:
        return False
    return True


def input_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def assert_cache_equals_no_cache(model, prompt: torch.Tensor, new_tokens: int) -> None:
    """Greedy generation of exactly ``new_tokens`` with a dynamic and with a static cache equals generation
    without a cache."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        expected = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(model.generate(prompt, **kwargs), expected)
        assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)


def assert_cuda_sdpa_equals_eager(kind: str) -> None:
    """A converted tiny Llama on CUDA with the sdpa backend (the kernels ``select`` picks there) equals the eager
    backend's explicit scores, forward and backward, on a padded batch with randomised position tables."""
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), hf_posenc.PosEncConfig(**example_params(kind))).cuda()
    randomize_position_tables(model)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    ids = input_ids(2, 14).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    results = []
    for m in (model, reference):
        m.zero_grad()
        logits = m(ids, attention_mask=mask).logits * mask[..., None]
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (got, got_grads), (expected, expected_grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for name, grad in expected_grads.items():
        assert ((got_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)) < 1e-3, name
