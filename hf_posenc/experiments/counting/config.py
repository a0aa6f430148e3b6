"""The counting task's typed config (``recipes/configs/counting_*.yaml``) and the test sets it draws.

The model, training and test-set sections are named for what they are here (a Llama trained from scratch,
fresh programs every step, fixed test programs), not after the context-extension configs of the same role:
those load a pretrained base, fine-tune it with LoRA and evaluate by length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from ...config import PosEncConfig
from ..config import Positive, PositiveFloat, Section
from ..config import load_config as load_experiment_config
from . import task

# The sections are pydantic models read by the experiments' one loader (experiments.config.load_config):
# unknown keys, wrong types and invalid values stop there with the file and the key named.
StatementRange = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]


class TaskConfig(Section):
    """Programs. Statement counts are inclusive ranges ``[low, high]``.

    Attributes:
        num_variables: Variables per program (the paper's Table 3 has 1, 3 and 5).
        max_value: Largest value a variable reaches (the generator's 10).
        train_statements: Statement counts of training and in-distribution test programs.
        long_statements: Statement counts of the longer test programs.
    """

    num_variables: Annotated[int, Field(ge=1, le=len(task.VARIABLE_NAMES))] = 1
    max_value: Positive = 10
    train_statements: StatementRange = Field(default_factory=lambda: [3, 32])
    long_statements: StatementRange = Field(default_factory=lambda: [33, 96])

    @model_validator(mode="after")
    def _ranges_ascend(self) -> TaskConfig:
        for name in ("train_statements", "long_statements"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: expected [low, high] with low <= high, got {[low, high]}")
        return self


class ScratchModelConfig(Section):
    """The shape of the Llama every encoding is trained in from scratch (see :func:`.task.build_model`)."""

    hidden_size: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 4
    intermediate_size: Positive = 256
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _heads_divide_hidden_size(self) -> ScratchModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        return self


class ScratchTrainConfig(Section):
    """AdamW with linear warm-up and cosine decay; fresh programs every step (no fixed training set)."""

    steps: Positive = 600
    batch_size: Positive = 64
    lr: PositiveFloat = 3e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: PositiveFloat = 1.0


class TestSetConfig(Section):
    """Test sets: ``programs`` per set, drawn once from ``seed`` and shared by every encoding and seed."""

    programs: Positive = 500
    batch_size: Positive = 100
    seed: int = 1234
    plot_bins: Positive = 8


class EncodingEntry(Section):
    """One row of the table: a name and the encoding as :class:`hf_posenc.PosEncConfig` keys."""

    name: str
    posenc: dict[str, Any]

    @model_validator(mode="after")
    def _valid_encoding(self) -> EncodingEntry:
        PosEncConfig.from_dict(dict(self.posenc))  # the encodings' own validation names the bad field
        return self


class CountingConfig(Section):
    """A counting-task preset (``recipes/configs/counting_*.yaml``).

    ``threads`` is torch's thread count per model; ``workers`` trains that many cells at once in separate
    processes (1 thread each is the fastest use of a small CPU: these models are too small for
    intra-op parallelism). Neither changes a result, so neither is part of a cell's fingerprint.
    """

    preset_kind: ClassVar[str] = "counting"

    encodings: Annotated[list[EncodingEntry], Field(min_length=1)]
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ScratchModelConfig = Field(default_factory=ScratchModelConfig)
    train: ScratchTrainConfig = Field(default_factory=ScratchTrainConfig)
    eval: TestSetConfig = Field(default_factory=TestSetConfig)
    threads: Positive = 1
    workers: Positive = 1

    @model_validator(mode="after")
    def _unique(self) -> CountingConfig:
        names = [e.name for e in self.encodings]
        if len(set(names)) != len(names):
            raise ValueError(f"encodings need unique names (got {names})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat (got {self.seeds})")
        return self


def load_config(config: str | Path, overrides: Sequence[str] = ()) -> CountingConfig:
    """Read and validate a counting preset (a YAML path or a preset name) with ``key.sub=value`` overrides.

    Raises:
        ConfigError: Invalid YAML, an unknown key, a wrong type or an invalid value (file and key named).
        FileNotFoundError: Neither a file nor a counting preset.
    """
    return load_experiment_config(CountingConfig, config, overrides)


def held_out_sets(cfg: CountingConfig) -> dict[str, list[task.Program]]:
    """The in-distribution and long test programs (the same for every cell of a config)."""
    rng = random.Random(cfg.eval.seed)
    sets = {}
    for name, (low, high) in (("in_distribution", cfg.task.train_statements), ("long", cfg.task.long_statements)):
        sets[name] = [task.generate_program(rng, rng.randint(low, high), cfg.task.num_variables,
                                                cfg.task.max_value) for _ in range(cfg.eval.programs)]
    return sets


__all__ = ["CountingConfig", "EncodingEntry", "ScratchModelConfig", "ScratchTrainConfig", "TaskConfig", "TestSetConfig",
           "held_out_sets", "load_config"]
