"""The plug-in route on one model instance: install, remove, and the attention modules' pre-hook.

The one module that changes a model for a plug-in encoding. ``hf_posenc.convert`` (a loaded stock model)
and the ``HfPosenc`` classes' ``__init__`` in ``hf_posenc.modeling`` (a converted checkpoint, a patched
config) both call :func:`install`; ``hf_posenc.revert`` undoes it through :func:`remove`. It imports
neither of them, so neither imports the other back.

:func:`install` neutralises the model's own encoding (native RoPE gets cos=1/sin=0 through a forward
pre-hook on each attention module; learned absolute embeddings are replaced by a zero module, an image
model's table parameter is dropped: ``_hf.drop_patch_position_table``), attaches
each converted layer's position module (``attn.posenc``, built by the kind's registry entry), and
dispatches the model to ``hf_posenc_eager``/``hf_posenc_sdpa`` where the kind has a route.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import _hf, attention, registry, rotated_keys
from .architectures import Architecture, _get, architecture_of, attention_modules
from .config import PosEncConfig
from .encodings.base import PositionModule
from .model_shape import current_rope_parameters, head_dim, num_heads

#: Attribute of a converted model holding its :class:`State`.
STATE_ATTR = "_hf_posenc_state"


class ZeroPositionEmbedding(nn.Module):
    """Stands in for a learned absolute position table: returns zeros, so nothing is added.

    The zeros come in the dtype of the table it replaced and follow ``model.to(dtype)`` / ``.half()``
    (an empty, non-persistent buffer carries the dtype): fp32 zeros added to bf16/fp16 token embeddings
    would promote the hidden states to fp32 and break the next LayerNorm. The replaced table is kept
    unregistered (no weights in checkpoints) but follows the same dtype/device moves, so that
    ``hf_posenc.revert`` puts back a table that matches the model.

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
class State:
    """What a conversion changed on one instance, so that ``hf_posenc.revert`` can undo it."""

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
    overrides: list = field(default_factory=list)  # (module, attribute) set on the instance, deleted by remove


class PatchGrid:
    """The ``(rows, columns)`` patch grid of the images in the current forward of an image model.

    Recorded by a forward hook on the patch embedding's convolution (its output is ``[B, D, rows, columns]``)
    and handed to each attention module as ``posenc_grid``, so a converted model reads any resolution. Both
    hooks are methods of one object: a deep copy of the model gets its own grid.
    """

    def __init__(self):
        self.shape: tuple[int, int] | None = None

    def record(self, module, args, output) -> None:
        self.shape = tuple(output.shape[-2:])

    def pass_to_attention(self, module, args, kwargs):
        kwargs["posenc_grid"] = self.shape
        return args, kwargs


def layer_spec(config, arch: Architecture, layer_idx: int = 0) -> registry.LayerSpec:
    """What the position module of layer ``layer_idx`` is built from (see ``registry.Encoding.build``)."""
    return registry.LayerSpec(num_heads=num_heads(config), head_dim=head_dim(config),
                              rope_parameters=current_rope_parameters(config, arch, layer_idx),
                              # Image models have no context length.
                              max_position_embeddings=getattr(config, "max_position_embeddings", 0),
                              rope_layout=arch.rope_layout,
                              num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads(config))


def make_position_module(posenc: PosEncConfig, config, arch: Architecture, layer_idx: int = 0) -> PositionModule | None:
    """The ``attn.posenc`` module of converted layer ``layer_idx`` (None for a kind that attaches none).

    Raises:
        TypeError: The module has learned parameters its registry entry does not declare in ``tables`` (a
            variant may have fewer: 2-D RoPE's axial form has none).
    """
    entry = registry.get(posenc.kind)
    if entry.build is None:
        return None
    module = entry.build(posenc, layer_spec(config, arch, layer_idx))
    tables = tuple(name for name, _ in module.named_parameters())
    if not set(tables) <= set(entry.capabilities.tables):
        raise TypeError(f"{type(module).__name__} has learned parameters {list(tables)} but kind={posenc.kind!r} "
                        f"declares tables={list(entry.capabilities.tables)}: update its registry entry.")
    return module


def install(model, posenc: PosEncConfig, arch: Architecture, classes: tuple[type, type],
            attn_implementation: str | None = None) -> State:
    """Apply the plug-in route to a model whose class is already the ``HfPosenc`` subclass.

    The one entrance for both ways a converted model comes to be: ``hf_posenc.convert`` (a loaded stock
    model) and the ``HfPosenc`` classes' ``__init__`` (a converted checkpoint or a patched config).

    Args:
        model: The model, its class already the ``HfPosenc`` subclass.
        posenc: The encoding (layout resolved).
        arch: The model's architecture row.
        classes: ``(model class, config class)`` that :func:`remove` restores.
        attn_implementation: ``"eager"``/``"sdpa"`` (default: the model's current backend).

    Returns:
        The recorded :class:`State` (also stored on the model).
    """
    config = model.config
    state = State(posenc=posenc, native=False, classes=classes)
    entry = registry.get(posenc.kind)
    base = model.base_model
    # 1. Neutralise learned absolute positions.
    for path in arch.absolute:
        parent_path, _, name = path.rpartition(".")
        parent = _get(base, parent_path) if parent_path else base
        old = getattr(parent, name)
        state.replaced.append((parent, name, old))
        if arch.patch_grid:  # an image model's table is a bare parameter, resized by a method of its embeddings
            state.hooks.extend(_hf.drop_patch_position_table(parent, name))
            state.overrides.append((parent, _hf.PATCH_TABLE_METHOD))
        else:
            setattr(parent, name, ZeroPositionEmbedding(old))
    if "embeddings.position_embeddings" in arch.absolute and not arch.patch_grid:
        _extend_position_buffers(base.embeddings, state)
    if arch.native_alibi is not None and arch.native_alibi.on(config):
        # The model adds its own ALiBi while this flag, read by its forward, is set; the config keeps saying
        # `alibi`, so the attention modules still apply no RoPE and a reverted or reloaded model is the original.
        flag = arch.native_alibi.model_flag
        state.replaced.append((base, flag, getattr(base, flag)))
        setattr(base, flag, False)
    # 2. Attach the per-layer encodings and the pre-hook.
    neutralise_rope = arch.has_native_rope(config)
    temperature = posenc.attention_temperature
    use_attention = posenc.needs_attention_function()
    modules = attention_modules(model, arch)
    # Fails here, at conversion, if this transformers release renamed the cache argument.
    cache_argument = _hf.cache_argument(modules[0]) if use_attention and arch.cache else None
    hook = _make_pre_hook(arch.rotary_pair if neutralise_rope else None, use_attention, cache_argument)
    # A rotation on "all layers" keeps the layers that natively have none without (SmolLM3, Cohere 2), so that
    # the model's own RoPE requested again is the identity.
    rotary_everywhere = ((entry.capabilities.route == "rotate" or entry.capabilities.extends_rope)
                         and posenc.layers is None)
    skip = arch.native_nope_layers(config) if rotary_everywhere else set()
    grid = PatchGrid() if entry.capabilities.patch_grid else None
    if grid is not None:
        state.hooks.append(_get(base, arch.patch_grid).register_forward_hook(grid.record))
    for layer_idx, attn in enumerate(modules):
        if grid is not None:
            state.hooks.append(attn.register_forward_pre_hook(grid.pass_to_attention, with_kwargs=True))
        has_encoding = False
        if posenc.applies_to(layer_idx) and layer_idx not in skip:
            module = make_position_module(posenc, config, arch, layer_idx)
            if module is not None:
                attn.posenc = module.to(_device_of(attn))
                has_encoding = True
        if temperature is not None and temperature.applies(has_encoding):
            # A plain attribute (no weights): the attention function reads it; remove() deletes it.
            attn.posenc_temperature = temperature
            state.overrides.append((attn, "posenc_temperature"))
        if neutralise_rope or use_attention:  # e.g. NoPE on GPT-2 needs no hook at all
            state.hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    # 3. Dispatch to our attention function.
    if use_attention:
        backend = (attn_implementation or _hf.attn_implementation(model)).removeprefix("hf_posenc_")
        state.attn_implementation = _hf.attn_implementation(model)
        _hf.set_attn_implementation(model, attention.BACKENDS[backend])
    setattr(model, STATE_ATTR, state)
    return state


def remove(model, state: State) -> None:
    """Undo :func:`install`: hooks, replaced modules and buffers, position modules, classes and backend."""
    config = model.config
    arch = architecture_of(config)
    for handle in state.hooks:
        handle.remove()
    for parent, name, old in state.replaced:
        setattr(parent, name, old)
    for module, name, tensor in state.buffers:
        setattr(module, name, tensor)
    for module, attribute in state.overrides:
        del module.__dict__[attribute]
    for attn in attention_modules(model, arch):
        if "posenc" in attn._modules:
            del attn._modules["posenc"]
    if state.classes is not None:  # first: the HfPosenc classes map stock backend names to ours
        model.__class__, config.__class__ = state.classes
    if state.attn_implementation is not None:
        _hf.set_attn_implementation(model, state.attn_implementation)


def _device_of(module: nn.Module):
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _extend_position_buffers(embeddings: nn.Module, state: State, length: int = 1 << 16) -> None:
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


def _identity_rotation(pair: tuple, names: tuple[str, str]) -> tuple:
    """``pair`` (cos and sin, in the order ``names`` gives) replaced by cos = 1 and sin = 0, same shapes."""
    return tuple(torch.ones_like(t) if name == "cos" else torch.zeros_like(t) for name, t in zip(names, pair))


def _make_pre_hook(rotary_pair: tuple[str, str] | None, use_attention: bool,
                   cache_argument: tuple[str, int | None] | None):
    """Forward pre-hook of every attention module of a plug-in-converted model.

    * Replaces native RoPE's ``(cos, sin)`` by ``(1, 0)``, in the order ``rotary_pair`` names them (None: the
      model has no RoPE to neutralise): the stock rotation becomes the identity.
    * Records the cache length before the update (``posenc_past``) for the attention function.
    * Hands encodings that keep rotated keys their cache layer's store (``posenc_rotated_keys``;
      :mod:`hf_posenc.rotated_keys`).
    * Refuses to run if someone switched the model back to a stock attention backend, which would
      silently drop the encoding.
    """

    # Every layer of a forward receives the same (cos, sin): build the identity pair once per forward.
    identity = {"source": None, "pair": None}

    def hook(module, args, kwargs):
        if rotary_pair is not None and kwargs.get("position_embeddings") is not None:
            pair = kwargs["position_embeddings"]
            if torch.compiler.is_compiling():
                # No cached pair under torch.compile: it would guard on the stored tensor and recompile per step.
                kwargs["position_embeddings"] = _identity_rotation(pair, rotary_pair)
            else:
                if identity["source"] is not pair[0]:
                    identity["source"], identity["pair"] = pair[0], _identity_rotation(pair, rotary_pair)
                kwargs["position_embeddings"] = identity["pair"]
        if use_attention:
            backend = module.config._attn_implementation
            if backend not in attention.BACKENDS.values():
                raise RuntimeError(
                    f"This hf_posenc model runs attn_implementation={backend!r}, which drops its positional "
                    f"encoding; allowed: 'eager', 'sdpa' or 'flex_attention' (set with model.set_attn_implementation("
                    f"'{attention.SDPA}') or hf_posenc.set_backend(model, 'sdpa'))."
                )
            layer_idx = getattr(module, "layer_idx", None)
            cache = _hf.find_cache(args, kwargs, cache_argument) if cache_argument else None  # None: encoder-only
            kwargs["posenc_past"] = _hf.cache_past_length(cache, layer_idx or 0)
            if getattr(getattr(module, "posenc", None), "keeps_rotated_keys", False):
                # Checked before the update: the store is kept only while the layer holds the keys it rotated.
                kwargs["posenc_rotated_keys"] = rotated_keys.for_cache_layer(cache, layer_idx or 0)
        return args, kwargs

    return hook
