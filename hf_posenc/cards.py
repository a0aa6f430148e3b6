"""Model cards for converted models, LoRA adapters and comparison reports.

Cards are rendered from the Jinja templates in ``model_cards/`` (shipped inside the package as
``hf_posenc/model_cards``, with the repository-level folder as the development fallback) through
:meth:`huggingface_hub.ModelCard.from_template`, so the YAML front matter is produced by
:class:`huggingface_hub.ModelCardData` and follows the Hub's metadata spec
(https://huggingface.co/docs/hub/model-cards#model-card-metadata). Evaluation numbers become
``model-index`` entries through :class:`huggingface_hub.EvalResult`
(https://github.com/huggingface/hub-docs/blob/main/modelcard.md).

Evaluation results come in as *long-format records*, one per (method, evaluation length), which is
what a recipe's CSV/JSON table holds (see :func:`load_results`)::

    {"method": "yarn", "length": 4096, "perplexity": 5.57, "passkey_accuracy": 1.0}
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

#: Metrics a results record may carry, with how they are named on the Hub and in tables.
#: ``(model-index metric type, human name, lower is better)``; the types are the Hub's metric ids
#: (https://huggingface.co/metrics) where one exists.
METRICS: dict[str, tuple[str, str, bool]] = {
    "perplexity": ("perplexity", "Perplexity", True),
    "perplexity_sliding": ("perplexity", "Perplexity (sliding window)", True),
    "bits_per_byte": ("bits_per_byte", "Bits per byte", True),
    "passkey_accuracy": ("accuracy", "Passkey accuracy", False),
}

#: Card kinds and their templates.
TEMPLATES = {
    "model": "converted_model.md",
    "adapter": "lora_adapter.md",
    "report": "comparison_report.md",
}

#: File name of the perplexity-by-length plot written next to the card.
PLOT_FILENAME = "ppl_by_length.png"


def template_dir() -> Path:
    """Folder holding the card templates.

    The templates live in the repository's ``model_cards/`` folder (editable installs); a wheel
    installs them under ``<prefix>/share/hf_posenc/model_cards`` (pyproject ``data-files``). The first
    that exists wins.

    Raises:
        FileNotFoundError: If no folder holds them (a broken install).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "model_cards", here.parent / "model_cards",
                  Path(sys.prefix) / "share" / "hf_posenc" / "model_cards")
    for candidate in candidates:
        if (candidate / TEMPLATES["model"]).is_file():
            return candidate
    raise FileNotFoundError(f"hf_posenc card templates not found in any of {[str(c) for c in candidates]}")


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
            rows.append(f"| {method or 'this model'} | " + " | ".join("–" if v is None else _fmt(metric, v) for v in cells) + " |")
        return "\n".join([header, rule, *rows])

    def eval_results(self, method: str | None = None) -> list[EvalResult]:
        """``model-index`` entries for one method's numbers (every metric at every length)."""
        out = []
        for r in sorted((r for r in self.records if r.method == method), key=lambda r: r.length):
            for metric, value in r.metrics.items():
                metric_type, name, _ = METRICS[metric]
                out.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Language modelling by context length",
                        dataset_type=self.dataset_type,
                        dataset_name=self.dataset_name,
                        dataset_split=self.dataset_split,
                        metric_type=metric_type,
                        metric_name=f"{name} @ {r.length} tokens",
                        metric_config=f"length={r.length}",
                        metric_value=float(value),
                    )
                )
        return out


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
        rows: list[Mapping[str, Any]] = _widen(list(csv.DictReader(io.StringIO(text))))
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


# Metric names of the comparison recipe's long CSV (hf_posenc.extension.report.write_csv) -> ours.
_RECIPE_METRICS = {
    "perplexity_non_overlapping": "perplexity",
    "perplexity_sliding": "perplexity_sliding",
    "passkey_accuracy": "passkey_accuracy",
}


def comparison_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows from the comparison recipe's ``results.json``.

    That file holds ``{"base_model", "train_length", "variants": [{"name", "perplexity":
    {"non_overlapping": {length: ppl}, "sliding": {...}}, "passkey": {length: accuracy}}]}``
    (schema: ``hf_posenc.extension.report.validate_results``); each variant becomes a method.
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
                row = by_key.setdefault((variant["name"], int(length)), {"method": variant["name"], "length": int(length)})
                row[metric] = value
    return list(by_key.values())


def _widen(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn ``(variant, metric, length, value)`` rows (the recipe's CSV) into one row per (method, length)."""
    if not rows or "metric" not in rows[0] or "value" not in rows[0]:
        return rows
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for i, row in enumerate(rows):
        metric = _RECIPE_METRICS.get(row["metric"], row["metric"])
        if metric not in METRICS:
            raise ValueError(f"results row {i}: unknown metric {row['metric']!r}; expected one of {sorted(_RECIPE_METRICS)}")
        method = row.get("variant") or row.get("method")
        wide = by_key.setdefault((method, row["length"]), {"method": method, "length": row["length"]})
        wide[metric] = row["value"]
    return list(by_key.values())


def select_method(summary: EvalSummary, method: str) -> EvalSummary:
    """The summary restricted to one method's rows (the card of one variant of a comparison).

    Raises:
        ValueError: If ``method`` is not in the results (the message lists the methods present).
    """
    if method not in summary.methods():
        raise ValueError(f"method {method!r} is not in the results; available: {summary.methods()}")
    rows = [r for r in summary.records if r.method == method]
    return EvalSummary(rows, summary.dataset_name, summary.dataset_type, summary.dataset_split, summary.dataset_is_hub_id, summary.protocol)


def plot_results(summary: EvalSummary, path: str | Path, metric: str | None = None) -> Path:
    """Write the log-scale metric-vs-length plot (one line per method) as a PNG.

    Args:
        summary: The numbers.
        path: Output file.
        metric: Metric to plot; defaults to the first lower-is-better metric present.

    Raises:
        ValueError: If the summary has no such metric.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    names = summary.metric_names()
    metric = metric or next((m for m in names if METRICS[m][2]), None)
    if metric not in names:
        raise ValueError(f"cannot plot metric {metric!r}; the results have {names}")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for method in summary.methods():
        points = [(n, summary.value(method, n, metric)) for n in summary.lengths()]
        points = [(n, v) for n, v in points if v is not None]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=method or "this model")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(METRICS[metric][1])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    # Fixed metadata keeps the PNG bytes reproducible, so re-pushing the same card is a no-op commit.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


@dataclass
class CardInfo:
    """Everything a card says about a converted model or adapter.

    Attributes:
        repo_id: Where the card will live (used in the loading snippet).
        base_model: Hub id of the model it was derived from (``base_model`` metadata), if known.
        posenc: The encoding dict recorded in ``config.posenc`` (``{"kind": ...}``); None for a stock model.
        native: Whether stock transformers loads the checkpoint with the same encoding (native RoPE
            variants) — then no ``trust_remote_code`` is needed.
        original_encoding: What the base model used (``"rope (theta 10000)"``), for the card's first line.
        architecture: ``architectures[0]`` of the config.
        adapter: For adapters, ``{"peft_type", "r", "lora_alpha", "target_modules", "modules_to_save",
            "base_model_repo"}``; None for full models.
        training: Training budget (steps, tokens, sequence length, learning rate ...), shown as a table.
        results: Evaluation numbers, if any.
        datasets: Hub dataset ids used for training/evaluation (``datasets`` metadata).
        license: SPDX id or Hub license id.
        extra_tags: More tags.
        extra_metadata: Metadata to keep verbatim (e.g. peft's own card metadata).
        plot_file: Name of the plot file in the repo, when one is pushed with the card.
    """

    repo_id: str
    base_model: str | None = None
    posenc: dict[str, Any] | None = None
    native: bool = False
    original_encoding: str | None = None
    architecture: str | None = None
    adapter: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    results: EvalSummary | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    extra_tags: list[str] = field(default_factory=list)
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    plot_file: str | None = None


def encoding_tags(posenc: Mapping[str, Any] | None) -> list[str]:
    """Tags naming the encoding: ``hf_posenc``, ``posenc-<kind>`` and, for RoPE, ``rope-<type>``."""
    tags = ["hf_posenc"]
    if posenc:
        tags.append(f"posenc-{posenc['kind']}")
        if posenc["kind"] == "rope":
            tags.append(f"rope-{posenc.get('rope_type') or 'default'}")
    return tags


def describe_encoding(posenc: Mapping[str, Any] | None) -> str:
    """One human phrase for an encoding dict (``"RoPE, yarn scaling x4"``, ``"ALiBi"``)."""
    if not posenc:
        return "the model's own positional encoding"
    kind = posenc["kind"]
    names = {"rope": "RoPE", "nope": "no positional encoding (NoPE)", "alibi": "ALiBi", "t5_bias": "T5 relative bias", "cope": "CoPE",
             "self_extend": "Self-Extend", "rerope": "ReRoPE"}
    text = names.get(kind, kind)
    # Issue 10: the training-free extensions name their windows.
    if kind == "self_extend":
        text += f" (group size {posenc.get('group_size')}, neighbour window {posenc.get('neighbor_window')})"
    if kind == "rerope":
        text = ("Leaky ReRoPE" if posenc.get("leak") else text) + f" (window {posenc.get('window')}"
        text += f", leak {posenc['leak']:g})" if posenc.get("leak") else ")"
    if kind == "rope" and posenc.get("rope_type") not in (None, "default"):
        text += f", {posenc['rope_type']} scaling"
        if posenc.get("factor"):
            text += f" x{posenc['factor']:g}"
    if posenc.get("layers") is not None:
        text += f" on layers {list(posenc['layers'])} (NoPE elsewhere)"
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def render_card(info: CardInfo) -> ModelCard:
    """Render the card of a converted model (``info.adapter is None``) or of a LoRA adapter.

    Args:
        info: What to say.

    Returns:
        The card; ``str(card)`` is the README.md text, ``card.data`` its metadata.
    """
    is_adapter = info.adapter is not None
    tags = encoding_tags(info.posenc)
    if is_adapter:
        tags += ["lora", str(info.adapter.get("peft_type", "LORA")).lower()]
        if info.base_model:
            tags.append(f"base_model:adapter:{info.base_model}")  # the tag peft writes
    elif not info.native:
        tags.append("custom_code")  # the Hub's tag for repos that need trust_remote_code
    tags += ["text-generation", *info.extra_tags]
    results = info.results
    eval_results = results.eval_results(_single_method(results)) if results and results.records else None
    metadata = dict(info.extra_metadata)
    tags = _unique([*(metadata.pop("tags", None) or []), *tags])
    card_data = ModelCardData(
        base_model=info.base_model,
        base_model_relation=("adapter" if is_adapter else "finetune") if info.base_model else None,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_unique([*info.datasets, *([results.dataset_type] if results and results.dataset_is_hub_id else [])]) or None,
        license=info.license or metadata.pop("license", None),
        model_name=info.repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
        **{k: v for k, v in metadata.items() if k not in ("base_model", "library_name", "pipeline_tag", "datasets", "model-index")},
    )
    kind = "adapter" if is_adapter else "model"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_dir() / TEMPLATES[kind]),
        info=info,
        encoding=describe_encoding(info.posenc),
        # Unset (None) fields mean "the model's own value"; listing them would bury the real settings.
        posenc_json=json.dumps({k: v for k, v in info.posenc.items() if v is not None}, indent=2, sort_keys=True) if info.posenc else None,
        results_tables=_tables(results),
        plot_file=info.plot_file,
        training_rows=sorted((info.training or {}).items()),
    )


def render_report(
    results: EvalSummary,
    *,
    title: str,
    base_model: str | None = None,
    description: str | None = None,
    plot_file: str | None = None,
    datasets: Sequence[str] = (),
) -> ModelCard:
    """Render a comparison report: every method's numbers by length, side by side.

    Args:
        results: Records of several methods.
        title: Report heading.
        base_model: The model all methods started from.
        description: A paragraph on the setup.
        plot_file: Plot shipped with the report.
        datasets: Hub dataset ids.
    """
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hf_posenc", "context-extension", "report"],
        datasets=list(datasets) or None,
    )
    best = {}
    for metric in results.metric_names():
        lower = METRICS[metric][2]
        for n in results.lengths():
            cells = [(results.value(m, n, metric), m) for m in results.methods()]
            cells = [c for c in cells if c[0] is not None]
            if cells:
                best[(metric, n)] = (min if lower else max)(cells, key=lambda c: c[0])[1]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_dir() / TEMPLATES["report"]),
        title=title,
        description=description,
        base_model=base_model,
        results=results,
        results_tables=_tables(results),
        best=[(METRICS[m][1], n, method) for (m, n), method in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1]))],
        plot_file=plot_file,
    )


def _single_method(results: EvalSummary) -> str | None:
    methods = results.methods()
    if len(methods) != 1:
        raise ValueError(
            f"a model card reports one model's numbers, but the results hold methods {methods}; "
            "filter them to this model's rows, or use render_report for a comparison"
        )
    return methods[0]


def _tables(results: EvalSummary | None) -> list[tuple[str, str]]:
    if results is None or not results.records:
        return []
    return [(METRICS[m][1], results.table(m)) for m in results.metric_names()]
