"""Every ```python and ```bash snippet of README.md and recipes/README.md runs (or is dry-run), and every
file name the two READMEs state exists or is produced.

How each snippet is checked:
* python: exec'd top to bottom in a scratch folder, with the placeholders of ``SUBSTITUTIONS`` replaced
  (a tiny 4-layer Llama saved to a folder stands in for ``path/to/llama``; pushes go to the loopback
  Hub of ``hub_server.py``); the files a snippet saves must then exist.
* bash, ``hf-posenc convert/info/push``: run in-process against the same tiny folders and loopback Hub.
* bash, long runs (``hf-posenc compare`` = ``python recipes/compare.py``, minutes to hours): dry run, i.e.
  the arguments are parsed by the CLI's parser and the config plus overrides are loaded and validated
  (that is what stops a bad key before anything runs); ``recipes/compare.py --help`` runs once.
* bash, ``pip install``: the requirement must be what is installed here (torch, the two checkpoint
  packages), ``-e .``/``".[test]"`` must name this project and an extra it defines.
* bash, ``python -m pytest``: not run (it is this suite); its plugin (``-n``: pytest-xdist) must be installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from hub_server import USER, hub_server  # noqa: F401  (fixture)
from tiny_vision_models import LAYOUT_MATCHES
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "recipes" / "README.md"]
BASE = "path/to/llama"
# Placeholder in a snippet -> what the test uses (format fields: base, user).
SUBSTITUTIONS = {BASE: "{base}", "me/": "{user}/"}
# Names a README states that are neither repository files nor produced by a snippet run here.
PLACEHOLDERS = {"hf_posenc/_recipes", "metrics/<name>/", "/path/to/hf_posenc", "hf_posenc-*.whl", "~/.cache/hf_posenc",
                ".csv", ".json", ".gguf"}
# Outputs of long runs that are not run here -> the committed file the same code wrote.
PRODUCED = {
    "runs/compare_quick/results.md": "recipes/results/compare_quick/results.md",
    "results.json": "recipes/results/compare_quick/results.json",
    "results.json/.csv/.md": "recipes/results/compare_quick/results.csv",
    "bench.json": "benchmarks/results_cpu.json",
}
# Folders a long run creates inside its run folder and that are not committed -> the module that creates them.
RUN_FOLDERS = {"variants/": "hf_posenc/experiments/context_extension/compare.py"}
PATH_LIKE = re.compile(r"/|\.(py|ya?ml|md|json|csv|png|gguf|whl|toml)$")


def snippets(readme: Path) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced python/bash block."""
    text = readme.read_text()
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, flags=re.S | re.M)]


def _substitute(code: str, **values) -> str:
    for placeholder, replacement in SUBSTITUTIONS.items():
        code = code.replace(placeholder, replacement.format(**values))
    return code


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """The tiny Llama standing in for ``path/to/llama`` (4 layers: the hybrid example uses layers 0-2)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("readme") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _saved_names(code: str) -> list[str]:
    return re.findall(r"save_pretrained\(\"([^\"]+)\"\)", code)


def test_python_snippets_run(base_folder, hub_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    ran = 0
    for readme in READMES:
        for lang, code, line in snippets(readme):
            if lang != "python":
                continue
            code = _substitute(code, base=base_folder, user=USER)
            if "ViTConfig" in code and not LAYOUT_MATCHES:  # an older transformers: the snippet must meet our refusal
                with pytest.raises(ValueError, match="upgrade transformers"):
                    exec(compile(code, f"{readme.name}:{line}", "exec"), {"__name__": "__readme__"})
                continue
            try:
                exec(compile(code, f"{readme.name}:{line}", "exec"), {"__name__": "__readme__"})
            except Exception as error:
                where = f"{readme.relative_to(REPO)} line {line}"
                raise AssertionError(f"{where}: {type(error).__name__}: {error}") from error
            for name in _saved_names(code):
                folder = tmp_path / name
                assert (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file(), name
            ran += 1
    assert ran >= 2
    # What the comments of the quick start promise about the saved folders.
    assert json.loads((tmp_path / "llama-yarn" / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((tmp_path / "llama-alibi" / "config.json").read_text())["model_type"] == "hf_posenc_llama"
    assert hub_server.files(f"{USER}/llama-alibi-hybrid")["README.md"]


def _commands(code: str) -> list[list[str]]:
    """Shell words of each command (comments dropped, line continuations joined, split at ``&&``)."""
    code = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments (DS_BUILD_OPS=0)
                words = words[1:]
            commands.append(words)
    return commands


def _check_pip(words: list[str]) -> str:
    args = [w for w in words[2:] if w not in ("--no-deps",)]
    if args[:1] == ["-e"]:
        target = args[1]
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        extras = re.findall(r"\[(.*)\]", target)
        assert target.split("[")[0] == ".", target
        for extra in [name.strip() for listed in extras for name in listed.split(",")]:
            assert extra in project.get("optional-dependencies", {}), extra
        return "pip -e (project and extras checked)"
    for requirement in args:
        name, _, version = requirement.partition("==")
        installed = torch.__version__.split("+")[0] if name == "torch" else importlib.metadata.version(name)
        assert installed == version, f"{requirement}: installed {installed}"
    return "pip (pinned versions are the installed ones)"


def _dry_run_compare(argv: list[str]) -> str:
    from hf_posenc.cli import build_parser
    from hf_posenc.experiments.config import load_config
    from hf_posenc.experiments.context_extension.config import CompareConfig
    from hf_posenc.presets import resolve_config

    args, extra = build_parser().parse_known_args(["compare", *argv])
    overrides = [*args.overrides, *extra]
    assert all("=" in word for word in overrides), overrides
    config = REPO / args.config if (REPO / args.config).is_file() else resolve_config(args.config, "compare")
    load_config(CompareConfig, config, overrides)
    if args.readme:
        assert (REPO / args.readme).is_file(), args.readme
    return "compare dry run (parsed, config + overrides validated)"


def _check_installed_recipe(words: list[str]) -> str:
    """``accelerate launch $(hf-posenc recipes path NAME) --config PRESET`` (or ``python $(...)``): the
    script and the preset it names both resolve (running them is the recipes' own tests' job)."""
    from hf_posenc.presets import CONFIG_KINDS, find, resolve_config

    name = words[words.index("path") + 1].rstrip(")")
    script = find(name, ("recipe",)).path
    assert script.is_file(), script
    kind = {script_name: kind for kind, script_name in CONFIG_KINDS.items()}[name]
    assert resolve_config(words[words.index("--config") + 1], kind).is_file()
    return "installed recipe resolved"


def _dry_run_counting(argv: list[str]) -> str:
    """``python recipes/counting_task.py ...``: the script's own parser, then the config is validated."""
    import importlib.util

    from hf_posenc.experiments.counting.config import load_config as load_counting
    from hf_posenc.presets import resolve_config

    spec = importlib.util.spec_from_file_location("counting_task", REPO / "recipes" / "counting_task.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.build_parser().parse_args(argv)
    config = REPO / args.config if (REPO / args.config).is_file() else resolve_config(args.config, "counting")
    load_counting(config)
    return "counting dry run (parsed, config validated)"


def _check_lm_eval(words: list[str]) -> str:
    """``lm_eval ... --include_path DIR --tasks A,B``: every task is defined by a YAML in DIR (not run here:
    the harness is an optional extra; tests/test_lm_eval.py runs the command where it is installed)."""
    import yaml

    folder = REPO / words[words.index("--include_path") + 1]
    defined = {yaml.safe_load(re.sub(r"!function \S+", "null", p.read_text()))["task"] for p in folder.rglob("*.yaml")}
    for task in words[words.index("--tasks") + 1].split(","):
        assert task in defined, f"lm_eval task {task!r} not defined under {folder}"
    return "lm_eval tasks resolved"


def test_bash_snippets_run_or_dry_run(base_folder, hub_server, tmp_path, monkeypatch, capsys):  # noqa: F811
    from hf_posenc.cli import main

    monkeypatch.chdir(tmp_path)
    checked = []
    for readme in READMES:
        for lang, code, line in snippets(readme):
            if lang != "bash":
                continue
            for words in _commands(_substitute(code, base=base_folder, user=USER)):
                where = f"{readme.relative_to(REPO)} line {line}: {shlex.join(words)}"
                if words[:2] == ["pip", "install"]:
                    checked.append(_check_pip(words))
                elif words[:2] == ["hf-posenc", "compare"]:
                    checked.append(_dry_run_compare(words[2:]))
                elif words[:2] == ["python", "recipes/compare.py"]:
                    checked.append(_dry_run_compare(words[2:]))
                elif words[:2] == ["python", "recipes/counting_task.py"]:
                    checked.append(_dry_run_counting(words[2:]))
                elif words[0] == "lm_eval":
                    checked.append(_check_lm_eval(words))
                elif words[0] == "hf-posenc":
                    assert main(words[1:]) == 0, where
                    checked.append(f"ran {words[1]}")
                elif "$(hf-posenc" in words and words[0] in ("accelerate", "python"):
                    checked.append(_check_installed_recipe(words))
                elif words[:3] == ["python", "-m", "pytest"]:
                    assert "-n" not in words or importlib.util.find_spec("xdist"), where
                    checked.append("pytest (not run: this suite)")
                else:
                    raise AssertionError(f"{where}: no rule in tests/test_readme.py checks this command")
    out = capsys.readouterr().out
    assert "encoding: " in out  # hf-posenc info printed the converted folder
    assert "ran convert" in checked and "ran push" in checked and checked.count(
        "compare dry run (parsed, config + overrides validated)") >= 3
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "compare.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr


def _stated_names(readme: Path) -> set[str]:
    text = readme.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # snippets: checked by running them
    names = set()
    for token in re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text):
        words = re.split(r"[\s\"'()]+", token)
        for previous, word in zip(["", *words], words):
            if previous == "--out":  # the output folder a command creates
                continue
            if not word or word.startswith(("http", "-", "$")) or not PATH_LIKE.search(word):
                continue
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", word)
            names |= ({braces[1] + part + braces[3] for part in braces[2].split(",")} if braces else {word})
    return names


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stated_file_exists_or_is_produced(readme):
    missing = []
    for name in sorted(_stated_names(readme)):
        if name in PLACEHOLDERS:
            continue
        if name in RUN_FOLDERS:  # not committed: the code must still create it under that name
            if f'"{name.rstrip("/")}"' not in (REPO / RUN_FOLDERS[name]).read_text():
                missing.append(name)
            continue
        if name in PRODUCED:
            name = PRODUCED[name]
        candidates = [REPO / name, readme.parent / name]
        if "/" not in name.rstrip("/"):  # a bare file name: the README names it in a folder it describes
            candidates += [p for p in REPO.rglob(name) if ".git" not in p.parts]
        if not any(p.exists() for p in candidates):
            missing.append(name)
    assert not missing, f"{readme.relative_to(REPO)} names files that do not exist: {missing}"
