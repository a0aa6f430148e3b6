"""The counting-task recipe: a typed YAML config, one resumable cell per (encoding, seed), a report.

Runs the CoPE paper's counting task (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, Table 3;
the task itself is :mod:`hf_posenc.counting`) for every encoding and seed of a preset: train a small
Llama from scratch with that encoding, score exact-match error on in-distribution and on longer
programs, then write ``results.json``, ``results.md`` and ``error_vs_length.png``.

Each cell writes ``cells/<encoding>_seed<seed>.json`` when it finishes, carrying a fingerprint of the
settings that produced it. A re-run with the same output folder skips every cell whose file exists
with the same fingerprint, so a run that was cut off continues from its finished cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import statistics
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
import yaml

from pydantic import Field, model_validator

from . import counting
from .config import PosEncConfig
from .context_extension.config import ConfigError, Positive, PositiveFloat, Section
from .context_extension.config import load_config as load_recipe_config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- config
# The sections are pydantic models read by the recipes' one loader (context_extension.config.load_config):
# unknown keys, wrong types and invalid values stop there with the file and the key named.
StatementRange = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]


class TaskConfig(Section):
    """Programs. Statement counts are inclusive ranges ``[low, high]``.

    Attributes:
        num_variables: Variables per program (the paper's Table 3 has 1, 3 and 5).
        max_value: Largest value a variable reaches (the generator's 10).
        train_statements: Statement counts of training and in-distribution test programs.
        long_statements: Statement counts of the longer test programs.
    """

    num_variables: Annotated[int, Field(ge=1, le=len(counting.VARIABLE_NAMES))] = 1
    max_value: Positive = 10
    train_statements: StatementRange = Field(default_factory=lambda: [3, 32])
    long_statements: StatementRange = Field(default_factory=lambda: [33, 96])

    @model_validator(mode="after")
    def _ranges_ascend(self) -> TaskConfig:
        for name in ("train_statements", "long_statements"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: expected [low, high] with low <= high, got {[low, high]}")
        return self


class ModelConfig(Section):
    """The Llama every encoding is trained in (see :func:`hf_posenc.counting.build_model`)."""

    hidden_size: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 4
    intermediate_size: Positive = 256
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _heads_divide_hidden_size(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        return self


class TrainConfig(Section):
    """AdamW with linear warm-up and cosine decay; fresh programs every step (no fixed training set)."""

    steps: Positive = 600
    batch_size: Positive = 64
    lr: PositiveFloat = 3e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: PositiveFloat = 1.0


class EvalConfig(Section):
    """Test sets: ``programs`` per set, drawn once from ``seed`` and shared by every encoding and seed."""

    programs: Positive = 500
    batch_size: Positive = 100
    seed: int = 1234
    plot_bins: Positive = 8


class EncodingEntry(Section):
    """One row of the table: a name and the encoding as :class:`hf_posenc.PosEncConfig` keys."""

    name: str
    posenc: dict[str, Any]

    @model_validator(mode="after")
    def _valid_encoding(self) -> EncodingEntry:
        PosEncConfig.from_dict(dict(self.posenc))  # the encodings' own validation names the bad field
        return self


class CountingConfig(Section):
    """A counting-task preset (``recipes/configs/counting_*.yaml``).

    ``threads`` is torch's thread count per model; ``workers`` trains that many cells at once in separate
    processes (1 thread each is the fastest use of a small CPU: these models are too small for
    intra-op parallelism). Neither changes a result, so neither is part of a cell's fingerprint.
    """

    preset_kind: ClassVar[str] = "counting"

    encodings: Annotated[list[EncodingEntry], Field(min_length=1)]
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    threads: Positive = 1
    workers: Positive = 1

    @model_validator(mode="after")
    def _unique(self) -> CountingConfig:
        names = [e.name for e in self.encodings]
        if len(set(names)) != len(names):
            raise ValueError(f"encodings need unique names (got {names})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat (got {self.seeds})")
        return self


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> CountingConfig:
    """Read and validate a counting preset (a YAML path or a preset name) with ``key.sub=value`` overrides.

    Raises:
        ConfigError: Invalid YAML, an unknown key, a wrong type or an invalid value (file and key named).
        FileNotFoundError: Neither a file nor a counting preset.
    """
    return load_recipe_config(CountingConfig, config, overrides)


# ------------------------------------------------------------------------------------------ cells
def fingerprint(cfg: CountingConfig, entry: EncodingEntry, seed: int) -> str:
    """Hash of every setting that changes one cell's result (not the other encodings or seeds)."""
    payload = {"entry": entry.model_dump(), "seed": seed, "task": cfg.task.model_dump(),
               "model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "eval": cfg.eval.model_dump()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def held_out_sets(cfg: CountingConfig) -> dict[str, list[counting.Program]]:
    """The in-distribution and long test programs (the same for every cell of a config)."""
    rng = random.Random(cfg.eval.seed)
    sets = {}
    for name, (low, high) in (("in_distribution", cfg.task.train_statements), ("long", cfg.task.long_statements)):
        sets[name] = [counting.generate_program(rng, rng.randint(low, high), cfg.task.num_variables,
                                                cfg.task.max_value) for _ in range(cfg.eval.programs)]
    return sets


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_cell(cfg: CountingConfig, entry: EncodingEntry, seed: int, progress: bool = True):
    """Train one model from scratch on fresh programs; returns ``(model, vocab, losses)``."""
    from tqdm.auto import tqdm

    vocab = counting.Vocabulary(cfg.task.num_variables, cfg.task.max_value)
    m = cfg.model
    model = counting.build_model(entry.posenc, vocab_size=len(vocab), hidden_size=m.hidden_size,
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
        programs = [counting.generate_program(rng, rng.randint(low, high), cfg.task.num_variables,
                                              cfg.task.max_value) for _ in range(t.batch_size)]
        loss = counting.answer_loss(model, counting.make_batch(programs, vocab))
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


def score(model, vocab: counting.Vocabulary, programs: list[counting.Program], batch_size: int) -> list[bool]:
    """Whether the model's answer to each program is wrong (exact match on the value)."""
    model.eval()
    wrong = []
    for i in range(0, len(programs), batch_size):
        chunk = programs[i: i + batch_size]
        predicted = counting.predict(model, counting.make_batch(chunk, vocab), vocab)
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


def _pending(cfg: CountingConfig, out: Path) -> tuple[list[dict], list[tuple[EncodingEntry, int]]]:
    """Finished records (matching fingerprints) and the cells still to compute."""
    done, todo = [], []
    for entry in cfg.encodings:
        for seed in cfg.seeds:
            path = out / "cells" / f"{entry.name}_seed{seed}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if record.get("fingerprint") == fingerprint(cfg, entry, seed):
                    logger.info("%s seed %d: finished earlier, skipped (%s)", entry.name, seed, path)
                    done.append(record)
                    continue
                logger.info("%s seed %d: settings changed since %s was written; recomputing", entry.name, seed, path)
            todo.append((entry, seed))
    return done, todo


def _save(out: Path, record: dict) -> None:
    path = out / "cells" / f"{record['encoding']}_seed{record['seed']}.json"
    # Written whole then renamed, so a cut-off write never leaves a half cell that looks finished.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
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
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    start = time.time()
    sets = held_out_sets(cfg)
    done, todo = _pending(cfg, out)
    # Longest cells first (CoPE costs several times the others), so parallel workers end together.
    todo.sort(key=lambda cell: cell[0].posenc.get("kind") != "cope")
    bar = tqdm(total=len(todo), desc="cells", disable=not progress)
    if cfg.workers > 1 and len(todo) > 1:
        import multiprocessing
        import signal
        import sys

        log_files = [h.baseFilename for h in logging.getLogger("hf_posenc").handlers
                     if isinstance(h, logging.FileHandler)]
        jobs = [(cfg, entry, seed, sets, log_files) for entry, seed in todo]
        # A SIGTERM (kill, a job scheduler) becomes SystemExit here, so that leaving the pool's `with`
        # terminates the workers instead of leaving them training cells nobody will save.
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            # spawn: a forked child would inherit this process's torch thread pool state.
            with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
                for record in pool.imap_unordered(_worker_job, jobs):
                    _save(out, record)
                    done.append(record)
                    bar.update()
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        for entry, seed in todo:
            record = cell_fn(cfg, entry, seed, sets, progress)
            _save(out, record)
            done.append(record)
            bar.update()
    bar.close()
    order = {(e.name, s): i for i, (e, s) in enumerate((e, s) for e in cfg.encodings for s in cfg.seeds)}
    done.sort(key=lambda r: order[(r["encoding"], r["seed"])])
    from .counting_report import write_report

    return write_report(cfg, done, out, run_seconds=time.time() - start, cells_run=len(todo))


__all__ = ["CountingConfig", "load_config", "fingerprint", "held_out_sets", "train_cell",
           "score", "run_cell", "run"]
