"""finetune_lora.py end to end: outputs, resume after a kill, 1 and 2 processes under accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "recipes" / "configs" / "compare_tiny.yaml").read_text())


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """One cache for the session, so the tiny base model is pretrained once."""
    cache = tmp_path_factory.getbasetemp() / "hf_posenc_cache"
    return {**os.environ, "HF_POSENC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _config(tmp_path: Path, out: Path, **train) -> Path:
    data = {
        "model": TINY["model"],
        "posenc": {"kind": "t5_bias", "num_buckets": 8, "max_distance": 32},  # has a learned table
        "lora": {"r": 2, "alpha": 4},
        "train": {"seq_len": 32, "steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                  "checkpoint_every": 2, "log_every": 1, **train},
        "output": {"dir": str(out)},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(cmd: list[str], env: dict, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=600)


def _launch(config: Path, env: dict, processes: int = 1, **extra_env) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    else:
        # --multi_gpu + ACCELERATE_USE_CPU=1 is what gives a real 2-process gloo group on CPU.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", "29517"]
        extra_env["ACCELERATE_USE_CPU"] = "1"
    return _run([*cmd, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "recipes/finetune_lora.py", "--config", str(config)], env, **extra_env)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_env):
    """Uninterrupted reference run, under `accelerate launch` with one CPU process."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    full = tmp_path / "full"
    proc = _launch(_config(tmp_path, full), cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return full


def test_one_process_run_writes_adapter_merged_model_and_card(full_run):
    stats = json.loads((full_run / "train_stats.json").read_text())
    assert stats["world_size"] == 1 and stats["steps"] == 6 and stats["train_tokens"] == 6 * 2 * 32
    weights = _adapter(full_run)
    assert any(".posenc." in k for k in weights), "the new T5 bias table must be saved with the adapter"
    assert any("lora_A" in k for k in weights)
    assert (full_run / "adapter" / "README.md").read_text().startswith("---")
    assert (full_run / "merged" / "config.json").is_file() and (full_run / "merged" / "tokenizer.json").is_file()


def test_adapter_and_merged_model_evaluate_identically(full_run, tmp_path, cache_env, monkeypatch):
    """base -> convert -> adapter (evaluate_context.py) must equal the saved merged checkpoint."""
    for key in ("HF_POSENC_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, cache_env[key])
    sys.path.insert(0, str(ROOT / "recipes"))
    import evaluate_context

    common = {"data": {}, "eval": {"lengths": [32, 64], "eval_tokens": 256, "sliding_stride": 16,
                                   "sliding_tokens": 128, "bucket_size": 16,
                                   "passkey": {"lengths": [256], "depths": [0.5], "trials": 1, "max_new_tokens": 2}}}
    via_adapter = tmp_path / "a.yaml"
    via_adapter.write_text(yaml.safe_dump({**common, "model": TINY["model"], "adapter": str(full_run / "adapter"),
                                           "posenc": {"kind": "t5_bias", "num_buckets": 8, "max_distance": 32},
                                           "output": str(tmp_path / "a.json")}))
    via_merged = tmp_path / "m.yaml"
    via_merged.write_text(yaml.safe_dump({**common, "model": {"name_or_path": str(full_run / "merged")},
                                          "output": str(tmp_path / "m.json")}))
    a = evaluate_context.main(["--config", str(via_adapter)])
    m = evaluate_context.main(["--config", str(via_merged)])
    for mode in ("non_overlapping", "sliding"):
        for n in ("32", "64"):
            assert a["perplexity"][mode][n] == pytest.approx(m["perplexity"][mode][n], rel=1e-5)


def test_adapter_with_position_tables_refuses_an_unconverted_base(full_run, cache_env, monkeypatch):
    """PEFT alone would load it and silently drop the T5 tables (it ignores adapter weights with no module)."""
    from hf_posenc.experiments.context_extension.config import ModelConfig, PretrainConfig
    from hf_posenc.experiments.context_extension.models import load_model, resolve
    from hf_posenc.peft_utils import load_adapter

    monkeypatch.setenv("HF_POSENC_CACHE", cache_env["HF_POSENC_CACHE"])
    base = load_model(resolve(ModelConfig(builtin=PretrainConfig(**TINY["model"]["builtin"])), progress=False))
    with pytest.raises(ValueError, match="the base has no position tables"):
        load_adapter(base, str(full_run / "adapter"))  # stock RoPE base: no posenc tables


def test_resume_after_a_kill_ends_on_the_same_weights(full_run, tmp_path, cache_env):
    weights = _adapter(full_run)
    # Same run killed (SIGKILL, nothing flushed) right after its step-4 checkpoint ...
    killed = tmp_path / "killed"
    config = _config(tmp_path, killed)
    cmd = [sys.executable, "recipes/finetune_lora.py", "--config", str(config)]
    proc = _run(cmd, cache_env, HF_POSENC_KILL_AFTER_STEP="4")
    assert proc.returncode == -9
    assert not (killed / "adapter").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    # ... and restarted: it continues from step 4 and ends on exactly the same weights.
    proc = _run(cmd, cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((killed / "train_stats.json").read_text())["resumed_from"] == 4
    resumed = _adapter(killed)
    assert resumed.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], rtol=0, atol=0, msg=key)

    # Control: without resuming, a run that lost its first 4 steps' updates ends elsewhere.
    shutil.rmtree(killed / "adapter")
    proc = _run(cmd + ["train.resume=false", "train.steps=2"], cache_env)
    assert proc.returncode == 0
    assert any(not torch.equal(_adapter(killed)[k], weights[k]) for k in weights if "lora_B" in k)


@pytest.mark.slow
def test_two_processes_share_gradients_and_train_the_one_process_budget(tmp_path, cache_env, full_run):
    out = tmp_path / "ddp"
    proc = _launch(_config(tmp_path, out, checkpoint_every=0), cache_env, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"train_stats.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    # Each rank trained on its own shard of the data ...
    assert ranks[0]["data_checksum"] != ranks[1]["data_checksum"]
    # ... yet both ended with identical weights: gradients were all-reduced every step.
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    # train.batch_size is global: the two ranks split each batch of 2, so the run trains the tokens, and
    # ends on the weights (up to the order of the float sums), of the one-process run.
    assert ranks[0]["train_tokens"] == 6 * 2 * 32
    one, two = _adapter(full_run), _adapter(out)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_launch_that_gets_fewer_processes_than_asked_warns(tmp_path, cache_env):
    out = tmp_path / "cpu2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/finetune_lora.py",
           "--config", str(_config(tmp_path, out, checkpoint_every=0, steps=1))]
    proc = _run(cmd, cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate launch asked for 2 processes, but this run has 1" in proc.stderr
    assert json.loads((out / "train_stats.json").read_text())["world_size"] == 1


def test_merged_yarn_checkpoint_keeps_its_scaling_for_inference(tmp_path, cache_env, monkeypatch):
    """A known context-extension pain point: the training-time RoPE scaling must be recorded in the saved model."""
    for key in ("HF_POSENC_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, cache_env[key])
    sys.path.insert(0, str(ROOT / "recipes"))
    import finetune_lora
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "yarn"
    config = _config(tmp_path, out, steps=2, checkpoint_every=0, seq_len=64)
    data = yaml.safe_load(config.read_text())
    data["posenc"] = {"kind": "rope", "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    config.write_text(yaml.safe_dump(data))
    finetune_lora.main(["--config", str(config)])
    saved = AutoConfig.from_pretrained(out / "merged")
    assert saved.rope_parameters["rope_type"] == "yarn" and saved.rope_parameters["factor"] == 2.0
    assert saved.rope_parameters["original_max_position_embeddings"] == 32
    assert saved.max_position_embeddings == 64
    # Plain transformers reloads it with the scaled frequencies: they differ from unscaled RoPE's.
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(out / "merged", rope_parameters={"rope_type": "default",
                                                "rope_theta": saved.rope_parameters["rope_theta"]})
    assert not torch.allclose(reloaded.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("mode", ["full_attention", "full_model"])
def test_training_in_full_saves_the_trained_model_and_no_adapter(mode, tmp_path, cache_env, monkeypatch):
    """``lora.full_attention``: no adapter; the saved model differs from the base in attention and tables only.
    ``lora.full_model`` (DroPE's recalibration): no adapter; every part of the model trained, MLPs included."""
    from transformers import AutoModelForCausalLM

    import hf_posenc  # noqa: F401  (the saved T5-bias model needs the plug-in to load)
    from hf_posenc.experiments.config import load_config
    from hf_posenc.experiments.context_extension.config import FinetuneConfig, ModelConfig, PretrainConfig
    from hf_posenc.experiments.context_extension.models import apply_encoding, load_model, resolve

    out = tmp_path / mode
    config = _config(tmp_path, out, steps=2, checkpoint_every=0)
    proc = _run([sys.executable, "recipes/finetune_lora.py", "--config", str(config), f"lora.{mode}=true",
                 "output.save_merged=false"], cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "adapter").exists() and (out / "merged" / "config.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(str(out / "merged")).state_dict()
    monkeypatch.setenv("HF_POSENC_CACHE", cache_env["HF_POSENC_CACHE"])
    base = apply_encoding(load_model(resolve(ModelConfig(builtin=PretrainConfig(**TINY["model"]["builtin"])),
                                             progress=False)), load_config(FinetuneConfig, config).posenc).state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any(k.endswith("q_proj.weight") for k in changed) and any(".posenc." in k for k in changed)
    outside_attention = {k for k in changed if ".self_attn." not in k}
    if mode == "full_attention":
        assert not outside_attention
    else:
        assert any(".mlp." in k for k in outside_attention) and any("embed_tokens" in k for k in outside_attention)
