"""Pushing to the Hub through the loopback server: stock folders, cards, refs, and every failure case.

The converted-model and adapter round trips (which need the core package) are in test_hub_posenc.py;
this module only needs transformers, peft and huggingface_hub, so it pins the client/server contract.
"""

from __future__ import annotations

import csv
import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import tomllib
import torch
import transformers
from hub_server import (  # noqa: F401
    CHECKED_HUGGINGFACE_HUB,
    OTHER_TOKEN,
    READ_ENDPOINTS,
    UPLOAD_ENDPOINTS,
    USER,
    WRITE_TOKEN,
    ClientGeneration,
    HubServer,
    assert_one_atomic_push,
    hub_server,
    load_in_fresh_process,
    single_thread_logits,
)
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

from hf_posenc import cards, cli, hub
from hf_posenc.results import EvalSummary, load_results, plot_results, records_from_rows

INPUT_IDS = [[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]]

def raw_request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request with the standard library (whatever HTTP client this huggingface_hub uses); (status, body)."""
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def tiny_llama(hidden: int = 16, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 1-layer Llama small enough that a push and a fresh-process load take seconds."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def logits_of(model) -> torch.Tensor:
    return single_thread_logits(model, INPUT_IDS)


@pytest.fixture
def llama_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny_llama"
    tiny_llama().save_pretrained(folder)
    return folder


def test_client_version_is_in_the_range_the_server_was_checked_against():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # The range the project declares, read from pyproject.toml so the two cannot drift apart.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (requirement,) = (d for d in pyproject["project"]["dependencies"]
                      if d.replace("-", "_").startswith("huggingface_hub"))
    declared = SpecifierSet(requirement.removeprefix("huggingface_hub").removeprefix("-hub"))
    installed = Version(huggingface_hub.__version__)
    checked = sorted(Version(v) for v in CHECKED_HUGGINGFACE_HUB)
    assert installed in declared, f"huggingface_hub {installed} is outside the declared range {declared}"
    # The server was read from, and passed with, the floor and the newest release. Another release of
    # those major versions speaks the same subset; a new major version must be re-read first.
    (floor,) = (Version(spec.version) for spec in declared if spec.operator == ">=")
    assert checked[0].release[:2] == floor.release[:2] and all(v in declared for v in checked), (
        f"CHECKED_HUGGINGFACE_HUB={CHECKED_HUGGINGFACE_HUB} must start at the declared floor and stay inside {declared}"
    )
    assert installed.major in {v.major for v in checked}, (
        f"huggingface_hub {installed}: the loopback Hub was checked against {CHECKED_HUGGINGFACE_HUB} only; "
        "re-read the client's push/load code (see tests/hub_server.py) and add this release there"
    )
    # The client knowledge the tests derive must agree with what was measured on the checked releases.
    known = ClientGeneration.KNOWN_DROPPED_UPLOAD_ATTEMPTS.get(huggingface_hub.__version__)
    if known is not None:
        assert ClientGeneration.installed().dropped_upload_attempts == known


def test_unknown_routes_are_recorded_and_refused(hub_server):
    status, body = raw_request(f"{hub_server.url}/api/whoami-v2")
    assert status == 404 and "does not serve GET /api/whoami-v2" in json.loads(body)["error"]
    assert hub_server.endpoints() == ["unknown"]


def test_stock_folder_round_trip_in_a_fresh_process(hub_server, llama_folder, tmp_path):
    local = logits_of(transformers.AutoModelForCausalLM.from_pretrained(llama_folder))
    result = hub.push_to_hub(llama_folder, "tiny-stock")  # bare name: the Hub puts it under the token's user

    assert result.repo_id == f"{USER}/tiny-stock"
    assert_one_atomic_push(hub_server)
    remote = hub_server.files(result.repo_id)
    assert set(remote) == {".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors"}
    assert remote["model.safetensors"] == (llama_folder / "model.safetensors").read_bytes()
    assert hub_server.head(result.repo_id).oid == result.commit_oid
    # One commit on top of the repo's initial one: card and weights went up together.
    messages = [c.message for c in hub_server.history(result.repo_id)]
    assert len(messages) == 2 and messages[1] == "initial commit" and messages[0].startswith("Upload model")

    hub_server.clear_calls()
    loaded = load_in_fresh_process(hub_server, [{"name": "stock", "repo": result.repo_id, "input_ids": INPUT_IDS}],
                                   tmp_path)
    assert "error" not in loaded["stock"], loaded["stock"]
    assert torch.equal(loaded["stock"]["logits"], local)
    # A load only reads; whether transformers resolves the revision first (model_info) is its business.
    assert "resolve" in hub_server.endpoints() and set(hub_server.endpoints()) <= READ_ENDPOINTS, hub_server.endpoints()


def test_pushing_the_same_folder_again_makes_no_commit_and_uploads_nothing(hub_server, llama_folder):
    first = hub.push_to_hub(llama_folder, f"{USER}/same")
    hub_server.clear_calls()
    second = hub.push_to_hub(llama_folder, f"{USER}/same")
    assert second.commit_oid == first.commit_oid
    assert len(hub_server.history(first.repo_id)) == 2
    # Same model: the remote config is read to compare identities, nothing is uploaded or committed.
    assert "lfs_upload" not in hub_server.endpoints() and "commit" not in hub_server.endpoints()
    assert "resolve" in hub_server.endpoints()


def test_card_of_a_pushed_model_parses_and_carries_real_numbers(hub_server, llama_folder, tmp_path):
    # Real numbers: perplexity of the model itself at two lengths, written as a recipe writes its table.
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    torch.manual_seed(1)
    rows = []
    for length in (8, 32):
        ids = torch.randint(0, 64, (1, length))
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        rows.append({"method": "stock", "length": length, "perplexity": math.exp(loss)})
    table = tmp_path / "results.csv"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "length", "perplexity"])
        writer.writeheader()
        writer.writerows(rows)

    result = hub.push_to_hub(
        llama_folder, f"{USER}/with-card", results=table, base_model="HuggingFaceTB/SmolLM2-135M",
        training={"steps": 0}, datasets=["wikitext"], license="apache-2.0",
    )
    readme = hf_hub_download(result.repo_id, "README.md", endpoint=hub_server.url, cache_dir=str(tmp_path / "c"))
    card = ModelCard.load(readme)
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "hf_posenc" in meta["tags"] and meta["datasets"] == ["wikitext"] and meta["license"] == "apache-2.0"
    # model-index round-trips to the exact numbers in the table, one metric per length.
    got = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert got == {f"length={r['length']}": pytest.approx(r["perplexity"], rel=0, abs=0) for r in rows}
    for r in rows:
        assert f"{r['perplexity']:.3f}" in card.text
    assert "![Perplexity by evaluation length](ppl_by_length.png)" in card.text
    assert hub_server.files(result.repo_id)[cards.PLOT_FILENAME].startswith(b"\x89PNG")
    # A stock checkpoint: the card says plain transformers loads it, with no trust_remote_code.
    assert f'from_pretrained("{result.repo_id}")' in card.text and "trust_remote_code" not in card.text


def test_private_repo_needs_the_owner_token(hub_server, llama_folder, tmp_path):
    result = hub.push_to_hub(llama_folder, f"{USER}/secret", private=True)
    assert hub_server.repos[result.repo_id].private
    for token in (False, OTHER_TOKEN):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(result.repo_id, "config.json", endpoint=hub_server.url, token=token,
                            cache_dir=str(tmp_path / str(token)))
    path = hf_hub_download(result.repo_id, "config.json", endpoint=hub_server.url, token=WRITE_TOKEN,
                           cache_dir=str(tmp_path / "ok"))
    assert Path(path).read_bytes() == (llama_folder / "config.json").read_bytes()


def test_branch_and_pull_request_leave_main_alone(hub_server, llama_folder):
    main = hub.push_to_hub(llama_folder, f"{USER}/refs")
    branch = hub.push_to_hub(llama_folder, f"{USER}/refs", revision="dev", training={"steps": 1},
                             commit_message="dev card")
    assert "create_branch" in hub_server.endpoints()
    assert hub_server.head(main.repo_id, "dev").oid == branch.commit_oid
    assert hub_server.head(main.repo_id, "dev").message == "dev card"
    assert hub_server.head(main.repo_id).oid == main.commit_oid

    pr = hub.push_to_hub(llama_folder, f"{USER}/refs", create_pr=True, training={"steps": 2})
    assert pr.pr_url == f"{hub_server.url}/{main.repo_id}/discussions/1"
    assert hub_server.head(main.repo_id, "refs/pr/1").oid == pr.commit_oid
    assert hub_server.head(main.repo_id).oid == main.commit_oid
    assert b"| steps | 2 |" in hub_server.files(main.repo_id, "refs/pr/1")["README.md"]


def test_no_token_fails_before_any_request(hub_server, llama_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(hub.MissingTokenError, match="No Hugging Face token found.*HF_TOKEN.*hf auth login"):
        hub.push_to_hub(llama_folder, f"{USER}/nothing")
    assert hub_server.calls == []
    # The CLI says the same and exits 2, like every user error of hf-posenc.
    assert cli.main(["push", str(llama_folder), f"{USER}/nothing"]) == 2


def test_rejected_token_creates_nothing(hub_server, llama_folder):
    with pytest.raises(hub.PushFailedError, match="rejected the token"):
        hub.push_to_hub(llama_folder, f"{USER}/nothing", token="hf_not_a_token")
    assert hub_server.repos == {}


def test_network_failure_at_commit_leaves_no_partial_commit_and_retry_reuploads_nothing(hub_server, llama_folder):
    hub.push_to_hub(llama_folder, f"{USER}/flaky")
    before = hub_server.head(f"{USER}/flaky")
    retrained = tiny_llama(seed=7)
    hub_server.clear_calls()
    hub_server.inject_fault("commit", mode="disconnect")
    with pytest.raises(hub.PushFailedError, match="Network failure.*No commit was created"):
        hub.push_to_hub(retrained, f"{USER}/flaky")
    # The weights did reach the server (mid-upload), but the branch did not move.
    assert "lfs_upload" in hub_server.endpoints()
    assert hub_server.calls[-1].endpoint == "commit" and hub_server.calls[-1].status == 0
    assert hub_server.head(f"{USER}/flaky") == before

    hub_server.clear_calls()
    result = hub.push_to_hub(retrained, f"{USER}/flaky")
    assert "lfs_upload" not in hub_server.endpoints()  # the blob is already there
    assert hub_server.head(f"{USER}/flaky").oid == result.commit_oid != before.oid


def test_network_failure_during_lfs_upload_commits_nothing(hub_server, llama_folder, monkeypatch):
    from huggingface_hub.utils import _http

    # Whether the client retries a dropped upload, and how often, depends on its release (2.x sends it
    # 1 + 5 times, 1.x once: see ClientGeneration); drop every attempt it will make, so the push fails
    # on each. Skip the 1-8 s sleeps between retries, keep the retries.
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    attempts = ClientGeneration.installed().dropped_upload_attempts
    hub_server.inject_fault("lfs_upload", mode="disconnect", times=attempts)
    with pytest.raises(hub.PushFailedError,
                       match=f"Network failure while pushing to {USER}/dropped.*No commit was created.*"
                             "Run the push again"):
        hub.push_to_hub(llama_folder, f"{USER}/dropped")
    uploads = [c for c in hub_server.calls if c.endpoint == "lfs_upload"]
    assert len(uploads) == attempts and all(c.status == 0 for c in uploads)
    assert "commit" not in hub_server.endpoints()
    assert set(hub_server.files(f"{USER}/dropped")) == {".gitattributes"}
    assert len(hub_server.history(f"{USER}/dropped")) == 1


def test_one_dropped_lfs_upload_ends_in_one_complete_commit(hub_server, llama_folder, monkeypatch):
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    hub_server.inject_fault("lfs_upload", mode="disconnect", times=1)
    # A client that retries dropped connections (2.x) recovers inside the push; one that does not (1.x)
    # fails with nothing committed, and the rerun the message asks for completes. Either way the end
    # state is the same: one commit holding every file, byte for byte.
    if ClientGeneration.installed().retries_dropped_connections:
        result = hub.push_to_hub(llama_folder, f"{USER}/recovered")
    else:
        with pytest.raises(hub.PushFailedError, match="Network failure.*Run the push again"):
            hub.push_to_hub(llama_folder, f"{USER}/recovered")
        assert set(hub_server.files(f"{USER}/recovered")) == {".gitattributes"}
        result = hub.push_to_hub(llama_folder, f"{USER}/recovered")
    assert [c.status for c in hub_server.calls if c.endpoint == "lfs_upload"] == [0, 200]
    assert len(hub_server.history(result.repo_id)) == 2 and hub_server.head(result.repo_id).oid == result.commit_oid
    remote = hub_server.files(result.repo_id)
    assert all(remote[p.name] == p.read_bytes() for p in llama_folder.iterdir())


def test_push_to_an_endpoint_other_than_hf_endpoint(hub_server, llama_folder):
    from huggingface_hub import constants

    # HF_ENDPOINT (the fixture's server) is one Hub; endpoint= names another. huggingface_hub 1.x
    # parses the commit URL against HF_ENDPOINT, which hf_posenc works around; the push, and a re-push
    # that has nothing to commit, must both report the other Hub's commit and touch nothing else.
    with HubServer() as other:
        first = hub.push_to_hub(llama_folder, f"{USER}/elsewhere", endpoint=other.url)
        again = hub.push_to_hub(llama_folder, f"{USER}/elsewhere", endpoint=other.url)
        assert first.commit_oid == again.commit_oid == other.head(f"{USER}/elsewhere").oid
        assert first.commit_url == f"{other.url}/{USER}/elsewhere/commit/{first.commit_oid}"
        pushed = other.files(f"{USER}/elsewhere")["model.safetensors"]
        assert pushed == (llama_folder / "model.safetensors").read_bytes()
    assert hub_server.calls == [] and hub_server.repos == {}
    assert constants.ENDPOINT == hub_server.url


def test_repo_holding_another_model_is_refused_unless_overwrite(hub_server, llama_folder, tmp_path):
    first = hub.push_to_hub(llama_folder, f"{USER}/taken")
    other = tmp_path / "wider"
    tiny_llama(hidden=32).save_pretrained(other)
    (other / "notes.txt").write_text("x")
    hub_server.clear_calls()
    with pytest.raises(hub.RepoConflictError,
                       match=r"(?s)already holds a different model:\n  - hidden_size: remote 16 != local 32.*"
                             "overwrite=True"):
        hub.push_to_hub(other, f"{USER}/taken")
    assert "commit" not in hub_server.endpoints()
    assert hub_server.head(first.repo_id).oid == first.commit_oid

    # An adapter cannot silently land on a full-model repo either.
    (tmp_path / "adapter").mkdir()
    adapter_config = {"peft_type": "LORA", "base_model_name_or_path": str(llama_folder)}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(hub.UnconvertedBaseError):
        hub.push_to_hub(tmp_path / "adapter", f"{USER}/taken")

    (llama_folder / "stale.txt").write_text("old")
    result = hub.push_to_hub(other, f"{USER}/taken", overwrite=True)
    files = hub_server.files(result.repo_id)
    assert json.loads(files["config.json"])["hidden_size"] == 32
    assert "notes.txt" in files and files["model.safetensors"] == (other / "model.safetensors").read_bytes()


def test_adapter_on_an_unconverted_base_is_refused_before_any_request(hub_server, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(hub.UnconvertedBaseError, match="was not converted with hf_posenc.*convert the base"):
        hub.push_to_hub(peft_model, f"{USER}/adapter")
    assert hub_server.calls == []

    # Same from a folder whose base_model_name_or_path is a local stock checkpoint.
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    assert isinstance(peft_model, PeftModel)
    with pytest.raises(hub.UnconvertedBaseError, match="has no 'posenc'"):
        hub.push_to_hub(adapter_dir, f"{USER}/adapter")
    assert hub_server.calls == []


def test_stock_model_type_with_a_posenc_entry_is_refused(hub_server, llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["posenc"] = {"kind": "alibi", "max_bias": 8.0}
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hub.NotLoadableError, match="stock transformers would load it WITHOUT that encoding"):
        hub.push_to_hub(llama_folder, f"{USER}/unsafe")
    config.update(model_type="hf_posenc_llama", auto_map={"AutoModelForCausalLM": "modeling_hf_posenc.Missing"})
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hub.NotLoadableError, match="modeling_hf_posenc.py is not in"):
        hub.push_to_hub(llama_folder, f"{USER}/unsafe")
    assert hub_server.calls == []


def test_server_commit_is_atomic_when_an_lfs_object_is_missing(hub_server):
    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)
    api.create_repo(f"{USER}/raw")
    before = hub_server.head(f"{USER}/raw")
    payload = "\n".join(json.dumps(line) for line in [
        {"key": "header", "value": {"summary": "half", "description": ""}},
        {"key": "file", "value": {"path": "a.txt", "content": "aGk=", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ])
    status, body = raw_request(f"{hub_server.url}/api/models/{USER}/raw/commit/main", payload.encode(),
                               headers={"Authorization": f"Bearer {WRITE_TOKEN}",
                                        "Content-Type": "application/x-ndjson"})
    missing = "LFS object " + "0" * 64 + " for w.safetensors was not uploaded"
    assert status == 400 and missing in json.loads(body)["error"]
    assert hub_server.head(f"{USER}/raw") == before and "a.txt" not in hub_server.files(f"{USER}/raw")


def test_invalid_card_metadata_is_rejected_by_validate_yaml(hub_server, llama_folder, monkeypatch):
    original = cards.render_card

    def broken(info):
        card = original(info)
        card.data.base_model_relation = "conversion"  # not a value the Hub accepts
        return card

    monkeypatch.setattr(cards, "render_card", broken)
    with pytest.raises(hub.PushFailedError, match="(?s)rejected the model card metadata.*base_model_relation"):
        hub.push_to_hub(llama_folder, f"{USER}/badcard")
    # The card is checked before anything is uploaded: no upload, no commit, the repo as created.
    endpoints = set(hub_server.endpoints())
    assert "validate_yaml" in endpoints and not (UPLOAD_ENDPOINTS | {"commit"}) & endpoints
    assert set(hub_server.files(f"{USER}/badcard")) == {".gitattributes"}


def test_comparison_report_renders_every_method_and_the_best(tmp_path):
    rows = [
        {"method": "rope", "length": 256, "perplexity": 5.33},
        {"method": "rope", "length": 512, "perplexity": 18.2},
        {"method": "yarn x2", "length": 256, "perplexity": 5.55, "passkey_accuracy": 0.9},
        {"method": "yarn x2", "length": 512, "perplexity": 5.57, "passkey_accuracy": 1.0},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": rows, "dataset_name": "stdlib sources",
                                "protocol": "Non-overlapping windows."}))
    summary = load_results(path)
    card = cards.render_report(summary, title="Context extension", base_model="HuggingFaceTB/SmolLM2-135M")
    parsed = ModelCard(str(card))
    assert parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "| rope | 5.330 | 18.200 |" in parsed.text
    assert "| yarn x2 | 5.550 | 5.570 |" in parsed.text
    assert "| rope | – | – |" in parsed.text  # passkey table: rope was not measured
    assert "| Perplexity | 512 | yarn x2 |" in parsed.text and "| Perplexity | 256 | rope |" in parsed.text
    assert "stdlib sources" in parsed.text and "Non-overlapping windows." in parsed.text
    png = plot_results(summary, tmp_path / "p.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_results_rows_are_validated():
    with pytest.raises(ValueError, match="row 0 has no 'length'"):
        records_from_rows([{"perplexity": 3}])
    with pytest.raises(ValueError, match="row 0 has no metric; expected one of"):
        records_from_rows([{"length": 3, "loss": 1}])
    with pytest.raises(ValueError, match="perplexity='inf' is not finite"):
        records_from_rows([{"length": 3, "perplexity": "inf"}])
    with pytest.raises(ValueError, match="a model card reports one model's numbers"):
        cards.render_card(cards.CardInfo(repo_id="a/b", results=EvalSummary(records_from_rows(
            [{"method": "a", "length": 1, "perplexity": 2}, {"method": "b", "length": 1, "perplexity": 2}]))))


def test_cli_push_with_the_comparison_recipes_results(hub_server, llama_folder, tmp_path, capsys):
    # Real numbers in the comparison recipe's results.json layout: two variants of this tiny model,
    # non-overlapping and sliding perplexity, at two lengths (sliding = stride half the window).
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    torch.manual_seed(2)
    text = torch.randint(0, 64, (1, 64))

    def ppl(window: int, stride: int) -> float:
        losses = []
        for start in range(0, 64 - window + 1, stride):
            ids = text[:, start:start + window]
            with torch.no_grad():
                losses.append(model(ids, labels=ids).loss.item())
        return math.exp(sum(losses) / len(losses))

    variants = [
        {"name": name, "posenc": {"kind": "rope"}, "finetuned": False, "train_tokens": 0,
         "perplexity": {"non_overlapping": {str(n): ppl(n, n) for n in (16, 32)},
                        "sliding": {str(n): ppl(n, n // 2) for n in (16, 32)}},
         "passkey": {"16": 0.5}}
        for name in ("this", "other")
    ]
    variants[1]["perplexity"]["non_overlapping"] = {"16": 99.0, "32": 98.0}
    data = {"base_model": "tiny", "train_length": 16, "variants": variants}
    from hf_posenc.experiments.context_extension.report import validate_results

    validate_results(data)  # the recipe's own schema check: this is the layout a recipe run writes
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data))

    code = cli.main(["push", str(llama_folder), f"{USER}/cli", "--results", str(results), "--results-method", "this",
                     "--private",
                     "--tag", "context-extension"])
    assert code == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith(f"{hub_server.url}/{USER}/cli/commit/") and hub_server.repos[f"{USER}/cli"].private
    card = ModelCard(hub_server.files(f"{USER}/cli")["README.md"].decode())
    assert "context-extension" in card.data.tags
    want = variants[0]["perplexity"]
    got = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    assert got == {
        *((f"Perplexity @ {n} tokens", want["non_overlapping"][n]) for n in ("16", "32")),
        *((f"Perplexity (sliding window) @ {n} tokens", want["sliding"][n]) for n in ("16", "32")),
        ("Passkey accuracy @ 16 tokens", 0.5),
    }
    assert f"| this | {want['non_overlapping']['16']:.3f} | {want['non_overlapping']['32']:.3f} |" in card.text
    assert "99.000" not in card.text  # the other variant's numbers stay out of this model's card
    assert cli.main(["push", str(llama_folder), f"{USER}/cli2", "--results", str(results)]) == 2
    assert "a model card reports one model's numbers" in capsys.readouterr().err
