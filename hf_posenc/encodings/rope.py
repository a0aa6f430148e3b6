"""Rotary position embedding applied inside the attention function.

RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864). Architectures with native RoPE keep using
their own rotary module whenever the requested variant is expressible by stock transformers (see
``hf_posenc.convert``). This module covers the rest: models without RoPE (GPT-2, BERT), hybrid stacks
(``layers=``), partial rotary on models that do not support it natively, and the interleaved (GPT-J)
layout. Frequencies of every scaling variant come from transformers' ``ROPE_INIT_FUNCTIONS``; only the
``default`` frequencies (which transformers keeps in each model file) are computed here.

Keys are stored unrotated in the cache and rotated at attention time at their cache positions, so a
``dynamic`` scale always applies to all keys consistently (no keys cached under an older scale).

The rope types whose frequencies depend on the current length (:data:`LENGTH_DEPENDENT_ROPE_TYPES`:
dynamic NTK, longrope's short/long switch) go through this module by default even on architectures with
native RoPE: stock transformers caches keys rotated under the scale of the step that wrote them and keeps
enlarged dynamic frequencies after a long forward, so its outputs depend on the cache and on earlier inputs.
Here the frequencies are a function of the live length (last position + 1) alone. ``native=True`` asks for
the stock checkpoint with the stock behaviour instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .. import registry
from ..config import PosEncConfig, check_positive, fail_field
from .base import PositionModule

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")
ROPE_LAYOUTS = ("half", "interleaved")
#: Rope types whose frequencies depend on the current sequence length. Stock transformers recomputes them
#: statefully per forward and caches keys rotated under older scales (transformers #25104, #33129), so by
#: default they run through the plug-in's :class:`RotaryPosition` (exact); the others are length-independent
#: and stay native.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")

# Scaling parameters each stock rope type accepts (transformers' `RopeParameters`); anything else is
# rejected here instead of being silently ignored by transformers.
_ROPE_TYPE_PARAMS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "longrope": {"original_max_position_embeddings", "attention_factor", "short_factor", "long_factor", "factor"},
    # p-RoPE: the fraction p of frequencies kept is `partial_rotary_factor`; `factor` divides them (stock's form).
    "proportional": {"factor"},
}
_ROPE_REQUIRED = {
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "longrope": {"short_factor", "long_factor"},
}


def default_inv_freq(rope_theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    """``theta^(-2i/d)`` for ``i < d/2`` (the paper's frequencies), fp32 ``[rotary_dim // 2]``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (rope_theta**exponents)


def rotary_dim(rope_parameters: dict, head_dim: int) -> int:
    """Dimensions of each head that the rotation covers.

    ``partial_rotary_factor`` of the head, except for p-RoPE (``proportional``): there the factor is the fraction
    of frequencies kept, the frequency function gives one per pair of the whole head (zeros for the dropped ones:
    those pairs do not rotate), so the rotation covers the whole head.
    """
    if rope_parameters.get("rope_type") == "proportional":
        return head_dim
    dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    return dim - dim % 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX layout: dimension ``i`` pairs with ``i + d/2``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GPT-J layout: dimension ``2i`` pairs with ``2i + 1``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotation_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``cos, sin`` ``[*positions.shape, rotary_dim / 2]`` of RoPE at any (fractional) positions,
    times the cos/sin factor, in ``dtype``.

    The angles are fp32 as in stock RoPE (positions times ``inv_freq``, then cast like stock cos/sin); fp64
    inputs (reference tests) get fp64 angles from the same frequencies.
    """
    precision = torch.promote_types(dtype, torch.float32)
    angles = positions.to(precision)[..., None] * inv_freq.to(precision)
    if scaling == 1.0:  # the common case, and x * 1.0 is x: two operations fewer per rotation (decode counts them)
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, layout: str,
                 inverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., n, head_dim]`` with its first ``rotary_dim`` dimensions rotated pair by pair; the rest pass.

    Args:
        x: Queries or keys, ``[..., n, head_dim]``.
        cos, sin: Per-pair ``[..., n, rotary_dim / 2]`` (from :func:`rotation_cos_sin`), broadcast against ``x``.
        rotary_dim: Rotated dimensions.
        layout: ``"half"`` (``i`` pairs with ``i + rotary_dim / 2``) or ``"interleaved"`` (``2i`` with ``2i + 1``).
        inverse: Rotate by the opposite angles (the transposed rotation: gradients, undoing a rotation).
        out: Where to write the result (no autograd; e.g. rows of a kept buffer), or None for a new tensor.
    """
    # In place into one output tensor (fast decode), except where autograd or dynamo (no `out=` ops) trace.
    if layout == "half" and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling():
        return _rotate_half_layout_into(x, cos, sin, rotary_dim, -1.0 if inverse else 1.0, out)
    if out is not None:
        return out.copy_(rotate_pairs(x, cos, sin, rotary_dim, layout, inverse))
    if inverse:
        sin = -sin
    if layout == "half":
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    else:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    rotate = rotate_half if layout == "half" else rotate_interleaved
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


def _rotate_half_layout_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                             direction: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The half-layout rotation written into one output tensor (no autograd: inference, decode, backward).

    Decode re-rotates the whole cache every step; the differentiable form makes four cache-sized
    temporaries, which cost 5x more here than the arithmetic (fresh large allocations fault their pages).

    Args:
        x: ``[..., n, head_dim]``; cos, sin: ``[..., n, rotary_dim / 2]`` in ``x``'s dtype.
        direction: 1.0, or -1.0 for the opposite angles.
        out: A tensor shaped like ``x`` to write into (None: a new one).
    """
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    out = torch.empty_like(x) if out is None else out
    low, high = out[..., :half], out[..., half:rotary_dim]
    torch.mul(x1, cos, out=low).addcmul_(x2, sin, value=-direction)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=high).addcmul_(x1, sin, value=direction)  # x2 cos + x1 sin
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


class RotaryPosition(PositionModule):
    """RoPE applied to queries and keys at attention time.

    Args:
        rope_parameters: Stock ``rope_parameters`` dict (``rope_type``, ``rope_theta``,
            ``partial_rotary_factor`` and the scaling parameters of the type).
        head_dim: Per-head dimension.
        max_position_embeddings: The model's context length (used by dynamic/yarn/longrope defaults).
        layout: ``"half"`` or ``"interleaved"``.
    """

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, layout: str = "half"):
        super().__init__()
        self.rope_parameters = dict(rope_parameters)
        self.layout = layout
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rotary_dim = rotary_dim(self.rope_parameters, head_dim)
        # A bare transformers config carrying what the stock frequency functions read.
        config = PreTrainedConfig()
        config.rope_parameters = dict(self.rope_parameters)
        config.head_dim = head_dim
        config.num_attention_heads = 1
        config.hidden_size = head_dim
        config.max_position_embeddings = max_position_embeddings
        config.standardize_rope_params()
        self._rope_config = config
        self._cache: dict = {}

    @classmethod
    def from_layer(cls, layer, **params) -> RotaryPosition:
        """The module of one converted layer on that layer's own RoPE (a ``registry.LayerSpec``): its
        parameters, head dimension, pretraining length and layout; ``params`` are the subclass's own (the
        extensions of the model's RoPE: Self-Extend, ReRoPE, contextual RoPE)."""
        original = layer.rope_parameters.get("original_max_position_embeddings", layer.max_position_embeddings)
        rope_parameters = with_longrope_factor(layer.rope_parameters, layer.max_position_embeddings)
        return cls(rope_parameters, layer.head_dim, original, layer.rope_layout, **params)

    def _frequency_key(self, seq_len: int, device) -> tuple:
        """What the frequencies depend on: the device, and the length where the rope type depends on it."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        # dynamic and longrope depend on the length beyond the original context; the others do not. The key is
        # the length alone (no state carried between calls): a long forward never changes a later short one.
        length_key = (seq_len if rope_type in LENGTH_DEPENDENT_ROPE_TYPES and seq_len > self.max_position_embeddings
                      else 0)
        return str(device), length_key

    def frequencies(self, seq_len: int, device) -> tuple[torch.Tensor, float]:
        """Inverse frequencies ``[rotary_dim // 2]`` (fp32) and the cos/sin scaling for ``seq_len`` keys."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        key = self._frequency_key(seq_len, device)
        length_key = key[1]
        if key not in self._cache:
            if len(self._cache) > 64:  # dynamic scaling makes one entry per length while generating
                self._cache.clear()
            if rope_type == "default":
                inv_freq = default_inv_freq(self.rope_parameters["rope_theta"], self.rotary_dim, device)
                scaling = 1.0
            else:
                kwargs = {"seq_len": length_key} if length_key else {}
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self._rope_config, device, **kwargs)
            self._cache[key] = (inv_freq.to(device=device, dtype=torch.float32), float(scaling))
        return self._cache[key]

    def cos_sin(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``[len(positions), rotary_dim]`` in this module's layout."""
        inv_freq, scaling = self.frequencies(seq_len, positions.device)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [n, rotary_dim/2]
        if self.layout == "half":
            angles = torch.cat((angles, angles), dim=-1)
        else:
            angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos() * scaling, angles.sin() * scaling

    def _rotate_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, H, n, head_dim]; cos/sin: [n, rotary_dim] fp32 (cast to x's dtype like stock RoPE).
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rotate = rotate_half if self.layout == "half" else rotate_interleaved
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x_rot = x_rot * cos + rotate(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot

    def rotate(self, query, key, q_pos, k_pos, heads=None):
        # ``heads`` (sequence parallelism) changes nothing: the frequencies are the same for every head.
        # The live length (last query position + 1), not the key buffer length: a StaticCache's buffer is
        # longer than what it holds, and dynamic scaling must not depend on the cache type.
        seq_len = int(q_pos.max()) + 1
        q_cos, q_sin = self.cos_sin(q_pos, seq_len)
        k_cos, k_sin = self.cos_sin(k_pos, seq_len)
        return self._rotate_one(query, q_cos, q_sin), self._rotate_one(key, k_cos, k_sin)

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``x [B, H, n, head_dim]`` rotated at ``positions`` (``[n]``, ``[B, n]`` per row or ``[B, H, n]``, any
        float), with the model's frequencies and cos/sin scaling for ``seq_len`` keys, in ``x``'s dtype."""
        inv_freq, scaling = self.frequencies(seq_len, x.device)
        if positions.dim() == 2:  # per-row positions: broadcast over heads
            positions = positions[:, None]
        cos, sin = rotation_cos_sin(positions, inv_freq, scaling, x.dtype)  # [(B, H,) n, rotary_dim / 2]
        return rotate_pairs(x, cos, sin, self.rotary_dim, self.layout)

    def table(self, stop: int, seq_len: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair ``cos, sin`` ``[n, rotary_dim / 2]`` (``n >= stop``) of the integer positions ``0..n-1``, as
        :meth:`rotate_at` computes them (times the cos/sin factor, in ``dtype``), kept between calls: a decode step
        rotates at positions it has rotated at before, and a slice of the table is a view, not a computation."""
        inv_freq, scaling = self.frequencies(seq_len, device)
        key = ("table", dtype, *self._frequency_key(seq_len, device))
        held = self._cache.get(key)
        if held is None or held[0].shape[0] < stop:
            length = max(stop, 2 * (held[0].shape[0] if held is not None else 0), 256)
            held = self._cache[key] = rotation_cos_sin(torch.arange(length, device=device), inv_freq, scaling, dtype)
        return held

    def rotate_at_sets(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``x [B, H, n, head_dim]`` rotated at each of ``S`` position sets at once, ``[B, H, S, n, head_dim]``.

        One cos/sin table and one rotation pass for all sets instead of one per set (a decode step rotates a
        single row, where the per-call cost is what counts); every element is computed as :meth:`rotate_at`
        computes it.

        Args:
            x: Queries or keys, ``[B, H, n, head_dim]``.
            positions: ``[S, n]``, or ``[B, S, n]`` per row (any float or int dtype).
            seq_len: As :meth:`rotate_at`.
        """
        inv_freq, scaling = self.frequencies(seq_len, x.device)
        if positions.dim() == 3:  # per-row positions: broadcast over heads
            positions = positions[:, None]
        cos, sin = rotation_cos_sin(positions, inv_freq, scaling, x.dtype)  # [(B, 1,) S, n, rotary_dim / 2]
        sets = x[:, :, None].expand(*x.shape[:2], positions.shape[-2], *x.shape[2:])  # a view, no copy
        return rotate_pairs(sets, cos, sin, self.rotary_dim, self.layout)

    def extra_repr(self) -> str:
        return f"rope_parameters={self.rope_parameters}, rotary_dim={self.rotary_dim}, layout={self.layout!r}"


def cache_is_stale(model: torch.nn.Module, cached: int, total: int) -> bool:
    """Whether a KV cache written at ``cached`` tokens no longer matches a forward over ``total`` tokens.

    A length-dependent RoPE (dynamic, longrope) rotates every key at attention time with the frequencies of the
    live length, but the cached keys and values of the layers above the first were computed from hidden states
    of the earlier, shorter forwards, under those forwards' frequencies. Where the frequencies at ``total`` differ
    from those at ``cached``, only recomputing the whole sequence equals the model without a cache: past the
    original length that is every step for dynamic NTK, and the one step that crosses it for longrope.
    """
    if cached <= 0 or total <= cached:
        return False
    cpu = torch.device("cpu")
    for module in model.modules():
        rope_type = module.rope_parameters.get("rope_type") if isinstance(module, RotaryPosition) else None
        if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
            then, now = module.frequencies(cached, cpu), module.frequencies(total, cpu)
            if then[1] != now[1] or not torch.equal(then[0], now[0]):
                return True
    return False


@dataclass(frozen=True)
class RopeConfig(PosEncConfig):
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864) and its scalings.

    Scaling variants are the stock transformers ones (``transformers.modeling_rope_utils``): linear/PI
    (https://arxiv.org/abs/2306.15595), dynamic NTK, YaRN (https://arxiv.org/abs/2309.00071), llama3,
    longrope (https://arxiv.org/abs/2402.13753), p-RoPE (``proportional``, Barbero et al. 2025,
    https://arxiv.org/abs/2410.06205: only the highest ``partial_rotary_factor`` fraction of the frequencies
    rotate, the pairs of the others are left unrotated). ``None`` for ``rope_theta`` / ``partial_rotary_factor``
    keeps the model's own value (or 10000 / 1.0 for models without RoPE).

    Args:
        rope_type: One of ``ROPE_TYPES``.
        rope_theta: RoPE base.
        partial_rotary_factor: Fraction of each head's dimensions that rotate, in (0, 1]; for ``proportional``, the
            fraction p of the frequencies kept (the highest), over the whole head.
        layout: Which query/key dimensions of the weights form a rotation pair: ``"half"`` (GPT-NeoX / HF,
            rotate_half: ``i`` with ``i + d/2``) or ``"interleaved"`` (GPT-J / Cohere: ``2i`` with ``2i + 1``).
            None (default): the architecture's own layout, so that ``PosEncConfig(kind="rope")`` is the
            identity on every RoPE architecture; conversion records the resolved value.
        factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, mscale,
        mscale_all_dim, truncate, low_freq_factor, high_freq_factor, short_factor, long_factor:
            The stock scaling parameters of ``rope_type``.
        layers: Layers that get RoPE; the others get none.
        native: Which implementation runs the request on an architecture with native RoPE. None (default):
            the stock one (a stock checkpoint) where it is exact, i.e. for every rope type except the
            length-dependent ones (``dynamic``, ``longrope``: :data:`LENGTH_DEPENDENT_ROPE_TYPES`), which get
            the plug-in's stateless rotation at attention time. True: the stock checkpoint with stock
            behaviour, also for ``dynamic``/``longrope`` (its frequencies change with the forward that set
            them, and cached keys keep the scale they were written with); an error where stock transformers
            cannot express the request. False: always the plug-in.
    """

    kind: str = "rope"
    rope_type: str = "default"
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    layout: str | None = None
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    native: bool | None = None

    def _validate(self) -> None:
        k = self.kind
        if self.native is not None and not isinstance(self.native, bool):
            fail_field(k, "native", self.native, "None (automatic), True (stock checkpoint) or False (plug-in)")
        if self.rope_type not in ROPE_TYPES:
            fail_field(k, "rope_type", self.rope_type, ", ".join(ROPE_TYPES))
        if self.layout is not None and self.layout not in ROPE_LAYOUTS:
            fail_field(k, "layout", self.layout, ", ".join(ROPE_LAYOUTS))
        check_positive(k, "rope_theta", self.rope_theta, allow_none=True)
        prf = self.partial_rotary_factor
        if prf is not None and (isinstance(prf, bool) or not isinstance(prf, int | float) or not 0 < prf <= 1):
            fail_field(k, "partial_rotary_factor", prf, "a number in (0, 1]")
        given = {name for name in self.scaling_parameters()}
        extra = given - _ROPE_TYPE_PARAMS[self.rope_type]
        if extra:
            fail_field(k, sorted(extra)[0], getattr(self, sorted(extra)[0]),
                  f"only {sorted(_ROPE_TYPE_PARAMS[self.rope_type]) or 'no scaling parameters'} "
                  f"for rope_type={self.rope_type!r}")
        missing = _ROPE_REQUIRED.get(self.rope_type, set()) - given
        if missing:
            fail_field(k, sorted(missing)[0], None, f"a value (required by rope_type={self.rope_type!r})")
        if self.factor is not None:
            check_positive(k, "factor", self.factor)
            if self.rope_type in ("linear", "dynamic", "yarn", "llama3") and self.factor < 1:
                fail_field(k, "factor", self.factor, "a number >= 1")
        check_positive(k, "original_max_position_embeddings", self.original_max_position_embeddings,
                        integer=True, allow_none=True)
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                     "low_freq_factor", "high_freq_factor"):
            check_positive(k, name, getattr(self, name), allow_none=True)
        if self.beta_fast is not None and self.beta_slow is not None and self.beta_fast < self.beta_slow:
            fail_field(k, "beta_fast", self.beta_fast, f"a number >= beta_slow ({self.beta_slow})")
        if (self.low_freq_factor is not None and self.high_freq_factor is not None
                and self.high_freq_factor <= self.low_freq_factor):
            fail_field(k, "high_freq_factor", self.high_freq_factor,
                       f"a number > low_freq_factor ({self.low_freq_factor})")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str | bytes) or not hasattr(value, "__iter__") or not all(
                        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value):
                    fail_field(k, name, value, "a list of positive numbers (one per rotary frequency)")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.truncate is not None and not isinstance(self.truncate, bool):
            fail_field(k, "truncate", self.truncate, "True or False")

    def is_base_within(self, length: int, trained_length: int) -> bool:
        # Plain RoPE is the model; dynamic NTK keeps the original frequencies up to the original length. Any other
        # field (theta, partial rotary, layout, layers, ...) changes the model.
        changed = [f.name for f in dataclasses.fields(self)
                   if f.name not in ("kind", "rope_type", "factor", "native") and getattr(self, f.name) is not None]
        if changed:
            return False
        return self.rope_type == "default" or (self.rope_type == "dynamic" and length <= trained_length)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`PosEncConfig.to_dict`, without ``native`` when it is None (the default): a checkpoint that
        does not choose its route stays readable by releases that read ``config.posenc`` strictly."""
        out = super().to_dict()
        if out.get("native") is None:
            out.pop("native", None)
        return out

    def scaling_parameters(self) -> dict[str, Any]:
        """The stock scaling parameters that are set (the keys of transformers' ``rope_parameters``)."""
        names = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "truncate", "low_freq_factor", "high_freq_factor",
                 "short_factor", "long_factor")
        out = {}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def resolve_rope_parameters(posenc: RopeConfig, current: dict, max_position_embeddings: int) -> dict:
    """Stock ``rope_parameters`` for a RoPE request on a layer whose own parameters are ``current``.

    Unset theta/partial keep the layer's values, and the pre-extension length is recorded explicitly
    (``original_max_position_embeddings``, default: the model's ``max_position_embeddings``) so inference
    never has to guess it.
    """
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
            current.get("original_max_position_embeddings") or max_position_embeddings,
        )
    return params


def with_longrope_factor(params: dict, max_position_embeddings: int) -> dict:
    """``params`` with longrope's ``factor`` made explicit (other types: unchanged).

    Stock longrope without a ``factor`` derives its attention factor from the model's
    ``max_position_embeddings / original_max_position_embeddings``; :class:`RotaryPosition` only knows the
    original length, so the ratio is recorded where the model's length is still known.
    """
    original = params.get("original_max_position_embeddings")
    if params.get("rope_type") != "longrope" or params.get("factor") is not None or not original:
        return params
    return {**params, "factor": max_position_embeddings / original}


def _build(config: RopeConfig, layer: registry.LayerSpec) -> RotaryPosition:
    params = resolve_rope_parameters(config, layer.rope_parameters, layer.max_position_embeddings)
    params = with_longrope_factor(params, layer.max_position_embeddings)
    original = params.get("original_max_position_embeddings", layer.max_position_embeddings)
    return RotaryPosition(params, layer.head_dim, original, config.layout)


registry.register(registry.Encoding(
    kind="rope",
    config_class=RopeConfig,
    module_class=RotaryPosition,
    build=_build,
    capabilities=registry.Capabilities(route="rotate"),
    display_name="RoPE",
    paper="https://arxiv.org/abs/2104.09864",
    backends=registry.OWN_BACKENDS,
    # Interleaved is not the tiny models' native layout: the tests' example runs through the plug-in route.
    example=registry.Example(params={"layout": "interleaved"}, prefill_kernels=("sdpa", "sdpa")),
))
