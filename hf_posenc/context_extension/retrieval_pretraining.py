"""Synthetic retrieval windows mixed into the base model's pretraining, so that it can retrieve at its length.

A 1.4M-parameter model pretrained on source code alone never learns to copy a number from far back in its
context: passkey accuracy stays at zero even at the training length, and then no encoding can be told
apart by how far retrieval extends. The usual remedy for small models is to put the skill in the data
(the associative-recall and copy tasks of Olsson et al. 2022, https://arxiv.org/abs/2209.11895, and of
the RULER suite, Hsieh et al. 2024, https://arxiv.org/abs/2404.06654): a fraction of the pretraining
windows are code with needle lines hidden in it, a question at the end and its answer after it.

The windows are built with the same task code as the evaluation (:mod:`.ruler`), but with names the
evaluation never uses (random upper-case identifiers, not the evaluation's word list), fresh random
values, and the passkey evaluation's own head line for the single-needle task, so that what is tested is
retrieval, not recall of the training examples. Every window is exactly ``seq_len`` tokens: the prompt
is shortened by the answer's length.
"""

from __future__ import annotations

import random
import string

import torch

from . import ruler
from .evaluation import PASSKEY_TEMPLATES

#: The head lines the windows start with: the RULER head, and the passkey test's (``template: code``).
_HEADS = (ruler.HEAD, PASSKEY_TEMPLATES["code"][0])


def training_names(rng: random.Random, count: int) -> tuple[str, ...]:
    """``count`` distinct random upper-case identifiers of 3-7 letters (the evaluation uses real words)."""
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 7))))
    return tuple(sorted(names))


def _answer_text(task: str, answers: tuple[str, ...]) -> str:
    """What follows the question in the window: the values, written as the question's syntax continues."""
    if task == "multi_value":
        return ", ".join(answers) + "]\n"
    return answers[0] + "\n"


def retrieval_window(tokenizer, filler: torch.Tensor, seq_len: int, rng: random.Random) -> torch.Tensor:
    """One ``[seq_len]`` training window: a random RULER-style task hidden in ``filler``, answered at its end.

    Args:
        tokenizer: The base model's tokenizer.
        filler: ``[N]`` code token ids, N >= seq_len.
        seq_len: Window length.
        rng: Source of the task, depth, names and values.
    """
    return retrieval_example(tokenizer, filler, seq_len, rng)[0]


def retrieval_example(tokenizer, filler: torch.Tensor, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, int]:
    """:func:`retrieval_window` and the length of its answer (the window's last tokens)."""
    task = rng.choice(ruler.TASKS)
    lines, question, answers = ruler.task_lines(task, rng, names=training_names(rng, 4))
    answer = torch.tensor(tokenizer(_answer_text(task, answers), add_special_tokens=False)["input_ids"],
                          dtype=torch.long)
    head = _HEADS[1] if task == "single_needle" and rng.random() < 0.5 else _HEADS[0]
    prompt = ruler.assemble(task, tokenizer, filler, seq_len - len(answer), rng.random(), lines, question, rng,
                            head=head)
    return torch.cat([prompt, answer]), len(answer)  # [seq_len], answer tokens at the end
