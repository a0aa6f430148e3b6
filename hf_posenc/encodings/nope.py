"""NoPE: no positional encoding (Kazemnejad et al. 2023, https://arxiv.org/abs/2305.19466).

Nothing is attached to the attention layers: causal attention alone carries order. Conversion only
neutralises the model's own encoding, so NoPE runs on every stock backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import registry
from ..config import PosEncConfig


@dataclass(frozen=True)
class NopeConfig(PosEncConfig):
    """No positional encoding (Kazemnejad et al. 2023, https://arxiv.org/abs/2305.19466).

    Causal attention alone carries order. On an encoder the model becomes permutation-invariant.
    """

    kind: str = "nope"
    layers: tuple[int, ...] | None = None


registry.register(registry.Encoding(
    kind="nope",
    config_class=NopeConfig,
    module_class=None,
    build=None,
    capabilities=registry.Capabilities(),
    display_name="no positional encoding (NoPE)",
    paper="https://arxiv.org/abs/2305.19466",
    example=registry.Example(prefill_kernels=("sdpa", "sdpa")),
))
