"""Exact match of needle answers with a Wilson score interval, as an offline-loadable ``evaluate`` module.

Scores the RULER-style tasks of ``hf_posenc`` (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654):
a reference holds one or more digit strings separated by spaces, and a greedy continuation is correct
when its first digit runs are exactly those strings, in order ("68220." and " 68220 is the key" match
"68220"; "6822" and "682200" do not; "11111, 22222, 33333]" matches "11111 22222 33333").

The configuration name is the task (``single_needle``, ``multi_key``, ``multi_value``,
``variable_tracking``); it labels the result and is checked, the rule is the same for all four.
Load it with ``evaluate.load("recipes/metrics/needle_exact_match", "multi_key")``.
"""

import math
import re

import datasets
import evaluate

_DESCRIPTION = "Fraction of continuations whose first digit runs equal the hidden values, with a 95% Wilson interval."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's greedy continuations of the question.
    references (list of str): the expected values (digit strings), space-separated when there are several.
Returns:
    accuracy (float): fraction of exact matches.
    ci_low, ci_high (float): the 95% Wilson score interval of the accuracy.
    trials (int): the number of predictions.
Examples:
    >>> metric = evaluate.load("recipes/metrics/needle_exact_match", "single_needle")
    >>> metric.compute(predictions=[" 68220. Done", "6822"], references=["68220", "68220"])["accuracy"]
    0.5
"""
_TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking")
_DIGITS = re.compile(r"\d+")
_Z = 1.96  # two-sided 95 %


def wilson_interval(successes: int, trials: int, z: float = _Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (E. B. Wilson, JASA 1927)."""
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NeedleExactMatch(evaluate.Metric):
    """Exact match of the first digit runs of each continuation against the hidden values."""

    def _info(self):
        if self.config_name not in _TASKS + ("default",):
            raise ValueError(f"unknown task {self.config_name!r}; allowed: {', '.join(_TASKS)}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Hsieh et al. 2024, RULER: What's the Real Context Size of Your Long-Context Language Models?",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("needle_exact_match needs at least one prediction")
        correct = 0
        for prediction, reference in zip(predictions, references):
            expected = reference.split()
            found = _DIGITS.findall(prediction)[: len(expected)]
            correct += int(found == expected)
        low, high = wilson_interval(correct, len(predictions))
        return {"accuracy": correct / len(predictions), "ci_low": low, "ci_high": high, "trials": len(predictions)}
