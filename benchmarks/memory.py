"""Peak memory against sequence length for every registered encoding, against stock sdpa in the same run.

```bash
python benchmarks/memory.py --lengths 2048 4096 8192 --json memory.json --markdown memory.md --plot memory.png
python benchmarks/memory.py --smoke        # tiny model, tiny T, rows in this process (the test's run)
```

- **What**: a small Llama (d=256, 2 layers, 4 heads of 64, byte vocabulary, batch 1), stock ``sdpa`` and
  every token encoding of the registry (``hf_posenc.registry.kinds()``; image kinds are left out) with its
  default configuration, windows shorter than every T where it has one (``LONG_PARAMS``), and the rows of
  ``VARIANTS``; ``forward`` (no grad) and ``forward_backward`` (loss on the tokens, backward).
- **How**: each row (encoding) runs in a fresh Python process, so that no other row's allocations share its
  heap, with a fixed ``mmap`` threshold (:data:`MALLOC_ENV`). It builds the model, runs one step at a short
  length per mode (lazy buffers and kernels are
  created there), then per length, shortest first: frees what it can (garbage collection and glibc's
  ``malloc_trim``, so that the resident memory holds live data only), records the resident memory, resets
  the kernel's high-water mark (``/proc/self/clear_refs``, Linux) and runs the step. The cell's peak is
  the high-water mark minus the resident memory before the step: what the step added on top of the model
  and its inputs, as the operating system saw it (every allocation, torch's and other libraries', once
  touched). On CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.
  Ratios divide by stock sdpa's peak of the same T and mode. A length whose peak, grown quadratically from
  the previous one, would exceed the memory available is skipped with the reason (:func:`fits`).
- ``--smoke`` measures its rows in this process (the same measurement, without a process per row) so that
  the test stays fast; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_posenc  # noqa: E402
from hf_posenc import PosEncConfig, registry  # noqa: E402

#: The issue's lengths; 32k only where it fits (see :func:`fits`).
LENGTHS = (2048, 4096, 8192, 16384, 32768)
MODES = ("forward", "forward_backward")
BASELINE = "stock_sdpa"
#: Windows shorter than every measured T, so that both passes of these kinds run.
LONG_PARAMS = {"self_extend": {"group_size": 4, "neighbor_window": 256}, "rerope": {"window": 256}}
#: Rows beyond one per registered kind.
VARIANTS = {"kerple_power": {"kind": "kerple", "kernel": "power"}}
#: glibc's malloc in each row's process: every block from 64 KiB up gets its own mapping, returned to the OS when
#: freed. By default the threshold rises with the largest block freed (up to 32 MiB), after which tensors come
#: from the heap, whose freed pages stay resident or not depending on fragmentation: the same row measured
#: 73-120 MiB from one process to the next that way.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
#: Length of the warm-up step before the measured one.
WARMUP_T = 64
#: Share of the machine's available memory a cell may be predicted to need before it is skipped.
MEMORY_SHARE = 0.7


def encodings() -> dict[str, dict | None]:
    """Row name -> posenc config (None: stock sdpa), every token kind of the registry and the variants."""
    rows: dict[str, dict | None] = {BASELINE: None}
    for kind in registry.kinds():
        if not registry.get(kind).capabilities.patch_grid:
            rows[kind] = {"kind": kind, **LONG_PARAMS.get(kind, {})}
    rows.update(VARIANTS)
    return rows


def model_config(tiny: bool, max_length: int):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_length)
    return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_length)


def build_model(posenc: dict | None, tiny: bool, max_length: int, device: str):
    """The same random weights for every row; learned position tables get small random values."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = copy.deepcopy(model_config(tiny, max_length))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if posenc is not None:
        hf_posenc.convert(model, PosEncConfig(**posenc))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".posenc." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.to(device)


def step(model, length: int, mode: str, device: str) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    if mode == "forward":
        model.eval()
        with torch.no_grad():
            model(ids)
        return
    model.train()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_of(run, device: str) -> tuple[int, str]:
    """Bytes ``run()`` adds at its peak, and how they were measured (see the module docstring)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "cuda_max_memory_allocated"
    if not os.path.exists("/proc/self/clear_refs"):  # not Linux: the high-water mark since the process began
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale, "ru_maxrss_since_start"
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    run()
    return _status_bytes("VmHWM") - before, "rss_high_water"


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the resident
    memory before a step holds live data only and the step's own peak is not hidden by reused free pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: large tensors are unmapped on free anyway
        pass


def measure_encoding(encoding: str, lengths, modes, tiny: bool, device: str) -> list[dict]:
    """Every cell of one row: the model built once, per mode a warm-up step at :data:`WARMUP_T`, then each
    length in increasing order, freed memory released before each (:func:`release_freed_memory`). A length
    predicted not to fit (:func:`fits`) and every longer one are skipped with the reason."""
    model = build_model(encodings()[encoding], tiny, max(*lengths, WARMUP_T), device)
    records: list[dict] = []
    for mode in modes:
        step(model, min(WARMUP_T, *lengths), mode, device)
        for length in sorted(lengths):
            reason = fits(records, encoding, length, mode)
            if reason:
                records.append({"encoding": encoding, "T": length, "mode": mode, "skipped": reason})
                continue
            release_freed_memory()
            start = time.perf_counter()
            peak, method = peak_of(lambda length=length, mode=mode: step(model, length, mode, device), device)
            records.append({"encoding": encoding, "T": length, "mode": mode, "peak_bytes": int(peak),
                            "method": method, "device": device, "seconds": time.perf_counter() - start})
            shown = f"{peak / 2**20:.0f} MiB"
            print(f"[memory] T={length} {mode} {encoding}: {shown}", file=sys.stderr, flush=True)
    return records


def run_encoding_in_subprocess(encoding: str, args) -> list[dict]:
    """:func:`measure_encoding` in a fresh Python process: no other row's allocations, warm-ups or imports
    share its heap."""
    command = [sys.executable, str(Path(__file__).resolve()), "--cells", encoding,
               "--lengths", *map(str, args.lengths), "--modes", *args.modes, "--device", args.device,
               "--threads", str(args.threads), *(["--tiny"] if args.tiny else [])]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.row_timeout, check=False,
                              env={**os.environ, **MALLOC_ENV})
    except subprocess.TimeoutExpired:
        return [{"encoding": encoding, "T": t, "mode": m, "skipped": f"row over {args.row_timeout} s"}
                for m in args.modes for t in args.lengths]
    if done.returncode != 0:
        return [{"encoding": encoding, "T": t, "mode": m, "skipped": f"failed (exit {done.returncode})"}
                for m in args.modes for t in args.lengths]
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return _status_available()


def _status_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def fits(records: list[dict], encoding: str, length: int, mode: str) -> str | None:
    """None if the cell may run, else why not: its peak at the previous length, grown quadratically (the
    worst case), would take more than :data:`MEMORY_SHARE` of the memory available now."""
    previous = [r for r in records if r["encoding"] == encoding and r["mode"] == mode and "peak_bytes" in r
                and r["T"] < length]
    if not previous:
        return None
    last = max(previous, key=lambda r: r["T"])
    predicted = last["peak_bytes"] * (length / last["T"]) ** 2
    budget = MEMORY_SHARE * available_bytes()
    if predicted > budget:
        return f"predicted {predicted / 2**30:.1f} GiB > {budget / 2**30:.1f} GiB available"
    return None


def add_ratios(records: list[dict]) -> None:
    base = {(r["T"], r["mode"]): r["peak_bytes"] for r in records
            if r["encoding"] == BASELINE and r.get("peak_bytes", 0) > 0}  # tiny T can add no page at all
    for r in records:
        if "peak_bytes" in r and (r["T"], r["mode"]) in base:
            r["ratio_vs_sdpa"] = r["peak_bytes"] / base[r["T"], r["mode"]]


def benchmark(args) -> list[dict]:
    records: list[dict] = []
    names = list(encodings()) if not args.encodings else [BASELINE, *[e for e in args.encodings if e != BASELINE]]
    for encoding in names:
        if args.smoke:
            records += measure_encoding(encoding, args.lengths, args.modes, args.tiny, args.device)
        else:
            records += run_encoding_in_subprocess(encoding, args)
    add_ratios(records)
    return records


def markdown(records: list[dict]) -> str:
    """One table per mode: rows encodings, columns T, cells ``ratio (MiB)``."""
    lengths = sorted({r["T"] for r in records})
    lines = []
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        label = "forward+backward" if mode == "forward_backward" else mode
        lines += [f"**{label}**: peak memory / stock sdpa's (MiB)", "",
                  "| encoding | " + " | ".join(f"T={t}" for t in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for encoding in dict.fromkeys(r["encoding"] for r in rows):
            cells = []
            for length in lengths:
                found = [r for r in rows if r["encoding"] == encoding and r["T"] == length]
                if not found or "peak_bytes" not in found[0]:
                    cells.append("skipped" if found else "")
                    continue
                r = found[0]
                ratio = f"{r['ratio_vs_sdpa']:.2f}x" if "ratio_vs_sdpa" in r else "-"
                cells.append(f"{ratio} ({r['peak_bytes'] / 2**20:.0f})")
            lines.append(f"| {encoding} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Per mode, two panels against T: peak MiB (log-log) and the ratio to stock sdpa (with the issue's 1.5x
    limit); lines told apart by marker and line style."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    markers, styles = "osD^v<>pPX*h", ("-", "--", "-.", ":")
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9.5), squeeze=False)
    for column, mode in enumerate(modes):
        rows = [r for r in records if r["mode"] == mode and "peak_bytes" in r]
        title = "forward+backward" if mode == "forward_backward" else "forward (no grad)"
        for index, encoding in enumerate(dict.fromkeys(r["encoding"] for r in rows)):
            mine = sorted((r for r in rows if r["encoding"] == encoding), key=lambda r: r["T"])
            style = dict(marker=markers[index % len(markers)], linestyle=styles[index % len(styles)],
                         linewidth=2.5 if encoding == BASELINE else 1.3,
                         color="black" if encoding == BASELINE else None, label=encoding)
            axes[0, column].plot([r["T"] for r in mine], [r["peak_bytes"] / 2**20 for r in mine], **style)
            ratios = [r for r in mine if "ratio_vs_sdpa" in r]
            axes[1, column].plot([r["T"] for r in ratios], [r["ratio_vs_sdpa"] for r in ratios], **style)
        has_ratios = any("ratio_vs_sdpa" in r for r in rows)
        if has_ratios:
            axes[1, column].axhline(1.5, color="red", linestyle=":", linewidth=1)
            axes[1, column].annotate("issue 25 limit, 1.5x", (0.02, 1.5), xycoords=("axes fraction", "data"),
                                     textcoords="offset points", xytext=(0, 4), fontsize=10, color="red")
        else:  # stock sdpa's step added no memory: nothing to divide by
            axes[1, column].text(0.5, 0.5, "no ratio: stock sdpa's step added no memory", ha="center",
                                 transform=axes[1, column].transAxes, fontsize=11)
        for row, ylabel in enumerate(("peak memory added by the step (MiB)", "peak memory / stock sdpa's")):
            ax = axes[row, column]
            if row == 0 or has_ratios:  # a log axis over no data at all cannot place its ticks
                ax.set_xscale("log", base=2)
                ax.legend(fontsize=9)
            if row == 0 and all(r["peak_bytes"] > 0 for r in rows):  # a tiny (smoke) step can add no memory at all
                ax.set_yscale("log")
            ax.set_xlabel("sequence length T (tokens)", fontsize=11)
            ax.set_ylabel(ylabel, fontsize=11)
            ax.set_title(f"{title}, Llama d=256, 2 layers", fontsize=12)
            ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--encodings", nargs="+", help="rows to run (stock sdpa always runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (memory does not depend "
                                                                "on it; one keeps a shared machine usable)")
    parser.add_argument("--row-timeout", type=float, default=3600.0, help="seconds before a row is skipped")
    parser.add_argument("--tiny", action="store_true", help="the smoke test's model")
    parser.add_argument("--smoke", action="store_true", help="tiny model, T=16, rows in this process")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    parser.add_argument("--from-json", help="tables and plot from an earlier run's records")
    parser.add_argument("--cells", metavar="ENCODING", help=argparse.SUPPRESS)  # one row, in this process
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny = True
        if args.lengths == list(LENGTHS):
            args.lengths = [16]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cells:
        print(json.dumps(measure_encoding(args.cells, args.lengths, args.modes, args.tiny, args.device)))
        return []
    records = json.loads(Path(args.from_json).read_text()) if args.from_json else benchmark(args)
    table = markdown(records)
    print(table)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(records, args.plot)
    return records


if __name__ == "__main__":
    main()
