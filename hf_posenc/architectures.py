"""Supported architectures: one row per architecture, no per-architecture code.

Adding an architecture is one row of ``ARCHITECTURES`` plus tests (see CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Where the pieces of one transformers architecture live.

    Attributes:
        model_type: ``config.model_type``.
        layers: Path from the base model to the list of blocks.
        attention: Path from a block to the module that calls the attention function.
        rope: ``"native"`` (full-head RoPE), ``"native_partial"`` (RoPE honouring
            ``partial_rotary_factor``) or ``"none"``.
        absolute: Paths (from the base model) of learned absolute position embeddings to neutralise.
        causal: True for decoders, False for encoders (None: ``config.is_decoder`` decides).
        q_proj, k_proj: Names of the query/key projections in the attention module; for fused
            projections, the fused module name and ``fused`` says the row layout.
        fused: None, ``"neox"`` (rows ``[H, (q, k, v), D]``) or ``"gpt2"`` (Conv1D columns ``[(q, k, v), H, D]``).
        qk_norms: Per-head-dim norms applied to q/k before RoPE (their weights follow RoPE layouts).
        lora_targets: Default LoRA target modules (the attention projections).
    """

    model_type: str
    layers: str
    attention: str
    rope: str
    absolute: tuple[str, ...] = ()
    causal: bool | None = True
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    fused: str | None = None
    qk_norms: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        Architecture("llama", layers="layers", attention="self_attn", rope="native"),
        Architecture("mistral", layers="layers", attention="self_attn", rope="native"),
        Architecture("qwen2", layers="layers", attention="self_attn", rope="native"),
        Architecture("qwen3", layers="layers", attention="self_attn", rope="native", qk_norms=("q_norm", "k_norm")),
        Architecture(
            "phi", layers="layers", attention="self_attn", rope="native_partial",
            qk_norms=("q_layernorm", "k_layernorm"), lora_targets=("q_proj", "k_proj", "v_proj", "dense"),
        ),
        Architecture(
            "gpt_neox", layers="layers", attention="attention", rope="native_partial",
            q_proj="query_key_value", k_proj="query_key_value", fused="neox",
            lora_targets=("query_key_value", "dense"),
        ),
        Architecture(
            "gpt2", layers="h", attention="attn", rope="none", absolute=("wpe",),
            q_proj="c_attn", k_proj="c_attn", fused="gpt2", lora_targets=("c_attn", "c_proj"),
        ),
        Architecture(
            "bert", layers="encoder.layer", attention="attention.self", rope="none",
            absolute=("embeddings.position_embeddings",), causal=None, q_proj="query", k_proj="key",
            lora_targets=("query", "key", "value"),
        ),
    )
}

#: Prefix of the ``model_type`` of converted checkpoints that stock transformers cannot express.
MODEL_TYPE_PREFIX = "hf_posenc_"


def base_model_type(model_type: str) -> str:
    """``"hf_posenc_llama"`` -> ``"llama"``; stock types unchanged."""
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def architecture_of(config) -> Architecture:
    """The table row of a model config.

    Raises:
        ValueError: The architecture is not supported (the message lists the supported ones).
    """
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture model_type={model_type!r}; hf_posenc supports: {sorted(ARCHITECTURES)}. "
            "Adding one is a row in hf_posenc/architectures.py (see CONTRIBUTING.md)."
        )
    return ARCHITECTURES[model_type]


def is_causal(arch: Architecture, config) -> bool:
    return bool(config.is_decoder) if arch.causal is None else arch.causal


def lora_target_modules(model_or_config) -> list[str]:
    """Default LoRA targets (attention projections) for a model or config of a supported architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    return list(architecture_of(config).lora_targets)


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def attention_modules(model, arch: Architecture) -> list:
    """The attention module of every block, in layer order."""
    return [_get(block, arch.attention) for block in _get(model.base_model, arch.layers)]
