"""Every encoding against stock flash attention and stock sdpa on one GPU, in bf16, side by side in one run.

Usage::

    python benchmarks/gpu.py --json gpu.json --markdown gpu.md          # CUDA: T in 4k, 16k, 32k, 64k
    python benchmarks/gpu.py --lengths 4096 16384 --modes forward       # a subset
    python benchmarks/gpu.py --smoke --json smoke.json                  # CPU, tiny, fp32 (CI)

What is measured, for each registered encoding (its default configuration; ``--smoke``: its registry example)
and the stock baselines ``stock_flash`` (``flash_attention_2``, where the ``flash_attn`` package is
installed) and ``stock_sdpa``, on a small Llama (d=1024, 8 layers, 16 heads of 64, batch 1; ``--smoke``:
d=64, 2 layers):

* ``forward``: one forward of ``T`` tokens without gradient (eval);
* ``forward_backward``: forward and ``loss.backward()`` in train mode;
* ``decode``: seconds per generated token with a KV cache after a prefill of ``T`` tokens.

Converted models run ``hf_posenc_sdpa``, whose kernel choice on CUDA (:func:`hf_posenc.kernels.select`) puts
the bias encodings on compiled FlexAttention and Self-Extend/ReRoPE on two flex passes. Times are medians of
repetitions interleaved across encodings after one warm-up each (the warm-up pays for compilation); peak
memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the step (on CPU, the storage
tracker of ``benchmarks/attention.py``). A step that runs out of memory is recorded with ``"error": "oom"``.

Records (``--json``): ``{"encoding", "T", "mode", "time_s", "peak_mem_bytes", "time_ratio_vs_sdpa",
"time_ratio_vs_flash", "mem_ratio_vs_sdpa", "mem_ratio_vs_flash", "device", "dtype", "error"}``; a ratio is
None where its baseline has no number in the same group.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_posenc
from hf_posenc import PosEncConfig, registry

LENGTHS = (4096, 16384, 32768, 65536)
MODES = ("forward", "forward_backward", "decode")
BASELINES = {"stock_flash": "flash_attention_2", "stock_sdpa": "sdpa"}


def has_flash() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def encodings(smoke: bool) -> list[str]:
    """The baselines, then every registered kind that changes attention or rotation."""
    names = [b for b in BASELINES if b != "stock_flash" or has_flash()]
    return names + [e.kind for e in registry.entries() if not e.capabilities.patch_grid]


def config(smoke: bool) -> LlamaConfig:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256) if smoke else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)
    return LlamaConfig(**size, max_position_embeddings=max(LENGTHS) * 2)


def build(name: str, smoke: bool, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    backend = BASELINES.get(name, "sdpa")
    model = LlamaForCausalLM(config(smoke)).to(device=device, dtype=dtype)
    model.set_attn_implementation(backend)
    if name not in BASELINES:
        params = dict(registry.get(name).example.params) if smoke else {}
        hf_posenc.convert(model, PosEncConfig(kind=name, **params))
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_function(model, mode: str, length: int, device: str, decode_steps: int):
    """A zero-argument callable that runs one measured step; returns ``(step, per)`` where ``per`` divides its
    time (the number of decoded tokens for ``decode``)."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), device=device, generator=torch.Generator(device).manual_seed(0))
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                model(ids)
        return step, 1
    if mode == "forward_backward":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
        return step, 1
    model.eval()

    def step():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=decode_steps, min_new_tokens=decode_steps, do_sample=False)
    return step, decode_steps


def measure_memory(step, device: str) -> int:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    spec = importlib.util.spec_from_file_location("hf_posenc_bench_attention", Path(__file__).with_name("attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_memory(step)


def run_group(names, length, mode, args, device, dtype) -> list[dict]:
    """One (T, mode) group: warm-up and memory per encoding, then interleaved timed repetitions."""
    steps, records = {}, {}
    for name in names:
        record = {"encoding": name, "T": length, "mode": mode, "device": device, "dtype": str(dtype).removeprefix(
            "torch."), "time_s": None, "peak_mem_bytes": None, "error": None}
        records[name] = record
        try:
            model = build(name, args.smoke, device, dtype)
            step, per = step_function(model, mode, length, device, args.decode_steps)
            step()  # warm-up: compilation, autotuning, allocator
            _sync(device)
            record["peak_mem_bytes"] = int(measure_memory(step, device))
            steps[name] = (step, per)
        except torch.OutOfMemoryError:
            record["error"] = "oom"
        except Exception as error:  # noqa: BLE001 - one failing encoding must not lose the others' numbers
            record["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        gc.collect()
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, (step, per) in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / per)
    for name, values in times.items():
        records[name]["time_s"] = statistics.median(values)
    add_ratios(list(records.values()))
    return list(records.values())


def add_ratios(group: list[dict]) -> None:
    by = {r["encoding"]: r for r in group}
    for record in group:
        for base, suffix in (("stock_sdpa", "sdpa"), ("stock_flash", "flash")):
            reference = by.get(base)
            for field, key in (("time_s", "time_ratio_vs_"), ("peak_mem_bytes", "mem_ratio_vs_")):
                ok = reference is not None and reference[field] and record[field] is not None
                record[key + suffix] = record[field] / reference[field] if ok else None


def markdown(records: list[dict]) -> str:
    """One table per mode: rows are encodings, columns the lengths, cells ``time x sdpa / x flash, memory``."""
    lines = []
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        lengths = sorted({r["T"] for r in rows})
        lines += [f"### {mode} ({rows[0]['device']}, {rows[0]['dtype']})", "",
                  "| encoding | " + " | ".join(f"T={t}" for t in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name in dict.fromkeys(r["encoding"] for r in rows):
            cells = []
            for t in lengths:
                r = next((x for x in rows if x["encoding"] == name and x["T"] == t), None)
                if r is None or r["error"]:
                    cells.append(r["error"].split(":")[0] if r else "")
                    continue
                ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
                cells.append(f"{r['time_s'] * 1e3:.1f} ms ({ratio(r['time_ratio_vs_sdpa'])} sdpa, "
                             f"{ratio(r['time_ratio_vs_flash'])} flash), mem {ratio(r['mem_ratio_vs_sdpa'])} sdpa")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny model and lengths (CI)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--encodings", nargs="+", default=None, help="a subset (default: every encoding)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:
        device, dtype, lengths = "cpu", torch.float32, args.lengths or [32]
    elif torch.cuda.is_available():
        device, dtype, lengths = "cuda", torch.bfloat16, args.lengths or list(LENGTHS)
    else:
        sys.exit("benchmarks/gpu.py needs a CUDA device (or --smoke for the tiny CPU run).")
    names = args.encodings or encodings(args.smoke)
    records = []
    for length in lengths:
        for mode in args.modes:
            print(f"T={length} {mode}", file=sys.stderr, flush=True)
            records += run_group(names, length, mode, args, device, dtype)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    table = markdown(records)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return records


if __name__ == "__main__":
    main()
