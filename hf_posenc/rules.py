"""The rules of a conversion: which route a request takes and whether a model can take it at all.

Pure functions of the request (:class:`~hf_posenc.config.PosEncConfig`), the model's config and its architecture
row. :func:`hf_posenc.convert` applies them to a model in memory, and the ``HfPosenc`` classes
(:mod:`hf_posenc.modeling`) to a checkpoint's record on load, so a checkpoint is refused exactly where a
conversion would be.
"""

from __future__ import annotations

import copy
import dataclasses

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import registry
from .architectures import ARCHITECTURES, Architecture, architecture_of, is_causal
from .config import CONFIG_KEY, NATIVE_KEY, PosEncConfig
from .encodings.rope import LENGTH_DEPENDENT_ROPE_TYPES, RopeConfig, resolve_rope_parameters
from .model_shape import current_rope_parameters, head_dim, num_layers, rope_layer_types


def resolved_rope_parameters(posenc: RopeConfig, config, arch: Architecture, layer_idx: int = 0,
                             current: dict | None = None) -> dict:
    """Stock ``rope_parameters`` for a RoPE request on layer ``layer_idx`` of this model (see
    :func:`hf_posenc.encodings.rope.resolve_rope_parameters`; ``current`` overrides the layer's own)."""
    current = current if current is not None else current_rope_parameters(config, arch, layer_idx)
    return resolve_rope_parameters(posenc, current, config.max_position_embeddings)


def rope_layers(posenc: PosEncConfig, config, arch: Architecture) -> set[int]:
    """The layers a request gives RoPE: its ``layers`` (all for None, less the layers the model natively leaves
    without: a RoPE request without ``layers`` is the model's own layout); none for NoPE."""
    if posenc.kind == "nope":
        return set()
    own = set(range(num_layers(config))) - arch.native_nope_layers(config)
    return set(posenc.layers) if posenc.layers is not None else own


def stock_rope_layers(config, arch: Architecture) -> set[int]:
    """The layers a stock model built from ``config`` rotates (no RoPE at all: none)."""
    if not arch.has_native_rope(config):
        return set()
    return set(range(num_layers(config))) - arch.native_nope_layers(config)


def uses_native_rope(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether this request is written as a stock checkpoint (the native route) on this architecture.

    NoPE is, where the architecture switches RoPE off per layer from its config alone (SmolLM3's
    ``no_rope_layers``: :attr:`~hf_posenc.architectures.Architecture.rope_switch`).

    Where stock transformers can express it (:func:`stock_expresses`), except for the length-dependent rope
    types (dynamic, longrope), whose stock form is stateful and inexact with a cache: they take the plug-in
    unless ``native=True`` asks for the stock checkpoint. ``native=False`` always takes the plug-in.

    Raises:
        ValueError: ``native=True`` and stock transformers cannot express the request.
    """
    if posenc.kind == "nope":
        return stock_expresses(posenc, config, arch)
    if not isinstance(posenc, RopeConfig) or posenc.native is False:
        return False
    expressible = stock_expresses(posenc, config, arch)
    if posenc.native is None:
        return expressible and posenc.rope_type not in LENGTH_DEPENDENT_ROPE_TYPES
    if not expressible:
        raise ValueError(
            f"PosEncConfig(kind='rope'): invalid native=True; stock transformers cannot express this request on "
            f"{config.model_type!r} (layout, layers, partial rotary or rope_type beyond what its stock RoPE "
            "supports); allowed: native=None or native=False (the plug-in expresses it)."
        )
    return True


def stock_expresses(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether stock transformers can express this RoPE (or NoPE) request on this architecture by itself.

    A set of RoPE layers other than the model's own (``layers=``, NoPE) is stock only where the architecture has a
    per-layer RoPE switch in its config (:attr:`~hf_posenc.architectures.Architecture.rope_switch`).
    """
    if posenc.attention_temperature is not None:
        return False  # no supported architecture's stock config scales queries by position (Llama 4's is not one)
    if rope_layers(posenc, config, arch) != stock_rope_layers(config, arch) and arch.rope_switch is None:
        return False
    if posenc.kind == "nope":
        return arch.rope_switch is not None
    if (not isinstance(posenc, RopeConfig) or not arch.has_native_rope(config)
            or resolve_layout(posenc, arch).layout != arch.rope_layout):
        return False
    if arch.rope_types is not None and posenc.rope_type not in arch.rope_types:
        return False  # e.g. Phi-3's config validation accepts longrope only
    if arch.rotary_dim is not None:  # RoPE fixed in code (GPT-J): only the model's own parameters are stock
        current = current_rope_parameters(config, arch)
        return resolved_rope_parameters(posenc, config, arch, current=current) == current
    if posenc.rope_type != "default" and posenc.rope_type not in ROPE_INIT_FUNCTIONS:
        return False  # a release without this frequency function (p-RoPE before it): the plug-in runs it
    partial = resolved_rope_parameters(posenc, config, arch)["partial_rotary_factor"]
    # p-RoPE's frequency function reads the factor itself and gives frequencies for the whole head, which a model
    # that slices its rotated dimensions by the factor (native_partial) would not fit.
    honours_partial = "native" if posenc.rope_type == "proportional" else "native_partial"
    if not (arch.rope == honours_partial or partial == 1.0):
        return False
    if rope_layer_types(config) is not None and posenc.rope_type != "default":
        # transformers 5.1 validates scaled types on per-layer-type parameters by reading the outer dict
        # (KeyError): a stock config that cannot be built is not native; the plug-in expresses it.
        try:
            write_native_rope(copy.deepcopy(config), posenc, arch)
        except (KeyError, TypeError):
            return False
    return True


def record(config, posenc: PosEncConfig, native: bool) -> None:
    """Write the encoding and its route into ``config``; ``save_pretrained`` saves both with the checkpoint."""
    setattr(config, CONFIG_KEY, posenc.to_dict())
    setattr(config, NATIVE_KEY, native)


def resolve_layout(posenc: PosEncConfig, arch: Architecture) -> PosEncConfig:
    """A RoPE request without a layout takes the architecture's own (``"half"`` without native RoPE)."""
    if isinstance(posenc, RopeConfig) and posenc.layout is None:
        return dataclasses.replace(posenc, layout=arch.rope_layout if arch.rope != "none" else "half")
    return posenc


def needs_attention_function(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether the converted model runs our attention functions: a kind with a route (its registry entry) or an
    attention temperature, unless stock transformers expresses the request natively."""
    return posenc.needs_attention_function() and not uses_native_rope(posenc, config, arch)


def validate(posenc: PosEncConfig, config, attn_implementation: str | None = None) -> Architecture:
    """Check that ``posenc`` can be applied to a model with this config (and backend).

    Raises:
        ValueError: Unsupported architecture, layer indices out of range, a causal-only kind on an encoder,
            a kind's own rule (its registry entry's ``check``: e.g. T5 bias with an odd bucket count on an
            encoder), or a backend that cannot express the encoding.
    """
    arch = architecture_of(config)
    n = num_layers(config)
    if posenc.layers is not None and max(posenc.layers) >= n:
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}): invalid layers={list(posenc.layers)}; "
                         f"allowed: indices in [0, {n - 1}] for this {n}-layer model.")
    refusal = arch.refusal(posenc.kind, config)
    if refusal is not None:
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}) cannot be applied to {config.model_type!r}: "
                         f"{refusal.why}.")
    causal = is_causal(arch, config)
    entry = registry.get(posenc.kind)
    if entry.capabilities.extends_rope and not arch.has_native_rope(config):
        causal_only = entry.capabilities.causal_only
        allowed = ", ".join(a for a, row in ARCHITECTURES.items()
                            if row.rope != "none" and (row.causal is True or not causal_only))
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}) cannot be applied to {config.model_type!r}: the model "
                         f"has no RoPE to extend ({entry.display_name} re-uses the model's own); allowed: "
                         f"{'causal ' if causal_only else ''}architectures with RoPE ({allowed}).")
    if entry.capabilities.patch_grid and not arch.patch_grid:
        allowed = ", ".join(a for a, row in ARCHITECTURES.items() if row.patch_grid)
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}) cannot be applied to {config.model_type!r}: "
                         f"{entry.display_name} rotates by the 2-D patch grid of an image and this model reads "
                         f"sequences of tokens; allowed: image models ({allowed}).")
    if entry.capabilities.causal_only and not causal:
        allowed = ", ".join(e.kind for e in registry.entries() if not e.capabilities.causal_only)
        raise ValueError(
            f"{entry.display_name} is causal-only ({entry.causal_reason}) and cannot be applied to the "
            f"encoder {config.model_type!r}; allowed kinds on encoders: {allowed}."
        )
    reason = entry.check(posenc, causal) if entry.check is not None else None
    if reason is not None:
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}): {reason}.")
    backend = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    backend = backend.removeprefix("hf_posenc_")
    backends = entry.backends if entry.backends is not None else registry.OWN_BACKENDS  # NoPE with a temperature
    if needs_attention_function(posenc, config, arch) and backend not in backends:
        raise ValueError(
            f"attn_implementation={backend!r} cannot express kind={posenc.kind!r} (it needs an additive bias, "
            f"the full logits, rotation or a temperature at attention time); allowed: {sorted(backends)}."
        )
    return arch


def write_native_layout(config, posenc: PosEncConfig, arch: Architecture) -> list | None:
    """Write which layers rotate into the architecture's per-layer list (``rope_switch`` rows; in place).

    Returns:
        The list written (one value per layer, the attention modules' switch values), or None for an architecture
        without a switch (its layout is its own).
    """
    if arch.rope_switch is None:
        return None
    attribute, nope_value = arch.nope_layers
    wanted = rope_layers(posenc, config, arch)
    values = [arch.rope_switch[1] if i in wanted else nope_value for i in range(num_layers(config))]
    setattr(config, attribute, values)
    return values


def write_native_rope(config, posenc: RopeConfig, arch: Architecture) -> dict:
    """Write a native RoPE (or NoPE) request into a stock config (in place); returns the rope parameters (of the
    first layer type where each layer type has its own: the request applies to each, keeping its base)."""
    write_native_layout(config, posenc, arch)
    if posenc.kind == "nope" or arch.rotary_dim is not None:  # nothing to write: the model's own RoPE (GPT-J)
        record(config, posenc, native=True)
        return current_rope_parameters(config, arch)
    layer_types = rope_layer_types(config)
    if layer_types is None:
        params = resolved_rope_parameters(posenc, config, arch)
        new = params
    else:
        new = {t: resolved_rope_parameters(posenc, config, arch, current=dict(config.rope_parameters[t]))
               for t in layer_types}
        params = new[layer_types[0]]
    if posenc.rope_type in ("linear", "yarn", "llama3") and posenc.factor:
        # Record the extended context for inference; the pre-extension length stays in the rope params.
        original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        config.max_position_embeddings = int(round(original * posenc.factor))
    if getattr(config, "head_dim", 0) is None:
        # Stock scaled-frequency functions read `getattr(config, "head_dim", default)`, which a None value
        # defeats (Mixtral's config has head_dim=None): record the value the model uses.
        config.head_dim = head_dim(config)
    config.rope_parameters = new
    config.validate_rope()
    record(config, posenc, native=True)
    return params
