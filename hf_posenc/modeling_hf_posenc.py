"""Remote-code entry point of checkpoints converted by hf_posenc.

``save_pretrained`` copies this file next to the weights; ``from_pretrained(..., trust_remote_code=True)``
imports it, which needs the plug-in installed (see :data:`INSTALL_HINT`). Class names resolve to the
classes of the installed hf_posenc (``HfPosencLlamaForCausalLM`` -> a converted ``LlamaForCausalLM``).
"""

INSTALL_HINT = (
    "This checkpoint was converted by hf_posenc: its positional encoding is implemented by the hf_posenc "
    "plug-in, which is not installed here. hf_posenc is not published on PyPI; install it from a checkout of "
    "its repository (`pip install /path/to/hf_posenc`) or from a wheel built there (`pip install "
    "hf_posenc-*.whl`), then load the checkpoint again."
)

# Inside try: transformers' import check skips it, so a missing plug-in gets the message above instead
# of "Run `pip install hf_posenc`", which names a distribution that does not exist.
try:
    import hf_posenc  # noqa: F401
    from hf_posenc.modeling import class_by_name
except ImportError as error:
    if error.name != "hf_posenc":  # the plug-in is there but something it needs is not: show that
        raise
    raise ImportError(INSTALL_HINT) from error


def __getattr__(name):
    return class_by_name(name)
