"""The architecture table itself: tested list, README table, refusals, what differs per architecture,
and save/reload plus LoRA on every row."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from test_persistence import run_python
from tiny_models import (
    CONFIGS,
    DECODERS,
    REFUSED_HERE,
    ROPE_ARCHS,
    TESTED,
    allowed_kinds,
    converted,
    input_ids,
    randomize_position_tables,
    stock_backend,
    tiny_config,
    tiny_model,
)

import hf_posenc
from hf_posenc import PosEncConfig, support
from hf_posenc.architectures import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
#: transformers 5.1's validate_rope reads original_max_position_embeddings from the outer dict of
#: per-layer-type parameters: stock YaRN on Gemma 3 / ModernBERT fails there (checked independently here).
_probe = tiny_config("gemma3_text")
_probe.rope_parameters = {t: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                              "original_max_position_embeddings": 128} for t in _probe.rope_parameters}
try:
    _probe.validate_rope()
    OLD_ROPE_VALIDATION = False
except KeyError:
    OLD_ROPE_VALIDATION = True


def test_rows_whose_attention_this_transformers_runs_itself_are_refused_in_one_line():
    """GPT-J and Falcon computed attention in per-backend classes of their own before transformers routed them
    through AttentionInterface (5.5 does, 5.25 does not): the plug-in's attention would never run, so conversion
    refuses there, and converts where the interface is called."""
    for arch in ("gptj", "falcon"):
        if arch in REFUSED_HERE:
            with pytest.raises(ValueError, match=r"computes attention in its own per-backend classes, not through "
                                                 r"AttentionInterface.*allowed: a transformers release"):
                hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="alibi"))
        else:
            hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="alibi"))


def test_every_row_is_tested_and_every_tested_config_is_a_row():
    from tiny_vision_models import VISION_CONFIGS, vision_config

    assert sorted(ARCHITECTURES) == sorted(TESTED + REFUSED_HERE + list(VISION_CONFIGS)), \
        "tests/tiny_models.py CONFIGS + tests/tiny_vision_models.py VISION_CONFIGS and ARCHITECTURES drifted apart"
    assert not set(TESTED) & set(VISION_CONFIGS)
    assert all(bool(ARCHITECTURES[arch].patch_grid) == (arch in VISION_CONFIGS) for arch in ARCHITECTURES)
    for arch in TESTED:
        assert tiny_config(arch).model_type == arch
    for arch in VISION_CONFIGS:
        assert vision_config(arch).model_type == arch
    assert len(ARCHITECTURES) >= 24


def test_readme_table_is_generated_from_the_rows():
    readme = (ROOT / "README.md").read_text()
    assert support.replace_section(readme) == readme, "README is stale: run python -m hf_posenc.support README.md"
    section = readme.split(support.BEGIN)[1].split(support.END)[0]
    assert section.count("\n| ") == len(ARCHITECTURES) + 1  # header + one line per row


def test_table_columns_are_extensible():
    table = support.support_table([*support.COLUMNS, ("heads", lambda row: row.model_type.upper())])
    assert table.splitlines()[0].endswith("| heads |") and "| LLAMA |" in table


# ----------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [a for a in TESTED if a not in DECODERS])
def test_cope_on_encoders_is_refused(arch):
    with pytest.raises(ValueError, match="CoPE is causal-only"):
        hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="cope"))


def test_sdpa_on_gemma2_is_refused_or_soft_caps():
    """transformers 5.2+ marks Gemma 2 as without sdpa (no softcap there): refused, naming the fix. 5.1
    allows it: then our sdpa function must still cap the logits, exactly like our eager one."""
    if not type(tiny_model("gemma2"))._supports_sdpa:
        with pytest.raises(ValueError, match="does not support attn_implementation='sdpa'.*use 'eager'"):
            hf_posenc.convert(tiny_model("gemma2"), PosEncConfig(kind="alibi"), attn_implementation="sdpa")
        return
    x = input_ids()
    eager = hf_posenc.convert(tiny_model("gemma2"), PosEncConfig(kind="alibi"), attn_implementation="eager")
    sdpa = hf_posenc.convert(tiny_model("gemma2"), PosEncConfig(kind="alibi"), attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x).logits, eager(x).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# What differs per architecture
# ----------------------------------------------------------------------------------------------------
def _nope_reference(model):
    with torch.no_grad():
        for name, buffer in model.base_model.rotary_emb.named_buffers():
            if name.endswith("inv_freq"):
                buffer.zero_()
    return model


def test_gemma2_soft_capping_matters_and_is_applied():
    """A zero T5 bias on Gemma 2 equals stock eager NoPE with its cap (test_noop_encodings_equal_stock_nope)
    and not the uncapped model: the cap changes this tiny model's outputs."""
    x = input_ids()
    model = hf_posenc.convert(tiny_model("gemma2"), PosEncConfig(kind="t5_bias"))
    reference = _nope_reference(tiny_model("gemma2"))
    with torch.no_grad():
        got = model(x).logits
        expected = reference(x).logits
        for layer in reference.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = reference(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (expected - uncapped).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["nope", "rope", "alibi", "t5_bias"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_softcap_in_our_attention_functions_caps_the_logits(backend, kind):
    """Our sdpa function takes the explicit-logits path for a softcap (stock sdpa raises): both backends equal
    a hand-written capped attention, with the position bias added after the cap."""
    from hf_posenc import attention
    from hf_posenc.plugin import make_position_module

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    if kind != "nope":
        model = tiny_model("llama")
        module.posenc = make_position_module(PosEncConfig(kind=kind), model.config, ARCHITECTURES["llama"])
        randomize_position_tables(module)
    q, k, v = (torch.randn(1, 4, 6, 8) * 3 for _ in range(3))
    function = attention.posenc_sdpa_attention if backend == "sdpa" else attention.posenc_eager_attention
    out, _ = function(module, q, k, v, None, scaling=0.5, softcap=1.5)
    pos = torch.arange(6)
    posenc = getattr(module, "posenc", None)
    rq, rk = posenc.rotate(q, k, pos, pos) if kind == "rope" else (q, k)
    scores = torch.tanh(rq @ rk.transpose(-1, -2) * 0.5 / 1.5) * 1.5
    if posenc is not None and posenc.registry_entry().capabilities.route == "bias":
        scores = scores + posenc.bias(pos, pos, True)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    uncapped, _ = function(module, q, k, v, None, scaling=0.5)
    assert (uncapped - out).abs().max() > 1e-2


def test_gemma3_layer_types_keep_their_own_bases():
    """A plug-in RoPE (interleaved layout) rotates the sliding layers with the local base and the global
    ones with the global base; identity back to native gives the stock parameters exactly."""
    model = hf_posenc.convert(tiny_model("gemma3_text"), PosEncConfig(kind="rope", layout="interleaved"))
    attn = [layer.self_attn for layer in model.model.layers]
    stock = tiny_config("gemma3_text").rope_parameters
    assert attn[0].posenc.rope_parameters["rope_theta"] == stock["sliding_attention"]["rope_theta"]
    assert attn[1].posenc.rope_parameters["rope_theta"] == stock["full_attention"]["rope_theta"]
    assert stock["sliding_attention"]["rope_theta"] != stock["full_attention"]["rope_theta"]


@pytest.mark.parametrize("arch", ["smollm3", "cohere2"])
def test_native_nope_layers_stay_nope_under_plug_in_rope(arch):
    # The layout the architecture does not have natively: the plug-in route, on every layer it rotates.
    other = "half" if ARCHITECTURES[arch].rope_layout == "interleaved" else "interleaved"
    model = hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="rope", layout=other))
    nope = ARCHITECTURES[arch].native_nope_layers(model.config)
    assert nope and all(hasattr(layer.self_attn, "posenc") != (i in nope) for i, layer in enumerate(model.model.layers))


def test_moe_routing_is_untouched():
    """The router sees the same hidden states it would see in the stock NoPE model: same expert choice."""
    stock = _nope_reference(tiny_model("mixtral"))
    model = hf_posenc.convert(tiny_model("mixtral"), PosEncConfig(kind="nope"))
    x = input_ids()
    with torch.no_grad():
        got = model(x, output_router_logits=True).router_logits
        expected = stock(x, output_router_logits=True).router_logits
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_olmo2_whole_projection_norms_follow_the_layout():
    model = hf_posenc.convert(tiny_model("olmo2"), PosEncConfig(kind="rope"))
    before = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight.copy_(torch.randn_like(before))
        before = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    hf_posenc.rope_layout(model, "interleaved")
    after = model.model.layers[0].self_attn.q_norm.weight
    assert after.shape == (32,) and not torch.equal(after, before)
    perm = hf_posenc.layout.layout_permutation(8, 8, "half", "interleaved")
    assert torch.equal(after.view(4, 8), before.view(4, 8)[:, perm])


# ----------------------------------------------------------------------------------------------------
# Save -> fresh process reload and LoRA, on every row
# ----------------------------------------------------------------------------------------------------
def persisted_kind(arch: str) -> str:
    """One plug-in encoding per row (rotating, so that every kind is saved on several architectures)."""
    kinds = [k for k in ("t5_bias", "cope", "alibi", "nope") if k in allowed_kinds(arch)]
    return kinds[TESTED.index(arch) % len(kinds)]


CASES = [(arch, persisted_kind(arch)) for arch in TESTED] + [(arch, "yarn") for arch in ROPE_ARCHS]
#: Classes without stock sdpa (Gemma 2) also save a bias kind: transformers' default backend differs for them.
CASES += [(arch, kind) for arch in TESTED if stock_backend(arch, "sdpa") == "eager"
          for kind in ("alibi", "t5_bias") if (arch, kind) not in CASES]
LOAD_ALL = """
import json, sys, torch
{prelude}
from transformers import AutoModel, AutoModelForCausalLM
results = {{}}
for path, decoder in json.loads(sys.argv[1]):
    auto = AutoModelForCausalLM if decoder else AutoModel
    try:
        model = auto.from_pretrained(path{extra}).eval()
    except Exception as error:  # one row's failure is reported by its own test, not by every row's
        results[path] = {{"class": "FAILED: " + repr(error), "attn": None}}
        continue
    with torch.no_grad():
        torch.save(model(torch.load(path + "/inputs.pt"))[0], path + "/out.pt")
    results[path] = {{"class": type(model).__name__, "attn": model.config._attn_implementation}}
print("RESULTS", json.dumps(results))
"""


#: How a fresh process loads: with the import or through the checkpoint's remote code (eager, so outputs are
#: bitwise), and with no attn_implementation at all, as a user would (transformers' default: sdpa where the class
#: supports it, eager where it does not, as for Gemma 2).
ROUTES = (("import", "import hf_posenc", ', attn_implementation="eager"'),
          ("remote_code", "", ', attn_implementation="eager", trust_remote_code=True'),
          ("default", "import hf_posenc", ""))


@pytest.fixture(scope="module")
def saved_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    out = {}
    x = input_ids()
    for arch, kind in CASES:
        params = dict(kind="rope", rope_type="yarn", factor=2.0) if kind == "yarn" else dict(kind=kind)
        model = hf_posenc.convert(tiny_model(arch), PosEncConfig(**params))
        randomize_position_tables(model)
        path = root / f"{arch}-{kind}"
        model.save_pretrained(path)
        torch.save(x, path / "inputs.pt")
        with torch.no_grad():
            out[(arch, kind)] = (str(path), model(x)[0], model)
    return out


@pytest.fixture(scope="module")
def reloaded(saved_rows):
    """One fresh process per route loads every saved row (a process per checkpoint would cost minutes)."""
    runs = {}
    paths = json.dumps([(path, arch in DECODERS) for (arch, _), (path, *_) in saved_rows.items()])
    for route, prelude, extra in ROUTES:
        code = LOAD_ALL.format(prelude=prelude, extra=extra)
        result = run_python(f"import sys; sys.argv[1:] = [{paths!r}]\n" + code)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[route] = json.loads(result.stdout.split("RESULTS ", 1)[1])
        for path, *_ in saved_rows.values():  # keep each route's outputs
            if Path(path, "out.pt").exists():
                Path(path, "out.pt").rename(Path(path, f"out-{route}.pt"))
    return runs


@pytest.mark.parametrize("route", [route for route, _, _ in ROUTES])
@pytest.mark.parametrize("arch,kind", CASES)
def test_every_row_reloads_in_a_fresh_process(saved_rows, reloaded, arch, kind, route):
    path, expected, model = saved_rows[(arch, kind)]
    reloaded_class, reloaded_backend = reloaded[route][path]["class"], reloaded[route][path]["attn"]
    assert not reloaded_class.startswith("FAILED"), reloaded_class
    reloaded_out = torch.load(Path(path, f"out-{route}.pt"))
    if route == "default":
        # The kernel transformers picks for the class (sdpa where it takes it) against the saving model on that
        # kernel, equal to rounding to the eager output where the kernel is exact. Stock Gemma 2 on transformers
        # < 5.25 picks sdpa, which drops its attention soft-cap: a YaRN row saved as a stock Gemma 2 checkpoint
        # then reloads as stock gives it, and the saving model on sdpa is the reference.
        with torch.no_grad():
            model.set_attn_implementation(reloaded_backend)
            on_that_kernel = model(torch.load(Path(path, "inputs.pt")))[0]
            model.set_attn_implementation("eager")
        torch.testing.assert_close(reloaded_out, on_that_kernel, rtol=1e-5, atol=1e-5)
        if reloaded_backend == "eager" or not getattr(model.config, "attn_logit_softcapping", None):
            torch.testing.assert_close(reloaded_out, expected, rtol=1e-5, atol=1e-5)
    elif arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        # Open: since the encoding registry, the MoE rows' fresh-process outputs differ from the in-process
        # ones by ~1e-7 (not bit for bit; another kernel path, not other weights: a wrong weight moves
        # them by O(1)). Every other row stays exact.
        torch.testing.assert_close(reloaded_out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(reloaded_out, expected)
    config = json.loads(Path(path, "config.json").read_text())
    # Native YaRN saves a stock checkpoint, except where the stock config cannot take it: Phi-3 accepts
    # longrope only, GPT-J's RoPE is fixed in its code, and transformers 5.1 cannot validate YaRN on per-layer-type
    # RoPE (Gemma 3, ModernBERT). NoPE is stock where the config switches RoPE off per layer (SmolLM3).
    stock_yarn = kind == "yarn" and arch not in ("phi3", "gptj") and not (
        arch in ("gemma3_text", "modernbert") and OLD_ROPE_VALIDATION)
    if stock_yarn or (kind == "nope" and ARCHITECTURES[arch].rope_switch is not None):
        assert config["model_type"] == arch and "auto_map" not in config
        assert not reloaded_class.startswith("HfPosenc")
    else:
        assert config["model_type"] == f"hf_posenc_{arch}" and reloaded_class.startswith("HfPosenc")


def _loss(model, batch, decoder):
    """Language-model loss for decoders; for encoders (whose normalised outputs have a constant norm) the
    distance to a fixed random target."""
    if decoder:
        return model(input_ids=batch, labels=batch).loss
    out = model(input_ids=batch)[0]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return (out - target).pow(2).mean()


@pytest.mark.parametrize("arch", TESTED)
def test_lora_on_every_row(tmp_path, arch):
    """Default LoRA targets exist on every row, train together with the T5 tables, and the adapter
    reloads onto a fresh converted base exactly."""
    decoder = arch in DECODERS
    base = converted(arch, "t5_bias")
    config = hf_posenc.lora_config(base, r=2, alpha=4)
    model = get_peft_model(base, config)
    layers = CONFIGS[arch]().num_hidden_layers
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    for target in config.target_modules:  # every default target exists in every layer
        assert sum(n.endswith("." + target) for n in adapted) >= layers, (target, adapted)
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if "posenc" in n and p.requires_grad}
    assert tables
    batch = input_ids(2, 8, seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # Trained in eval mode: the encoders' hidden dropout would make a 5-step loss curve noise.
    losses = []
    for _ in range(5):
        loss = _loss(model, batch, decoder)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in tables.items())
    x = input_ids(2, 10, seed=5)
    with torch.no_grad():
        expected = model(x)[0]
    model.save_pretrained(tmp_path / "adapter")
    reloaded = hf_posenc.load_adapter(converted(arch, "t5_bias"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], expected)
        torch.testing.assert_close(reloaded.merge_and_unload()(x)[0], expected, rtol=1e-4, atol=1e-5)


def test_hub_accepts_a_native_checkpoint_in_its_own_layout_only(tmp_path):
    """Identity on Cohere records layout="interleaved" on a stock checkpoint: loadable by stock
    transformers, so pushable; the same encoding on Llama would load without the layout: refused.
    The conversion records that it is native; a checkpoint saved before that record gets the same answers."""
    from hf_posenc import hub

    cohere = hf_posenc.convert(tiny_model("cohere"), PosEncConfig(kind="rope"))
    cohere.save_pretrained(tmp_path / "cohere")
    config = json.loads((tmp_path / "cohere" / "config.json").read_text())
    assert config["model_type"] == "cohere" and config["posenc"]["layout"] == "interleaved"
    assert config["posenc_native"] is True and hub._check_loadable(config, tmp_path / "cohere") is True
    del config["posenc_native"]
    assert hub._check_loadable(config, tmp_path / "cohere") is True
    config["model_type"] = "llama"
    with pytest.raises(hub.NotLoadableError, match="WITHOUT that encoding"):
        hub._check_loadable(config, tmp_path / "cohere")
