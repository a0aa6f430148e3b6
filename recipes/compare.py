"""Run the whole context-extension comparison grid and write its report.

    python recipes/compare.py recipes/configs/compare_quick.yaml --out runs/compare_quick [key.sub=value ...]
    hf-posenc compare quick --out runs/compare_quick     # installed: a shipped preset by name, or a YAML path

Re-running with the same --out resumes: finished variants are not recomputed. ``--readme FILE``
also writes the generated table and plot into FILE between the compare markers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package. Installed (hf_posenc/_recipes) or copied out
# with `hf-posenc recipes cp`, the folder above holds no package, and putting it on sys.path would make
# hf_posenc's own modules (config, hub, ...) importable as top-level names.
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "hf_posenc" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from hf_posenc.experiments.config import ConfigError  # noqa: E402
from hf_posenc.experiments.context_extension import compare  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_command_arguments(parser)  # the same arguments as `hf-posenc compare`
    args = parser.parse_intermixed_args(argv)  # overrides may follow --out
    try:
        return compare.command_from_args(args)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()
