"""What every experiment's config shares: strict sections, the ``posenc`` field, and the one loader.

Every entry point (``recipes/finetune_lora.py``, ``recipes/compare.py``, ``recipes/evaluate_context.py``,
``recipes/counting_task.py`` and ``hf-posenc compare``) calls :func:`load_config`: preset name or path ->
YAML (with ``include:``) -> ``key.sub=value`` overrides -> validation. A typo (``lora.rnak: 8``) or a wrong
type (``train.steps: ten``) stops there with an error naming the file, the key and the allowed keys or
values, before any model is loaded.

Why pydantic v2 and not OmegaConf structured configs: the ``posenc`` entries must be the encodings'
own configs (:class:`hf_posenc.config.PosEncConfig`, a factory that dispatches on ``kind`` and
validates each kind's parameters). Pydantic validates a field with any callable, so ``posenc`` is
checked exactly once, by ``PosEncConfig`` itself; OmegaConf cannot type a field as a union of
structured configs, so ``posenc`` would stay an untyped ``Any`` checked by hand afterwards. Pydantic
also gives strict types (``true`` is not a step count), unknown-key rejection and error locations for
free; it is already installed with most ML stacks. What it lacks, including other files, is done here
by the ``include:`` key: a list of YAML files merged under the including file (its own keys win),
found next to that file or else among the shipped presets, so a preset copied out with
``hf-posenc recipes cp`` still finds the blocks it shares with the others.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError
from pydantic import PositiveInt as Positive  # noqa: F401  (re-exported: the sections' positive integer)
from pydantic.fields import FieldInfo

from .. import presets
from ..config import PosEncConfig

#: The YAML key that lists files to merge under a config.
INCLUDE_KEY = "include"

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

#: ``json_schema_extra`` of a setting added after runs were recorded, whose default computes exactly what those
#: runs computed: :func:`fingerprint_settings` leaves it out while it has its default, so that adding it does not
#: make every recorded run stale (a grid resumes from the records whose fingerprint matches).
SINCE_RECORDED = {"fingerprint": "omit_at_default"}

#: ``json_schema_extra`` of a setting that changes how a run is carried out, not what it computes: how often it
#: saves a checkpoint or logs, whether it resumes from one (a resumed run ends on the same weights as one never
#: stopped). :func:`fingerprint_settings` reads it at its default, so a long comparison can turn checkpoints on
#: halfway without making its finished records stale.
OPERATIONAL = {"fingerprint": "read_at_default"}


class ConfigError(ValueError):
    """A config file, key or value is invalid. The message names the file and the offending key."""


def _encoding(value: Any) -> PosEncConfig:
    if isinstance(value, PosEncConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with a 'kind' key, got {value!r}")
    return PosEncConfig.from_dict(value)  # the encodings' own validation; its message names the field


def encoding_dict(config: PosEncConfig) -> dict[str, Any]:
    """How a loaded ``posenc`` entry is written to results and cards: its parameters that are set.

    Unset (None) parameters mean "the model's own value"; leaving them out keeps records readable.
    """
    return {k: v for k, v in config.to_dict().items() if v is not None}


#: A ``posenc:`` entry: a mapping with ``kind`` in YAML, a :class:`~hf_posenc.config.PosEncConfig` once loaded.
Encoding = Annotated[PosEncConfig, PlainValidator(_encoding), PlainSerializer(encoding_dict)]


class Section(BaseModel):
    """A config section: unknown keys are errors, and values must have their declared type.

    Strict mode is deliberate: lax pydantic would read ``steps: true`` as 1 and ``steps: "10"`` as 10.
    An integer is still accepted where a float is expected.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    #: The preset kind a name resolves under (``hf_posenc.presets``); set by each top-level config.
    preset_kind: ClassVar[str] = ""


Config = TypeVar("Config", bound=Section)


def fingerprint_settings(section: Section, keep: Collection[str] = ()) -> dict[str, Any]:
    """``section.model_dump(mode="json")`` as a run's fingerprint reads it, in nested sections too: settings
    declared :data:`SINCE_RECORDED` are left out while they have their default, and settings declared
    :data:`OPERATIONAL` read as their default whatever they are set to.

    Args:
        section: The settings.
        keep: Names of declared settings to write as they are (a :data:`SINCE_RECORDED` one even at its default,
            an :data:`OPERATIONAL` one at its value): the payload that code from before their declaration wrote
            (see :func:`declared_names`).
    """
    return _fingerprint_view(section, section.model_dump(mode="json"), frozenset(keep))


def declared_names(section: Section) -> set[str]:
    """The names of the settings declared :data:`SINCE_RECORDED` or :data:`OPERATIONAL` in ``section`` and its
    nested sections: those whose place in a fingerprint changed after runs were recorded."""
    names: set[str] = set()
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if _declaration(info):
            names.add(name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, Section):
                names |= declared_names(item)
    return names


def _declaration(info: FieldInfo) -> str | None:
    return (info.json_schema_extra or {}).get("fingerprint")


def _fingerprint_view(section: Section, dumped: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        declaration = _declaration(info) if name not in keep else None
        if declaration == SINCE_RECORDED["fingerprint"] and value == info.default:
            dumped.pop(name, None)
        elif declaration == OPERATIONAL["fingerprint"]:
            dumped[name] = info.default
        elif isinstance(value, Section):
            _fingerprint_view(value, dumped[name], keep)
        elif isinstance(value, list | tuple):
            for item, item_dumped in zip(value, dumped[name]):
                if isinstance(item, Section):
                    _fingerprint_view(item, item_dumped, keep)
    return dumped


# -- reading -------------------------------------------------------------------------------------------


def load_config(cls: type[Config], config: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe config: the one loader of every recipe, comparison and evaluation entry point.

    Args:
        cls: The top-level config class (``CompareConfig``, ``FinetuneConfig``, ``EvaluateConfig``,
            ``CountingConfig``); its ``preset_kind`` says where a preset name is looked up.
        config: A YAML path, or the name of a shipped preset of that kind (``"quick"``; see
            :func:`hf_posenc.presets.resolve_config`).
        overrides: ``key.sub=value`` changes; values are YAML (``eval.lengths=[256,512]``), and list
            items are indexed by number (``variants.2.train.steps=50``).

    Raises:
        ConfigError: Invalid YAML, a bad include or override, an unknown key or an ill-typed value;
            the message names the file and the key.
        FileNotFoundError: ``config`` is neither a file nor a preset of that kind.
    """
    path = presets.resolve_config(config, cls.preset_kind)
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{path.name}: {line}" for line in _describe(err, cls))) from None


def read_yaml(path: Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``include:`` files merged underneath (recursively; its own keys win)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of sections, got {type(data).__name__}")
    includes = data.pop(INCLUDE_KEY, None) or []
    merged: dict[str, Any] = {}
    for name in [includes] if isinstance(includes, str) else includes:
        included = _include_path(path, name)
        if included in _including:
            raise ConfigError(f"{path.name}: {INCLUDE_KEY}: {name!r} includes itself")
        merged = _merge(merged, read_yaml(included, (*_including, included)))
    return _merge(merged, data)


def _include_path(including: Path, name: Any) -> Path:
    if not isinstance(name, str):
        raise ConfigError(f"{including.name}: {INCLUDE_KEY}: expected file names, got {name!r}")
    candidates = (including.parent / name, presets.recipes_dir() / "configs" / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{including.name}: {INCLUDE_KEY}: {name!r} is in none of {[str(c.parent) for c in candidates]}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mapping by mapping (lists and values are replaced whole)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config mapping (values parsed as YAML).

    ``variants.2.train.steps=50`` indexes into lists. A misspelt key is not caught here but by the
    validation that follows, so it fails exactly like a misspelt key in the file.

    Raises:
        ConfigError: An override without ``=``, a list index out of range, or a path through a value.
    """
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parts = dotted.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the config"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {dotted!r}: {part!r} is not an index of {where} "
                                      f"(a list of {len(node)})")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override {dotted!r}: {where} is not a mapping")
            if depth == len(parts) - 1:
                node[key] = yaml.safe_load(raw) if raw else ""
            else:
                node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    return data


# -- error messages ------------------------------------------------------------------------------------


def _describe(err: ValidationError, cls: type[BaseModel]) -> list[str]:
    """One line per problem: the dotted key (as an override would spell it) and what is allowed."""
    lines = []
    for problem in err.errors(include_url=False):
        loc = [str(part) for part in problem["loc"]]
        key = ".".join(loc)
        if problem["type"] == "extra_forbidden":
            section = _section_at(cls, problem["loc"][:-1])
            allowed = list(section.model_fields) if section else []
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = ".".join(loc[:-1]) or "top level"
            lines.append(f"{where}: unknown key {loc[-1]!r}{hint}; allowed keys: {', '.join(allowed)}")
        elif problem["type"] == "missing":
            lines.append(f"{key}: missing required key")
        elif problem["type"] == "value_error":
            # Messages of our own checks and of PosEncConfig already name the field and allowed values.
            message = str(problem["ctx"]["error"])
            lines.append(f"{key}: {message}" if key else message)
        else:
            lines.append(f"{key}: {problem['msg']} (got {problem['input']!r})")
    return lines


def _section_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class at ``loc`` inside ``cls`` (list indices skipped), or None."""
    section: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(section, "model_fields", {}).get(part)
        if field is None:
            return None
        section = _unwrap(field.annotation)
    return section if isinstance(section, type) and issubclass(section, BaseModel) else None


def _unwrap(hint: Any) -> Any:
    """The section type inside ``list[X]``, ``X | None`` and ``Annotated[X, ...]`` (None for other generics)."""
    while get_origin(hint) is not None:
        args = [a for a in get_args(hint) if a is not type(None)]
        if get_origin(hint) not in (Annotated, list) and len(args) != 1:
            return None  # a mapping, a Literal, a union of several types: no section below
        hint = args[0]
    return hint
