"""The comparison's outputs: ``results.json`` (schema checked), ``results.csv``, a Markdown table
and plots (log-scale perplexity vs length; passkey accuracy heatmap; loss by position).

``results.json`` holds every variant's full record. Its numbers by length are also an
:class:`hf_posenc.results.EvalSummary`, the results model the model cards read too (:func:`eval_summary`):
``results.csv`` is that summary's table, and the perplexity plot is :func:`hf_posenc.results.plot_results`,
so a card made from either file shows the same numbers the same way.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ...results import EvalSummary, comparison_rows, line_style, plot_results, records_from_rows
from ..intervals import (
    NOT_SEPARABLE,
    compare_intervals,
    interval,
    letter_groups,
    seed_values,
)
from .consistency import consistency_checks, consistency_markdown
from .ruler import TASKS

# Keys every variant record must have, with their types (``results.json`` is read by other tools:
# the model-card generator and the Hub push).
_VARIANT_KEYS = {
    "name": str, "posenc": dict, "finetuned": bool, "train_tokens": int, "perplexity": dict, "passkey": dict,
}
PPL_MODES = ("non_overlapping", "sliding")


def validate_results(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of ``results`` that breaks the documented schema."""
    if not isinstance(results.get("base_model"), str):
        raise ValueError("results.base_model must be a string")
    if not isinstance(results.get("train_length"), int) or isinstance(results.get("train_length"), bool):
        raise ValueError("results.train_length must be an integer")
    variants = results.get("variants")
    if not isinstance(variants, list) or not variants:
        raise ValueError("results.variants must be a non-empty list")
    for i, record in enumerate(variants):
        for key, kind in _VARIANT_KEYS.items():
            value = record.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"results.variants[{i}].{key} must be {kind.__name__}, got {value!r}")
        for mode in PPL_MODES:
            table = record["perplexity"].get(mode)
            if not isinstance(table, dict) or not table:
                raise ValueError(f"results.variants[{i}].perplexity.{mode} must be a non-empty mapping")
            _check_length_map(table, f"results.variants[{i}].perplexity.{mode}")
        _check_length_map(record["passkey"], f"results.variants[{i}].passkey")


def _check_length_map(table: dict, where: str) -> None:
    for key, value in table.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"{where}: keys must be lengths as strings, got {key!r}")
        if not isinstance(value, float | int) or isinstance(value, bool):
            raise ValueError(f"{where}.{key} must be a number, got {value!r}")


def _lengths(results: dict[str, Any]) -> list[str]:
    seen = {k for v in results["variants"] for k in v["perplexity"]["non_overlapping"]}
    return sorted(seen, key=int)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value) or value >= 1e4:
        return f"{value:.2e}"
    return f"{value:.2f}"


def _cell(v: dict[str, Any], table: str, *keys: str, fmt=_fmt) -> str:
    """A table cell: the value, with ``± std`` over the seeds when the record merges several."""
    node = v[table]
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        return "-"
    spread = v.get("spread")
    if not spread or spread["n"] < 2 or table not in spread["std"]:
        return fmt(node)
    std = spread["std"][table]
    for key in keys:
        std = std[key]
    return f"{fmt(node)} ± {fmt(std)}"


def markdown_table(results: dict[str, Any]) -> str:
    """Perplexity (non-overlapping / sliding) and passkey accuracy by length, one row per variant
    (mean ± std over the fine-tune seeds when the comparison ran several)."""
    lengths = _lengths(results)
    pk_lengths = sorted({k for v in results["variants"] for k in v["passkey"]}, key=int)
    head = ["variant", "fine-tuned", "train tokens"] + (["seeds"] if results.get("seeds") else [])
    head += [f"ppl@{n}" for n in lengths] + [f"slide@{n}" for n in lengths] + [f"passkey@{n}" for n in pk_lengths]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in results["variants"]:
        cells = [v["name"], "yes" if v["finetuned"] else "no", f"{v['train_tokens']:,}"]
        if results.get("seeds"):
            cells.append(str(v["spread"]["n"]) if v.get("spread") else "1")
        cells += [_cell(v, "perplexity", "non_overlapping", n) for n in lengths]
        cells += [_cell(v, "perplexity", "sliding", n) for n in lengths]
        cells += [_cell(v, "passkey", n, fmt=lambda x: f"{x:.2f}") for n in pk_lengths]
        rows.append("| " + " | ".join(cells) + " |")
    seeds = (f" Fine-tuned variants: mean ± std over seeds {results['seeds']}; the others are deterministic "
             "(one run)." if results.get("seeds") else " One seed: no ordering in this table is a claim.")
    note = (f"\nBase model: `{results['base_model']}`, trained at L = {results['train_length']} tokens. "
            "ppl = per-token perplexity in non-overlapping windows of that length; slide = sliding window "
            "of that length with a fixed stride; passkey = retrieval accuracy over all depths." + seeds + "\n")
    return "\n".join(rows) + "\n" + note


def _ppl_values(results: dict[str, Any], name: str, length: int) -> list[float] | None:
    """Per-seed non-overlapping perplexities of variant ``name`` at ``length`` (None if absent)."""
    for v in results["variants"]:
        if v["name"] == name and str(length) in v["perplexity"]["non_overlapping"]:
            return seed_values(v, "perplexity", "non_overlapping", str(length))
    return None


def _check(name: str, ratios: list[float], threshold: float, below: bool) -> dict[str, Any]:
    """A direction check from its per-seed ratios: it holds (or fails) only when the ratio's 95 % interval
    lies wholly on one side of the threshold; with one run, by the value itself."""
    mean, low, high = interval(ratios)
    if below:
        verdict = "holds" if high <= threshold else ("fails" if low > threshold else NOT_SEPARABLE)
    else:
        verdict = "holds" if low >= threshold else ("fails" if high < threshold else NOT_SEPARABLE)
    return {"name": name, "value": mean, "ci": [low, high], "n": len(ratios), "threshold": threshold,
            "verdict": verdict, "passed": verdict == "holds"}


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-seed ratios; a deterministic (single-run) side pairs with every seed of the other."""
    if len(numerators) == len(denominators):
        return [a / b for a, b in zip(numerators, denominators)]
    if len(denominators) == 1:
        return [a / denominators[0] for a in numerators]
    if len(numerators) == 1:
        return [numerators[0] / b for b in denominators]
    raise ValueError(f"cannot pair {len(numerators)} seeds with {len(denominators)}")


def direction_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The literature's expected directions, computed from the results (unscaled RoPE
    breaks past its training length, PI/YaRN recover after a short fine-tune, ALiBi degrades gracefully).

    Each check has ``name``, ``value`` (the measured ratio, the mean over seeds), ``ci`` (its 95 % interval
    over seeds), ``n``, ``threshold``, ``verdict`` ("holds", "fails" or "not separable at this budget") and
    ``passed``; checks whose variants or lengths are missing are left out. Results that disagree are
    reported, not hidden.
    """
    L = results["train_length"]
    checks = []
    rope = {n: _ppl_values(results, "rope", n) for n in (L, 2 * L, 4 * L, 8 * L)}
    if rope[L] and rope[8 * L]:
        longer = [rope[n][0] for n in sorted(rope) if rope[n]]
        check = _check("unscaled RoPE: ppl@8L / ppl@L >= 1.5 and growing with length",
                       _ratios(rope[8 * L], rope[L]), 1.5, below=False)
        if not all(b > a for a, b in zip(longer, longer[1:])) and check["verdict"] == "holds":
            check.update(verdict="fails", passed=False)
        checks.append(check)
    extended = {n: _ppl_values(results, n, 4 * L) for n in ("rope_linear", "rope_yarn")}
    extended = {n: values for n, values in extended.items() if values}
    if extended and rope[L]:
        best = min(extended, key=lambda n: statistics.fmean(extended[n]))
        check = _check("best of fine-tuned PI / YaRN: ppl@4L / base ppl@L <= 1.3", _ratios(extended[best], rope[L]),
                       1.3, below=True)
        checks.append({**check, "variant": best})
    alibi = {n: _ppl_values(results, "alibi", n) for n in (L, 8 * L)}
    if alibi[L] and alibi[8 * L]:
        checks.append(_check("ALiBi: ppl@8L / its ppl@L <= 1.5", _ratios(alibi[8 * L], alibi[L]), 1.5, below=True))
    return checks


def checks_markdown(results: dict[str, Any]) -> str:
    checks = direction_checks(results)
    if not checks:
        return ""
    rows = ["| expected direction (literature) | measured (95 % interval over seeds) | holds |", "|---|---|---|"]
    for c in checks:
        measured = f"{c['value']:.2f}" + (f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}], n={c['n']}" if c["n"] > 1 else "")
        verdict = {"holds": "yes", "fails": "**no**"}.get(c["verdict"], c["verdict"])
        rows.append(f"| {c['name']} | {measured} | {verdict} |")
    return "\n".join(rows) + "\n"


#: Relative gap between two means below which no ordering is claimed, whatever the seeds say.
MIN_GAP = 0.01


def orderings(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Which variant has the lower perplexity, at every evaluated length, decided by the spread.

    Two variants separate when the 95 % intervals of their means over seeds do and the means differ by more
    than :data:`MIN_GAP` (a margin for the evaluation's own noise, which seeds do not measure: a deterministic
    variant's interval is a point); otherwise they are "not separable at this budget". With a single seed no
    pair with a fine-tuned variant separates. Every pair is compared, and :func:`letter_groups` gives the
    result as letters; ``pairs`` keeps the comparison of each neighbouring pair in the mean order.

    Returns:
        ``[{"length": n, "ranking": [(name, mean, low, high), ...], "pairs": [(a, relation, b), ...],
        "letters": {name: letters}}]``.
    """
    out = []
    single_seed = not results.get("seeds")

    def separated(a: tuple, b: tuple) -> bool:  # a, b: (name, mean, low, high, finetuned), a's mean lower
        unknown_spread = single_seed and (a[4] or b[4])
        return not unknown_spread and compare_intervals(a[1:4], b[1:4]) < 0 and b[1] > (1 + MIN_GAP) * a[1]

    for length in _lengths(results):
        ranking = []
        for v in results["variants"]:
            if length in v["perplexity"]["non_overlapping"]:
                values = seed_values(v, "perplexity", "non_overlapping", length)
                ranking.append((v["name"], *interval(values), v["finetuned"]))
        ranking.sort(key=lambda r: r[1])
        apart = {(a[0], b[0]) for i, a in enumerate(ranking) for b in ranking[i + 1 :] if separated(a, b)}
        pairs = [(a[0], "<" if (a[0], b[0]) in apart else NOT_SEPARABLE, b[0]) for a, b in zip(ranking, ranking[1:])]
        out.append({"length": int(length), "ranking": [r[:4] for r in ranking], "pairs": pairs,
                    "letters": letter_groups([r[0] for r in ranking], apart)})
    return out


def orderings_markdown(results: dict[str, Any]) -> str:
    """The orderings of :func:`orderings` as one line per length: variants by mean perplexity with letters."""
    lines = ["Orderings by perplexity (lowest mean first; two variants separate exactly where they share no letter: "
             f"their 95 % intervals over seeds separate and the means differ by more than {MIN_GAP:.0%}):", ""]
    for entry in orderings(results):
        cells = [f"{name} {mean:.2f} ({entry['letters'][name]})" for name, mean, _, _ in entry["ranking"]]
        lines.append(f"- @{entry['length']}: " + ", ".join(cells))
    lines += ["", f"A shared letter: {NOT_SEPARABLE}."]
    return "\n".join(lines) + "\n"


#: A recalibration that ends within this factor of the base's ppl@L has recovered.
RECOVERED_WITHIN = 1.10
#: A curve whose last quarter still lowers ppl@L by more than this fraction is still learning.
STILL_FALLING = 0.03


def _mean_curve(v: dict[str, Any]) -> list[tuple[int, float]]:
    """``[(train_tokens, ppl@L)]`` of a record's curve (the mean over seeds when it merges several)."""
    curves = [r["curve"] for r in v.get("spread", {}).get("runs", [])] or [v.get("curve") or []]
    points: dict[int, list[float]] = {}
    for curve in curves:
        for point in curve:
            points.setdefault(point["train_tokens"], []).append(point["perplexity"])
    return [(t, statistics.fmean(points[t])) for t in sorted(points)]


def recalibration(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For every variant with a curve: ppl@L along its fine-tune and whether it is bad or only under-trained.

    The verdict compares the end of the curve with the base model's ppl@L on the same tokens
    (``results["curve_reference"]``, measured by the comparison):
    ``recovered`` within 10 %; ``still improving: under-trained at this budget`` when the last quarter of
    the run still lowered ppl@L by more than 3 %; else ``plateaued at N x the base``: more of the same
    budget would not close the gap, so the encoding (or this way of recalibrating it) is the limit here.
    """
    base = (results.get("curve_reference") or {}).get("perplexity")
    out = []
    for v in results["variants"]:
        curve = _mean_curve(v)
        if len(curve) < 2:
            continue
        final_tokens, final = curve[-1]
        quarter = [p for t, p in curve if t <= 0.75 * final_tokens][-1]  # the last point before the last quarter
        if base is not None and final <= RECOVERED_WITHIN * base:
            verdict = "recovered (within 10 % of the base)"
        elif (quarter - final) / quarter > STILL_FALLING:
            verdict = "still improving: under-trained at this budget"
        else:
            verdict = f"plateaued at {final / base:.2f}x the base" if base else "plateaued"
        out.append({"name": v["name"], "curve": curve, "base": base, "final": final, "verdict": verdict})
    return out


def recalibration_markdown(results: dict[str, Any]) -> str:
    """The recalibration curves as a table: ppl@L at each checkpoint, and the verdict."""
    rows = recalibration(results)
    if not rows:
        return ""
    L = results["train_length"]
    reference = results.get("curve_reference") or {}
    lines = [f"**Recalibration**: ppl@{L} along each fine-tune (train tokens), on the first "
             f"{reference.get('tokens', '?')} held-out tokens, where the base (RoPE, not fine-tuned) has "
             f"{_fmt(rows[0]['base'])}", "", "| variant | curve (tokens: ppl) | verdict |", "|---|---|---|"]
    for row in rows:
        points = ", ".join(f"{t // 1000}k: {_fmt(p)}" for t, p in row["curve"])
        lines.append(f"| {row['name']} | {points} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    """Write one report figure (the same layout and resolution for all) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recalibration(results: dict[str, Any], path: Path) -> bool:
    """ppl@L against recalibration tokens, one line per variant with a curve; False if there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recalibration(results)
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, row in enumerate(rows):
        ax.plot([t for t, _ in row["curve"]], [p for _, p in row["curve"]], label=row["name"], **line_style(i))
    if rows[0]["base"] is not None:
        ax.axhline(rows[0]["base"], color="grey", linestyle=":", label="base (RoPE, not fine-tuned)")
    ax.set_yscale("log")
    ax.set_xlabel("recalibration tokens")
    ax.set_ylabel(f"perplexity at L = {results['train_length']}")
    ax.set_title("recalibration curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def eval_summary(results: dict[str, Any]) -> EvalSummary:
    """The numbers by length of a comparison as the results model (one method per variant)."""
    return EvalSummary(records_from_rows(comparison_rows(results)))


def _annotate(ax, grid: list[list[float]], fontsize: int) -> None:
    """Write each cell's accuracy on a heatmap (NaN cells stay empty), dark on light cells and light on dark."""
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if value < 0.6 else "black")


def plot_passkey(results: dict[str, Any], path: Path) -> None:
    """Heatmap of passkey accuracy: variants x lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({k for v in results["variants"] for k in v["passkey"]}, key=int)
    grid = [[v["passkey"].get(n, float("nan")) for n in lengths] for v in results["variants"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.45 * len(grid) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(grid)), [v["name"] for v in results["variants"]])
    _annotate(ax, grid, fontsize=10)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("variant")
    ax.set_title("passkey retrieval accuracy")
    fig.colorbar(image, ax=ax, label="accuracy (fraction of trials)")
    _save(fig, path)


def _ruler_tasks(results: dict[str, Any]) -> list[str]:
    present = {task for v in results["variants"] for task in v.get("ruler") or {}}
    return [task for task in TASKS if task in present]


def ruler_markdown(results: dict[str, Any]) -> str:
    """One table per RULER-style task: exact-match accuracy by length (depths pooled) with its 95 % Wilson
    interval, one row per variant. Empty when no variant was scored on the tasks."""
    blocks = []
    for task in _ruler_tasks(results):
        lengths = sorted({n for v in results["variants"] for n in (v.get("ruler") or {}).get(task, {})}, key=int)
        rows = [f"**{task}** (exact match, depths pooled, [95 % Wilson interval], trials)", "",
                "| variant | " + " | ".join(f"@{n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for v in results["variants"]:
            cells = (v.get("ruler") or {}).get(task, {})
            rows.append(f"| {v['name']} | " + " | ".join(
                f"{c['accuracy']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] n={c['trials']}" if (c := cells.get(n))
                else "-" for n in lengths) + " |")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def plot_ruler(results: dict[str, Any], task: str, path: Path) -> None:
    """Heatmap of one RULER-style task: variants x (length, depth) cells of exact-match accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [(v.get("ruler") or {}).get(task, {}) for v in results["variants"]]
    lengths = sorted({n for t in tables for n in t}, key=int)
    depths = sorted({d for t in tables for n in t for d in t[n]["by_depth"]}, key=float)
    columns = [(n, d) for n in lengths for d in depths]
    grid = [[t[n]["by_depth"][d]["accuracy"] if n in t and d in t[n]["by_depth"] else float("nan")
             for n, d in columns] for t in tables]
    fig, ax = plt.subplots(figsize=(0.8 * len(columns) + 3.5, 0.5 * len(grid) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [f"{n}\n@{d}" for n, d in columns], fontsize=9)
    ax.set_yticks(range(len(grid)), [v["name"] for v in results["variants"]])
    _annotate(ax, grid, fontsize=9)
    ax.set_xlabel("prompt length (tokens) @ needle depth")
    ax.set_ylabel("variant")
    ax.set_title(f"RULER-style {task}: exact-match accuracy")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    _save(fig, path)


def plot_seed_spread(results: dict[str, Any], path: Path) -> bool:
    """Perplexity vs length with every seed's value as a dot and the mean ± std as an error bar.

    Returns False (and writes nothing) when no variant merges several seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(v.get("spread") for v in results["variants"]):
        return False
    lengths = [int(n) for n in _lengths(results)]
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, v in enumerate(results["variants"]):
        table = v["perplexity"]["non_overlapping"]
        xs = [n for n in lengths if str(n) in table]
        # Offset each variant a little along x so that the bars of close variants do not hide each other.
        shift = 1 + 0.02 * (i - len(results["variants"]) / 2)
        per_seed = [seed_values(v, "perplexity", "non_overlapping", str(n)) for n in xs]
        means = [table[str(n)] for n in xs]
        stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in per_seed]
        style = line_style(i)
        ax.errorbar([n * shift for n in xs], means, yerr=stds, capsize=3, label=v["name"], **style)
        for n, seeds in zip(xs, per_seed):
            ax.scatter([n * shift] * len(seeds), seeds, s=8, color=style["color"], alpha=0.5)
    ax.axvline(results["train_length"], color="grey", linestyle=":", label="train length L")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (non-overlapping windows)")
    ax.set_title(f"perplexity by length: mean ± std over seeds {results.get('seeds')}, dots: single seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def plot_loss_by_position(results: dict[str, Any], path: Path) -> bool:
    """Mean loss per position bucket at the longest length (where a model stops using context).

    Returns False (and writes nothing) when the records carry no ``loss_by_position``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [(v["name"], v.get("loss_by_position") or {}) for v in results["variants"]]
    tables = [(name, t[max(t, key=int)]) for name, t in tables if t]
    if not tables:
        return False
    longest = max(int(max(v.get("loss_by_position") or {"0": 0}, key=int)) for v in results["variants"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, buckets) in enumerate(tables):
        xs = sorted(buckets, key=int)
        ax.plot([int(x) for x in xs], [buckets[x] for x in xs], label=name, **line_style(i))
    ax.axvline(results["train_length"], color="grey", linestyle=":", label="train length L")
    ax.set_xlabel(f"position in a window of {longest} tokens (bucket start)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title("loss by position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Validate and write every output file; return their paths."""
    validate_results(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "results.md",
        "perplexity_plot": out_dir / "perplexity_vs_length.png",
        "passkey_plot": out_dir / "passkey_heatmap.png",
    }
    summary = eval_summary(results)
    summary.write_csv(paths["csv"])
    results["direction_checks"] = direction_checks(results)
    results["orderings"] = orderings(results)
    results["consistency"] = consistency_checks(results)
    paths["json"].write_text(json.dumps(results, indent=2))
    checks = checks_markdown(results)
    consistency = consistency_markdown(results["consistency"])
    ruler_tables = ruler_markdown(results)
    paths["markdown"].write_text(markdown_table(results) + ("\n" + consistency if consistency else "")
                                 + ("\n" + checks if checks else "")
                                 + "\n" + orderings_markdown(results)
                                 + ("\n" + recalibration_markdown(results) if recalibration(results) else "")
                                 + ("\n" + ruler_tables if ruler_tables else ""))
    plot_results(summary, paths["perplexity_plot"], metrics=("perplexity", "perplexity_sliding"),
                 mark_length=results["train_length"])
    plot_passkey(results, paths["passkey_plot"])
    curves_plot = out_dir / "recalibration_curves.png"
    if plot_recalibration(results, curves_plot):
        paths["curves_plot"] = curves_plot
    spread_plot = out_dir / "perplexity_spread.png"
    if plot_seed_spread(results, spread_plot):
        paths["spread_plot"] = spread_plot
    position_plot = out_dir / "loss_by_position.png"
    if plot_loss_by_position(results, position_plot):
        paths["position_plot"] = position_plot
    for task in _ruler_tasks(results):
        paths[f"ruler_{task}_plot"] = out_dir / f"ruler_{task}.png"
        plot_ruler(results, task, paths[f"ruler_{task}_plot"])
    return paths


README_BEGIN = "<!-- hf-posenc compare: begin (generated by recipes/compare.py --readme) -->"
README_END = "<!-- hf-posenc compare: end -->"


def update_readme(readme: Path, paths: dict[str, Path], assets_dir: Path | None = None) -> None:
    """Replace the block between the compare markers of ``readme`` with the generated table and plots.

    The README then shows what the command produced, never hand-typed numbers. With ``assets_dir``
    the result files are copied there first (run folders are usually git-ignored), and the links
    point at the copies; links are relative to the README's folder.
    """
    import os
    import shutil

    if assets_dir is not None:
        assets_dir.mkdir(parents=True, exist_ok=True)
        copied = {}
        for key, path in paths.items():
            target = assets_dir / path.name
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
            copied[key] = target
        paths = copied
    text = readme.read_text() if readme.is_file() else ""
    rel = {k: os.path.relpath(p, readme.parent) for k, p in paths.items()}
    block = "\n".join([
        README_BEGIN, "", paths["markdown"].read_text().strip(), "",
        f"![perplexity vs length]({rel['perplexity_plot']})", "",
        f"![passkey accuracy]({rel['passkey_plot']})", "",
        *([f"![perplexity spread over seeds]({rel['spread_plot']})", ""] if "spread_plot" in rel else []),
        *([f"![recalibration curves]({rel['curves_plot']})", ""] if "curves_plot" in rel else []),
        *([f"![loss by position]({rel['position_plot']})", ""] if "position_plot" in rel else []),
        *[f"![RULER {key[6:-5]}]({rel[key]})\n" for key in rel if key.startswith("ruler_")],
        f"Full results: [`{rel['json']}`]({rel['json']}) (JSON), [`{rel['csv']}`]({rel['csv']}) (CSV).", README_END,
    ])
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def default_assets_dir(readme: Path, out_dir: Path) -> Path:
    """Where ``--readme`` copies a run's outputs: beside the recipes when the README is at a
    checkout's root (so the root and ``recipes/`` READMEs share one copy), else next to the README."""
    recipes = readme.parent / "recipes"
    base = recipes if recipes.is_dir() and readme.parent.resolve() != recipes.resolve() else readme.parent
    return base / "results" / out_dir.name
