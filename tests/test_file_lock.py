"""``paths.file_lock`` excludes a second process until the first releases it (filelock backend)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A holder: logs "want" once imported, takes the lock, logs "enter", waits for its release file, logs
# "exit", releases. Imports take seconds on a loaded machine, so the test times from "want", not from start.
HOLDER = """
import sys, time
from pathlib import Path
from hf_posenc.extension.paths import file_lock
lock, log, name, release = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
with log.open("a") as f:
    f.write(f"want {name}\\n")
with file_lock(lock):
    with log.open("a") as f:
        f.write(f"enter {name}\\n")
    while not release.exists():
        time.sleep(0.02)
    with log.open("a") as f:
        f.write(f"exit {name}\\n")
"""


def _start(tmp_path: Path, name: str, release: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", HOLDER, str(tmp_path / "sub" / "x.lock"), str(tmp_path / "log"), name, str(release)]
    return subprocess.Popen(args, env=env)


def _wait_for(log: Path, line: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and line in log.read_text().splitlines():
            return
        time.sleep(0.02)
    raise AssertionError(f"{line!r} never appeared in {log}: {log.read_text() if log.exists() else '(no log)'}")


def test_second_process_waits_for_the_first(tmp_path):
    log, release_a, release_b = tmp_path / "log", tmp_path / "release_a", tmp_path / "release_b"
    release_b.touch()  # b leaves as soon as it gets in
    first = _start(tmp_path, "a", release_a)
    second = None
    try:
        _wait_for(log, "enter a")
        second = _start(tmp_path, "b", release_b)
        _wait_for(log, "want b")
        time.sleep(1.0)  # b is asking for the lock now; without exclusion it would log "enter b" at once
        assert second.poll() is None, "the second holder finished while the first held the lock"
        assert log.read_text().splitlines() == ["want a", "enter a", "want b"]
        release_a.touch()
        assert first.wait(60) == 0 and second.wait(60) == 0
    finally:
        release_a.touch()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert log.read_text().splitlines() == ["want a", "enter a", "want b", "exit a", "enter b", "exit b"]
    assert (tmp_path / "sub").is_dir()  # missing parent folders of the lock file are created

