"""The results model: evaluation numbers in long format, how they are read, and their plot.

Results come as *long-format records*, one per (method, evaluation length), which is what a recipe's CSV/JSON
table holds (see :func:`load_results`)::

    {"method": "yarn", "length": 4096, "perplexity": 5.57, "passkey_accuracy": 1.0}

The core uses this module to put a recipe's numbers into a model card (``hf_posenc.cards``, ``hf_posenc.hub``);
the experiments write their tables through it (``hf_posenc.experiments.context_extension.report``). It
imports nothing else of hf_posenc, so both can depend on it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Metrics a results record may carry, with how they are named on the Hub and in tables.
#: ``(model-index metric type, human name, lower is better)``; the types are the Hub's metric ids
#: (https://huggingface.co/metrics) where one exists.
METRICS: dict[str, tuple[str, str, bool]] = {
    "perplexity": ("perplexity", "Perplexity", True),
    "perplexity_sliding": ("perplexity", "Perplexity (sliding window)", True),
    "bits_per_byte": ("bits_per_byte", "Bits per byte", True),
    "passkey_accuracy": ("accuracy", "Passkey accuracy", False),
}


@dataclass(frozen=True)
class ResultRecord:
    """One evaluation: a method at one length.

    Attributes:
        length: Evaluation length in tokens.
        method: Row label (``"yarn x4 + LoRA"``); ``None`` when a card describes one model.
        metrics: Metric name (a key of :data:`METRICS`) -> value.
    """

    length: int
    method: str | None
    metrics: dict[str, float]


@dataclass
class EvalSummary:
    """Evaluation numbers for a card, with the dataset they were measured on.

    Attributes:
        records: The results, one per (method, length).
        dataset_name: Human name of the evaluation data (``"Python stdlib sources"``).
        dataset_type: Hub dataset id or a short machine name; becomes ``datasets`` metadata when
            ``dataset_is_hub_id`` is true.
        dataset_split: Split the numbers were measured on.
        dataset_is_hub_id: Whether ``dataset_type`` names a Hub dataset (only then is it listed in
            the ``datasets`` metadata, which the Hub links to dataset pages).
        protocol: One line on how it was measured (window, stride), shown under the table.
    """

    records: list[ResultRecord]
    dataset_name: str = "evaluation text"
    dataset_type: str = "text"
    dataset_split: str | None = None
    dataset_is_hub_id: bool = False
    protocol: str | None = None

    def lengths(self) -> list[int]:
        """Evaluation lengths, ascending."""
        return sorted({r.length for r in self.records})

    def methods(self) -> list[str | None]:
        """Row labels in first-seen order."""
        return list(dict.fromkeys(r.method for r in self.records))

    def metric_names(self) -> list[str]:
        """Metrics present in any record, in :data:`METRICS` order."""
        present = {m for r in self.records for m in r.metrics}
        return [m for m in METRICS if m in present]

    def value(self, method: str | None, length: int, metric: str) -> float | None:
        """The value for one cell, or None if it was not measured."""
        for r in self.records:
            if r.method == method and r.length == length and metric in r.metrics:
                return r.metrics[metric]
        return None

    def table(self, metric: str) -> str:
        """A Markdown table: rows = methods, columns = lengths, for one metric."""
        lengths = self.lengths()
        header = "| method | " + " | ".join(f"{n:,}" for n in lengths) + " |"
        rule = "|---|" + "---:|" * len(lengths)
        rows = []
        for method in self.methods():
            cells = [self.value(method, n, metric) for n in lengths]
            shown = " | ".join("–" if v is None else _fmt(metric, v) for v in cells)
            rows.append(f"| {method or 'this model'} | {shown} |")
        return "\n".join([header, rule, *rows])

    def rows(self) -> list[dict[str, Any]]:
        """The long-format rows (``method``, ``length`` and one column per metric), as :func:`load_results`
        reads them."""
        return [{"method": r.method, "length": r.length, **r.metrics} for r in self.records]

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as CSV (empty cells for metrics a row lacks); :func:`load_results` reads it back."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["method", "length", *self.metric_names()])
            writer.writeheader()
            writer.writerows(self.rows())
        return Path(path)


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric == "passkey_accuracy" else f"{value:.3f}"


def records_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[ResultRecord]:
    """Validate long-format rows into :class:`ResultRecord` objects.

    Args:
        rows: Mappings with ``length`` (or ``eval_length`` / ``seq_len``), optionally ``method``,
            and one or more metric columns named as in :data:`METRICS`. Empty cells are skipped;
            other columns (``stride``, ``seed``) are ignored.

    Raises:
        ValueError: A row without a length, with no metric, or with a non-numeric / non-finite
            metric value (the message names the row and the allowed metric names).
    """
    out = []
    for i, row in enumerate(rows):
        length = next((row[k] for k in ("length", "eval_length", "seq_len") if row.get(k) not in (None, "")), None)
        if length is None:
            raise ValueError(f"results row {i} has no 'length' (or 'eval_length'/'seq_len'): {dict(row)!r}")
        metrics = {}
        for name in METRICS:
            raw = row.get(name)
            if raw in (None, ""):
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"results row {i}: {name}={raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"results row {i}: {name}={raw!r} is not finite")
            metrics[name] = value
        if not metrics:
            raise ValueError(f"results row {i} has no metric; expected one of {sorted(METRICS)}: {dict(row)!r}")
        method = row.get("method")
        out.append(ResultRecord(int(float(length)), None if method in (None, "") else str(method), metrics))
    return out


def load_results(path: str | Path, **summary_fields: Any) -> EvalSummary:
    """Read a recipe's results table (CSV, JSON list of rows, or JSON ``{"results": [...]}``).

    Args:
        path: The ``.csv`` or ``.json`` file.
        **summary_fields: :class:`EvalSummary` fields (``dataset_name``, ``protocol`` ...); a JSON
            object may carry them too, next to ``results``.

    Raises:
        ValueError: Unknown file type or malformed rows (see :func:`records_from_rows`).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    extra: dict[str, Any] = {}
    if path.suffix == ".csv":
        rows: list[Mapping[str, Any]] = list(csv.DictReader(io.StringIO(text)))
    elif path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "variants" in data:
            rows = comparison_rows(data)
        elif isinstance(data, dict):
            rows = data.get("results", [])
            extra = {k: v for k, v in data.items() if k in EvalSummary.__dataclass_fields__ and k != "records"}
        else:
            rows = data
    else:
        raise ValueError(f"results file {path} must end in .csv or .json, not {path.suffix!r}")
    return EvalSummary(records_from_rows(rows), **{**extra, **summary_fields})


def comparison_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows from the comparison recipe's ``results.json`` (its ``results.csv`` holds these rows).

    That file holds ``{"base_model", "train_length", "variants": [{"name", "perplexity":
    {"non_overlapping": {length: ppl}, "sliding": {...}}, "passkey": {length: accuracy}}]}``
    (schema: ``hf_posenc.experiments.context_extension.report.validate_results``); each variant becomes a method.
    """
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for variant in results["variants"]:
        tables = {
            "perplexity": variant.get("perplexity", {}).get("non_overlapping", {}),
            "perplexity_sliding": variant.get("perplexity", {}).get("sliding", {}),
            "passkey_accuracy": variant.get("passkey", {}),
        }
        for metric, table in tables.items():
            for length, value in table.items():
                row = by_key.setdefault((variant["name"], int(length)),
                                        {"method": variant["name"], "length": int(length)})
                row[metric] = value
    return list(by_key.values())


def select_method(summary: EvalSummary, method: str) -> EvalSummary:
    """The summary restricted to one method's rows (the card of one variant of a comparison).

    Raises:
        ValueError: If ``method`` is not in the results (the message lists the methods present).
    """
    if method not in summary.methods():
        raise ValueError(f"method {method!r} is not in the results; available: {summary.methods()}")
    rows = [r for r in summary.records if r.method == method]
    return EvalSummary(rows, summary.dataset_name, summary.dataset_type, summary.dataset_split,
                       summary.dataset_is_hub_id, summary.protocol)


#: Markers and line styles that tell lines apart without colour (and where two lines overlap, as NoPE and T5 bias
#: can): line ``i`` takes marker ``i % 10`` and style ``i // 10 % 4`` or, within the first ten, ``i % 4``.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
_LINESTYLES = ("-", "--", "-.", ":")


def line_style(i: int) -> dict[str, Any]:
    """Matplotlib keyword arguments for the ``i``-th line of a plot: its own colour (tab20), marker and line style,
    hollow markers of decreasing size so that coinciding points stay visible."""
    import matplotlib.pyplot as plt

    return {"color": plt.get_cmap("tab20")(i % 20), "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)], "markersize": 8 - 3 * (i % 2),
            "markerfacecolor": "none" if i % 2 else None}


def plot_results(summary: EvalSummary, path: str | Path, metrics: str | Sequence[str] | None = None,
                 mark_length: int | None = None) -> Path:
    """Write the log-scale metric-vs-length plot (one line per method, one panel per metric) as a PNG.

    Args:
        summary: The numbers.
        path: Output file.
        metrics: Metric(s) to plot, side by side; defaults to the first lower-is-better metric present.
        mark_length: A length to mark with a vertical line (the training length of a comparison).

    Raises:
        ValueError: If the summary lacks a requested metric (the message lists those it has).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    names = summary.metric_names()
    if metrics is None:
        metrics = [next((m for m in names if METRICS[m][2]), None)]
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [m for m in metrics if m not in names]
    if missing:
        raise ValueError(f"cannot plot metric(s) {missing}; the results have {names}")
    many = len(metrics) > 1
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics) + 1.5 * many, 3.2 + 0.6 * many), dpi=100,
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, method in enumerate(summary.methods()):
            points = [(n, summary.value(method, n, metric)) for n in summary.lengths()]
            points = [(n, v) for n, v in points if v is not None]
            ax.plot([n for n, _ in points], [v for _, v in points], label=method or "this model", **line_style(i))
        if mark_length is not None:
            ax.axvline(mark_length, color="grey", linestyle=":", label="train length L")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel(METRICS[metric][1])
        if many:
            ax.set_title(METRICS[metric][1])
        ax.grid(True, which="both", alpha=0.3)
    if many:  # side-by-side panels: one legend, beside the last panel rather than over its lines
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    # Fixed metadata keeps the PNG bytes reproducible, so re-pushing the same card is a no-op commit.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


__all__ = ["METRICS", "ResultRecord", "EvalSummary", "records_from_rows", "load_results", "comparison_rows",
           "select_method", "plot_results", "line_style"]
