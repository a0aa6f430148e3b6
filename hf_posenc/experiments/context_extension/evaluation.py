"""Long-context evaluation: perplexity by length (non-overlapping and sliding), loss by position,
passkey retrieval by length and depth.

The protocol follows the context-extension literature (PI, https://arxiv.org/abs/2306.15595; YaRN,
https://arxiv.org/abs/2309.00071): the same held-out tokens are scored at each evaluation length, in
non-overlapping windows (every token sees only its own window) and with a sliding window of fixed
stride (every scored token sees at least ``length - stride`` tokens of context). Aggregation happens
in the offline ``evaluate`` modules of ``recipes/metrics/`` (shipped in the wheel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import _hf
from .config import EvalConfig, PasskeyConfig
from .data import windows
from .metrics import load_metric
from .ruler import run_ruler


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` from ``logits [B, T, V]`` of ``input_ids [B, T]`` (token t+1 predicted
    from tokens <= t); differentiable, so pretraining's weighted losses use it too."""
    # float32 log-softmax: bf16 logits would round the loss of every token.
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    return nll.view(input_ids.shape[0], -1)


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` of ``input_ids`` ``[B, T]`` (token t+1 predicted from tokens <= t)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    _hf.reset_rope_state(model)  # every score sees a model whose outputs depend on its input alone
    return next_token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids).cpu()


def non_overlapping(model, stream: torch.Tensor, length: int, batch_size: int = 1) -> tuple[list[float], list[int]]:
    """Score ``stream`` in non-overlapping windows of ``length``.

    Returns:
        (nll, position): the NLL of every predicted token and its position in its window (1-based
        position of the predicted token, i.e. how many tokens of context it had).
    """
    chunks = windows(stream, length)
    if len(chunks) == 0:
        raise ValueError(f"need at least {length} evaluation tokens, have {len(stream)}")
    nlls, positions = [], []
    for start in range(0, len(chunks), batch_size):
        nll = token_nll(model, chunks[start : start + batch_size])
        nlls.extend(nll.flatten().tolist())
        positions.extend(list(range(1, length)) * nll.shape[0])
    return nlls, positions


def sliding(model, stream: torch.Tensor, length: int, stride: int) -> tuple[list[float], list[int]]:
    """Score ``stream`` with windows of ``length`` advancing by ``stride``.

    The first window scores all its tokens; each later window scores only the tokens no earlier
    window scored (its last ``stride``), so every token is counted exactly once.
    """
    if stride <= 0:
        raise ValueError("stride must be positive")
    nlls, positions, scored_until = [], [], 0
    total = len(stream)
    begin = 0
    while True:
        end = min(begin + length, total)
        nll = token_nll(model, stream[begin:end].unsqueeze(0))[0]  # predicts tokens begin+1 .. end-1
        first_new = max(scored_until, begin + 1)
        keep = nll[first_new - begin - 1 :]
        nlls.extend(keep.tolist())
        positions.extend(range(first_new - begin, end - begin))
        scored_until = end
        if end == total:
            return nlls, positions
        begin += stride


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor
    key: str
    depth: float


PASSKEY_TEMPLATES = {
    # For models trained on source code: the key is an assignment hidden in real code.
    "code": (
        "# There is a pass key hidden in this file. Find it and remember it.\n",
        "\nPASS_KEY = {key}  # the pass key is {key}. Remember it. {key} is the pass key.\n",
        "\n# What is the pass key?\nPASS_KEY = ",
    ),
    # The usual prose prompt (Mohtashami & Jaggi 2023; LongLoRA; YaRN).
    "text": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n",
        " The pass key is {key}. Remember it. {key} is the pass key. ",
        "\nWhat is the pass key? The pass key is",
    ),
}
_TEXT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, filler: torch.Tensor, length: int, depth: float, key: str,
                   template: str) -> PasskeyPrompt:
    """Build a prompt of exactly ``length`` tokens with the key line at relative ``depth`` of the filler."""
    head, needle, question = PASSKEY_TEMPLATES[template]

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    head_ids, needle_ids, question_ids = encode(head), encode(needle.format(key=key)), encode(question)
    room = length - len(head_ids) - len(needle_ids) - len(question_ids)
    if room < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt template itself")
    if template == "text":
        unit = encode(_TEXT_FILLER)
        filler = unit.repeat(room // len(unit) + 1)
    if len(filler) < room:
        raise ValueError(f"not enough filler tokens for a passkey prompt of {length}")
    filler = filler[:room]
    cut = int(round(depth * room))
    ids = torch.cat([head_ids, filler[:cut], needle_ids, filler[cut:], question_ids])
    return PasskeyPrompt(ids, key, depth)


@torch.no_grad()
def greedy_continuation(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy-decode a continuation with the model's KV cache and return its text."""
    device = next(model.parameters()).device
    _hf.reset_rope_state(model)
    out = model.generate(
        input_ids=input_ids.unsqueeze(0).to(device),
        attention_mask=torch.ones(1, len(input_ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(input_ids) :], skip_special_tokens=True)


def passkey(model, tokenizer, filler: torch.Tensor, cfg: PasskeyConfig, lengths: list[int], bar=None) -> dict[str, Any]:
    """Passkey accuracy by length (all depths pooled) and by length x depth."""
    metric = load_metric("passkey_accuracy")
    rng = random.Random(cfg.seed)
    by_length, by_depth = {}, {}
    for length in lengths:
        preds, refs = [], []
        by_depth[str(length)] = {}
        for depth in cfg.depths:
            d_preds, d_refs = [], []
            for trial in range(cfg.trials):
                key = str(rng.randint(10000, 99999))
                # A different stretch of filler per trial so trials are not the same text.
                offset = (trial * 7919 * length) % max(1, len(filler) - length)
                prompt = passkey_prompt(tokenizer, filler[offset:], length, depth, key, cfg.template)
                d_preds.append(greedy_continuation(model, tokenizer, prompt.input_ids, cfg.max_new_tokens))
                d_refs.append(key)
                if bar is not None:
                    bar.update(1)
            by_depth[str(length)][str(depth)] = metric.compute(predictions=d_preds, references=d_refs)["accuracy"]
            preds += d_preds
            refs += d_refs
        by_length[str(length)] = metric.compute(predictions=preds, references=refs)["accuracy"]
    return {"passkey": by_length, "passkey_by_depth": by_depth}


def evaluate_context(model, tokenizer, stream: torch.Tensor, cfg: EvalConfig, progress: bool = True,
                     desc: str = "evaluate") -> dict[str, Any]:
    """Run the whole evaluation protocol on one model.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer (for the passkey prompts).
        stream: Held-out tokens: ``eval_tokens`` of them are scored at every length, the rest (and
            those) serve as passkey filler.
        cfg: What to measure.
        progress: Show a progress bar.
        desc: Progress-bar label.

    Returns:
        ``{"perplexity": {"non_overlapping": {len: ppl}, "sliding": {len: ppl}},
        "loss_by_position": {len: {bucket_start: mean_nll}}, "passkey": {len: acc},
        "passkey_by_depth": {len: {depth: acc}}}``, and ``"ruler"`` (see :func:`.ruler.run_ruler`) when
        ``cfg.ruler`` is set (lengths and buckets as strings, JSON-ready).
    """
    ppl_metric = load_metric("token_perplexity")
    model.eval()
    pk_lengths = cfg.passkey.lengths or cfg.lengths
    steps = 2 * len(cfg.lengths) + len(pk_lengths) * len(cfg.passkey.depths) * cfg.passkey.trials
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    result: dict[str, Any] = {"perplexity": {"non_overlapping": {}, "sliding": {}}, "loss_by_position": {}}
    scored = stream[: cfg.eval_tokens]
    for length in cfg.lengths:
        nll, pos = non_overlapping(model, scored, length)
        out = ppl_metric.compute(predictions=nll, references=pos, bucket_size=cfg.bucket_size)
        result["perplexity"]["non_overlapping"][str(length)] = out["perplexity"]
        result["loss_by_position"][str(length)] = out["loss_by_bucket"]
        bar.update(1)
        # A stride longer than the window would leave tokens unscored: cap it (then = non-overlapping).
        stride, slid = min(cfg.sliding_stride, length), stream[: max(cfg.sliding_tokens, length)]
        if stride == length and len(slid) == len(scored) and len(scored) % length == 0:
            # The same whole windows of the same tokens: the sliding score *is* the non-overlapping one.
            # Reusing it saves the most expensive forwards of a long evaluation (a 16k window on CPU).
            result["perplexity"]["sliding"][str(length)] = out["perplexity"]
        else:
            nll, pos = sliding(model, slid, length, stride)
            result["perplexity"]["sliding"][str(length)] = ppl_metric.compute(
                predictions=nll, references=pos, bucket_size=cfg.bucket_size
            )["perplexity"]
        bar.update(1)
    # Passkey filler comes from the text after the scored part, so the two probes use different text.
    filler = stream[cfg.eval_tokens :] if len(stream) - cfg.eval_tokens > max(pk_lengths) else stream
    result.update(passkey(model, tokenizer, filler, cfg.passkey, pk_lengths, bar=bar))
    bar.close()
    if cfg.ruler is not None:
        lengths = cfg.ruler.lengths or cfg.lengths
        cells = len(cfg.ruler.tasks) * len(lengths) * len(cfg.ruler.depths)
        with tqdm(total=cells, desc=f"{desc} (RULER cells)", disable=not progress, leave=False) as ruler_bar:
            result.update(run_ruler(model, tokenizer, filler, cfg.ruler, lengths, bar=ruler_bar))
    return result
