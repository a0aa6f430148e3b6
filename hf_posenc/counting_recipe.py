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

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import counting
from .config import PosEncConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- config
class CountingConfigError(ValueError):
    """A counting config key or value is invalid; the message names the key."""


@dataclass
class TaskConfig:
    """Programs. Statement counts are inclusive ranges ``[low, high]``.

    Attributes:
        num_variables: Variables per program (the paper's Table 3 has 1, 3 and 5).
        max_value: Largest value a variable reaches (the generator's 10).
        train_statements: Statement counts of training and in-distribution test programs.
        long_statements: Statement counts of the longer test programs.
    """

    num_variables: int = 1
    max_value: int = 10
    train_statements: list[int] = field(default_factory=lambda: [3, 32])
    long_statements: list[int] = field(default_factory=lambda: [33, 96])

    def validate(self) -> None:
        for name in ("train_statements", "long_statements"):
            value = getattr(self, name)
            if len(value) != 2 or not 1 <= value[0] <= value[1]:
                raise CountingConfigError(f"task.{name}: expected [low, high] with 1 <= low <= high, got {value}")
        if not 1 <= self.num_variables <= len(counting.VARIABLE_NAMES):
            raise CountingConfigError(f"task.num_variables: expected 1..26, got {self.num_variables}")
        if self.max_value < 1:
            raise CountingConfigError(f"task.max_value: expected >= 1, got {self.max_value}")


@dataclass
class ModelConfig:
    """The Llama every encoding is trained in (see :func:`hf_posenc.counting.build_model`)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CountingConfigError(f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                                      f"model.num_heads ({self.num_heads})")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise CountingConfigError(f"model.attn_implementation: expected 'sdpa' or 'eager', got "
                                      f"{self.attn_implementation!r}")


@dataclass
class TrainConfig:
    """AdamW with linear warm-up and cosine decay; fresh programs every step (no fixed training set)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise CountingConfigError(f"train: steps, batch_size and lr must be positive, warmup_steps >= 0 "
                                      f"(got {dataclasses.asdict(self)})")


@dataclass
class EvalConfig:
    """Test sets: ``programs`` per set, drawn once from ``seed`` and shared by every encoding and seed."""

    programs: int = 500
    batch_size: int = 100
    seed: int = 1234
    plot_bins: int = 8

    def validate(self) -> None:
        if self.programs < 1 or self.batch_size < 1 or self.plot_bins < 1:
            raise CountingConfigError(f"eval: programs, batch_size and plot_bins must be >= 1 "
                                      f"(got {dataclasses.asdict(self)})")


@dataclass
class EncodingEntry:
    """One row of the table: a name and the encoding as :class:`hf_posenc.PosEncConfig` keys."""

    name: str
    posenc: dict[str, Any]

    def validate(self) -> None:
        try:
            PosEncConfig.from_dict(dict(self.posenc))
        except (TypeError, ValueError) as err:
            raise CountingConfigError(f"encodings[{self.name}].posenc: {err}") from err


@dataclass
class CountingConfig:
    """A counting-task preset (``recipes/configs/counting_*.yaml``).

    ``threads`` is torch's thread count per model; ``workers`` trains that many cells at once in separate
    processes (1 thread each is the fastest use of a small CPU: these models are too small for
    intra-op parallelism). Neither changes a result, so neither is part of a cell's fingerprint.
    """

    encodings: list[EncodingEntry]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 1
    workers: int = 1

    def validate(self) -> None:
        if self.threads < 1 or self.workers < 1:
            raise CountingConfigError(f"threads and workers must be >= 1 (got {self.threads}, {self.workers})")
        names = [e.name for e in self.encodings]
        if not names or len(set(names)) != len(names):
            raise CountingConfigError(f"encodings: need at least one, with unique names (got {names})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CountingConfigError(f"seeds: need at least one, without repeats (got {self.seeds})")


def _build(cls, data: Any, where: str):
    """``cls`` from a YAML mapping: unknown keys and wrong scalar types are errors that name the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CountingConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CountingConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    nested = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
    kwargs = {}
    for key, value in data.items():
        default = fields[key].default
        factory = fields[key].default_factory
        if factory is not dataclasses.MISSING and isinstance(factory(), list) and not isinstance(value, list):
            raise CountingConfigError(f"{where}.{key}: expected a list, got {value!r}")
        if cls is CountingConfig and key in nested:
            value = _build(nested[key], value, f"{where}.{key}")
        elif cls is CountingConfig and key == "encodings":
            if not isinstance(value, list):
                raise CountingConfigError(f"{where}.encodings: expected a list, got {value!r}")
            value = [_build(EncodingEntry, v, f"{where}.encodings[{i}]") for i, v in enumerate(value)]
        elif isinstance(default, bool) or (isinstance(default, int) and not isinstance(default, bool)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise CountingConfigError(f"{where}.{key}: expected an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CountingConfigError(f"{where}.{key}: expected a number, got {value!r}")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise CountingConfigError(f"{where}.{key}: expected a string, got {value!r}")
        kwargs[key] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CountingConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    obj = cls(**kwargs)
    obj.validate()
    return obj


def load_config(path: str | Path) -> CountingConfig:
    """Read and validate a counting preset.

    Raises:
        CountingConfigError: Invalid YAML, an unknown key, a wrong type or an invalid value (named).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CountingConfigError(f"{path}: not valid YAML: {err}") from err
    return _build(CountingConfig, data, path.name)


# ------------------------------------------------------------------------------------------ cells
def fingerprint(cfg: CountingConfig, entry: EncodingEntry, seed: int) -> str:
    """Hash of every setting that changes one cell's result (not the other encodings or seeds)."""
    payload = {"entry": dataclasses.asdict(entry), "seed": seed, "task": dataclasses.asdict(cfg.task),
               "model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
               "eval": dataclasses.asdict(cfg.eval)}
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


__all__ = ["CountingConfig", "CountingConfigError", "load_config", "fingerprint", "held_out_sets", "train_cell",
           "score", "run_cell", "run"]
