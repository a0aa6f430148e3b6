"""Remote-code entry point of checkpoints converted by hf_posenc.

``save_pretrained`` copies this file next to the weights. It does nothing but import the installed hf_posenc
and hand its classes on (``HfPosencLlamaForCausalLM`` -> a converted ``LlamaForCausalLM``): all code that runs
is the installed package's. After ``import hf_posenc``, transformers uses the installed classes and never runs
a checkpoint's copy of this file, even with ``trust_remote_code=True`` (see the README's trust model).
"""

# Inside try: transformers' import check skips it, so a missing plug-in gets this message instead of
# "Run `pip install hf_posenc`", which names a distribution that is not ours.
try:
    from hf_posenc.modeling import class_by_name as __getattr__  # noqa: F401
except ImportError as error:
    if error.name not in ("hf_posenc", "hf_posenc.modeling"):  # the plug-in is there but something it needs
        raise  # is not: show that
    raise ImportError(
        "This checkpoint was converted by hf_posenc: its positional encoding is implemented by the hf_posenc "
        "plug-in, which is not installed here. hf_posenc is not published on PyPI; install it from a checkout of "
        "its repository (`pip install /path/to/hf_posenc`) or from a wheel built there (`pip install "
        "hf_posenc-*.whl`), then load the checkpoint again."
    ) from error
