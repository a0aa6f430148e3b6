"""The counting-task report: error per encoding (mean ± std over seeds, Wilson interval), the paper's
numbers beside ours, orderings only where intervals separate, and an error-vs-length plot.

CoPE paper: Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, Table 3.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from ...results import line_style
from ..intervals import wilson_interval
from .config import held_out_sets
from .task import PAPER

#: CoPE paper Table 3, test error (%) with 1 / 3 / 5 variables (3-512 statements, in distribution).
PAPER_ERRORS = {"absolute PE": (5.3, 67.6, 71.5), "relative PE": (1.1, 17.8, 22.4), "CoPE": (0.0, 1.2, 7.4)}
#: The test sets, and the subset of the long one whose answers training covers (see add_common_answers).
TEST_SETS = ("in_distribution", "long")
SETS = (*TEST_SETS, "long_common")
LABELS = {"in_distribution": "in distribution", "long": "long programs", "long_common": "long, answer <= {k}"}


def add_common_answers(cfg, records: list[dict], share: float = 0.01) -> int:
    """Add a ``long_common`` split to each record: the long programs whose answer is a common one.

    Longer programs hold more increments, so some of their answers are values that training programs
    almost never end on (with 3-32 statements, 7 or more increments since the last reset is rare); every
    encoding fails those, whatever its positions. ``long_common`` keeps the long programs whose answer is
    at most ``k``, the largest value answering at least ``share`` of the in-distribution test programs
    (which follow the training distribution), so that it measures counting rather than unseen outputs.

    Returns:
        ``k``.
    """
    sets = held_out_sets(cfg)
    counts = {}
    for program in sets["in_distribution"]:
        counts[program.answer] = counts.get(program.answer, 0) + 1
    k = max(v for v, c in counts.items() if c >= share * len(sets["in_distribution"]))
    keep = [p.answer <= k for p in sets["long"]]
    for record in records:
        rows = [row for row, kept in zip(record["long"]["by_statements"], keep) if kept]
        record["long_common"] = {"errors": sum(w for _, w in rows), "total": len(rows), "by_statements": rows}
    return k


def summarise(records: list[dict], encodings: list[str]) -> dict[str, dict[str, Any]]:
    """Per encoding and test set: per-seed error rates, their mean and std, and a pooled Wilson interval.

    The interval pools the programs of all seeds (errors / programs x seeds); the std is across seeds,
    so it shows how much training noise adds to the sampling noise the interval covers.
    """
    table: dict[str, dict[str, Any]] = {}
    for name in encodings:
        rows = sorted((r for r in records if r["encoding"] == name), key=lambda r: r["seed"])
        table[name] = {"seeds": [r["seed"] for r in rows], "parameters": rows[0]["parameters"] if rows else None}
        for split in SETS:
            rates = [r[split]["errors"] / r[split]["total"] for r in rows]
            errors, total = sum(r[split]["errors"] for r in rows), sum(r[split]["total"] for r in rows)
            low, high = wilson_interval(errors, total)
            table[name][split] = {"per_seed": rates, "mean": statistics.fmean(rates),
                                  "std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                                  "errors": errors, "total": total, "wilson95": [low, high]}
    return table


def _below(a: dict, b: dict) -> bool:
    """Whether error ``a`` is clearly below ``b``: the 95 % Wilson intervals separate *and* every seed of
    ``a`` is below every seed of ``b``. The pooled interval alone covers program sampling only; the seed
    condition keeps training noise (a lucky seed) from making an ordering."""
    return a["wilson95"][1] < b["wilson95"][0] and max(a["per_seed"]) < min(b["per_seed"])


def separations(table: dict, split: str) -> list[str]:
    """Every pair that separates (see :func:`_below`), as "A < B" (lower error first)."""
    names = list(table)
    found = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _below(table[a][split], table[b][split]):
                found.append(f"{a} < {b}")
            elif _below(table[b][split], table[a][split]):
                found.append(f"{b} < {a}")
    return found


def direction_check(table: dict, split: str, cope: str = "cope") -> dict[str, str]:
    """The paper's direction (CoPE's error <= every other encoding's), judged on intervals and seeds.

    Per other encoding: ``"holds"`` (CoPE clearly below), ``"fails"`` (clearly above), or
    ``"not separable at this budget"``.
    """
    if cope not in table:
        return {}
    verdicts = {}
    for name, row in table.items():
        if name == cope:
            continue
        ours, theirs = table[cope][split], row[split]
        verdicts[name] = ("holds" if _below(ours, theirs) else "fails" if _below(theirs, ours)
                          else "not separable at this budget")
    return verdicts


def error_by_length(records: list[dict], encoding: str, bins: list[tuple[int, int]]) -> list[float | None]:
    """Error rate of ``encoding`` (all seeds, both test sets) per statement-count bin."""
    rates = []
    for low, high in bins:
        wrong = [w for r in records if r["encoding"] == encoding for split in TEST_SETS
                 for n, w in r[split]["by_statements"] if low <= n <= high]
        rates.append(sum(wrong) / len(wrong) if wrong else None)
    return rates


def length_bins(cfg, count: int) -> list[tuple[int, int]]:
    """``count`` equal-width bins over each test set's statement range (in-distribution, then long)."""
    bins = []
    for low, high in (cfg.task.train_statements, cfg.task.long_statements):
        width = max(1, -(-(high - low + 1) // count))
        bins += [(s, min(high, s + width - 1)) for s in range(low, high + 1, width)]
    return bins


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(cfg, table: dict, meta: dict) -> str:
    """The results as a markdown document."""
    lo_in, hi_in = cfg.task.train_statements
    lo_long, hi_long = cfg.task.long_statements
    lines = [
        "# Counting task (CoPE paper, Table 3), reproduced in direction",
        "",
        f"Programs of `a = 0 ;` / `pass;` / `a ++;` statements (weights 1 / 50 / 7, values <= {cfg.task.max_value}), "
        f"{cfg.task.num_variables} variable(s), a final `print a`, loss on the answer only; models trained from "
        f"scratch on programs of {lo_in}-{hi_in} statements, tested on {cfg.eval.programs} fresh programs of "
        f"{lo_in}-{hi_in} statements (in distribution) and {cfg.eval.programs} of {lo_long}-{hi_long} (long). "
        f"Llama, {cfg.model.num_layers} layers, d={cfg.model.hidden_size}, {cfg.model.num_heads} heads; "
        f"{cfg.train.steps} steps x {cfg.train.batch_size} programs; seeds {cfg.seeds}.",
        "",
        "Test error (%, exact match on the answer): mean ± std over seeds; [95 % Wilson interval over all "
        "seeds' programs pooled]. An ordering is stated only where the intervals separate and every seed of "
        "one encoding is below every seed of the other.",
        "",
        "| encoding | " + " | ".join(LABELS[s].format(k=meta["common_answer_max"]) for s in SETS) + " | parameters |",
        "|---|---|---|---|---|",
    ]
    for name, row in table.items():
        cells = []
        for split in SETS:
            s = row[split]
            lo, hi = s["wilson95"]
            cells.append(f"{_pct(s['mean'])} ± {_pct(s['std'])} [{_pct(lo)}, {_pct(hi)}]")
        lines.append(f"| {name} | {' | '.join(cells)} | {row['parameters']:,} |")
    lines += ["", f"Paper ({PAPER}, Table 3, 1 variable, 3-512 statements, in distribution): "
              + ", ".join(f"{k} {v[0]} %" for k, v in PAPER_ERRORS.items()) + ".",
              "",
              f"`long, answer <= {meta['common_answer_max']}`: the long programs whose answer is a value that at least "
              f"1 % of training-distribution programs end on ({meta['common_share_of_long']:.0%} of them). The others "
              "ask for counts that training almost never ends on, which every encoding gets wrong, so this column "
              "separates counting from producing an unseen value.", "",
              "Differences from the paper's setup: far shorter programs and budget (the paper: 3-512 statements, "
              "10k programs x 100 epochs, 4 layers x 256); fresh programs every step instead of a fixed training set; "
              "no absolute-PE row (the Llama here has no absolute embeddings); the paper's relative PE is a learned "
              "relative bias, closest to t5_bias here; a longer-program test set of our own.", ""]
    lines += ["| expected direction (paper) | test set | verdict per encoding (95 % intervals) |", "|---|---|---|"]
    for split in SETS:
        verdicts = meta["direction"][split]
        lines.append(f"| CoPE error <= the others | {LABELS[split].format(k=meta['common_answer_max'])} | "
                     + "; ".join(f"{k}: {v}" for k, v in verdicts.items()) + " |")
    lines.append("")
    for split in SETS:
        pairs = meta["separations"][split]
        lines.append(f"Orderings that separate ({LABELS[split].format(k=meta['common_answer_max'])}): "
                     + (", ".join(pairs) if pairs else "none — not separable at this budget") + ".")
    lines += ["", "![error vs program length](error_vs_length.png)", "",
              f"Wall time {meta['run_seconds'] / 60:.1f} min ({meta['run_seconds']:.0f} s) "
              f"for the {meta['cells']} cells "
              f"({meta['cells_run']} computed by that run, "
              f"{meta['cells'] - meta['cells_run']} resumed from earlier runs); "
              f"{meta['workers']} worker process(es) x {meta['threads']} torch thread(s); load average at the end "
              f"{meta['load_average']} on {meta['cpus']} CPUs (shared machine). CPU time of the cells "
              f"{meta['cell_cpu_seconds'] / 60:.1f} min in all (≈ wall time on idle cores, divided by the workers). "
              "Per-cell seconds and per-program results are in `results.json`."]
    return "\n".join(lines) + "\n"


def plot(cfg, records: list[dict], encodings: list[str], path: Path) -> bool:
    """Error vs program length per encoding (mean over seeds); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bins = length_bins(cfg, cfg.eval.plot_bins)
    centres = [(a + b) / 2 for a, b in bins]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(encodings):
        rates = error_by_length(records, name, bins)
        ax.plot([c for c, r in zip(centres, rates) if r is not None],
                [100 * r for r in rates if r is not None], label=name, **line_style(i))
    ax.axvline(cfg.task.train_statements[1] + 0.5, color="grey", linestyle="--", linewidth=1)
    # x in data units, y in axes units: the label stays inside the plot whatever the error range.
    ax.text(cfg.task.train_statements[1] + 1, 0.95, "longest training program", color="grey", fontsize=8,
            transform=ax.get_xaxis_transform(), va="top")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("statements in the program")
    ax.set_ylabel("test error (%)")
    ax.set_title("Counting task: error vs program length (all seeds)")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(cfg, records: list[dict], out: Path, run_seconds: float, cells_run: int) -> dict:
    """Write ``results.json``, ``results.md`` and ``error_vs_length.png`` into ``out``; return the results."""
    encodings = [e.name for e in cfg.encodings]
    common = add_common_answers(cfg, records)
    table = summarise(records, encodings)
    measured = {"run_seconds": round(run_seconds, 1), "cells_run": cells_run, "workers": cfg.workers,
                "threads": cfg.threads,
                "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    previous = out / "results.json"
    if cells_run == 0 and previous.is_file():
        # Nothing was computed (a re-run that only rewrites the report): keep the timing of the run that
        # computed the cells, rather than reporting this invocation's seconds as the table's cost.
        old = json.loads(previous.read_text())
        if [c.get("fingerprint") for c in old.get("cells_detail", [])] == [r["fingerprint"] for r in records]:
            measured = {k: old[k] for k in measured if k in old} or measured
    meta = {
        **measured,
        "cells": len(records),
        "common_answer_max": common,
        "common_share_of_long": records[0]["long_common"]["total"] / records[0]["long"]["total"] if records else None,
        # Summed over cells: the compute the table costs, independent of how loaded the machine was.
        "cell_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 1),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "direction": {split: direction_check(table, split) for split in SETS},
        "separations": {split: separations(table, split) for split in SETS},
    }
    results = {"paper": PAPER, "paper_errors_percent": PAPER_ERRORS, "config": cfg.model_dump(),
               "table": table, **meta, "cells_detail": records}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(cfg, table, meta))
    plot(cfg, records, encodings, out / "error_vs_length.png")
    return results


__all__ = ["PAPER_ERRORS", "summarise", "separations", "direction_check", "error_by_length", "write_report"]
