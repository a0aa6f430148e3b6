"""The CoPE paper's counting task: train each encoding from scratch, 3 seeds, error in and beyond distribution.

Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important",
https://arxiv.org/abs/2405.18719, Table 3. The library parts live in ``hf_posenc.experiments.counting``:
``task`` (programs, answer-only batches, models), ``config`` (the preset), ``recipe`` (resumable cells) and
``report``.

Usage:
    python recipes/counting_task.py --config recipes/configs/counting_quick.yaml --out runs/counting_quick
    python $(hf-posenc recipes path counting_task) --config counting_quick     (installed; preset by name)

Re-running with the same ``--out`` skips every finished (encoding, seed) cell. ``--results-dir DIR``
also copies ``results.{json,md}`` and the plot there (the committed tables live in
``recipes/results/counting/``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line (also used by tests/test_readme.py to dry-run the README's commands)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a counting YAML, or a preset name (counting_quick)")
    parser.add_argument("--out", help="output folder (default runs/<config name>); re-runs resume in it")
    parser.add_argument("--results-dir", help="also copy results.json/.md and the plot into this folder")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from hf_posenc.experiments.config import ConfigError
    from hf_posenc.experiments.counting.config import load_config
    from hf_posenc.experiments.counting.recipe import run
    from hf_posenc.presets import resolve_config

    args = build_parser().parse_args(argv)
    try:
        path = resolve_config(args.config, "counting")
        cfg = load_config(path)
    except (FileNotFoundError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(args.out or Path("runs") / path.stem)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "counting.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("hf_posenc")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    results = run(cfg, out, progress=not args.no_progress)
    print((out / "results.md").read_text())
    if args.results_dir:
        dest = Path(args.results_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md", "error_vs_length.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, dest / name)
    print(f"wall time {results['run_seconds'] / 60:.1f} min, load average {results['load_average']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
