"""What pyproject.toml promises: a CUDA extra the README names, and a bounded flax."""

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).parents[1]


def _requirements(names: list[str]) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, names)}


def test_cuda_extra_and_flax_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cuda = _requirements(project["optional-dependencies"]["cuda"])
    assert cuda["jax"].extras == {"cuda13"}
    assert 'pip install -e ".[test,cuda]"' in (ROOT / "README.md").read_text()
    flax = _requirements(project["dependencies"])["flax"].specifier
    assert Version("0.12.8") in flax and Version("0.13.0") not in flax

