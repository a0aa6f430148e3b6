"""Does the quick base's architecture learn to copy, and from what data? A diagnostic for issue 11 part 1.

The embedded base (4 layers, 2 heads, hidden 128, RoPE) scores passkey 0 at its own length, even with
retrieval windows mixed into its pretraining. This probe trains that architecture from scratch on short
synthetic sequences and prints the loss on the tokens that only copying can predict, so one can see
whether (and after how many steps) the copy mechanism forms, separately from the code corpus:

* ``fixed_offset``: a random segment, then the same segment a fixed distance later. A head that attends
  a fixed number of positions back predicts it; no content matching is needed.
* ``induction``: the same, at a random distance: only an induction head (Olsson et al. 2022,
  https://arxiv.org/abs/2209.11895: find the earlier occurrence of the current token, copy what followed)
  predicts it.
* ``key_digits``: the passkey's shape: a key marker and 5 digits early on, the marker again at the end,
  then the digits.

``--then TASK --switch-step N`` changes the task at step N (a curriculum). ``--loss copy`` scores only the
copy positions; ``--loss all`` scores every token, as language-model pretraining does (the random filler
is unpredictable, so its loss stays near ln V and dominates the gradient).

    python benchmarks/induction_probe.py --task induction --loss copy --lr 1e-3 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, FIRST_FILLER = 2048, 200  # filler tokens are FIRST_FILLER..VOCAB-1
KEY, DIGITS = 5, tuple(range(100, 110))
TASKS = ("fixed_offset", "induction", "key_digits")


def make_batch(task: str, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], copy_mask [B, T])``: ``copy_mask`` marks the tokens that copying predicts."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    ids = torch.randint(FIRST_FILLER, VOCAB, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    n = 12  # copied segment length
    for b in range(batch):
        if task == "key_digits":
            digits = torch.tensor(DIGITS)[torch.randint(0, 10, (5,), generator=gen)]
            start = int(torch.randint(1, length // 3, (), generator=gen))
            ids[b, start], ids[b, start + 1 : start + 6] = KEY, digits
            ids[b, -6], ids[b, -5:] = KEY, digits
            mask[b, -5:] = True
            continue
        segment = torch.randint(FIRST_FILLER, VOCAB, (n,), generator=gen)
        src = 4 if task == "fixed_offset" else int(torch.randint(0, length // 3, (), generator=gen))
        dst = src + n + 5 if task == "fixed_offset" else int(torch.randint(src + n + 1, length - n, (), generator=gen))
        ids[b, src : src + n], ids[b, dst : dst + n] = segment, segment
        mask[b, dst + 1 : dst + n] = True  # the first copied token has no cue before it
    return ids, mask


def run(task: str, steps: int, lr: float, loss_on: str = "copy", then: str | None = None, switch_step: int = 0,
        batch: int = 32, length: int = 64, seed: int = 0, log_every: int = 50) -> list[dict]:
    """Train the quick base's architecture on the probe task; returns ``[{step, task, copy_nll}]``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    log, started = [], time.time()
    for step in range(steps):
        current = then if then and step >= switch_step else task
        ids, mask = make_batch(current, batch, length, gen)
        logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]: position t predicts token t+1
        nll = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none").view(batch, -1)
        copy = mask[:, 1:]
        loss = nll[copy].mean() if loss_on == "copy" else nll.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step, "task": current, "copy_nll": round(nll[copy].mean().item(), 4),
                   "seconds": round(time.time() - started, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, default="induction")
    parser.add_argument("--then", choices=TASKS, default=None, help="task after --switch-step")
    parser.add_argument("--switch-step", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", choices=("copy", "all"), default="copy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = run(args.task, args.steps, args.lr, args.loss, args.then, args.switch_step)
    chance = {"key_digits": math.log(10)}.get(log[-1]["task"], math.log(VOCAB - FIRST_FILLER))
    print(f"final copy NLL {log[-1]['copy_nll']:.3f} nats (chance {chance:.2f})")


if __name__ == "__main__":
    main()
