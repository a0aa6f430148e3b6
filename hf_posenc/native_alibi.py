"""The plug-in ALiBi request that computes what a model's own ALiBi computes (Falcon's ``alibi=True``).

Falcon adds ``bf16(m_h) * j / sqrt(head_dim)`` to the scores of key ``j`` (``m_h``: the paper's slopes,
rounded to bfloat16 by the stock code); under causal attention that is the plug-in's ``-m'_h * (i - j)``
with ``m'_h = bf16(m_h) / sqrt(head_dim)``, up to a per-row constant that softmax ignores.

The stock code also rounds the product ``bf16(m_h) * j`` to bfloat16, which the plug-in's exact relative bias
does not reproduce. The two are equal (to fp32 rounding) where that product is exact: slopes that are powers of
two (up to 8 heads) and positions below 256. With 16 or more heads (the Falcon-RW checkpoints have 32 or more)
the slopes are not powers of two and the stock rounding moves a tiny random model's logits by ~5e-4 at 12 tokens
and ~5e-3 at 64 against the plug-in's.
"""

from __future__ import annotations

import logging
import math

import torch

from .architectures import ARCHITECTURES, architecture_of
from .encodings.alibi import AlibiConfig, alibi_slopes
from .model_shape import head_dim, num_heads

logger = logging.getLogger(__name__)


def native_alibi(model_or_config) -> AlibiConfig:
    """The ALiBi request equal to the model's own ALiBi: ``hf_posenc.convert(model, native_alibi(model))``
    keeps its logits, and the converted model then takes every plug-in feature (backends, kernels, layers).

    Exact where the stock code's bfloat16 product ``slope * position`` is exact (slopes that are powers of two,
    up to 8 heads, and positions below 256); otherwise the converted model computes ALiBi without that rounding,
    its logits move by ~1e-3 to 1e-2, and a warning says so (see the module docstring).

    Args:
        model_or_config: A model, or its config, whose own encoding is ALiBi (Falcon with ``alibi=True``).

    Returns:
        ``AlibiConfig`` with the model's effective slopes (recorded in the converted model's config).

    Raises:
        ValueError: The model's own encoding is not ALiBi.
    """
    config = getattr(model_or_config, "config", model_or_config)
    native = architecture_of(config).native_alibi
    if native is None or not native.on(config):
        allowed = ", ".join(f"{name} with {row.native_alibi.config_flag}=True"
                            for name, row in ARCHITECTURES.items() if row.native_alibi is not None)
        raise ValueError(f"native_alibi needs a model whose own encoding is ALiBi; this {config.model_type!r} "
                         f"config has none; allowed: {allowed}.")
    # [H] fp32, rounded through the dtype the stock code computes them in.
    slopes = alibi_slopes(num_heads(config)).to(getattr(torch, native.slope_dtype)).float()
    if not torch.equal(torch.exp2(torch.log2(slopes).round()), slopes):
        logger.warning("native_alibi: %d heads give slopes that are not powers of two, so the stock %s rounds "
                       "slope x position to %s and the plug-in's exact ALiBi does not: the converted model's logits "
                       "differ from the stock model's by ~1e-3 (tens of tokens) to ~1e-2 (hundreds); exact up to 8 "
                       "heads.", slopes.numel(), config.model_type, native.slope_dtype)
    if native.head_dim_scaled:
        slopes = slopes / math.sqrt(head_dim(config))
    return AlibiConfig(slopes=tuple(slopes.tolist()))
