"""Intervals: seeds and spread (mean ± std, Student-t intervals), Wilson intervals of rates, and orderings.

Shared by the experiments. Seeds and spread: one variant's runs under several fine-tune seeds, summarised as
mean ± std.

A comparison with one seed cannot say that one encoding beats another: the difference between two
fine-tunes of the *same* encoding under different seeds is often as large as the difference between
encodings at a small budget. With ``seeds: [0, 1, 2]`` in a compare config every fine-tuned variant runs
once per seed; this module merges those runs into one record whose numbers are the means, keeps the
standard deviations and the per-seed values under ``"spread"``, and decides orderings with 95 %
confidence intervals of the mean (Student's t, since n is small): an ordering is stated only when the
intervals separate, otherwise it is "not separable at this budget".

Variants that are not fine-tuned (zero-shot RoPE, dynamic NTK, Self-Extend) are deterministic and run once;
their interval is a point. Where separability is not transitive, :func:`letter_groups` states it faithfully.
"""

from __future__ import annotations

import math
import statistics
import string
from typing import Any

# Two-sided 95 % quantiles of Student's t by degrees of freedom (standard tables); beyond 30, the normal's.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)
#: What a comparison that cannot be decided says.
NOT_SEPARABLE = "not separable at this budget"


def wilson_interval(errors: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927), default 95 %.

    Raises:
        ValueError: ``total`` < 1 or ``errors`` outside ``0..total``.
    """
    if total < 1 or not 0 <= errors <= total:
        raise ValueError(f"need 0 <= errors <= total and total >= 1, got {errors}/{total}")
    p = errors / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom."""
    return _T_975[dof - 1] if dof <= len(_T_975) else 1.96


def interval(values: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the 95 % t-interval of the mean of ``values`` (a point for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _merge(values: list[Any]) -> tuple[Any, Any, Any]:
    """Mean, std and per-seed values of matching nested mappings of numbers."""
    if isinstance(values[0], dict):
        keys = [k for k in values[0] if all(k in v for v in values)]
        merged = {k: _merge([v[k] for v in values]) for k in keys}
        return ({k: m[0] for k, m in merged.items()}, {k: m[1] for k, m in merged.items()},
                {k: m[2] for k, m in merged.items()})
    numbers = [float(v) for v in values]
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0), numbers


#: The numeric tables of a record that are averaged over seeds.
_TABLES = ("perplexity", "passkey", "passkey_by_depth", "loss_by_position")


def merge_seeds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's record from its per-seed records: means in place, ``"spread"`` beside them.

    The RULER cells keep their structure, each with every seed's trials pooled (:func:`wilson_pooled`); the
    seeds' own accuracies and their std are in ``spread``.

    Returns:
        The first record with its tables replaced by means, and ``"spread": {"seeds", "n", "std": {...},
        "values": {...}}`` (std and values shaped like the tables; ``"ruler"``: ``{task: {length: ...}}``).
    """
    merged = dict(records[0])
    std: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for table in _TABLES:
        if all(table in r for r in records):
            merged[table], std[table], values[table] = _merge([r[table] for r in records])
    if all("ruler" in r for r in records):
        merged["ruler"], std["ruler"], values["ruler"] = _merge_ruler([r["ruler"] for r in records])
    merged["train_tokens"] = records[0]["train_tokens"]
    merged["spread"] = {"seeds": [r.get("seed") for r in records], "n": len(records), "std": std, "values": values,
                        "runs": [{"seed": r.get("seed"), "curve": r["curve"]} for r in records if "curve" in r]}
    merged.pop("seed", None)
    merged.pop("curve", None)  # one seed's curve; every seed's is in spread.runs
    return merged


def wilson_pooled(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One RULER cell from the same cell of several seeds: every seed's trials pooled, their accuracy and the
    95 % Wilson interval of that accuracy.

    The pooled rate, not the mean of the seeds' rates: a cell stops drawing trials once its interval is narrow
    (``ruler.run_cell``), so seeds hold different trial counts, and the mean of their rates can lie outside
    the pooled interval (measured: 0.39 beside [0.43, 0.54]). The seeds' own rates are in ``spread``.
    """
    successes = sum(round(c["accuracy"] * c["trials"]) for c in cells)
    trials = sum(c["trials"] for c in cells)
    low, high = wilson_interval(successes, trials)
    return {"accuracy": successes / trials, "ci_low": low, "ci_high": high, "trials": trials}


def _merge_ruler(tables: list[dict]) -> tuple[dict, dict, dict]:
    means, stds, per_seed = {}, {}, {}
    for task in tables[0]:
        means[task], stds[task], per_seed[task] = {}, {}, {}
        for length in tables[0][task]:
            cells = [t[task][length] for t in tables]
            accuracies = [c["accuracy"] for c in cells]
            _, std, _ = _merge(accuracies)
            means[task][length] = {**wilson_pooled(cells), "by_depth": {
                depth: wilson_pooled([c["by_depth"][depth] for c in cells]) for depth in cells[0]["by_depth"]}}
            stds[task][length], per_seed[task][length] = std, accuracies
    return means, stds, per_seed


def seed_values(record: dict[str, Any], table: str, *keys: str) -> list[float]:
    """The per-seed values of one number of a (merged or single-seed) record, e.g. ``("perplexity",
    "non_overlapping", "1024")``."""
    spread = record.get("spread")
    node = spread["values"][table] if spread and table in spread["values"] else record[table]
    for key in keys:
        node = node[key]
    return node if isinstance(node, list) else [float(node)]


def compare_intervals(a: tuple[float, float, float], b: tuple[float, float, float]) -> int:
    """-1 if ``a``'s interval lies wholly below ``b``'s, 1 if wholly above, 0 if they overlap."""
    if a[2] < b[1]:
        return -1
    if a[1] > b[2]:
        return 1
    return 0


def letter_groups(names: list[str], separated: set[tuple[str, str]]) -> dict[str, str]:
    """Compact letter display of pairwise comparisons (Piepho 2004, https://doi.org/10.1198/1061860043515).

    Separability by intervals is not transitive (a tight interval can separate from one two places away but
    not from the wide one between them), so no chain ``a < b < c`` states it faithfully. Letters do: two
    variants share a letter exactly when they are *not* separable.

    Args:
        names: The variants, lowest mean first (letters then run a, b, c... from the lowest).
        separated: The pairs ``(a, b)`` that separate, in either order.

    Returns:
        ``{name: letters}``, e.g. ``{"rerope": "a", "rope_yarn": "ab", "rope_linear": "b"}``.
    """
    groups = [list(names)]  # each group: variants no two of which separate
    for a, b in sorted(separated, key=lambda pair: sorted(names.index(n) for n in pair)):
        # Insert: a group holding both is split into one without b and one without a...
        split = []
        for group in groups:
            both = a in group and b in group
            split += [[n for n in group if n != b], [n for n in group if n != a]] if both else [group]
        # ...absorb: a group inside another (or a repeat) says nothing more.
        groups = [g for i, g in enumerate(split)
                  if not any(j != i and set(g) <= set(h) and (set(g) < set(h) or j < i) for j, h in enumerate(split))]
    groups.sort(key=lambda g: sorted(names.index(n) for n in g))
    alphabet = string.ascii_lowercase + string.ascii_uppercase
    symbols = [alphabet[k] if k < len(alphabet) else f"[{k}]" for k in range(len(groups))]  # > 52 groups: numbered
    return {n: "".join(symbols[k] for k, g in enumerate(groups) if n in g) for n in names}
