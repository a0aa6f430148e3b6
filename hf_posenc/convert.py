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

from . import _hf, attention, plugin
from .architectures import MODEL_TYPE_PREFIX, Architecture, architecture_of, attention_modules, find_architecture
from .config import CONFIG_KEY, NATIVE_KEY, PosEncConfig
from .encodings.nope import NopeConfig
from .encodings.rope import ROPE_LAYOUTS, RopeConfig, rotary_dim
from .layout import layout_permutation, permute_attention
from .model_shape import current_rope_parameters, head_dim, rope_layer_types
from .modeling import CLASS_PREFIX, STUB_MODULE, posenc_class, posenc_config_class, stock_class
from .plugin import STATE_ATTR as _STATE_ATTR
from .plugin import State as _State
from .rules import (
    needs_attention_function,
    record,
    resolve_layout,
    resolved_rope_parameters,
    rope_layers,
    stock_expresses,
    stock_rope_layers,
    uses_native_rope,
    validate,
    write_native_rope,
)

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
    """The encoding a converted model runs, or that a model built from this config runs (None if it was
    never converted).

    Raises:
        ValueError: The config records an encoding that the model does not run: a ``posenc`` entry on a
            stock config that stock transformers does not express (it runs the architecture's own encoding).
    """
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, CONFIG_KEY, None)
    if not data:
        return None
    posenc = PosEncConfig.from_dict(data)
    if getattr(model_or_config, _STATE_ATTR, None) is None and not runs_recorded_encoding(config):
        raise ValueError(
            f"Convert the model to run it (hf_posenc.convert(model, PosEncConfig(kind={posenc.kind!r}))): this stock "
            f"{config.model_type!r} config records kind={posenc.kind!r} in `{CONFIG_KEY}`, which stock transformers "
            "ignores (the model runs its own encoding)."
        )
    return posenc


def runs_recorded_encoding(config) -> bool:
    """Whether a model built from ``config`` runs the encoding recorded in it.

    An ``hf_posenc_<type>`` config always does (its classes apply the record). A stock config does only for a
    native RoPE record whose ``rope_parameters`` already say what the record asks for: a ``posenc`` entry that
    was written by hand, or copied onto another config, is ignored by stock transformers.
    """
    model_type = str(getattr(config, "model_type", ""))
    if model_type.startswith(MODEL_TYPE_PREFIX):
        return True
    posenc = PosEncConfig.from_dict(getattr(config, CONFIG_KEY))
    arch = find_architecture(config)
    if (arch is None or not isinstance(posenc, RopeConfig | NopeConfig)
            or getattr(config, NATIVE_KEY, None) is False):
        return False
    posenc = resolve_layout(posenc, arch)
    if not uses_native_rope(posenc, config, arch):
        return False
    # A hybrid layout is stock where the config's per-layer list says it (SmolLM3's no_rope_layers).
    if rope_layers(posenc, config, arch) != stock_rope_layers(config, arch):
        return False
    if isinstance(posenc, NopeConfig):
        return True
    current = current_rope_parameters(config, arch)
    wanted = resolved_rope_parameters(posenc, config, arch, current=current)
    return all(_plain(current.get(key)) == _plain(value) for key, value in wanted.items())


def _plain(value):
    """Tuples as lists: ``config.json`` stores the scaling factor lists of longrope as lists."""
    return list(value) if isinstance(value, tuple) else value


def _as_config(posenc_config) -> PosEncConfig:
    if isinstance(posenc_config, PosEncConfig):
        return posenc_config
    if isinstance(posenc_config, dict):
        return PosEncConfig.from_dict(posenc_config)
    raise TypeError(f"posenc_config must be a PosEncConfig or a dict with a 'kind'; "
                    f"got {type(posenc_config).__name__}.")


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
    if model_type.startswith(MODEL_TYPE_PREFIX) or model_type not in CONFIG_MAPPING:
        return False
    stock = CONFIG_MAPPING[model_type].from_dict(dict(data))
    arch = find_architecture(stock)
    if arch is None:
        return False
    # Such checkpoints predate the plug-in default for dynamic/longrope: the rule of their time decides.
    request = PosEncConfig.from_dict(dict(posenc))
    return getattr(request, "native", None) is not False and stock_expresses(request, stock, arch)


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
        The same model object, converted. Its config records the encoding (``config.posenc``). A model
        loaded from a GGUF file loses its GGUF quantizer (its weights are already plain tensors), so that
        it saves with ``save_pretrained`` and trains.

    Raises:
        TypeError: ``model`` is not a loaded model (for example None).
        ValueError: See :func:`validate`; also if the model was already converted (call :func:`revert`).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"Pass a loaded transformers model first (e.g. AutoModelForCausalLM.from_pretrained(...)); "
                        f"convert(model, posenc_config) got model={type(model).__name__}.")
    posenc = _as_config(posenc_config)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("This model was already converted by hf_posenc; call hf_posenc.revert(model) first.")
    arch = validate(posenc, model.config, attn_implementation)
    # A GGUF load leaves a quantizer on plain dequantized weights, which would refuse save_pretrained.
    _hf.forget_gguf_quantizer(model)
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
    record(config, posenc, native=False)
    plugin.install(model, posenc, arch, classes, attn_implementation)
    return model


def _convert_native(model, posenc: RopeConfig, arch: Architecture) -> nn.Module:
    config = model.config
    state = _State(posenc=posenc, native=True)
    if arch.rotary_dim is not None:  # RoPE fixed in code (GPT-J): the request is its own, nothing changes
        state.rope_backup = {key: getattr(config, key, None) for key in (CONFIG_KEY, NATIVE_KEY)}
        write_native_rope(config, posenc, arch)
        setattr(model, _STATE_ATTR, state)
        return model
    state.rope_backup = {
        "rope_parameters": copy.deepcopy(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
        "head_dim": getattr(config, "head_dim", 0),
        CONFIG_KEY: getattr(config, CONFIG_KEY, None),
        NATIVE_KEY: getattr(config, NATIVE_KEY, None),
    }
    if arch.rope_switch is not None:  # the per-layer RoPE list and each attention module's switch read from it
        state.rope_backup["nope_layers"] = copy.deepcopy(getattr(config, arch.nope_layers[0]))
        state.rope_backup["switches"] = [(attn, getattr(attn, arch.rope_switch[0]))
                                         for attn in attention_modules(model, arch)]
    params = write_native_rope(config, posenc, arch)
    if arch.rope_switch is not None:
        for attn, value in zip(attention_modules(model, arch), getattr(config, arch.nope_layers[0])):
            setattr(attn, arch.rope_switch[0], value)
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
                       for v in (value if isinstance(value, list | tuple) else [value]))}
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
        if "rope_parameters" in state.rope_backup:  # absent where RoPE is fixed in code (GPT-J): nothing changed
            _restore_native_rope(model, state)
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


def _restore_native_rope(model: nn.Module, state: _State) -> None:
    """Put back what :func:`_convert_native` changed: the RoPE config, the rotary module, per-layer switches."""
    config = model.config
    config.rope_parameters = state.rope_backup["rope_parameters"]
    config.max_position_embeddings = state.rope_backup["max_position_embeddings"]
    if state.rope_backup["head_dim"] is None:
        config.head_dim = None
    model.base_model.rotary_emb = state.rotary
    for attn, ndims in state.rotary_ndims:
        attn.rotary_ndims = ndims
    if "nope_layers" in state.rope_backup:
        arch = architecture_of(config)
        setattr(config, arch.nope_layers[0], state.rope_backup["nope_layers"])
        for attn, value in state.rope_backup["switches"]:
            setattr(attn, arch.rope_switch[0], value)


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
        write_native_rope(patched, posenc, arch)
    else:
        patched.__class__ = posenc_config_class(type(config))
        record(patched, posenc, native=False)
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
        if not arch.has_native_rope(config):
            own = "its own ALiBi" if arch.rope != "none" else "learned absolute positions"
            raise ValueError(f"rope_layout needs a RoPE model; {config.model_type!r} has {own}. "
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
    rotary = rotary_dim({"rope_type": posenc.rope_type, "partial_rotary_factor": partial}, head_dim(config))
    perm = layout_permutation(rotary, head_dim(config), posenc.layout, layout)
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
