"""The counting task (CoPE paper, https://arxiv.org/abs/2405.18719, Table 3): programs checked by running
them as Python, the answer-only loss mask checked exactly, padding-independence of predictions, the
Wilson interval against its closed form, the report's verdicts, and the tiny preset end-to-end with resume.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from hf_posenc.experiments.config import ConfigError
from hf_posenc.experiments.counting import task as counting
from hf_posenc.experiments.counting.config import load_config
from hf_posenc.experiments.counting.recipe import run, run_cell
from hf_posenc.experiments.counting.report import direction_check, separations
from hf_posenc.experiments.intervals import wilson_interval
from hf_posenc.presets import find, run_hint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "counting_tiny.yaml"
QUICK = ROOT / "recipes" / "configs" / "counting_quick.yaml"


def execute(program: counting.Program) -> int:
    """Run the program as Python: the independent reference for its answer."""
    lines = []
    for statement in program.statements:
        if statement == "pass;":
            lines.append("pass")
        elif m := re.fullmatch(r"([a-z]) = 0 ;", statement):
            lines.append(f"{m[1]} = 0")
        elif m := re.fullmatch(r"([a-z]) \+\+;", statement):
            lines.append(f"{m[1]} += 1")
        else:
            raise AssertionError(f"not a statement of the task: {statement!r}")
    scope: dict = {}
    exec("\n".join(lines), {}, scope)  # noqa: S102 - our own generated statements
    return scope[program.variable]


@pytest.mark.parametrize("num_variables", [1, 3, 5])
def test_generated_answers_equal_running_the_program(num_variables):
    rng = random.Random(num_variables)
    seen_values = set()
    for _ in range(300):
        n = rng.randint(1, 80)
        program = counting.generate_program(rng, n, num_variables, max_value=10)
        assert len(program.statements) == n
        assert program.answer == execute(program)
        seen_values.add(program.answer)
        # Values never pass the limit: replay the prefix sums of every variable.
        values: dict[str, int] = {}
        for statement in program.statements:
            var = statement[0]
            if statement.endswith("= 0 ;"):
                values[var] = 0
            elif statement.endswith("++;"):
                assert var in values, "an increment before its variable's reset"
                values[var] += 1
                assert values[var] <= 10
        assert program.text.endswith(f"print {program.variable}")
    assert len(seen_values) >= 5  # the answers vary (a generator stuck at one value would pass the above)


def test_statement_frequencies_follow_the_released_weights():
    """Weights reset : pass : increment = 1 : 50 : 7, an impossible increment drawn again.

    After the first reset the next statement's distribution depends only on the value: at the limit it
    is pass 50/51, reset 1/51; below it 50/58, 1/58, 7/58. Before the first reset there is never an
    increment (its frequencies are skewed there on purpose: a program without any reset is redrawn).
    """
    rng = random.Random(0)
    counts = {state: {"pass": 0, "reset": 0, "inc": 0} for state in ("none", "limit", "free")}
    for _ in range(600):
        value = None
        for s in counting.generate_program(rng, 40, max_value=3).statements:
            state = "none" if value is None else "limit" if value == 3 else "free"
            op = "pass" if s == "pass;" else "reset" if s.endswith("= 0 ;") else "inc"
            counts[state][op] += 1
            value = 0 if op == "reset" else value + 1 if op == "inc" else value
    assert counts["none"]["inc"] == 0
    expected = {"limit": {"pass": 50 / 51, "reset": 1 / 51, "inc": 0.0},
                "free": {"pass": 50 / 58, "reset": 1 / 58, "inc": 7 / 58}}
    for state in expected:
        n = sum(counts[state].values())
        assert n > 2000, (state, n)
        for op, k in counts[state].items():
            p = expected[state][op]
            assert abs(k / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (state, op, k, n)


def test_generator_rejects_bad_arguments():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="num_statements"):
        counting.generate_program(rng, 0)
    with pytest.raises(ValueError, match="num_variables"):
        counting.generate_program(rng, 5, num_variables=27)
    with pytest.raises(ValueError, match="not in the counting vocabulary"):
        counting.Vocabulary().encode("a = 0 ; b ++;")


def test_answer_only_mask_is_exact():
    rng = random.Random(3)
    vocab = counting.Vocabulary()
    programs = [counting.generate_program(rng, n) for n in (3, 17, 9, 40)]
    batch = counting.make_batch(programs, vocab)
    ids, labels = batch["input_ids"], batch["labels"]
    for i, program in enumerate(programs):
        words = ["<bos>", *program.text.split(), str(program.answer)]
        row = [vocab.words[t] for t in ids[i].tolist()]
        assert row[: len(words)] == words and set(row[len(words):]) <= {"<pad>"}
        scored = (labels[i] != counting.IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == [len(words) - 1] == [int(batch["answer_position"][i])]
        assert labels[i, scored[0]] == vocab.answer_id(program.answer)
    # The model's loss on these labels is exactly the cross-entropy of the answers given the programs.
    model = counting.build_model({"kind": "nope"}, vocab_size=len(vocab), hidden_size=16, num_layers=1, num_heads=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        rows = torch.arange(len(programs))
        by_hand = torch.nn.functional.cross_entropy(logits[rows, batch["answer_position"] - 1],
                                                    ids[rows, batch["answer_position"]])
        assert torch.allclose(counting.answer_loss(model, batch), by_hand, atol=1e-6)


@pytest.mark.parametrize("posenc", [{"kind": "rope"}, {"kind": "alibi"}, {"kind": "t5_bias"}, {"kind": "cope"}])
def test_padding_does_not_change_predictions(posenc):
    """Batches are right-padded without a mask: a program's logits equal those of it alone."""
    vocab = counting.Vocabulary()
    model = counting.build_model(posenc, vocab_size=len(vocab), hidden_size=16, num_layers=2, num_heads=2, seed=1)
    # Non-zero position tables, so that a wrong position would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "posenc" in name:
                p.normal_()
    rng = random.Random(5)
    programs = [counting.generate_program(rng, n) for n in (4, 30)]
    batch = counting.make_batch(programs, vocab)
    alone = counting.make_batch(programs[:1], vocab)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"]).logits[0, : alone["input_ids"].shape[1]]
        single = model(input_ids=alone["input_ids"]).logits[0]
    assert torch.allclose(padded, single, atol=1e-5)


def test_build_model_goes_through_patch_config():
    vocab = counting.Vocabulary()
    cope = counting.build_model({"kind": "cope", "npos_max": 16}, vocab_size=len(vocab), hidden_size=16,
                                num_layers=1, num_heads=2)
    assert cope.config.posenc["kind"] == "cope" and hasattr(cope.model.layers[0].self_attn, "posenc")
    rope = counting.build_model({"kind": "rope"}, vocab_size=len(vocab), hidden_size=16, num_layers=1, num_heads=2)
    assert type(rope).__name__ == "LlamaForCausalLM"  # native RoPE stays a stock model


def test_wilson_interval_matches_closed_form():
    # Closed form at p = 0: [0, z^2 / (n + z^2)]; at 10/100 the textbook value [0.0552, 0.1744].
    low, high = wilson_interval(0, 500)
    assert low == 0.0 and math.isclose(high, 1.96 ** 2 / (500 + 1.96 ** 2), rel_tol=1e-12)
    low, high = wilson_interval(10, 100)
    assert round(low, 4) == 0.0552 and round(high, 4) == 0.1744
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_verdicts_need_separated_intervals_and_seeds():
    def row(low, high, seeds):
        return {"long": {"wilson95": [low, high], "per_seed": seeds}}

    table = {"cope": row(0.0, 0.02, [0.0, 0.01, 0.02]), "rope": row(0.30, 0.40, [0.3, 0.35, 0.4]),
             "alibi": row(0.01, 0.05, [0.01, 0.02, 0.05]),
             # Intervals separate from cope's, but one seed is as good as cope's worst: not an ordering.
             "nope": row(0.20, 0.30, [0.02, 0.4, 0.45])}
    assert direction_check(table, "long") == {"rope": "holds", "alibi": "not separable at this budget",
                                              "nope": "not separable at this budget"}
    assert separations(table, "long") == ["cope < rope", "alibi < rope"]
    flipped = {"cope": table["rope"], "rope": table["cope"]}
    assert direction_check(flipped, "long") == {"rope": "fails"}


@pytest.mark.parametrize("old, new, message", [
    ("steps: 3", "stepz: 3", r"counting_bad.yaml: train: unknown key 'stepz' \(did you mean 'steps'\?\)"),
    ("{kind: alibi}", "{kind: xpos}", r"counting_bad.yaml: encodings.2.*kind='xpos'"),
    ("train_statements: [3, 8]", "train_statements: [8, 3]", r"counting_bad.yaml: task.*train_statements"),
    ("seeds: [0, 1]", "seeds: 3", r"counting_bad.yaml: seeds"),
    ("steps: 3", "steps: three", r"counting_bad.yaml: train.steps: .*integer"),
])
def test_config_errors_name_the_key(tmp_path, old, new, message):
    bad = tmp_path / "counting_bad.yaml"
    assert old in TINY.read_text()
    bad.write_text(TINY.read_text().replace(old, new))
    with pytest.raises(ConfigError, match=message):
        load_config(bad)


def test_presets_are_found_by_name():
    for name in ("counting_quick", "counting_tiny"):
        recipe = find(name)
        assert recipe.kind == "counting" and load_config(recipe.path).encodings
        assert run_hint(recipe) == f"python $(hf-posenc recipes path counting_task) --config {name}"
    quick = load_config(QUICK)
    assert [e.name for e in quick.encodings] == ["rope", "nope", "alibi", "t5_bias", "cope", "fire", "fox"]
    assert len(quick.seeds) == 3


def test_tiny_preset_runs_end_to_end_and_resumes(tmp_path):
    cfg = load_config(TINY)
    calls = []

    def counted(*args, **kwargs):
        calls.append((args[1].name, args[2]))
        return run_cell(*args, **kwargs)

    results = run(cfg, tmp_path, progress=False, cell_fn=counted)
    cells = len(cfg.encodings) * len(cfg.seeds)
    assert len(calls) == cells and results["cells_run"] == cells
    for name in ("results.json", "results.md", "error_vs_length.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    for entry in cfg.encodings:
        row = saved["table"][entry.name]
        assert row["in_distribution"]["total"] == cfg.eval.programs * len(cfg.seeds)
        assert row["seeds"] == cfg.seeds
        # The common-answer subset is a subset of the long programs, with their results unchanged.
        common, long = row["long_common"], row["long"]
        assert common["total"] <= long["total"] and common["errors"] <= long["errors"]
        assert long["errors"] - common["errors"] <= long["total"] - common["total"]
        assert f"| {entry.name} |" in (tmp_path / "results.md").read_text()
    # Cut off after some cells: drop two cell files; the re-run computes exactly those.
    (tmp_path / "cells" / "cope_seed1.json").unlink()
    (tmp_path / "cells" / "rope_seed0.json").unlink()
    calls.clear()
    again = run(cfg, tmp_path, progress=False, cell_fn=counted)
    assert sorted(calls) == [("cope", 1), ("rope", 0)] and again["cells_run"] == 2
    # Same seeds, same programs, same weights: the recomputed cells reproduce the first run exactly.
    assert again["table"] == results["table"]
    # A changed setting recomputes every cell it touches.
    cfg.train.steps = 2
    calls.clear()
    run(cfg, tmp_path, progress=False, cell_fn=counted)
    assert len(calls) == cells


def test_shipped_lm_eval_task_data_is_the_generators():
    """recipes/lm_eval_tasks/posenc_counting/*.jsonl: 100 programs of 3-32 statements, seed 2405."""
    path = ROOT / "recipes" / "lm_eval_tasks" / "posenc_counting" / "posenc_counting.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rng = random.Random(2405)
    assert len(rows) == 100
    for row in rows:
        program = counting.generate_program(rng, rng.randint(3, 32))
        assert row == {"program": program.text, "answer": program.answer, "statements": len(program.statements)}
        assert row["answer"] == execute(program)


def test_tokenizer_matches_the_vocabulary():
    vocab = counting.Vocabulary()
    tokenizer = vocab.to_tokenizer()
    program = counting.generate_program(random.Random(1), 25)
    assert tokenizer(program.text).input_ids == vocab.encode(program.text)
    assert tokenizer(program.text, add_special_tokens=False).input_ids == vocab.encode(program.text)[1:]
    assert tokenizer.pad_token_id == vocab.pad_id


def test_worker_processes_give_the_serial_results(tmp_path):
    cfg = load_config(TINY)
    cfg.encodings = [e for e in cfg.encodings if e.name in ("rope", "cope")]
    serial = run(cfg, tmp_path / "serial", progress=False)
    cfg.workers = 2
    parallel = run(cfg, tmp_path / "parallel", progress=False)
    assert parallel["cells_run"] == 4 and parallel["workers"] == 2
    assert parallel["table"] == serial["table"]
    assert sorted(p.name for p in (tmp_path / "parallel" / "cells").iterdir()) == [
        "cope_seed0.json", "cope_seed1.json", "rope_seed0.json", "rope_seed1.json"]
