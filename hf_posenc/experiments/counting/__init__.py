"""The CoPE paper's counting task (Golovneva et al. 2024, https://arxiv.org/abs/2405.18719, Table 3).

- :mod:`.task`: programs, the vocabulary, answer-only batches and the from-scratch Llama;
- :mod:`.config`: the typed preset (``recipes/configs/counting_*.yaml``) and the test sets it draws;
- :mod:`.recipe`: one resumable cell per (encoding, seed), trained and scored;
- :mod:`.report`: error per encoding with intervals, the paper's numbers beside ours, and the plot.
"""
