"""Evaluate one model at several lengths: perplexity, loss by position, passkey retrieval.

Perplexity is measured in non-overlapping windows and with a sliding window; passkey retrieval by
length and depth.

    python recipes/evaluate_context.py --config recipes/configs/evaluate_quick.yaml [key.sub=value ...]

Also callable from Python:
``hf_posenc.experiments.context_extension.evaluation.evaluate_context(model, tokenizer, stream, cfg)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable from a checkout without installing the package. Installed (hf_posenc/_recipes) or copied out
# with `hf-posenc recipes cp`, the folder above holds no package, and putting it on sys.path would make
# hf_posenc's own modules (config, hub, ...) importable as top-level names.
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "hf_posenc" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from hf_posenc.experiments.config import ConfigError, encoding_dict, load_config  # noqa: E402
from hf_posenc.experiments.context_extension.config import EvaluateConfig  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, or a shipped evaluate preset name")
    parser.add_argument("overrides", nargs="*", help="key.sub=value changes")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --out
    try:
        cfg = load_config(EvaluateConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"config error: {err}")

    from hf_posenc.experiments.context_extension.data import eval_stream, load_texts
    from hf_posenc.experiments.context_extension.evaluation import evaluate_context
    from hf_posenc.experiments.context_extension.models import apply_encoding, load_model, load_tokenizer, resolve
    from hf_posenc.peft_utils import load_adapter

    source = resolve(cfg.model, cfg.data.held_out_percent)
    tokenizer = load_tokenizer(source)
    model = load_model(source, cfg.model.dtype)
    if cfg.posenc is not None:
        model = apply_encoding(model, cfg.posenc)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter).merge_and_unload()
    stream = eval_stream(load_texts(cfg.data, cfg.data.eval_split), tokenizer, cfg.eval.stream_tokens())
    posenc = None if cfg.posenc is None else encoding_dict(cfg.posenc)
    result = {"model": source.label, "posenc": posenc, "adapter": cfg.adapter,
              **evaluate_context(model, tokenizer, stream, cfg.eval)}
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["perplexity"], indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
