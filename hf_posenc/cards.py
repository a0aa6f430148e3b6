"""Model cards for converted models, LoRA adapters and comparison reports.

Cards are rendered from the Jinja templates in ``model_cards/`` (shipped inside the package as
``hf_posenc/model_cards``, with the repository-level folder as the development fallback) through
:meth:`huggingface_hub.ModelCard.from_template`, so the YAML front matter is produced by
:class:`huggingface_hub.ModelCardData` and follows the Hub's metadata spec
(https://huggingface.co/docs/hub/model-cards#model-card-metadata). Evaluation numbers become
``model-index`` entries through :class:`huggingface_hub.EvalResult`
(https://github.com/huggingface/hub-docs/blob/main/modelcard.md).

Evaluation numbers come in as an :class:`hf_posenc.results.EvalSummary` (the results model, its loaders and
its plot live in :mod:`hf_posenc.results`); this module only renders them into cards.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import registry
from .results import METRICS, EvalSummary

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
    text = registry.get(kind).display_name if kind in registry.kinds() else kind
    if kind == "rope" and posenc.get("rope_type") not in (None, "default"):
        text += f", {posenc['rope_type']} scaling"
        if posenc.get("factor"):
            text += f" x{posenc['factor']:g}"
    if posenc.get("layers") is not None:
        text += f" on layers {list(posenc['layers'])} (NoPE elsewhere)"
    return text


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def model_index(summary: EvalSummary, method: str | None = None) -> list[EvalResult]:
    """``model-index`` entries (:class:`huggingface_hub.EvalResult`) for one method's numbers (every metric at
    every length)."""
    out = []
    for r in sorted((r for r in summary.records if r.method == method), key=lambda r: r.length):
        for metric, value in r.metrics.items():
            metric_type, name, _ = METRICS[metric]
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Language modelling by context length",
                    dataset_type=summary.dataset_type,
                    dataset_name=summary.dataset_name,
                    dataset_split=summary.dataset_split,
                    metric_type=metric_type,
                    metric_name=f"{name} @ {r.length} tokens",
                    metric_config=f"length={r.length}",
                    metric_value=float(value),
                )
            )
    return out


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
    eval_results = model_index(results, _single_method(results)) if results and results.records else None
    metadata = dict(info.extra_metadata)
    tags = _unique([*(metadata.pop("tags", None) or []), *tags])
    card_data = ModelCardData(
        base_model=info.base_model,
        base_model_relation=("adapter" if is_adapter else "finetune") if info.base_model else None,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_unique([*info.datasets,
                          *([results.dataset_type] if results and results.dataset_is_hub_id else [])]) or None,
        license=info.license or metadata.pop("license", None),
        model_name=info.repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
        **{k: v for k, v in metadata.items()
           if k not in ("base_model", "library_name", "pipeline_tag", "datasets", "model-index")},
    )
    kind = "adapter" if is_adapter else "model"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_dir() / TEMPLATES[kind]),
        info=info,
        encoding=describe_encoding(info.posenc),
        # Unset (None) fields mean "the model's own value"; listing them would bury the real settings.
        posenc_json=(json.dumps({k: v for k, v in info.posenc.items() if v is not None}, indent=2, sort_keys=True)
                     if info.posenc else None),
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
        best=[(METRICS[m][1], n, method)
              for (m, n), method in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1]))],
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
