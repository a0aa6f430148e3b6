"""Typed, validated positional-encoding configs.

One frozen dataclass per encoding family, each tagged with an explicit ``kind``. ``PosEncConfig(kind=...)``
dispatches to the right class, so callers never guess a variant from which keys are present. Every
invalid value raises ``ValueError`` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

#: Name of the key under which the encoding is recorded in a Hugging Face config.
CONFIG_KEY = "posenc"

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
ROPE_LAYOUTS = ("half", "interleaved")

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
}
_ROPE_REQUIRED = {
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "longrope": {"short_factor", "long_factor"},
}


def _fail(kind: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"PosEncConfig(kind={kind!r}): invalid {field}={value!r}; allowed: {allowed}.")


def _check_positive(kind: str, field: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not numeric or not math.isfinite(value) or value <= 0:
        _fail(kind, field, value, "a positive integer" if integer else "a positive finite number")


class PosEncConfig:
    """Base class and factory of positional-encoding configs.

    ``PosEncConfig(kind="alibi")`` returns an :class:`AlibiConfig`, and so on for every registered kind.

    Args:
        kind: One of ``"rope"``, ``"nope"``, ``"alibi"``, ``"t5_bias"``, ``"cope"``, ``"self_extend"``,
            ``"rerope"``.
        **params: The parameters of that kind (see each subclass). ``layers`` (a list of layer indices,
            optional) applies the encoding to those layers only; the other layers get no positional
            encoding (NoPE), which expresses hybrid stacks such as "NoPE every 4th layer".

    Raises:
        ValueError: Unknown kind, unknown parameter, or invalid value (the message names the field and
            the allowed values).
    """

    kind: ClassVar[str]
    _registry: ClassVar[dict[str, type[PosEncConfig]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PosEncConfig._registry[cls.kind] = cls

    def __new__(cls, *args, kind: str | None = None, **params):
        if cls is not PosEncConfig:
            return object.__new__(cls)
        if kind not in PosEncConfig._registry:
            raise ValueError(f"Unknown positional encoding kind={kind!r}; allowed: {sorted(PosEncConfig._registry)}.")
        sub = PosEncConfig._registry[kind]
        allowed = {f.name for f in dataclasses.fields(sub)}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"PosEncConfig(kind={kind!r}): unknown parameter(s) {unknown}; allowed: {sorted(allowed - {'kind'})}."
            )
        return object.__new__(sub)

    # -- shared validation --------------------------------------------------------------------------
    def _validate_common(self) -> None:
        if self.kind != type(self).kind:
            _fail(type(self).kind, "kind", self.kind, repr(type(self).kind))
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                _fail(self.kind, "layers", layers, "None or a list of distinct non-negative layer indices")
            layers = tuple(layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                _fail(self.kind, "layers", self.layers, "None or a non-empty list of non-negative layer indices")
            if len(set(layers)) != len(layers):
                _fail(self.kind, "layers", self.layers, "distinct layer indices")
            object.__setattr__(self, "layers", tuple(sorted(layers)))

    def __post_init__(self) -> None:
        self._validate_common()
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    def applies_to(self, layer_idx: int) -> bool:
        """Whether this encoding is applied to layer ``layer_idx`` (others get NoPE)."""
        return self.layers is None or layer_idx in self.layers

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the value stored under ``config.posenc``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PosEncConfig:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or "kind" not in data:
            raise ValueError(f"A positional-encoding dict needs a 'kind' key; got {data!r}.")
        return PosEncConfig(**data)


@dataclass(frozen=True)
class RopeConfig(PosEncConfig):
    """Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864) and its scalings.

    Scaling variants are the stock transformers ones (``transformers.modeling_rope_utils``): linear/PI
    (https://arxiv.org/abs/2306.15595), dynamic NTK, YaRN (https://arxiv.org/abs/2309.00071), llama3,
    longrope (https://arxiv.org/abs/2402.13753). ``None`` for ``rope_theta`` / ``partial_rotary_factor``
    keeps the model's own value (or 10000 / 1.0 for models without RoPE).

    Args:
        rope_type: One of ``ROPE_TYPES``.
        rope_theta: RoPE base.
        partial_rotary_factor: Fraction of each head's dimensions that rotate, in (0, 1].
        layout: Which query/key dimensions of the weights form a rotation pair: ``"half"`` (GPT-NeoX / HF,
            rotate_half: ``i`` with ``i + d/2``) or ``"interleaved"`` (GPT-J / Cohere: ``2i`` with ``2i + 1``).
            None (default): the architecture's own layout, so that ``PosEncConfig(kind="rope")`` is the
            identity on every RoPE architecture; conversion records the resolved value.
        factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, mscale,
        mscale_all_dim, truncate, low_freq_factor, high_freq_factor, short_factor, long_factor:
            The stock scaling parameters of ``rope_type``.
        layers: Layers that get RoPE; the others get none.
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

    def _validate(self) -> None:
        k = self.kind
        if self.rope_type not in ROPE_TYPES:
            _fail(k, "rope_type", self.rope_type, ", ".join(ROPE_TYPES))
        if self.layout is not None and self.layout not in ROPE_LAYOUTS:
            _fail(k, "layout", self.layout, ", ".join(ROPE_LAYOUTS))
        _check_positive(k, "rope_theta", self.rope_theta, allow_none=True)
        prf = self.partial_rotary_factor
        if prf is not None and (isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1):
            _fail(k, "partial_rotary_factor", prf, "a number in (0, 1]")
        given = {name for name in self.scaling_parameters()}
        extra = given - _ROPE_TYPE_PARAMS[self.rope_type]
        if extra:
            _fail(k, sorted(extra)[0], getattr(self, sorted(extra)[0]),
                  f"only {sorted(_ROPE_TYPE_PARAMS[self.rope_type]) or 'no scaling parameters'} for rope_type={self.rope_type!r}")
        missing = _ROPE_REQUIRED.get(self.rope_type, set()) - given
        if missing:
            _fail(k, sorted(missing)[0], None, f"a value (required by rope_type={self.rope_type!r})")
        if self.factor is not None:
            _check_positive(k, "factor", self.factor)
            if self.rope_type in ("linear", "dynamic", "yarn", "llama3") and self.factor < 1:
                _fail(k, "factor", self.factor, "a number >= 1")
        _check_positive(k, "original_max_position_embeddings", self.original_max_position_embeddings,
                        integer=True, allow_none=True)
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                     "low_freq_factor", "high_freq_factor"):
            _check_positive(k, name, getattr(self, name), allow_none=True)
        if self.beta_fast is not None and self.beta_slow is not None and self.beta_fast < self.beta_slow:
            _fail(k, "beta_fast", self.beta_fast, f"a number >= beta_slow ({self.beta_slow})")
        if (self.low_freq_factor is not None and self.high_freq_factor is not None
                and self.high_freq_factor <= self.low_freq_factor):
            _fail(k, "high_freq_factor", self.high_freq_factor, f"a number > low_freq_factor ({self.low_freq_factor})")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
                    _fail(k, name, value, "a list of positive numbers (one per rotary frequency)")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.truncate is not None and not isinstance(self.truncate, bool):
            _fail(k, "truncate", self.truncate, "True or False")

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


@dataclass(frozen=True)
class NopeConfig(PosEncConfig):
    """No positional encoding (Kazemnejad et al. 2023, https://arxiv.org/abs/2305.19466).

    Causal attention alone carries order. On an encoder the model becomes permutation-invariant.
    """

    kind: str = "nope"
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AlibiConfig(PosEncConfig):
    """ALiBi: linear attention biases (Press et al. 2022, https://arxiv.org/abs/2108.12409).

    Head ``h`` adds ``-m_h * |i - j|`` to its scores. Slopes are the paper's geometric sequence
    ``2^(-max_bias/n * (h+1))`` for ``n`` heads (for a non-power-of-two ``n``, the sequence of the
    closest lower power of two followed by every other slope of the next one). Encoders use the
    symmetric distance.

    Args:
        max_bias: The paper's 8: the exponent range of the slopes.
    """

    kind: str = "alibi"
    max_bias: float = 8.0
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        _check_positive(self.kind, "max_bias", self.max_bias)


@dataclass(frozen=True)
class T5BiasConfig(PosEncConfig):
    """T5-style bucketed relative position bias (Raffel et al. 2020, https://arxiv.org/abs/1910.10683).

    A learned scalar per (bucket, head) is added to the scores. Buckets are exact for small distances
    and logarithmic up to ``max_distance``. Decoders bucket ``max(i - j, 0)``; encoders bucket the signed
    distance with half the buckets per direction. The table starts at zero, so a fresh layer is a no-op.
    One table per converted layer.

    Args:
        num_buckets: Number of buckets (>= 2; even on encoders).
        max_distance: Distance from which all pairs share the last bucket.
    """

    kind: str = "t5_bias"
    num_buckets: int = 32
    max_distance: int = 128
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        _check_positive(self.kind, "num_buckets", self.num_buckets, integer=True)
        _check_positive(self.kind, "max_distance", self.max_distance, integer=True)
        if self.num_buckets < 4:
            _fail(self.kind, "num_buckets", self.num_buckets, "an integer >= 4")
        if self.max_distance <= self.num_buckets // 2:
            _fail(self.kind, "max_distance", self.max_distance, f"an integer > num_buckets // 2 ({self.num_buckets // 2})")


@dataclass(frozen=True)
class CopeConfig(PosEncConfig):
    """Contextual position encoding (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719).

    Positions are counted by gates ``sigmoid(q_i . k_j * scale)`` summed from key ``j`` to query ``i``
    (fp32); the position term interpolates ``q_i @ E`` between the integer positions around it. As in
    the paper's listing, the position term is added unscaled to the scaled logits. ``E`` starts at zero,
    so a fresh CoPE layer is plain (NoPE) attention. Causal models only.

    Args:
        npos_max: Number of integer positions (positions are clamped to ``npos_max - 1``).
        block_size: Query rows processed together (bounds peak memory; does not change results).
    """

    kind: str = "cope"
    npos_max: int = 64
    block_size: int = 512
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        _check_positive(self.kind, "npos_max", self.npos_max, integer=True)
        _check_positive(self.kind, "block_size", self.block_size, integer=True)
        if self.npos_max < 2:
            _fail(self.kind, "npos_max", self.npos_max, "an integer >= 2")


# --- Issue 10: training-free RoPE extensions (self_extend, rerope); registry entries to come -------------
def _check_all_layers(kind: str, layers) -> None:
    if layers is not None:
        _fail(kind, "layers", layers, "None (the extension applies to every RoPE layer; a layer left out would "
              "lose RoPE, not keep it)")


@dataclass(frozen=True)
class SelfExtendConfig(PosEncConfig):
    """Self-Extend (Jin et al. 2024, https://arxiv.org/abs/2401.01325), training-free, on the model's own RoPE.

    Keys at distance ``i - j < neighbor_window`` keep it; farther keys get the grouped distance
    ``floor(i/G) - floor(j/G) + W - floor(W/G)``. A model pretrained on ``L`` positions sees only seen
    distances up to ``(L - W) * G + W`` tokens. Causal RoPE models only.

    Args:
        group_size: ``G`` (>= 1; 1 is plain RoPE).
        neighbor_window: ``W`` (>= 1).
    """

    kind: str = "self_extend"
    group_size: int = 4
    neighbor_window: int = 1024
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        _check_positive(self.kind, "group_size", self.group_size, integer=True)
        _check_positive(self.kind, "neighbor_window", self.neighbor_window, integer=True)
        _check_all_layers(self.kind, self.layers)


@dataclass(frozen=True)
class ReRopeConfig(PosEncConfig):
    """ReRoPE / Leaky ReRoPE (Su 2023, https://kexue.fm/archives/9708), training-free, on the model's own RoPE.

    Distances below ``window`` are exact; beyond it they are ``window`` (ReRoPE), or
    ``window + (i - j - window) / leak`` (Leaky ReRoPE). Causal RoPE models only.

    Args:
        window: ``w`` (>= 1).
        leak: ``k`` of Leaky ReRoPE (> 1; 1 would be plain RoPE), or None for ReRoPE.
    """

    kind: str = "rerope"
    window: int = 512
    leak: float | None = None
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        _check_positive(self.kind, "window", self.window, integer=True)
        _check_positive(self.kind, "leak", self.leak, allow_none=True)
        if self.leak is not None and self.leak <= 1:
            _fail(self.kind, "leak", self.leak, "None (ReRoPE) or a number > 1 (Leaky ReRoPE)")
        _check_all_layers(self.kind, self.layers)


#: Kinds that rotate the model's own RoPE at two position sets (need RoPE and causality).
ROPE_EXTENSION_KINDS = ("self_extend", "rerope")
# --- end issue 10 ---------------------------------------------------------------------------------------


KINDS = tuple(PosEncConfig._registry)
