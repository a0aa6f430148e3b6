"""RULER-style synthetic long-context tasks, offline: needles hidden in held-out code, scored by exact match.

RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654) widens the passkey test into a suite that
separates "can find one needle" from "can find the right needle among several", "can gather several
values" and "can follow a chain of references". This module builds the prompts of four such tasks in
the style of source code (the embedded base model is trained on the Python standard library), decodes
them greedily and scores them by exact match with a Wilson score interval per cell:

- ``single_needle``: one ``PASS_KEY = NNNNN`` line, asked for at the end (the passkey test).
- ``multi_key``: four ``NAME = NNNNN`` lines with different names; one of them is asked for.
- ``multi_value``: one list receives three values (``NAME += [NNNNN]``); all three are asked for, in order.
- ``variable_tracking``: ``A = NNNNN``, later ``B = A``, later ``C = B``; the value of ``C`` is asked for.

The asked-for needle (the first value, or the start of the chain) sits at the cell's depth; the other
lines are placed at random depths (the chain's links after its start, so that it can be followed).

Trials are drawn in batches until the cell's interval is narrower than ``max_half_width`` on each side
or ``max_trials`` is reached: cells at 0 or 1 are settled by a dozen trials, cells near 0.5 need ~43.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ... import _hf
from .metrics import load_metric

#: The tasks, in report order.
TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking")

# Identifiers for needles: upper-case names as constants are written in Python code.
_NAMES = (
    "ALPHA", "BRAVO", "CEDAR", "DELTA", "EMBER", "FJORD", "GLYPH", "HAVEN", "IVORY", "JOULE", "KARMA", "LOTUS",
    "MAPLE", "NOVEL", "OPERA", "PIXEL", "QUOTA", "RIVER", "SOLAR", "TIGER", "ULTRA", "VIVID", "WALTZ", "YIELD",
)
HEAD = "# There is information hidden in this file. Find it and remember it.\n"


@dataclass(frozen=True)
class NeedlePrompt:
    """One trial: ``input_ids`` ``[length]`` and the digit strings the continuation must start with."""

    input_ids: torch.Tensor
    answers: tuple[str, ...]


def _value(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def task_lines(task: str, rng: random.Random, names: tuple[str, ...] = _NAMES
               ) -> tuple[list[str], str, tuple[str, ...]]:
    """The needle lines (the asked-for one first), the question and the answers of one trial.

    Args:
        task: One of :data:`TASKS`.
        rng: Source of the values and names.
        names: Identifiers to name the needles with (the evaluation's fixed list by default; the
            base model's retrieval pretraining draws fresh ones so that it never sees these).
    """
    if task == "single_needle":
        key = _value(rng)
        return ([f"\nPASS_KEY = {key}  # the pass key is {key}. Remember it. {key} is the pass key.\n"],
                "\n# What is the pass key?\nPASS_KEY = ", (key,))
    if task == "multi_key":
        names = rng.sample(names, 4)
        values = [_value(rng) for _ in names]
        return ([f"\n{name} = {value}\n" for name, value in zip(names, values)],
                f"\n# What is {names[0]}?\n{names[0]} = ", (values[0],))
    if task == "multi_value":
        name = rng.choice(names)
        values = tuple(_value(rng) for _ in range(3))
        return ([f"\n{name} += [{value}]\n" for value in values], f"\n# What is in {name}?\n{name} == [", values)
    if task == "variable_tracking":
        first, second, third = rng.sample(names, 3)
        value = _value(rng)
        return ([f"\n{first} = {value}\n", f"\n{second} = {first}\n", f"\n{third} = {second}\n"],
                f"\n# What number is {third}?\nassert {third} == ", (value,))
    raise ValueError(f"unknown RULER task {task!r}; allowed: {', '.join(TASKS)}")


def needle_prompt(task: str, tokenizer, filler: torch.Tensor, length: int, depth: float,
                  rng: random.Random) -> NeedlePrompt:
    """Build one trial of ``task`` of exactly ``length`` tokens, its first needle at relative ``depth``.

    Args:
        task: One of :data:`TASKS`.
        tokenizer: The model's tokenizer.
        filler: ``[N]`` held-out token ids (N >= length) to hide the needles in.
        length: Prompt length in tokens.
        depth: Where the asked-for needle sits, as a fraction of the filler (0 = start, 1 = end).
        rng: Source of the values, names and the other needles' depths.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    lines, question, answers = task_lines(task, rng)
    return NeedlePrompt(assemble(task, tokenizer, filler, length, depth, lines, question, rng), answers)


def assemble(task: str, tokenizer, filler: torch.Tensor, length: int, depth: float, lines: list[str], question: str,
             rng: random.Random, head: str = HEAD) -> torch.Tensor:
    """The ``[length]`` token ids of one trial: ``head``, filler with the needle ``lines`` hidden in it, ``question``.

    The first line sits at relative ``depth`` of the filler; the others at random depths (after it, in
    order, for the tasks whose later lines refer to earlier ones).
    """

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    head, needles, tail = encode(head), [encode(line) for line in lines], encode(question)
    room = length - len(head) - sum(len(n) for n in needles) - len(tail)
    if room < 0:
        raise ValueError(f"RULER length {length} is too short for the {task} template ({length - room} tokens)")
    if len(filler) < room:
        raise ValueError(f"not enough filler tokens for a {task} prompt of {length}")
    first = int(round(depth * room))
    if task in ("multi_value", "variable_tracking"):
        # The later values (or the chain's links) come after the first one, in order.
        rest = sorted(rng.randint(first, room) for _ in needles[1:])
    else:
        rest = [rng.randint(0, room) for _ in needles[1:]]
    cuts = [first, *rest]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    pieces, previous = [head], 0
    for i in order:
        pieces += [filler[previous : cuts[i]], needles[i]]
        previous = cuts[i]
    pieces += [filler[previous:room], tail]
    input_ids = torch.cat(pieces)
    assert len(input_ids) == length, (len(input_ids), length)
    return input_ids


@torch.no_grad()
def greedy_batch(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``input_ids`` ``[B, T]`` (equal-length prompts: no padding needed)."""
    device = next(model.parameters()).device
    _hf.reset_rope_state(model)  # stock dynamic NTK would keep the scale of an earlier, longer forward
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids, device=device),
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def run_cell(model, tokenizer, filler: torch.Tensor, task: str, length: int, depth: float, metric, *,
             seed: int, batch_size: int, min_trials: int, max_trials: int,
             max_half_width: float) -> tuple[dict[str, Any], list[str], list[str]]:
    """Trials of one (task, length, depth) cell until its interval is narrow enough.

    Returns:
        The cell's ``{"accuracy", "ci_low", "ci_high", "trials"}``, its predictions and references.
    """
    # One generator per cell: a cell's prompts do not depend on which other cells were run before it.
    rng = random.Random(f"{seed}/{task}/{length}/{depth}")
    predictions: list[str] = []
    references: list[str] = []
    while True:
        count = min(batch_size, max_trials - len(predictions))
        prompts = []
        for _ in range(count):
            offset = rng.randint(0, max(0, len(filler) - length))  # a different stretch of code per trial
            prompts.append(needle_prompt(task, tokenizer, filler[offset:], length, depth, rng))
        new_tokens = 8 * len(prompts[0].answers)
        predictions += greedy_batch(model, tokenizer, torch.stack([p.input_ids for p in prompts]), new_tokens)
        references += [" ".join(p.answers) for p in prompts]
        result = metric.compute(predictions=predictions, references=references)
        narrow = (result["ci_high"] - result["ci_low"]) / 2 <= max_half_width
        if len(predictions) >= max_trials or (len(predictions) >= min_trials and narrow):
            return result, predictions, references


def run_ruler(model, tokenizer, filler: torch.Tensor, cfg, lengths: list[int], bar=None) -> dict[str, Any]:
    """Every task at every length and depth.

    Args:
        cfg: A ``RulerConfig`` (``tasks``, ``depths``, trial bounds, ``max_half_width``, ``seed``).
        bar: A progress bar advanced by one per cell.

    Returns:
        ``{"ruler": {task: {length: {"accuracy", "ci_low", "ci_high", "trials", "by_depth": {depth: cell}}}}}``:
        each length pools its depths' trials (lengths and depths as strings, JSON-ready).
    """
    table: dict[str, dict] = {}
    for task in cfg.tasks:
        metric = load_metric("needle_exact_match", config_name=task)
        table[task] = {}
        for length in lengths:
            cells, pooled_predictions, pooled_references = {}, [], []
            for depth in cfg.depths:
                cells[str(depth)], predictions, references = run_cell(
                    model, tokenizer, filler, task, length, depth, metric, seed=cfg.seed, batch_size=cfg.batch_size,
                    min_trials=cfg.min_trials, max_trials=cfg.max_trials, max_half_width=cfg.max_half_width)
                pooled_predictions += predictions
                pooled_references += references
                if bar is not None:
                    bar.update(1)
            pooled = metric.compute(predictions=pooled_predictions, references=pooled_references)
            table[task][str(length)] = {**pooled, "by_depth": cells}
    return {"ruler": table}
