"""Load a model or tokenizer from a local folder, a Hub id or a ``.gguf`` file: the one loader of the
command line and of the recipes.

A GGUF checkpoint (``model.gguf``, or a folder plus ``gguf_file=``) is dequantized by transformers on
load; the GGUF quantizer it leaves attached is detached here, since it refuses ``save_pretrained``
and training although the weights are plain tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import _hf
from .modeling import TASKS

#: What a Hub repo id may look like (``name`` or ``owner/name``).
_REPO_ID = re.compile(r"(?:\w[\w.-]*/)?\w[\w.-]*")


def missing_local_folder(source: str | os.PathLike) -> bool:
    """Whether ``source`` can only mean a local path (it is no Hub repo id) and nothing exists there.

    Loaders that take "a folder or a Hub id" otherwise report such a path as an invalid repo id.
    """
    text = os.fspath(source)
    return not Path(text).expanduser().exists() and not _REPO_ID.fullmatch(text)


def gguf_location(source: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or Hub id, GGUF file name or None)`` as ``from_pretrained`` takes them.

    A path ending in ``.gguf`` is split into its folder and file name.
    """
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        return str(path.parent), path.name
    return source, gguf_file


def check_source(source: str) -> None:
    """Refuse a source that names a local file or folder that does not exist, in our words: transformers
    would try it as a Hub id and report an invalid repo id.

    Raises:
        FileNotFoundError: A missing ``.gguf`` file, or a path that cannot be a Hub id and does not exist.
    """
    if Path(source).suffix == ".gguf":
        if not Path(source).is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
    elif missing_local_folder(source):
        raise FileNotFoundError(f"MODEL {source!r}: no such folder (MODEL is a local folder, a .gguf file, "
                                "or a Hub id 'namespace/name').")


def load_model(source: str, dtype: str = "auto", attn_implementation: str | None = None, task: str | None = None,
               gguf_file: str | None = None):
    """Load a model from a local folder, a Hub id, or a GGUF file.

    Args:
        source: A folder, a Hub id, or a ``.gguf`` file.
        dtype: Torch dtype name to load in (``"auto"``: the checkpoint's).
        attn_implementation: ``"eager"`` or ``"sdpa"``; None: transformers' default.
        task: A key of :data:`hf_posenc.modeling.TASKS` (e.g. ``"sequence-classification"``) to pick
            the Auto class; without it, the class the checkpoint names (a causal LM for GGUF files,
            whose configs name none, when the model type has one).
        gguf_file: The GGUF file inside the folder ``source`` (a ``.gguf`` path needs none).

    Raises:
        FileNotFoundError: See :func:`check_source`.
    """
    import transformers
    from transformers import AutoConfig

    check_source(source)
    location, gguf_file = gguf_location(source, gguf_file)
    kwargs = {"dtype": dtype, **({"gguf_file": gguf_file} if gguf_file else {})}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = AutoConfig.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (ValueError, OSError) as error:
        if not gguf_file:
            raise
        # The GGUF reader reports a truncated file as a numpy reshape failure, many lines long.
        first_line = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise ValueError(f"Re-download or re-export {Path(location, gguf_file)}: it is not a readable GGUF file "
                         f"(truncated or corrupt: {first_line}).") from error
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if task is None and model_class is not None and not _is_model_class(model_class):
        raise ValueError(f"Pass --task ({', '.join(tasks_of(config))}) or fix config.json: its architectures "
                         f"names {architectures[0]!r}, which is not a model class.")
    if task is not None:
        model_class = getattr(transformers, TASKS[task][0])
        if type(config) not in model_class._model_mapping:
            raise ValueError(f"Pick --task from {', '.join(tasks_of(config))}: {config.model_type} has no "
                             f"{task} model.")
    if model_class is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and getattr(config, "is_decoder", True)
        model_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = model_class.from_pretrained(location, **kwargs)
    if gguf_file:
        _hf.forget_gguf_quantizer(model)
    return model


def _is_model_class(candidate) -> bool:
    from transformers import PreTrainedModel

    return isinstance(candidate, type) and issubclass(candidate, PreTrainedModel)


def tasks_of(config) -> list[str]:
    """The keys of :data:`hf_posenc.modeling.TASKS` that have a model for ``config``'s model type."""
    import transformers

    return [task for task, (auto, _) in TASKS.items() if type(config) in getattr(transformers, auto)._model_mapping]


def load_tokenizer(source: str, gguf_file: str | None = None):
    """The tokenizer of ``source`` (a folder, a Hub id or a ``.gguf`` file)."""
    from transformers import AutoTokenizer

    location, gguf_file = gguf_location(source, gguf_file)
    return AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
