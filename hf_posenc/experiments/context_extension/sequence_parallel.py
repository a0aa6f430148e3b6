"""Sequence parallelism in the recipes (``train.sp_size``): DeepSpeed Ulysses through Accelerate.

Ulysses (Jacobs et al. 2023, https://arxiv.org/abs/2309.14509; DeepSpeed's Arctic Long Sequence Training) lets
``sp_size`` processes share each window: each holds ``seq_len / sp_size`` tokens and attention exchanges q/k/v
all-to-all (:mod:`hf_posenc.parallel`). The recipes reach it through Accelerate's
``ParallelismConfig(sp_size=N, sp_backend="deepspeed")`` and the ``DeepSpeedPlugin`` of a DeepSpeed launch
(``recipes/accelerate/sequence_parallel.yaml``), and handle two of Accelerate's quirks here, without patching it:

* its sequence-parallel config accepts only stock attention names on construction, so the handler starts with
  ``sdpa`` and is given the model's own function (``hf_posenc_sdpa``, ...) once the model is converted
  (:func:`bind_attention`), before ``prepare`` registers Ulysses around it;
* without a GPU it counts one process per rank unless the gloo process state exists before the ``Accelerator``
  (:func:`hf_posenc.parallel.cpu_process_state`).

Batches: Accelerate wraps the prepared loader in DeepSpeed's ``UlyssesSPDataLoaderAdapter``, which gathers one
batch from each rank of a sequence-parallel group and hands them out one after the other, each cut along the
sequence, with ``position_ids`` and ``shift_labels`` (next tokens, ``-100`` at the end). So the loader's global
batch is ``sp_size`` optimizer steps (:func:`loader_batch_size`) and each rank's loss is its tokens' share of the
window's mean (:func:`sequence_parallel_loss`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from importlib.metadata import version as installed_version

import torch
from torch.nn import functional as F

from ... import parallel
from .config import TrainConfig

#: What a launch config may say about sequence parallelism (Accelerate reads it into ``ParallelismConfig``).
_LAUNCH_SP_SIZE = "PARALLELISM_CONFIG_SP_SIZE"


def enabled(cfg: TrainConfig) -> bool:
    """Whether the run shares each window between processes."""
    return cfg.sp_size > 1


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """``Accelerator`` arguments for ``train.sp_size`` (none when it is 1).

    Raises:
        ValueError: DeepSpeed is not installed, or the launch config asks for another size.
    """
    if not enabled(cfg):
        return {}
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"train.sp_size={cfg.sp_size} needs DeepSpeed: pip install 'hf_posenc[sp]'; "
                         "allowed without it: train.sp_size=1.")
    launched = os.environ.get(_LAUNCH_SP_SIZE)
    if launched is not None and int(launched) != cfg.sp_size:
        raise ValueError(f"the launch config sets parallelism_config_sp_size={launched} but train.sp_size="
                         f"{cfg.sp_size}; allowed: the same size, or none in the launch config (the recipe sets it).")
    from accelerate.parallelism_config import ParallelismConfig

    if "sp_size" not in inspect.signature(ParallelismConfig).parameters:
        raise ValueError(f"train.sp_size={cfg.sp_size} needs an accelerate with sequence parallelism "
                         "(ParallelismConfig(sp_size=...)): pip install -U accelerate; allowed here: train.sp_size=1.")
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    parallel.cpu_process_state()  # before the Accelerator: see the module docs
    # "sdpa" only to pass Accelerate's check of the name; bind_attention sets the model's own before prepare.
    handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa", sp_seq_length=cfg.seq_len,
                                              sp_seq_length_is_variable=False)
    return {"parallelism_config": ParallelismConfig(sp_size=cfg.sp_size, sp_backend="deepspeed", sp_handler=handler)}


def check_launch(accelerator, cfg: TrainConfig) -> None:
    """Refuse a launch that cannot share windows between ``train.sp_size`` processes.

    Raises:
        ValueError: Not a DeepSpeed launch, a process count that ``sp_size`` does not divide, or a global batch
            that the data-parallel groups cannot split.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(f"train.sp_size={cfg.sp_size} runs on DeepSpeed Ulysses, but this launch is "
                         f"{accelerator.distributed_type}; allowed: accelerate launch --config_file "
                         "recipes/accelerate/sequence_parallel.yaml ..., or train.sp_size=1.")
    if accelerator.num_processes % cfg.sp_size:
        raise ValueError(f"train.sp_size={cfg.sp_size} must divide the {accelerator.num_processes} processes of this "
                         f"launch; allowed: a divisor of {accelerator.num_processes}.")
    groups = accelerator.num_processes // cfg.sp_size
    if cfg.batch_size % groups:
        raise ValueError(f"train.batch_size={cfg.batch_size} is the global batch and must split evenly over the "
                         f"{groups} sequence-parallel groups of this launch; allowed: multiples of {groups}.")


def check_model(config, cfg: TrainConfig) -> None:
    """Refuse a model (its ``config``, loaded or not) whose heads cannot be shared by ``train.sp_size`` ranks.

    Raises:
        ValueError: The query heads do not divide by ``sp_size``, or the KV heads neither divide by it nor divide it.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % cfg.sp_size:
        raise ValueError(f"train.sp_size={cfg.sp_size} must divide the model's {heads} attention heads (each rank "
                         f"attends with heads / sp_size of them); allowed: a divisor of {heads}.")
    if kv_heads % cfg.sp_size and cfg.sp_size % kv_heads:
        raise ValueError(f"train.sp_size={cfg.sp_size} and the model's {kv_heads} key/value heads: one must divide "
                         "the other (fewer KV heads than ranks are repeated); allowed: a divisor or multiple of "
                         f"{kv_heads} that divides {heads}.")


def bind_attention(accelerator, model, cfg: TrainConfig) -> None:
    """Point Accelerate's Ulysses handler at the attention function the (converted) model runs and at this
    run's window length, and check it. Set before each ``prepare``: one launch may train several models in turn
    (the comparison's variants, each with its own ``train.seq_len``).

    Raises:
        ValueError: A parallel setting that would drop or corrupt the encoding
            (:func:`hf_posenc.parallel.check_parallelism`).
    """
    config = accelerator.parallelism_config
    if config is None or not config.sp_enabled:
        return
    config.sp_handler.sp_attn_implementation = parallel.attention_name(model)
    config.sp_handler.sp_seq_length = cfg.seq_len
    parallel.check_parallelism(model, config)



def loader_batch_size(cfg: TrainConfig) -> int:
    """The prepared loader's global batch: ``sp_size`` optimizer steps of ``train.batch_size`` windows each.

    Accelerate splits it over all processes; the Ulysses adapter then runs, one after the other, the batch of
    each rank of a group, so each optimizer step trains on ``train.batch_size`` windows in all.
    """
    return cfg.batch_size * cfg.sp_size


def batch_of(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``collate_fn`` under sequence parallelism: what the Ulysses adapter needs (``input_ids``, ``labels`` and
    the window's ``position_ids``, all ``[B, seq_len]``), before it cuts them along the sequence."""
    ids = torch.stack([window for (window,) in windows])
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}


def sequence_parallel_loss(model, batch: dict[str, torch.Tensor], gradient_scale: float) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole windows, and that mean for logging.

    Each rank holds ``seq_len / sp_size`` tokens; their summed loss over the valid tokens of the whole group is
    what this rank backpropagates, so the ranks' gradients add up to the full sequence's.

    Args:
        model: The prepared model.
        batch: The adapter's shard: ``input_ids``, ``position_ids``, ``shift_labels`` ``[B, seq_len / sp_size]``.
        gradient_scale: Factor on the backpropagated share (:func:`gradient_scale`).

    Returns:
        A scalar whose value is the group's mean loss and whose gradient is this rank's share times the scale.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # [B, t, V]
    labels = batch["shift_labels"].to(logits.device)  # [B, t]
    local = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    totals = torch.stack([local.detach(), (labels != -100).sum().to(local.dtype)])  # [loss sum, tokens]
    dist.all_reduce(totals, group=groups._get_sequence_parallel_group())
    share = local * gradient_scale / totals[1].clamp_min(1)
    # The value: the whole windows' mean (every rank logs the same); the gradient: this rank's share only.
    return share + (totals[0] / totals[1].clamp_min(1) - share.detach())


def gradient_scale(accelerator, cfg: TrainConfig) -> float:
    """What each rank's loss share is multiplied by so that DeepSpeed's reduced gradients equal one process's.

    ZeRO stages 0-2 average gradients over the data-parallel groups (``processes / sp_size``) after summing the
    ranks of a sequence-parallel group; ZeRO-3 on deepspeed < 0.20.2 averages over every rank, so the shares,
    which add up to the window's gradient, must be ``sp_size`` times larger there.
    """
    stage = accelerator.state.deepspeed_plugin.zero_stage
    if stage == 3 and _deepspeed_older_than("0.20.2"):
        return float(cfg.sp_size)
    return 1.0


def _deepspeed_older_than(version: str) -> bool:
    from packaging.version import Version

    return Version(installed_version("deepspeed")) < Version(version)
