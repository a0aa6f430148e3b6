"""Sequence parallelism on DeepSpeed Ulysses: everything hf_posenc knows about DeepSpeed, in one place.

Ulysses (DeepSpeed's ``UlyssesSPAttentionHF``, Arctic Long Sequence Training) wraps a model's attention
function, registered under the same name: each rank holds ``T / P`` tokens, exchanges q/k/v all-to-all, and
calls the wrapped function with q/k/v ``[B, H / P, T, D]`` (the contiguous heads ``[r H / P, (r + 1) H / P)``
of rank ``r``; KV heads fewer than ranks are repeated first), ``attention_mask=None`` and the gathered
``position_ids``. The function is not told which heads it holds. Encodings with per-head parameters (ALiBi
slopes, T5 and KERPLE tables, contextual RoPE's directions) take their slice from :func:`head_slice`: the
rank in DeepSpeed's sequence-parallel group times the heads received.

DeepSpeed is detected, never imported here: if its sequence-parallel state module was never imported, no
Ulysses wrapper can be running.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .kernels.call import Heads

#: DeepSpeed's sequence-parallel state (Megatron-style ``mpu``), read only once something imported it.
_STATE_MODULE = "deepspeed.runtime.sequence_parallel.parallel_state_sp"


def _sequence_parallel_state():
    """DeepSpeed's sequence-parallel state module if its group is initialised, else None."""
    state = sys.modules.get(_STATE_MODULE)
    if state is None or getattr(state, "_SEQUENCE_PARALLEL_GROUP", None) is None:
        return None
    return state


def head_slice(local_heads: int, total_heads: int | None) -> Heads | None:
    """The query heads of the model that an attention call holds, or None when it holds them all.

    Args:
        local_heads: Query heads the call received (``query.shape[1]``).
        total_heads: Query heads of the layer (None: unknown).

    Raises:
        ValueError: Under sequence parallelism, the call holds neither all heads nor its rank's share.
    """
    if total_heads is not None and local_heads == total_heads:
        return None  # a plain call, or Ulysses bypassed (``disable_in_eval``)
    state = _sequence_parallel_state()
    if state is None:
        return None  # no Ulysses wrapper can be running
    size = state.get_sequence_parallel_world_size()
    if total_heads is not None and local_heads * size != total_heads:
        raise ValueError(f"hf_posenc: attention received {local_heads} of {total_heads} query heads under sequence "
                         f"parallelism of size {size}; allowed: {total_heads // size} (heads / ranks).")
    return Heads(start=state.get_sequence_parallel_rank() * local_heads, count=local_heads,
                 total=total_heads or local_heads * size)


def attention_name(model) -> str:
    """The name of the attention function the model runs (``config._attn_implementation``): the one
    sequence parallelism must wrap (an ``hf_posenc_*`` function, or the stock one of a model whose encoding
    is native: NoPE, stock RoPE scaling)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def check_ulysses(model, name: str) -> None:
    """Refuse to wrap an attention function that is not the one the model runs.

    Ulysses replaces the function registered under ``name`` process-wide; wrapping stock ``sdpa`` under a
    model converted to ``hf_posenc_sdpa`` would leave the model's function unwrapped (each rank attending
    over its own tokens only), or drop the encoding if the model were switched to stock ``sdpa``.

    Raises:
        ValueError: ``name`` is not the model's attention function (the message names the one to wrap).
    """
    current = attention_name(model)
    if name != current:
        raise ValueError(f"hf_posenc: sequence parallelism must wrap the model's attention {current!r}, not {name!r} "
                         f"(allowed: core_attn_implementation={current!r}, or hf_posenc.parallel.register_ulysses).")


def register_ulysses(model, sequence_parallel_size: int, micro_batch_size: int, **kwargs):
    """DeepSpeed Ulysses around the attention function the model runs (``register_with_transformers``).

    Args:
        model: A model (converted or not); its attention function is wrapped process-wide.
        sequence_parallel_size: Ranks that share one sequence (the heads must divide by it).
        micro_batch_size: Sequences per rank and step.
        **kwargs: Passed on (``seq_length``, ``seq_length_is_variable``, ``disable_in_eval``).

    Returns:
        DeepSpeed's sequence-parallel state (its ``mpu``), for ``deepspeed.initialize(mpu=...)``.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: PLC0415  # optional

    name = attention_name(model)
    check_ulysses(model, name)
    return UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=name, sequence_parallel_size=sequence_parallel_size,
        micro_batch_size=micro_batch_size, **kwargs)


@contextmanager
def ulysses_scope(model) -> Iterator[None]:
    """Undo, on exit, what registering Ulysses around ``model``'s attention did process-wide.

    Registration (:func:`register_ulysses`, or Accelerate's ``prepare``) replaces the model's attention function
    in transformers' registry by its wrapper and creates DeepSpeed's sequence-parallel groups; only a teardown of
    the whole process group clears them. A second registration in the same launch (the next model trained, e.g.
    the comparison's next variant) would wrap the wrapper, and DeepSpeed refuses a second set of groups. After
    the block the model attends with its plain function again (on every token, e.g. for evaluation).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = attention_name(model)
    function = ALL_ATTENTION_FUNCTIONS[name]
    try:
        yield
    finally:
        # Undo `ALL_ATTENTION_FUNCTIONS[name] = wrapper` with the same public mapping operation.
        ALL_ATTENTION_FUNCTIONS[name] = function
        state = sys.modules.get(_STATE_MODULE)
        if state is not None:
            # DeepSpeed's own release, which it runs when the whole process group is destroyed.
            state._release_sequence_parallel_groups()


def _routes(model) -> set[str | None]:
    """The routes (``registry.Capabilities.route``) of the encodings on the model's layers."""
    return {module.registry_entry().capabilities.route for module in model.modules()
            if hasattr(module, "registry_entry") and module is not model}


def _per_head(model) -> bool:
    """Whether an encoding on the model has per-head values (a bias, its own logits or learned tables)."""
    return any(module.registry_entry().capabilities.route in ("bias", "attend")
               or module.registry_entry().capabilities.tables
               for module in model.modules() if hasattr(module, "registry_entry") and module is not model)


def check_parallelism(model, parallelism_config) -> None:
    """Refuse an Accelerate ``ParallelismConfig`` that would drop or corrupt the model's encoding.

    * ``cp_size > 1`` (torch context parallelism, ring attention) runs SDPA only, without a bias, forced
      causal, on a shard of the sequence: it cannot run an encoding applied by an hf_posenc function.
    * ``tp_size > 1`` shards the heads without telling the attention function which it holds.
    * ``sp_size > 1`` on DeepSpeed must wrap the model's own attention function (:func:`check_ulysses`).

    Raises:
        ValueError: One line naming the alternative (sequence parallelism on DeepSpeed Ulysses).
    """
    if parallelism_config is None:
        return
    # Even a rotation: ring attention shards the sequence, and our functions take positions from the call.
    routes = _routes(model) - {None}
    if (getattr(parallelism_config, "cp_size", 1) or 1) > 1 and routes:
        raise ValueError(f"hf_posenc: context parallelism (cp_size) runs SDPA without a bias and cannot apply this "
                         f"encoding (route {sorted(routes)[0]!r}); use sequence parallelism instead: ParallelismConfig("
                         "sp_size=N, sp_backend='deepspeed') (hf_posenc.parallel.sequence_parallel_config).")
    if (getattr(parallelism_config, "tp_size", 1) or 1) > 1 and _per_head(model):
        raise ValueError("hf_posenc: tensor parallelism (tp_size) shards the heads without their offset, so per-head "
                         "position tables would be misread; use sequence parallelism instead: "
                         "ParallelismConfig(sp_size=N, sp_backend='deepspeed').")
    if (getattr(parallelism_config, "sp_size", 1) or 1) > 1:
        if getattr(parallelism_config, "sp_backend", "deepspeed") != "deepspeed":
            raise ValueError(f"hf_posenc: sequence parallelism backend {parallelism_config.sp_backend!r} is not "
                             "supported; allowed: sp_backend='deepspeed' (Ulysses).")
        handler = getattr(parallelism_config, "sp_handler", None)
        check_ulysses(model, getattr(handler, "sp_attn_implementation", None))


def sequence_parallel_config(model, sp_size: int, **handler_kwargs):
    """Accelerate's ``ParallelismConfig`` for DeepSpeed Ulysses over the model's own attention function.

    Accelerate's ``DeepSpeedSequenceParallelConfig`` accepts only stock attention names
    (``flash_attention_2/3``, ``sdpa``, hub kernels) on construction; the model's name (``hf_posenc_sdpa``) is
    set on ``sp_handler`` afterwards, which Accelerate then passes to ``register_with_transformers``.

    Args:
        model: The converted model.
        sp_size: Ranks that share one sequence.
        **handler_kwargs: Fields of ``DeepSpeedSequenceParallelConfig`` (``sp_seq_length_is_variable``, ...).

    Returns:
        ``accelerate.ParallelismConfig(sp_size=sp_size, sp_backend="deepspeed")`` with the handler set.
    """
    from accelerate.parallelism_config import ParallelismConfig  # noqa: PLC0415  # optional dependency
    from accelerate.utils import DeepSpeedSequenceParallelConfig  # noqa: PLC0415

    handler = DeepSpeedSequenceParallelConfig(**handler_kwargs)
    config = ParallelismConfig(sp_size=sp_size, sp_backend="deepspeed", sp_handler=handler)
    handler.sp_attn_implementation = attention_name(model)  # after construction: see the docstring
    check_parallelism(model, config)
    return config


def cpu_process_state() -> None:
    """Create Accelerate's process state on gloo before the ``Accelerator`` when there is no GPU.

    Without it, Accelerate on a CPU-only machine under DeepSpeed counts one process per rank (every rank
    believes it is alone) and sequence parallelism never exchanges anything.
    """
    import torch  # noqa: PLC0415
    from accelerate import PartialState  # noqa: PLC0415  # optional dependency

    if not torch.cuda.is_available():
        PartialState(backend="gloo")
