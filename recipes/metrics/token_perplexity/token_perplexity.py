"""Per-token perplexity with loss by position bucket, as an offline-loadable ``evaluate`` module.

Load it with ``evaluate.load("recipes/metrics/token_perplexity")``. Inputs are per-token negative
log-likelihoods (natural log) and the position of each predicted token inside its window; the
metric aggregates them into perplexity ``exp(mean NLL)`` and the mean loss of each position bucket,
which shows where a model stops using its context (Press et al. 2022, ALiBi,
https://arxiv.org/abs/2108.12409, Fig. 3 style).
"""

import math
from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = "Perplexity from per-token NLLs, plus the mean NLL per position bucket."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): negative log-likelihood of each predicted token (natural log).
    references (list of int): position of that token in its evaluation window (0-based).
    bucket_size (int): width of the position buckets (default 256).
Returns:
    perplexity (float): exp of the mean NLL over all tokens.
    mean_nll (float): the mean NLL.
    num_tokens (int): how many tokens were scored.
    loss_by_bucket (dict): bucket start position (str) -> mean NLL of the tokens in that bucket.
Examples:
    >>> metric = evaluate.load("recipes/metrics/token_perplexity")
    >>> metric.compute(predictions=[1.0, 3.0], references=[0, 300], bucket_size=256)["perplexity"]
    7.38905609893065
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenPerplexity(evaluate.Metric):
    """Perplexity and loss by position bucket from per-token NLLs."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, bucket_size=256):
        if not predictions:
            raise ValueError("token_perplexity needs at least one token")
        if bucket_size <= 0:
            raise ValueError(f"bucket_size must be positive, got {bucket_size}")
        # Sum in double precision: tens of thousands of float32 losses lose digits otherwise.
        total = math.fsum(predictions)
        sums = defaultdict(float)
        counts = defaultdict(int)
        for nll, position in zip(predictions, references):
            start = (position // bucket_size) * bucket_size
            sums[start] += nll
            counts[start] += 1
        mean = total / len(predictions)
        return {
            "perplexity": math.exp(mean),
            "mean_nll": mean,
            "num_tokens": len(predictions),
            "loss_by_bucket": {str(k): sums[k] / counts[k] for k in sorted(sums)},
        }
