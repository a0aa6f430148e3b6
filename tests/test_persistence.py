"""Save -> fresh-process load, through both routes, for every encoding; refusal without the plug-in."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import example_params, input_ids, randomize_position_tables, tiny_model, token_kinds

import hf_posenc
from hf_posenc import PosEncConfig, registry

TESTS_DIR = os.path.dirname(__file__)
#: RoPE through the stock route too: a native setting must save as a stock checkpoint.
NATIVE = ("rope-native", {"kind": "rope", "rope_type": "yarn", "factor": 2.0}, "llama")


def cases() -> list[tuple[str, str]]:
    """``(name, arch)``: every token kind's example on each of its entry's ``archs``, and native RoPE."""
    return [(kind, arch) for kind in token_kinds() for arch in registry.get(kind).example.archs] + [NATIVE[::2]]


def params_of(name: str) -> dict:
    """The ``PosEncConfig`` keywords of a case."""
    return NATIVE[1] if name == NATIVE[0] else example_params(name)


CASES = cases()


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=TESTS_DIR, timeout=300)


LOAD = textwrap.dedent("""
    import sys, torch
    {prelude}
    from transformers import AutoModel, AutoModelForCausalLM
    auto = AutoModel if {is_bert} else AutoModelForCausalLM
    model = auto.from_pretrained({path!r}, attn_implementation="sdpa"{extra}).eval()
    with torch.no_grad():
        out = model(torch.load({inputs!r}))[0]
    torch.save(out, {out!r})
    print("CLASS", type(model).__name__, "IMPORTED", "hf_posenc" in sys.modules)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per case, with its reference output."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    x = input_ids()
    torch.save(x, root / "inputs.pt")
    for name, arch in CASES:
        model = hf_posenc.convert(tiny_model(arch, "sdpa"), PosEncConfig(**params_of(name)))
        randomize_position_tables(model)
        path = root / f"{name}-{arch}"
        model.save_pretrained(path)
        with torch.no_grad():
            out[(name, arch)] = (path, model(x)[0])
    return root, out


@pytest.mark.parametrize("route", ["import", "remote_code"])
@pytest.mark.parametrize("name,arch", CASES)
def test_fresh_process_load_gives_identical_logits(saved, name, arch, route):
    root, out = saved
    path, expected = out[(name, arch)]
    native = name == NATIVE[0]
    prelude = "import hf_posenc" if route == "import" else ""
    extra = ", trust_remote_code=True" if route == "remote_code" else ""
    result = run_python(LOAD.format(prelude=prelude, is_bert=arch == "bert", path=str(path), extra=extra,
                                    inputs=str(root / "inputs.pt"), out=str(path / "out.pt")))
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(path / "out.pt")
    assert torch.equal(got, expected)
    config = json.loads((path / "config.json").read_text())
    if native:
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["rope_theta"] == 10000.0
    else:
        assert config["model_type"] == f"hf_posenc_{arch}" and config["posenc"]["kind"] == params_of(name)["kind"]
        assert "CLASS HfPosenc" in result.stdout
    if route == "remote_code":
        # The user did not import hf_posenc: the checkpoint's own code did (native RoPE needs none).
        assert f"IMPORTED {not native}" in result.stdout


def test_native_rope_checkpoint_loads_in_stock_transformers(saved):
    root, out = saved
    path, expected = out[NATIVE[::2]]
    result = run_python(LOAD.format(prelude="", is_bert=False, path=str(path), extra="",
                                    inputs=str(root / "inputs.pt"), out=str(path / "stock.pt")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED False" in result.stdout
    assert torch.equal(torch.load(path / "stock.pt"), expected)


@pytest.mark.parametrize("kind", ["nope", "alibi", "t5_bias", "cope"])
def test_loading_without_plugin_fails_and_says_to_install(saved, kind):
    root, out = saved
    arch = registry.get(kind).example.archs[0]
    path, _ = out[(kind, arch)]
    # hf_posenc made unimportable in the child, exactly as on a machine where it is not installed.
    block = (
        "class _NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'hf_posenc':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NotInstalled())"
    )
    result = run_python(LOAD.format(prelude=block, is_bert=arch == "bert", path=str(path),
                                    extra=", trust_remote_code=True", inputs=str(root / "inputs.pt"),
                                    out=str(path / "x.pt")))
    assert result.returncode != 0
    assert "hf_posenc" in result.stderr and "pip install hf_posenc" in result.stderr
    # Without trust_remote_code stock transformers refuses too (never a silent plain model).
    result = run_python(LOAD.format(prelude=block, is_bert=arch == "bert", path=str(path), extra="",
                                    inputs=str(root / "inputs.pt"), out=str(path / "x.pt")))
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


def test_patch_config_loads_base_weights_and_initialises_new_tables(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    patched = hf_posenc.patch_config(base.config, PosEncConfig(kind="cope", npos_max=8))
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", config=patched, output_loading_info=True)
    assert sorted(info["missing_keys"]) == [f"model.layers.{i}.self_attn.posenc.pos_emb" for i in range(2)]
    for layer in model.model.layers:
        assert torch.equal(layer.self_attn.posenc.pos_emb, torch.zeros(8, 8))  # zero init: a no-op
    loaded = dict(model.named_parameters())
    for name, param in base.named_parameters():
        assert torch.equal(param, loaded[name]), name
    assert not hasattr(base.config, "posenc")  # the base config is untouched
    built = AutoModelForCausalLM.from_config(patched)
    assert type(built).__name__ == "HfPosencLlamaForCausalLM"
    assert torch.equal(built.model.layers[0].self_attn.posenc.pos_emb, torch.zeros(8, 8))


def test_patch_config_native_is_stock():
    config = tiny_model("llama").config
    patched = hf_posenc.patch_config(config, PosEncConfig(kind="rope", rope_type="linear", factor=4.0))
    assert type(patched) is type(config)
    assert patched.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                       "factor": 4.0}
    assert patched.max_position_embeddings == 512 and config.max_position_embeddings == 128


def test_import_changes_no_stock_model():
    code = """
        import torch, transformers
        from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
        from transformers.models.llama import modeling_llama
        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        x = torch.randint(0, 50, (2, 9))
        before = model(x).logits
        forwards = {name: getattr(modeling_llama, name).forward for name in ("LlamaAttention", "LlamaModel")}
        stock = {k: AttentionInterface._global_mapping[k] for k in AttentionInterface._global_mapping}
        import hf_posenc
        after = model(x).logits
        torch.manual_seed(0)
        fresh = LlamaForCausalLM(cfg).eval()
        assert torch.equal(before, after) and torch.equal(before, fresh(x).logits)
        assert all(getattr(modeling_llama, n).forward is f for n, f in forwards.items())
        assert all(AttentionInterface._global_mapping[k] is v for k, v in stock.items())
        assert type(fresh) is LlamaForCausalLM
        assert fresh.config._attn_implementation == model.config._attn_implementation
        print("OK")
    """
    result = run_python(code)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
