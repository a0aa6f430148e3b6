"""The experiments that measure the encodings: what the plug-in's recipes and reports are built from.

Shared pieces:

- :mod:`.config`: strict config sections, the ``posenc`` field and the one YAML loader (``include:``,
  ``key.sub=value`` overrides, errors that name the file and the key);
- :mod:`.grid`: the fingerprinted, resumable grid every experiment runs its cells through;
- :mod:`.intervals`: seeds and spread, Student-t and Wilson intervals, and the orderings they allow.

The experiments:

- :mod:`.context_extension`: how far each encoding extends a pretrained model's context (``hf-posenc compare``,
  ``recipes/compare.py``, ``recipes/finetune_lora.py``, ``recipes/evaluate_context.py``);
- :mod:`.counting`: the CoPE paper's counting task, each encoding trained from scratch
  (``recipes/counting_task.py``).

The core of the plug-in never imports this package (``hf_posenc.cli`` does, for ``hf-posenc compare``). It ships
in the base install: its dependencies (pydantic, evaluate, matplotlib, filelock) are base dependencies already.
Submodules are imported on demand, so ``import hf_posenc.experiments`` stays cheap.
"""
