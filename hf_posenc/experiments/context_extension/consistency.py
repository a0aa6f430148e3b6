"""Self-consistency of a comparison: a variant that *is* the base model within L must score the base's numbers at L.

Zero-shot dynamic NTK, Self-Extend with a neighbour window ``W >= L`` and ReRoPE with ``w >= L`` compute what the
unconverted RoPE model computes on sequences of up to L tokens (each encoding's config says so through
:meth:`hf_posenc.PosEncConfig.is_base_within`). When such a row scores differently at L, the number came from the
harness, not from the method (a stateful rotary module kept an enlarged scale after a long forward, for example),
and the report flags it instead of presenting it as a result.
"""

from __future__ import annotations

from typing import Any

from ...config import PosEncConfig

#: Relative tolerance on perplexity: the plug-in rotates in its own fp32 code, stock RoPE in the model's, so
#: the two agree to rounding, far below any difference a method makes.
PPL_RTOL = 1e-4


def _is_base(record: dict[str, Any]) -> bool:
    return not record["finetuned"] and PosEncConfig.from_dict(record["posenc"]) == PosEncConfig(kind="rope")


def _metrics_at(record: dict[str, Any], length: str) -> dict[str, float]:
    """The record's numbers at ``length``: perplexities, passkey and the RULER accuracies."""
    values = {f"ppl_{mode}": table[length] for mode, table in record["perplexity"].items() if length in table}
    if length in record["passkey"]:
        values["passkey"] = record["passkey"][length]
    for task, by_length in (record.get("ruler") or {}).items():
        if length in by_length:
            values[f"ruler_{task}"] = by_length[length]["accuracy"]
    return values


def _agree(metric: str, value: float, base: float) -> bool:
    if metric.startswith("ppl_"):
        return abs(value - base) <= PPL_RTOL * abs(base)
    return value == base  # the same logits give the same greedy answers


def consistency_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One check per variant that claims to be the base within L: its numbers at L against the base row's.

    Returns:
        ``[{"name", "length", "verdict": "consistent" | "VIOLATED", "mismatches": {metric: [value, base]}}]``,
        empty when the comparison has no untouched base row or no such variant.
    """
    length = results["train_length"]
    base = next((v for v in results["variants"] if _is_base(v)), None)
    if base is None:
        return []
    expected = _metrics_at(base, str(length))
    checks = []
    for record in results["variants"]:
        if record is base or record["finetuned"]:
            continue
        if not PosEncConfig.from_dict(record["posenc"]).is_base_within(length, length):
            continue
        values = _metrics_at(record, str(length))
        mismatches = {metric: [values[metric], expected[metric]] for metric in expected
                      if metric in values and not _agree(metric, values[metric], expected[metric])}
        checks.append({"name": record["name"], "length": length, "base": base["name"],
                       "verdict": "VIOLATED" if mismatches else "consistent", "mismatches": mismatches})
    return checks


def consistency_markdown(checks: list[dict[str, Any]]) -> str:
    """The checks as a short Markdown section (empty string without checks)."""
    if not checks:
        return ""
    lines = ["### Self-consistency at L", "",
             "Variants that compute exactly what the base computes within L (zero-shot dynamic NTK, Self-Extend "
             "with W >= L, ReRoPE with w >= L) must score the base's numbers there (perplexity within "
             f"{PPL_RTOL:g} relative, retrieval accuracies equal).", ""]
    for check in checks:
        if check["verdict"] == "consistent":
            lines.append(f"- {check['name']}: consistent with {check['base']} at L = {check['length']}.")
        else:
            detail = "; ".join(f"{metric} {value:.4g} vs {base:.4g}"
                               for metric, (value, base) in check["mismatches"].items())
            lines.append(f"- **{check['name']}: VIOLATED** at L = {check['length']} ({detail}): these numbers come "
                         "from the evaluation, not from the method.")
    return "\n".join(lines) + "\n"
