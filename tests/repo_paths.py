"""Where the repository and the tests' helper modules are, for tests that start subprocesses or read repository
files (importable from any test folder: conftest.py puts tests/ on sys.path)."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
"""tests/: the helper modules (peers, serving_models, sampler_helpers) a subprocess imports from here."""
REPO = os.path.dirname(TESTS)
"""The repository's root."""
