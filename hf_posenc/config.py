"""The typed, validated positional-encoding config: the base class and factory of every kind's config.

Each encoding family defines one frozen dataclass subclass next to its module (``hf_posenc/encodings/``),
tagged with an explicit ``kind`` and registered in :mod:`hf_posenc.registry`. ``PosEncConfig(kind=...)``
dispatches to the registered class, so callers never guess a variant from which keys are present. Every
invalid value raises ``ValueError`` naming the field and the allowed values (:func:`fail_field`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from . import registry
from .temperature import AttentionTemperature

#: Name of the key under which the encoding is recorded in a Hugging Face config.
CONFIG_KEY = "posenc"
#: Key recording, at conversion, whether the checkpoint is a stock one (a native RoPE variant written in
#: ``rope_parameters``) rather than one that needs hf_posenc's code. Beside :data:`CONFIG_KEY`, not in it:
#: ``config.posenc`` stays exactly :meth:`PosEncConfig.to_dict`, which older releases read strictly.
NATIVE_KEY = "posenc_native"


def fail_field(kind: str, field: str, value: Any, allowed: str) -> None:
    """Raise the ``ValueError`` every config uses: the kind, the field, its value and what is allowed."""
    raise ValueError(f"PosEncConfig(kind={kind!r}): invalid {field}={value!r}; allowed: {allowed}.")


def check_positive(kind: str, field: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    """:func:`fail_field` unless ``value`` is a positive finite number (an int if ``integer``)."""
    if value is None and allow_none:
        return
    numeric = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not numeric or not math.isfinite(value) or value <= 0:
        fail_field(kind, field, value, "a positive integer" if integer else "a positive finite number")


@dataclasses.dataclass(frozen=True)
class PosEncConfig:
    """Base class and factory of positional-encoding configs.

    ``PosEncConfig(kind="alibi")`` returns an :class:`~hf_posenc.AlibiConfig`, and so on for every kind of
    :mod:`hf_posenc.registry`.

    Args:
        kind: A registered kind (``hf_posenc.KINDS``: ``"rope"``, ``"nope"``, ``"alibi"``, ``"t5_bias"``,
            ``"cope"``, ...).
        **params: The parameters of that kind (see each subclass). ``layers`` (a list of layer indices,
            optional) applies the encoding to those layers only; the other layers get no positional
            encoding (NoPE), which expresses hybrid stacks such as "NoPE every 4th layer".
            ``attention_temperature`` (any kind, optional): a logit scale that grows with the query's position,
            ``{"type": "llama4", "floor_scale": ..., "attn_scale": ...}`` or ``{"type": "log_n", "length": L}``
            (:mod:`hf_posenc.temperature`).

    Raises:
        ValueError: Unknown kind, unknown parameter, or invalid value (the message names the field and
            the allowed values).
    """

    kind: ClassVar[str]
    #: Every kind's option (keyword-only, after each kind's own fields): see :mod:`hf_posenc.temperature`.
    attention_temperature: AttentionTemperature | None = dataclasses.field(default=None, kw_only=True)

    def __new__(cls, *args, kind: str | None = None, **params):
        if cls is not PosEncConfig:
            return object.__new__(cls)
        sub = registry.get(kind).config_class  # ValueError naming the registered kinds
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
            fail_field(type(self).kind, "kind", self.kind, repr(type(self).kind))
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, str | bytes) or not hasattr(layers, "__iter__"):
                fail_field(self.kind, "layers", layers, "None or a list of distinct non-negative layer indices")
            layers = tuple(layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                fail_field(self.kind, "layers", self.layers, "None or a non-empty list of non-negative layer indices")
            if len(set(layers)) != len(layers):
                fail_field(self.kind, "layers", self.layers, "distinct layer indices")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "attention_temperature", AttentionTemperature.parse(self.kind,
                                                                                     self.attention_temperature))

    def __post_init__(self) -> None:
        self._validate_common()
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    def is_base_within(self, length: int, trained_length: int) -> bool:
        """Whether a model converted to this encoding, without training, computes exactly what the unconverted
        RoPE model computes on sequences of up to ``length`` tokens (``trained_length``: the model's own
        context). Reports check such variants against the base (they must score its numbers there).
        Default: no such claim."""
        return False

    def needs_attention_function(self) -> bool:
        """Whether converted layers run our attention functions: the kind has a route (its registry entry), or an
        attention temperature scales the queries there."""
        return registry.get(self.kind).needs_attention_function or self.attention_temperature is not None

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
        # Left out when unset: a checkpoint without it stays readable by releases that read the dict strictly.
        temperature = out.pop("attention_temperature")
        if temperature is not None:
            out["attention_temperature"] = temperature.to_dict()
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PosEncConfig:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or "kind" not in data:
            raise ValueError(f"A positional-encoding dict needs a 'kind' key; got {data!r}.")
        return PosEncConfig(**data)
