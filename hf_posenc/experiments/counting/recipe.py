"""The counting-task recipe: a typed YAML config, one resumable cell per (encoding, seed), a report.

Runs the CoPE paper's counting task (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, Table 3;
the task itself is :mod:`.task`) for every encoding and seed of a preset: train a small
Llama from scratch with that encoding, score exact-match error on in-distribution and on longer
programs, then write ``results.json``, ``results.md`` and ``error_vs_length.png``.

The cells run through the experiments' one resumable grid (:mod:`hf_posenc.experiments.grid`): each writes
``cells/<encoding>_seed<seed>.json`` when it finishes, carrying a fingerprint of the settings that produced
it, and a re-run with the same output folder skips every cell whose file exists with the same fingerprint.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import grid
from . import task
from .config import CountingConfig, EncodingEntry, held_out_sets, load_config
from .report import write_report

logger = logging.getLogger(__name__)


def fingerprint(cfg: CountingConfig, entry: EncodingEntry, seed: int) -> str:
    """Hash of every setting that changes one cell's result (not the other encodings or seeds)."""
    return grid.fingerprint({"entry": entry.model_dump(), "seed": seed, "task": cfg.task.model_dump(),
                             "model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
                             "eval": cfg.eval.model_dump()})


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_cell(cfg: CountingConfig, entry: EncodingEntry, seed: int, progress: bool = True):
    """Train one model from scratch on fresh programs; returns ``(model, vocab, losses)``."""
    vocab = task.Vocabulary(cfg.task.num_variables, cfg.task.max_value)
    m = cfg.model
    model = task.build_model(entry.posenc, vocab_size=len(vocab), hidden_size=m.hidden_size,
                                 num_layers=m.num_layers, num_heads=m.num_heads,
                                 intermediate_size=m.intermediate_size, seed=seed,
                                 attn_implementation=m.attn_implementation)
    model.train()
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, t.warmup_steps, t.steps))
    # The training stream depends on the seed only, so every encoding of a seed sees the same programs.
    rng = random.Random(10_000 + seed)
    low, high = cfg.task.train_statements
    losses = []
    bar = tqdm(range(t.steps), desc=f"{entry.name} seed {seed}", disable=not progress, leave=False)
    for step in bar:
        programs = [task.generate_program(rng, rng.randint(low, high), cfg.task.num_variables,
                                              cfg.task.max_value) for _ in range(t.batch_size)]
        loss = task.answer_loss(model, task.make_batch(programs, vocab))
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == t.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            logger.info("%s seed %d step %d loss %.4f", entry.name, seed, step, loss.item())
    return model, vocab, losses


def score(model, vocab: task.Vocabulary, programs: list[task.Program], batch_size: int) -> list[bool]:
    """Whether the model's answer to each program is wrong (exact match on the value)."""
    model.eval()
    wrong = []
    for i in range(0, len(programs), batch_size):
        chunk = programs[i: i + batch_size]
        predicted = task.predict(model, task.make_batch(chunk, vocab), vocab)
        wrong.extend(bool(vocab.value_of(int(p)) != q.answer) for p, q in zip(predicted, chunk))
    return wrong


def run_cell(cfg: CountingConfig, entry: EncodingEntry, seed: int, sets: dict, progress: bool = True) -> dict:
    """Train and score one (encoding, seed); returns its record (what ``cells/*.json`` holds)."""
    start, cpu_start = time.time(), time.process_time()
    model, vocab, losses = train_cell(cfg, entry, seed, progress)
    train_s = time.time() - start
    record: dict[str, Any] = {"encoding": entry.name, "posenc": entry.posenc, "seed": seed,
                              "fingerprint": fingerprint(cfg, entry, seed),
                              "parameters": sum(p.numel() for p in model.parameters()),
                              "final_loss": statistics.fmean(losses[-20:]), "train_seconds": round(train_s, 1)}
    for name, programs in sets.items():
        wrong = score(model, vocab, programs, cfg.eval.batch_size)
        record[name] = {"errors": sum(wrong), "total": len(wrong),
                        # Per program, for the error-vs-length plot: (statements, wrong).
                        "by_statements": [[len(p.statements), int(w)] for p, w in zip(programs, wrong)]}
    record["seconds"] = round(time.time() - start, 1)
    # CPU time of this process during the cell: what it costs on an idle core, whatever the machine's load.
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    return record


def _log_cell(cell: grid.Cell, record: dict) -> None:
    logger.info("%s seed %d: in-distribution error %d/%d, long %d/%d (%.0f s)", record["encoding"], record["seed"],
                record["in_distribution"]["errors"], record["in_distribution"]["total"],
                record["long"]["errors"], record["long"]["total"], record["seconds"])


def _worker_cell(cfg: CountingConfig, entry: EncodingEntry, seed: int, sets: dict, log_files: list[str]) -> dict:
    """One cell in a worker process, logging its steps to the parent's log files (appends are atomic)."""
    torch.set_num_threads(cfg.threads)
    package = logging.getLogger("hf_posenc")
    known = {getattr(h, "baseFilename", None) for h in package.handlers}
    for path in log_files:
        if path not in known:
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
            package.addHandler(handler)
    package.setLevel(logging.INFO)
    return run_cell(cfg, entry, seed, sets, progress=False)


def _worker_job(job: tuple) -> dict:
    return _worker_cell(*job)


def _pool_mapper(cfg: CountingConfig, sets: dict, compute: Callable[[grid.Cell], dict]) -> grid.Mapper:
    """Computes the pending cells in ``cfg.workers`` spawned processes, yielding each as it finishes (a single
    pending cell runs in this process with ``compute``: a pool would only add its start-up)."""

    def mapper(pending: Sequence[grid.Cell]) -> Iterator[tuple[grid.Cell, dict]]:
        if len(pending) < 2:
            yield from ((cell, compute(cell)) for cell in pending)
            return
        log_files = [h.baseFilename for h in logging.getLogger("hf_posenc").handlers
                     if isinstance(h, logging.FileHandler)]
        jobs = [(cfg, *cell.spec, sets, log_files) for cell in pending]
        by_key = {cell.spec[0].name + "@" + str(cell.spec[1]): cell for cell in pending}
        # A SIGTERM (kill, a job scheduler) becomes SystemExit here, so that leaving the pool's `with`
        # terminates the workers instead of leaving them training cells nobody will save.
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            # spawn: a forked child would inherit this process's torch thread pool state.
            with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
                for record in pool.imap_unordered(_worker_job, jobs):
                    yield by_key[f"{record['encoding']}@{record['seed']}"], record
        finally:
            signal.signal(signal.SIGTERM, previous)

    return mapper


def run(cfg: CountingConfig, out_dir: str | Path, progress: bool = True,
        cell_fn: Callable[..., dict] = run_cell) -> dict:
    """Every (encoding, seed) cell, skipping finished ones, then the report. Returns the results dict.

    Args:
        cfg: The preset.
        out_dir: Output folder; ``cells/`` inside it makes the run resumable.
        progress: Show progress bars.
        cell_fn: Computes one cell in this process (a parameter so that tests can count the cells run);
            with ``cfg.workers > 1`` cells run in worker processes instead.
    """
    out = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    start = time.time()
    sets = held_out_sets(cfg)
    cells = [grid.Cell(f"{entry.name}_seed{seed}", fingerprint(cfg, entry, seed), (entry, seed))
             for entry in cfg.encodings for seed in cfg.seeds]

    def compute(cell: grid.Cell) -> dict:
        return cell_fn(cfg, *cell.spec, sets, progress)

    mapper = _pool_mapper(cfg, sets, compute) if cfg.workers > 1 else None
    done = grid.run_grid(cells, compute, out / "cells",
                         mapper=mapper, on_record=_log_cell, progress=progress,
                         # CoPE costs several times the others: first, so parallel workers end together.
                         first=lambda cell: cell.spec[0].posenc.get("kind") != "cope")
    return write_report(cfg, list(done.records.values()), out, run_seconds=time.time() - start,
                        cells_run=done.computed)


__all__ = ["CountingConfig", "load_config", "fingerprint", "held_out_sets", "train_cell",
           "score", "run_cell", "run"]
