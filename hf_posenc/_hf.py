"""Every piece of knowledge about transformers internals that hf_posenc relies on lives here.

Checked against transformers 5.23 (the range pinned in pyproject.toml). If a transformers upgrade
breaks the plug-in, this is the one file to read.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from . import attention

#: The transformers range these internals were checked against (pinned in pyproject.toml too).
SUPPORTED_TRANSFORMERS = ">=5.23,<5.24"

_registered = False


def register_attention() -> None:
    """Register ``hf_posenc_eager`` / ``hf_posenc_sdpa`` and their mask functions (idempotent).

    The mask function matters: for an attention name without one, ``create_causal_mask`` returns None
    and padding would be silently ignored. This adds names only; no stock model changes.
    """
    global _registered
    if _registered:
        return
    AttentionInterface.register(attention.EAGER, attention.posenc_eager_attention)
    AttentionInterface.register(attention.SDPA, attention.posenc_sdpa_attention)
    AttentionMaskInterface.register(attention.EAGER, eager_mask)
    AttentionMaskInterface.register(attention.SDPA, sdpa_mask)
    _registered = True


def attn_implementation(model) -> str:
    """The attention backend the model currently dispatches to."""
    return model.config._attn_implementation or "eager"


def set_attn_implementation(model, name: str) -> None:
    """Switch a loaded model (and its sub-models) to the attention function ``name``."""
    model.set_attn_implementation(name)


def cache_past_length(cache, layer_idx: int):
    """Tokens already in ``cache`` for ``layer_idx`` before this forward's update.

    StaticCache keeps a live tensor counter that its ``update`` increments in place: clone it so the
    attention function still sees the value from before the update.
    """
    if cache is None:
        return 0
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache (GPT-2 with cross-attention)
    past = cache.get_seq_length(layer_idx)
    return past.clone() if isinstance(past, torch.Tensor) else past


def check_transformers_version() -> None:
    """Warn (once, at import) when the installed transformers is outside the checked range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(transformers.__version__) not in SpecifierSet(SUPPORTED_TRANSFORMERS):
        warnings.warn(
            f"hf_posenc was checked against transformers{SUPPORTED_TRANSFORMERS}; found {transformers.__version__}. "
            "Conversions may fail or behave differently: run the test suite before relying on them.",
            stacklevel=3,
        )


def forget_gguf_quantizer(model) -> None:
    """A model loaded from a GGUF file holds plain dequantized tensors, but transformers keeps its GGUF
    quantizer attached, which refuses ``save_pretrained`` and training. Detach it (no weight changes)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)
