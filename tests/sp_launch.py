"""How the slow sequence-parallel tests launch 2 CPU processes under the shipped Ulysses config.

The launch is the documented one (``accelerate launch --config_file recipes/accelerate/sequence_parallel.yaml
--mixed_precision no ...``) on gloo, with DeepSpeed's CPU accelerator. ``TORCH_EXTENSIONS_DIR`` is passed on as set
outside: DeepSpeed's compiled comm op is cached there, and building it takes many minutes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIG = "recipes/accelerate/sequence_parallel.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_env(cache: Path) -> dict[str, str]:
    """The environment of every process: this checkout first, offline, one thread each, the given model cache."""
    return {**os.environ, "HF_POSENC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu"}


def launch(script: str, *args: str, zero_stage: int = 2) -> list[str]:
    """The command that runs ``script args`` on 2 processes under the shipped launch config."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCH_CONFIG, "--mixed_precision",
            "no", "--zero_stage", str(zero_stage), "--main_process_port", str(free_port()), script, *args]


def run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
