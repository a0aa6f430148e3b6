"""The recipe's fine-tuning of many encodings in one launch (``tests/test_sequence_parallel_recipe.py``).

Run twice per test: in one plain process with ``train.sp_size=1``, and under ``accelerate launch --config_file
recipes/accelerate/sequence_parallel.yaml`` on 2 CPU processes with ``train.sp_size=2``. Each case is what
``recipes/finetune_lora.py`` does between loading and saving (the recipe's ``make_accelerator``,
``apply_encoding`` and ``finetune_lora``), on a tiny random Llama with 4 heads and 4 or 1 KV heads, its learned
position tables randomised so that a table read at the wrong head offset changes the result.

A launch starts once (importing DeepSpeed and setting up gloo costs more than a case), so one ``Accelerator``
trains every case in turn, released between them with ``Accelerator.free_memory`` as Accelerate documents for
successive trainings. Ulysses leaves two process-wide states behind that only a teardown of the whole process
group clears: the attention function's registry entry (wrapped in place) and DeepSpeed's sequence-parallel
groups (a second ``initialize_sequence_parallel`` asserts there are none). Both are put back between cases
(:func:`hf_posenc.parallel.ulysses_scope`).

Rank 0 writes ``{case: {"stats": ..., "trained": {name: update}}}`` (:func:`updates`) with ``torch.save``;
every rank adds its ``param_checksum`` to ``checksums``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

# The repository root before any installed copy, then the tests' helpers.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

EMBEDDED = ROOT / "hf_posenc" / "experiments" / "context_extension" / "embedded_base"
#: KV heads of the cases: as many as the query heads, and fewer than the ranks (DeepSpeed repeats it).
KV_HEADS = (4, 1)


def case_kinds() -> list[str]:
    """Every token kind: those on an hf_posenc attention function and those that keep the stock one (NoPE)."""
    from tiny_models import kinds_where

    return kinds_where(lambda c: True)


def base_model(kv_heads: int):
    """A tiny random Llama (4 heads of 8, ``kv_heads`` KV heads), the same in every process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(EMBEDDED)
    config.update({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": kv_heads, "head_dim": 8,
                   "num_hidden_layers": 2, "intermediate_size": 64, "attention_dropout": 0.0})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def training_texts() -> list[str]:
    """A few standard-library sources: enough tokens for the cases' windows, no download."""
    import argparse as one
    import json as two

    return [Path(one.__file__).read_text(), Path(two.__file__).read_text()]


def updates(model) -> dict[str, torch.Tensor]:
    """What training changed in each trainable parameter: a position table's update (PEFT keeps its starting
    value as ``original_module``: the randomised table would drown a small error), else the value (LoRA B
    starts at zero, so its value is its update)."""
    params = dict(model.named_parameters())
    result = {}
    for name, param in params.items():
        if not param.requires_grad:
            continue
        copy = ".modules_to_save.default."
        start = params[name.replace(copy, ".original_module.")] if copy in name else None
        result[name] = (param - start if start is not None else param).detach().clone()
    return result


def run_case(accelerator, kind: str, kv_heads: int, sp_size: int) -> dict:
    """One fine-tuning as the recipe runs it; returns its statistics and trained weights."""
    from accelerate.utils import set_seed
    from tiny_models import example_params, randomize_position_tables
    from transformers import AutoTokenizer

    from hf_posenc import PosEncConfig, parallel
    from hf_posenc.experiments.context_extension.config import LoraSettings, TrainConfig
    from hf_posenc.experiments.context_extension.models import apply_encoding
    from hf_posenc.experiments.context_extension.training import finetune_lora

    train = TrainConfig(seq_len=32, steps=2, batch_size=1, lr=1e-2, warmup_steps=0, log_every=1, sp_size=sp_size)
    model = base_model(kv_heads)
    set_seed(train.seed)  # where the recipe seeds: before conversion and LoRA
    model = apply_encoding(model, PosEncConfig(**example_params(kind)))
    randomize_position_tables(model, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    try:
        with parallel.ulysses_scope(model):  # the next case registers Ulysses afresh
            trained, stats = finetune_lora(accelerator, model, tokenizer, training_texts(),
                                           LoraSettings(r=2, alpha=4), train, None, progress=False,
                                           desc=f"{kind}-kv{kv_heads}")
            weights = updates(trained)
    finally:
        accelerator.free_memory()
    return {"stats": stats, "trained": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sp-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hf_posenc.experiments.context_extension.config import TrainConfig
    from hf_posenc.experiments.context_extension.training import make_accelerator

    accelerator = make_accelerator(TrainConfig(seq_len=32, batch_size=1, sp_size=args.sp_size))
    report: dict = {"world_size": accelerator.num_processes, "checksums": {}}
    for kv_heads in KV_HEADS:
        for kind in case_kinds():
            case = f"{kind}-kv{kv_heads}"
            try:
                report[case] = run_case(accelerator, kind, kv_heads, args.sp_size)
            except Exception as error:  # the test reports each case's failure on its own
                report[case] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
                continue
            checksums = [None] * accelerator.num_processes
            if accelerator.num_processes > 1:
                torch.distributed.all_gather_object(checksums, report[case]["stats"]["param_checksum"])
            else:
                checksums = [report[case]["stats"]["param_checksum"]]
            report["checksums"][case] = checksums
    if accelerator.is_main_process:
        torch.save(report, args.out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
