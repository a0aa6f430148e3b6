"""PEFT LoRA setup for context extension: which modules to adapt and which to train fully."""

from __future__ import annotations

from .recipe_config import LoraSettings

#: Attention projections LoRA adapts, per ``config.model_type`` (the architecture is data).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}

#: LongLoRA's extra trainable modules (input embeddings and every norm), matched by name suffix as
#: PEFT's ``modules_to_save`` does ("norm" matches ``input_layernorm``, ``model.norm``, ...).
EMBED_AND_NORMS = {
    "llama": ["embed_tokens", "norm"],
    "mistral": ["embed_tokens", "norm"],
    "qwen2": ["embed_tokens", "norm"],
    "qwen3": ["embed_tokens", "norm"],
    "phi": ["embed_tokens", "layernorm", "final_layernorm"],
    "phi3": ["embed_tokens", "norm"],
    "gpt_neox": ["embed_in", "layernorm", "final_layer_norm"],
    "gpt2": ["wte", "ln_1", "ln_2", "ln_f"],
}

#: Name of the modules in which ``hf_posenc.convert`` keeps learned position parameters.
POSENC_MODULE = "posenc"


def has_trainable_posenc(model) -> bool:
    """Whether the converted model has position modules with parameters (CoPE, T5 bias tables)."""
    return any(
        name.rsplit(".", 1)[-1] == POSENC_MODULE and any(True for _ in module.parameters())
        for name, module in model.named_modules()
    )


def lora_config_for(model, settings: LoraSettings):
    """Build the ``peft.LoraConfig`` for ``model``.

    Position tables of the new encoding must be trained fully (a freshly added table has nothing for
    LoRA to adapt), so ``posenc`` joins ``modules_to_save`` whenever it has parameters.
    """
    from peft import LoraConfig

    # A plug-in conversion registers the model as ``hf_posenc_<type>``; the layout is the stock one.
    model_type = model.config.model_type.removeprefix("hf_posenc_")
    targets = settings.target_modules or TARGETS.get(model_type)
    if not targets:
        raise ValueError(
            f"no default LoRA target modules for model_type={model_type!r}; set lora.target_modules "
            f"(known: {sorted(TARGETS)})"
        )
    to_save = list(settings.modules_to_save)
    if has_trainable_posenc(model) and POSENC_MODULE not in to_save:
        to_save.append(POSENC_MODULE)
    if settings.train_embeddings_and_norms:
        extra = EMBED_AND_NORMS.get(model_type)
        if extra is None:
            raise ValueError(f"lora.train_embeddings_and_norms: no embedding/norm names known for {model_type!r}")
        to_save += [m for m in extra if m not in to_save]
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        # With tied input/output embeddings, a trained copy of the input table must stay tied to the
        # head, or merging silently unties them (SmolLM2 ties its embeddings).
        ensure_weight_tying=settings.train_embeddings_and_norms and bool(getattr(model.config, "tie_word_embeddings", False)),
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model, settings: LoraSettings):
    """Return ``model`` wrapped as a ``PeftModel`` ready to train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config_for(model, settings))


def load_adapter(model, adapter_dir: str):
    """Load a saved adapter onto a converted base and refuse silent weight drops.

    PEFT loads an adapter onto a base that lacks its ``posenc`` modules without complaint and drops
    those weights (DESIGN §3); here any unexpected key is an error.
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    peft_model = get_peft_model(model, PeftConfig.from_pretrained(adapter_dir))
    result = set_peft_model_state_dict(peft_model, load_peft_weights(adapter_dir))
    if result.unexpected_keys:
        raise ValueError(
            f"adapter {adapter_dir} has weights the model lacks (was the base converted to the same "
            f"encoding?): {sorted(result.unexpected_keys)[:5]}"
        )
    return peft_model
