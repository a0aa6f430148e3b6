"""The embedded default base model: a small Llama the project pretrains itself at a short length.

Built once from a :class:`~hf_posenc.context_extension.config.PretrainConfig` and cached under
``cache_dir()/base/<hash of the config>``, so re-runs (and other recipes) reuse it. The model is a
stock ``LlamaForCausalLM`` with RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864) trained on
windows of ``seq_len`` tokens of the standard-library corpus; the context-extension experiments then
ask what each encoding does beyond that length.

Its tokenizer is a small byte-level BPE trained with 🤗 ``tokenizers`` on the training split
(Radford et al. 2019, GPT-2; Sennrich et al. 2016, https://arxiv.org/abs/1508.07909): it never meets
an unknown character, and a few thousand merges already make a token carry ~3 bytes of code, so the
base model learns more per training step than a byte-level model at the same cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from filelock import FileLock

from .config import PretrainConfig, RetrievalStageConfig
from .data import cache_dir, load_stdlib_dataset, token_stream
from .evaluation import next_token_nll
from .retrieval_pretraining import retrieval_example

logger = logging.getLogger(__name__)

#: Bump when the build procedure changes in a way the config hash cannot see. (Fixing the build to one thread
#: kept 1: the keys of the committed results name the bases they were built from, and one thread reproduces the
#: builds of the machines whose thread chooser kept one, e.g. 8a4a9b027562 at final loss 2.7466.)
BUILD_VERSION = 1
#: The torch thread count of every build. Fixed, so that one cache key means one set of weights bit for bit
#: whatever the machine's load or core count (a measured choice between 1 and 2 threads gave two bases under
#: one key).
BUILD_THREADS = 1
#: Environment variable that makes :func:`ensure_base_model` build the base even where the package ships it.
REBUILD_ENV = "HF_POSENC_REBUILD_BASE"
#: The quick presets' base, built once with this module and shipped with the package (``build_info.json`` holds
#: its key and weight checksum; ``tests/test_embedded_base.py`` rebuilds it and compares).
SHIPPED_BASE = Path(__file__).resolve().parent / "embedded_base"
#: Optimizer steps between two pretraining checkpoints (a stopped build resumes from the last one).
CHECKPOINT_EVERY = 100

#: The end-of-text token of the builtin tokenizer (also its padding token).
EOS_TOKEN = "<|endoftext|>"


def _batches(texts: Iterable[str], max_chars: int, batch: int = 64) -> Iterator[list[str]]:
    """Yield lists of texts until ``max_chars`` characters have been produced."""
    seen, buffer = 0, []
    for text in texts:
        if seen >= max_chars:
            break
        buffer.append(text)
        seen += len(text)
        if len(buffer) == batch:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 8_000_000, digit_tokens: bool = False):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: Training documents (only the first ``max_chars`` characters are used: merges
            stabilise long before the whole corpus is read, and training time is linear in it).
        vocab_size: Final vocabulary size, the 256 byte symbols and the end-of-text token included.
        max_chars: Character budget for training the merges.
        digit_tokens: Split every digit into a token of its own before the byte-level split (as LLaMA's
            and PaLM's tokenizers do), so a number is spelt the same wherever it occurs.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` whose ``eos_token`` (also used as padding) is
        ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus one special token, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if digit_tokens else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Start from all 256 bytes so any input (including non-UTF-8 replacement output) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts, max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def weights_checksum(folder: Path) -> str:
    """SHA-256 of a saved model's tensors (names, dtypes, shapes and bytes, in name order): equal exactly when
    the weights are, however the file was written."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    tensors = load_file(Path(folder) / "model.safetensors")
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_versions() -> dict[str, str]:
    """The library versions a build's weights depend on."""
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def base_key(spec: PretrainConfig, held_out_percent: int = 5) -> str:
    """The cache key of the base model built from ``spec``: everything that changes its weights."""
    fields = spec.model_dump()
    if fields["retrieval"] is None:
        # A code-only base keeps the key layout it had before the retrieval stage existed, when the config held
        # a mixing fraction instead (always 0 in a released preset).
        del fields["retrieval"]
        fields["retrieval_fraction"] = 0.0
    payload = json.dumps({"spec": fields, "held_out": held_out_percent, "v": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def base_model_dir(spec: PretrainConfig, held_out_percent: int = 5) -> Path:
    """Folder of the cached base model built from ``spec``."""
    return cache_dir() / "base" / base_key(spec, held_out_percent)


def shipped_base(spec: PretrainConfig, held_out_percent: int = 5) -> Path | None:
    """The base model shipped with the package when it was built from ``spec`` (else None)."""
    info = SHIPPED_BASE / "build_info.json"
    if not info.is_file():
        return None
    return SHIPPED_BASE if json.loads(info.read_text())["key"] == base_key(spec, held_out_percent) else None


def _lr_at(step: int, spec: PretrainConfig | RetrievalStageConfig) -> float:
    """Linear warm-up then cosine decay to 10% (the usual small-LM schedule), for either stage."""
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


def _example(stream: torch.Tensor, start: int, seq_len: int, tokenizer, rng: random.Random,
             stage: RetrievalStageConfig | None = None) -> tuple[torch.Tensor, slice]:
    """One ``[seq_len]`` pretraining window and the positions of its answer tokens: code from ``start`` (no
    answer: an empty slice), or, in the retrieval stage, ``stage.fraction`` of the time a synthetic retrieval
    task hidden in the code from ``start``."""
    # No random draw without a stage: the code-only base is built from the same draws as before the stage.
    if stage is not None and rng.random() < stage.fraction:
        example = retrieval_example(tokenizer, stream[start:], seq_len, rng, tuple(stage.tasks))
        return example.input_ids, example.answer
    return stream[start : start + seq_len], slice(0, 0)


def _loss(model, batch: torch.Tensor, answers: list[slice], answer_weight: float) -> tuple[torch.Tensor, float | None]:
    """The pretraining loss of ``batch [B, T]`` and the mean loss of its answer tokens (None without answers).

    The loss is the mean next-token loss plus ``answer_weight`` x the answers' mean loss (``answers[b]``: the
    positions of row b's answer tokens).
    """
    if not any(a.stop > a.start for a in answers):
        return model(input_ids=batch, labels=batch).loss, None
    nll = next_token_nll(model(input_ids=batch).logits, batch)  # [B, T-1]: column t predicts token t + 1
    scored = torch.zeros_like(nll, dtype=torch.bool)
    for row, answer in enumerate(answers):
        if answer.stop > answer.start:
            scored[row, answer.start - 1 : answer.stop - 1] = True
    answer_loss = nll[scored].mean()
    return nll.mean() + answer_weight * answer_loss, answer_loss.item()


def pretrain(spec: PretrainConfig, out_dir: Path, held_out_percent: int = 5, progress: bool = True) -> dict:
    """Train the tokenizer and the base model from scratch and save both to ``out_dir``.

    With ``spec.retrieval``, the code-only base (``spec`` without the stage) is built first, or taken from
    the cache, and then trained on the retrieval stage's mix here.

    Resumable: every ``CHECKPOINT_EVERY`` steps the model, optimizer and sampler state are saved to
    ``out_dir/checkpoint.pt`` (with the tokenizer), and a call on a folder that holds a checkpoint
    continues from it, drawing the same batches an uninterrupted build would. Every build runs on
    ``BUILD_THREADS`` torch threads (restored afterwards), so the weights depend on ``spec`` alone.

    Returns:
        Build information (tokens seen, timings, final training loss), also saved as
        ``build_info.json``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _pretrain(spec, out_dir, held_out_percent, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(spec: PretrainConfig, out_dir: Path, held_out_percent: int, progress: bool) -> dict:
    """:func:`pretrain` on the current torch threads."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    stage = spec.retrieval
    code_spec = spec.model_copy(update={"retrieval": None})
    code_base = ensure_base_model(code_spec, held_out_percent, progress) if stage else None
    started = time.time()
    dataset = load_stdlib_dataset(held_out_percent, cache=cache_dir() / "datasets")
    # Shuffle files once (seeded) so both the tokenizer and the token budget see a mix of modules.
    texts = dataset["train"].shuffle(seed=spec.seed)["text"]
    checkpoint = out_dir / "checkpoint.pt"
    if code_base is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(code_base))
    elif checkpoint.is_file():  # resuming: the checkpoint's batches index this tokenizer's stream
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    else:
        tokenizer = train_bpe_tokenizer(texts, spec.vocab_size, digit_tokens=spec.digit_tokens)
    tokenizer_s = time.time() - started

    schedule = stage or spec  # steps, lr and warm-up of what is trained here
    needed = schedule.steps * spec.batch_size * spec.seq_len
    # Random windows from a stream ~2x the tokens we train on, so windows rarely repeat.
    stream = token_stream(texts, tokenizer, 2 * needed + spec.seq_len + 1)
    tokenize_s = time.time() - started - tokenizer_s

    torch.manual_seed(spec.seed)
    if code_base is not None:
        model = LlamaForCausalLM.from_pretrained(str(code_base))
    else:
        model = LlamaForCausalLM(build_llama_config(spec, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.95),
    )
    rng = random.Random(spec.seed)
    losses: list[float] = []
    answer_losses: list[float] = []  # not checkpointed: a resumed build reports the answers since it resumed
    first_step = 0
    if checkpoint.is_file():
        # Tensors, numbers and the rng's tuple only: weights_only refuses a file that would run code on load.
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        losses, first_step = state["losses"], state["step"]
        logger.info("resuming the base-model pretraining from %s (step %d of %d)", checkpoint, first_step,
                    schedule.steps)
    last_start = len(stream) - spec.seq_len - 1
    bar = tqdm(range(first_step, schedule.steps), desc="retrieval stage" if stage else "pretrain base",
               disable=not progress, initial=first_step, total=schedule.steps)
    train_started = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, schedule)
        examples = [_example(stream, rng.randint(0, last_start), spec.seq_len, tokenizer, rng, stage)
                    for _ in range(spec.batch_size)]
        batch = torch.stack([ids for ids, _ in examples])  # [B, seq_len]
        loss, answer_loss = _loss(model, batch, [answer for _, answer in examples],
                                  stage.answer_loss_weight if stage else 0.0)
        if answer_loss is not None:
            answer_losses.append(answer_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < schedule.steps:
            # Write-then-rename: a build stopped mid-save still finds the previous checkpoint whole.
            out_dir.mkdir(parents=True, exist_ok=True)
            if first_step == 0 and step + 1 == CHECKPOINT_EVERY:
                tokenizer.save_pretrained(str(out_dir))
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                        "losses": losses, "step": step + 1}, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)
    train_s = time.time() - train_started

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    checkpoint.unlink(missing_ok=True)
    info = {
        "spec": spec.model_dump(),
        "code_base": code_base.name if code_base else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": needed,
        "corpus_tokens_used": int(len(stream)),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "final_answer_loss": sum(answer_losses[-20:]) / len(answer_losses[-20:]) if answer_losses else None,
        "resumed_from_step": first_step,
        "key": base_key(spec, held_out_percent),
        "weights_sha256": weights_checksum(out_dir),
        "threads": BUILD_THREADS,
        # Bitwise equality with a rebuild holds for these versions on the same kind of CPU.
        "versions": build_versions(),
        "seconds": {"tokenizer": round(tokenizer_s, 1), "tokenize": round(tokenize_s, 1),
                    "train": round(train_s, 1), "total": round(time.time() - started, 1)},
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2))
    logger.info("built base model in %s: %s", out_dir, info)
    return info


def ensure_base_model(spec: PretrainConfig, held_out_percent: int = 5, progress: bool = True) -> Path:
    """Return the folder of the base model for ``spec``: the shipped one when it was built from ``spec`` (unless
    ``$HF_POSENC_REBUILD_BASE`` is set), else the cached build, pretraining it first if it is not cached."""
    shipped = None if os.environ.get(REBUILD_ENV) else shipped_base(spec, held_out_percent)
    if shipped is not None:
        return shipped
    folder = base_model_dir(spec, held_out_percent)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (two accelerate ranks, or two recipes) may want the same base at once: the second
    # waits and then finds it built. timeout=-1: a build takes minutes, and giving up would only make
    # the waiter build it again. filelock uses flock on POSIX and msvcrt locking on Windows.
    with FileLock(str(folder.with_suffix(".lock")), timeout=-1):
        if not (folder / "build_info.json").is_file():
            logger.info("no cached base model for this spec: pretraining it into %s", folder)
            # The partial folder keeps the build's checkpoints: a stopped build resumes there.
            tmp = folder.with_name(folder.name + ".partial")
            pretrain(spec, tmp, held_out_percent, progress=progress)
            tmp.rename(folder)  # atomic: a killed build never looks finished
    return folder
