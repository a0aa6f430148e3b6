"""Typed recipe configs: strict keys and types, includes, overrides, shipped YAMLs, errors before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_posenc.config import PosEncConfig
from hf_posenc.experiments import grid
from hf_posenc.experiments.config import ConfigError, apply_overrides, load_config
from hf_posenc.experiments.context_extension import compare
from hf_posenc.experiments.context_extension.config import (
    CompareConfig,
    EvaluateConfig,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_file_key_suggestion_and_allowed_keys(tmp_path):
    path = _write(tmp_path, {"posenc": {"kind": "alibi"}, "lora": {"alpah": 4}})
    with pytest.raises(ConfigError) as caught:
        load_config(FinetuneConfig, path)
    assert str(caught.value) == ("cfg.yaml: lora: unknown key 'alpah' (did you mean 'alpha'?); allowed keys: "
                                 "r, alpha, dropout, target_modules, modules_to_save, train_embeddings_and_norms, "
                                 "full_attention, full_model")
    with pytest.raises(ConfigError, match=r"^cfg.yaml: top level: unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(FinetuneConfig, _write(tmp_path, {"posenc": {"kind": "nope"}, "trian": {}}))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"steps": "ten"}, r"^cfg.yaml: train.steps: Input should be a valid integer \(got 'ten'\)$"),
        # Strict types: YAML `true` and `1.5` are not step counts (lax parsing would take them as 1).
        ({"steps": True}, r"^cfg.yaml: train.steps: Input should be a valid integer \(got True\)$"),
        ({"steps": 1.5}, r"^cfg.yaml: train.steps: Input should be a valid integer \(got 1.5\)$"),
        ({"steps": 0}, r"^cfg.yaml: train.steps: Input should be greater than 0 \(got 0\)$"),
        ({"mixed_precision": "fp8"},
         r"^cfg.yaml: train.mixed_precision: Input should be 'no', 'bf16' or 'fp16' \(got 'fp8'\)$"),
        ({"lr": "fast"}, r"^cfg.yaml: train.lr: Input should be a valid number \(got 'fast'\)$"),
    ],
)
def test_bad_values_name_file_key_and_allowed_values(tmp_path, section, message):
    path = _write(tmp_path, {"posenc": {"kind": "nope"}, "train": section})
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, path)


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, {"posenc": {"kind": "nope"}, "train": {"steps": "x", "lr": "y"}})
    with pytest.raises(ConfigError) as caught:
        load_config(FinetuneConfig, path)
    assert [line.split(":")[1].strip() for line in str(caught.value).splitlines()] == ["train.steps", "train.lr"]


def test_int_is_accepted_where_a_float_is_expected():
    config = TrainConfig.model_validate({"lr": 1})
    assert config.lr == 1.0 and isinstance(config.lr, float)


def test_posenc_is_the_encodings_own_config(tmp_path):
    posenc = {"kind": "rope", "rope_type": "yarn", "factor": 4.0}
    cfg = load_config(FinetuneConfig, _write(tmp_path, {"posenc": posenc}))
    assert cfg.posenc == PosEncConfig(kind="rope", rope_type="yarn", factor=4.0)
    # Saved without the unset parameters, as the YAML wrote it.
    assert cfg.model_dump(mode="json")["posenc"] == {"kind": "rope", "rope_type": "yarn", "factor": 4.0}
    # The message is PosEncConfig's own (one check, not a second copy of it), under the key's path.
    for posenc, key in (({"kind": "xpos"}, "posenc"), ({"kind": "rope", "rope_type": "ntk-by-parts"}, "posenc")):
        with pytest.raises(ValueError) as expected:
            PosEncConfig(**posenc)
        with pytest.raises(ConfigError) as caught:
            load_config(FinetuneConfig, _write(tmp_path, {"posenc": posenc}))
        assert str(caught.value) == f"cfg.yaml: {key}: {expected.value}"
    with pytest.raises(ConfigError,
                       match=r"^cfg.yaml: variants.1.posenc: PosEncConfig\(kind='alibi'\): unknown parameter"):
        load_config(CompareConfig, _write(tmp_path, {"variants": [
            {"name": "a", "posenc": {"kind": "nope"}},
            {"name": "b", "posenc": {"kind": "alibi", "slope": 2}},
        ]}))
    with pytest.raises(ConfigError, match=r"^cfg.yaml: posenc: expected a mapping with a 'kind' key, got 'alibi'$"):
        load_config(FinetuneConfig, _write(tmp_path, {"posenc": "alibi"}))
    with pytest.raises(ConfigError, match=r"^cfg.yaml: posenc: missing required key$"):
        load_config(FinetuneConfig, _write(tmp_path, {}))


def test_variant_train_changes_are_checked_at_load_time(tmp_path):
    data = {"variants": [{"name": "a", "posenc": {"kind": "nope"}, "train": {"seq_lenn": 64}}]}
    with pytest.raises(ConfigError,
                       match=r"^cfg.yaml: variants.0.train: unknown key 'seq_lenn' \(did you mean 'seq_len'\?\)"):
        load_config(CompareConfig, _write(tmp_path, data))
    data = {"variants": [{"name": "a", "posenc": {"kind": "nope"}, "train": {"batch_size": 0}}]}
    with pytest.raises(ConfigError, match=r"variants.0.train.batch_size: Input should be greater than 0"):
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
    assert cfg.train.seq_len == TrainConfig().seq_len  # the shared section is not changed by a variant's
    assert cfg.variants[0].posenc == PosEncConfig(kind="alibi") and cfg.lora.target_modules is None
    with pytest.raises(ConfigError, match=r"^cfg.yaml: train: unknown key 'stepz'"):
        load_config(CompareConfig, path, ["train.stepz=7"])
    assert [v.name for v in load_config(CompareConfig, path, ["only=[a]"]).selected_variants()] == ["a"]
    with pytest.raises(ConfigError, match=r"only: unknown variant\(s\) \['b'\]; allowed: \['a'\]"):
        load_config(CompareConfig, path, ["only=[b]"])
    with pytest.raises(ConfigError, match="is not of the form"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match=r"'3' is not an index of variants \(a list of 1\)"):
        apply_overrides({"variants": [{}]}, ["variants.3.name=x"])
    with pytest.raises(ConfigError, match="train.steps is not a mapping"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_include_merges_shared_blocks_under_the_file(tmp_path):
    (tmp_path / "blocks").mkdir()
    _write(tmp_path / "blocks", {"train": {"steps": 9, "lr": 0.5}, "lora": {"r": 3}}, "base.yaml")
    _write(tmp_path / "blocks", {"include": "base.yaml", "lora": {"alpha": 5}}, "middle.yaml")
    path = _write(tmp_path, {"include": ["blocks/middle.yaml"], "posenc": {"kind": "nope"}, "train": {"steps": 2}})
    cfg = load_config(FinetuneConfig, path)
    # Mappings merge key by key, the including file winning; includes nest.
    assert (cfg.train.steps, cfg.train.lr, cfg.lora.r, cfg.lora.alpha) == (2, 0.5, 3, 5)
    assert load_config(FinetuneConfig, path, ["train.lr=0.25"]).train.lr == 0.25  # overrides come last
    with pytest.raises(ConfigError, match=r"^cfg.yaml: include: 'nowhere.yaml' is in none of"):
        load_config(FinetuneConfig, _write(tmp_path, {"include": "nowhere.yaml", "posenc": {"kind": "nope"}}))
    _write(tmp_path, {"include": "loop.yaml"}, "loop.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(FinetuneConfig, _write(tmp_path, {"include": "loop.yaml", "posenc": {"kind": "nope"}}))


def test_the_quick_presets_share_one_base_model_block(tmp_path):
    shared = yaml.safe_load((CONFIGS / "shared" / "tiny_stdlib_llama.yaml").read_text())["model"]
    for name, cls in (("compare_quick", CompareConfig), ("finetune_yarn_quick", FinetuneConfig),
                      ("finetune_alibi_longlora", FinetuneConfig), ("evaluate_quick", EvaluateConfig)):
        assert "builtin:" not in (CONFIGS / f"{name}.yaml").read_text(), name  # written once, not copied
        assert load_config(cls, name).model == ModelConfig.model_validate(shared), name
    # A preset copied out of the package (`hf-posenc recipes cp`) finds the shared block among the shipped ones.
    copy = tmp_path / "compare_quick.yaml"
    copy.write_bytes((CONFIGS / "compare_quick.yaml").read_bytes())
    assert load_config(CompareConfig, copy) == load_config(CompareConfig, "quick")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    text = path.read_text()
    from hf_posenc.experiments.counting.config import CountingConfig

    kind = path.name.split("_")[0]
    cls = {"compare": CompareConfig, "evaluate": EvaluateConfig, "counting": CountingConfig}.get(kind, FinetuneConfig)
    cfg = load_config(cls, path)  # the one loader, for the counting presets too
    assert cfg is not None
    script = {"compare": "recipes/compare.py", "evaluate": "recipes/evaluate_context.py",
              "counting": "recipes/counting_task.py"}.get(kind, "recipes/finetune_lora.py")
    first_comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert script in first_comment and f"recipes/configs/{path.name}" in first_comment


def test_compare_configs_list_the_standard_variants():
    standard = ["rope", "rope_finetuned", "rope_linear", "rope_yarn", "rope_dynamic", "nope", "alibi", "t5_bias",
                "cope"]
    for name in ("compare_quick.yaml", "compare_tiny.yaml"):
        assert [v.name for v in load_config(CompareConfig, CONFIGS / name).variants] == standard
    # The SmolLM2 preset also runs the training-free RoPE extensions, zero-shot.
    smollm2 = load_config(CompareConfig, CONFIGS / "compare_smollm2.yaml").variants
    assert [v.name for v in smollm2] == standard + ["self_extend", "rerope"]
    assert not any(v.finetune for v in smollm2[-2:])


@pytest.mark.parametrize(
    ("script", "args", "error"),
    [
        ("recipes/finetune_lora.py", ["--config", "recipes/configs/finetune_yarn_quick.yaml", "lora.rnak=4"],
         "finetune_yarn_quick.yaml: lora: unknown key 'rnak'; allowed keys: r, alpha, dropout"),
        ("recipes/finetune_lora.py", ["--config", "recipes/configs/finetune_yarn_quick.yaml", "posenc.kind=xpos"],
         "finetune_yarn_quick.yaml: posenc: Unknown positional encoding kind='xpos'"),
        ("recipes/compare.py", ["recipes/configs/compare_quick.yaml", "--out", "OUT", "variants.6.posenc.kind=xpos"],
         "compare_quick.yaml: variants.6.posenc: Unknown positional encoding kind='xpos'"),
        ("recipes/evaluate_context.py", ["--config", "recipes/configs/evaluate_quick.yaml", "eval.lengths=[]"],
         "evaluate_quick.yaml: eval.lengths: List should have at least 1 item"),
    ],
)
def test_scripts_stop_before_any_work(tmp_path, script, args, error):
    """A bad config exits non-zero with the error and builds/trains/writes nothing."""
    cache = tmp_path / "cache"
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    env = {**os.environ, "HF_POSENC_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert f"config error: {error}" in proc.stderr, proc.stderr
    assert not (cache / "base").exists() and not (tmp_path / "out").exists()


def test_standard_preset_runs_every_text_kind_with_seeds():
    """Every registered encoding for token models is a variant of the standard preset (the registry, not a list
    kept by hand, says which kinds exist), each fine-tuned one under 3 seeds; training-free ones zero-shot."""
    from hf_posenc import registry

    cfg = load_config(CompareConfig, CONFIGS / "compare_standard.yaml")
    text_kinds = {e.kind for e in registry.entries() if not e.capabilities.patch_grid}
    assert {v.posenc.kind for v in cfg.variants} == text_kinds
    assert cfg.seeds == [0, 1, 2] and cfg.eval.curve_every
    for v in cfg.variants:
        runs = cfg.variant_runs(v)
        assert len(runs) == (3 if v.finetune else 1)
        if v.posenc.kind in ("self_extend", "rerope"):
            assert not v.finetune
    recalibration = load_config(CompareConfig, CONFIGS / "compare_recalibration.yaml")
    swapped = {v.posenc.kind for v in recalibration.variants if v.finetune}
    assert swapped == {"nope", "alibi", "t5_bias", "kerple", "cope"}
    modes = {(v.posenc.kind, recalibration.variant_lora(v).train_embeddings_and_norms,
              recalibration.variant_lora(v).full_attention) for v in recalibration.variants if v.finetune}
    assert len(modes) == 3 * len(swapped)  # LoRA, LongLoRA and full attention for each


@pytest.mark.parametrize("name", ["compare_quick", "compare_standard", "compare_recalibration"])
def test_preset_describes_the_run_committed_for_it(name):
    """A preset and its committed results agree on the base model (cache key) and the evaluation, so the
    results are what running the preset gives."""

    from hf_posenc.experiments.context_extension.base_model import base_model_dir

    cfg = load_config(CompareConfig, CONFIGS / f"{name}.yaml")
    results = json.loads((ROOT / "recipes" / "results" / name / "results.json").read_text())
    assert results["base_model"] == f"hf_posenc:tiny-stdlib-llama ({base_model_dir(cfg.model.builtin).name})"
    assert cfg.eval.model_dump(mode="json") == results["eval"]


def test_full_model_and_full_attention_are_exclusive():
    from hf_posenc.experiments.context_extension.config import LoraSettings

    with pytest.raises(ValueError, match="at most one of lora.full_attention and lora.full_model"):
        LoraSettings(full_attention=True, full_model=True)
    assert LoraSettings(full_model=True).trains_in_full and not LoraSettings().trains_in_full


def test_a_setting_added_after_runs_were_recorded_keeps_their_fingerprints():
    """``train.sp_size`` came after runs were recorded: at its default (1, and unset in a variant) a run's
    fingerprint is the one those runs were recorded under, written here as the payload without the key, so their
    records are reused; any other value makes them stale."""
    cfg = load_config(CompareConfig, CONFIGS / "compare_drope.yaml")
    variant = next(v for v in cfg.variants if v.finetune)
    before = {"variant": variant.model_dump(mode="json"), "train": cfg.variant_train(variant).model_dump(mode="json"),
              "lora": cfg.variant_lora(variant).model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
              "data": cfg.data.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json")}
    del before["variant"]["train"]["sp_size"], before["train"]["sp_size"]
    del before["variant"]["lora"]["full_model"], before["lora"]["full_model"]  # the same (the test below)
    assert compare._fingerprint(cfg, variant) == grid.fingerprint(before)

    shared = cfg.model_copy(update={"train": cfg.train.model_copy(update={"sp_size": 2})})
    own = variant.model_copy(update={"train": variant.train.model_copy(update={"sp_size": 2})})
    assert compare._fingerprint(shared, variant) != grid.fingerprint(before)
    assert compare._fingerprint(cfg, own) != grid.fingerprint(before)


def test_records_written_while_a_later_setting_was_in_the_payload_are_reused(tmp_path):
    """``lora.full_model`` entered every payload at its default before it was declared SINCE_RECORDED: records
    from before it came (payload without the key) and from that window (with it) both describe today's run, so
    the grid reuses either; a run that sets the key is a different run and reuses neither."""
    cfg = load_config(CompareConfig, CONFIGS / "compare_drope.yaml")
    variant = next(v for v in cfg.variants if v.name == "rope_yarn_finetuned")
    with_key = {"variant": variant.model_dump(mode="json"), "train": cfg.variant_train(variant).model_dump(mode="json"),
                "lora": cfg.variant_lora(variant).model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                "data": cfg.data.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json")}
    del with_key["variant"]["train"]["sp_size"], with_key["train"]["sp_size"]
    without_key = json.loads(json.dumps(with_key))
    del without_key["variant"]["lora"]["full_model"], without_key["lora"]["full_model"]
    assert with_key["lora"]["full_model"] is False and with_key["variant"]["lora"]["full_model"] is None
    current = compare._fingerprint(cfg, variant)
    earlier = compare._earlier_fingerprints(cfg, variant)
    assert current == grid.fingerprint(without_key)
    assert grid.fingerprint(with_key) in earlier

    full = variant.model_copy(update={"lora": variant.lora.model_copy(update={"full_model": True})})
    assert {compare._fingerprint(cfg, full), *compare._earlier_fingerprints(cfg, full)}.isdisjoint(
        {grid.fingerprint(with_key), grid.fingerprint(without_key)})

    cell = grid.Cell("run", current, earlier=earlier)
    grid.save_record(tmp_path / "run.json", {"fingerprint": grid.fingerprint(with_key), "value": 1})
    done = grid.run_grid([cell], lambda c: pytest.fail("recomputed a reusable record"), tmp_path, progress=False)
    assert done.reused == 1 and done.records["run"]["value"] == 1
    other = grid.Cell("run", compare._fingerprint(cfg, full))
    done = grid.run_grid([other], lambda c: {"fingerprint": c.fingerprint, "value": 2}, tmp_path, progress=False)
    assert done.computed == 1 and done.records["run"]["value"] == 2


def test_checkpoints_logging_and_resuming_leave_a_run_s_fingerprint_alone(tmp_path):
    """How often a fine-tune saves a checkpoint or logs, and whether it resumes, change how it is carried out,
    not its record (a resumed run ends on the same weights: test_recipes_finetune): turning checkpoints on in a
    long comparison reuses its finished records. Records written while these settings were still in the payload
    as set are reused too; a setting that changes the result still makes them stale."""
    cfg = load_config(CompareConfig, CONFIGS / "compare_drope.yaml")
    variant = next(v for v in cfg.variants if v.name == "rope_yarn_finetuned")
    current = compare._fingerprint(cfg, variant)
    operational = {"checkpoint_every": 4, "log_every": 1, "resume": False}

    shared = cfg.model_copy(update={"train": cfg.train.model_copy(update=operational)})
    own = variant.model_copy(update={"train": variant.train.model_copy(update={"checkpoint_every": 3})})
    assert compare._fingerprint(shared, variant) == current
    assert compare._fingerprint(cfg, own) == current
    assert compare._fingerprint(shared, own) == current

    # What code before the declaration wrote for `shared`: every setting as set (sp_size and full_model left out
    # at their defaults, as SINCE_RECORDED has it).
    as_set = {"variant": variant.model_dump(mode="json"),
              "train": shared.variant_train(variant).model_dump(mode="json"),
              "lora": cfg.variant_lora(variant).model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
              "data": cfg.data.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json")}
    del as_set["variant"]["train"]["sp_size"], as_set["train"]["sp_size"]
    del as_set["variant"]["lora"]["full_model"], as_set["lora"]["full_model"]
    assert as_set["train"]["checkpoint_every"] == 4
    earlier = compare._earlier_fingerprints(shared, variant)
    assert grid.fingerprint(as_set) != current and grid.fingerprint(as_set) in earlier

    cell = grid.Cell("run", compare._fingerprint(shared, variant), earlier=earlier)
    grid.save_record(tmp_path / "run.json", {"fingerprint": grid.fingerprint(as_set), "value": 1})
    done = grid.run_grid([cell], lambda c: pytest.fail("recomputed a reusable record"), tmp_path, progress=False)
    assert done.reused == 1 and done.records["run"]["value"] == 1

    more_steps = cfg.model_copy(update={"train": shared.train.model_copy(update={"steps": cfg.train.steps + 1})})
    assert compare._fingerprint(more_steps, variant) != current
    assert grid.fingerprint(as_set) not in compare._earlier_fingerprints(more_steps, variant)
