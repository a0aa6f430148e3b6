"""Synthetic retrieval windows mixed into the base model's pretraining, so that it can retrieve at its length.

A 1.4M-parameter model pretrained on source code alone never learns to copy a number from far back in its
context: passkey accuracy stays at zero even at the training length, and then no encoding can be told
apart by how far retrieval extends. The usual remedy for small models is to put the skill in the data
(the associative-recall and copy tasks of Olsson et al. 2022, https://arxiv.org/abs/2209.11895, and of
the RULER suite, Hsieh et al. 2024, https://arxiv.org/abs/2404.06654): in a second pretraining stage
(:class:`~.config.RetrievalStageConfig`), a fraction of the windows are code with needle lines hidden in
it, a question and its answer after it, then more code.

The windows are built with the same task code as the evaluation (:mod:`.ruler`), but with names the
evaluation never uses (random upper-case identifiers, not the evaluation's word list), fresh random
values, and the passkey evaluation's own head line for the single-needle task, so that what is tested is
retrieval, not recall of the training examples. Every window is exactly ``seq_len`` tokens: a task of
random length, then ordinary code.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RetrievalExample:
    """One pretraining window with a retrieval task in it.

    Attributes:
        input_ids: ``[seq_len]`` token ids: the task (head, code with needles, question, answer), then an
            end-of-text token and more code up to ``seq_len`` when the task is shorter.
        answer: The positions of the answer tokens in ``input_ids``.
    """

    input_ids: torch.Tensor
    answer: slice


def retrieval_example(tokenizer, filler: torch.Tensor, seq_len: int, rng: random.Random,
                      tasks: tuple[str, ...] = ruler.TASKS) -> RetrievalExample:
    """One ``[seq_len]`` training window: a random RULER-style task hidden in ``filler``, then more code.

    The task is ``seq_len // 2`` (or its template's length, if longer) to ``seq_len`` tokens long, drawn
    uniformly, so its answer ends anywhere in the second half of the window. A model that only ever saw the
    answer in the window's last tokens learns to retrieve *there* (measured: exact match 1.00 with the
    answer at positions 250-255 of 256, 0.06 when the same prompt is 6 tokens longer), and the passkey
    test asks at position L, past any training window.

    Args:
        tokenizer: The base model's tokenizer.
        filler: ``[N]`` code token ids, N >= seq_len.
        seq_len: Window length.
        rng: Source of the task, length, depth, names and values.
        tasks: The tasks to draw from (:data:`.ruler.TASKS` by default).
    """
    if len(filler) < seq_len:
        raise ValueError(f"a retrieval window of {seq_len} tokens needs as many filler tokens, got {len(filler)}")
    task = rng.choice(tasks)
    lines, question, answers = ruler.task_lines(task, rng, names=training_names(rng, 4))
    answer = torch.tensor(tokenizer(_answer_text(task, answers), add_special_tokens=False)["input_ids"],
                          dtype=torch.long)
    head = _HEADS[1] if task == "single_needle" and rng.random() < 0.5 else _HEADS[0]
    # The task's own tokens (head, needles, question, answer): the length below never cuts into them.
    shortest = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (head, *lines, question))
    length = rng.randint(min(seq_len, max(seq_len // 2, shortest + len(answer))), seq_len)
    prompt = ruler.assemble(task, tokenizer, filler, length - len(answer), rng.random(), lines, question, rng,
                            head=head)
    # After the task, a new document: the code that follows the filler the task used (assemble takes at
    # most its length from the start of ``filler``), so the rest of the window is ordinary pretraining text.
    rest = seq_len - length
    after = torch.cat([torch.tensor([tokenizer.eos_token_id]), filler[length : length + rest - 1]])[:rest]
    input_ids = torch.cat([prompt, answer, after])  # [seq_len]
    return RetrievalExample(input_ids, slice(len(prompt), len(prompt) + len(answer)))
