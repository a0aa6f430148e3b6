"""Cards from the real numbers of the committed quick-comparison run (recipes/results/compare_quick)."""

import json
from pathlib import Path

from huggingface_hub import ModelCard

from hf_posenc import cards
from hf_posenc.results import load_results, select_method

RESULTS = Path(__file__).resolve().parents[1] / "recipes" / "results" / "compare_quick" / "results.json"


def test_report_and_model_card_show_the_recipe_run_numbers(tmp_path):
    data = json.loads(RESULTS.read_text())
    yarn = next(v for v in data["variants"] if v["name"] == "rope_yarn")
    summary = load_results(RESULTS)
    report = cards.render_report(summary, title="Quick comparison", base_model=data["base_model"])
    report.save(tmp_path / "report.md")
    parsed = ModelCard.load(tmp_path / "report.md")
    for length, value in yarn["perplexity"]["non_overlapping"].items():
        assert f"{value:.3f}" in parsed.text, (length, value)

    # One method's numbers in a model card, with model-index results that validate as card metadata.
    card = cards.render_card(cards.CardInfo(repo_id="me/tiny-yarn", results=select_method(summary, "rope_yarn"),
                                            posenc={"kind": "rope", "rope_type": "yarn", "factor": 4.0}))
    card.save(tmp_path / "card.md")
    loaded = ModelCard.load(tmp_path / "card.md")
    metadata = loaded.data.to_dict()
    assert "hf_posenc" in metadata["tags"]
    values = [m["value"] for r in metadata["model-index"][0]["results"] for m in r["metrics"]]
    expected = list(yarn["perplexity"]["non_overlapping"].values())
    assert all(any(abs(v - e) < 1e-3 for v in values) for e in expected)
