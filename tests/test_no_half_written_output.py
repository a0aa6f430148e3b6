"""Issue 24, items 3 and 4: a failed or interrupted command leaves earlier outputs as they were."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tiny_models import tiny_model
from transformers import PreTrainedModel

import hf_posenc
from hf_posenc import PosEncConfig
from hf_posenc.cli import main


def snapshot(folder: Path) -> dict[str, str]:
    """File name -> content hash, for every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stock_and_plugin(tmp_path):
    """A stock tiny Llama and, in ``out``, an earlier plug-in (KERPLE) conversion of it."""
    tiny_model("llama").save_pretrained(tmp_path / "stock")
    hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="kerple")).save_pretrained(tmp_path / "out")
    return tmp_path


def _fail_after_one_file():
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        written = sorted(p for p in Path(folder).iterdir() if p.is_file())
        for extra in written[1:]:  # keep one file: a save that died after writing it
            extra.unlink()
        raise OSError("disk full (simulated)")

    return save_then_fail


def _interrupt_after_one_file():
    def save_then_interrupt(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # Ctrl-C during the save

    return save_then_interrupt


@pytest.mark.parametrize("failing_save", [_fail_after_one_file, _interrupt_after_one_file], ids=["error", "Ctrl-C"])
def test_convert_overwrite_that_fails_mid_save_leaves_the_target_unchanged(stock_and_plugin, monkeypatch,
                                                                            failing_save):
    root = stock_and_plugin
    before = snapshot(root / "out")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save())
    argv = ["convert", str(root / "stock"), "--posenc", "alibi", "--out", str(root / "out"), "--overwrite"]
    if failing_save is _interrupt_after_one_file:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    else:
        assert main(argv) == 2
    assert snapshot(root / "out") == before
    assert sorted(p.name for p in root.iterdir()) == ["out", "stock"]  # no partial folder left


def test_native_conversion_over_a_plugin_folder_leaves_no_stale_files(stock_and_plugin):
    root = stock_and_plugin
    assert (root / "out" / "modeling_hf_posenc.py").is_file()
    assert main(["convert", str(root / "stock"), "--posenc", "rope", "--param", "rope_type=linear",
                 "--param", "factor=2", "--out", str(root / "out"), "--overwrite"]) == 0
    assert not (root / "out" / "modeling_hf_posenc.py").exists()
    config = json.loads((root / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert sorted(p.name for p in root.iterdir()) == ["out", "stock"]


def test_a_partial_folder_left_by_a_killed_run_is_removed_by_the_next(stock_and_plugin):
    root = stock_and_plugin
    (root / ".out.partial-killed").mkdir()
    (root / ".out.partial-killed" / "model.safetensors").write_bytes(b"half")
    assert main(["convert", str(root / "stock"), "--posenc", "alibi", "--out", str(root / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["out", "stock"]
    assert json.loads((root / "out" / "config.json").read_text())["posenc"]["kind"] == "alibi"


# ------------------------------------------------------------------------------------------- compare
TINY = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "compare_tiny.yaml"
ONE_VARIANT = ["only=[alibi]", "eval.ruler=null"]


@pytest.fixture
def finished_compare(tmp_path, monkeypatch):
    """A finished one-variant tiny comparison, and the snapshot of its records."""
    from hf_posenc.experiments.context_extension.compare import run_compare

    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    run_compare(TINY, out, overrides=ONE_VARIANT, progress=False)
    return out, _records(out)


def _records(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in snapshot(out).items() if name != "compare.log"}


def test_a_compare_that_fails_on_a_missing_model_leaves_the_finished_run_unchanged(finished_compare, tmp_path):
    from hf_posenc.experiments.context_extension.compare import run_compare

    out, before = finished_compare
    with pytest.raises(OSError):
        run_compare(TINY, out, overrides=[*ONE_VARIANT, f"model.name_or_path={tmp_path / 'no-such-model'}"],
                    progress=False)
    assert _records(out) == before


def test_an_interrupted_compare_leaves_the_finished_run_unchanged(finished_compare, monkeypatch):
    from hf_posenc.experiments.context_extension import compare

    out, before = finished_compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "evaluate_context", interrupted)  # after fine-tuning, before the record
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(TINY, out, overrides=[*ONE_VARIANT, "variants.6.train.steps=1"], progress=False)
    # Only the resume state (checkpoints, the unfinished adapter) is the interrupted run's own.
    def finished(records):
        own = ("variants/alibi/checkpoints/", "variants/alibi/.adapter")
        return {name: digest for name, digest in records.items() if not name.startswith(own)}

    assert finished(_records(out)) == finished(before)
    assert (out / "variants" / "alibi" / "fingerprint").read_text() == json.loads(
        (out / "variants" / "alibi.json").read_text())["fingerprint"]
    assert json.loads((out / "config.json").read_text())["variants"][6]["train"].get("steps") != 1
