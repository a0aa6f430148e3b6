"""Print pip constraints that pin every dependency of pyproject.toml to its declared lower bound.

CI's second pass installs the project with ``pip install -c <this output>``, so the oldest versions the
project claims to support are the ones it is tested on, read from pyproject.toml itself (no list to
keep in step by hand). torch is the exception: the only torch build available offline is 2.13.0, and
any other request downloads several GB of CUDA packages.

Usage: ``python .ci/lower_bounds.py [pyproject.toml] > constraints.txt``; ``--markdown`` prints the
README's list of the tested lower bounds instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

#: Pins that replace a dependency's lower bound, with the reason.
OVERRIDES = {"torch": "2.13.0"}  # the one build on this workplace's disk (see README)


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """``{name: version}`` for every runtime and ``test`` dependency with a ``>=`` bound.

    Raises:
        ValueError: A dependency without a lower bound (every dependency must declare one).
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]
    pins = {}
    for line in requirements:
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if not floors:
            raise ValueError(f"{requirement.name}: no '>=' lower bound in pyproject.toml ({line!r})")
        pins[requirement.name] = OVERRIDES.get(requirement.name, floors[0])
    return pins


def markdown(pins: dict[str, str]) -> str:
    """The README line that states the oldest tested versions."""
    return "Oldest versions tested (CI's second pass): " + ", ".join(f"`{n}` {v}" for n, v in pins.items()) + "."


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--markdown"]
    path = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "pyproject.toml"
    pins = lower_bounds(path)
    if "--markdown" in sys.argv:
        print(markdown(pins))
    else:
        for name, version in pins.items():
            print(f"{name}=={version}")
