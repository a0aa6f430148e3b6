"""The recipes reach the wheel and are found by name: pyproject's mapping, ``hf_posenc.presets``,
``hf-posenc recipes`` / ``recipes cp`` / ``recipes path`` and ``hf-posenc compare NAME``.

No wheel is built here (``.ci/wheel_smoke.sh`` does that); these tests read pyproject.toml and run the
package from the checkout.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_posenc import presets
from hf_posenc.cli import main
from hf_posenc.experiments.config import load_config
from hf_posenc.experiments.context_extension import evaluation
from hf_posenc.experiments.context_extension.config import CompareConfig, EvaluateConfig, FinetuneConfig
from hf_posenc.experiments.counting.config import CountingConfig

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIG_CLASSES = {"compare": CompareConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig,
                  "counting": CountingConfig}


@pytest.fixture(scope="module")
def setuptools_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_data_matches_every_shipped_file(setuptools_config):
    assert setuptools_config["package-dir"]["hf_posenc._recipes"] == "recipes"
    patterns = setuptools_config["package-data"]["hf_posenc._recipes"]
    shipped = [p for folder in ("configs", "metrics", "accelerate", "lm_eval_tasks")
               for p in (RECIPES / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert len(shipped) >= 13  # 7 configs, 4 accelerate configs, 2 metric modules at the time of writing
    # setuptools globs relative to the package folder; fnmatch's "*" also crosses "/", so match per part.
    def matched(relative: str) -> bool:
        return any(len(Path(relative).parts) == len(Path(pattern).parts)
                   and all(fnmatch.fnmatch(a, b) for a, b in zip(Path(relative).parts, Path(pattern).parts))
                   for pattern in patterns)
    missing = [str(p.relative_to(RECIPES)) for p in shipped if not matched(p.relative_to(RECIPES).as_posix())]
    assert not missing, f"add patterns to [tool.setuptools.package-data] for {missing}"
    # The recipe scripts are modules of the package: build_py takes every top-level .py of recipes/.
    assert "hf_posenc._recipes" in setuptools_config["packages"]
    assert sorted(p.name for p in RECIPES.glob("*.py")) == ["compare.py", "counting_task.py", "evaluate_context.py",
                                                                 "finetune_lora.py"]


def test_every_subpackage_is_listed(setuptools_config):
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_posenc").rglob("__init__.py")}
    assert found - set(setuptools_config["packages"]) == set(), "add the subpackage to [tool.setuptools] packages"


def test_catalogue_names_are_unique_and_described():
    recipes = presets.catalogue()
    names = [n for r in recipes for n in (r.name, *r.aliases)]
    assert len(names) == len(set(names))
    expected = {p.stem for p in (RECIPES / "configs").glob("*.yaml")} | {p.stem for p in RECIPES.glob("*.py")} \
        | {p.stem for p in (RECIPES / "accelerate").glob("*.yaml")} | {p.name for p in (RECIPES / "metrics").iterdir()
                                                                      if (p / f"{p.name}.py").is_file()}
    assert {r.name for r in recipes} == expected
    for recipe in recipes:
        assert recipe.description and not recipe.description.endswith(("(", ",")), recipe


@pytest.mark.parametrize("path", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_validates_as_its_kind(path):
    recipe = presets.find(path.stem)
    assert recipe.kind in CONFIG_CLASSES, f"{path.name}: name it compare_*, finetune_*, evaluate_* or counting_*"
    load_config(CONFIG_CLASSES[recipe.kind], recipe.path)
    assert presets.run_hint(recipe) is not None


def _layout(root: Path, packaged: bool, beside: bool) -> Path:
    """A fake install: ``root/hf_posenc/presets.py`` with a packaged and/or a neighbouring recipes folder."""
    (root / "hf_posenc").mkdir(parents=True)
    if packaged:
        (root / "hf_posenc" / "_recipes" / "configs").mkdir(parents=True)
    if beside:
        (root / "recipes" / "configs").mkdir(parents=True)
    return root / "hf_posenc" / "presets.py"


def test_recipes_dir_prefers_the_packaged_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "__file__", str(_layout(tmp_path / "wheel", packaged=True, beside=True)))
    assert presets.recipes_dir() == (tmp_path / "wheel" / "hf_posenc" / "_recipes").resolve()
    monkeypatch.setattr(presets, "__file__", str(_layout(tmp_path / "checkout", packaged=False, beside=True)))
    assert presets.recipes_dir() == (tmp_path / "checkout" / "recipes").resolve()
    monkeypatch.setattr(presets, "__file__", str(_layout(tmp_path / "broken", packaged=False, beside=False)))
    with pytest.raises(FileNotFoundError, match="recipes not found"):
        presets.recipes_dir()


def test_metrics_load_from_the_recipes_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "recipes_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluation.load_metric("token_perplexity")  # nothing there: it does not read the checkout
    shutil.copytree(RECIPES / "metrics", tmp_path / "metrics")
    metric = evaluation.load_metric("token_perplexity")
    assert metric.compute(predictions=[1.0, 3.0], references=[0, 300], bucket_size=256)["num_tokens"] == 2


def test_recipes_lists_everything(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for recipe in presets.catalogue():
        assert any(line.split()[:1] == [recipe.name] and recipe.description in line for line in listing.splitlines())
    assert "compare_quick (quick)" in listing
    assert main(["recipes", "ls"]) == 0 and capsys.readouterr().out == listing


def test_recipes_cp_config_script_and_metric(tmp_path, capsys):
    assert main(["recipes", "cp", "quick", str(tmp_path / "new")]) == 0
    copied = tmp_path / "new" / "compare_quick.yaml"
    assert copied.read_bytes() == (RECIPES / "configs" / "compare_quick.yaml").read_bytes()
    assert f"hf-posenc compare {copied} --out" in capsys.readouterr().out
    load_config(CompareConfig, copied)

    assert main(["recipes", "cp", "finetune_lora.py", str(tmp_path)]) == 0
    assert (tmp_path / "finetune_lora.py").read_bytes() == (RECIPES / "finetune_lora.py").read_bytes()

    assert main(["recipes", "cp", "passkey_accuracy", str(tmp_path)]) == 0
    assert (tmp_path / "passkey_accuracy" / "passkey_accuracy.py").is_file()
    assert not (tmp_path / "passkey_accuracy" / "__pycache__").exists()


def test_recipes_cp_refuses_unknown_names_and_overwrites(tmp_path, capsys):
    assert main(["recipes", "cp", "quik", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no recipe named 'quik'" in error and all(n in error for n in ("quick", "finetune_lora", "token_perplexity"))
    assert not any(tmp_path.iterdir())

    (tmp_path / "compare_tiny.yaml").write_text("mine")
    assert main(["recipes", "cp", "tiny", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "compare_tiny.yaml").read_text() == "mine"
    assert main(["recipes", "cp", "tiny", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "compare_tiny.yaml").read_bytes() == (RECIPES / "configs" / "compare_tiny.yaml").read_bytes()


def test_recipes_path(capsys):
    assert main(["recipes", "path", "multi_gpu"]) == 0
    assert Path(capsys.readouterr().out.strip()) == (RECIPES / "accelerate" / "multi_gpu.yaml").resolve()


def test_compare_config_resolution(tmp_path, monkeypatch):
    configs = (RECIPES / "configs").resolve()
    for name in ("tiny", "compare_tiny", "compare_tiny.yaml"):
        assert presets.resolve_config(name, "compare") == configs / "compare_tiny.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("model: {}\n")
    assert presets.resolve_config("tiny", "compare") == Path("tiny")  # an existing file wins over a preset name
    # the message lists every compare preset by both names (the list grows with the presets)
    with pytest.raises(FileNotFoundError, match=r"built-in compare preset \(.*\bquick, compare_quick, recalibration, "
                                                r"compare_recalibration, .*tiny, compare_tiny\)"):
        presets.resolve_config("finetune_yarn_quick", "compare")  # a preset of another kind
    with pytest.raises(FileNotFoundError, match="no such file"):
        presets.resolve_config("configs/compare_tiny.yaml", "compare")  # a path is never swapped for a preset


def test_compare_by_name_reads_the_preset(tmp_path, capsys):
    # The override is checked against the named preset before anything runs: its file name in the error
    # proves which YAML was read, and nothing is trained.
    assert main(["compare", "tiny", "--out", str(tmp_path / "out"), "train.stepz=1"]) == 2
    error = capsys.readouterr().err
    assert "compare_tiny.yaml: train: unknown key 'stepz' (did you mean 'steps'?)" in error, error
    assert not (tmp_path / "out").exists()


def test_unknown_compare_name_lists_the_presets(tmp_path, capsys):
    assert main(["compare", "quack", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "quack: no such file" in error and "quick" in error and "tiny" in error
    assert not (tmp_path / "out").exists()


def test_recipe_scripts_take_preset_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for script, preset in (("finetune_lora", "finetune_yarn_quick"), ("evaluate_context", "evaluate_quick")):
        spec = importlib.util.spec_from_file_location(f"recipe_{script}", RECIPES / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit, match=rf"{preset}\.yaml.*unknown key 'bogus'"):
            module.main(["--config", preset, "bogus=1"])
    assert not any(tmp_path.iterdir())  # stopped at the config: nothing written



def test_recipe_scripts_add_only_a_checkout_to_sys_path(tmp_path):
    # Installed, a script sits in hf_posenc/_recipes: the folder above it is the package itself, whose
    # modules (config.py, hub.py, ...) must not become top-level imports. In a checkout it is the repo root.
    scripts = ["compare.py", "evaluate_context.py", "finetune_lora.py"]
    packaged = tmp_path / "site" / "hf_posenc" / "_recipes"
    packaged.mkdir(parents=True)
    for script in scripts:
        shutil.copy(RECIPES / script, packaged / script)
    # One interpreter per layout (hf_posenc imports once): each script's top level runs, not its main().
    probe = ("import runpy, sys\n"
             "for path in sys.argv[1:]:\n"
             "    before = list(sys.path)\n"
             "    runpy.run_path(path, run_name='probe')\n"
             "    print(repr(sys.path))\n"
             "    sys.path[:] = before\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The installed layout imports hf_posenc from the checkout through PYTHONPATH, as a wheel would from site-packages.
    installed_env = {**env, "PYTHONPATH": str(ROOT)}
    for folder, folder_above, run_env, expected in ((packaged, packaged.parent, installed_env, False),
                                                    (RECIPES, ROOT, env, True)):
        out = subprocess.run([sys.executable, "-c", probe, *(str(folder / s) for s in scripts)], cwd=tmp_path,
                             env=run_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        printed = [line for line in out.stdout.splitlines() if line.startswith("[")]
        assert len(printed) == len(scripts), out.stdout
        for script, line in zip(scripts, printed):
            sys_path = [str(Path(p).resolve()) for p in ast.literal_eval(line) if p]
            assert (str(folder_above.resolve()) in sys_path) is expected, (folder / script, sys_path)
