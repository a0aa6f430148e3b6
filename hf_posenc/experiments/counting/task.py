"""The CoPE paper's counting task: programs, tokens, answer-only batches, models, training, scoring.

Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important",
https://arxiv.org/abs/2405.18719 (Table 3). A program is a sequence of statements

    a = 0 ;      (weight 1)   reset a variable
    pass;        (weight 50)  do nothing
    a ++;        (weight 7)   increment a variable (never above ``max_value``)

followed by ``print a``; the model must produce the variable's value. Counting the increments since the
last reset is easy for a position that counts *statements* (CoPE's gates can learn to count only the
``++;`` tokens) and hard for token positions, because ``pass;`` fillers change the token distance.

The statement spellings, weights, value limit (10) and the rejection-sampling rule (an operation that is
impossible in the current state is re-drawn, and a program with nothing to print is drawn again) follow the
authors' released data generator (facebookresearch/RAM ``projects/cope/scripts/count_data_gen.py``); program
lengths are parameters here, because the paper's 3-512 statements do not train on two CPU cores.

The recipe ``recipes/counting_task.py`` runs the task for every encoding and seed; this module holds the
parts that are tested on their own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...config import PosEncConfig
from ...convert import patch_config

PAPER = "https://arxiv.org/abs/2405.18719"

#: Operation weights of the released generator (reset, filler, increment).
SET, PASS, INCREMENT = "set", "pass", "increment"
WEIGHTS = {SET: 1, PASS: 50, INCREMENT: 7}
#: Variable names, in the generator's order (``num_variables=k`` uses the first k).
VARIABLE_NAMES = tuple("abcdefghijklmnopqrstuvwxyz")
#: Label value that ``torch.nn.functional.cross_entropy`` ignores.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Program:
    """One counting problem.

    Attributes:
        statements: The statements, e.g. ``("a = 0 ;", "pass;", "a ++;")``.
        variable: The variable the final ``print`` asks for.
        answer: Its value after the statements run.
    """

    statements: tuple[str, ...]
    variable: str
    answer: int

    @property
    def text(self) -> str:
        """The program as the model reads it, without the answer: ``"a = 0 ; a ++; print a"``."""
        return " ".join((*self.statements, f"print {self.variable}"))


def generate_program(rng: random.Random, num_statements: int, num_variables: int = 1,
                     max_value: int = 10) -> Program:
    """Draw one program of exactly ``num_statements`` statements.

    Each statement draws an operation by :data:`WEIGHTS`; an increment (or, before any reset, anything
    but a reset) that cannot run is drawn again, as in the released generator. So no increment comes
    before the first reset and no value exceeds ``max_value``.

    Args:
        rng: The random source (a seeded ``random.Random`` makes the program reproducible).
        num_statements: Statements before the ``print`` (>= 1).
        num_variables: Distinct variables (1-26).
        max_value: Largest value a variable may reach.

    Raises:
        ValueError: An argument is out of range.
    """
    if num_statements < 1:
        raise ValueError(f"num_statements must be >= 1, got {num_statements}")
    if not 1 <= num_variables <= len(VARIABLE_NAMES):
        raise ValueError(f"num_variables must be in 1..{len(VARIABLE_NAMES)}, got {num_variables}")
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    names = VARIABLE_NAMES[:num_variables]
    values: dict[str, int] = {}
    ops, weights = list(WEIGHTS), list(WEIGHTS.values())
    statements = []
    for _ in range(num_statements):
        while True:
            op = rng.choices(ops, weights)[0]
            if op == SET:
                var = rng.choice(names)
                values[var] = 0
                statements.append(f"{var} = 0 ;")
                break
            if op == PASS:
                statements.append("pass;")
                break
            # An increment needs a live variable below the limit; otherwise draw again (as the generator does).
            if not values:
                continue
            var = rng.choice(sorted(values))
            if values[var] + 1 > max_value:
                continue
            values[var] += 1
            statements.append(f"{var} ++;")
            break
    if not values:
        # A program of fillers only has nothing to print; the generator retries the whole program.
        return generate_program(rng, num_statements, num_variables, max_value)
    var = rng.choice(sorted(values))
    return Program(tuple(statements), var, values[var])


class Vocabulary:
    """Word-level tokens of the programs: whitespace-separated words, one id each.

    Ids: ``<pad>`` 0, ``<bos>`` 1, then the statement words, the variable names and the values
    ``0..max_value`` (the answers; ``0`` is also the word of a reset).
    """

    PAD, BOS = "<pad>", "<bos>"

    def __init__(self, num_variables: int = 1, max_value: int = 10):
        words = [self.PAD, self.BOS, "=", ";", "pass;", "++;", "print", *VARIABLE_NAMES[:num_variables],
                 *(str(v) for v in range(max_value + 1))]
        self.words = tuple(words)
        self.ids = {w: i for i, w in enumerate(words)}
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return self.ids[self.PAD]

    def encode(self, text: str) -> list[int]:
        """``<bos>`` then one id per word.

        Raises:
            ValueError: A word is not in the vocabulary (names it).
        """
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            raise ValueError(f"words not in the counting vocabulary: {sorted(set(unknown))}")
        return [self.ids[self.BOS]] + [self.ids[w] for w in text.split()]

    def answer_id(self, value: int) -> int:
        """The token of the answer ``value``."""
        if not 0 <= value <= self.max_value:
            raise ValueError(f"answer {value} outside 0..{self.max_value}")
        return self.ids[str(value)]

    def to_tokenizer(self):
        """The same vocabulary as a ``transformers`` fast tokenizer (word level, whitespace split).

        It encodes text exactly as :meth:`encode` does without the ``<bos>`` (add it as the first id, or
        call it with ``add_special_tokens=True``), so a counting model saved with it loads and evaluates
        in tools that take a tokenizer, such as lm-evaluation-harness (tested).
        """
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel(dict(self.ids), unk_token=None))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        core.post_processor = processors.TemplateProcessing(single=f"{self.BOS} $A", pair=f"{self.BOS} $A $B",
                                                            special_tokens=[(self.BOS, self.ids[self.BOS])])
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=self.BOS, pad_token=self.PAD,
                                       clean_up_tokenization_spaces=False)

    def value_of(self, token_id: int) -> int | None:
        """The value a token stands for, or None when it is not a number."""
        word = self.words[token_id]
        return int(word) if word.isdigit() else None


def make_batch(programs: Sequence[Program], vocab: Vocabulary) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (program then answer) and ``labels`` that score the answer only.

    ``labels`` is ``-100`` everywhere except at the answer token, so the causal LM's loss (which shifts
    labels by one) is the cross-entropy of the answer given the program. ``answer_position`` is the
    index of the answer token; its prediction is read from the logits one position earlier.

    No attention mask is returned on purpose: with right padding and causal attention every pad comes
    after the answer, so no real token attends to one, and the mask-free path keeps SDPA's fast causal
    kernel. Padding therefore cannot change a prediction (tested).
    """
    rows = [vocab.encode(p.text) + [vocab.answer_id(p.answer)] for p in programs]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), vocab.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.empty(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(row) - 1] = row[-1]
        positions[i] = len(row) - 1
    return {"input_ids": input_ids, "labels": labels, "answer_position": positions}


def build_model(posenc: dict, *, vocab_size: int, hidden_size: int = 64, num_layers: int = 4,
                num_heads: int = 4, intermediate_size: int | None = None, seed: int = 0,
                attn_implementation: str = "sdpa"):
    """A small Llama with the encoding ``posenc``, built through :func:`hf_posenc.patch_config`.

    Args:
        posenc: An encoding as a dict, e.g. ``{"kind": "cope", "npos_max": 64}`` (see
            :class:`hf_posenc.PosEncConfig`); ``{"kind": "rope"}`` is the stock Llama.
        vocab_size: Size of the word vocabulary.
        hidden_size, num_layers, num_heads, intermediate_size: Model shape (default MLP width 4x).
        seed: Seeds the initial weights.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        A ``transformers`` causal LM with tied embeddings and no dropout.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    config._attn_implementation = attn_implementation
    patched = patch_config(config, PosEncConfig.from_dict(dict(posenc)))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(patched)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answers (the model's own shifted-label loss on :func:`make_batch` labels)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


@torch.no_grad()
def predict(model, batch: dict[str, torch.Tensor], vocab: Vocabulary) -> torch.Tensor:
    """Greedy answer per program: the most likely *number* token after ``print v``.

    Restricting the argmax to number tokens is the same exact-match criterion as greedy decoding once
    the model has learned that a number follows ``print v`` (it has after a few steps); it only keeps a
    half-trained model's non-number outputs from being counted differently between encodings.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    rows = torch.arange(logits.shape[0])
    at = logits[rows, batch["answer_position"] - 1]
    numbers = torch.tensor([vocab.answer_id(v) for v in range(vocab.max_value + 1)])
    return numbers[at[:, numbers].argmax(-1)]


__all__ = ["PAPER", "WEIGHTS", "Program", "Vocabulary", "generate_program", "make_batch", "build_model",
           "answer_loss", "predict"]
