"""Context-extension experiments: how far each positional encoding extends a model's context.

The library behind ``recipes/``: typed configs (``config``), text and token windows (``data``), the
embedded base model (``base_model``), loading and converting a base (``models``), LoRA fine-tuning
(``training``), long-context evaluation (``evaluation``), the comparison grid (``compare``) and its
outputs (``report``), and the shipped metrics (``metrics``). Configs are read by the experiments' one
loader and the grid runs through their one resumable runner (``hf_posenc.experiments.config``, ``.grid``).

The recipes in ``recipes/`` are thin scripts over this package. Everything here runs offline: the
default corpus is the Python standard library of the running interpreter, the default tokenizer and
base model are trained by the project once and cached (see :func:`.data.cache_dir`).

Protocol background: Chen et al. 2023, "Extending Context Window of Large Language Models via
Positional Interpolation" (https://arxiv.org/abs/2306.15595); Peng et al. 2023, "YaRN"
(https://arxiv.org/abs/2309.00071); Mohtashami & Jaggi 2023, passkey retrieval
(https://arxiv.org/abs/2305.16300).

Submodules are imported on demand so that ``import hf_posenc.experiments.context_extension`` stays cheap.
"""
