"""Every piece of knowledge about transformers internals that hf_posenc relies on lives here.

Checked against every transformers release from 5.5 to 5.25 (5.25.0 on 2026-12-06; CI runs the suite on the lower bounds
of pyproject.toml and on the newest releases). Where releases differ, this module detects the feature
(which argument name a forward takes) instead of comparing version numbers. If a transformers upgrade
breaks the plug-in, this is the one file to read.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

#: The transformers range these internals were checked against (the same string as in pyproject.toml;
#: a test keeps them equal). 5.5 is the floor: see the comment in pyproject.toml.
SUPPORTED_TRANSFORMERS = ">=5.5,<6"

#: transformers' mask function for each stock backend whose masks an attention function takes.
_MASK_FUNCTIONS = {"eager": eager_mask, "sdpa": sdpa_mask}


def register_attention(name: str, function, masks: str) -> None:
    """Register an attention function under ``name``, with the mask function of the stock backend ``masks``
    (``"eager"``: float masks, ``"sdpa"``: bool masks). Registering the same name again replaces it.

    The mask function matters: for an attention name without one, ``create_causal_mask`` returns None
    and padding would be silently ignored. This adds names only; no stock model changes.
    """
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, _MASK_FUNCTIONS[masks])


def attn_implementation(model) -> str:
    """The attention backend the model currently dispatches to."""
    return model.config._attn_implementation or "eager"


def check_backend(model, backend: str) -> None:
    """Refuse ``backend="sdpa"`` on a class that does not support SDPA (Gemma 2, whose logit soft-capping
    SDPA cannot express): transformers rejects every attention name containing ``"sdpa"`` for such a class,
    ``hf_posenc_sdpa`` included, with an error about SDPA support that would not name the fix.

    Raises:
        ValueError: The model's class sets ``_supports_sdpa = False``.
    """
    if backend == "sdpa" and not getattr(model, "_supports_sdpa", True):
        raise ValueError(f"{type(model).__name__} does not support attn_implementation='sdpa' in transformers (for "
                         f"any attention function named *sdpa*, hf_posenc's included); use 'eager'.")


def set_attn_implementation(model, name: str) -> None:
    """Switch a loaded model (and its sub-models) to the attention function ``name``."""
    model.set_attn_implementation(name)


#: The ``PreTrainedModel`` method that both ``__init__`` and ``set_attn_implementation`` call to check (and
#: adjust) a requested attention name, in every release from 5.1 (5.2x added an ``allow_all_kernels``
#: argument: overrides take ``*args, **kwargs``). The ``HfPosenc`` classes override it.
ATTN_IMPLEMENTATION_CHECK = "_check_and_adjust_attn_implementation"


@contextlib.contextmanager
def quiet_checkpointing_deprecation():
    """Drop transformers' ``is_gradient_checkpointing`` deprecation warning (5.25+, removal in v6), and only
    that one, while it is in effect.

    PEFT reads the deprecated property whenever it wraps a model (``PeftModel.__init__``), so each of our
    ``get_peft_model`` / ``PeftModel.from_pretrained`` calls would warn the user about code that is not theirs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def stock_backend_name(config, own_eager: str):
    """Show transformers' config checks ``"eager"`` while ``config`` runs ``own_eager`` (``hf_posenc_eager``).

    Its ``output_attentions`` checks (the setter; the strict ``validate_output_attentions`` of 5.2x, run at
    save time) accept only the literal ``"eager"``, although ours returns the weights too. The internal
    attribute is set directly so that sub-configs are not touched.
    """
    if config._attn_implementation_internal != own_eager:
        yield
        return
    config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        config._attn_implementation_internal = own_eager


#: Names the attention modules' forward has used for the KV cache, newest first: ``cache`` (transformers
#: 5.24+, where ``past_key_values`` is a deprecated alias until 5.40), ``past_key_values`` (5.0-5.23),
#: ``layer_past`` (GPT-NeoX and other older-style modules).
CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past", "past_key_value")


def cache_argument(module) -> tuple[str, int | None]:
    """The cache argument of an attention module's ``forward``: its name and positional index.

    Detected from the signature (``inspect.signature`` follows transformers' ``deprecate_kwarg``
    wrapper to the real parameters) rather than assumed from a version number: a release that renames
    the argument makes this raise at conversion time instead of silently reading no cache, which would
    give every generated token the positions of a prompt without history.

    Raises:
        RuntimeError: The forward takes none of :data:`CACHE_ARGUMENTS`.
    """
    parameters = list(inspect.signature(module.forward).parameters)
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name, parameters.index(name)
    raise RuntimeError(
        f"{type(module).__name__}.forward (transformers {transformers.__version__}) takes none of the cache "
        f"arguments hf_posenc knows {list(CACHE_ARGUMENTS)}; its parameters are {parameters}. hf_posenc cannot "
        "find the KV cache of this release: please report it with the transformers version."
    )


def find_cache(args: tuple, kwargs: dict, argument: tuple[str, int | None]):
    """The cache passed to an attention module's forward (None if none), as seen by a forward pre-hook.

    Looks under the detected name, then positionally, then under the other known names (a caller may
    still pass a deprecated alias that the module's ``deprecate_kwarg`` wrapper renames after the hook).
    """
    name, index = argument
    if kwargs.get(name) is not None:
        return kwargs[name]
    # args excludes `self`; the signature of a bound method does too.
    if index is not None and index < len(args) and isinstance(args[index], Cache):
        return args[index]
    for key, value in kwargs.items():
        if isinstance(value, Cache):
            if key in CACHE_ARGUMENTS:
                return value
            raise RuntimeError(f"hf_posenc found the KV cache under the unknown argument {key!r} (known: "
                               f"{list(CACHE_ARGUMENTS)}); positions would be wrong. Please report it with the "
                               f"transformers version ({transformers.__version__}).")
    return None


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for calling ``model(...)`` with a KV cache under the name its forward takes
    (``cache`` from transformers 5.24, ``past_key_values`` before), so callers raise no FutureWarning."""
    name, _ = cache_argument(model)
    return {name: cache}


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


def appending_cache_layer(cache, layer_idx: int):
    """Layer ``layer_idx`` of ``cache`` if it is a plain ``DynamicLayer`` (its ``update`` concatenates, so the
    keys it returns start with the very keys it held), else None (no cache, other layer kinds, not built yet)."""
    if cache is None:
        return None
    layers = getattr(getattr(cache, "self_attention_cache", cache), "layers", None)
    if layers is None or layer_idx >= len(layers) or type(layers[layer_idx]) is not DynamicLayer:
        return None
    return layers[layer_idx]


#: The method of the stock image embeddings (ViT, DeiT, DINOv2, DINOv2 with registers) that returns the learned
#: absolute table resized to the image (bicubic interpolation of the patch part). DINOv2's forward always adds
#: what it returns; ViT's and DeiT's only with ``interpolate_pos_encoding=True`` and otherwise add the table as
#: it is, after refusing any image size but the configured one.
PATCH_TABLE_METHOD = "interpolate_pos_encoding"


def empty_cache(cache: Cache) -> None:
    """Empty ``cache`` in place, so that the next forward writes it from position 0 (same object: a StaticCache
    stays static and a compiled graph keeps its buffers).

    ``Cache.reset`` alone is not enough on every supported release: before transformers 5.25 a dynamic layer's
    ``reset`` zeroed its tensors instead of dropping them, so they kept their length and the next ``update``
    appended after the zeros.
    """
    cache.reset()
    for layer in getattr(cache, "layers", ()):
        if layer.is_initialized and not layer.is_compileable and layer.keys.numel():
            layer.keys = layer.values = None  # grown by concatenation: the next update starts them again
            layer.is_initialized = False
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = 0


def _no_patch_table(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # embeddings: [B, n, D] -> zeros [1, 1, D], broadcast over every token and any image size.
    return embeddings.new_zeros(1, 1, embeddings.shape[-1])


def _through_the_table_method(module, args, kwargs):
    kwargs["interpolate_pos_encoding"] = True  # the branch that asks PATCH_TABLE_METHOD, at every image size
    return args, kwargs


def drop_patch_position_table(embeddings: torch.nn.Module, name: str) -> list:
    """Stop the image embeddings ``embeddings`` from adding their learned absolute table ``embeddings.<name>``.

    The table parameter becomes None (out of ``parameters()``, checkpoints and the stock ``_init_weights``, which
    all skip a None table), :data:`PATCH_TABLE_METHOD` is shadowed on this instance only by one returning zeros,
    and where the forward takes ``interpolate_pos_encoding`` a pre-hook sets it, so every image size is accepted
    and no table is interpolated. The caller keeps the parameter, deletes the instance attribute and removes the
    returned hook handles to undo it.

    Returns:
        The forward pre-hook handles added.
    """
    setattr(embeddings, name, None)
    embeddings.__dict__[PATCH_TABLE_METHOD] = _no_patch_table
    if "interpolate_pos_encoding" not in inspect.signature(embeddings.forward).parameters:
        return []
    return [embeddings.register_forward_pre_hook(_through_the_table_method, with_kwargs=True)]


def share_weight_conversions(stock: str, ours: str) -> None:
    """Give ``ours`` (a converted ``model_type`` or class name) the checkpoint key renamings of ``stock``.

    transformers renames checkpoint keys per ``model_type`` or class name when it loads and saves (5.2x:
    ``GPTNeoXForCausalLM``'s ``lm_head`` is ``embed_out`` on disk) and skips the renamings of classes defined
    outside the library unless they are registered: without this, a stock GPT-NeoX checkpoint loaded into a
    converted model silently gets a random ``lm_head``. Idempotent; releases without the registry need nothing.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        return
    mapping = get_checkpoint_conversion_mapping(stock)
    if mapping is not None and get_checkpoint_conversion_mapping(ours) is None:
        register_checkpoint_conversion_mapping(ours, mapping)


def reset_rope_state(model) -> int:
    """Put every stock dynamic-NTK rotary module of ``model`` back to its original frequencies.

    transformers' ``dynamic_rope_update`` enlarges a rotary module's frequencies when a forward is longer than
    any before it and resets them only when a later forward is *shorter* than the original length: after one
    long forward, a forward of exactly the original length runs at the enlarged scale, so a model's outputs
    depend on what it saw before. Calling this before a forward makes them depend on its input alone. (The
    plug-in's own dynamic RoPE is stateless and needs none of this.)

    Returns:
        How many rotary modules were reset.
    """
    reset = 0
    for module in model.modules():
        original_length = getattr(module, "original_max_seq_len", None)
        if original_length is None or not hasattr(module, "max_seq_len_cached"):
            continue
        types = module.rope_type if isinstance(module.rope_type, dict) else {None: module.rope_type}
        for layer_type, rope_type in types.items():
            prefix = "" if layer_type is None else f"{layer_type}_"
            original = getattr(module, f"{prefix}original_inv_freq")
            # The frequencies themselves say whether the module holds state: before 5.25 the update wrote its
            # length counter under the name "None_max_seq_len_cached", so the counter stayed at the original length
            # while the frequencies stayed enlarged.
            if "dynamic" not in str(rope_type) or torch.equal(getattr(module, f"{prefix}inv_freq"), original):
                continue
            module.register_buffer(f"{prefix}inv_freq", original.clone(), persistent=False)
            for counter in (f"{prefix}max_seq_len_cached", f"{layer_type}_max_seq_len_cached"):
                if hasattr(module, counter):
                    setattr(module, counter, original_length)
            reset += 1
    return reset


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
