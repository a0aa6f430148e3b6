"""The worker of the multi-process tests (``tests/test_sequence_parallel.py``, ``tests/test_fsdp2.py``): each
function runs in one of 2 CPU processes over gloo, started with ``torch.multiprocessing.spawn``, and rank 0
writes what the test asserts to a JSON file.

Sequence parallelism compares, per kind, one process on the whole sequence against DeepSpeed Ulysses on 2
ranks (each rank holds half of the tokens; attention runs on half of the heads over the whole sequence).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F

# The repository root before any installed copy, then the tests' helpers (spawned children import this module).
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

#: Sequence length of the comparisons: even, so that each of the 2 ranks holds half.
LENGTH = 16
SEED = 0


def _environment(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)


def sp_model(kind: str, kv_heads: int):
    """A tiny Llama (4 heads, ``kv_heads`` KV heads) converted to ``kind`` on ``hf_posenc_sdpa``, in training
    mode, with its learned tables randomised (so that a wrong head slice changes the result)."""
    import tiny_models

    import hf_posenc

    config = tiny_models.tiny_config("llama")
    config.num_key_value_heads = kv_heads
    config.attention_dropout = 0.0
    torch.manual_seed(SEED)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = hf_posenc.convert(model, hf_posenc.PosEncConfig(**tiny_models.example_params(kind)),
                              attn_implementation="sdpa")
    tiny_models.randomize_position_tables(model, seed=SEED + 1)
    return model.train()


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [1, T], targets [1, T])``: targets are the next tokens (-100 at the end), shifted before any
    sharding so that each rank's share of the loss is its own tokens'."""
    import tiny_models

    ids = tiny_models.input_ids(batch=1, length=LENGTH, seed=SEED)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    return ids, targets


def loss_and_grads(model, ids, targets, positions, total: int) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy of these tokens over ``total`` (the whole sequence's count) and its gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=positions).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum") / total
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(got: dict, want: dict) -> dict:
    """Per parameter ``|got - want| / |want|`` (Frobenius norms), posenc tables named as such."""
    return {name: float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)) for name in want}


def ulysses_worker(rank: int, world: int, port: int, kinds: list[str], kv_heads: int, direct: bool, out: str) -> None:
    """Compare every kind of ``kinds`` under Ulysses with one process: registered with DeepSpeed's
    ``register_with_transformers`` (``direct``) or :func:`hf_posenc.parallel.register_ulysses`; rank 0 writes
    ``{kind: {"loss": abs error, "grad": max relative error, "tables": ...}}``."""
    _environment(rank, world, port)
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from hf_posenc import parallel

    deepspeed.init_distributed("gloo")
    ids, targets = _tokens()
    positions = torch.arange(LENGTH)[None]
    total = int((targets != -100).sum())
    models = {kind: sp_model(kind, kv_heads) for kind in kinds}
    # One process first: the wrapper replaces the attention function process-wide once registered.
    reference = {kind: loss_and_grads(model, ids, targets, positions, total) for kind, model in models.items()}
    names = {parallel.attention_name(model) for model in models.values()}
    assert len(names) == 1, f"one attention function per run (Ulysses wraps one): {names}"
    if direct:
        UlyssesSPAttentionHF.register_with_transformers(next(iter(models.values())),
                                                        core_attn_implementation=names.pop(),
                                                        sequence_parallel_size=world, micro_batch_size=1)
    else:
        parallel.register_ulysses(next(iter(models.values())), sequence_parallel_size=world, micro_batch_size=1)
    shard = slice(rank * LENGTH // world, (rank + 1) * LENGTH // world)
    report = {}
    for kind, model in models.items():
        try:
            loss, grads = loss_and_grads(model, ids[:, shard], targets[:, shard], positions[:, shard], total)
        except Exception as error:  # the test reports the first line of a failure per kind
            report[kind] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            continue
        dist.all_reduce(loss)
        for grad in grads.values():
            dist.all_reduce(grad)  # each rank's loss is its tokens' share: gradients add up
        errors = relative_error(grads, reference[kind][1])
        report[kind] = {"loss": float((loss - reference[kind][0]).abs()), "grad": max(errors.values()),
                        "tables": max([e for n, e in errors.items() if ".posenc." in n], default=0.0)}
    if rank == 0:
        report["world_size"] = dist.get_world_size()
        with open(out, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


def fsdp2_worker(rank: int, world: int, port: int, kind: str, directory: str, out: str) -> None:
    """FSDP2 (``fully_shard``) on a converted model with learned tables: one training step, the full state
    gathered and saved with ``save_pretrained``, reloaded in one process; rank 0 writes what changed and whether
    the reloaded model gives the trained model's logits."""
    _environment(rank, world, port)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = sp_model(kind, kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".posenc." in n}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids, targets = _tokens()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    positions = torch.arange(LENGTH)[None]
    loss, _ = loss_and_grads(model, ids, targets, positions, int((targets != -100).sum()))
    optimizer.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions).logits
    if rank == 0:
        fresh = sp_model(kind, kv_heads=2)
        fresh.load_state_dict(state)
        fresh.save_pretrained(directory)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
        with torch.no_grad():
            again = reloaded(input_ids=ids, position_ids=positions).logits
        with open(out, "w") as handle:
            json.dump({"world_size": dist.get_world_size(), "loss": float(loss),
                       "tables_moved": min(float((state[n] - b).abs().max()) for n, b in before.items()),
                       "logits": float((again - logits).abs().max())}, handle)
    dist.barrier()
    dist.destroy_process_group()
