"""Convert a loaded model, or a config, to another positional encoding.

Two routes, chosen per request:

* **native**: the request is a RoPE variant that stock transformers expresses through
  ``config.rope_parameters`` on an architecture with native RoPE. The config is rewritten and the
  model's own rotary module rebuilt; the model stays a stock model and saves as a stock checkpoint.
* **plug-in**: everything else. Per instance and reversible (:func:`revert`): the old encoding is
  neutralised (native RoPE gets cos=1/sin=0 through a forward pre-hook on each attention module;
  learned absolute embeddings are replaced by a zero module), each converted attention module gets an
  ``attn.posenc`` module, and the model dispatches to ``hf_posenc_eager``/``hf_posenc_sdpa``. The
  instance's class becomes a registered ``HfPosenc<Class>`` subclass (``model_type``
  ``hf_posenc_<type>``) so that its checkpoint reloads converted — and stock transformers refuses it
  instead of loading it silently with the old encoding.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _hf, attention
from .architectures import Architecture, _get, architecture_of, attention_modules, is_causal
from .config import CONFIG_KEY, ROPE_EXTENSION_KINDS, PosEncConfig, RopeConfig
from .encodings import AlibiBias, CoPE, RotaryPosition, T5Bias
from .encodings.rerope import ReRoPE  # issue 10
from .encodings.self_extend import SelfExtend  # issue 10
from .encodings.base import PositionModule

_STATE_ATTR = "_hf_posenc_state"
_ORIGIN_ATTR = "_hf_posenc_origin"
DEFAULT_ROPE_THETA = 10000.0


class ZeroPositionEmbedding(nn.Module):
    """Stands in for a learned absolute position table: returns zeros, so nothing is added.

    The zeros come in the dtype of the table it replaced and follow ``model.to(dtype)`` / ``.half()``
    (an empty, non-persistent buffer carries the dtype): fp32 zeros added to bf16/fp16 token embeddings
    would promote the hidden states to fp32 and break the next LayerNorm. The replaced table is kept
    unregistered (no weights in checkpoints) but follows the same dtype/device moves, so that
    :func:`revert` puts back a table that matches the model.

    Args:
        original: The replaced ``nn.Embedding``.
    """

    def __init__(self, original: nn.Embedding):
        super().__init__()
        self.dim = original.embedding_dim
        self.__dict__["_original"] = original  # not a submodule: not saved, not in parameters()
        # No elements: nothing to save or initialise (meta-device loads leave it empty either way).
        self.register_buffer("dtype_carrier", torch.empty(0, dtype=original.weight.dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        original = self.__dict__["_original"]
        # A table built on the meta device (checkpoint loading) holds nothing to move.
        if not any(t.is_meta for t in original.parameters()):
            original._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        # [*position_ids.shape, dim]
        return torch.zeros(*position_ids.shape, self.dim, dtype=self.dtype_carrier.dtype, device=position_ids.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@dataclass
class _State:
    """What a conversion changed on one instance, so that :func:`revert` can undo it."""

    posenc: PosEncConfig
    native: bool
    hooks: list = field(default_factory=list)
    replaced: list = field(default_factory=list)  # (parent, attribute, original module)
    rope_backup: dict | None = None  # config attributes before a native RoPE change
    rotary: nn.Module | None = None
    rotary_ndims: list = field(default_factory=list)
    attn_implementation: str | None = None
    classes: tuple | None = None  # (model class, config class) before the swap
    buffers: list = field(default_factory=list)  # (module, buffer name, original tensor)


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
def num_layers(config) -> int:
    return config.num_hidden_layers


def num_heads(config) -> int:
    return config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_layer_types(config) -> list[str] | None:
    """The layer types with RoPE parameters of their own (Gemma 3, ModernBERT: local and global bases), or
    None when ``config.rope_parameters`` is one set for every layer."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        return list(params)
    return None


def current_rope_parameters(config, arch: Architecture, layer_idx: int = 0) -> dict:
    """The RoPE parameters of layer ``layer_idx`` (a default set for architectures without RoPE)."""
    if arch.rope == "none":
        return {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA, "partial_rotary_factor": 1.0}
    params = dict(config.rope_parameters)
    if rope_layer_types(config) is not None:
        params = dict(params[config.layer_types[layer_idx]])
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return params


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
    raise TypeError(f"posenc_config must be a PosEncConfig or a dict with a 'kind'; got {type(posenc_config).__name__}.")


def resolved_rope_parameters(posenc: RopeConfig, config, arch: Architecture, layer_idx: int = 0,
                             current: dict | None = None) -> dict:
    """Stock ``rope_parameters`` for a RoPE request on layer ``layer_idx``: unset theta/partial keep the
    model's values (per layer type where it has several), and the pre-extension length is recorded
    explicitly (``original_max_position_embeddings``) so inference never has to guess it from
    ``max_position_embeddings``."""
    current = current if current is not None else current_rope_parameters(config, arch, layer_idx)
    params = {
        "rope_type": posenc.rope_type,
        "rope_theta": posenc.rope_theta if posenc.rope_theta is not None else current["rope_theta"],
        "partial_rotary_factor": (
            posenc.partial_rotary_factor
            if posenc.partial_rotary_factor is not None
            else current.get("partial_rotary_factor", 1.0)
        ),
    }
    params.update(posenc.scaling_parameters())
    if posenc.rope_type in ("yarn", "llama3", "longrope"):
        params.setdefault(
            "original_max_position_embeddings",
            current.get("original_max_position_embeddings") or config.max_position_embeddings,
        )
    return params


def uses_native_rope(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """Whether stock transformers can express this request on this architecture by itself."""
    if not isinstance(posenc, RopeConfig) or arch.rope == "none" or resolve_layout(posenc, arch).layout != arch.rope_layout:
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


def resolve_layout(posenc: PosEncConfig, arch: Architecture) -> PosEncConfig:
    """A RoPE request without a layout takes the architecture's own (``"half"`` without native RoPE)."""
    if isinstance(posenc, RopeConfig) and posenc.layout is None:
        return dataclasses.replace(posenc, layout=arch.rope_layout if arch.rope != "none" else "half")
    return posenc


def needs_attention_function(posenc: PosEncConfig, config, arch: Architecture) -> bool:
    """NoPE needs no attention function of ours; every other plug-in encoding does."""
    return posenc.kind != "nope" and not uses_native_rope(posenc, config, arch)


def validate(posenc: PosEncConfig, config, attn_implementation: str | None = None) -> Architecture:
    """Check that ``posenc`` can be applied to a model with this config (and backend).

    Raises:
        ValueError: Unsupported architecture, layer indices out of range, CoPE on an encoder, T5 bias
            with an odd bucket count on an encoder, or a backend that cannot express the encoding.
    """
    arch = architecture_of(config)
    n = num_layers(config)
    if posenc.layers is not None and max(posenc.layers) >= n:
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}): invalid layers={list(posenc.layers)}; "
                         f"allowed: indices in [0, {n - 1}] for this {n}-layer model.")
    refusal = arch.refusal(posenc.kind, config)
    if refusal is not None:
        raise ValueError(f"PosEncConfig(kind={posenc.kind!r}) cannot be applied to {config.model_type!r}: {refusal.why}.")
    causal = is_causal(arch, config)
    if posenc.kind == "cope" and not causal:
        raise ValueError(
            f"CoPE is causal-only (positions count gates over past keys) and cannot be applied to the "
            f"encoder {config.model_type!r}; allowed kinds on encoders: rope, nope, alibi, t5_bias."
        )
    # --- Issue 10: the training-free RoPE extensions extend the model's own RoPE, causally ---------------
    if posenc.kind in ROPE_EXTENSION_KINDS and (arch.rope == "none" or not causal):
        why = "has no RoPE to extend" if arch.rope == "none" else "is an encoder (the extension is causal-only)"
        raise ValueError(
            f"PosEncConfig(kind={posenc.kind!r}) cannot be applied to {config.model_type!r}: the model {why}; "
            "allowed: causal architectures with RoPE (e.g. llama, mistral, qwen2, qwen3, phi, gpt_neox)."
        )
    # --- end issue 10 ---
    if posenc.kind == "t5_bias" and not causal and posenc.num_buckets % 2:
        raise ValueError(f"PosEncConfig(kind='t5_bias'): invalid num_buckets={posenc.num_buckets} on an encoder; "
                         "allowed: an even number (half of the buckets per direction).")
    backend = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    backend = backend.removeprefix("hf_posenc_")
    if needs_attention_function(posenc, config, arch) and backend not in attention.BACKENDS:
        raise ValueError(
            f"attn_implementation={backend!r} cannot express kind={posenc.kind!r} (it needs an additive bias, "
            f"the full logits or rotation at attention time); allowed: {sorted(attention.BACKENDS)}."
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
    from .modeling import posenc_class

    state = _State(posenc=posenc, native=False, classes=(type(model), type(config)))
    model.__class__ = posenc_class(type(model))
    config.__class__ = model.__class__.config_class
    setattr(config, CONFIG_KEY, posenc.to_dict())
    install(model, posenc, arch, state, attn_implementation)
    return model


def _convert_native(model, posenc: RopeConfig, arch: Architecture) -> nn.Module:
    config = model.config
    state = _State(posenc=posenc, native=True)
    state.rope_backup = {
        "rope_parameters": copy.deepcopy(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
        "head_dim": getattr(config, "head_dim", 0),
        CONFIG_KEY: getattr(config, CONFIG_KEY, None),
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
    setattr(config, CONFIG_KEY, posenc.to_dict())
    return params


def make_position_module(posenc: PosEncConfig, config, arch: Architecture, layer_idx: int = 0) -> PositionModule | None:
    """The ``attn.posenc`` module of converted layer ``layer_idx`` (None for NoPE)."""
    if posenc.kind == "rope":
        params = resolved_rope_parameters(posenc, config, arch, layer_idx)
        original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        return RotaryPosition(params, head_dim(config), original, posenc.layout)
    if posenc.kind == "alibi":
        return AlibiBias(num_heads(config), posenc.max_bias)
    if posenc.kind == "t5_bias":
        return T5Bias(num_heads(config), posenc.num_buckets, posenc.max_distance)
    if posenc.kind == "cope":
        return CoPE(head_dim(config), posenc.npos_max, posenc.block_size)
    # --- Issue 10: training-free RoPE extensions, on the layer's own (stock) RoPE parameters ---------
    if posenc.kind in ROPE_EXTENSION_KINDS:
        params = current_rope_parameters(config, arch, layer_idx)  # the model's own rope_type and scaling
        original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        own = (params, head_dim(config), original, arch.rope_layout)
        if posenc.kind == "self_extend":
            return SelfExtend(*own, group_size=posenc.group_size, neighbor_window=posenc.neighbor_window)
        return ReRoPE(*own, window=posenc.window, leak=posenc.leak)
    # --- end issue 10 ---
    return None


def install(model, posenc: PosEncConfig, arch: Architecture, state: _State | None = None,
            attn_implementation: str | None = None) -> None:
    """Apply the plug-in route to a model whose class is already the ``HfPosenc`` subclass.

    Used by :func:`convert` and by the ``HfPosenc`` classes' ``__init__`` (checkpoint loading).
    """
    config = model.config
    if state is None:  # built by an HfPosenc class: undoing the conversion returns to the stock classes
        from .modeling import stock_class

        state = _State(posenc=posenc, native=False, classes=(stock_class(type(model)), stock_class(type(config))))
    base = model.base_model
    # 1. Neutralise learned absolute positions.
    for path in arch.absolute:
        parent_path, _, name = path.rpartition(".")
        parent = _get(base, parent_path) if parent_path else base
        old = getattr(parent, name)
        state.replaced.append((parent, name, old))
        setattr(parent, name, ZeroPositionEmbedding(old))
    if "embeddings.position_embeddings" in arch.absolute:
        _extend_position_buffers(base.embeddings, state)
    # 2. Attach the per-layer encodings and the pre-hook.
    neutralise_rope = arch.rope != "none"
    use_attention = needs_attention_function(posenc, config, arch)
    modules = attention_modules(model, arch)
    # Fails here, at conversion, if this transformers release renamed the cache argument.
    cache_argument = _hf.cache_argument(modules[0]) if use_attention and arch.cache else None
    hook = _make_pre_hook(neutralise_rope, use_attention, cache_argument)
    # RoPE on "all layers" keeps the layers that natively have none without (SmolLM3, Cohere 2).
    # (The training-free extensions of issue 10 extend RoPE where the model has it, so they skip them too.)
    skip = (arch.native_nope_layers(config) if posenc.kind in ("rope", *ROPE_EXTENSION_KINDS) and posenc.layers is None
            else set())
    for layer_idx, attn in enumerate(modules):
        if posenc.applies_to(layer_idx) and layer_idx not in skip:
            module = make_position_module(posenc, config, arch, layer_idx)
            if module is not None:
                attn.posenc = module.to(_device_of(attn))
        if neutralise_rope or use_attention:  # e.g. NoPE on GPT-2 needs no hook at all
            state.hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    # 3. Dispatch to our attention function.
    if use_attention:
        backend = (attn_implementation or _hf.attn_implementation(model)).removeprefix("hf_posenc_")
        state.attn_implementation = _hf.attn_implementation(model)
        _hf.set_attn_implementation(model, attention.BACKENDS[backend])
    setattr(model, _STATE_ATTR, state)


def _device_of(module: nn.Module):
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _extend_position_buffers(embeddings: nn.Module, state: _State, length: int = 1 << 16) -> None:
    """BERT slices default ``position_ids``/``token_type_ids`` from buffers sized
    ``max_position_embeddings``; without absolute positions the model can read longer inputs.

    On the meta device (``from_pretrained`` builds there) the longer buffers are made on meta too: the stock
    ``_init_weights`` fills both buffers for their own shape when the model is materialised. The original
    buffers go into ``state`` for :func:`revert`.
    """
    device = embeddings.position_ids.device
    if embeddings.position_ids.shape[-1] >= length:
        return
    for name in ("position_ids", "token_type_ids"):
        if hasattr(embeddings, name):
            state.buffers.append((embeddings, name, getattr(embeddings, name)))
    embeddings.position_ids = torch.arange(length, device=device).expand((1, -1))
    if hasattr(embeddings, "token_type_ids"):
        embeddings.token_type_ids = torch.zeros((1, length), dtype=torch.long, device=device)


def _make_pre_hook(neutralise_rope: bool, use_attention: bool, cache_argument: tuple[str, int | None] | None):
    """Forward pre-hook of every attention module of a plug-in-converted model.

    * Replaces native RoPE's ``(cos, sin)`` by ``(1, 0)``: the stock rotation becomes the identity.
    * Records the cache length before the update (``posenc_past``) for the attention function.
    * Refuses to run if someone switched the model back to a stock attention backend, which would
      silently drop the encoding.
    """

    # Every layer of a forward receives the same (cos, sin): build the identity pair once per forward.
    identity = {"source": None, "pair": None}

    def hook(module, args, kwargs):
        if neutralise_rope and kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            if torch.compiler.is_compiling():
                # No cached pair under torch.compile: it would guard on the stored tensor and recompile per step.
                kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
            else:
                if identity["source"] is not cos:
                    identity["source"], identity["pair"] = cos, (torch.ones_like(cos), torch.zeros_like(sin))
                kwargs["position_embeddings"] = identity["pair"]
        if use_attention:
            backend = module.config._attn_implementation
            if backend not in (attention.EAGER, attention.SDPA):
                raise RuntimeError(
                    f"This hf_posenc model runs attn_implementation={backend!r}, which drops its positional "
                    f"encoding; allowed: 'eager' or 'sdpa' (set with model.set_attn_implementation("
                    f"'{attention.SDPA}') or hf_posenc.set_backend(model, 'sdpa'))."
                )
            layer_idx = getattr(module, "layer_idx", None)
            cache = _hf.find_cache(args, kwargs, cache_argument) if cache_argument else None  # None: encoder-only
            kwargs["posenc_past"] = _hf.cache_past_length(cache, layer_idx or 0)
        return args, kwargs

    return hook


def set_backend(model, backend: str) -> None:
    """Switch a converted model between ``"eager"`` (returns attention weights) and ``"sdpa"``.

    Raises:
        ValueError: Unknown backend (allowed: eager, sdpa).
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
        from .modeling import CLASS_PREFIX, stock_class

        snapshot.pop(CONFIG_KEY, None)
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
    from .modeling import STUB_MODULE

    auto_map = config_dict.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    stub = STUB_MODULE.rpartition(".")[2] + "."
    kept = {key: value for key, value in auto_map.items()
            if not any(str(v).rpartition("--")[2].startswith(stub) for v in (value if isinstance(value, (list, tuple)) else [value]))}
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
        from .layout import _permute_attention

        arch = architecture_of(model.config)
        for attn, perm in reversed(origin.permutations):
            _permute_attention(attn, arch, model.config, torch.argsort(perm))
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
        arch = architecture_of(config)
        for handle in state.hooks:
            handle.remove()
        for parent, name, old in state.replaced:
            setattr(parent, name, old)
        for module, name, tensor in state.buffers:
            setattr(module, name, tensor)
        for attn in attention_modules(model, arch):
            if "posenc" in attn._modules:
                del attn._modules["posenc"]
        if state.classes is not None:  # first: the HfPosenc classes map stock backend names to ours
            model.__class__, config.__class__ = state.classes
            _forget_own_auto_map(config.__dict__)
        if state.attn_implementation is not None:
            _hf.set_attn_implementation(model, state.attn_implementation)
    if state.native and state.rope_backup[CONFIG_KEY] is not None:
        setattr(config, CONFIG_KEY, state.rope_backup[CONFIG_KEY])
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
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
        from .modeling import posenc_config_class

        patched.__class__ = posenc_config_class(type(config))
        setattr(patched, CONFIG_KEY, posenc.to_dict())
    return patched


__all__ = ["convert", "patch_config", "revert", "posenc_of", "set_backend"]
