"""The Accelerate training loop shared by ``recipes/finetune_lora.py`` and the comparison.

Accelerate owns devices, mixed precision, gradient accumulation, distribution (DDP/FSDP/DeepSpeed
from the launch config) and checkpointing. ``train.batch_size`` is the *global* batch: Accelerate
splits each batch across the processes (``split_batches``), so a config trains on the same tokens,
with the same optimizer steps, whether it runs on one process or on eight. A run saves ``save_state`` checkpoints every
``train.checkpoint_every`` optimizer steps; a restarted run loads the newest complete one, skips the
batches it already consumed and continues, so no optimizer step is lost or repeated.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
import warnings
from pathlib import Path

import torch

from .recipe_config import TrainConfig

logger = logging.getLogger(__name__)

#: Fault injection for the resume test: the process SIGKILLs itself right after saving this step.
FAULT_ENV = "HF_POSENC_KILL_AFTER_STEP"
_DONE = "checkpoint_complete"


def training_windows(texts: list[str], tokenizer, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` non-overlapping training windows of ``seq_len`` tokens, in a seeded random order.

    Documents are shuffled (seeded) before being concatenated so windows mix modules; windows are
    contiguous text so long-range structure inside files is kept for the long-context fine-tune.
    """
    from .base_model import token_stream
    from .data import windows

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream = token_stream([texts[i] for i in order], tokenizer, count * seq_len)
    chunks = windows(stream, seq_len)
    if len(chunks) < count:
        # Small corpora: reuse windows (a new epoch) rather than fail.
        chunks = chunks.repeat((count + len(chunks) - 1) // len(chunks), 1)
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
    return chunks[perm[:count]].contiguous()


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

    Raises:
        ValueError: ``train.batch_size`` is not a multiple of the number of processes.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cfg.batch_size % accelerator.num_processes:
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
          progress: bool = True, desc: str = "finetune") -> dict:
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
    loader = DataLoader(TensorDataset(windows), batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    done_steps = 0
    resume_from = latest_checkpoint(ckpt_root) if (ckpt_root and cfg.resume) else None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        done_steps = json.loads((resume_from / _DONE).read_text())["step"]
        logger.info("resumed from %s (step %d)", resume_from, done_steps)
    batches = accelerator.skip_first_batches(loader, done_steps * cfg.grad_accum) if done_steps else loader

    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    bar = tqdm(total=cfg.steps, initial=done_steps, desc=desc, leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    losses: list[float] = []
    step = done_steps
    data_checksum = 0  # sum of the token ids this rank trained on (shows each rank got its own shard)
    for (batch,) in batches:
        if step >= cfg.steps:
            break
        data_checksum += int(batch.sum())
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        bar.update(1)
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
        # float64 sum of the trainable weights: equal on every rank iff gradients were synchronised.
        "param_checksum": float(sum(p.detach().double().sum() for p in params)),
    }


def windows_needed(cfg: TrainConfig) -> int:
    """Training windows for ``cfg.steps`` optimizer steps (global: the same for any number of processes)."""
    return cfg.steps * cfg.batch_size * cfg.grad_accum


def build_training_windows(texts: list[str], tokenizer, cfg: TrainConfig) -> torch.Tensor:
    """Windows for a run, identical on every process (seeded)."""
    return training_windows(texts, tokenizer, cfg.seq_len, windows_needed(cfg), cfg.seed)
