"""PEFT helpers: LoRA configs for converted models and a safe adapter loader.

PEFT itself does the work; this module only knows which modules matter for positional encodings:
the attention projections of each architecture, the ``posenc`` tables a conversion adds (trained
through ``modules_to_save``), and for LongLoRA (Chen et al. 2023, https://arxiv.org/abs/2309.12307)
the embeddings and norms, which plain LoRA leaves frozen and which matter for context extension.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os

from peft import LoraConfig, PeftModel
from peft.utils import load_peft_weights
from torch import nn

from . import _hf
from .architectures import lora_target_modules
from .convert import posenc_of
from .loading import missing_local_folder

POSENC_MODULE = "posenc"
#: File that records, next to ``adapter_config.json``, the encoding of the base the adapter was trained on.
BASE_RECORD = "hf_posenc_base.json"
_OWN_ARGUMENTS = ("r", "alpha", "dropout", "train_position_tables", "longlora", "target_modules", "modules_to_save")
# LoraConfig fields that lora_config sets from its own arguments, and the usual other names of its arguments.
_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r", "lora_r": "r", "lora_rank": "r"}


def has_position_tables(model: nn.Module) -> bool:
    """Whether the model has learned position tables added by hf_posenc (``*.posenc`` with parameters)."""
    return any(name.rsplit(".", 1)[-1] == POSENC_MODULE and any(True for _ in module.parameters())
               for name, module in model.named_modules())


def embedding_and_norm_modules(model: nn.Module) -> list[str]:
    """Names (last component) of the input embeddings and all normalisation layers (LongLoRA's "+embed+norm")."""
    names = set()
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings or "norm" in type(module).__name__.lower():
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, *,
                train_position_tables: bool = True, longlora: bool = False,
                target_modules: list[str] | None = None, **kwargs) -> LoraConfig:
    """A ``LoraConfig`` for a (converted) model of a supported architecture.

    Args:
        model: The model the adapter is for.
        r, alpha, dropout: LoRA rank, scaling numerator and dropout.
        train_position_tables: Train (and save) the ``posenc`` tables through ``modules_to_save``.
        longlora: Also train the embeddings and norms in full (LongLoRA).
        target_modules: Override the architecture's attention projections.
        **kwargs: Other ``peft.LoraConfig`` fields (``modules_to_save``, ``bias``, ``use_rslora``, ...).

    Raises:
        TypeError: A keyword argument that is neither one of the above nor a ``LoraConfig`` field.
    """
    _check_lora_kwargs(kwargs)
    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_position_tables and has_position_tables(model):
        modules_to_save.append(POSENC_MODULE)
    if longlora:
        modules_to_save += embedding_and_norm_modules(model)
        # A trained copy of a tied input table must stay tied to the head, or merging silently unties
        # them (SmolLM2 ties its embeddings).
        kwargs.setdefault("ensure_weight_tying", bool(getattr(model.config, "tie_word_embeddings", False)))
    config = RecordingLoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_target_modules(model),
        modules_to_save=sorted(set(modules_to_save)) or None,
        **kwargs,
    )
    config.base_posenc = base_encoding(model)
    return config


class RecordingLoraConfig(LoraConfig):
    """A ``LoraConfig`` that also saves the encoding of its base (``base_posenc``) in :data:`BASE_RECORD`.

    PEFT calls the config's ``save_pretrained`` whenever it saves an adapter (``PeftModel.save_pretrained``,
    ``push_to_hub``, trainers); ``adapter_config.json`` itself stays as PEFT writes it, so plain PEFT loads
    the adapter unchanged. An adapter without position tables (ALiBi, RoPE scalings, Self-Extend, ReRoPE,
    NoPE) carries nothing else that tells which base it fits: :func:`load_adapter` reads this record.
    """

    base_posenc: dict | None = None  # a plain class attribute, not a field: adapter_config.json is unchanged

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        record = {"posenc": self.base_posenc}
        with open(os.path.join(save_directory, BASE_RECORD), "w") as file:
            json.dump(record, file, indent=2, sort_keys=True)


def base_encoding(model: nn.Module) -> dict | None:
    """The encoding ``model`` runs as a dict (None: the architecture's own, unconverted)."""
    posenc = posenc_of(model)
    return posenc.to_dict() if posenc is not None else None


def _recorded_base_encoding(adapter_path) -> tuple[bool, dict | None]:
    """``(recorded, encoding)`` from an adapter folder's :data:`BASE_RECORD` (adapters saved without one,
    or from the Hub, are not recorded)."""
    path = os.path.join(os.fspath(adapter_path), BASE_RECORD)
    if not os.path.isfile(path):
        return False, None
    with open(path) as file:
        return True, json.load(file).get("posenc")


def _check_lora_kwargs(kwargs: dict) -> None:
    """Name :func:`lora_config` and its arguments in the error, not ``LoraConfig.__init__``."""
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key in kwargs:
        if key in fields and key not in _ALIASES:
            continue
        hint = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, _OWN_ARGUMENTS, n=1)), None)
        raise TypeError(
            f"hf_posenc.lora_config() got an unexpected keyword argument {key!r}"
            + (f" (did you mean {hint}=?)" if hint else "")
            + f"; allowed: {', '.join(_OWN_ARGUMENTS)}, or any other peft.LoraConfig field "
            "(e.g. bias, use_rslora, use_dora, layers_to_transform, rank_pattern)."
        )


def _position_keys(state_dict_keys) -> set[str]:
    """Parameter names under a ``posenc`` module as ``"<layer>.<attention>.<param>"``, independent of
    PEFT's prefixes and ``modules_to_save`` wrappers."""
    out = set()
    for key in state_dict_keys:
        parts = key.split(".")
        if POSENC_MODULE in parts:
            i = parts.index(POSENC_MODULE)
            layer = next((p for p in reversed(parts[:i]) if p.isdigit()), "")
            out.add(f"{layer}.{parts[i - 1]}.{parts[-1]}")  # e.g. "0.self_attn.pos_emb"
    return out


def load_adapter(model: nn.Module, adapter_path: str | os.PathLike, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` that refuses an adapter its base cannot hold.

    PEFT silently drops adapter weights that have no module in the base; for position tables
    trained in ``modules_to_save`` that gives a wrong model with no warning.

    Raises:
        FileNotFoundError: ``adapter_path`` is a path that does not exist, or a folder without an adapter.
        ValueError: The adapter carries position tables that the base model lacks (convert the base
            with the same ``PosEncConfig`` first), or of another kind.
    """
    if missing_local_folder(adapter_path):
        raise FileNotFoundError(f"load_adapter: the adapter folder {os.fspath(adapter_path)!r} does not exist "
                                "(pass a folder written by PeftModel.save_pretrained, or a Hub repo id).")
    if os.path.isdir(adapter_path) and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise FileNotFoundError(f"load_adapter: {os.fspath(adapter_path)!r} has no adapter_config.json; "
                                "pass a folder written by PeftModel.save_pretrained.")
    weights = load_peft_weights(str(adapter_path), device="cpu")
    adapter_tables = _position_keys(weights)
    recorded, adapter_base = _recorded_base_encoding(adapter_path)
    if adapter_tables:
        base_tables = _position_keys(name for name, _ in model.named_parameters())
        missing = sorted(adapter_tables - base_tables)
        if missing:
            # One line, the fix first: a 32-layer model's full lists of tables made a wall of text.
            found = (f"{len(base_tables)} others (e.g. {sorted(base_tables)[0]})" if base_tables else
                     "no position tables (not converted?)")
            encoding = _describe(adapter_base) if recorded and adapter_base else "PosEncConfig(...)"
            raise ValueError(
                f"Convert the base with the adapter's encoding first: hf_posenc.convert(base, {encoding}); the "
                f"adapter {_folder_name(adapter_path)!r} trains {len(missing)} position tables this base lacks "
                f"(e.g. {missing[0]}); the base has {found}."
            )
    if recorded:
        _check_same_encoding(adapter_base, base_encoding(model), adapter_path)
    with _hf.quiet_checkpointing_deprecation():
        peft_model = PeftModel.from_pretrained(model, str(adapter_path), **kwargs)
    # Saved again (after more training), the adapter keeps its record.
    adapter_name = kwargs.get("adapter_name", "default")
    config = peft_model.peft_config[adapter_name]
    if recorded and type(config) is LoraConfig:
        config.__class__ = RecordingLoraConfig
        config.base_posenc = adapter_base
    return peft_model


def _describe(posenc: dict | None) -> str:
    """``PosEncConfig(kind=..., <set fields>)``: unset fields left out, so that the hint stays one short line."""
    if posenc is None:
        return "the architecture's own (unconverted)"
    fields = {"kind": posenc.get("kind"), **{k: v for k, v in posenc.items() if v is not None and k != "kind"}}
    return "PosEncConfig(" + ", ".join(f"{key}={value!r}" for key, value in fields.items()) + ")"


def _check_same_encoding(adapter_base: dict | None, base: dict | None, adapter_path) -> None:
    """Refuse a base whose encoding is not the one the adapter was trained on: the weights would load and
    give another model, without a word."""
    if adapter_base == base:
        return
    if adapter_base is None:
        hint = "Load it on the unconverted base (hf_posenc.revert(base), or the original checkpoint)"
    else:
        hint = f"Convert the base first: hf_posenc.convert(base, {_describe(adapter_base)})"
    # The fix names the adapter's encoding already; the folder by its last part keeps the line short.
    raise ValueError(f"{hint}: the adapter {_folder_name(adapter_path)!r} was trained on that encoding; this base "
                     f"runs {_describe(base)}.")


def _folder_name(adapter_path) -> str:
    """The last part of an adapter folder or Hub id (the user passed the whole of it)."""
    return os.path.basename(os.path.normpath(os.fspath(adapter_path)))
