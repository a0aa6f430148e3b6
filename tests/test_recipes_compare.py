"""The comparison pipeline on a tiny model: files, results.json schema, resume, README update."""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import pytest

from hf_posenc.experiments.context_extension.compare import run_compare
from hf_posenc.experiments.context_extension.config import STANDARD_VARIANTS
from hf_posenc.experiments.context_extension.report import README_BEGIN, README_END, update_readme, validate_results
from hf_posenc.results import load_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "compare_tiny.yaml"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Run the tiny grid once for the module (the cache is shared with the other recipe tests)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_POSENC_CACHE", str(tmp_path_factory.getbasetemp() / "hf_posenc_cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("compare")
    paths = run_compare(TINY, out, progress=False)
    yield out, paths
    mp.undo()


def test_outputs_and_schema(compared):
    out, paths = compared
    for key in ("json", "csv", "markdown", "perplexity_plot", "passkey_plot", "position_plot"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert paths["perplexity_plot"].read_bytes()[:4] == b"\x89PNG"
    results = json.loads(paths["json"].read_text())
    validate_results(results)
    assert isinstance(results["base_model"], str) and results["train_length"] == 32
    assert [v["name"] for v in results["variants"]] == list(STANDARD_VARIANTS)
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["rope"]["finetuned"] is False and by_name["rope"]["train_tokens"] == 0
    assert by_name["rope_yarn"]["train_tokens"] == 2 * 1 * 64  # steps x batch x seq_len
    assert by_name["cope"]["train_tokens"] == 2 * 2 * 32  # its own train section
    for v in results["variants"]:
        assert set(v["perplexity"]["non_overlapping"]) == set(v["perplexity"]["sliding"]) == {"32", "64"}
        assert set(v["passkey"]) == {"256"} and 0.0 <= v["passkey"]["256"] <= 1.0
    # rope and rope_dynamic at L are the same model (dynamic scaling is inactive up to L).
    assert by_name["rope_dynamic"]["perplexity"]["non_overlapping"]["32"] == pytest.approx(
        by_name["rope"]["perplexity"]["non_overlapping"]["32"], rel=1e-6)
    # One results model: the CSV is the cards' table of the JSON's numbers, one row per (variant, length).
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 9 * 3
    assert set(rows[0]) == {"method", "length", "perplexity", "perplexity_sliding", "passkey_accuracy"}
    assert load_results(paths["csv"]).records == load_results(paths["json"]).records
    yarn = load_results(paths["csv"]).value("rope_yarn", 64, "perplexity_sliding")
    assert yarn == by_name["rope_yarn"]["perplexity"]["sliding"]["64"]  # exact: floats round-trip through the CSV
    table = paths["markdown"].read_text()
    first = table.split("\n\n")[0]
    assert sum(line.startswith("| ") for line in first.splitlines()) == 10
    assert "ppl@64" in first and "passkey@256" in first
    # RULER-style tasks: every task, length and depth of the tiny grid, with the trial count it asked for.
    for v in results["variants"]:
        assert list(v["ruler"]) == ["single_needle", "multi_key", "multi_value", "variable_tracking"]
        for by_length in v["ruler"].values():
            cell = by_length["256"]
            assert cell["trials"] == 2 and set(cell["by_depth"]) == {"0.5"}
            assert cell["by_depth"]["0.5"]["accuracy"] == cell["accuracy"]  # one depth: pooled == the cell
            assert 0.0 <= cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] <= 1.0
    for task in ("single_needle", "multi_key", "multi_value", "variable_tracking"):
        assert f"**{task}**" in table and paths[f"ruler_{task}_plot"].read_bytes()[:4] == b"\x89PNG"


def test_resume_reuses_finished_variants_and_redoes_changed_ones(compared, tmp_path):
    out, paths = compared
    records = {p.name: p.stat().st_mtime_ns for p in (out / "variants").glob("*.json")}
    run_compare(TINY, out, overrides=["variants.6.train.steps=1"], progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "variants").glob("*.json")}
    changed = sorted(name for name in records if after[name] != records[name])
    assert changed == ["alibi.json"]
    log = (out / "compare.log").read_text()
    assert log.count("already done") >= 8 and "alibi changed since its last run" in log
    assert json.loads((out / "variants" / "alibi.json").read_text())["train_tokens"] == 1 * 2 * 32
    # The run's time covers the one run it computed, and its results say so.
    seconds = json.loads((out / "results.json").read_text())["seconds"]
    assert (seconds["runs_computed"], seconds["runs_reused"]) == (1, len(records) - 1)


def test_schema_violations_are_named(compared):
    results = json.loads(compared[1]["json"].read_text())
    broken = copy.deepcopy(results)
    broken["variants"][0]["perplexity"].pop("sliding")
    with pytest.raises(ValueError, match=r"variants\[0\].perplexity.sliding"):
        validate_results(broken)
    broken = copy.deepcopy(results)
    broken["variants"][2]["train_tokens"] = True
    with pytest.raises(ValueError, match=r"variants\[2\].train_tokens must be int"):
        validate_results(broken)
    broken = copy.deepcopy(results)
    broken["variants"][1]["passkey"] = {"long": 1.0}
    with pytest.raises(ValueError, match="keys must be lengths"):
        validate_results(broken)


def test_readme_block_is_replaced_not_appended(compared, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{README_BEGIN}\nold\n{README_END}\n\nTail.\n")
    update_readme(readme, compared[1])
    update_readme(readme, compared[1])
    text = readme.read_text()
    assert text.count(README_BEGIN) == 1 and "old" not in text and text.endswith("Tail.\n")
    assert compared[1]["markdown"].read_text().strip().splitlines()[0] in text
    assert "perplexity_vs_length.png)" in text
    update_readme(readme, compared[1], assets_dir=tmp_path / "results" / "tiny")
    assert "](results/tiny/perplexity_vs_length.png)" in readme.read_text()
    assert (tmp_path / "results" / "tiny" / "results.json").read_bytes() == compared[1]["json"].read_bytes()


def test_direction_checks_follow_the_numbers():
    from hf_posenc.experiments.context_extension.report import direction_checks

    def variant(name, ppl):
        table = {str(n): x for n, x in ppl.items()}
        return {"name": name, "posenc": {"kind": "rope"}, "finetuned": False, "train_tokens": 0,
                "perplexity": {"non_overlapping": table, "sliding": table}, "passkey": {"8": 0.0}}

    results = {"base_model": "m", "train_length": 8, "variants": [
        variant("rope", {8: 10.0, 16: 12.0, 32: 14.0, 64: 15.0}),
        variant("rope_linear", {8: 11.0, 32: 14.0}),
        variant("rope_yarn", {8: 10.0, 32: 12.5}),
        variant("alibi", {8: 12.0, 64: 18.1}),
    ]}
    checks = {c["name"].split(":")[0]: c for c in direction_checks(results)}
    assert checks["unscaled RoPE"]["value"] == pytest.approx(1.5) and checks["unscaled RoPE"]["passed"]
    assert checks["best of fine-tuned PI / YaRN"]["value"] == pytest.approx(1.25)
    assert checks["ALiBi"]["passed"] is False  # 18.1 / 12 > 1.5
    results["variants"][0]["perplexity"]["non_overlapping"]["32"] = 16.0  # no longer growing
    assert not direction_checks(results)[0]["passed"]


def test_default_assets_dir(tmp_path):
    from hf_posenc.experiments.context_extension.report import default_assets_dir

    (tmp_path / "recipes").mkdir()
    out = Path("runs/compare_quick")
    assert default_assets_dir(tmp_path / "README.md", out) == tmp_path / "recipes" / "results" / "compare_quick"
    expected = tmp_path / "recipes" / "results" / "compare_quick"
    assert default_assets_dir(tmp_path / "recipes" / "README.md", out) == expected
    assert default_assets_dir(tmp_path / "docs" / "README.md", out) == tmp_path / "docs" / "results" / "compare_quick"


def test_cli_compare_resumes_prints_the_table_and_fills_a_readme(compared, tmp_path, capsys, monkeypatch):
    from hf_posenc import cli

    out, paths = compared
    monkeypatch.setenv("HF_POSENC_CACHE", str(Path(out).parent / "hf_posenc_cache"))
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    # (Another test may have left a variant computed under other settings: settle the folder first.)
    assert cli.main(["compare", str(TINY), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "variants").glob("*.json")}
    assert cli.main(["compare", str(TINY), "--out", str(out), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "| rope_yarn | yes |" in printed and f"perplexity_plot: {out}" in printed
    runs = len(before)
    assert re.search(rf"finished in \d+ min \d+ s; {runs} of {runs} runs reused from an earlier run of this folder, "
                     r"not timed here \(base model \d+ s; \d+ CPUs, load average \[", printed), printed
    machine = json.loads((out / "results.json").read_text())["machine"]
    assert machine["torch_threads"] >= 1 and len(machine["load_average_end"]) == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "variants").glob("*.json")} == before  # all reused
    assert "](results/" in readme.read_text() and (tmp_path / "results" / out.name / "results.json").is_file()


def test_both_entry_points_take_the_same_arguments(monkeypatch):
    """``hf-posenc compare`` and ``recipes/compare.py`` are one command: the same words reach the comparison the
    same way (before, the first refused ``--no-progress`` and the second ``--readme-assets``)."""
    import importlib.util

    from hf_posenc import cli
    from hf_posenc.experiments.context_extension import compare

    spec = importlib.util.spec_from_file_location("compare_recipe", ROOT / "recipes" / "compare.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    calls = []
    monkeypatch.setattr(compare, "compare_command", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    words = [str(TINY), "--out", "runs/x", "--no-progress", "--readme", "R.md", "--readme-assets", "assets",
             "train.steps=2"]
    assert cli.main(["compare", *words]) == 0
    recipe.main(words)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0] == ((str(TINY), "runs/x", ["train.steps=2"]),
                        {"progress": False, "readme": "R.md", "readme_assets": "assets"})


# -- seeds and spread ----------------------------------------------------------------------------------


def _seeded(name, finetuned, by_seed, seeds=(0, 1, 2)):
    """A merged record of per-seed perplexities ``by_seed`` = {length: [one value per seed]}."""
    from hf_posenc.experiments.intervals import merge_seeds

    runs = []
    for i, seed in enumerate(seeds if finetuned else (None,)):
        table = {str(n): values[i] for n, values in by_seed.items()}
        runs.append({"name": name, "posenc": {"kind": "rope"}, "finetuned": finetuned, "train_tokens": 8, "seed": seed,
                     "perplexity": {"non_overlapping": table, "sliding": table}, "passkey": {"8": 0.5}})
    return merge_seeds(runs) if finetuned else runs[0]


def test_merge_seeds_means_std_and_t_interval():
    import statistics

    from hf_posenc.experiments.intervals import interval

    record = _seeded("alibi", True, {8: [10.0, 11.0, 13.0]})
    assert record["perplexity"]["non_overlapping"]["8"] == pytest.approx(34.0 / 3)
    assert record["spread"]["std"]["perplexity"]["sliding"]["8"] == pytest.approx(statistics.stdev([10.0, 11.0, 13.0]))
    assert record["spread"]["values"]["perplexity"]["non_overlapping"]["8"] == [10.0, 11.0, 13.0]
    assert record["spread"]["n"] == 3 and "seed" not in record
    mean, low, high = interval([10.0, 11.0, 13.0])
    # 95 % t-interval with 2 degrees of freedom: t = 4.303 (tables), s = 1.5275, n = 3.
    assert (high - low) / 2 == pytest.approx(4.303 * statistics.stdev([10.0, 11.0, 13.0]) / 3 ** 0.5, rel=1e-6)
    assert interval([5.0]) == (5.0, 5.0, 5.0)


def test_merged_ruler_cell_is_the_pooled_rate_inside_its_interval():
    """Seeds stop drawing trials at different counts: the merged cell is successes / trials over all of them,
    with that rate's Wilson interval (the mean of the seeds' rates, 0.37 here, lies outside it)."""
    from hf_posenc.experiments.intervals import merge_seeds, wilson_interval

    def cell(successes, trials):
        return {"accuracy": successes / trials, "ci_low": 0.0, "ci_high": 1.0, "trials": trials}

    runs = [{"name": "yarn", "posenc": {"kind": "rope"}, "finetuned": True, "train_tokens": 8, "seed": seed,
             "ruler": {"single_needle": {"512": {**cell(*c), "by_depth": {"0.5": cell(*c)}}}}}
            for seed, c in enumerate([(12, 12), (12, 120), (0, 12)])]
    merged = merge_seeds(runs)["ruler"]["single_needle"]["512"]
    assert merged["accuracy"] == pytest.approx(24 / 144) and merged["trials"] == 144
    assert (merged["ci_low"], merged["ci_high"]) == pytest.approx(wilson_interval(24, 144))
    assert merged["ci_low"] <= merged["accuracy"] <= merged["ci_high"] < (1.0 + 0.1 + 0.0) / 3
    assert merged["by_depth"]["0.5"]["accuracy"] == pytest.approx(24 / 144)
    spread = merge_seeds(runs)["spread"]
    assert spread["values"]["ruler"]["single_needle"]["512"] == [1.0, 0.1, 0.0]


def test_orderings_and_checks_are_decided_by_the_spread():
    from hf_posenc.experiments.context_extension.report import direction_checks, markdown_table, orderings

    results = {"base_model": "m", "train_length": 8, "seeds": [0, 1, 2], "variants": [
        _seeded("rope", False, {8: [10.0], 64: [30.0]}),
        _seeded("rope_linear", True, {8: [11.0, 11.2, 10.8], 32: [12.0, 12.1, 11.9]}),   # tight
        _seeded("rope_yarn", True, {8: [10.5, 11.5, 9.5], 32: [11.0, 14.0, 12.5]}),      # wide
        _seeded("alibi", True, {8: [12.0, 12.1, 11.9], 64: [13.0, 20.0, 16.0]}),
    ]}
    at_8 = next(o for o in orderings(results) if o["length"] == 8)
    assert [r[0] for r in at_8["ranking"]] == ["rope", "rope_yarn", "rope_linear", "alibi"]
    relations = {(a, b): rel for a, rel, b in at_8["pairs"]}
    assert relations[("rope_yarn", "rope_linear")] == "not separable at this budget"  # yarn's interval is wide
    assert relations[("rope_linear", "alibi")] == "<"  # 11.0 +- 0.5 vs 12.0 +- 0.25
    # Every pair counts, not only neighbours: across yarn's wide [8.0, 13.0], rope (a point at 10) separates from
    # linear's [10.5, 11.5] and from alibi; yarn separates from nothing. Letters say exactly that.
    assert at_8["letters"] == {"rope": "a", "rope_yarn": "abc", "rope_linear": "b", "alibi": "c"}
    from hf_posenc.experiments.context_extension.report import orderings_markdown

    expected = "- @8: rope 10.00 (a), rope_yarn 10.50 (abc), rope_linear 11.00 (b), alibi 12.00 (c)"
    assert expected in orderings_markdown(results)
    # Two deterministic variants (point intervals) within 1 %: not separable either.
    results["variants"].append(_seeded("rope_dynamic", False, {8: [10.05], 64: [31.0]}))
    at_8 = next(o for o in orderings(results) if o["length"] == 8)
    assert ("rope", "not separable at this budget", "rope_dynamic") in at_8["pairs"]
    checks = {c["name"].split(":")[0]: c for c in direction_checks(results)}
    # ALiBi ratios 13/12, 20/12.1, 16/11.9: mean 1.37, but the interval reaches past 1.5.
    assert checks["ALiBi"]["verdict"] == "not separable at this budget" and not checks["ALiBi"]["passed"]
    assert checks["ALiBi"]["ci"][0] < 1.5 < checks["ALiBi"]["ci"][1]
    assert checks["unscaled RoPE"]["verdict"] == "holds"  # deterministic: 30 / 10 = 3
    best = checks["best of fine-tuned PI / YaRN"]
    assert best["variant"] == "rope_linear" and best["verdict"] == "holds"  # 12 / 10 = 1.2, tight interval
    table = markdown_table(results)
    assert "11.00 ± 0.20" in table and "| rope | no | 8 | 1 | 10.00 |" in table  # deterministic: one run, no ±


@pytest.mark.parametrize("seed", range(20))
def test_letters_are_shared_exactly_by_the_pairs_that_do_not_separate(seed):
    """The compact letter display is faithful: for any separability relation, two variants share a letter if and
    only if they do not separate. Even seeds: separation by random intervals; odd seeds: random pairs (the
    1 % gap and single-seed rows make the report's relation more than an interval order)."""
    import random

    from hf_posenc.experiments.intervals import letter_groups

    rng = random.Random(seed)
    names = [f"v{i}" for i in range(rng.randint(2, 12))]
    centres = sorted(rng.uniform(0, 10) for _ in names)
    bounds = [(c - rng.uniform(0, 3), c + rng.uniform(0, 3)) for c in centres]
    apart = {(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
             if (bounds[i][1] < bounds[j][0] if seed % 2 == 0 else rng.random() < 0.5)}
    letters = letter_groups(names, apart)
    for i, a in enumerate(names):
        assert letters[a]
        for b in names[i + 1 :]:
            assert bool(set(letters[a]) & set(letters[b])) == ((a, b) not in apart), (a, b, letters)


def test_single_seed_claims_no_ordering_of_fine_tuned_variants():
    from hf_posenc.experiments.context_extension.report import orderings

    results = {"base_model": "m", "train_length": 8, "variants": [
        _seeded("rope", False, {8: [10.0]}), _seeded("rope_linear", False, {8: [12.0]})]}
    results["variants"][1]["finetuned"] = True
    assert orderings(results)[0]["pairs"] == [("rope", "not separable at this budget", "rope_linear")]


def test_seeds_run_each_fine_tuned_variant_once_per_seed_and_resume(tmp_path, monkeypatch):
    import statistics

    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = ["seeds=[0,1]", "only=[rope,rope_finetuned,alibi]", "eval.ruler=null"]
    paths = run_compare(TINY, tmp_path / "out", overrides=overrides, progress=False)
    runs = sorted(p.name for p in (tmp_path / "out" / "variants").glob("*.json"))
    assert runs == ["alibi@seed0.json", "alibi@seed1.json", "rope.json", "rope_finetuned@seed0.json",
                    "rope_finetuned@seed1.json"]
    results = json.loads(paths["json"].read_text())
    validate_results(results)
    by_name = {v["name"]: v for v in results["variants"]}
    assert "spread" not in by_name["rope"] and results["seeds"] == [0, 1]
    for name in ("rope_finetuned", "alibi"):
        seeds = [json.loads((tmp_path / "out" / "variants" / f"{name}@seed{s}.json").read_text()) for s in (0, 1)]
        assert [r["seed"] for r in seeds] == [0, 1]
        values = [r["perplexity"]["non_overlapping"]["64"] for r in seeds]
        assert values[0] != values[1]  # different seeds, different LoRA initialisations and batches
        merged = by_name[name]
        assert merged["perplexity"]["non_overlapping"]["64"] == pytest.approx(statistics.fmean(values))
        assert merged["spread"]["std"]["perplexity"]["non_overlapping"]["64"] == pytest.approx(statistics.stdev(values))
    assert "±" in paths["markdown"].read_text() and paths["spread_plot"].read_bytes()[:4] == b"\x89PNG"
    run_compare(TINY, tmp_path / "out", overrides=overrides, progress=False)
    assert (tmp_path / "out" / "compare.log").read_text().count("already done") == 5


# -- recalibration curves and stronger recalibrations -----------------------------------------------------


def test_recalibration_curves_longlora_and_full_attention(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "compare_recal.yaml"
    config.write_text(
        "include: compare_tiny.yaml\n"
        "eval: {curve_every: 1, curve_tokens: 256, ruler: null}\n"
        "variants:\n"
        "  - {name: rope, posenc: {kind: rope}, finetune: false}\n"
        "  - {name: alibi, posenc: {kind: alibi}, train: {seq_len: 32, batch_size: 2}}\n"
        "  - {name: alibi_longlora, posenc: {kind: alibi}, train: {seq_len: 32, batch_size: 2},\n"
        "     lora: {train_embeddings_and_norms: true}}\n"
        "  - {name: alibi_attention, posenc: {kind: alibi}, train: {seq_len: 32, batch_size: 2, lr: 1.0e-2},\n"
        "     lora: {full_attention: true}}\n")
    paths = run_compare(config, tmp_path / "out", progress=False)
    results = json.loads(paths["json"].read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert "curve" not in by_name["rope"]
    for name in ("alibi", "alibi_longlora", "alibi_attention"):
        curve = by_name[name]["curve"]
        assert [p["step"] for p in curve] == [0, 1, 2] and [p["train_tokens"] for p in curve] == [0, 64, 128]
        # The last point is the trained model at L on the same tokens the evaluation scores (eval_tokens = 256).
        assert curve[-1]["perplexity"] == pytest.approx(by_name[name]["perplexity"]["non_overlapping"]["32"], rel=1e-4)
    # The yardstick: the base itself on the curves' tokens (= the rope row's ppl@L here: curve_tokens = eval_tokens).
    reference = by_name["rope"]["perplexity"]["non_overlapping"]["32"]
    assert results["curve_reference"]["perplexity"] == pytest.approx(reference, rel=1e-6)
    # Step 0 is the converted model before any training: the same model for all three.
    names = ("alibi", "alibi_longlora", "alibi_attention")
    first_points = {round(by_name[n]["curve"][0]["perplexity"], 6) for n in names}
    assert len(first_points) == 1
    assert not (tmp_path / "out" / "variants" / "alibi_attention" / "adapter").exists()  # no adapter: trained in full
    assert (tmp_path / "out" / "variants" / "alibi_longlora" / "adapter").is_dir()
    table = paths["markdown"].read_text()
    assert "**Recalibration**" in table and table.count("| alibi") >= 6
    assert paths["curves_plot"].read_bytes()[:4] == b"\x89PNG"


def test_full_attention_trains_only_attention_projections_and_tables():
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_posenc
    from hf_posenc import PosEncConfig
    from hf_posenc.experiments.context_extension.training import train_attention_only

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    hf_posenc.convert(model, PosEncConfig(kind="t5_bias", num_buckets=8, max_distance=16))
    train_attention_only(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "posenc"}


def test_recalibration_verdicts():
    from hf_posenc.experiments.context_extension.report import recalibration

    def variant(name, curve_ppl, ppl_at_l):
        curve = [{"step": i, "train_tokens": 1000 * i, "perplexity": p} for i, p in enumerate(curve_ppl)]
        table = {"8": ppl_at_l}
        return {"name": name, "posenc": {"kind": "rope"}, "finetuned": bool(curve_ppl), "train_tokens": 0,
                "perplexity": {"non_overlapping": table, "sliding": table}, "passkey": {}, "curve": curve}

    results = {"train_length": 8, "curve_reference": {"perplexity": 10.0, "tokens": 64}, "variants": [
        variant("rope", [], 12.0), variant("a", [40, 20, 10.5, 10.4, 10.4], 10.4),
        variant("b", [60, 40, 30, 25, 20], 20), variant("c", [60, 30, 25, 25.1, 25.0], 25)]}
    # Sparse checkpoints: the last quarter is measured from the last point before it (40k of 0/40k/80k/120k).
    sparse = variant("d", [77, 49, 34.5, 32.4], 32.4)
    for i, point in enumerate(sparse["curve"]):
        point["train_tokens"] = 40_000 * i
    results["variants"].append(sparse)
    verdicts = {r["name"]: r["verdict"] for r in recalibration(results)}
    under_trained = "still improving: under-trained at this budget"
    assert verdicts == {"a": "recovered (within 10 % of the base)", "b": under_trained,
                        "c": "plateaued at 2.50x the base", "d": under_trained}
