"""FIRE: functional interpolation for relative positions (Li et al. 2024, https://arxiv.org/abs/2310.04418).

Each layer adds to the scores of query ``i`` and key ``j`` one value per head (paper §3.2)::

    b(i, j) = f_theta( psi(i - j) / psi(max(L, i)) ),    psi(x) = log(c x + 1)

with ``c > 0`` and the threshold ``L`` learned, and ``f_theta`` a small MLP (one hidden ReLU layer, one
output per head). Dividing by ``psi(max(L, i))`` maps every distance a query sees into ``[0, 1]``
("progressive interpolation"), which is what makes FIRE read lengths it was not trained on.

What ``i`` is here: the farthest distance the query sees. For a causal query on full attention this is the
paper's ``i`` exactly (its farthest key is the first token), and it stays so for a left-padded row (pads are
keys it does not see, so padding changes nothing) and for any KV cache. On a sliding-window layer it is the
window; on an encoder, whose queries see keys on both sides, the distance is ``|i - j|`` and the normaliser
the farthest key on either side, which keeps the input in ``[0, 1]`` as the paper intends (its equations are
written for causal models).

The normaliser depends on the query's own reach, not on ``i - j`` alone, so the bias is not Toeplitz: it is
a ``[B|1, H, q, kv]`` bias per call (``bias_form="rows"``). Causal calls of more than one query compute it tile
by tile of query rows (kernel ``row_tiles``, :meth:`FireBias.tile_bias`), recomputed in backward, so that
neither the bias nor the MLP's ``[q, kv, width]`` hidden layer exists whole; decode steps, encoders and the
eager backend take the dense kernels. On the ``flex_attention`` backend and for CUDA prefills the bias is a
FlexAttention ``score_mod`` (:meth:`FireBias.row_score_mod`: the MLP unrolled per score, each query's normaliser
a buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PosEncConfig, check_positive
from ..kernels.call import own_heads
from ..positions import allowed_keys
from .base import PositionModule

#: Lower bounds that keep ``psi`` increasing and the normaliser positive (``psi(max(L, i)) >= log(1 + c)``).
C_MIN = 1e-4
THRESHOLD_MIN = 1.0


def _projected(param: torch.Tensor, low: float) -> torch.Tensor:
    """``param`` floored at ``low`` in value, its gradient passed through (as KERPLE's projection: a parameter
    pushed below its bound by one step still learns)."""
    return param + (param.clamp(min=low) - param).detach()


class FireBias(PositionModule):
    """FIRE's learned bias ``f_theta(psi(|i - j|) / psi(max(L, reach_i)))`` per head.

    The MLP's hidden layer starts as a fixed piecewise-linear basis on ``[0, 1]`` (``relu(x - t_k)`` with knots
    ``t_k`` evenly spaced) and its output weights at zero, so a freshly converted layer adds nothing (the NoPE
    model, as T5 bias starts) and the first gradient already reaches the output weights of every knot. The MLP
    has no output bias: a constant per head added to every key of a row cancels in the softmax. All parameters
    are fp32.

    Args:
        num_heads: Query heads (the MLP's outputs).
        width: Hidden units of the MLP (the paper's 32).
        init_c: Initial ``c`` of ``psi``.
        init_threshold: Initial threshold ``L``.
    """

    def __init__(self, num_heads: int, width: int = 32, init_c: float = 0.1, init_threshold: float = 512.0):
        super().__init__()
        self.num_heads = num_heads
        self.width = width
        self.init_c = init_c
        self.init_threshold = init_threshold
        self.hidden_weight = nn.Parameter(torch.empty(width, dtype=torch.float32))  # [width]
        self.hidden_bias = nn.Parameter(torch.empty(width, dtype=torch.float32))  # [width]
        self.output_weight = nn.Parameter(torch.empty(num_heads, width, dtype=torch.float32))  # [H, width]
        # [1], not 0-dim: DeepSpeed's engine broadcasts every parameter viewed as bytes at start-up, which a 0-dim
        # tensor cannot be ("self.dim() cannot be 0 to view Float as Byte"), so FIRE could not train under it.
        self.c = nn.Parameter(torch.empty(1, dtype=torch.float32))  # [1]
        self.threshold = nn.Parameter(torch.empty(1, dtype=torch.float32))  # [1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.hidden_weight.fill_(1.0)
            # Knots 0 .. (width - 1) / width: relu(x - t_k) is a basis of piecewise-linear functions on [0, 1].
            self.hidden_bias.copy_(-torch.arange(self.width, dtype=torch.float32) / self.width)
            self.output_weight.zero_()
            self.c.fill_(self.init_c)
            self.threshold.fill_(self.init_threshold)

    def normalised_distance(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                            allowed: torch.Tensor | None) -> torch.Tensor:
        """``psi(|i - j|) / psi(max(L, reach_i))``, ``[B|1, 1, q, kv]`` fp32.

        Args:
            q_pos, k_pos: Query ``[q]`` and key ``[kv]`` positions.
            allowed: Bool ``[B|1, 1, q, kv]``, the keys each query sees (None: all of them).
        """
        distance = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)[None, None]  # [1, 1, q, kv]
        visible = distance if allowed is None else distance.masked_fill(~allowed, 0)
        reach = visible.amax(-1, keepdim=True)  # [B|1, 1, q, 1]: farthest key each query sees
        c, normaliser = self._normaliser(reach)
        return torch.log1p(c * distance) / normaliser

    def _normaliser(self, reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c`` (projected) and ``psi(max(L, reach))`` for each query's farthest visible distance ``reach``."""
        c = _projected(self.c.float(), C_MIN)
        return c, torch.log1p(c * torch.maximum(reach, _projected(self.threshold.float(), THRESHOLD_MIN)))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``f_theta``: ``[B, 1, q, kv]`` inputs to ``[B, H, q, kv]`` fp32 biases."""
        # One [.., q, kv, W] tensor: the ReLU in place on the fused multiply-add (whose backward needs only its
        # inputs), the largest intermediate of FIRE's attention.
        hidden = torch.addcmul(self.hidden_bias.float(), x[..., None], self.hidden_weight.float()).relu_()
        with torch.autocast(x.device.type, enabled=False):  # fp32 like every bias, whatever the autocast dtype
            return torch.einsum("bxqkw,hw->bhqk", hidden, self.output_weight.float())  # [B, H, q, kv]

    def row_bias(self, call, allowed: torch.Tensor | None) -> torch.Tensor:
        """``[B|1, H, q, kv]`` fp32 bias of one attention call (``allowed`` as in :meth:`normalised_distance`;
        None on a causal call: plain causality)."""
        if allowed is None and call.causal:
            allowed = allowed_keys(None, call.q_pos, call.k_pos, True)
        return own_heads(call.heads, self.mlp(self.normalised_distance(call.q_pos, call.k_pos, allowed)), dim=1)

    def tile_bias(self, call, rows: slice, limit: int, allowed: torch.Tensor) -> torch.Tensor:
        """``[B|1, H, rows, limit]`` fp32 bias of query ``rows`` of a causal call on its first ``limit`` keys
        (the ``row_tiles`` kernel), ``allowed`` the bool ``[B|1, 1, rows, limit]`` keys they see: every key a
        causal row sees is among them, so its normaliser is the whole row's."""
        distance = self.normalised_distance(call.q_pos[rows], call.k_pos[:limit], allowed)
        return own_heads(call.heads, self.mlp(distance), dim=1)

    def row_score_mod(self, call, allowed: torch.Tensor | None):
        """The bias as a FlexAttention ``score_mod``: ``f_theta(psi(|i - j|) / psi(max(L, reach_i)))`` for each score,
        the MLP's hidden units unrolled, its parameters and each query's normaliser ``[B, q]`` as buffers (their
        gradients flow back through them); nothing of size ``[q, kv]`` beyond the mask's own reach. ``allowed``
        as in :meth:`row_bias`."""
        q_pos, k_pos = call.q_pos.to(torch.float32), call.k_pos.to(torch.float32)
        # Each query's farthest visible key from the first and last key it sees (no [q, kv] float tensor).
        if allowed is None:
            first, last = k_pos[:1], k_pos[-1:] if not call.causal else q_pos  # a causal query sees keys up to itself
            reach = torch.maximum(q_pos - first, last - q_pos)[None]  # [1, q]
        else:
            visible = allowed[:, 0].to(torch.uint8)  # [B|1, q, kv]
            first = k_pos[visible.argmax(-1)]  # [B|1, q]
            last = k_pos[visible.shape[-1] - 1 - visible.flip(-1).argmax(-1)]
            reach = torch.maximum(q_pos - first, last - q_pos).clamp(min=0)
            reach = torch.where(visible.any(-1), reach, 0.0)  # a row that sees no key (a pad): as the dense path
        c, normaliser = self._normaliser(reach)
        normaliser = normaliser.expand(call.query.shape[0], -1)  # [B, q]
        output_weight = own_heads(call.heads, self.output_weight.float())  # [H, width]
        return _fire_score_mod(self.width), (q_pos, k_pos, c, normaliser, self.hidden_weight.float(),
                                             self.hidden_bias.float(), output_weight)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """``[1, H, q, kv]`` bias of unpadded rows (every key of a causal query up to itself visible)."""
        allowed = allowed_keys(None, q_pos, k_pos, True) if causal else None
        return self.mlp(self.normalised_distance(q_pos, k_pos, allowed))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, width={self.width}"


def _fire_score_mod(width: int):
    """FIRE's ``score_mod`` for an MLP of ``width`` hidden units (see :meth:`FireBias.row_score_mod`)."""
    def score_mod(score, b, h, q_idx, kv_idx, q_pos, k_pos, c, normaliser, hidden_weight, hidden_bias, output_weight):
        x = torch.log1p(c[0] * (q_pos[q_idx] - k_pos[kv_idx]).abs()) / normaliser[b, q_idx]
        for unit in range(width):  # unrolled: one scalar expression per score, which flex fuses
            score = score + output_weight[h, unit] * torch.relu(hidden_weight[unit] * x + hidden_bias[unit])
        return score
    return score_mod


@dataclass(frozen=True)
class FireConfig(PosEncConfig):
    """FIRE (Li et al. 2024, https://arxiv.org/abs/2310.04418): a learned MLP of the log-normalised distance.

    ``b(i, j) = f_theta(log(c |i - j| + 1) / log(c max(L, i) + 1))`` per head and layer, with ``c``, ``L`` and
    the MLP learned (PEFT: ``modules_to_save=["posenc"]``). Replaces the model's encoding; a fresh layer adds
    nothing (the NoPE model). Encoders use ``|i - j|`` and the farthest key on either side.

    Args:
        width: Hidden units of the MLP.
        init_c: Initial ``c``.
        init_threshold: Initial threshold ``L`` (distances are normalised by at least ``log(c L + 1)``).
    """

    kind: str = "fire"
    width: int = 32
    init_c: float = 0.1
    init_threshold: float = 512.0
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        check_positive(self.kind, "width", self.width, integer=True)
        check_positive(self.kind, "init_c", self.init_c)
        check_positive(self.kind, "init_threshold", self.init_threshold)


registry.register(registry.Encoding(
    kind="fire",
    config_class=FireConfig,
    module_class=FireBias,
    build=lambda config, layer: FireBias(layer.num_heads, config.width, config.init_c, config.init_threshold),
    capabilities=registry.Capabilities(
        route="bias", bias_form="rows", kernels=("dense", "row_tiles", "flex_rows"),
        tables=("hidden_weight", "hidden_bias", "output_weight", "c", "threshold"),
    ),
    display_name="FIRE",
    paper="https://arxiv.org/abs/2310.04418",
    backends=registry.OWN_BACKENDS,
    encoder_note="symmetric",
    # A threshold inside the tests' lengths (off the integers: no tie in max(L, i)), so that both regimes run and
    # L gets a gradient worth comparing; c is kept positive. The
    # MLP's and L's gradients are sums over every (query, key) pair that cancel down to the variation along a
    # row (as KERPLE's), from scores rounded to 16 bits: wider tolerances than the shared ones (fp16 and bf16).
    example=registry.Example(params={"width": 8, "init_threshold": 6.0}, prefill_kernels=("row_tiles", "row_tiles"),
                             positive_tables=("c",), fixed_tables={"threshold": 6.5}, archs=("llama", "bert"),
                             grad_tol=0.06, bf16_table_grad_tol=0.25),
))
