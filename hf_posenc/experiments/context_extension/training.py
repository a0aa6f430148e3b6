"""LoRA fine-tuning under Accelerate: :func:`finetune_lora`, the one training step of both
``recipes/finetune_lora.py`` and the comparison.

Accelerate owns devices, mixed precision, gradient accumulation, distribution (DDP/FSDP/DeepSpeed
from the launch config) and checkpointing. ``train.batch_size`` is the *global* batch: Accelerate
splits each batch across the processes (``split_batches``), so a config trains on the same tokens,
with the same optimizer steps, whether it runs on one process or on eight. A run saves ``save_state`` checkpoints every
``train.checkpoint_every`` optimizer steps; a restarted run loads the newest complete one, skips the
batches it already consumed and continues, so no optimizer step is lost or repeated.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..._hf import quiet_checkpointing_deprecation
from ...peft_utils import POSENC_MODULE, lora_config, lora_target_modules
from . import sequence_parallel
from .config import LoraSettings, TrainConfig
from .data import training_windows

logger = logging.getLogger(__name__)

#: Fault injection for the resume test: the process SIGKILLs itself right after saving this step.
FAULT_ENV = "HF_POSENC_KILL_AFTER_STEP"
_DONE = "checkpoint_complete"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest checkpoint folder that finished saving (half-written ones are ignored)."""
    done = sorted(p.parent for p in ckpt_root.glob(f"step_*/{_DONE}"))
    return done[-1] if done else None


def _save_checkpoint(accelerator, ckpt_root: Path, step: int) -> None:
    folder = ckpt_root / f"step_{step:07d}"
    accelerator.save_state(str(folder))  # every rank takes part; the main one writes model/optimizer
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / _DONE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def make_accelerator(cfg: TrainConfig):
    """The ``Accelerator`` of a training run: global batches split across processes, checked.

    With ``train.sp_size > 1``, sequence parallelism on DeepSpeed Ulysses (:mod:`.sequence_parallel`).

    Raises:
        ValueError: ``train.batch_size`` is not a multiple of the number of processes (of sequence-parallel
            groups), or ``train.sp_size`` cannot run in this launch.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              **sequence_parallel.accelerator_kwargs(cfg))
    if sequence_parallel.enabled(cfg):
        sequence_parallel.check_launch(accelerator, cfg)
    elif cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is the global batch and must split evenly over the "
            f"{accelerator.num_processes} processes of this launch; allowed: multiples of {accelerator.num_processes}."
        )
    requested = requested_processes()
    if requested is not None and requested != accelerator.num_processes:
        message = (
            f"accelerate launch asked for {requested} processes, but this run has {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}). On a CPU-only machine a multi-process run needs "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`; `--cpu --num_processes N` "
            "starts one process. The token budget is global, so the results are the same; only the speed differs."
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    return accelerator


def requested_processes() -> int | None:
    """How many processes the ``accelerate launch`` that started this one asked for (None: unknown).

    Accelerate's single-process launcher does not tell its child what it was asked, so the launcher's
    command line is read (``--num_processes N``, or ``num_processes`` in its ``--config_file``).
    """
    try:
        import psutil

        parent = psutil.Process().parent()
        # `accelerate launch` is the parent of a single process and of each torch.distributed worker.
        argv = parent.cmdline() if parent is not None else []
    except Exception:  # no psutil, no permission: nothing to compare with
        return None
    launcher = " ".join(argv)  # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    if "accelerate" not in launcher or "launch" not in launcher:
        return None
    for index, part in enumerate(argv):
        if part.startswith("--num_processes="):
            return int(part.split("=", 1)[1])
        if part == "--num_processes" and index + 1 < len(argv):
            return int(argv[index + 1])
    if "--config_file" in argv:
        import yaml

        config = yaml.safe_load(Path(argv[argv.index("--config_file") + 1]).read_text()) or {}
        return config.get("num_processes")
    return None


def train(accelerator, model, windows: torch.Tensor, cfg: TrainConfig, ckpt_root: Path | None,
          progress: bool = True, desc: str = "finetune", on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Train ``model`` (a PEFT model) for ``cfg.steps`` optimizer steps on ``windows``.

    Args:
        accelerator: The ``accelerate.Accelerator`` of :func:`make_accelerator`.
        model: The model whose trainable parameters are optimised.
        windows: ``[N, seq_len]`` token windows, the same on every process; each global batch of
            ``cfg.batch_size`` windows is split across the processes.
        cfg: Steps, batch size, learning rate, checkpointing.
        ckpt_root: Where ``save_state`` checkpoints go (``None``: no checkpoints, no resume).
        progress: Show a progress bar on the main process.
        desc: Progress-bar label.
        on_step: Called as ``on_step(step, model)`` after every optimizer step (``step`` counts from 1;
            e.g. a recalibration curve's evaluation; it must leave the model in training mode).

    Returns:
        Statistics: ``train_tokens`` (over all processes), ``seconds``, ``final_loss``,
        ``resumed_from`` (step or 0), ``world_size``.
    """
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    started = time.time()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler is stepped by hand once per optimizer step (not prepared: a prepared scheduler
    # steps once per process) and registered so save_state/load_state carry it.
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    shared = sequence_parallel.enabled(cfg)  # each window shared by train.sp_size processes
    if shared:
        sequence_parallel.check_model(model.config, cfg)
        sequence_parallel.bind_attention(accelerator, model, cfg)
        per_batch = sequence_parallel.loader_batch_size(cfg)
        windows = _whole_batches(windows, per_batch)
        loader = DataLoader(TensorDataset(windows), batch_size=per_batch, shuffle=False, drop_last=True,
                            collate_fn=sequence_parallel.batch_of)
    else:
        loader = DataLoader(TensorDataset(windows), batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    scale = sequence_parallel.gradient_scale(accelerator, cfg) if shared else 1.0

    done_steps = 0
    resume_from = latest_checkpoint(ckpt_root) if (ckpt_root and cfg.resume) else None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        done_steps = json.loads((resume_from / _DONE).read_text())["step"]
        logger.info("resumed from %s (step %d)", resume_from, done_steps)
    if shared:  # Ulysses' adapter is no DataLoader: it is read past the steps already done
        batches = itertools.islice(loader, done_steps * cfg.grad_accum, None)
    else:
        batches = accelerator.skip_first_batches(loader, done_steps * cfg.grad_accum) if done_steps else loader

    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    bar = tqdm(total=cfg.steps, initial=done_steps, desc=desc, leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    losses: list[float] = []
    grad_norms: list[float] = []
    step = done_steps
    data_checksum = 0  # sum of the token ids this rank trained on (shows each rank got its own shard)
    for batch in batches:
        if step >= cfg.steps:
            break
        ids = batch["input_ids"] if shared else batch[0]
        data_checksum += int(ids.sum())
        with accelerator.accumulate(model):
            if shared:
                loss = sequence_parallel.sequence_parallel_loss(model, batch, scale)
            else:
                loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # before clipping (DeepSpeed: its own)
                if norm is not None:
                    grad_norms.append(float(norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        bar.update(1)
        if on_step is not None:
            on_step(step, model)
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = losses[-cfg.log_every * cfg.grad_accum :]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            logger.info("%s step %d/%d loss %.4f lr %.2e", desc, step, cfg.steps, sum(recent) / len(recent),
                        scheduler.get_last_lr()[0])
        if ckpt_root is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(accelerator, ckpt_root, step)
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)  # simulate a crash: nothing after this runs
    bar.close()
    if step < cfg.steps:
        raise RuntimeError(f"ran out of training windows after {step} of {cfg.steps} steps")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * windows.shape[1]  # global batch: all processes
    return {
        "train_tokens": tokens_per_step * cfg.steps,
        "steps": cfg.steps,
        "seconds": round(time.time() - started, 1),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "resumed_from": done_steps,
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "data_checksum": data_checksum,
        "sp_size": cfg.sp_size,
        "grad_norms": grad_norms,  # per optimizer step, before clipping
        # float64 sum of the trainable weights: equal on every rank iff gradients were synchronised.
        "param_checksum": float(sum(p.detach().double().sum() for p in params)),
    }


def _whole_batches(windows: torch.Tensor, per_batch: int) -> torch.Tensor:
    """``windows`` repeated at the end up to a multiple of ``per_batch`` (a loader batch under sequence
    parallelism is several steps; the loop stops at ``train.steps``, before the repeated ones)."""
    missing = -len(windows) % per_batch
    return torch.cat([windows, windows[:missing]]) if missing else windows


def finetune_lora(accelerator, model, tokenizer, texts: list[str], lora: LoraSettings, cfg: TrainConfig,
                  ckpt_root: Path | None, progress: bool = True, desc: str = "finetune",
                  on_step: Callable[[int, Any], None] | None = None):
    """Wrap ``model`` with LoRA and train it on windows of ``texts`` (or, with ``lora.full_attention``, train
    its attention projections in full: :func:`train_attention_only`; with ``lora.full_model``, every parameter).

    The adapter targets the architecture's attention projections (unless ``lora.target_modules`` is
    set) and trains, in full, the encoding's ``posenc`` tables whenever they have parameters (a fresh
    table has nothing for LoRA to adapt) and, with ``lora.train_embeddings_and_norms``, LongLoRA's
    embeddings and norms (:func:`hf_posenc.peft_utils.lora_config`).

    Args:
        accelerator: The ``accelerate.Accelerator`` of :func:`make_accelerator`.
        model: The converted base model (seed the RNG first: LoRA weights start random).
        tokenizer: Its tokenizer.
        texts: Training documents (:func:`hf_posenc.context_extension.data.load_texts`).
        lora: The ``lora:`` section.
        cfg: The ``train:`` section.
        ckpt_root: Checkpoint folder (resumed from when it holds one); None: no checkpoints.
        progress: Show a progress bar on the main process.
        desc: Progress-bar and log label.
        on_step: See :func:`train`.

    Returns:
        ``(peft_model, stats)``: the trained ``PeftModel``, unwrapped from Accelerate (save it with
        ``save_pretrained`` or merge it with ``merge_and_unload``), and the statistics of :func:`train`;
        with ``lora.full_attention`` or ``lora.full_model`` the trained model itself.
    """
    from peft import get_peft_model

    windows = training_windows(texts, tokenizer, cfg)
    if lora.trains_in_full:
        if lora.full_model:
            model.requires_grad_(True)
        else:
            train_attention_only(model, lora.target_modules)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("%s: %s in full, %d of %d parameters trainable", desc,
                    "every parameter" if lora.full_model else "attention", trainable,
                    sum(p.numel() for p in model.parameters()))
        stats = train(accelerator, model, windows, cfg, ckpt_root, progress=progress, desc=desc, on_step=on_step)
        return accelerator.unwrap_model(model), stats
    config = lora_config(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         longlora=lora.train_embeddings_and_norms, target_modules=lora.target_modules,
                         modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM")
    with quiet_checkpointing_deprecation():
        peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("%s: %d of %d parameters trainable (%.2f%%)", desc, trainable, total, 100 * trainable / total)
    stats = train(accelerator, peft_model, windows, cfg, ckpt_root, progress=progress, desc=desc, on_step=on_step)
    return accelerator.unwrap_model(peft_model), stats


def train_attention_only(model, target_modules: list[str] | None = None) -> None:
    """Freeze ``model`` except its attention projections and position tables (full fine-tuning of attention).

    Args:
        model: A (converted) model of a supported architecture.
        target_modules: Projection names; default the architecture's LoRA targets (its attention projections).
    """
    names = set(target_modules or lora_target_modules(model))
    model.requires_grad_(False)
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] in names or POSENC_MODULE in parts:
            module.requires_grad_(True)
