"""Attention temperature: a logit scale that grows with the query's position, an option of every kind.

Two published forms, each a factor ``s(i)`` on the query at cache position ``i`` (0-based):

* ``llama4`` (Meta's Llama 4, ``attn_temperature_tuning`` in transformers' ``modeling_llama4``):
  ``s(i) = attn_scale * log(floor((i + 1) / floor_scale) + 1) + 1``; 1 below ``floor_scale - 1``.
* ``log_n`` (Qwen's LogN-scaling, Bai et al. 2023, https://arxiv.org/abs/2309.16609, §2.3 of the Qwen report,
  after Chiang & Cholak 2022, https://arxiv.org/abs/2202.12172): ``s(i) = log_L(i + 1)`` past the training
  length ``L`` and 1 within it, so the attention entropy stays near its level at ``L`` on longer inputs.

Both scale queries, not keys: a query's factor depends on its own position only, so a cached key never holds
a stale scale and cached decoding equals recomputing the sequence. On a kind that adds a bias to the logits
(ALiBi, T5, KERPLE, FIRE, FoX) the factor multiplies ``q . k`` and not the bias, as in the forms above, which
scale the query projection; a kind that reads the logits for its own use (CoPE's gates) reads them scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: The forms and the keys each accepts (``type`` and ``layers`` besides).
TYPES = {"llama4": ("floor_scale", "attn_scale"), "log_n": ("length",)}
#: Which layers take it: every converted attention layer, or those without a positional encoding (Llama 4 scales
#: its NoPE layers only).
LAYERS = ("all", "nope")
#: Llama 4's values (``Llama4TextConfig`` defaults).
LLAMA4_DEFAULTS = {"floor_scale": 8192, "attn_scale": 0.1}


def _fail(kind: str, value: Any, allowed: str) -> None:
    raise ValueError(f"PosEncConfig(kind={kind!r}): invalid attention_temperature={value!r}; allowed: {allowed}.")


@dataclass(frozen=True)
class AttentionTemperature:
    """A validated attention temperature (see the module docstring for the forms).

    Attributes:
        type: ``"llama4"`` or ``"log_n"``.
        floor_scale, attn_scale: ``llama4``'s parameters (Llama 4's defaults 8192 and 0.1 where not given).
        length: ``log_n``'s training length ``L`` (required: the length the model was trained at).
        layers: ``"all"`` (default) or ``"nope"``: only the layers without a positional encoding.
    """

    type: str
    floor_scale: float | None = None
    attn_scale: float | None = None
    length: int | None = None
    layers: str = "all"

    @classmethod
    def parse(cls, kind: str, value: Any) -> AttentionTemperature | None:
        """The temperature of a ``PosEncConfig(kind=kind, attention_temperature=value)`` (None: none).

        Raises:
            ValueError: One line naming the problem and the allowed values.
        """
        if value is None or isinstance(value, AttentionTemperature):
            return value
        forms = ", ".join(f"{{'type': {name!r}, {', '.join(repr(k) for k in keys)}}}" for name, keys in TYPES.items())
        if not isinstance(value, dict) or value.get("type") not in TYPES:
            _fail(kind, value, f"None or a dict {forms} (optional 'layers': 'all' or 'nope')")
        value = dict(value)
        form = value.pop("type")
        unknown = sorted(set(value) - set(TYPES[form]) - {"layers"})
        if unknown:
            _fail(kind, {unknown[0]: value[unknown[0]]}, f"keys {sorted(TYPES[form]) + ['layers']} for type {form!r}")
        if value.get("layers", "all") not in LAYERS:
            _fail(kind, {"layers": value["layers"]}, f"'layers': one of {list(LAYERS)}")
        if form == "llama4":
            value = {**LLAMA4_DEFAULTS, **value}
            for key in ("floor_scale", "attn_scale"):
                number = value[key]
                if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number) \
                        or number <= 0:
                    _fail(kind, {key: number}, f"{key!r}: a positive finite number")
        else:
            length = value.get("length")
            if isinstance(length, bool) or not isinstance(length, int) or length < 2:
                _fail(kind, {"length": length}, "'length': the training length, an integer >= 2 (required)")
        return cls(type=form, **value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved in ``config.posenc`` (only this form's keys)."""
        return {"type": self.type, **{key: getattr(self, key) for key in TYPES[self.type]}, "layers": self.layers}

    def applies(self, has_encoding: bool) -> bool:
        """Whether a converted layer with (or without) a positional encoding takes the temperature."""
        return self.layers == "all" or not has_encoding

    def factors(self, positions: torch.Tensor) -> torch.Tensor:
        """``s(i)`` for the cache positions ``[q]`` of the queries, fp32 ``[q]``."""
        count = positions.to(torch.float32) + 1.0  # i + 1
        if self.type == "llama4":
            return torch.log1p(torch.floor(count / self.floor_scale)) * self.attn_scale + 1.0
        return torch.clamp(torch.log(count) / math.log(self.length), min=1.0)

    def scale_queries(self, query: torch.Tensor, past, q_len: int) -> torch.Tensor:
        """``query [B, H, q, D]`` times the factor of each query's cache position (``past + 0 .. q - 1``), computed
        in fp32 and cast back as Llama 4 does."""
        positions = torch.arange(q_len, device=query.device) + past  # [q]
        return (query * self.factors(positions)[:, None]).to(query.dtype)

    def __str__(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.to_dict().items())
