"""The comparison under sequence parallelism (``train.sp_size=2``, 2 CPU processes on gloo) equals one process.

Launched as the recipes README says: ``accelerate launch --config_file recipes/accelerate/sequence_parallel.yaml
recipes/compare.py CONFIG --out DIR``, on the embedded tiny base (2 heads, one per rank) with a zero-shot variant
and two fine-tuned ones whose encodings have per-head values (ALiBi slopes, a T5 bias table trained in full), a
recalibration curve and a checkpoint every step. The reference is the same config with ``train.sp_size=1`` in one
process. The zero-shot record of the one-process run (its settings do not include ``train``) is put into the
launch's folder first, marked: the launch must reuse it (a resumed comparison), not recompute it. The first launch
is cut off (both processes SIGKILL themselves after ALiBi's checkpoint at step 1, ``HF_POSENC_KILL_AFTER_STEP``);
the second reuses the marked record, resumes ALiBi from that checkpoint and computes T5 bias.

Tolerance: the fine-tunes equal one process's to float rounding (the recipe's tests bound the loss by 1e-5; here
5e-7), so the merged weights are nearly identical and so is every evaluation: perplexities measured within 2.3e-8
relative; 1e-6 is asserted. Passkey accuracies are equal.

Before the comparison ran under sequence parallelism (main a149a6e) the launch failed with ``config error: ...
train.sp_size must be 1 in a comparison, which runs in one process (variant 'alibi' asks for 2); allowed: 1. ...``.
Cost on the shared 2-core machine: 4 min 25 s in all at load 4-8 (about 45 s in one process, 1 min 20 s for the
cut-off launch, 1 min 55 s for the resumed one; most of each launch is the 2 processes starting: imports,
DeepSpeed, gloo).
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess

import pytest
import yaml
from sp_launch import ROOT, launch, launch_env, run

from hf_posenc.experiments.context_extension.compare import run_compare
from hf_posenc.experiments.context_extension.training import FAULT_ENV

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
_CONFIG = pytest.importorskip("accelerate.parallelism_config").ParallelismConfig
if "sp_size" not in inspect.signature(_CONFIG).parameters:
    pytest.skip("this accelerate has no sequence parallelism (ParallelismConfig(sp_size=...))", allow_module_level=True)

TOL = 1e-6
#: Marks the record put into the launch's folder before it runs (no run takes this long here).
SEEDED_SECONDS = 12345.6
COMPARE = {
    "model": {"name_or_path": "hf_posenc:tiny-stdlib-llama",
              "builtin": {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                          "intermediate_size": 64, "seq_len": 32, "batch_size": 4, "steps": 6, "lr": 1e-3,
                          "warmup_steps": 2}},
    "train_length": 32,
    "train": {"seq_len": 64, "steps": 2, "batch_size": 1, "warmup_steps": 0, "lr": 1e-2, "checkpoint_every": 1,
              "sp_size": 2},
    "lora": {"r": 2, "alpha": 4},
    "eval": {"lengths": [32, 64], "eval_tokens": 128, "sliding_stride": 32, "sliding_tokens": 64, "bucket_size": 16,
             "curve_every": 1, "curve_tokens": 64,
             "passkey": {"lengths": [256], "depths": [0.5], "trials": 1, "max_new_tokens": 3}},
    "variants": [{"name": "rope", "posenc": {"kind": "rope"}, "finetune": False},
                 {"name": "alibi", "posenc": {"kind": "alibi"}},
                 {"name": "t5_bias", "posenc": {"kind": "t5_bias", "num_buckets": 8, "max_distance": 32}}],
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``(one process, sequence parallel)`` results.json of the same comparison."""
    folder = tmp_path_factory.mktemp("sp_compare")
    config = folder / "compare.yaml"
    config.write_text(yaml.safe_dump(COMPARE))
    env = launch_env(folder / "cache")
    mp = pytest.MonkeyPatch()
    for key in ("HF_POSENC_CACHE", "HF_HUB_OFFLINE"):  # the base is built here once; the launch reuses it
        mp.setenv(key, env[key])
    try:
        one = run_compare(config, folder / "one", ["train.sp_size=1"], progress=False)
    finally:
        mp.undo()
    seeded = json.loads((folder / "one" / "variants" / "rope.json").read_text())
    (folder / "sp" / "variants").mkdir(parents=True)
    (folder / "sp" / "variants" / "rope.json").write_text(json.dumps({**seeded, "eval_seconds": SEEDED_SECONDS}))
    command = launch("recipes/compare.py", str(config), "--out", str(folder / "sp"), "--no-progress")
    cut_off = subprocess.run(command, cwd=ROOT, env={**env, FAULT_ENV: "1"}, capture_output=True, timeout=600)
    assert cut_off.returncode != 0 and (folder / "sp" / "variants" / "alibi" / "checkpoints" / "step_0000001").is_dir()
    assert not (folder / "sp" / "variants" / "alibi.json").exists()
    run(launch("recipes/compare.py", str(config), "--out", str(folder / "sp"), "--no-progress"), env)
    return json.loads(one["json"].read_text()), json.loads((folder / "sp" / "results.json").read_text())


def _close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=TOL)


def test_the_finished_record_is_reused_and_the_others_computed(compared):
    _, shared = compared
    assert (shared["seconds"]["runs_reused"], shared["seconds"]["runs_computed"]) == (1, 2)
    assert shared["variants"][0]["eval_seconds"] == SEEDED_SECONDS


def test_the_fine_tunes_shared_each_window_and_trained_as_one_process(compared):
    """ALiBi resumed after step 1: its loss is that of step 2 alone and its curve lost step 1's point (as in one
    process); T5 bias ran whole."""
    one, shared = compared
    for want, got in zip(one["variants"][1:], shared["variants"][1:], strict=True):
        assert (want["train"]["world_size"], got["train"]["world_size"], got["train"]["sp_size"]) == (1, 2, 2)
        assert got["train_tokens"] == want["train_tokens"] == 2 * 64
        resumed = got["train"]["resumed_from"]
        assert (got["name"], resumed) in (("alibi", 1), ("t5_bias", 0))
        if not resumed:
            assert abs(got["train"]["final_loss"] - want["train"]["final_loss"]) < 1e-5
        reference = {point["step"]: point["perplexity"] for point in want["curve"]}
        assert [point["step"] for point in got["curve"]] == ([0, 2] if resumed else [0, 1, 2])
        for point in got["curve"]:
            assert _close(point["perplexity"], reference[point["step"]]), (got["name"], got["curve"], want["curve"])


def test_every_record_equals_one_process(compared):
    one, shared = compared
    assert [v["name"] for v in shared["variants"]] == [v["name"] for v in one["variants"]]
    for want, got in zip(one["variants"], shared["variants"], strict=True):
        for scoring, by_length in want["perplexity"].items():
            for length, value in by_length.items():
                assert _close(got["perplexity"][scoring][length], value), (got["name"], scoring, length)
        assert got["passkey"] == want["passkey"] and got["passkey_by_depth"] == want["passkey_by_depth"]
        assert got["loss_by_position"].keys() == want["loss_by_position"].keys()
        for length, by_bucket in want["loss_by_position"].items():  # {length: {bucket start: mean loss}}
            assert got["loss_by_position"][length].keys() == by_bucket.keys()
            assert all(_close(got["loss_by_position"][length][start], loss) for start, loss in by_bucket.items())
