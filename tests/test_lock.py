"""requirements/lock.txt: it pins every dependency pyproject.toml declares (the engine's, every extra's, the test
peers'), and the environment the tests run in is the locked one (``make test-latest`` sets FASTDIFF_UNLOCKED=1:
it runs against the newest releases on purpose)."""

from __future__ import annotations

import importlib.metadata
import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from repo_paths import REPO


def _lock() -> dict:
    pins = {}
    with open(os.path.join(REPO, "requirements", "lock.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line).groups()
                pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list:
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        project = tomllib.loads(f.read())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(line) for line in lines if canonicalize_name(Requirement(line).name) != "fastdiff"]


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked: run `make lock`"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (str(req), pins[name])
    assert "k-diffusion" in pins  # the test peer the Makefile installs without its dependencies


@pytest.mark.skipif(os.environ.get("FASTDIFF_UNLOCKED") == "1", reason="make test-latest: the newest releases")
def test_the_environment_is_the_locked_one():
    wrong = {}
    for name, version in _lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements/lock.txt (locked, installed): {wrong}"
