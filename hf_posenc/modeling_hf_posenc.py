"""Remote-code entry point of checkpoints converted by hf_posenc.

``save_pretrained`` copies this file next to the weights; ``from_pretrained(..., trust_remote_code=True)``
imports it, which needs the plug-in installed: ``pip install hf_posenc``. Class names resolve to the
classes of the installed hf_posenc (``HfPosencLlamaForCausalLM`` -> a converted ``LlamaForCausalLM``).
"""

import hf_posenc  # noqa: F401  (pip install hf_posenc: the positional encodings live there)
from hf_posenc.modeling import class_by_name


def __getattr__(name):
    return class_by_name(name)
