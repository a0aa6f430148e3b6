"""FlexAttention kernels (``torch.nn.attention.flex_attention``): a bias encoding as a ``score_mod``, the keys
each query may see as a ``BlockMask``, and Self-Extend/ReRoPE as two masked passes merged by log-sum-exp.

* ``flex``: the unfused path, exact on any device, forward and backward. On CPU PyTorch's public function
  refuses inputs that require a gradient, so a call that needs one runs its higher-order operator directly,
  whose eager autograd is the reference implementation (:func:`run_flex`). Under an outer
  ``torch.compile`` this is the public function, which the compiler fuses.
* ``flex_compiled``: the public function wrapped in ``torch.compile`` (the fused kernel: on CUDA forward and
  backward; on CPU forward only, no gradient).
* ``two_position_flex``: RoPE at two position sets (Self-Extend, ReRoPE) as a near pass and a far pass, each
  masked to its own keys and returning its log-sum-exp, merged exactly (see
  :mod:`hf_posenc.kernels.two_position` for the merge).

The bias of a layer reaches ``score_mod`` through :func:`score_mod_of`: a position module that defines
``flex_score_mod(q_pos, k_pos, causal, heads)`` gives its own; otherwise a ``diagonal``/``banded`` bias is read once
per diagonal (``bias_diagonals``), a row bias built from the call by the module's ``row_score_mod`` (FoX's per-key
gate terms, FIRE's MLP of the normalised distance), and a ``dense`` one from its whole
``[1, H, q, kv]`` bias. The values are
tensors passed to ``score_mod`` as arguments (``score_mod_other_buffers``), so a learned table's gradient
flows back through them.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_operator
from torch.nn.attention import flex_attention as fa

from ..positions import allowed_keys
from .call import Call, Heads, own_heads
from .dense import expand_kv, prepared
from .two_position import decode_step, is_decode_step, rotated_copies

#: ``score_mod(score, b, h, q_idx, kv_idx, *buffers) -> score``, with the tensors it reads.
ScoreMod = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


# ---------------------------------------------------------------------------------------------------
# score_mod and block mask
# ---------------------------------------------------------------------------------------------------
def _add_diagonal(score, b, h, q_idx, kv_idx, diagonals, last_key):
    # diagonals [H, q + kv - 1]: entry t is the diagonal q_idx - kv_idx = t - (kv - 1).
    return score + diagonals[h, q_idx - kv_idx + last_key]


def _add_dense(score, b, h, q_idx, kv_idx, bias):
    return score + bias[0, h, q_idx, kv_idx]  # bias [1, H, q, kv]


def score_mod_of(posenc, capabilities, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
                 heads: Heads | None = None, call: Call | None = None,
                 allowed: torch.Tensor | None = None) -> ScoreMod | None:
    """The layer's bias as a ``score_mod`` and the tensors it reads (None: the layer adds no bias).

    Args:
        posenc, capabilities: The layer's position module and its registry capabilities.
        q_pos, k_pos: Consecutive query ``[q]`` and key ``[kv]`` positions.
        causal: The layer is causal.
        heads: The query heads this call holds (sequence parallelism; None: all): ``score_mod`` indexes the
            bias by the call's local head index.
        call, allowed: The attention call and the bool ``[B|1, 1, q, kv]`` keys each query sees (None: all, or
            plain causality), for a row bias built from them (``bias_form="rows"``: the module's
            ``row_score_mod(call, allowed)``; FoX reads the keys, FIRE the mask).
    """
    if capabilities.route != "bias":
        return None
    if capabilities.bias_form == "rows":  # built from the call: its keys (FoX), its mask (FIRE)
        return posenc.row_score_mod(call, allowed)
    own = getattr(posenc, "flex_score_mod", None)
    if own is not None:
        return own(q_pos, k_pos, causal, heads)
    if capabilities.bias_form in ("diagonal", "banded"):
        diagonals = own_heads(heads, posenc.bias_diagonals(q_pos, k_pos, causal).float())  # [H, q + kv - 1]
        last_key = torch.tensor(k_pos.shape[0] - 1, device=diagonals.device)
        return _add_diagonal, (diagonals, last_key)
    return _add_dense, (own_heads(heads, posenc.bias(q_pos, k_pos, causal).float(), dim=1),)


def block_mask_of(allowed: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
                  batch: int):
    """A ``BlockMask`` of the keys each query may see (None: every key).

    Args:
        allowed: Bool ``[B|1, 1, q, kv]`` (transformers' causal, sliding-window, padding and packed-sequence
            masks, already combined), or None for plain causality from the positions.
        q_pos, k_pos: Query ``[q]`` and key ``[kv]`` positions.
        causal: The layer is causal.
        batch: The batch size of q/k/v.
    """
    q_len, kv_len = q_pos.shape[0], k_pos.shape[0]
    if allowed is None:
        if not causal:
            return None
        offset = q_pos[0] - k_pos[0]  # row r sees key j iff j <= r + offset

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return fa.create_block_mask(mask_mod, None, None, q_len, kv_len, device=q_pos.device,
                                    _compile=_compile_masks(q_pos.device))
    shared = allowed.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[0 if shared else b, 0, q_idx, kv_idx]

    return fa.create_block_mask(mask_mod, None if shared else batch, None, q_len, kv_len, device=q_pos.device,
                                _compile=_compile_masks(q_pos.device))


def _compile_masks(device: torch.device) -> bool:
    """Build block masks with a compiled mask_mod on accelerators: the plain build evaluates it on the whole
    ``[q, kv]`` grid at once (bytes per pair), which long GPU contexts cannot hold."""
    return device.type != "cpu" and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------------
# Running flex: compiled, public, or the reference operator
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _compiled_flex():
    return torch.compile(fa.flex_attention)


def _bound(mod: ScoreMod | None):
    """``score_mod`` with its tensors closed over (the public function's signature), or None."""
    if mod is None:
        return None
    function, buffers = mod

    def score_mod(score, b, h, q_idx, kv_idx):
        return function(score, b, h, q_idx, kv_idx, *buffers)

    return score_mod


def _needs_gradient(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_flex(query, key, value, mod: ScoreMod | None, block_mask, scale: float, compiled: bool = False,
             return_lse: bool = False):
    """FlexAttention on ``[B, H, q, D]`` queries and ``[B, Hkv, kv, D]`` keys/values.

    Returns:
        ``[B, H, q, D]``, and the row log-sum-exp ``[B, H, q]`` fp32 (natural log) when ``return_lse``.
    """
    buffers = mod[1] if mod is not None else ()
    gqa = key.shape[1] != query.shape[1]
    if compiled or torch.compiler.is_compiling() or query.device.type != "cpu" \
            or not _needs_gradient((query, key, value, *buffers)):
        function = _compiled_flex() if compiled and not torch.compiler.is_compiling() else fa.flex_attention
        aux = fa.AuxRequest(lse=True) if return_lse else None
        with warnings.catch_warnings():
            # The unfused path is chosen on purpose here (CPU, short or under an outer compile): not a mistake.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            result = function(query, key, value, score_mod=_bound(mod), block_mask=block_mask, scale=scale,
                              enable_gqa=gqa, return_aux=aux)
        return (result[0], result[1].lse) if return_lse else result
    return _reference(query, key, value, mod, block_mask, scale, return_lse)


def _reference(query, key, value, mod: ScoreMod | None, block_mask, scale, return_lse):
    """The flex operator's eager reference (forward and backward) on CPU tensors that require a gradient.

    ``flex_attention`` refuses them on CPU before it reaches the operator, whose eager autograd computes the
    same attention with explicit scores. Its backward of grouped heads is not the reduction over the group
    (it disagreed with explicit attention when tried): key/value heads are expanded first.
    """
    heads = query.shape[1]
    key, value = expand_kv(key, heads), expand_kv(value, heads)
    if block_mask is None:
        block_mask = fa.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, None, None, query.shape[2],
                                          key.shape[2], device=query.device)
    function, buffers = mod if mod is not None else (_identity, ())
    options = fa._apply_kernel_options(query, key, value, return_lse, None, None)
    out, lse, _ = flex_operator(query, key, value, function, block_mask.as_tuple(), scale, options, buffers, ())
    # The operator's unfused path reports the log-sum-exp in base 2 (the public function rescales it).
    return (out, lse * math.log(2.0)) if return_lse else out


def _identity(score, b, h, q_idx, kv_idx):
    return score


# ---------------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------------
def _flex_call(call: Call, compiled: bool) -> tuple[torch.Tensor, None]:
    query, key, value, allowed = prepared(call)
    mod = score_mod_of(call.posenc, call.capabilities, call.q_pos, call.k_pos, call.causal, call.heads, call,
                       allowed)
    block_mask = block_mask_of(allowed, call.q_pos, call.k_pos, call.causal, query.shape[0])
    return run_flex(query, key, value, mod, block_mask, call.scaling, compiled=compiled), None


def flex(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``flex``: unfused FlexAttention (see the module docstring). Returns ``(output [B, H, q, D], None)``."""
    return _flex_call(call, compiled=False)


def flex_compiled(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``flex_compiled``: ``torch.compile(flex_attention)``. Returns ``(output [B, H, q, D], None)``."""
    return _flex_call(call, compiled=True)


def two_position_flex(call: Call) -> tuple[torch.Tensor, None]:
    """Kernel ``two_position_flex``: near keys (distance ``< window``) and far keys in two flex passes, each with
    its row log-sum-exp, merged exactly; a decode step (one row, no gradient) is one SDPA call instead
    (:func:`~hf_posenc.kernels.two_position.decode_step`: no block masks built per step). Returns
    ``(output [B, H, q, D], None)``."""
    if is_decode_step(call):
        return decode_step(call), None
    q_near, k_near, q_far, k_far, value = rotated_copies(call)
    allowed = None
    if call.attention_mask is not None:
        allowed = allowed_keys(call.attention_mask, call.q_pos, call.k_pos, call.causal)  # [B|1, 1, q, kv]
    q_pos, k_pos, window = call.q_pos, call.k_pos, call.posenc.window
    shared = allowed is None or allowed.shape[0] == 1
    batch = None if shared else q_near.shape[0]

    def visible(b, q_idx, kv_idx):
        if allowed is None:
            return k_pos[kv_idx] <= q_pos[q_idx]
        return allowed[0 if shared else b, 0, q_idx, kv_idx]

    def near_mod(b, h, q_idx, kv_idx):
        return visible(b, q_idx, kv_idx) & (q_pos[q_idx] - k_pos[kv_idx] < window)

    def far_mod(b, h, q_idx, kv_idx):
        return visible(b, q_idx, kv_idx) & (q_pos[q_idx] - k_pos[kv_idx] >= window)

    q_len, kv_len, device = q_near.shape[2], k_near.shape[2], q_near.device
    compiled = device.type != "cpu"
    passes = []
    for q, k, mask_mod in ((q_near, k_near, near_mod), (q_far, k_far, far_mod)):
        block_mask = fa.create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device,
                                          _compile=_compile_masks(device))
        passes.append(run_flex(q, k, value, None, block_mask, call.scaling, compiled=compiled, return_lse=True))
    # A row with no key in a pass has lse -inf and output 0 there: clamped, its weight is finite (and 0 beside
    # a pass with keys), and a row with no key at all gets 0, not NaN.
    floor = torch.finfo(torch.float32).min
    acc = torch.promote_types(q_near.dtype, torch.float32)
    (out_near, lse_near), (out_far, lse_far) = ((out.to(acc), lse.to(acc).clamp(min=floor)) for out, lse in passes)
    total = torch.logaddexp(lse_near, lse_far)  # [B, H, q]
    merged = torch.exp(lse_near - total)[..., None] * out_near + torch.exp(lse_far - total)[..., None] * out_far
    return merged.to(q_near.dtype), None
