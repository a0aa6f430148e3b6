"""Passkey retrieval accuracy as an offline-loadable ``evaluate`` module.

The passkey test (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300) hides "the pass key is
NNNNN" at some depth of a long filler text and asks for it at the end. A generation counts as
correct when the first run of digits it contains is exactly the key, so "68220." and " 68220 is the
pass key" are right and "6822" or "682200" are wrong.

Load it with ``evaluate.load("recipes/metrics/passkey_accuracy")``.
"""

import re

import datasets
import evaluate

_DESCRIPTION = "Fraction of generations whose first digit run equals the hidden pass key."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's greedy continuations of the question.
    references (list of str): the pass keys (digits).
Returns:
    accuracy (float): fraction of exact key matches.
Examples:
    >>> metric = evaluate.load("recipes/metrics/passkey_accuracy")
    >>> metric.compute(predictions=[" 68220. Done", "6822"], references=["68220", "68220"])
    {'accuracy': 0.5}
"""

_DIGITS = re.compile(r"\d+")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PasskeyAccuracy(evaluate.Metric):
    """Exact-match accuracy of the first digit run of each generation against the key."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("passkey_accuracy needs at least one prediction")
        correct = 0
        for prediction, key in zip(predictions, references):
            found = _DIGITS.search(prediction)
            correct += int(found is not None and found.group(0) == key.strip())
        return {"accuracy": correct / len(predictions)}
