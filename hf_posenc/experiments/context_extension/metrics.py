"""The shipped ``evaluate`` modules (``recipes/metrics/``) that score perplexity, passkeys and RULER needles."""

from __future__ import annotations

from ... import presets


def load_metric(name: str, config_name: str | None = None):
    """Load one of the shipped ``evaluate`` modules from its local folder (no Hub access).

    The folder is ``recipes/metrics/<name>`` in a checkout and ``hf_posenc/_recipes/metrics/<name>`` in a
    wheel install (:func:`hf_posenc.presets.recipes_dir`).
    """
    # Third-party and slow to import: only loaded when a metric is.
    import evaluate

    return evaluate.load(str(presets.recipes_dir() / "metrics" / name), config_name)


__all__ = ["load_metric"]
