"""Read where a decoder's pieces live from its module tree, for architectures that have no table row.

A decoder whose attention goes through transformers' ``AttentionInterface`` (``_supports_attention_backend``)
and that is laid out like Llama (one list of blocks, one attention module per block with ``q_proj``/``k_proj``/
``v_proj``/``o_proj``, one shared ``rotary_emb`` whose ``(cos, sin)`` reach the attention as
``position_embeddings``, half-split RoPE over the whole head) converts without a row. The reading is
conservative: anything it cannot place unambiguously raises :class:`StructureError` naming it, since a guess
would convert into a silently wrong model. :func:`hf_posenc.architectures.architecture_of` turns the fields
read here into a row; rows in the table stay authoritative.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys

import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

#: The attention projections a rowless decoder must have, and nothing else besides them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class StructureError(ValueError):
    """The module tree does not say unambiguously where a piece lives; the message names the piece, as what the
    tree must show."""


def _base_model_class(model_type: str) -> type | None:
    """The stock base model class of ``model_type`` (one class name in transformers' mapping), or None."""
    name = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


@functools.cache
def calls_attention_interface(model_type: str) -> bool:
    """Whether the installed transformers' modeling file of ``model_type`` calls attention through
    ``AttentionInterface`` (it reads ``ALL_ATTENTION_FUNCTIONS``) rather than per-backend classes of its own."""
    model_class = _base_model_class(model_type)
    return model_class is not None and "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[model_class.__module__])


def read_decoder(config, model_type: str) -> dict:
    """The :class:`~hf_posenc.architectures.Architecture` fields of a rowless decoder, read from its module tree.

    The stock base model is built on the meta device (no memory, no weights) from a copy of ``config``.

    Args:
        config: The model's config (stock, or an ``hf_posenc_<type>`` one).
        model_type: The stock ``model_type`` (``hf_posenc_`` prefix removed).

    Returns:
        Keyword arguments of ``Architecture``.

    Raises:
        StructureError: A piece is missing or ambiguous (the message names it).
    """
    if model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise StructureError("a causal-LM head in transformers (only decoders convert without a row)")
    model_class = _base_model_class(model_type)
    if model_class is None:
        raise StructureError("a single base model class in transformers")
    name = model_class.__name__
    if not getattr(model_class, "_supports_attention_backend", False):
        raise StructureError(f"attention called through AttentionInterface ({name} does not declare it)")
    stock = copy.deepcopy(config)
    stock.__class__ = CONFIG_MAPPING[model_type]  # an hf_posenc_<type> config subclasses it
    with torch.device("meta"):
        base = model_class(stock)
    layers = _layers(base, config.num_hidden_layers)
    attention = _attention(base, layers)
    _check_rope(base, config, layers, attention)
    embeddings = [path for path, module in base.named_modules() if isinstance(module, nn.Embedding)]
    if len(embeddings) != 1:
        raise StructureError(f"one token embedding and no learned position table (found embeddings {embeddings})")
    return dict(layers=layers, attention=attention, rope="native", lora_targets=PROJECTIONS,
                name=name.removesuffix("Model"), notes="read from the module tree (no row)")


def _layers(base: nn.Module, count: int) -> str:
    """The path of the one ``ModuleList`` holding ``count`` blocks."""
    found = [path for path, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(found) != 1:
        raise StructureError(f"one list of {count} layers (found {found or 'none'})")
    return found[0]


def _attention(base: nn.Module, layers: str) -> str:
    """The path, within a block, of the one module owning ``q_proj`` and ``k_proj``, the same in every block."""
    blocks = base.get_submodule(layers)
    found = [path for path, module in blocks[0].named_modules()
             if path and all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj"))]
    if len(found) != 1:
        raise StructureError(f"one attention module with q_proj and k_proj per layer (found {found or 'none'})")
    path = found[0]
    for index, block in enumerate(blocks):
        module = block.get_submodule(path) if _has(block, path) else None
        children = sorted(module._modules) if module is not None else []
        if children != sorted(PROJECTIONS):
            # A norm or other module between the projections and RoPE: its place cannot be read from the tree.
            raise StructureError(f"exactly {list(PROJECTIONS)} in the attention module `{path}` of layer {index} "
                                 f"(found {children})")
        if getattr(module, "is_causal", None) is not True:
            raise StructureError(f"a causal attention module (`{path}`.is_causal is not True)")
        if "position_embeddings" not in inspect.signature(module.forward).parameters:
            raise StructureError(f"the `position_embeddings` argument of `{path}`.forward")
    return path


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _check_rope(base: nn.Module, config, layers: str, attention: str) -> None:
    """One shared ``rotary_emb`` and a full-head, half-split RoPE applied by the attention's own module."""
    rotary = [path for path, module in base.named_modules() if type(module).__name__.endswith("RotaryEmbedding")]
    if rotary != ["rotary_emb"]:
        raise StructureError(f"one shared rotary module `rotary_emb` on the base model (found {rotary or 'none'})")
    if not isinstance(getattr(config, "rope_parameters", None), dict):
        raise StructureError("a config.rope_parameters dict")
    partial = [getattr(config, "partial_rotary_factor", None)]
    partial += [p.get("partial_rotary_factor") for p in _rope_parameter_sets(config.rope_parameters)]
    if any(value not in (None, 1, 1.0) for value in partial):
        raise StructureError("a RoPE over the whole head (partial_rotary_factor is not 1)")
    attn = base.get_submodule(layers)[0].get_submodule(attention)
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None or not _rotates_half_split(apply):
        raise StructureError(f"a half-split RoPE (apply_rotary_pos_emb of {type(attn).__module__})")


def _rope_parameter_sets(params: dict) -> list[dict]:
    """One set, or one per layer type (local and global bases)."""
    nested = [value for value in params.values() if isinstance(value, dict)]
    return nested or [params]


def _rotates_half_split(apply) -> bool:
    """Whether ``apply(q, k, cos, sin)`` is the half-split rotation (GPT-NeoX layout) on probe tensors."""
    # On the CPU explicitly: from_pretrained reads the row while it builds the model under a meta default device.
    cpu = torch.device("cpu")
    generator = torch.Generator(cpu).manual_seed(0)
    q, k = torch.randn(2, 1, 2, 3, 8, generator=generator, device=cpu)  # [B=1, H=2, T=3, D=8] each
    angles = torch.arange(3.0, device=cpu)[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.03], device=cpu)  # [T, D/2]
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]  # [1, T, D]

    def rotate(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    try:
        got_q, got_k = apply(q, k, cos, sin)
    except Exception:  # another signature: not the rotation this reading knows
        return False
    return torch.allclose(got_q, rotate(q), atol=1e-6) and torch.allclose(got_k, rotate(k), atol=1e-6)
