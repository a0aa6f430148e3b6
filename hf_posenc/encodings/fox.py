"""FoX: the Forgetting Transformer (Lin et al. 2025, https://arxiv.org/abs/2503.02130).

Each head has a forget gate ``f_t`` in ``(0, 1]`` per token, and the logit of query ``i`` on key ``j <= i``
gains the log of the gates in between (paper §2)::

    D_ij = sum_{l = j+1 .. i} log f_l = F_i - F_j,    F = cumsum(log f)

The paper computes ``f_t = sigmoid(w . x_t + b)`` from the layer's input ``x_t``. Here the gate reads the
token's key (the layer's own projection of ``x_t``, after the model's key norm, before any rotation):
``f_t = sigmoid(w_h . k_t + b_h) ** a_h``. Two deliberate differences, and why:

* **Keys, not the hidden state.** The keys are what a KV cache keeps, so every call recomputes ``F`` over the
  keys it attends to: cache and no cache give the same bias with nothing stored beside the cache, and a
  sliding-window cache that dropped old keys shifts ``F`` by a constant per row, which the softmax ignores.
  The gate is then a function of ``W_k x_t``: the paper's gate restricted to the key projection's row space.
* **The exponent ``a_h >= 0``**, starting at 0. ``log f = a * logsigmoid(.)`` is exactly 0 at conversion,
  so a converted model is the model itself (bitwise: a layer whose ``a`` is all 0 adds no bias at all). A
  sigmoid alone is 1 only at ``+inf``; ``a`` learns first (its gradient is the paper's gate at ``w = 0``,
  a learned per-head ALiBi-like slope), then ``w`` and ``b``. ``a = 1`` is the paper's gate.

By default the model's own RoPE stays (FoX added to a pretrained model); ``rope="drop"`` removes it, as the
paper's FoX runs without positional embeddings. Causal models only: the bias follows the sequence order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import registry
from ..config import PosEncConfig, fail_field
from ..kernels.call import own_heads
from ..kernels.dense import expand_kv
from .base import PositionModule
from .rope import RotaryPosition

#: What becomes of the model's RoPE.
ROPE_CHOICES = ("keep", "drop")


def _non_negative(param: torch.Tensor) -> torch.Tensor:
    """``param`` floored at 0 in value, its gradient passed through (a head pushed below 0 still learns)."""
    return param + (param.clamp(min=0) - param).detach()


class ForgetGate(PositionModule):
    """FoX's data-dependent forget gate per head, with the model's RoPE kept or dropped.

    Args:
        num_heads: Query heads (one gate each).
        head_dim: Per-head dimension (the gate reads the key of the head's key/value group).
        rope: The model's rotation (kept), or None (dropped).
    """

    def __init__(self, num_heads: int, head_dim: int, rope: RotaryPosition | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.rope = rope
        # fp32 whatever the model dtype: a bf16 exponent would round the first steps away from 0.
        self.gate_weight = nn.Parameter(torch.zeros(num_heads, head_dim, dtype=torch.float32))  # [H, D]
        self.gate_bias = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))  # [H]
        self.gate_scale = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))  # [H]: the exponent a

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate_weight.zero_()
            self.gate_bias.zero_()
            self.gate_scale.zero_()

    def rotate(self, query, key, q_pos, k_pos, heads=None):
        """The model's RoPE when kept, else q/k unchanged."""
        return (query, key) if self.rope is None else self.rope.rotate(query, key, q_pos, k_pos, heads=heads)

    def log_forget(self, key: torch.Tensor, heads=None) -> torch.Tensor:
        """``log f`` of each key and head, ``[B, H, kv]`` fp32, from unrotated keys ``[B, Hkv, kv, D]``
        (``heads``: the query heads the call holds under sequence parallelism, None: all)."""
        weight, bias, scale = (own_heads(heads, t) for t in (self.gate_weight, self.gate_bias, self.gate_scale))
        with torch.autocast(key.device.type, enabled=False):  # fp32 like every bias
            key = expand_kv(key.float(), weight.shape[0])  # [B, H, kv, D]
            logits = torch.einsum("bhkd,hd->bhk", key, weight.float()) + bias.float()[:, None]
        return _non_negative(scale.float())[:, None] * F.logsigmoid(logits)

    def decay(self, key: torch.Tensor, q_index: torch.Tensor, heads=None) -> torch.Tensor:
        """``D[b, h, r, j] = F[q_index[r]] - F[j]``, ``[B, H, q, kv]`` fp32, for queries at key indices
        ``q_index`` ``[q]`` (a causal query's own key is in the keys it attends)."""
        cumulative = self.log_forget(key, heads).cumsum(-1)  # [B, H, kv]: F
        return cumulative[..., q_index, None] - cumulative[..., None, :]

    def identity(self) -> bool:
        """Whether this call may skip the bias: every exponent is 0 (no bias at all) and none is learning."""
        # At a = 0 there is exactly no bias, and the kernels can take the model's own path; but not while the
        # exponent trains, since its gradient (the paper's gate at w = 0) flows only through the bias.
        learning = torch.is_grad_enabled() and self.gate_scale.requires_grad
        return not learning and not torch.compiler.is_compiling() and not bool(self.gate_scale.detach().any())

    def key_terms(self, call) -> torch.Tensor | None:
        """``-F_j``, ``[B, H, kv]`` fp32, for the ``key_term_fold`` kernel: ``D_ij = F_i - F_j`` is this per-key
        term up to ``F_i``, a constant per query row that the softmax ignores. None as in :meth:`row_bias`."""
        if self.identity():
            return None
        return -self.log_forget(call.key, call.heads).cumsum(-1)

    def row_score_mod(self, call, allowed: torch.Tensor | None):
        """The bias as a FlexAttention ``score_mod``: the per-key terms of :meth:`key_terms` (the softmax ignores the
        row constant ``F_i``), ``score + t[b, h, kv_idx]``; their gradient reaches the gate through the buffer.
        None as in :meth:`row_bias`."""
        terms = self.key_terms(call)  # [B, H, kv] fp32
        return None if terms is None else (_add_key_terms, (terms.float(),))

    def row_bias(self, call, allowed: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, H, q, kv]`` fp32 bias of one attention call, or None while every exponent is 0 (the identity).

        Future keys get ``-D`` (positive); the causal mask removes them whatever their value.
        """
        if self.identity():
            return None
        kv_len = call.key.shape[2]
        q_index = (call.q_pos - call.k_pos[0]).clamp(0, kv_len - 1)  # [q]: each query's own key
        return self.decay(call.key, q_index, call.heads)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
        """Not defined without the keys: FoX's bias depends on them (``row_bias``)."""
        raise TypeError("FoX's bias depends on the keys of the call: the attention kernels call "
                        "row_bias(call, allowed).")

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, rope={'kept' if self.rope is not None else 'dropped'}"


@dataclass(frozen=True)
class FoxConfig(PosEncConfig):
    """FoX, the Forgetting Transformer (Lin et al. 2025, https://arxiv.org/abs/2503.02130).

    Each head's logit of query ``i`` on key ``j`` gains ``sum_{l=j+1..i} log f_l`` with a data-dependent forget
    gate ``f_l = sigmoid(w . k_l + b) ** a`` read from the keys (learned ``w``, ``b``, ``a >= 0`` per head and
    layer; PEFT: ``modules_to_save=["posenc"]``). ``a`` starts at 0: a converted model is the model itself.
    Causal models with RoPE only.

    Args:
        rope: ``"keep"`` the model's RoPE (default) or ``"drop"`` it (the paper's FoX has none).
    """

    kind: str = "fox"
    rope: str = "keep"
    layers: tuple[int, ...] | None = None

    def _validate(self) -> None:
        if self.rope not in ROPE_CHOICES:
            fail_field(self.kind, "rope", self.rope, f"one of {list(ROPE_CHOICES)}")


def _build(config: FoxConfig, layer: registry.LayerSpec) -> ForgetGate:
    rope = RotaryPosition.from_layer(layer) if config.rope == "keep" else None
    return ForgetGate(layer.num_heads, layer.head_dim, rope)


def _add_key_terms(score, b, h, q_idx, kv_idx, terms):
    return score + terms[b, h, kv_idx]  # terms [B, H, kv]


registry.register(registry.Encoding(
    kind="fox",
    config_class=FoxConfig,
    module_class=ForgetGate,
    build=_build,
    capabilities=registry.Capabilities(route="bias", bias_form="rows", kernels=("dense", "key_term_fold", "flex_rows"),
                                       rotates=True,
                                       extends_rope=True, causal_only=True,
                                       tables=("gate_weight", "gate_bias", "gate_scale")),
    display_name="FoX",
    paper="https://arxiv.org/abs/2503.02130",
    backends=registry.OWN_BACKENDS,
    causal_reason="its bias sums the forget gates of the tokens between key and query, in sequence order",
    # The exponent randomised positive, so that every head forgets and w, b get gradients.
    example=registry.Example(params={}, prefill_kernels=("key_term_fold_cpu", "sdpa"), positive_tables=("gate_scale",)),
))
