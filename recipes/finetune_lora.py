"""LoRA context-extension fine-tuning of a model with a swapped positional encoding.

    accelerate launch [--config_file recipes/accelerate/X.yaml] recipes/finetune_lora.py \
        --config recipes/configs/finetune_yarn_quick.yaml [key.sub=value ...]

Steps: load base -> convert (``hf_posenc.convert``) -> PEFT LoRA -> datasets pipeline -> Accelerate
loop (checkpoints every ``train.checkpoint_every`` steps; a restarted run resumes from the newest) ->
save adapter + merged model + model card into ``output.dir``.

Long windows across several processes: ``train.sp_size=N`` (sequence parallelism on DeepSpeed Ulysses) under
``--config_file recipes/accelerate/sequence_parallel.yaml``; each process holds ``seq_len / N`` tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Runnable from a checkout without installing the package. Installed (hf_posenc/_recipes) or copied out
# with `hf-posenc recipes cp`, the folder above holds no package, and putting it on sys.path would make
# hf_posenc's own modules (config, hub, ...) importable as top-level names.
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "hf_posenc" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from hf_posenc.experiments.config import ConfigError, encoding_dict, load_config  # noqa: E402
from hf_posenc.experiments.context_extension.config import FinetuneConfig  # noqa: E402

logger = logging.getLogger("hf_posenc.recipes.finetune_lora")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML file, or a shipped finetune preset name (`hf-posenc recipes` lists them)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value changes, e.g. train.steps=20")
    return parser.parse_intermixed_args(argv)


def base_encoding(config) -> str | None:
    """How the base model encoded positions before conversion, for the card's first line."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta"):
        return f"rope (theta {rope['rope_theta']:g})"
    return "learned absolute positions" if getattr(config, "model_type", "") in ("gpt2", "bert") else None


def write_card(cfg: FinetuneConfig, out: Path, base_label: str, stats: dict, original: str | None) -> None:
    """Model card for the adapter (rendered by hf_posenc.cards, the project's card templates)."""
    from hf_posenc.cards import CardInfo, render_card

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    info = CardInfo(
        repo_id=out.name,
        posenc=encoding_dict(cfg.posenc),
        original_encoding=original,
        adapter={k: adapter.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save")},
        training={"base model": base_label, "steps": stats["steps"], "train tokens": stats["train_tokens"],
                  "sequence length": cfg.train.seq_len, "learning rate": cfg.train.lr,
                  "processes": stats["world_size"], "final loss": round(stats["final_loss"], 4)},
    )
    render_card(info).save(str(out / "adapter" / "README.md"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    # 0. Config: every key and value is checked here, before any model is loaded.
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"config error: {err}")

    from accelerate.utils import set_seed

    from hf_posenc.experiments.context_extension.data import load_texts
    from hf_posenc.experiments.context_extension.models import apply_encoding, load_model, load_tokenizer, resolve
    from hf_posenc.experiments.context_extension.training import finetune_lora, make_accelerator

    try:
        accelerator = make_accelerator(cfg.train)
    except ValueError as err:
        sys.exit(f"config error: {err}")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(cfg.output.dir)

    # 1. Base model (the builtin one is pretrained once, by the main process, and cached).
    with accelerator.main_process_first():
        source = resolve(cfg.model, cfg.data.held_out_percent, progress=accelerator.is_main_process)
    tokenizer = load_tokenizer(source)
    model = load_model(source, cfg.model.dtype)
    original = base_encoding(model.config)  # read before conversion rewrites the config

    # 2. Convert to the requested encoding.
    # Seeded here, not earlier: building the base model (first run only) draws random numbers, and
    # new position tables and LoRA weights must start the same whether or not it was cached.
    set_seed(cfg.train.seed)
    model = apply_encoding(model, cfg.posenc)

    # 3. Data: the training split (windows of train.seq_len tokens, the same on every rank;
    #    Accelerate's prepared dataloader splits each global batch across the ranks).
    with accelerator.main_process_first():
        texts = load_texts(cfg.data, cfg.data.train_split)

    # 4. LoRA (+ position tables, + LongLoRA switch) and 5. train (resumes from output.dir/checkpoints).
    unwrapped, stats = finetune_lora(accelerator, model, tokenizer, texts, cfg.lora, cfg.train, out / "checkpoints")

    # 6. Save adapter, merged model and card (each rank also records its own statistics).
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_stats.rank{accelerator.process_index}.json").write_text(json.dumps(stats, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # lora.full_attention / full_model train the model itself: no adapter, the trained model is the result.
        adapter = cfg.output.save_adapter and not cfg.lora.trains_in_full
        if adapter:
            unwrapped.save_pretrained(str(out / "adapter"))
            tokenizer.save_pretrained(str(out / "adapter"))
            write_card(cfg, out, source.label, stats, original)
        if cfg.output.save_merged or cfg.lora.trains_in_full:
            merged = unwrapped if cfg.lora.trains_in_full else unwrapped.merge_and_unload()
            merged.save_pretrained(str(out / "merged"))
            tokenizer.save_pretrained(str(out / "merged"))
        (out / "train_stats.json").write_text(json.dumps(stats, indent=2))
        logger.info("done: %s", stats)
    accelerator.end_training()
    return stats


if __name__ == "__main__":
    main()
