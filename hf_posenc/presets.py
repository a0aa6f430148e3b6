"""The recipes shipped with the package: presets (YAML configs), recipe scripts, accelerate configs and
the ``evaluate`` metric modules, found by name.

The repository's top-level ``recipes/`` folder is their only source. A wheel carries that folder as
``hf_posenc/_recipes`` (``package-dir`` in pyproject.toml), so a pip-installed package reads the same
files as a checkout. ``hf-posenc recipes`` lists them, ``hf-posenc recipes cp NAME DIR`` copies one
out to edit, and ``hf-posenc compare quick --out DIR`` runs a compare preset by name.

Names are file stems (``compare_quick``, ``finetune_lora``, ``multi_gpu``, ``token_perplexity``); a
compare preset ``compare_X`` also answers to ``X`` (``quick``, ``tiny``, ``smollm2``). Config kinds
come from the stem's prefix (``compare_``, ``finetune_``, ``evaluate_``), which the recipe scripts
share. The one-line description of a YAML file is its first comment line; of a script or metric
module, the first line of its docstring.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Config kinds by file-name prefix, and the recipe script that runs each.
CONFIG_KINDS = {"compare": "compare", "finetune": "finetune_lora", "evaluate": "evaluate_context",
                "counting": "counting_task"}
#: Kinds that are not configs.
SCRIPT, ACCELERATE, METRIC = "recipe", "accelerate", "metric"


@dataclass(frozen=True)
class Recipe:
    """One shipped file (or, for a metric, folder).

    Attributes:
        name: The name it is found by (the file or folder stem).
        kind: ``"compare"``, ``"finetune"`` or ``"evaluate"`` for configs; ``"recipe"``,
            ``"accelerate"`` or ``"metric"`` otherwise.
        path: Where it is in this installation.
        description: One line.
        aliases: Other names that find it (``"quick"`` for ``compare_quick``).
    """

    name: str
    kind: str
    path: Path
    description: str
    aliases: tuple[str, ...] = ()

    @property
    def is_config(self) -> bool:
        """Whether it is a YAML preset of a recipe script."""
        return self.kind in CONFIG_KINDS


def recipes_dir() -> Path:
    """The folder holding the recipes in this installation.

    A wheel installs them as ``hf_posenc/_recipes``; a checkout (editable install, or the package put
    on ``PYTHONPATH``) has them in ``recipes/`` next to the package. The packaged copy is tried first
    because it exists only in a wheel install, where the folder next to the package is
    ``site-packages`` and a ``recipes/`` there would belong to someone else.

    Raises:
        FileNotFoundError: Neither holds ``configs/`` (a broken install).
    """
    here = Path(__file__).resolve().parent
    candidates = (here / "_recipes", here.parent / "recipes")
    for candidate in candidates:
        if (candidate / "configs").is_dir():
            return candidate
    raise FileNotFoundError(f"hf_posenc recipes not found in any of {[str(c) for c in candidates]}")


def _first_comment_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _first_docstring_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def catalogue() -> list[Recipe]:
    """Every shipped recipe: configs, then recipe scripts, accelerate configs and metrics, each by name."""
    root = recipes_dir()
    configs = []
    for path in sorted((root / "configs").glob("*.yaml")):
        kind = path.stem.split("_", 1)[0]
        aliases = (path.stem.split("_", 1)[1],) if kind == "compare" and "_" in path.stem else ()
        configs.append(Recipe(path.stem, kind if kind in CONFIG_KINDS else "config", path,
                              _first_comment_line(path), aliases))
    scripts = [Recipe(p.stem, SCRIPT, p, _first_docstring_line(p)) for p in sorted(root.glob("*.py"))]
    accelerate = [Recipe(p.stem, ACCELERATE, p, _first_comment_line(p))
                  for p in sorted((root / "accelerate").glob("*.yaml"))]
    metrics = [Recipe(p.name, METRIC, p, _first_docstring_line(p / f"{p.name}.py"))
               for p in sorted((root / "metrics").iterdir()) if (p / f"{p.name}.py").is_file()]
    return configs + scripts + accelerate + metrics


def find(name: str, kinds: tuple[str, ...] | None = None) -> Recipe:
    """The recipe called ``name`` (or one of its aliases; a trailing ``.yaml``/``.py`` is ignored).

    Args:
        name: e.g. ``"quick"``, ``"compare_quick"``, ``"compare_quick.yaml"``, ``"finetune_lora"``.
        kinds: Accept only these kinds (``("compare",)`` for ``hf-posenc compare``).

    Raises:
        ValueError: No recipe of an accepted kind has that name; the message lists those that do.
    """
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".yaml", ".py") else name
    allowed = [r for r in catalogue() if kinds is None or r.kind in kinds]
    for recipe in allowed:
        if stem == recipe.name or stem in recipe.aliases:
            return recipe
    what = " or ".join(kinds) if kinds else "recipe"
    names = ", ".join(n for r in allowed for n in (*r.aliases, r.name))
    raise ValueError(f"no {what} named {name!r}; available: {names}")


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """A config file: ``name_or_path`` itself when it exists, else the shipped preset of that name.

    Only a bare name (no folder in it) is looked up, so a mistyped path is reported as a missing file
    rather than silently replaced by a preset.

    Args:
        name_or_path: A YAML path, or a preset name such as ``"quick"``.
        kind: The config kind the caller runs (``"compare"``, ``"finetune"``, ``"evaluate"``).

    Raises:
        FileNotFoundError: Neither a file nor a preset of ``kind``; the message lists the presets.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    presets = [r for r in catalogue() if r.kind == kind]
    names = ", ".join(n for r in presets for n in (*r.aliases, r.name))
    if path.parent == Path("."):
        try:
            return find(str(name_or_path), (kind,)).path
        except ValueError:
            pass
    raise FileNotFoundError(f"{name_or_path}: no such file, nor a built-in {kind} preset ({names}); "
                            "`hf-posenc recipes` lists them")


def copy(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the recipe ``name`` into the folder ``dest`` (created if needed) and return the copy's path.

    A metric is copied as its folder, so ``evaluate.load`` works on the copy.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
        FileExistsError: The copy exists and ``overwrite`` is false.
    """
    recipe = find(name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / recipe.path.name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if recipe.path.is_dir():
        # The installed folder may hold __pycache__ from byte-compilation; the copy is source only.
        shutil.copytree(recipe.path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copyfile(recipe.path, target)
    return target


def run_hint(recipe: Recipe, path: Path | str | None = None) -> str | None:
    """The command that runs a config (at ``path``, default its shipped name), for messages; None for others."""
    config = str(path) if path is not None else (recipe.aliases[0] if recipe.aliases else recipe.name)
    if recipe.kind == "compare":
        return f"hf-posenc compare {config} --out runs/{recipe.name}"
    if recipe.kind in CONFIG_KINDS:
        script = CONFIG_KINDS[recipe.kind]
        launcher = "accelerate launch" if recipe.kind == "finetune" else "python"
        return f"{launcher} $(hf-posenc recipes path {script}) --config {config}"
    return None
