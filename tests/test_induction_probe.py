"""The induction probe's batches mark exactly the tokens that copying predicts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import induction_probe as probe  # noqa: E402


@pytest.mark.parametrize("task", ["fixed_offset", "induction"])
def test_every_masked_token_repeats_the_token_an_earlier_copy_had_after_the_same_token(task):
    ids, mask = probe.make_batch(task, 16, 64, torch.Generator().manual_seed(0))
    offsets = set()
    for b in range(16):
        positions = mask[b].nonzero().flatten().tolist()
        assert len(positions) == 11
        # the previous token occurs earlier, and what followed it there is this token
        first = ids[b, : positions[0] - 1].tolist().index(ids[b, positions[0] - 1].item())
        offsets.add(positions[0] - 1 - first)
        for p in positions:
            assert ids[b, p] == ids[b, p - (positions[0] - 1 - first)]
    assert (len(offsets) == 1) == (task == "fixed_offset")  # only the fixed task keeps one distance


def test_key_digits_puts_the_answer_after_the_second_key():
    ids, mask = probe.make_batch("key_digits", 8, 64, torch.Generator().manual_seed(1))
    for row, m in zip(ids, mask):
        keys = (row == probe.KEY).nonzero().flatten().tolist()
        assert keys[-1] == 58 and m.nonzero().flatten().tolist() == [59, 60, 61, 62, 63]
        assert row[keys[0] + 1 : keys[0] + 6].tolist() == row[59:].tolist()


def test_a_short_run_logs_finite_copy_losses_and_the_curriculum_switch():
    log = probe.run("induction", steps=4, lr=1e-3, then="key_digits", switch_step=2, batch=4, log_every=1)
    assert [r["task"] for r in log] == ["induction", "induction", "key_digits", "key_digits"]
    assert all(r["copy_nll"] == r["copy_nll"] and r["copy_nll"] > 0 for r in log)
    with pytest.raises(ValueError, match="allowed: fixed_offset, induction, key_digits"):
        probe.make_batch("copy", 1, 64, torch.Generator())
