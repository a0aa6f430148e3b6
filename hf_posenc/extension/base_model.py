"""The embedded default base model: a small Llama the project pretrains itself at a short length.

Built once from a :class:`~hf_posenc.extension.recipe_config.PretrainConfig` and cached under
``cache_dir()/base/<hash of the config>``, so re-runs (and other recipes) reuse it. The model is a
stock ``LlamaForCausalLM`` with RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864) trained on
windows of ``seq_len`` tokens of the standard-library corpus; the context-extension experiments then
ask what each encoding does beyond that length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from .paths import cache_dir, file_lock
from .recipe_config import PretrainConfig

logger = logging.getLogger(__name__)

#: Bump when the build procedure changes in a way the config hash cannot see.
BUILD_VERSION = 1


def base_model_dir(spec: PretrainConfig, held_out_percent: int = 5) -> Path:
    """Folder of the cached base model built from ``spec``."""
    payload = json.dumps({"spec": dataclasses.asdict(spec), "held_out": held_out_percent, "v": BUILD_VERSION},
                         sort_keys=True)
    return cache_dir() / "base" / hashlib.sha256(payload.encode()).hexdigest()[:12]


def token_stream(texts, tokenizer, max_tokens: int) -> torch.Tensor:
    """Tokenize documents in order, each followed by end-of-text, until ``max_tokens`` are collected."""
    chunks, total, batch = [], 0, 32
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), batch):
        for ids in tokenizer(texts[start : start + batch])["input_ids"]:
            chunks.append(torch.tensor(ids + [eos], dtype=torch.long))
            total += len(ids) + 1
        if total >= max_tokens:
            break
    return torch.cat(chunks)[:max_tokens] if chunks else torch.empty(0, dtype=torch.long)


def _lr_at(step: int, spec: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% (the usual small-LM schedule)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_llama_config(spec: PretrainConfig, tokenizer):
    """The ``LlamaConfig`` of the base model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        # The context the model was trained on: scaled RoPE variants read this as the original length.
        max_position_embeddings=spec.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        # Untied, so that LongLoRA-style training of the input embeddings leaves the output head alone.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def pretrain(spec: PretrainConfig, out_dir: Path, held_out_percent: int = 5, progress: bool = True) -> dict:
    """Train the tokenizer and the base model from scratch and save both to ``out_dir``.

    Returns:
        Build information (tokens seen, timings, final training loss), also saved as
        ``build_info.json``.
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from .corpus import load_stdlib_dataset
    from .tokenizer import train_bpe_tokenizer

    started = time.time()
    dataset = load_stdlib_dataset(held_out_percent, cache=cache_dir() / "datasets")
    # Shuffle files once (seeded) so both the tokenizer and the token budget see a mix of modules.
    texts = dataset["train"].shuffle(seed=spec.seed)["text"]
    tokenizer = train_bpe_tokenizer(texts, spec.vocab_size)
    tokenizer_s = time.time() - started

    needed = spec.steps * spec.batch_size * spec.seq_len
    # Random windows from a stream ~2x the tokens we train on, so windows rarely repeat.
    stream = token_stream(texts, tokenizer, 2 * needed + spec.seq_len + 1)
    tokenize_s = time.time() - started - tokenizer_s

    torch.manual_seed(spec.seed)
    config = build_llama_config(spec, tokenizer)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )
    rng = random.Random(spec.seed)
    last_start = len(stream) - spec.seq_len - 1
    losses: list[float] = []
    bar = tqdm(range(spec.steps), desc="pretrain base", disable=not progress)
    train_started = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        starts = [rng.randint(0, last_start) for _ in range(spec.batch_size)]
        batch = torch.stack([stream[s : s + spec.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    train_s = time.time() - train_started

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {
        "spec": dataclasses.asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": needed,
        "corpus_tokens_used": int(len(stream)),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": {"tokenizer": round(tokenizer_s, 1), "tokenize": round(tokenize_s, 1),
                    "train": round(train_s, 1), "total": round(time.time() - started, 1)},
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2))
    logger.info("built base model in %s: %s", out_dir, info)
    return info


def ensure_base_model(spec: PretrainConfig, held_out_percent: int = 5, progress: bool = True) -> Path:
    """Return the folder of the base model for ``spec``, pretraining it first if it is not cached."""
    folder = base_model_dir(spec, held_out_percent)
    with file_lock(folder.with_suffix(".lock")):
        if not (folder / "build_info.json").is_file():
            logger.info("no cached base model for this spec: pretraining it into %s", folder)
            tmp = folder.with_name(folder.name + ".partial")
            pretrain(spec, tmp, held_out_percent, progress=progress)
            tmp.rename(folder)  # atomic: a killed build never looks finished
    return folder
