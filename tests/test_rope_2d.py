"""2-D RoPE (Heo et al. 2024, https://arxiv.org/abs/2403.13298) and the image rows (ViT, DeiT, DINOv2).

The reference is written here from the paper's complex form, independently of ``hf_posenc``: a patch at row
``y``, column ``x`` multiplies each complex pair ``z_t = u_t + i u_{t + d/2}`` of its query and key by
``exp(i (theta^x_t x + theta^y_t y))``; RoPE-Axial has ``theta^x = (f, 0)``, ``theta^y = (0, f)`` with
``f_t = 100^(-t / (d/4))``; the tokens before the patches are left as they are. Attention is a plain fp64
softmax. The image rows get their own matrix (no token ids, caches or padding): NoPE identity, a whole-model
reference at the training resolution and at twice it, both reload routes, the Auto heads, LoRA, revert.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model
from test_persistence import run_python
from tiny_models import tiny_model
from tiny_vision_models import (
    GRID_KINDS,
    IMAGE,
    LAYOUT_MATCHES,
    NUM_LABELS,
    PREFIX,
    VISION,
    allowed_vision_kinds,
    needs_row_layout,
    pixels,
    vision_config,
    vision_converted,
    vision_model,
)
from transformers import AttentionInterface

import hf_posenc
from hf_posenc import PosEncConfig, attention, positions, registry
from hf_posenc.architectures import ARCHITECTURES, attention_modules
from hf_posenc.encodings.rope_2d import Rope2D

BACKENDS = ["eager", "sdpa"]
VARIANTS = ["axial", "mixed"]


# ---------------------------------------------------------------------------------------------------
# The reference, from the paper's equations
# ---------------------------------------------------------------------------------------------------
def paper_axial_frequencies(head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE-Axial: ``(theta^x, theta^y)`` fp64 ``[1, d/2]``: the first d/4 pairs follow x, the others y."""
    quarter = head_dim // 4
    f = torch.tensor([base ** (-t / quarter) for t in range(quarter)], dtype=torch.float64)
    zeros = torch.zeros(quarter, dtype=torch.float64)
    return torch.cat((f, zeros))[None], torch.cat((zeros, f))[None]


def reference_rotate(u: torch.Tensor, rows: int, columns: int, prefix: int, theta_x, theta_y) -> torch.Tensor:
    """``u`` ``[B, H, prefix + rows * columns, d]`` fp64 with each patch token rotated (row-major patches)."""
    half = u.shape[-1] // 2
    out = u.clone()
    for n in range(rows * columns):
        y, x = divmod(n, columns)
        token = u[:, :, prefix + n]  # [B, H, d]
        z = torch.complex(token[..., :half], token[..., half:])  # [B, H, d/2]
        angle = theta_x * x + theta_y * y  # [H or 1, d/2]
        z = z * torch.exp(1j * angle)
        out[:, :, prefix + n] = torch.cat((z.real, z.imag), dim=-1)
    return out


def reference_attention(q, k, v, scaling, grid, prefix, theta_x, theta_y):
    """fp64 softmax attention ``[B, H, n, d]`` after the 2-D rotation of q and k."""
    q = reference_rotate(q, *grid, prefix, theta_x, theta_y)
    k = reference_rotate(k, *grid, prefix, theta_x, theta_y)
    return torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v


def frequencies_of(posenc: Rope2D, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference frequencies of a module: the paper's for axial, its learned table for mixed."""
    if posenc.variant == "axial":
        return paper_axial_frequencies(head_dim, posenc.base)
    theta = posenc.theta.double()
    return theta[1], theta[0]  # (column = x, row = y), [H, d/2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_equals_the_paper_forward_and_gradients(variant, backend):
    """A 3x5 grid after 2 unrotated tokens: output and gradients w.r.t. q, k, v and the mixed frequencies."""
    torch.manual_seed(0)
    heads, head_dim, grid, prefix = 4, 16, (3, 5), 2
    n = prefix + grid[0] * grid[1]
    layer = torch.nn.Module()
    layer.is_causal = False
    layer.posenc = Rope2D(heads, head_dim, variant, base=100.0 if variant == "axial" else 10.0)
    layer.eval()
    q, k, v = (torch.randn(2, heads, n, head_dim, requires_grad=True) for _ in range(3))
    function = attention.posenc_sdpa_attention if backend == "sdpa" else attention.posenc_eager_attention
    out, _ = function(layer, q, k, v, None, scaling=0.3, posenc_grid=grid)  # [B, n, H, d]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weights).sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    theta64 = layer.posenc.theta.detach().double().requires_grad_() if variant == "mixed" else None
    theta_x, theta_y = (theta64[1], theta64[0]) if variant == "mixed" else paper_axial_frequencies(head_dim)
    expected = reference_attention(q64, k64, v64, 0.3, grid, prefix, theta_x, theta_y).transpose(1, 2)
    (expected * weights).sum().backward()

    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=0, atol=1e-5)
    if variant == "mixed":
        torch.testing.assert_close(layer.posenc.theta.grad.double(), theta64.grad, rtol=1e-4, atol=1e-5)
        assert theta64.grad.abs().max() > 1e-3  # the frequencies do get a gradient
    plain = (torch.softmax(q64 @ k64.transpose(-1, -2) * 0.3, dim=-1) @ v64).transpose(1, 2)
    assert (plain - expected).abs().max() > 1e-2  # the rotation matters


def test_mixed_frequencies_start_as_the_paper_initialises_them():
    """Magnitudes 10^(-t/(d/4)) per axis pair, the second quarter at +pi/2 from the first, a random direction
    per head; fp32 whatever the model dtype."""
    torch.manual_seed(0)
    module = Rope2D(num_heads=6, head_dim=16, variant="mixed", base=10.0)
    theta = module.theta.detach().double()  # [2 (y, x), H, d/2]
    assert module.theta.dtype == torch.float32
    magnitude = torch.tensor([10.0 ** (-t / 4) for t in range(4)], dtype=torch.float64).repeat(2)
    torch.testing.assert_close(theta.norm(dim=0), magnitude.expand(6, -1), rtol=1e-6, atol=0)
    direction = torch.atan2(theta[0], theta[1])  # [H, d/2] angle in the (x, y) plane
    turn = torch.remainder(direction[:, 4:] - direction[:, :4], 2 * math.pi)
    torch.testing.assert_close(turn, torch.full_like(turn, math.pi / 2), rtol=0, atol=1e-6)
    assert torch.allclose(direction[:, :4], direction[:, :1].expand(-1, 4), atol=1e-6)  # one direction per head
    assert direction[:, 0].unique().numel() == 6
    assert dict(module.named_parameters()).keys() == set(registry.get("rope_2d").capabilities.tables)
    assert not list(Rope2D(6, 16, "axial").parameters())  # axial: nothing learned


def test_grid_positions_put_the_patches_last_row_by_row():
    grid = positions.grid_positions((2, 3), 8, "cpu")
    assert grid.tolist() == [[0, 0], [0, 0], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    with pytest.raises(ValueError, match="none was recorded"):
        positions.grid_positions(None, 8, "cpu")
    with pytest.raises(ValueError, match="2x5 has more patches than the 8 tokens"):
        positions.grid_positions((2, 5), 8, "cpu")


# ---------------------------------------------------------------------------------------------------
# Configs and refusals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    (dict(variant="diagonal"), r"invalid variant='diagonal'; allowed: 'axial', 'mixed'"),
    (dict(rope_theta=-1.0), r"invalid rope_theta=-1.0; allowed: a positive finite number"),
    (dict(spacing=2), r"unknown parameter\(s\) \['spacing'\]"),
])
def test_bad_configs_name_the_field(params, message):
    with pytest.raises(ValueError, match=message):
        PosEncConfig(kind="rope_2d", **params)


@needs_row_layout
def test_a_head_dim_not_divisible_by_4_is_refused():
    config = vision_config("vit")
    config.hidden_size, config.num_attention_heads = 24, 4  # head_dim 6
    model = transformers.ViTModel(config)
    with pytest.raises(ValueError, match="head dimension divisible by 4.*head_dim=6"):
        hf_posenc.convert(model, PosEncConfig(kind="rope_2d"))


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_token_models_refuse_rope_2d(arch):
    with pytest.raises(ValueError, match=r"cannot be applied to .*2-D patch grid of an image.*allowed: image "
                                         r"models \(vit, deit, dinov2, dinov2_with_registers\)"):
        hf_posenc.convert(tiny_model(arch), PosEncConfig(kind="rope_2d"))


@pytest.mark.parametrize("arch", VISION)
def test_image_rows_take_rope_2d_and_nope_only(arch):
    assert allowed_vision_kinds(arch) == [k for k in registry.kinds() if k in ("nope", *GRID_KINDS)]
    for kind in set(registry.kinds()) - {"nope", *GRID_KINDS}:
        with pytest.raises(ValueError, match=rf"kind='{kind}'\) cannot be applied to '{arch}': an image model "
                                             r"takes only .*rope_2d, nope"):
            hf_posenc.convert(vision_model(arch), PosEncConfig(kind=kind))


# ---------------------------------------------------------------------------------------------------
# The image rows: a whole-model reference at the training resolution and at twice it
# ---------------------------------------------------------------------------------------------------
REFERENCE_NAME = "test_rope_2d_reference"
_reference = {}  # what the registered reference attention reads in the current forward


def _reference_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A stock model's attention replaced by the fp64 reference (registered under a test-only name)."""
    frequencies = _reference["frequencies"].get(module)
    q, k, v = query.double(), key.double(), value.double()
    if frequencies is None:  # NoPE
        out = torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v
    else:
        out = reference_attention(q, k, v, scaling, _reference["grid"], _reference["prefix"], *frequencies)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_NAME, _reference_function)


def reference_output(arch: str, converted, x: torch.Tensor, head: bool = False) -> torch.Tensor:
    """The stock model (same weights, position table zeroed) with the reference attention, on ``x``."""
    stock = vision_model(arch, head=head)
    stock.set_attn_implementation(REFERENCE_NAME)
    with torch.no_grad():
        stock.base_model.embeddings.position_embeddings.zero_()
    row = ARCHITECTURES[arch]
    ours = attention_modules(converted, row)
    head_dim = vision_config(arch).hidden_size // vision_config(arch).num_attention_heads
    _reference.update(
        grid=(x.shape[-2] // 4, x.shape[-1] // 4), prefix=PREFIX[arch],
        frequencies={theirs: frequencies_of(mine.posenc, head_dim) if hasattr(mine, "posenc") else None
                     for theirs, mine in zip(attention_modules(stock, row), ours)})
    # Stock ViT and DeiT refuse another image size unless told to interpolate (a zero table stays zero).
    kwargs = {"interpolate_pos_encoding": True} if arch in ("vit", "deit") else {}
    with torch.no_grad():
        return stock(pixel_values=x, **kwargs)[0]


@needs_row_layout
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", VISION)
def test_nope_is_the_stock_model_without_its_table(arch, backend):
    """Dropping the table is the only change: the stock model with a zeroed table, bit for bit."""
    model = vision_converted(arch, "nope", backend)
    stock = vision_model(arch, backend)
    with torch.no_grad():
        stock.base_model.embeddings.position_embeddings.zero_()
        assert torch.equal(model(pixels())[0], stock(pixels())[0])
    assert not any("position_embeddings" in name for name, _ in model.named_parameters())


@needs_row_layout
@pytest.mark.parametrize("scale", [1, 2], ids=["trained-size", "2x"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", VISION)
def test_converted_model_equals_the_reference_at_any_resolution(monkeypatch, arch, variant, backend, scale):
    """At the training size and on a 2x image (an 8x8 grid, 4x4 at training), with no table interpolated: the
    converted model equals the stock one running the reference attention with that grid."""
    model = vision_converted(arch, variant=variant, backend=backend)
    x = pixels(height=IMAGE * scale, width=IMAGE * scale)
    expected = reference_output(arch, model, x)

    def no_interpolation(*args, **kwargs):
        raise AssertionError("a position table was interpolated")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_interpolation)
    with torch.no_grad():
        got = model(pixel_values=x)[0]
    assert got.shape[1] == PREFIX[arch] + (4 * scale) ** 2
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    nope = vision_converted(arch, "nope", backend)
    with torch.no_grad():
        assert (nope(pixel_values=x)[0] - got).abs().max() > 1e-3  # the rotation changes the model


@needs_row_layout
def test_a_non_square_image_rotates_rows_and_columns_apart():
    """12x20 pixels: a 3x5 grid (rows != columns, so a transposed grid would not match the reference)."""
    model = vision_converted("vit", variant="mixed")
    x = pixels(height=12, width=20)
    with torch.no_grad():
        got = model(pixel_values=x)[0]
    torch.testing.assert_close(got, reference_output("vit", model, x), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Save and reload (both routes, the Auto heads), LoRA, revert
# ---------------------------------------------------------------------------------------------------
HEADS = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassificationWithTeacher",
         "dinov2": "Dinov2ForImageClassification", "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}
LOAD_ALL = """
import json, sys, torch
{prelude}
from transformers import AutoModel, AutoModelForImageClassification
results = {{}}
for path, head in json.loads(sys.argv[1]):
    auto = AutoModelForImageClassification if head else AutoModel
    model = auto.from_pretrained(path, attn_implementation="eager"{extra}).eval()
    with torch.no_grad():
        torch.save(model(pixel_values=torch.load(path + "/pixels.pt"))[0], path + "/out.pt")
    results[path] = type(model).__name__
print("RESULTS", json.dumps(results))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every image row saved converted to mixed 2-D RoPE: as its image classifier and as its base model."""
    root = tmp_path_factory.mktemp("vision")
    out = {}
    x = pixels(height=2 * IMAGE, width=IMAGE, seed=4)  # another size than the training one
    for arch in VISION:
        for head in (True, False):
            torch.manual_seed(0)
            config = vision_config(arch)
            stock = (getattr(transformers, HEADS[arch])._from_config(config, attn_implementation="eager") if head
                     else vision_model(arch))
            model = hf_posenc.convert(stock.eval(), PosEncConfig(kind="rope_2d", variant="mixed"))
            path = root / f"{arch}-{'head' if head else 'base'}"
            model.save_pretrained(path)
            torch.save(x, path / "pixels.pt")
            with torch.no_grad():
                out[(arch, head)] = (str(path), model(pixel_values=x)[0])
    return out


@needs_row_layout
@pytest.mark.parametrize("route", ["import", "remote_code"])
def test_every_image_row_reloads_in_a_fresh_process(saved, route):
    prelude, extra = ("import hf_posenc", "") if route == "import" else ("", ", trust_remote_code=True")
    paths = json.dumps([(path, head) for (_, head), (path, _) in saved.items()])
    result = run_python(f"import sys; sys.argv[1:] = [{paths!r}]\n" + LOAD_ALL.format(prelude=prelude, extra=extra))
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.split("RESULTS ", 1)[1])
    for (arch, head), (path, expected) in saved.items():
        assert torch.equal(torch.load(Path(path, "out.pt")), expected), (arch, head)
        stock_name = HEADS[arch] if head else type(vision_model(arch)).__name__
        assert classes[path] == f"HfPosenc{stock_name}"
        config = json.loads(Path(path, "config.json").read_text())
        assert config["model_type"] == f"hf_posenc_{arch}" and config["posenc"]["variant"] == "mixed"
        if head:  # DeiT has two image classifiers: the map names the one saved
            assert config["auto_map"]["AutoModelForImageClassification"].endswith(f".HfPosenc{HEADS[arch]}")


@needs_row_layout
@pytest.mark.parametrize("arch", VISION)
def test_patched_config_loads_a_stock_checkpoint(tmp_path, arch):
    """A stock checkpoint loaded with ``patch_config``: its table is left unused (transformers reports it
    unexpected), and the model equals the stock model converted in memory; RoPE-Mixed's frequencies, missing
    from the checkpoint, get the paper's initialisation."""
    stock = vision_model(arch, head=True)
    stock.save_pretrained(tmp_path)
    stock_config = transformers.AutoConfig.from_pretrained(tmp_path)
    config = hf_posenc.patch_config(stock_config, PosEncConfig(kind="rope_2d"))
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, config=config,
                                                                          attn_implementation="eager").eval()
    assert type(loaded).__name__.startswith("HfPosenc")
    converted = hf_posenc.convert(vision_model(arch, head=True), PosEncConfig(kind="rope_2d"))
    x = pixels(height=2 * IMAGE, width=2 * IMAGE)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, converted(pixel_values=x).logits)
    mixed = hf_posenc.patch_config(stock_config, PosEncConfig(kind="rope_2d", variant="mixed"))
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, config=mixed)
    theta = attention_modules(loaded, ARCHITECTURES[arch])[0].posenc.theta
    torch.testing.assert_close(theta.norm(dim=0)[0, :2], torch.tensor([1.0, 10 ** -0.5]), rtol=1e-6, atol=0)


@needs_row_layout
@pytest.mark.parametrize("arch", VISION)
def test_lora_trains_the_mixed_frequencies_and_reloads(tmp_path, arch):
    model = vision_converted(arch, variant="mixed", head=True)
    config = hf_posenc.lora_config(model, r=2, alpha=4, modules_to_save=["classifier"])
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config.modules_to_save) == {"classifier", "posenc"}
    model = get_peft_model(model, config)
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if ".posenc." in n and p.requires_grad}
    assert len(tables) == vision_config(arch).num_hidden_layers
    x, labels = pixels(8, seed=2), torch.arange(8) % NUM_LABELS
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in tables.items())
    y = pixels(2, 2 * IMAGE, 2 * IMAGE, seed=3)
    with torch.no_grad():
        expected = model(pixel_values=y).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = hf_posenc.load_adapter(vision_converted(arch, variant="mixed", head=True), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(pixel_values=y).logits, expected)
    with pytest.raises(ValueError, match="position tables"):  # a base without the tables is refused
        hf_posenc.load_adapter(vision_converted(arch, "nope", head=True), tmp_path / "adapter")


@needs_row_layout
@pytest.mark.parametrize("arch", VISION)
def test_revert_restores_the_stock_model_exactly(arch):
    stock = vision_model(arch, head=True)
    before = {name: tensor.clone() for name, tensor in stock.state_dict().items()}
    table = stock.base_model.embeddings.position_embeddings
    x = pixels()
    with torch.no_grad():
        expected = stock(pixel_values=x).logits
    model = hf_posenc.convert(stock, PosEncConfig(kind="rope_2d", variant="mixed"))
    assert model.base_model.embeddings.position_embeddings is None
    hf_posenc.revert(model)
    assert type(model) is type(vision_model(arch, head=True))
    assert model.base_model.embeddings.position_embeddings is table
    assert "interpolate_pos_encoding" not in vars(model.base_model.embeddings)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, expected)
    assert not model.base_model.embeddings._forward_pre_hooks
    assert not model.base_model.embeddings.patch_embeddings.projection._forward_hooks
    if arch in ("vit", "deit"):  # stock again: another image size is refused without interpolation
        with pytest.raises(ValueError, match="doesn't match model"):
            model(pixel_values=pixels(height=2 * IMAGE, width=2 * IMAGE))



@pytest.mark.skipif(LAYOUT_MATCHES, reason="this transformers lays image models out as their rows say")
@pytest.mark.parametrize("arch", VISION)
def test_an_older_image_layout_is_refused_by_name(arch):
    """Before transformers 5.24 the image models had other module paths: conversion says so instead of failing
    on a missing attribute (or converting the wrong modules)."""
    model = transformers.AutoModel.from_config(vision_config(arch))
    with pytest.raises(ValueError, match=r"lays .* out otherwise than hf_posenc's row .* upgrade transformers"):
        hf_posenc.convert(model, PosEncConfig(kind="rope_2d"))
