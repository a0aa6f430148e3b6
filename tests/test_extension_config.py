"""Typed recipe configs: strict keys and types, overrides, shipped YAMLs, errors before training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_posenc.extension.recipe_config import CompareConfig, EvaluateConfig, FinetuneConfig, TrainConfig
from hf_posenc.extension.typed_config import ConfigError, apply_overrides, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = _write(tmp_path, {"posenc": {"kind": "alibi"}, "lora": {"alpah": 4}})
    with pytest.raises(ConfigError, match=r"cfg.yaml.lora: unknown key 'alpah' \(did you mean 'alpha'\?\)"):
        load_config(FinetuneConfig, path)


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"steps": "ten"}, None, r"train.steps: expected an integer, got 'ten'"),
        ({"steps": True}, None, r"train.steps: expected an integer, got True"),
        ({"steps": 0}, None, r"train.steps must be positive"),
        ({"mixed_precision": "fp8"}, None, r"train.mixed_precision: .*'fp8'"),
        ({"lr": "fast"}, None, r"train.lr: .*'fast'"),
    ],
)
def test_bad_values_are_rejected(tmp_path, section, value, message):
    path = _write(tmp_path, {"posenc": {"kind": "nope"}, "train": section})
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, path)


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0 and isinstance(from_dict(TrainConfig, {"lr": 1}).lr, float)


def test_unknown_encoding_kind_and_parameter(tmp_path):
    with pytest.raises(ConfigError, match=r"posenc: Unknown positional encoding kind='xpos'"):
        load_config(FinetuneConfig, _write(tmp_path, {"posenc": {"kind": "xpos"}}))
    with pytest.raises(ConfigError, match=r"rope_type"):
        load_config(FinetuneConfig, _write(tmp_path, {"posenc": {"kind": "rope", "rope_type": "ntk-by-parts"}}))
    with pytest.raises(ConfigError, match=r"variants\[1\] \(b\).posenc: .*unknown parameter"):
        load_config(CompareConfig, _write(tmp_path, {"variants": [
            {"name": "a", "posenc": {"kind": "nope"}},
            {"name": "b", "posenc": {"kind": "alibi", "slope": 2}},
        ]}))


def test_variant_train_overrides_are_checked_at_load_time(tmp_path):
    data = {"variants": [{"name": "a", "posenc": {"kind": "nope"}, "train": {"seq_lenn": 64}}]}
    with pytest.raises(ConfigError, match=r"variants.a.train: unknown key 'seq_lenn' \(did you mean 'seq_len'\?\)"):
        load_config(CompareConfig, _write(tmp_path, data))
    data = {"variants": [{"name": "a", "posenc": {"kind": "nope"}}, {"name": "a", "posenc": {"kind": "alibi"}}]}
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(CompareConfig, _write(tmp_path, data))


def test_overrides_reach_nested_keys_and_list_items(tmp_path):
    path = _write(tmp_path, {"variants": [{"name": "a", "posenc": {"kind": "nope"}}], "train": {"steps": 3}})
    cfg = load_config(CompareConfig, path, ["train.steps=7", "eval.lengths=[64, 128]", "variants.0.train.seq_len=32",
                                            "variants.0.posenc.kind=alibi", "lora.target_modules=null"])
    assert cfg.train.steps == 7 and cfg.eval.lengths == [64, 128]
    assert cfg.variant_train(cfg.variants[0]).seq_len == 32 and cfg.variant_train(cfg.variants[0]).steps == 7
    assert cfg.variants[0].posenc == {"kind": "alibi"} and cfg.lora.target_modules is None
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_config(CompareConfig, path, ["train.stepz=7"])
    assert [v.name for v in load_config(CompareConfig, path, ["only=[a]"]).selected_variants()] == ["a"]
    with pytest.raises(ConfigError, match=r"only: unknown variant\(s\) \['b'\]"):
        load_config(CompareConfig, path, ["only=[b]"])
    with pytest.raises(ConfigError, match="is not of the form"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"variants": [{}]}, ["variants.3.name=x"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    text = path.read_text()
    cls = CompareConfig if path.name.startswith("compare") else EvaluateConfig if path.name.startswith("evaluate") else FinetuneConfig
    cfg = load_config(cls, path)
    assert cfg is not None
    script = {"compare": "recipes/compare.py", "evaluate": "recipes/evaluate_context.py"}.get(
        path.name.split("_")[0], "recipes/finetune_lora.py")
    first_comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert script in first_comment and f"recipes/configs/{path.name}" in first_comment


def test_compare_configs_list_the_standard_variants():
    for name in ("compare_quick.yaml", "compare_tiny.yaml", "compare_smollm2.yaml"):
        cfg = load_config(CompareConfig, CONFIGS / name)
        extensions = [] if name == "compare_tiny.yaml" else ["self_extend", "rerope"]  # training-free, zero-shot
        assert [v.name for v in cfg.variants] == ["rope", "rope_finetuned", "rope_linear", "rope_yarn",
                                                  "rope_dynamic", "nope", "alibi", "t5_bias", "cope", *extensions]


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("recipes/finetune_lora.py", ["--config", "recipes/configs/finetune_yarn_quick.yaml", "lora.rnak=4"]),
        ("recipes/finetune_lora.py", ["--config", "recipes/configs/finetune_yarn_quick.yaml", "posenc.kind=xpos"]),
        ("recipes/compare.py", ["recipes/configs/compare_quick.yaml", "--out", "OUT", "variants.6.posenc.kind=xpos"]),
        ("recipes/evaluate_context.py", ["--config", "recipes/configs/evaluate_quick.yaml", "eval.lengths=[]"]),
    ],
)
def test_scripts_stop_before_any_work(tmp_path, script, args):
    """A bad config exits non-zero with the error and builds/trains/writes nothing."""
    cache = tmp_path / "cache"
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    env = {**os.environ, "HF_POSENC_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "config error:" in proc.stderr
    assert not (cache / "base").exists() and not (tmp_path / "out").exists()
