"""hf_posenc: swap the positional encoding of Hugging Face Transformers models.

RoPE (every stock scaling variant), NoPE, ALiBi, T5 relative bias and CoPE, plus the training-free RoPE
extensions Self-Extend and ReRoPE, on the decoders and encoders of ``ARCHITECTURES`` (Llama, Gemma, Phi-3,
MoE models, BERT-family encoders, ModernBERT, ...), per instance and without copied model files. Importing the
package registers two attention names (``hf_posenc_eager``/``hf_posenc_sdpa``) and the
``hf_posenc_<type>`` model types with the Auto classes; it changes no stock model.

Example:
    >>> import hf_posenc
    >>> model = hf_posenc.convert(model, hf_posenc.PosEncConfig(kind="alibi"))
"""

from . import _hf, attention, registry
from .architectures import ARCHITECTURES, lora_target_modules
from .config import PosEncConfig
from .encodings import AlibiConfig, CopeConfig, NopeConfig, ReRopeConfig, RopeConfig, SelfExtendConfig, T5BiasConfig
from .encodings.rope import ROPE_TYPES
from .convert import convert, patch_config, posenc_of, revert, rope_layout, set_backend
from .modeling import register_auto_classes
from .native_alibi import native_alibi
from . import modeling_hf_posenc  # noqa: F401,E402  (the module the HfPosenc classes live in)

__version__ = "0.1.0"
#: Every registered encoding kind (``hf_posenc.registry``), in registration order.
KINDS = registry.kinds()

_hf.check_transformers_version()
attention.register()
register_auto_classes()

# Imported on first use: peft and huggingface_hub's upload stack are not needed to convert or load.
_LAZY = {"push_to_hub": "hub", "load_adapter": "peft_utils", "lora_config": "peft_utils"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_posenc' has no attribute {name!r}")

__all__ = [
    "ARCHITECTURES",
    "KINDS",
    "ROPE_TYPES",
    "AlibiConfig",
    "CopeConfig",
    "NopeConfig",
    "PosEncConfig",
    "ReRopeConfig",
    "RopeConfig",
    "SelfExtendConfig",
    "T5BiasConfig",
    "convert",
    "load_adapter",
    "lora_config",
    "lora_target_modules",
    "native_alibi",
    "patch_config",
    "posenc_of",
    "push_to_hub",
    "revert",
    "rope_layout",
    "set_backend",
]
