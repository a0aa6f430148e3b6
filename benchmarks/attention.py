"""Time and peak memory of every encoding against stock attention, side by side in one run.

Usage::

    python benchmarks/attention.py --quick --json results.json --markdown results.md
    python benchmarks/attention.py                      # full: T in 512, 1024, 2048, 4096
    python benchmarks/attention.py --from-json results.json --markdown table.md   # tables only
    python benchmarks/attention.py --fold-error 2048 8192 32768   # fp32 ALiBi vs an fp64 reference only

What is measured (``mode``), for ``stock_sdpa``, ``stock_eager``, ``rope``, ``rope_yarn``, ``nope``,
``alibi``, ``t5_bias``, ``cope``, ``cope_naive`` (the paper's formulation with full ``[B, H, T, T]``
tensors and gather interpolation, defined here as the baseline the fast path is judged against),
``self_extend`` (G=4, W=256), ``rerope`` (w=256), ``kerple`` / ``kerple_power`` (log / power kernel),
``contextual_rope`` (learned widths, u ~ N(0, 0.1)), ``fire`` (its bias per tile of query rows, kernel
``row_tiles``) and ``fox`` (forget gates on, RoPE kept; folded per key, kernel ``key_term_fold_cpu``):

* ``forward`` (no grad, eval) and ``forward_backward`` (train mode, loss.backward()) of a small Llama
  (``scope="model"``: d=256, 4 layers, 4 heads of 64, byte vocabulary) and of one attention call
  (``scope="attention"``: ``B=1, H=4, D=64``; the stock calls include stock RoPE, as the stock layer does).
* ``decode``: time per generated token with a KV cache after a prefill of ``T`` tokens (greedy, one token
  per step; the steps of all encodings interleaved).
* ``lora_train``: one LoRA training step (r=8 on q/k/v/o, AdamW; learned position tables trainable too),
  time per trained token.

Ratios are taken within one run: ``time_ratio_vs_sdpa`` divides by ``stock_sdpa`` of the same scope, mode
and T; ``peak_mem_ratio_vs_eager`` divides by ``stock_eager``'s peak. Times are medians over repetitions
that are interleaved across encodings (rep 1 of every encoding, then rep 2, ...), so drifting load on a
shared machine hits every encoding alike.

Peak memory: a ``TorchDispatchMode`` sees every tensor an ATen op returns (forward, backward and
recomputation alike, as CPU autograd runs on the calling thread) and tracks the bytes of every storage
created inside the measured region until Python frees it; the peak of that running sum is reported.
Inputs and parameters that existed before are not counted, so the number is the activation/workspace
memory the step needs. Memory is measured in a separate, untimed run (tracking slows dispatch).

CPU settings: by default the benchmark runs torch on one thread. On a shared machine an OpenMP
worker that the OS has descheduled makes every parallel op wait for it (a 2 MB fill measured 0.17 ms
on 1 thread and 12 ms on 2 threads under load here), which swamps ratios; ``--threads N`` on a quiet
machine.

Image models (``scope="vit_model"``: a ViT with d=256, 4 layers, 4 heads of 64, 16-pixel patches, read at
its training size; ``scope="vit_attention"``: one bidirectional attention call ``B=1, H=4, D=64``), for
``stock_sdpa``, ``stock_eager``, ``nope``, ``rope_2d_axial`` and ``rope_2d_mixed``, in ``forward`` and
``forward_backward``: ``T`` is the number of tokens, a ``g x g`` patch grid plus CLS (``--vision-grids``).

On Llama, ``rope`` and ``rope_yarn`` take hf_posenc's native route (stock ``rope_parameters``), so the
model scope shows that conversion costs nothing; the attention scope runs the plug-in's own rotation
(``RotaryPosition``) through ``hf_posenc_sdpa``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_posenc  # noqa: E402
from hf_posenc import PosEncConfig  # noqa: E402
from hf_posenc._hf import cache_kwargs  # noqa: E402
from hf_posenc.attention import posenc_sdpa_attention  # noqa: E402
from hf_posenc.encodings import AlibiBias, CoPE, RotaryPosition, T5Bias  # noqa: E402
from hf_posenc.encodings.contextual_rope import ContextualRope  # noqa: E402
from hf_posenc.encodings.fire import FireBias  # noqa: E402
from hf_posenc.encodings.fox import ForgetGate  # noqa: E402
from hf_posenc.encodings.kerple import KerpleBias  # noqa: E402
from hf_posenc.encodings.rerope import ReRoPE  # noqa: E402
from hf_posenc.encodings.rope_2d import Rope2D  # noqa: E402
from hf_posenc.encodings.self_extend import SelfExtend  # noqa: E402

ENCODINGS = ("stock_sdpa", "stock_eager", "rope", "rope_yarn", "nope", "alibi", "t5_bias", "cope", "cope_naive",
             "self_extend", "rerope", "kerple", "kerple_power", "contextual_rope", "fire", "fox")
POSENC = {
    "rope": dict(kind="rope"),
    "rope_yarn": dict(kind="rope", rope_type="yarn", factor=2.0),
    "nope": dict(kind="nope"),
    "alibi": dict(kind="alibi"),
    "t5_bias": dict(kind="t5_bias"),
    "cope": dict(kind="cope"),
    "cope_naive": dict(kind="cope"),
    # Windows shorter than every benchmarked T, so that both passes run (a window >= T is the near pass alone).
    "self_extend": dict(kind="self_extend", group_size=4, neighbor_window=256),
    "rerope": dict(kind="rerope", window=256),
    "kerple": dict(kind="kerple"),
    "kerple_power": dict(kind="kerple", kernel="power"),
    "contextual_rope": dict(kind="contextual_rope"),
    "fire": dict(kind="fire"),
    "fox": dict(kind="fox"),
}
MODES = ("forward", "forward_backward", "decode", "lora_train")
#: The image-model rows (scopes ``vit_model`` and ``vit_attention``), against stock ViT attention.
VISION_ENCODINGS = ("stock_sdpa", "stock_eager", "nope", "rope_2d_axial", "rope_2d_mixed")
VISION_POSENC = {
    "nope": dict(kind="nope"),
    "rope_2d_axial": dict(kind="rope_2d", variant="axial"),
    "rope_2d_mixed": dict(kind="rope_2d", variant="mixed"),
}
VISION_SCOPES = ("vit_model", "vit_attention")
#: The full-tensor baseline keeps ~10 [B, H, T, T] fp32 tensors per layer for backward: above this length
#: it would take several GB of a shared machine, so it is only run forward there.
NAIVE_MAX_TRAIN_T = 2048


# ---------------------------------------------------------------------------------------------------
# The naive CoPE baseline (full tensors)
# ---------------------------------------------------------------------------------------------------
class NaiveCoPE(CoPE):
    """CoPE exactly as the paper's listing computes it (Golovneva et al. 2024, arXiv 2405.18719, §3):
    full ``[B, H, q, kv]`` gates, a reverse cumsum, two gathers for the interpolation, autograd keeping
    every intermediate. The baseline that shows what the fast path gains."""

    def attend(self, query, key, value, allowed, scaling, return_weights=False, diagonal=None, softcap=None):
        if softcap is not None:
            raise ValueError("NaiveCoPE benchmarks CoPE without a soft-cap (pass softcap=None)")
        if allowed is None and diagonal is not None:
            rows = torch.arange(query.shape[2], device=query.device)
            allowed = (torch.arange(key.shape[2], device=query.device)[None] <= rows[:, None] + diagonal)[None, None]
        npos = self.pos_emb.shape[-1]
        logits = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, q, kv]
        gates = torch.sigmoid(logits)
        if allowed is not None:
            gates = gates.masked_fill(~allowed, 0.0)
        pos = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=npos - 1)
        floor = pos.floor()
        index = floor.long()
        z = torch.matmul(query, self.pos_emb)  # [B, H, q, npos]
        low = z.gather(-1, index)
        high = z.gather(-1, (index + 1).clamp(max=npos - 1))
        logits = logits + low + (pos - floor) * (high - low)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs, value), (probs if return_weights else None)


# ---------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    # torch keeps one Python object per live storage, so this fires when the bytes go.
                    weakref.finalize(storage, self._release, key)
        return out


def peak_memory(step) -> int:
    tracker = PeakMemory()
    with tracker:
        step()
    return tracker.peak


#: The clock of every timed step: wall time, or with ``--clock cpu`` this process's CPU time, which other jobs on a
#: shared machine inflate far less (the ratios are then CPU-time ratios; the timed work is single-process).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(step) -> float:
    start = clock()
    step()
    return clock() - start


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:  # the smoke test's size
        return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192)


def build_model(encoding: str, tiny: bool):
    """The same random weights for every encoding; learned position tables get small random values."""
    from transformers import AutoModelForCausalLM

    backend = "eager" if encoding == "stock_eager" else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config(tiny)), attn_implementation=backend)
    if encoding in POSENC:
        hf_posenc.convert(model, PosEncConfig(**POSENC[encoding]))
    if encoding == "cope_naive":
        for layer in model.model.layers:
            old = layer.self_attn.posenc
            layer.self_attn.posenc = NaiveCoPE(old.pos_emb.shape[0], old.npos_max, old.block_size)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".posenc." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def tokens(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def model_step(model, ids: torch.Tensor, mode: str):
    def forward():
        model.eval()
        with torch.no_grad():
            model(ids)

    def forward_backward():
        model.train()
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return forward if mode == "forward" else forward_backward


# ---------------------------------------------------------------------------------------------------
# One attention layer
# ---------------------------------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    """Stands in for an attention module: what the attention functions read from ``module``."""

    is_causal = True

    def __init__(self, posenc=None):
        super().__init__()
        if posenc is not None:
            self.posenc = posenc


def attention_step(encoding: str, batch: int, heads: int, length: int, dim: int, mode: str):
    """One attention call on fixed random q/k/v ``[B, H, T, D]`` (and RoPE where the encoding has it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    generator = torch.Generator().manual_seed(3)
    grad = mode == "forward_backward"
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator).requires_grad_(grad) for _ in range(3))
    position = torch.arange(length)[None]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.cat([position[..., None].float() * inv_freq] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    rope_params = {"rope_type": "default", "rope_theta": 10000.0}
    if encoding == "rope_yarn":
        rope_params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                       "original_max_position_embeddings": 8192}
    posenc = {
        "rope": lambda: RotaryPosition(rope_params, dim, 8192),
        "rope_yarn": lambda: RotaryPosition(rope_params, dim, 8192),
        "alibi": lambda: AlibiBias(heads),
        "t5_bias": lambda: T5Bias(heads),
        "cope": lambda: CoPE(dim),
        "cope_naive": lambda: NaiveCoPE(dim),
        "self_extend": lambda: SelfExtend(rope_params, dim, 8192, group_size=4, neighbor_window=256),
        "rerope": lambda: ReRoPE(rope_params, dim, 8192, window=256),
        "kerple": lambda: KerpleBias(heads),
        "kerple_power": lambda: KerpleBias(heads, "power"),
        "contextual_rope": lambda: ContextualRope(rope_params, dim, 8192, num_key_value_heads=heads),
        "fire": lambda: FireBias(heads),
        "fox": lambda: ForgetGate(heads, dim, RotaryPosition(rope_params, dim, 8192)),
    }.get(encoding, lambda: None)()
    if encoding == "contextual_rope":  # trained-looking widths, as build_model gives the model scope
        with torch.no_grad():
            posenc.width_direction.copy_(torch.randn(heads, dim, generator=generator) * 0.1)
    if encoding in ("fire", "fox"):  # a trained-looking MLP and forget gates on (a fresh FoX adds no bias)
        with torch.no_grad():
            for param in posenc.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            if encoding == "fox":
                posenc.gate_scale.fill_(1.0)
            else:
                posenc.c.fill_(0.1)
                posenc.threshold.fill_(512.0)
    layer = _Layer(posenc)
    if grad:
        layer.train()
    else:
        layer.eval()

    def run():
        with torch.set_grad_enabled(grad):
            if encoding in ("stock_sdpa", "stock_eager"):
                qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
                fn = sdpa_attention_forward if encoding == "stock_sdpa" else eager_attention_forward
                kwargs = {"is_causal": True} if encoding == "stock_sdpa" else {}
                mask = None
                if encoding == "stock_eager":
                    mask = torch.full((length, length), torch.finfo(q.dtype).min).triu(1)[None, None]
                layer.num_key_value_groups = 1
                out, _ = fn(layer, qr, kr, v, mask, scaling=dim ** -0.5, dropout=0.0, **kwargs)
            else:
                out, _ = posenc_sdpa_attention(layer, q, k, v, None, scaling=dim ** -0.5)
            if grad:
                out.sum().backward()
                for t in (q, k, v, *layer.parameters()):
                    t.grad = None

    return run


# ---------------------------------------------------------------------------------------------------
# Image models: a ViT, and one bidirectional attention call over a patch grid
# ---------------------------------------------------------------------------------------------------
def vit_config(grid: int, tiny: bool):
    """A ViT whose training size is a ``grid x grid`` patch grid (so stock reads it without interpolating)."""
    from transformers import ViTConfig

    patch = 4 if tiny else 16
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if tiny else \
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    return ViTConfig(**size, image_size=grid * patch, patch_size=patch, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0)


def build_vit(encoding: str, grid: int, tiny: bool):
    """The same random weights for every encoding."""
    from transformers import ViTModel

    torch.manual_seed(0)
    backend = "eager" if encoding == "stock_eager" else "sdpa"
    model = ViTModel._from_config(vit_config(grid, tiny), attn_implementation=backend)
    if encoding in VISION_POSENC:
        hf_posenc.convert(model, PosEncConfig(**VISION_POSENC[encoding]))
    return model


def vit_step(model, grid: int, mode: str, batch: int):
    config = model.config
    pixels = torch.randn(batch, 3, grid * config.patch_size, grid * config.patch_size,
                         generator=torch.Generator().manual_seed(2))

    def forward():
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels)

    def forward_backward():
        model.train()
        model(pixel_values=pixels).last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)

    return forward if mode == "forward" else forward_backward


def vit_attention_step(encoding: str, heads: int, grid: int, dim: int, mode: str):
    """One bidirectional attention call on fixed random q/k/v ``[1, H, grid^2 + 1, D]`` (CLS first)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.vit.modeling_vit import eager_attention_forward

    length = grid * grid + 1
    generator = torch.Generator().manual_seed(3)
    grad = mode == "forward_backward"
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator).requires_grad_(grad) for _ in range(3))
    layer = _Layer()
    layer.is_causal = False
    if encoding in VISION_POSENC and encoding != "nope":
        torch.manual_seed(0)
        layer.posenc = Rope2D(heads, dim, VISION_POSENC[encoding]["variant"],
                              base=100.0 if encoding == "rope_2d_axial" else 10.0)
    layer.train(grad)

    def run():
        with torch.set_grad_enabled(grad):
            if encoding in ("stock_sdpa", "stock_eager"):
                fn = sdpa_attention_forward if encoding == "stock_sdpa" else eager_attention_forward
                out, _ = fn(layer, q, k, v, None, scaling=dim ** -0.5, dropout=0.0)
            else:
                out, _ = posenc_sdpa_attention(layer, q, k, v, None, scaling=dim ** -0.5, posenc_grid=(grid, grid))
            if grad:
                out.sum().backward()
                for t in (q, k, v, *layer.parameters()):
                    t.grad = None

    return run


def vision_benchmark(args) -> list[dict]:
    """The image-model records (ratios added by the caller)."""
    records = []
    heads, dim = (2, 16) if args.tiny else (4, 64)
    for grid in args.vision_grids:
        length = grid * grid + 1
        models = {name: build_vit(name, grid, args.tiny) for name in VISION_ENCODINGS}
        for mode in ("forward", "forward_backward"):
            for scope in VISION_SCOPES:
                if scope == "vit_model":
                    steps = {e: vit_step(models[e], grid, mode, args.batch) for e in VISION_ENCODINGS}
                else:
                    steps = {e: vit_attention_step(e, heads, grid, dim, mode) for e in VISION_ENCODINGS}
                log(f"[{scope}] grid {grid}x{grid} (T={length}) {mode}: {', '.join(VISION_ENCODINGS)}")
                times = run_interleaved(steps, args.reps)
                for name in VISION_ENCODINGS:
                    records.append(record(name, length, mode, scope, times[name], peak_memory(steps[name]),
                                          grid=grid, batch=args.batch if scope == "vit_model" else 1))
                del steps
                gc.collect()
    return records


# ---------------------------------------------------------------------------------------------------
# ALiBi fold precision
# ---------------------------------------------------------------------------------------------------
#: Query rows the fold error is measured on: the first rows (largest folded magnitudes before the tiled fold),
#: a block in the middle and the last rows.
FOLD_ROWS = 128


def alibi_reference_rows(q, k, v, slopes, rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal ALiBi attention of query ``rows`` in fp64 from the paper's bias ``-m_h (i - j)``: ``[B, H, r, D]``."""
    q64, k64, v64 = q[:, :, rows].double(), k.double(), v.double()
    distance = (rows[:, None] - torch.arange(k.shape[2])[None, :]).double()  # [r, kv]
    scores = q64 @ k64.transpose(-1, -2) * scaling - slopes.double()[:, None, None] * distance
    scores = scores.masked_fill(distance < 0, float("-inf"))
    return torch.softmax(scores, -1) @ v64


def fold_error(lengths, heads: int = 4, dim: int = 64, eager_max_t: int = 8192) -> list[dict]:
    """Worst per-row relative error ``|o_i - r_i| / |r_i|`` of fp32 causal ALiBi against fp64.

    ``sdpa`` is hf_posenc_sdpa's fp32 causal ALiBi (the head-dimension fold on CPU); ``eager`` the explicit
    fp32 scores, measured up to ``eager_max_t`` (it holds ``[H, T, T]`` fp32 scores).
    """
    from hf_posenc.attention import posenc_eager_attention

    out = []
    scaling = dim ** -0.5
    for length in lengths:
        generator = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
        edge = min(FOLD_ROWS, length)
        rows = torch.cat([torch.arange(edge), torch.arange(length // 2, length // 2 + edge),
                          torch.arange(length - edge, length)])
        rows = rows[rows < length].unique()
        posenc = AlibiBias(heads)
        reference = alibi_reference_rows(q, k, v, posenc.slopes("cpu"), rows, scaling)
        paths = {"sdpa": posenc_sdpa_attention}
        if length <= eager_max_t:
            paths["eager"] = posenc_eager_attention
        for name, function in paths.items():
            layer = _Layer(posenc).eval()
            with torch.no_grad():
                start = time.perf_counter()
                got, _ = function(layer, q, k, v, None, scaling=scaling)
                seconds = time.perf_counter() - start
            got = got.transpose(1, 2)[:, :, rows].double()  # [B, H, r, D]
            error = ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
            out.append({"path": name, "T": length, "max_row_rel_error": error, "time_s": seconds})
            log(f"ALiBi fp32 {name} T={length}: worst row relative error {error:.3g} ({seconds:.2f} s)")
    return out


# ---------------------------------------------------------------------------------------------------
# Decode and LoRA
# ---------------------------------------------------------------------------------------------------
def decode_interleaved(models: dict, context: int, steps: int, vocab: int) -> dict[str, tuple[float, int]]:
    """Median seconds per generated token after a ``context``-token prefill, and one step's peak memory, for every
    model: each timed step visits every encoding in turn, so that load drifting on a shared machine hits every
    encoding alike. Returns ``{name: (seconds per token, peak bytes)}``."""
    from transformers import DynamicCache

    ids = tokens(1, context, vocab)
    state, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            cache = DynamicCache(config=model.config)
            out = model(ids, **cache_kwargs(model, cache), use_cache=True)
            state[name] = (cache, out.logits[:, -1:].argmax(-1))
        for rep in range(2 + steps):  # two warm-up steps: first calls pay one-off costs
            for name, model in models.items():
                cache, next_id = state[name]
                start = clock()
                out = model(next_id, **cache_kwargs(model, cache), use_cache=True)
                seconds = clock() - start
                state[name] = (cache, out.logits[:, -1:].argmax(-1))
                if rep >= 2:
                    times[name].append(seconds)
        result = {}
        for name, model in models.items():
            cache, next_id = state.pop(name)
            step = lambda m=model, i=next_id, c=cache: m(i, **cache_kwargs(m, c), use_cache=True)  # noqa: E731
            result[name] = (statistics.median(times[name]), peak_memory(step))
    return result


def lora_model(model):
    """Wrap a benchmark model (its last use) in LoRA, with an optimizer over the trainable parameters."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    for name, param in model.named_parameters():
        if ".posenc." in name:  # what modules_to_save=["posenc"] makes trainable
            param.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    return model, optimizer


def lora_step(model, optimizer, ids):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def add_ratios(records: list[dict]) -> None:
    """Fill ``time_ratio_vs_sdpa`` / ``peak_mem_ratio_vs_eager`` from records of the same scope/mode/T."""
    index = {(r["scope"], r["mode"], r["T"], r["encoding"]): r for r in records}
    for r in records:
        sdpa = index.get((r["scope"], r["mode"], r["T"], "stock_sdpa"))
        eager = index.get((r["scope"], r["mode"], r["T"], "stock_eager"))
        # Four significant digits, not four decimals: a small memory ratio (0.012969) must not become 0.013.
        r["time_ratio_vs_sdpa"] = float(f"{r['time_s'] / sdpa['time_s']:.4g}") if sdpa else None
        r["peak_mem_ratio_vs_eager"] = (float(f"{r['peak_mem_bytes'] / eager['peak_mem_bytes']:.4g}")
                                        if eager and eager["peak_mem_bytes"] else None)


def record(encoding, length, mode, scope, times, peak, **extra) -> dict:
    return {"encoding": encoding, "T": length, "mode": mode, "time_s": statistics.median(times),
            "peak_mem_bytes": int(peak), "scope": scope, "reps": len(times), "threads": torch.get_num_threads(),
            **extra}


def run_interleaved(steps: dict, reps: int) -> dict[str, list[float]]:
    """Warm every step once, then time ``reps`` rounds that visit every encoding in turn."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step))
    return times


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    encodings = args.encodings
    records: list[dict] = []
    config = model_config(args.tiny)
    vocab, heads = config.vocab_size, config.num_attention_heads
    dim = config.hidden_size // heads
    models = {name: build_model(name, args.tiny) for name in encodings}
    for length in args.lengths:
        for mode in ("forward", "forward_backward"):
            chosen = [e for e in encodings if not (e == "cope_naive" and mode == "forward_backward"
                                                   and length > NAIVE_MAX_TRAIN_T)]
            for scope in args.scopes:
                if scope == "model":
                    ids = tokens(args.batch, length, vocab)
                    steps = {e: model_step(models[e], ids, mode) for e in chosen}
                else:
                    steps = {e: attention_step(e, 1, heads, length, dim, mode) for e in chosen}
                log(f"[{scope}] T={length} {mode}: {', '.join(chosen)}")
                times = run_interleaved(steps, args.reps)
                for name in chosen:
                    records.append(record(name, length, mode, scope, times[name], peak_memory(steps[name]),
                                          batch=args.batch if scope == "model" else 1))
                del steps
                gc.collect()
    for context in args.decode_contexts:
        log(f"[model] decode after {context} tokens")
        measured = decode_interleaved({name: models[name] for name in encodings}, context, args.decode_steps, vocab)
        for name, (per_token, peak) in measured.items():
            records.append(record(name, context, "decode", "model", [per_token], peak, steps=args.decode_steps))
    if args.lora_length:
        log(f"[model] LoRA training at T={args.lora_length}")
        ids = tokens(args.batch, args.lora_length, vocab)
        steps = {}
        for name in encodings:
            if name == "cope_naive" and args.lora_length > NAIVE_MAX_TRAIN_T:
                continue
            steps[name] = lora_step(*lora_model(models.pop(name)), ids)
        times = run_interleaved(steps, args.reps)
        per_token = args.batch * args.lora_length
        for name, step in steps.items():
            records.append(record(name, args.lora_length, "lora_train", "model",
                                  [t / per_token for t in times[name]], peak_memory(step), batch=args.batch))
    records += vision_benchmark(args)
    add_ratios(records)
    return records


# ---------------------------------------------------------------------------------------------------
# README table
# ---------------------------------------------------------------------------------------------------
def markdown(records: list[dict]) -> str:
    """Tables of time ratios vs stock sdpa (and peak memory vs stock eager), one row per encoding."""
    lines = []
    groups = {}
    for r in records:
        groups.setdefault((r["scope"], r["mode"]), []).append(r)
    titles = {"forward": "forward", "forward_backward": "forward+backward", "decode": "decode (per token, T = context)",
              "lora_train": "LoRA training (per token)"}
    for (scope, mode), rows in groups.items():
        lengths = sorted({r["T"] for r in rows})
        by = {(r["encoding"], r["T"]): r for r in rows}
        lines.append(f"**{scope}, {titles[mode]}**: time / stock sdpa (peak memory / stock eager)\n")
        lines.append("| encoding | " + " | ".join(f"T={t}" for t in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for name in VISION_ENCODINGS if scope in VISION_SCOPES else ENCODINGS:
            cells = []
            for t in lengths:
                r = by.get((name, t))
                if r is None:
                    cells.append("—")
                    continue
                mem = r["peak_mem_ratio_vs_eager"]
                cells.append(f"{r['time_ratio_vs_sdpa']:.2f}x" + (f" ({mem:.2f})" if mem is not None else ""))
            if any(c != "—" for c in cells):
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        base = [by[("stock_sdpa", t)]["time_s"] for t in lengths if ("stock_sdpa", t) in by]
        unit = "s/token" if mode in ("decode", "lora_train") else "s"
        lines.append("\nstock sdpa: " + ", ".join(f"T={t}: {b:.3g} {unit}" for t, b in zip(lengths, base)) + "\n")
    return "\n".join(lines)


def targets(records: list[dict]) -> str:
    """Issues 5's and 22's targets checked against the model-scope records that are present (one line each)."""
    by = {(r["encoding"], r["T"], r["mode"]): r for r in records if r["scope"] == "model"}
    lines = ["| target | measured | met |", "|---|---|---|"]

    def add(name, value, limit, fmt="{:.2f}"):
        if value is not None:
            lines.append(f"| {name} (<= {limit:.3g}) | {fmt.format(value)} | {'yes' if value <= limit else 'no'} |")

    def ratio(enc, length, mode, key="time_ratio_vs_sdpa"):
        r = by.get((enc, length, mode))
        return r[key] if r else None

    lengths = sorted({t for (_, t, m) in by if m == "forward"})
    for enc in ("rope", "rope_yarn", "nope"):
        worst = [ratio(enc, t, m) for t in lengths for m in ("forward", "forward_backward") if ratio(enc, t, m)]
        add(f"{enc} vs stock, worst of fwd/fwd+bwd over T", max(worst) if worst else None, 1.03)
    for enc in ("alibi", "t5_bias"):
        add(f"{enc} forward vs sdpa, T=2048", ratio(enc, 2048, "forward"), 1.3)
        add(f"{enc} fwd+bwd vs sdpa, T=2048", ratio(enc, 2048, "forward_backward"), 1.4)
    cope, eager, naive = (by.get((e, 2048, "forward_backward")) for e in ("cope", "stock_eager", "cope_naive"))
    if cope and eager:
        add("cope fwd+bwd time / stock eager, T=2048", cope["time_s"] / eager["time_s"], 2.0)
        add("cope fwd+bwd peak memory / stock eager, T=2048", cope["peak_mem_bytes"] / eager["peak_mem_bytes"], 1.0)
    if cope and naive:
        add("cope / cope_naive peak memory, T=2048", cope["peak_mem_bytes"] / naive["peak_mem_bytes"], 1 / 3)
        add("cope / cope_naive time, T=2048", cope["time_s"] / naive["time_s"], 1.0)
    short, long = by.get(("cope", 1024, "decode")), by.get(("cope", 4096, "decode"))
    if short and long:
        add("cope decode per token, 4k / 1k context", long["time_s"] / short["time_s"], 5.0)
    for enc in ("self_extend", "rerope", "contextual_rope", "cope"):  # issue 22, item 6
        add(f"{enc} decode per token vs sdpa, 4k context", ratio(enc, 4096, "decode"), 1.3)
        add(f"{enc} fwd+bwd vs sdpa, T=4096", ratio(enc, 4096, "forward_backward"), 1.5 if enc == "cope" else 1.3)
    for (enc, length, mode), r in sorted(by.items()):
        if mode == "lora_train" and enc not in ("stock_sdpa", "stock_eager", "cope_naive"):
            limit = 2.0 if enc == "cope" else 1.1
            add(f"{enc} LoRA time per token vs sdpa, T={length}", r["time_ratio_vs_sdpa"], limit)
    plugin, contextual = (next((r for r in records if r["scope"] == "attention" and r["T"] == 2048
                                and r["mode"] == "forward_backward" and r["encoding"] == e), None)
                          for e in ("rope", "contextual_rope"))
    if plugin and contextual:  # issue 10: against the plug-in rotation it replaces (attention scope)
        add("contextual_rope / plug-in rope fwd+bwd time, attention, T=2048", contextual["time_s"] / plugin["time_s"],
            1.15)
        add("contextual_rope / plug-in rope fwd+bwd peak memory, attention, T=2048",
            contextual["peak_mem_bytes"] / plugin["peak_mem_bytes"], 1.05)
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {512, 2048}, fewer repetitions")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--markdown", type=Path, help="write the README tables here")
    parser.add_argument("--from-json", type=Path, help="only print/write the tables of an earlier --json file")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement (median)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    parser.add_argument("--scopes", nargs="+", default=["model", "attention"], choices=["model", "attention"])
    parser.add_argument("--vision-grids", type=int, nargs="*", default=[14, 28],
                        help="patch-grid sides of the image-model rows (T = side^2 + 1; none: skip them)")
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--decode-steps", type=int, help="generated tokens per decode measurement")
    parser.add_argument("--lora-length", type=int, default=512, help="LoRA training length (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer d=32 model (smoke tests)")
    parser.add_argument("--fold-error", type=int, nargs="+", metavar="T",
                        help="only measure fp32 ALiBi against fp64 at these lengths (e.g. 2048 8192 32768)")
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = [512, 2048] if args.quick else [512, 1024, 2048, 4096]
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.decode_steps is None:
        args.decode_steps = 8 if args.quick else 16
    return args


def main(argv=None) -> list[dict]:
    global clock
    args = parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.fold_error:
        torch.set_num_threads(args.threads)
        errors = fold_error(args.fold_error)
        if args.json:
            args.json.write_text(json.dumps(errors, indent=1))
        print("| path | " + " | ".join(f"T={t}" for t in args.fold_error) + " |")
        print("|---|" + "---|" * len(args.fold_error))
        for path in ("sdpa", "eager"):
            by = {e["T"]: e["max_row_rel_error"] for e in errors if e["path"] == path}
            print(f"| {path} | " + " | ".join(f"{by[t]:.2g}" if t in by else "—" for t in args.fold_error) + " |")
        return errors
    started = time.perf_counter()
    records = json.loads(args.from_json.read_text()) if args.from_json else benchmark(args)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(records, indent=1))
    table = markdown(records) + "\n**Targets (model scope; issues 5 and 22)**\n\n" + targets(records)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    return records


if __name__ == "__main__":
    main()
