"""lm-evaluation-harness (EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) on converted
models, offline: the harness's log-likelihoods equal the model's own, in process and from a saved folder,
and the shipped local task (``recipes/lm_eval_tasks/posenc_counting``) scores the accuracy computed by hand.

Skipped when ``lm_eval`` is not installed (``pip install 'hf_posenc[lmeval]'``); the ``test`` extra does
not pull it in (about 25 packages, 220 MB).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'hf_posenc[lmeval]')")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import hf_posenc  # noqa: E402
from hf_posenc.experiments.counting import task as counting  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "recipes" / "lm_eval_tasks"
CHOICES = [str(v) for v in range(11)]


@pytest.fixture(scope="module")
def converted():
    """A tiny random Llama converted to CoPE with non-zero position tables, and its tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = counting.Vocabulary()
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=vocab.pad_id, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = hf_posenc.convert(model, hf_posenc.PosEncConfig(kind="cope", npos_max=32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "posenc" in name:
                p.normal_()  # a zero table would make CoPE equal NoPE and hide a dropped position term
    return model, vocab


def direct_loglikelihood(model, vocab, context: str, continuation: str) -> float:
    """Sum of log p(continuation words | <bos> context) from the model's logits, ids from our own vocabulary.

    The ``<bos>`` is there because the tokenizer adds it (its post-processor) and the harness keeps the
    tokenizer's special tokens, which is how the counting models are trained.
    """
    ctx = [vocab.ids[vocab.BOS]] + [vocab.ids[w] for w in context.split()]
    cont = [vocab.ids[w] for w in continuation.split()]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def requests(docs):
    return [Instance(request_type="loglikelihood", doc=doc, arguments=(doc["program"], f" {choice}"), idx=i)
            for doc in docs for i, choice in enumerate(CHOICES)]


def shipped_docs(n: int):
    lines = (TASKS / "posenc_counting" / "posenc_counting.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_harness_loglikelihood_equals_the_models_own(converted):
    model, vocab = converted
    docs = shipped_docs(4)
    harness = HFLM(pretrained=model, tokenizer=vocab.to_tokenizer(), batch_size=4)
    got = harness.loglikelihood(requests(docs))
    expected = [direct_loglikelihood(model, vocab, doc["program"], f" {c}") for doc in docs for c in CHOICES]
    assert len(got) == len(expected)
    for (loglik, _greedy), ref in zip(got, expected):
        assert abs(loglik - ref) < 1e-4, (loglik, ref)
    # The position term matters: the same weights without CoPE score differently.
    nope = hf_posenc.convert(hf_posenc.revert(_copy(model)), hf_posenc.PosEncConfig(kind="nope")).eval()
    other = direct_loglikelihood(nope, vocab, docs[0]["program"], " 0")
    assert abs(other - expected[0]) > 1e-3


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_saved_folder_evaluates_through_the_harness(converted, tmp_path):
    model, vocab = converted
    model.save_pretrained(tmp_path)
    vocab.to_tokenizer().save_pretrained(tmp_path)
    # A path, as the lm_eval command line passes it: the harness loads it with from_pretrained.
    harness = HFLM(pretrained=str(tmp_path), trust_remote_code=True, batch_size=4, device="cpu")
    assert type(harness.model).__name__ == type(model).__name__
    docs = shipped_docs(2)
    got = [ll for ll, _ in harness.loglikelihood(requests(docs))]
    expected = [direct_loglikelihood(model, vocab, d["program"], f" {c}") for d in docs for c in CHOICES]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4


def test_shipped_task_scores_the_accuracy_computed_by_hand(converted, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    model, vocab = converted
    limit = 12
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=vocab.to_tokenizer(), batch_size=8),
                                      tasks=["posenc_counting"], task_manager=TaskManager(include_path=str(TASKS)),
                                      limit=limit, bootstrap_iters=0, log_samples=False)
    acc = results["results"]["posenc_counting"]["acc,none"]
    hits = 0
    for doc in shipped_docs(limit):
        scores = [direct_loglikelihood(model, vocab, doc["program"], f" {c}") for c in CHOICES]
        hits += int(max(range(len(CHOICES)), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(hits / limit)


def _hand_accuracy(model, vocab, docs) -> float:
    hits = 0
    for doc in docs:
        scores = [direct_loglikelihood(model, vocab, doc["program"], f" {c}") for c in CHOICES]
        hits += int(max(range(len(CHOICES)), key=scores.__getitem__) == doc["answer"])
    return hits / len(docs)


def _readme_snippet() -> str:
    text = (TASKS / "README.md").read_text()
    (code,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return code


def test_readme_example_runs(converted, tmp_path, monkeypatch, capsys):
    """The in-process example of recipes/lm_eval_tasks/README.md, on a tiny Llama with the counting tokenizer."""
    from transformers import AutoModelForCausalLM

    model, vocab = converted
    folder = tmp_path / "llama"
    hf_posenc.revert(_copy(model)).save_pretrained(folder)  # a stock Llama, as the example starts from
    vocab.to_tokenizer().save_pretrained(folder)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = _readme_snippet().replace("path/to/llama", str(folder))
    code = code.replace('tasks=["posenc_counting"],', 'tasks=["posenc_counting"], limit=6, bootstrap_iters=0,')
    namespace: dict = {}
    exec(compile(code, "recipes/lm_eval_tasks/README.md", "exec"), namespace)  # noqa: S102 - our README
    scored = namespace["results"]["results"]["posenc_counting"]["acc,none"]
    # The example converts the stock Llama to CoPE with zero position tables (= NoPE): score it by hand.
    reference = hf_posenc.convert(AutoModelForCausalLM.from_pretrained(folder),
                                  hf_posenc.PosEncConfig(kind="cope", npos_max=64)).eval()
    assert scored == pytest.approx(_hand_accuracy(reference, vocab, shipped_docs(6)))
    assert "acc,none" in capsys.readouterr().out


def test_command_line_on_a_saved_folder(converted, tmp_path):
    """The README's ``lm_eval`` command in a fresh process: hf_posenc is imported only via trust_remote_code."""
    model, vocab = converted
    folder = tmp_path / "converted"
    model.save_pretrained(folder)
    vocab.to_tokenizer().save_pretrained(folder)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True", "--include_path", str(TASKS),
                           "--tasks", "posenc_counting", "--device", "cpu", "--batch_size", "8", "--limit", "5",
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["posenc_counting"]["acc,none"]
    assert acc == pytest.approx(_hand_accuracy(model, vocab, shipped_docs(5)))
