"""Context-extension toolkit: corpus, tokenizer, embedded base model, LoRA fine-tuning, evaluation.

The recipes in ``recipes/`` are thin scripts over this package. Everything here runs offline: the
default corpus is the Python standard library of the running interpreter, the default tokenizer and
base model are trained by the project once and cached (see :func:`hf_posenc.extension.paths.cache_dir`).

Protocol background: Chen et al. 2023, "Extending Context Window of Large Language Models via
Positional Interpolation" (https://arxiv.org/abs/2306.15595); Peng et al. 2023, "YaRN"
(https://arxiv.org/abs/2309.00071); Mohtashami & Jaggi 2023, passkey retrieval
(https://arxiv.org/abs/2305.16300).

Submodules are imported on demand so that ``import hf_posenc.extension`` stays cheap.
"""
