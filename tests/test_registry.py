"""The registry: one consistent entry per kind, read by conversion, the kernels, the card and the CLI.

The mutation tests rename a declared capability, or the method it names, and check that a test fails
(or the code raises) instead of an encoding silently moving to another kernel.
"""

import dataclasses
import re

import pytest
import torch
from tiny_models import KINDS, tiny_model

import hf_posenc
from hf_posenc import PosEncConfig, attention, cards, kernels, registry
from hf_posenc.architectures import ARCHITECTURES, Refusal
from hf_posenc.encodings import AlibiBias, T5Bias
from hf_posenc.plugin import make_position_module

DTYPES = (torch.float32, torch.bfloat16)


def prefill_kernels() -> dict[str, tuple[str, str]]:
    calls = [kernels.Call(device="cpu", dtype=dtype, backend="sdpa", queries=16) for dtype in DTYPES]
    return {entry.kind: tuple(kernels.select(entry.capabilities, c) for c in calls) for entry in registry.entries()}


def test_kinds_come_from_the_registry():
    from tiny_vision_models import GRID_KINDS

    assert hf_posenc.KINDS == registry.kinds()
    assert sorted(KINDS + GRID_KINDS) == sorted(registry.kinds())  # each kind in one matrix: tokens or patch grids


@pytest.mark.parametrize("kind", registry.kinds())
def test_entry_is_consistent(kind):
    entry = registry.get(kind)
    registry.check_entry(entry)
    assert type(PosEncConfig(kind=kind)) is entry.config_class
    # ReRoPE was published as a blog post (Su 2023); every other kind has an arXiv paper.
    assert entry.paper.startswith("https://kexue.fm/" if kind == "rerope" else "https://arxiv.org/abs/")
    assert entry.display_name and cards.describe_encoding({"kind": kind}) == entry.display_name


@pytest.mark.parametrize("kind", KINDS)
def test_built_module_has_the_declared_tables(kind):
    """The module conversion builds is the entry's class, its parameters are exactly the declared tables,
    and it resolves back to its entry."""
    model = tiny_model("llama")
    module = make_position_module(PosEncConfig(kind=kind), model.config, ARCHITECTURES["llama"])
    entry = registry.get(kind)
    if entry.module_class is None:
        assert module is None
        return
    assert type(module) is entry.module_class and registry.entry_of(module) is entry
    assert sorted(n for n, _ in module.named_parameters()) == sorted(entry.capabilities.tables)


def expected_prefill_kernels() -> dict[str, tuple[str, str]]:
    """The kernel each kind's CPU sdpa prefill must take in fp32 and bf16, as its entry declares it
    (``Example.prefill_kernels``, written down from the design): a renamed or dropped capability changes
    what :func:`prefill_kernels` selects and fails against it."""
    return {e.kind: e.example.prefill_kernels for e in registry.entries() if e.example.prefill_kernels is not None}


def test_prefill_kernels():
    expected = expected_prefill_kernels()
    assert set(expected) == set(registry.kinds())  # every kind declares its kernel
    assert {k: v for k, v in prefill_kernels().items() if k in expected} == expected


def test_unknown_kind_names_the_registered_ones():
    assert {"alibi", "rope", "t5_bias"} <= set(registry.kinds())
    with pytest.raises(ValueError, match=rf"kind='alibl'; allowed: {re.escape(str(sorted(registry.kinds())))}\.$"):
        registry.get("alibl")
    with pytest.raises(ValueError, match="allowed:"):
        PosEncConfig(kind="alibl")


def test_cli_choices_are_the_kinds(capsys):
    from hf_posenc import cli

    with pytest.raises(SystemExit):
        cli.main(["convert", "x", "--posenc", "alibl", "--out", "y"])
    error = capsys.readouterr().err
    assert all(repr(kind) in error for kind in KINDS)


def test_a_second_registration_of_a_kind_is_refused():
    entry = registry.get("alibi")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(entry, display_name="ALiBi again"))


# ---------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------
def _mutate(monkeypatch, kind: str, **capabilities) -> None:
    entry = registry.get(kind)
    mutated = dataclasses.replace(entry, capabilities=dataclasses.replace(entry.capabilities, **capabilities))
    monkeypatch.setitem(registry._REGISTRY, kind, mutated)
    if entry.module_class is not None:
        monkeypatch.setitem(registry._BY_MODULE, entry.module_class, mutated)


@pytest.mark.parametrize(
    "kind, capabilities",
    [
        ("alibi", {"kernels": ("dense", "diagonal_tiles")}),  # the fold dropped
        ("alibi", {"bias_form": "dense"}),  # the per-diagonal form dropped
        ("t5_bias", {"bias_form": "dense"}),
        ("t5_bias", {"kernels": ("dense",)}),
    ],
)
def test_a_dropped_capability_fails_the_kernel_table(monkeypatch, kind, capabilities):
    """Declaring less moves the kind to a slower kernel: the expected-kernel table catches it."""
    _mutate(monkeypatch, kind, **capabilities)
    with pytest.raises(AssertionError):
        test_prefill_kernels()


@pytest.mark.parametrize("kind, capabilities", [("alibi", {"kernels": ("dense", "diagonal_tiles", "fold")}),
                                                 ("t5_bias", {"bias_form": "band"}),
                                                 ("cope", {"route": "attention"}),
                                                 # CoPE's Triton family is for the attend route, and only it is
                                                 ("alibi", {"kernels": ("dense", "key_fold", "cope_triton")}),
                                                 ("cope", {"kernels": ("cope_triton", "dense")})])
def test_a_renamed_capability_is_an_inconsistent_entry(monkeypatch, kind, capabilities):
    _mutate(monkeypatch, kind, **capabilities)
    with pytest.raises(ValueError, match="invalid"):
        test_entry_is_consistent(kind)


@pytest.mark.parametrize("kind, method", [("alibi", "slopes"), ("alibi", "bias_diagonals"),
                                           ("t5_bias", "banded_diagonals")])
def test_a_renamed_method_fails_loudly(monkeypatch, kind, method):
    """The method a capability names renamed on the module: the entry check fails, and the attention call
    that needs it raises instead of falling back to another kernel."""
    module_class = registry.get(kind).module_class
    monkeypatch.delattr(module_class, method)
    with pytest.raises(ValueError, match=method):
        test_entry_is_consistent(kind)
    posenc = AlibiBias(4) if kind == "alibi" else T5Bias(4)
    layer = torch.nn.Module()
    layer.is_causal, layer.posenc = True, posenc
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    with pytest.raises(AttributeError, match=method):
        for dtype in DTYPES:  # the fp32 fold and the bf16 tiles call different methods
            attention.posenc_sdpa_attention(layer.eval(), q.to(dtype), k.to(dtype), v.to(dtype), None)


def test_a_renamed_table_fails_at_conversion(monkeypatch):
    _mutate(monkeypatch, "t5_bias", tables=("bias_table",))
    with pytest.raises(TypeError, match="relative_attention_bias"):
        hf_posenc.convert(tiny_model("llama"), PosEncConfig(kind="t5_bias"))


def test_the_contributing_example_is_the_real_kerple_module():
    """CONTRIBUTING.md's new-kind example is ``hf_posenc/encodings/kerple.py`` as it stands (it cannot drift),
    and that kind converts a model, a fresh layer is a no-op, its per-diagonal tiles equal the explicit eager
    bias, and its tables train."""
    from pathlib import Path

    from tiny_models import input_ids

    root = Path(__file__).resolve().parent.parent
    section = (root / "CONTRIBUTING.md").read_text()
    section = section[section.index("## Adding an encoding"):]
    code = re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M).group(1)
    assert code == (root / "hf_posenc" / "encodings" / "kerple.py").read_text()
    model = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind="kerple"))
    nope = hf_posenc.convert(tiny_model("llama", "sdpa"), PosEncConfig(kind="nope"))
    x = input_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, nope(x).logits, rtol=0, atol=1e-6)
        for layer in model.model.layers:
            layer.self_attn.posenc.r1.fill_(0.5)
        tiled = model(x).logits
        model.set_attn_implementation("hf_posenc_eager")
        torch.testing.assert_close(model(x).logits, tiled, rtol=1e-5, atol=1e-5)
        assert (tiled - nope(x).logits).abs().max() > 1e-2
    model.train()
    model(x, labels=x).loss.backward()
    posenc = model.model.layers[0].self_attn.posenc
    assert posenc.r1.grad.abs().sum() > 0 and posenc.r2.grad.abs().sum() > 0


def test_refusals_by_capability_cover_every_kind_that_declares_it(monkeypatch):
    """A refusal may name a capability, not a list of kinds: declaring ``needs_logits`` is enough to be refused
    by such a rule (a row written for the test: no shipped row refuses by capability since CoPE soft-caps), and
    the kinds without it are not."""
    row = dataclasses.replace(ARCHITECTURES["gemma2"], refusals=(
        Refusal((), "attn_logit_softcapping", "test rule", capability="needs_logits"),))
    config = tiny_model("gemma2").config
    refused = {kind for kind in KINDS if row.refusal(kind, config) is not None}
    assert refused == {e.kind for e in registry.entries() if e.capabilities.needs_logits} == {"cope"}
    _mutate(monkeypatch, "cope", needs_logits=False)
    assert row.refusal("cope", config) is None
