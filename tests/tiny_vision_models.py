"""Tiny random configs of the image rows (``Architecture.patch_grid``), apart from the token-sequence matrix.

The matrix tests of ``tests/tiny_models.py`` feed token ids, caches and padding; image models read
``pixel_values`` and have none of those, so their rows are covered by their own parametrised tests
(``tests/test_rope_2d.py``). ``test_architectures`` checks that ``CONFIGS`` and ``VISION_CONFIGS`` together
cover every row. A 16x16 image in 4x4 patches: a 4x4 grid, and head dim 8 (2 frequencies per axis).
"""

from __future__ import annotations

import copy

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

import hf_posenc
from hf_posenc import registry
from hf_posenc.architectures import ARCHITECTURES

IMAGE = 16
PATCH = 4
NUM_LABELS = 3
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
               num_labels=NUM_LABELS)

VISION_CONFIGS = {
    "vit": lambda: transformers.ViTConfig(**_COMMON, intermediate_size=64),
    "deit": lambda: transformers.DeiTConfig(**_COMMON, intermediate_size=64),
    "dinov2": lambda: transformers.Dinov2Config(**_COMMON, mlp_ratio=2),
    "dinov2_with_registers": lambda: transformers.Dinov2WithRegistersConfig(**_COMMON, mlp_ratio=2,
                                                                            num_register_tokens=3),
}
VISION = sorted(VISION_CONFIGS)
#: Tokens before the patches: CLS; DeiT's distillation token; the registers.
PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 4}
#: Kinds that rotate by the patch grid (every other kind but NoPE is refused on image rows).
GRID_KINDS = [entry.kind for entry in registry.entries() if entry.capabilities.patch_grid]


def vision_config(arch: str):
    return VISION_CONFIGS[arch]()


def allowed_vision_kinds(arch: str) -> list[str]:
    """The registered kinds the image row takes (the others are refused by the row)."""
    config, row = vision_config(arch), ARCHITECTURES[arch]
    return [kind for kind in registry.kinds() if row.refusal(kind, config) is None]


def vision_model(arch: str, attn_implementation: str = "eager", seed: int = 0, head: bool = False):
    """A random tiny image model in eval mode (fp32); ``head``: its image classifier."""
    torch.manual_seed(seed)
    config = copy.deepcopy(vision_config(arch))
    if head:  # the default head, by class: transformers 5.24's Auto from_config fails on DeiT's two heads
        name = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[arch]
        cls = getattr(transformers, name if isinstance(name, str) else name[0])
        return cls._from_config(config, attn_implementation=attn_implementation).eval()
    return transformers.AutoModel.from_config(config, attn_implementation=attn_implementation).eval()


def vision_converted(arch: str, kind: str = "rope_2d", backend: str = "eager", seed: int = 0, head: bool = False,
                     **params):
    """A tiny image model converted to ``kind`` on our ``backend``."""
    model = vision_model(arch, backend, seed, head)
    return hf_posenc.convert(model, hf_posenc.PosEncConfig(kind=kind, **params), attn_implementation=backend)


def pixels(batch: int = 2, height: int = IMAGE, width: int = IMAGE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def _layout_matches_the_rows() -> bool:
    """Whether this transformers lays the image models out as their rows say (5.24 rewrote them)."""
    from hf_posenc.architectures import attention_modules

    try:
        attention_modules(transformers.ViTModel(VISION_CONFIGS["vit"]()), ARCHITECTURES["vit"])
    except ValueError:
        return False
    return True


#: False on transformers releases whose image models predate the layout the rows describe (e.g. 5.5: blocks
#: at ``encoder.layer``, ``query``/``key``/``value``): conversion refuses them with the reason, which
#: ``test_rope_2d.test_an_older_image_layout_is_refused_by_name`` checks; every other image test skips.
LAYOUT_MATCHES = _layout_matches_the_rows()
needs_row_layout = __import__("pytest").mark.skipif(
    not LAYOUT_MATCHES, reason=f"transformers {transformers.__version__} lays image models out as before 5.24; "
                               "hf_posenc refuses them there (checked by "
                               "test_an_older_image_layout_is_refused_by_name)")
