"""Does FlexAttention make CPU evaluation of the bias encodings cheaper at long context? (issue 22, item 1)

One causal attention call (``B=1, H=8, D=64``, fp32, forward without gradient) at each ``T``, for ALiBi, T5 and
KERPLE, through the kernel the sdpa backend selects today and through ``flex_compiled`` (``torch.compile``-d
flex, the bias as ``score_mod``) and ``flex`` (unfused reference; skipped above ``--unfused-max``). Each
(kind, kernel, T) runs in a fresh process: time is the median of ``--reps`` calls after a warm-up (which pays
for compilation); memory is the process's peak resident set during the timed calls above its resident set
before them (``VmHWM``, reset through ``/proc/self/clear_refs``).

    python benchmarks/flex_cpu.py --lengths 8192 16384 --json flex_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def one(kind: str, kernel: str, length: int, reps: int, threads: int) -> dict:
    import torch

    from hf_posenc import PosEncConfig, kernels, registry

    torch.set_num_threads(threads)
    heads, dim = 8, 64
    entry = registry.get(kind)
    layer = registry.LayerSpec(num_heads=heads, head_dim=dim, max_position_embeddings=length)
    posenc = entry.build(PosEncConfig(kind=kind), layer)
    for p in posenc.parameters():
        p.requires_grad_(False)
        p.uniform_(0.5, 1.0)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    pos = torch.arange(length)
    call = kernels.Call(device="cpu", dtype=torch.float32, backend="sdpa", queries=length, query=q, key=k, value=v,
                        q_pos=pos, k_pos=pos, scaling=dim ** -0.5, posenc=posenc, capabilities=entry.capabilities)
    name = kernels.select(entry.capabilities, call) if kernel == "default" else kernel
    with torch.no_grad():
        kernels.KERNELS[name](call)  # warm-up (compilation)
        before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            kernels.KERNELS[name](call)
            times.append(time.perf_counter() - start)
        peak = _rss_kb("VmHWM")
    return {"kind": kind, "kernel": name, "T": length, "time_s": statistics.median(times),
            "peak_mem_bytes": max(0, peak - before) * 1024, "threads": threads}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--kinds", nargs="+", default=["alibi", "t5_bias", "kerple"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unfused-max", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]), args.reps, args.threads)))
        return []
    records = []
    for length in args.lengths:
        for kind in args.kinds:
            for kernel in ("default", "flex_compiled", "flex"):
                if kernel == "flex" and length > args.unfused_max:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", kind, kernel, str(length), "--reps",
                                      str(args.reps), "--threads", str(args.threads)], capture_output=True, text=True)
                if out.returncode:
                    records.append({"kind": kind, "kernel": kernel, "T": length, "error": out.stderr[-300:]})
                else:
                    records.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(records[-1], file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
