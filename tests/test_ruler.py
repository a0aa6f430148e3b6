"""RULER-style tasks: prompt construction, the exact-match metric and its interval, the stopping rule,
batched greedy decoding against one-by-one decoding."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_posenc
from hf_posenc.experiments.context_extension import evaluation, ruler
from hf_posenc.experiments.context_extension.base_model import train_bpe_tokenizer
from hf_posenc.experiments.context_extension.config import RulerConfig

TEXTS = ["def f(x):\n    return x + 1\n" * 40, "class A:\n    value = 12345\n" * 40, "# PASS_KEY ALPHA\n" * 20]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def filler(tokenizer):
    return torch.tensor(tokenizer("\n".join(TEXTS) * 3)["input_ids"])


def _needle_starts(prompt_ids: torch.Tensor, needle_ids: torch.Tensor) -> list[int]:
    n = len(needle_ids)
    return [i for i in range(len(prompt_ids) - n + 1) if torch.equal(prompt_ids[i : i + n], needle_ids)]


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_length_the_needles_and_the_depth(tokenizer, filler, task, depth):
    rng = random.Random(3)
    prompt = ruler.needle_prompt(task, tokenizer, filler, 200, depth, rng)
    assert prompt.input_ids.shape == (200,)
    # Rebuild the same trial's lines from a generator in the same state: the needles must be in the prompt.
    lines, question, answers = ruler.task_lines(task, random.Random(3))
    assert answers == prompt.answers and all(a.isdigit() and len(a) == 5 for a in answers)
    encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    starts = [_needle_starts(prompt.input_ids, encode(line)) for line in lines]
    assert all(starts), f"a needle line is missing from the {task} prompt"
    assert torch.equal(prompt.input_ids[-len(encode(question)) :], encode(question))
    # The asked-for needle sits at the requested depth of the filler (within one token of rounding).
    head = len(encode(ruler.HEAD))
    room = 200 - head - sum(len(encode(line)) for line in lines) - len(encode(question))
    assert abs(starts[0][0] - (head + round(depth * room))) <= 1 or task in ("multi_key",)
    if task in ("multi_value", "variable_tracking"):  # the chain is in order: it can be followed
        assert starts[0][0] < starts[1][0] < starts[2][0]


def test_prompt_rejects_bad_input(tokenizer, filler):
    with pytest.raises(ValueError, match="unknown RULER task 'needle'; allowed: single_needle"):
        ruler.needle_prompt("needle", tokenizer, filler, 200, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="too short"):
        ruler.needle_prompt("multi_key", tokenizer, filler, 20, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        ruler.needle_prompt("single_needle", tokenizer, filler, 200, 1.5, random.Random(0))


@pytest.mark.parametrize(
    "prediction, reference, correct",
    [(" 68220. Done", "68220", True), ("6822", "68220", False), ("682200", "68220", False),
     ("11111, 22222, 33333]", "11111 22222 33333", True), ("11111, 33333, 22222]", "11111 22222 33333", False),
     ("11111, 22222]", "11111 22222 33333", False), ("", "68220", False)],
)
def test_exact_match_reads_the_first_digit_runs_in_order(prediction, reference, correct):
    result = evaluation.load_metric("needle_exact_match", "multi_value").compute(
        predictions=[prediction], references=[reference])
    assert result["accuracy"] == float(correct) and result["trials"] == 1


def _wilson_by_quadratic(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson bounds as the roots p of (p_hat - p)^2 = z^2 p (1 - p) / n (the score test inverted)."""
    p_hat = successes / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("successes, n", [(0, 10), (5, 10), (10, 10), (7, 43), (1, 48)])
def test_interval_is_the_wilson_score_interval(successes, n):
    metric = evaluation.load_metric("needle_exact_match", "single_needle")
    result = metric.compute(predictions=["12345"] * successes + ["0"] * (n - successes), references=["12345"] * n)
    low, high = _wilson_by_quadratic(successes, n)
    assert result["ci_low"] == pytest.approx(max(0.0, low), abs=1e-12)
    assert result["ci_high"] == pytest.approx(min(1.0, high), abs=1e-12)
    if (successes, n) == (5, 10):  # the textbook value
        assert (round(result["ci_low"], 4), round(result["ci_high"], 4)) == (0.2366, 0.7634)


def test_metric_refuses_an_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'needles'; allowed: single_needle, multi_key"):
        evaluation.load_metric("needle_exact_match", "needles")


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_trials_stop_at_the_first_batch_with_a_narrow_enough_interval(monkeypatch, tokenizer, filler, rate):
    """A scripted model answers right with probability ``rate``. The cell must stop at the first batch
    boundary (>= min_trials) where the Wilson half-width is <= 0.15, and not before."""
    coin, expected, outcomes = random.Random(0), [], []
    real_prompt = ruler.needle_prompt

    def recording_prompt(*args, **kwargs):
        prompt = real_prompt(*args, **kwargs)
        expected.append(" ".join(prompt.answers))
        return prompt

    def scripted_greedy(model, tok, input_ids, max_new_tokens):
        out = []
        for _ in input_ids:
            right = coin.random() < rate
            outcomes.append(right)
            out.append(f" {expected[len(outcomes) - 1]}." if right else " 0.")
        return out

    monkeypatch.setattr(ruler, "needle_prompt", recording_prompt)
    monkeypatch.setattr(ruler, "greedy_batch", scripted_greedy)
    metric = evaluation.load_metric("needle_exact_match", "single_needle")
    result, predictions, _ = ruler.run_cell(None, tokenizer, filler, "single_needle", 300, 0.5, metric, seed=0,
                                            batch_size=6, min_trials=12, max_trials=60, max_half_width=0.15)
    assert len(predictions) == result["trials"]
    assert result["trials"] == len(outcomes) and result["accuracy"] == sum(outcomes) / len(outcomes)

    def half_width(n):
        low, high = _wilson_by_quadratic(sum(outcomes[:n]), n)
        return (min(1.0, high) - max(0.0, low)) / 2

    stops = [n for n in range(12, 61, 6) if half_width(n) <= 0.15]
    assert result["trials"] == (stops[0] if stops else 60)
    if rate in (0.0, 1.0):
        assert result["trials"] == 12  # Wilson at 0/12 or 12/12 is [0, 0.243] or [0.757, 1]: half-width 0.121
    else:
        assert result["trials"] >= 42  # near 0.5 the half-width is ~0.98/sqrt(n): n >= 43 (or stop at 60)


def test_batched_greedy_equals_one_by_one(tokenizer, filler):
    """Equal-length prompts decoded as one batch give the continuations of decoding each alone (ALiBi)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = hf_posenc.convert(LlamaForCausalLM(cfg).eval(), hf_posenc.PosEncConfig(kind="alibi"))
    prompts = [ruler.needle_prompt("multi_key", tokenizer, filler[i * 40 :], 260, 0.3, random.Random(i))
               for i in range(3)]
    batch = ruler.greedy_batch(model, tokenizer, torch.stack([p.input_ids for p in prompts]), 6)
    alone = [evaluation.greedy_continuation(model, tokenizer, p.input_ids, 6) for p in prompts]
    assert batch == alone


def test_config_names_bad_tasks_and_bounds():
    with pytest.raises(ValueError, match="single_needle"):
        RulerConfig(tasks=["needle"])
    with pytest.raises(ValueError, match="min_trials"):
        RulerConfig(min_trials=50, max_trials=10)
    assert RulerConfig().tasks == list(ruler.TASKS)


# -- retrieval pretraining windows (the base model's in-distribution retrieval) ---------------------------


@pytest.fixture(scope="module")
def digit_tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300, digit_tokens=True)


def test_digit_tokens_spell_every_number_one_digit_at_a_time(tokenizer, digit_tokenizer):
    pieces = digit_tokenizer.convert_ids_to_tokens(digit_tokenizer(" = 12345", add_special_tokens=False)["input_ids"])
    assert pieces[-5:] == list("12345")
    # The plain BPE of the same corpus merged the corpus's number into one token.
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" 12345")["input_ids"])
    assert "12345" in "".join(t for t in tokens if len(t) > 2)
    assert digit_tokenizer.decode(digit_tokenizer(TEXTS[1])["input_ids"]) == TEXTS[1]  # still lossless


@pytest.mark.parametrize("seed", range(8))
def test_retrieval_example_is_a_task_answered_in_the_window_then_more_code(digit_tokenizer, seed):
    from hf_posenc.experiments.context_extension import retrieval_pretraining

    filler = torch.tensor(digit_tokenizer("\n".join(TEXTS) * 3)["input_ids"])
    example = retrieval_pretraining.retrieval_example(digit_tokenizer, filler, 320, random.Random(seed))
    window, answer = example.input_ids, example.answer
    assert window.shape == (320,) and 160 <= answer.stop <= 320
    text = digit_tokenizer.decode(window[: answer.stop])
    needles = [line for line in text.splitlines() if line[:1].isupper() and (" = " in line or " += " in line)]
    names = {line.split(" ")[0] for line in needles}
    assert names and not names & set(ruler._NAMES)  # never the evaluation's names
    values = {word.strip("[],") for line in needles for word in line.split() if word.strip("[],").isdigit()}
    # The answer: the asked-for value(s) right after the question, then a newline.
    said = digit_tokenizer.decode(window[answer])
    before = digit_tokenizer.decode(window[: answer.start])
    assert said.endswith("\n") and set(said.strip("] \n").split(", ")) <= values, text
    assert before.rstrip().endswith(("=", "[", "==")) or before.endswith(" ")  # the question, then the answer
    # Then a new document: end-of-text and the code that follows the filler the task used.
    rest = window[answer.stop :]
    if len(rest):
        assert rest[0] == digit_tokenizer.eos_token_id
        assert torch.equal(rest[1:], filler[answer.stop : 320 - 1])


def test_retrieval_answers_end_anywhere_in_the_second_half_of_the_window(digit_tokenizer):
    """A model trained with the answer always in the window's last tokens retrieves only there."""
    from hf_posenc.experiments.context_extension import retrieval_pretraining

    filler = torch.tensor(digit_tokenizer("\n".join(TEXTS) * 3)["input_ids"])
    rng = random.Random(0)
    ends = [retrieval_pretraining.retrieval_example(digit_tokenizer, filler, 320, rng).answer.stop for _ in range(200)]
    assert min(ends) >= 160 and max(ends) <= 320
    assert sum(e < 240 for e in ends) > 50 and sum(e >= 280 for e in ends) > 30  # ~uniform over [160, 320]


def test_retrieval_example_draws_only_the_given_tasks(digit_tokenizer):
    from hf_posenc.experiments.context_extension import retrieval_pretraining

    filler = torch.tensor(digit_tokenizer("\n".join(TEXTS) * 3)["input_ids"])
    rng = random.Random(0)
    for _ in range(20):
        example = retrieval_pretraining.retrieval_example(digit_tokenizer, filler, 320, rng, tasks=("single_needle",))
        assert "PASS_KEY = " in digit_tokenizer.decode(example.input_ids[: example.answer.start])
    with pytest.raises(ValueError, match="needs as many filler tokens"):
        retrieval_pretraining.retrieval_example(digit_tokenizer, filler[:100], 320, rng)


def test_pretraining_windows_mix_in_the_given_fraction(digit_tokenizer):
    from hf_posenc.experiments.context_extension import base_model
    from hf_posenc.experiments.context_extension.config import RetrievalStageConfig

    stream = torch.tensor(digit_tokenizer("\n".join(TEXTS) * 12)["input_ids"])
    rng = random.Random(0)
    for start in range(0, 200, 20):  # the code-only stage: the stream itself, and no random draw
        window, answer = base_model._example(stream, start, 320, digit_tokenizer, rng)
        assert torch.equal(window, stream[start : start + 320]) and answer == slice(0, 0)
    assert rng.getstate() == random.Random(0).getstate()
    examples = [base_model._example(stream, 7, 320, digit_tokenizer, rng, RetrievalStageConfig(fraction=0.5))
                for _ in range(200)]
    synthetic = sum(answer.stop > answer.start for _, answer in examples)
    assert all(window.shape == (320,) for window, _ in examples) and 70 <= synthetic <= 130  # Binomial(200, 0.5)
    assert all(torch.equal(w, stream[7:327]) for w, a in examples if a.stop == a.start)
    everything = RetrievalStageConfig(fraction=1.0)
    assert all(base_model._example(stream, 7, 320, digit_tokenizer, rng, everything)[1].stop for _ in range(20))


def test_answer_weighted_loss_adds_the_answer_tokens_mean_loss():
    """Reference: transformers' own loss, once over every token and once with labels only on the answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_posenc.experiments.context_extension import base_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    batch = torch.randint(0, 50, (3, 12))
    answers = [slice(5, 9), slice(0, 0), slice(10, 12)]
    loss, answer = base_model._loss(model, batch, answers, answer_weight=0.5)
    labels = torch.full_like(batch, -100)
    labels[0, 5:9], labels[2, 10:12] = batch[0, 5:9], batch[2, 10:12]
    with torch.no_grad():
        every = model(input_ids=batch, labels=batch).loss.item()
        only_answers = model(input_ids=batch, labels=labels).loss.item()
    assert answer == pytest.approx(only_answers, rel=1e-5)
    assert loss.item() == pytest.approx(every + 0.5 * only_answers, rel=1e-5)
    unweighted, answer = base_model._loss(model, batch, answers, answer_weight=0.0)
    assert unweighted.item() == pytest.approx(every, rel=1e-5) and answer == pytest.approx(only_answers, rel=1e-5)
    code, none = base_model._loss(model, batch, [slice(0, 0)] * 3, answer_weight=0.5)
    assert none is None and code.item() == pytest.approx(every, rel=1e-6)


def test_retrieval_stage_is_validated_and_keeps_old_cache_keys():
    import json
    from pathlib import Path

    from hf_posenc.experiments.context_extension.base_model import base_model_dir
    from hf_posenc.experiments.context_extension.config import PretrainConfig, RetrievalStageConfig

    stage = PretrainConfig(retrieval=RetrievalStageConfig())
    assert base_model_dir(stage) != base_model_dir(PretrainConfig())
    for change in ({"answer_loss_weight": 1.0}, {"tasks": ["multi_key"]}, {"fraction": 0.25}, {"steps": 10}):
        changed = stage.retrieval.model_copy(update=change)
        assert base_model_dir(stage) != base_model_dir(stage.model_copy(update={"retrieval": changed}))
    for bad, message in (({"tasks": ["multi_needle"]}, "multi_needle"), ({"tasks": []}, "at least 1"),
                         ({"fraction": 0.0}, "greater than 0"), ({"steps": 0}, "greater than 0")):
        with pytest.raises(ValueError, match=message):
            RetrievalStageConfig(**bad)
    # Keys of bases built before the stage existed stay valid (users' caches hold them): the first base, built
    # from the default spec, is 06c41d191a05 in earlier commits' results and in recipes/README.md.
    assert base_model_dir(PretrainConfig()).name == "06c41d191a05"
    # The committed quick results name the code-only base their stage started from by its key.
    results = Path(__file__).resolve().parents[1] / "recipes" / "results" / "compare_quick" / "results.json"
    build = json.loads(results.read_text())["base_model_build"]
    code_only = PretrainConfig(**build["spec"]).model_copy(update={"retrieval": None})
    assert build["code_base"] == base_model_dir(code_only).name
