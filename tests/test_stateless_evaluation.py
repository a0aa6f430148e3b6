"""The comparison's metrics see a model whose outputs depend only on its input.

transformers' dynamic NTK keeps enlarged frequencies after a long forward (it resets only below the original
length, not at it), so a passkey measured at L after the 8L perplexity windows scored the enlarged model: the
quick table once read "dynamic NTK retrieves 0.00 at L" where the base retrieves 1.00. The plug-in's own dynamic
RoPE is stateless; the evaluation also resets stock rotary state before every forward, for checkpoints that ask
for stock behaviour (``native=True``).
"""

from __future__ import annotations

import torch
from tiny_models import tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, _hf
from hf_posenc.experiments.context_extension.evaluation import greedy_continuation, token_nll
from hf_posenc.experiments.context_extension.ruler import greedy_batch

#: transformers releases before 5.25 (the CI lower bound is 5.5) differ in the stateful rotary module and in the
#: generation loop this relies on; exactness there is not verified yet (issue 21 follow-up), so these are expected
#: failures on them, never silent passes.


class _Tokenizer:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids.tolist()))

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.decode(row) for row in ids]


def _stock_dynamic():
    model = tiny_model("llama", "sdpa")
    hf_posenc.convert(model, PosEncConfig(kind="rope", rope_type="dynamic", factor=4.0, native=True))
    assert type(model).__name__ == "LlamaForCausalLM"  # the stock checkpoint, with stock (stateful) behaviour
    return model


def test_every_metric_after_a_long_forward_equals_a_fresh_model():
    length = _stock_dynamic().config.max_position_embeddings
    ids = torch.randint(1, 100, (1, 8 * length), generator=torch.Generator().manual_seed(0))
    short = ids[:, :length]

    fresh = _stock_dynamic()
    expected_nll = token_nll(fresh, short)
    expected_text = greedy_continuation(_stock_dynamic(), _Tokenizer(), short[0], 4)
    expected_batch = greedy_batch(_stock_dynamic(), _Tokenizer(), short.repeat(2, 1), 4)

    used = _stock_dynamic()
    token_nll(used, ids)  # an 8L perplexity window first, as the comparison does
    torch.testing.assert_close(token_nll(used, short), expected_nll, rtol=0, atol=0)
    token_nll(used, ids)
    assert greedy_continuation(used, _Tokenizer(), short[0], 4) == expected_text
    token_nll(used, ids)
    assert greedy_batch(used, _Tokenizer(), short.repeat(2, 1), 4) == expected_batch


def test_the_stock_state_the_evaluation_resets_is_real():
    """Guards the test above: without the reset, stock dynamic NTK scores L differently after an 8L forward."""
    model = _stock_dynamic()
    length = model.config.max_position_embeddings
    ids = torch.randint(1, 100, (1, 8 * length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids[:, :length]).logits
        model(ids)
        after = model(ids[:, :length]).logits
        assert (after - before).abs().max() > 1e-5  # the enlarged scale (bitwise: 0 without state)
        assert _hf.reset_rope_state(model) == 1
        torch.testing.assert_close(model(ids[:, :length]).logits, before, rtol=0, atol=0)
