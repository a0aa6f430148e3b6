"""Adding a kind touches one module: a toy encoding written into a temporary folder joins the whole matrix.

The toy module below is everything a contributor writes besides its reference test (``CONTRIBUTING.md``):
its position module, its config and one ``registry.register`` call whose ``Example`` tells the shared tests
what to expect. Imported from ``tmp_path``, with no other file edited, it must appear in every list the
per-kind tests derive from the registry, and the shared tests must pass on it: conversion, cache against
no cache, padding, both backends, the stock attention names, and save -> reload.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import test_core_models
import test_persistence
import test_registry
import test_stock_backends
import tiny_models
import torch
from tiny_models import input_ids, randomize_position_tables

from hf_posenc import registry

KIND = "toy_distance_bias"
MODULE = "toy_distance_bias_encoding"
#: A learned per-head slope times ``|i - j|``, given as a dense bias (the simplest kind with a table).
SOURCE = textwrap.dedent('''
    """A toy encoding for tests: a learned per-head bias ``-slope_h * |i - j|``, zero at the start."""

    from __future__ import annotations

    from dataclasses import dataclass

    import torch
    from torch import nn

    from hf_posenc import registry
    from hf_posenc.config import PosEncConfig
    from hf_posenc.encodings.base import PositionModule


    class ToyDistanceBias(PositionModule):
        def __init__(self, num_heads: int):
            super().__init__()
            self.slope = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))  # [H]

        def reset_parameters(self) -> None:
            with torch.no_grad():
                self.slope.zero_()

        def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
            distance = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)  # [q, kv]
            return (-self.slope.float()[:, None, None] * distance)[None]  # [1, H, q, kv]


    @dataclass(frozen=True)
    class ToyDistanceBiasConfig(PosEncConfig):
        kind: str = "toy_distance_bias"
        layers: tuple[int, ...] | None = None


    registry.register(registry.Encoding(
        kind="toy_distance_bias",
        config_class=ToyDistanceBiasConfig,
        module_class=ToyDistanceBias,
        build=lambda config, layer: ToyDistanceBias(layer.num_heads),
        capabilities=registry.Capabilities(route="bias", bias_form="dense", tables=("slope",), kernels=("dense",)),
        display_name="Toy distance bias",
        paper="https://arxiv.org/abs/2108.12409",
        backends=registry.OWN_BACKENDS,
        example=registry.Example(prefill_kernels=("sdpa", "sdpa"), archs=("llama", "gpt2")),
    ))
''')


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    """The toy module imported from ``tmp_path`` (its ``register`` call runs); unregistered afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert KIND not in registry.kinds()
    try:
        yield importlib.import_module(MODULE)
    finally:
        if KIND in registry.kinds():
            registry.unregister(KIND)
        sys.modules.pop(MODULE, None)


def test_a_toy_kind_in_a_temporary_module_joins_the_derived_lists(toy_kind):
    assert KIND in registry.kinds() and registry.get(KIND).module_class is toy_kind.ToyDistanceBias
    assert KIND in tiny_models.token_kinds()
    for predicate in (lambda c: c.route is not None, lambda c: c.route == "bias", lambda c: bool(c.tables)):
        assert KIND in tiny_models.kinds_where(predicate)
    assert KIND in tiny_models.allowed_kinds("llama") and KIND in tiny_models.allowed_kinds("bert")
    assert {(KIND, "llama"), (KIND, "gpt2")} <= set(test_persistence.cases())
    assert test_registry.expected_prefill_kernels()[KIND] == ("sdpa", "sdpa")


def test_the_shared_tests_pass_on_a_toy_kind(toy_kind):
    test_registry.test_entry_is_consistent(KIND)
    test_registry.test_built_module_has_the_declared_tables(KIND)
    test_registry.test_prefill_kernels()
    test_core_models.test_noop_encodings_equal_stock_nope("llama", KIND)
    for backend in ("eager", "sdpa"):
        test_core_models.test_generate_cache_invariants("llama", KIND, backend)
        test_core_models.test_left_padded_batch_matches_rows_alone("bert", KIND, backend)
    test_core_models.test_eager_and_sdpa_agree(KIND)
    test_stock_backends.test_stock_names_map_to_ours(KIND)


def test_a_toy_kind_saves_and_reloads(toy_kind, tmp_path):
    """Save -> reload in this process (a fresh process would not import the temporary module)."""
    from transformers import AutoModelForCausalLM

    model = tiny_models.converted("llama", KIND, "sdpa")
    randomize_position_tables(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sdpa").eval()
    x = input_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
        assert not torch.allclose(model(x).logits, tiny_models.converted("llama", "nope", "sdpa")(x).logits)
    assert reloaded.config.posenc["kind"] == KIND


def test_unregister_removes_the_toy_kind_and_refuses_unknown_ones(toy_kind):
    entry = registry.unregister(KIND)
    assert entry.kind == KIND and KIND not in registry.kinds() and KIND not in tiny_models.token_kinds()
    with pytest.raises(TypeError, match="not the module of a registered encoding"):
        registry.entry_of(toy_kind.ToyDistanceBias(2))
    with pytest.raises(ValueError, match="Unknown positional encoding kind"):
        registry.unregister(KIND)
