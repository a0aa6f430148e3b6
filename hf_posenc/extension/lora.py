"""PEFT LoRA setup of the recipes: the recipe's ``lora:`` settings mapped onto ``hf_posenc.peft_utils``."""

from __future__ import annotations

from ..peft_utils import load_adapter, lora_config
from .recipe_config import LoraSettings

__all__ = ["load_adapter", "lora_config_for", "wrap_with_lora"]


def lora_config_for(model, settings: LoraSettings):
    """The ``peft.LoraConfig`` for ``model``: the architecture's attention projections (unless
    ``lora.target_modules`` is set), the encoding's ``posenc`` tables in ``modules_to_save`` whenever
    they have parameters (a fresh table has nothing for LoRA to adapt), and LongLoRA's embeddings and
    norms with ``lora.train_embeddings_and_norms``."""
    return lora_config(
        model,
        r=settings.r,
        alpha=settings.alpha,
        dropout=settings.dropout,
        longlora=settings.train_embeddings_and_norms,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save,
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model, settings: LoraSettings):
    """Return ``model`` wrapped as a ``PeftModel`` ready to train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config_for(model, settings))
