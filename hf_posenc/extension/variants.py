"""Give a loaded model another positional encoding, through the core ``hf_posenc.convert``."""

from __future__ import annotations

from typing import Any


def check_posenc(posenc: dict[str, Any]):
    """Validate an encoding mapping and return the core config object.

    Raises:
        ValueError: unknown ``kind`` or an invalid parameter (message from ``PosEncConfig``).
    """
    from hf_posenc.config import PosEncConfig

    if not isinstance(posenc, dict) or "kind" not in posenc:
        raise ValueError(f"an encoding needs a 'kind' key, got {posenc!r}")
    return PosEncConfig(**posenc)


def is_unchanged_rope(posenc: dict[str, Any]) -> bool:
    """True when the mapping asks for plain RoPE with no scaling (the base model as pretrained)."""
    return posenc.get("kind") == "rope" and set(posenc) <= {"kind", "rope_type"} and posenc.get("rope_type", "default") == "default"


def apply_posenc(model, posenc: dict[str, Any]):
    """Convert ``model`` in place to the encoding described by ``posenc`` and return it.

    Plain unscaled RoPE on a RoPE model is the identity and leaves the model untouched, so the
    ``rope`` baseline is exactly the pretrained base.
    """
    config = check_posenc(posenc)
    if is_unchanged_rope(posenc) and getattr(model.config, "model_type", None) != "gpt2":
        return model
    from hf_posenc.convert import convert

    return convert(model, config)
