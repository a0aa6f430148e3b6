"""Convert a loaded model, or a config, to another positional encoding.

Two routes, chosen per request:

* **native**: the request is a RoPE variant that stock transformers expresses through
  ``config.rope_parameters`` on an architecture with native RoPE. The config is rewritten and the
  model's own rotary module rebuilt; the model stays a stock model and saves as a stock checkpoint.
  The length-dependent types (dynamic, longrope) take this route only with ``native=True``: their stock
  form is stateful, and inexact with a KV cache (see :mod:`hf_posenc.encodings.rope`).
* **plug-in**: everything else, applied by :func:`hf_posenc.plugin.install`. Per instance and
  reversible (:func:`revert`): the old encoding is neutralised (native RoPE gets cos=1/sin=0 through a forward
  pre-hook on each attention module; learned absolute embeddings are replaced by a zero module), each converted
  attention module gets an ``attn.posenc`` module, and the model dispatches to
  ``hf_posenc_eager``/``hf_posenc_sdpa``. The
  instance's class becomes a registered ``HfPosenc<Class>`` subclass (``model_type``
  ``hf_posenc_<type>``) so that its checkpoint reloads converted — and stock transformers refuses it
  instead of loading it silently with the old encoding.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import _hf, attention, plugin, registry
from .architectures import ARCHITECTURES, MODEL_TYPE_PREFIX, Architecture, architecture_of, attention_modules, is_causal
from .config import CONFIG_KEY, NATIVE_KEY, PosEncConfig
from .encodings.rope import LENGTH_DEPENDENT_ROPE_TYPES, ROPE_LAYOUTS, RopeConfig, resolve_rope_parameters
from .layout import layout_permutation, permute_attention
from .model_shape import current_rope_parameters, head_dim, num_layers, rope_layer_types
from .modeling import CLASS_PREFIX, STUB_MODULE, posenc_class, posenc_config_class, stock_class
from .plugin import STATE_ATTR as _STATE_ATTR
from .plugin import State as _State

_ORIGIN_ATTR = "_hf_posenc_origin"


@dataclass
class _Origin:
    """The model as it was before the first hf_posenc change since it was built or last reverted.

    :func:`revert` restores exactly this. For a model built by an ``HfPosenc`` class (a converted
    checkpoint, or ``patch_config`` + ``from_config``) there is no unconverted original in memory: its
    origin is the stock class and stock config of the same architecture with the weights as loaded.
    """

    model_class: type
    config_class: type
    config: dict  # deep copy of the config's __dict__
    attn_implementation: str
    permutations: list = field(default_factory=list)  # (attention module, row permutation) by rope_layout
    loaded: bool = False


# ---------------------------------------------------------------------------------------------------
# Inspection helpers
# ---------------------------------------------------------------------------------------------------
def posenc_of(model_or_config) -> PosEncConfig | None:
    """The encoding recorded in a converted model or config (None if it was never converted)."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, CONFIG_KEY, None)
    return PosEncConfig.from_dict(data) if data else None


def _as_config(posenc_config) -> PosEncConfig:
    if isinstance(posenc_config, PosEncConfig):
        return posenc_config
    if isinstance(posenc_config, dict):
        return PosEncConfig.from_dict(posenc_config)
    raise TypeError(f"posenc_config must be a PosEncConfig or a dict with a 'kind'; "
                    f"got {type(posenc_config).__name__}.")


def resolved_rope_parameters(posenc: RopeConfig, config, arch: Architecture, layer_idx: int = 0,
                             current: dict | None = None) -> dict:
    """Stock ``rope_parameters`` for a RoPE request on layer ``layer_idx`` of this model (see
    :func:`hf_posenc.encodings.rope.resolve_rope_parameters`; ``current`` overrides the layer's own)."""
    current = current if current is not None else current_rope_parameters(config, arch, layer_idx)
    return resolve_rope_parameters(posenc, current, config.max_position_embeddings)


def uses_native_rope(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether this request is written as a stock checkpoint (the native route) on this architecture.

    Where stock transformers can express it (:func:`stock_expresses`), except for the length-dependent rope
    types (dynamic, longrope), whose stock form is stateful and inexact with a cache: they take the plug-in
    unless ``native=True`` asks for the stock checkpoint. ``native=False`` always takes the plug-in.

    Raises:
        ValueError: ``native=True`` and stock transformers cannot express the request.
    """
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
    """Whether stock transformers can express this RoPE request on this architecture by itself."""
    if (not isinstance(posenc, RopeConfig) or arch.rope == "none"
            or resolve_layout(posenc, arch).layout != arch.rope_layout):
        return False
    if posenc.layers is not None and set(posenc.layers) != set(range(num_layers(config))):
        return False
    if arch.rope_types is not None and posenc.rope_type not in arch.rope_types:
        return False  # e.g. Phi-3's config validation accepts longrope only
    partial = resolved_rope_parameters(posenc, config, arch)["partial_rotary_factor"]
    if not (arch.rope == "native_partial" or partial == 1.0):
        return False
    if rope_layer_types(config) is not None and posenc.rope_type != "default":
        # transformers 5.1 validates scaled types on per-layer-type parameters by reading the outer dict
        # (KeyError): a stock config that cannot be built is not native; the plug-in expresses it.
        try:
            _write_native_rope(copy.deepcopy(config), posenc, arch)
        except (KeyError, TypeError):
            return False
    return True


def _record(config, posenc: PosEncConfig, native: bool) -> None:
    """Write the encoding and its route into ``config``; ``save_pretrained`` saves both with the checkpoint."""
    setattr(config, CONFIG_KEY, posenc.to_dict())
    setattr(config, NATIVE_KEY, native)


def is_native_checkpoint(config) -> bool | None:
    """Whether a converted checkpoint loads in stock transformers with its encoding (a native RoPE variant),
    as recorded at conversion (``config.posenc_native``).

    Checkpoints saved before hf_posenc recorded it are derived here, and only here: the plug-in route
    always gives the config the model type ``hf_posenc_<type>``, and on a stock model type the rule
    :func:`convert` itself follows (:func:`uses_native_rope`) decides, so that a ``posenc`` entry
    written by hand on a stock config (which stock transformers would load without it) is not native.

    Args:
        config: A saved ``config.json`` as a dict, or a config object.

    Returns:
        True or False for a converted checkpoint; None when ``config`` records no encoding.

    Raises:
        ValueError: The recorded value is not a boolean, or the recorded encoding is invalid.
    """
    data = config if isinstance(config, Mapping) else config.to_dict()
    posenc = data.get(CONFIG_KEY)
    if not posenc:
        return None
    recorded = data.get(NATIVE_KEY)
    if recorded is not None:
        if not isinstance(recorded, bool):
            raise ValueError(f"config {NATIVE_KEY}={recorded!r} must be true or false "
                             "(it is written by hf_posenc.convert).")
        return recorded
    model_type = str(data.get("model_type", ""))
    if model_type.startswith(MODEL_TYPE_PREFIX) or model_type not in ARCHITECTURES:
        return False
    stock = CONFIG_MAPPING[model_type].from_dict(dict(data))
    # Such checkpoints predate the plug-in default for dynamic/longrope: the rule of their time decides.
    request = PosEncConfig.from_dict(dict(posenc))
    return getattr(request, "native", None) is not False and stock_expresses(request, stock, ARCHITECTURES[model_type])


def resolve_layout(posenc: PosEncConfig, arch: Architecture) -> PosEncConfig:
    """A RoPE request without a layout takes the architecture's own (``"half"`` without native RoPE)."""
    if isinstance(posenc, RopeConfig) and posenc.layout is None:
        return dataclasses.replace(posenc, layout=arch.rope_layout if arch.rope != "none" else "half")
    return posenc


def needs_attention_function(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether the converted model runs our attention functions: a kind with a route (its registry entry),
    unless stock transformers expresses the request natively."""
    return registry.get(posenc.kind).needs_attention_function and not uses_native_rope(posenc, config, arch)


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
    if entry.capabilities.extends_rope and arch.rope == "none":
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
    if needs_attention_function(posenc, config, arch) and backend not in entry.backends:
        raise ValueError(
            f"attn_implementation={backend!r} cannot express kind={posenc.kind!r} (it needs an additive bias, "
            f"the full logits or rotation at attention time); allowed: {sorted(entry.backends)}."
        )
    return arch


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------
def convert(model: nn.Module, posenc_config, *, attn_implementation: str | None = None) -> nn.Module:
    """Give a loaded model another positional encoding, in place.

    Args:
        model: A transformers model of a supported architecture (with or without a head).
        posenc_config: A :class:`~hf_posenc.PosEncConfig` (or its dict).
        attn_implementation: ``"eager"`` or ``"sdpa"``; default: the model's current backend
            (flash attention is refused for encodings it cannot express).

    Returns:
        The same model object, converted. Its config records the encoding (``config.posenc``).

    Raises:
        ValueError: See :func:`validate`; also if the model was already converted (call :func:`revert`).
    """
    posenc = _as_config(posenc_config)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("This model was already converted by hf_posenc; call hf_posenc.revert(model) first.")
    arch = validate(posenc, model.config, attn_implementation)
    remember_origin(model)
    posenc = resolve_layout(posenc, arch)
    config = model.config
    if needs_attention_function(posenc, config, arch):
        _hf.check_backend(model, (attn_implementation or _hf.attn_implementation(model)).removeprefix("hf_posenc_"))
    if uses_native_rope(posenc, config, arch):
        return _convert_native(model, posenc, arch)
    classes = (type(model), type(config))
    model.__class__ = posenc_class(type(model))
    config.__class__ = model.__class__.config_class
    _record(config, posenc, native=False)
    plugin.install(model, posenc, arch, classes, attn_implementation)
    return model


def _convert_native(model, posenc: RopeConfig, arch: Architecture) -> nn.Module:
    config = model.config
    state = _State(posenc=posenc, native=True)
    state.rope_backup = {
        "rope_parameters": copy.deepcopy(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
        "head_dim": getattr(config, "head_dim", 0),
        CONFIG_KEY: getattr(config, CONFIG_KEY, None),
        NATIVE_KEY: getattr(config, NATIVE_KEY, None),
    }
    params = _write_native_rope(config, posenc, arch)
    base = model.base_model
    state.rotary = base.rotary_emb
    device = next((b.device for b in base.rotary_emb.buffers()), None)
    base.rotary_emb = type(state.rotary)(config=config).to(device)
    for attn in attention_modules(model, arch):
        if hasattr(attn, "rotary_ndims"):
            state.rotary_ndims.append((attn, attn.rotary_ndims))
            attn.rotary_ndims = int(head_dim(config) * params["partial_rotary_factor"])
    setattr(model, _STATE_ATTR, state)
    return model


def _write_native_rope(config, posenc: RopeConfig, arch: Architecture) -> dict:
    """Write a native RoPE request into a stock config (in place); returns the rope parameters (of the
    first layer type where each layer type has its own: the request applies to each, keeping its base)."""
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
    _record(config, posenc, native=True)
    return params


def set_backend(model, backend: str) -> None:
    """Switch a converted model between ``"eager"`` (returns attention weights), ``"sdpa"`` and ``"flex_attention"``.

    Raises:
        ValueError: Unknown backend (allowed: eager, flex_attention, sdpa).
    """
    if backend not in attention.BACKENDS:
        raise ValueError(f"Unknown backend={backend!r}; allowed: {sorted(attention.BACKENDS)}.")
    _hf.set_attn_implementation(model, attention.BACKENDS[backend])


def remember_origin(model: nn.Module) -> _Origin:
    """Record, once, what :func:`revert` must restore (called before the first change of a model)."""
    origin = getattr(model, _ORIGIN_ATTR, None)
    if origin is not None:
        return origin
    config = model.config
    snapshot = copy.deepcopy(config.__dict__)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        origin = _Origin(type(model), type(config), snapshot, _hf.attn_implementation(model))
    else:  # built converted: the stock classes and config of the same architecture, same weights
        snapshot.pop(CONFIG_KEY, None)
        snapshot.pop(NATIVE_KEY, None)
        _forget_own_auto_map(snapshot)
        if snapshot.get("architectures"):
            snapshot["architectures"] = [name.removeprefix(CLASS_PREFIX) for name in snapshot["architectures"]]
        backend = state.attn_implementation or _hf.attn_implementation(model)
        # A model built converted may have been built on our backend already: its stock origin runs the
        # stock backend of the same name.
        backend = {ours: stock for stock, ours in attention.BACKENDS.items()}.get(backend, backend)
        origin = _Origin(stock_class(type(model)), stock_class(type(config)), snapshot, backend, loaded=True)
    setattr(model, _ORIGIN_ATTR, origin)
    return origin


def _forget_own_auto_map(config_dict: dict) -> None:
    """Drop the ``auto_map`` entries naming our remote-code stub (``save_pretrained`` and checkpoint
    loading put them on the config), so a reverted model saves as a plain stock checkpoint."""
    auto_map = config_dict.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    stub = STUB_MODULE.rpartition(".")[2] + "."
    kept = {key: value for key, value in auto_map.items()
            if not any(str(v).rpartition("--")[2].startswith(stub)
                       for v in (value if isinstance(value, (list, tuple)) else [value]))}
    if kept:
        config_dict["auto_map"] = kept
    else:
        del config_dict["auto_map"]


def revert(model: nn.Module) -> nn.Module:
    """Restore the model as it was before hf_posenc changed it, whatever sequence of :func:`convert`
    and :func:`~hf_posenc.rope_layout` calls led here.

    Restored exactly: the weights (``rope_layout``'s row permutations are undone; position tables
    added by a conversion are dropped), buffers, the model and config classes, every config
    attribute and the attention backend.

    A model built converted (loaded from a converted checkpoint, or ``from_config`` of a
    :func:`patch_config` config) has no unconverted original in memory: it reverts to the stock class
    and config of its architecture (``config.posenc`` and the ``auto_map`` of the plug-in removed)
    with the weights as loaded, minus the position tables; ``save_pretrained`` then writes a stock
    checkpoint.

    Args:
        model: A model changed by :func:`convert` or :func:`~hf_posenc.rope_layout`, or built converted.

    Returns:
        The same model object.

    Raises:
        ValueError: The model was not changed by hf_posenc; or it was built converted on an
            architecture with learned absolute positions, whose tables the conversion dropped, so the
            checkpoint does not contain them (nothing is changed then).
    """
    state: _State | None = getattr(model, _STATE_ATTR, None)
    if state is None and getattr(model, _ORIGIN_ATTR, None) is None:
        raise ValueError(
            "This model was not converted by hf_posenc (nothing to revert). A checkpoint converted to a native "
            "RoPE variant loads as a stock model: to get the original encoding back, load the original checkpoint."
        )
    origin = getattr(model, _ORIGIN_ATTR, None)
    built_converted = origin.loaded if origin is not None else state is not None
    if built_converted and architecture_of(model.config).absolute:
        paths = ", ".join(architecture_of(model.config).absolute)
        raise ValueError(
            f"Cannot revert this {type(model).__name__}: it was built converted (from a converted checkpoint or a "
            f"patched config), and the conversion removed its learned absolute position table ({paths}), so there "
            "are no original weights to restore. Load the original stock checkpoint instead."
        )
    origin = remember_origin(model)
    if state is not None:
        undo_conversion(model)
    if origin.permutations:
        arch = architecture_of(model.config)
        for attn, perm in reversed(origin.permutations):
            permute_attention(attn, arch, model.config, torch.argsort(perm))
    config = model.config
    model.__class__, config.__class__ = origin.model_class, origin.config_class
    config.__dict__.clear()
    config.__dict__.update(origin.config)
    _hf.set_attn_implementation(model, origin.attn_implementation)
    delattr(model, _ORIGIN_ATTR)
    return model


def undo_conversion(model: nn.Module) -> nn.Module:
    """Undo the current conversion only (hooks, modules, buffers, class, config, backend), keeping
    row permutations and the recorded origin: the step :func:`~hf_posenc.rope_layout` needs between
    two conversions. Users call :func:`revert`."""
    state: _State = getattr(model, _STATE_ATTR)
    config = model.config
    if state.native:
        config.rope_parameters = state.rope_backup["rope_parameters"]
        config.max_position_embeddings = state.rope_backup["max_position_embeddings"]
        if state.rope_backup["head_dim"] is None:
            config.head_dim = None
        model.base_model.rotary_emb = state.rotary
        for attn, ndims in state.rotary_ndims:
            attn.rotary_ndims = ndims
    else:
        plugin.remove(model, state)
        if state.classes is not None:
            _forget_own_auto_map(config.__dict__)
    for key in (CONFIG_KEY, NATIVE_KEY):
        # A native conversion of an already converted checkpoint puts its record back; otherwise none is left.
        previous = state.rope_backup.get(key) if state.native else None
        if previous is not None:
            setattr(config, key, previous)
        elif hasattr(config, key):
            delattr(config, key)
    delattr(model, _STATE_ATTR)
    return model


def patch_config(config, posenc_config):
    """A copy of ``config`` that builds/loads converted models.

    ``AutoModelForCausalLM.from_pretrained(base_path, config=patch_config(...))`` loads the base
    weights into a converted model (new tables initialised and reported as missing), and
    ``from_config(patched)`` builds one. Native RoPE variants give a stock config.

    Raises:
        TypeError: ``config`` is a model, not a config.
        ValueError: See :func:`validate`.
    """
    if isinstance(config, nn.Module):
        raise TypeError(
            f"patch_config expects a config (a transformers PreTrainedConfig), got the model "
            f"{type(config).__name__}: pass model.config to patch a config for from_pretrained/from_config, "
            "or use hf_posenc.convert(model, ...) to convert a loaded model."
        )
    posenc = _as_config(posenc_config)
    arch = validate(posenc, config)
    posenc = resolve_layout(posenc, arch)
    patched = copy.deepcopy(config)
    if uses_native_rope(posenc, config, arch):
        _write_native_rope(patched, posenc, arch)
    else:
        patched.__class__ = posenc_config_class(type(config))
        _record(patched, posenc, native=False)
    return patched


def rope_layout(model, layout: str):
    """Convert a RoPE model, in place, to the ``"interleaved"`` (GPT-J) or ``"half"`` (GPT-NeoX) layout.

    The query/key projection rows are permuted and the model's encoding switches to the target layout
    (the interleaved layout runs through the plug-in; the half layout returns a native-RoPE model to
    stock). Logits do not change.

    Args:
        model: A model with native RoPE, or converted with ``PosEncConfig(kind="rope")``.
        layout: ``"interleaved"`` or ``"half"``.

    Returns:
        The same model.

    Raises:
        ValueError: Unknown layout, or the model does not use RoPE.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"Unknown layout={layout!r}; allowed: {', '.join(ROPE_LAYOUTS)}.")
    config = model.config
    arch = architecture_of(config)
    posenc = posenc_of(model) if getattr(model, _STATE_ATTR, None) is not None else None
    if posenc is None:
        if arch.rope == "none":
            raise ValueError(f"rope_layout needs a RoPE model; {config.model_type!r} has learned absolute positions. "
                             "Convert it first with PosEncConfig(kind='rope').")
        params = current_rope_parameters(config, arch)
        if rope_layer_types(config) is not None:
            # Several layer types with their own RoPE (Gemma 3 local/global bases): keep only what they share,
            # so that the unset fields (None) keep each type's own values.
            per_type = [current_rope_parameters(config, arch, i) for i in range(len(config.layer_types))]
            params = {k: v for k, v in params.items() if all(p.get(k) == v for p in per_type)}
        fields = {f.name for f in dataclasses.fields(RopeConfig)}
        posenc = RopeConfig(**{k: v for k, v in params.items() if k in fields and k != "kind"},
                            layout=arch.rope_layout)
    elif not isinstance(posenc, RopeConfig):
        raise ValueError(f"rope_layout needs a RoPE model; this one was converted to kind={posenc.kind!r}.")
    if posenc.layout == layout:
        return model
    partial = posenc.partial_rotary_factor or current_rope_parameters(config, arch).get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim(config) * partial)
    rotary_dim -= rotary_dim % 2
    perm = layout_permutation(rotary_dim, head_dim(config), posenc.layout, layout)
    # hf_posenc.revert undoes the permutations too (in reverse order), back to the original rows.
    origin = remember_origin(model)
    for layer_idx, attn in enumerate(attention_modules(model, arch)):
        if posenc.applies_to(layer_idx):
            permute_attention(attn, arch, config, perm)
            origin.permutations.append((attn, perm))
    if getattr(model, _STATE_ATTR, None) is not None:
        undo_conversion(model)
    return convert(model, dataclasses.replace(posenc, layout=layout))


__all__ = ["convert", "patch_config", "revert", "rope_layout", "posenc_of", "set_backend"]
