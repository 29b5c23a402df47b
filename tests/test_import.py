"""Importing fastdiff: without its compiled extension, without an optional feature's extra, from the repository's
root (nothing in the tree shadows an installed distribution), a C++ op library built for another torch; and the
peer loader in tests/peers.py.

Each runs in a fresh interpreter so the test session's own imports are not disturbed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from repo_paths import REPO, TESTS

# A meta path finder that makes the named modules unimportable (as if never built / broken wheel).
BLOCKER = textwrap.dedent("""
    import sys

    class _Block:
        def __init__(self, names, exc):
            self.names, self.exc = names, exc

        def find_spec(self, name, path=None, target=None):
            if name in self.names or any(name.startswith(n + ".") for n in self.names):
                exc = self.exc(f"{name} hidden by the test")
                exc.name = name  # as the import system's own ModuleNotFoundError
                raise exc
            return None

    def block(names, exc=ModuleNotFoundError):
        sys.meta_path.insert(0, _Block(set(names), exc))
""")


def _run(code: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    """``code`` in a fresh ``python -c`` started in ``cwd`` (which puts ``cwd`` first on sys.path, as a user's REPL
    or notebook started there does), with tests/ importable and the BLOCKER helpers defined."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_without_extension_says_how_to_build():
    r = _run("""
        block(["fastdiff._C"])
        try:
            import fastdiff
        except ImportError as exc:
            print("MESSAGE:", exc)
            raise SystemExit(3)
        raise SystemExit("imported fastdiff although fastdiff._C was hidden")
    """)
    assert r.returncode == 3, r.stdout + r.stderr
    msg = r.stdout
    assert "fastdiff._C" in msg
    assert "make install" in msg or "pip install -e ." in msg, msg


def test_import_with_extension_works():
    """The control for the test above: the same interpreter setup imports fastdiff when nothing is hidden."""
    r = _run("""
        block(["not_a_module_anyone_imports"])
        import fastdiff
        print(fastdiff.Schedule.vp_linear().alpha(0.5))
    """)
    assert r.returncode == 0, r.stdout + r.stderr


def test_k_diffusion_sampling_without_torchvision():
    """peers.k_diffusion_sampling() loads k-diffusion's real sampling code when torchvision cannot be
    imported (the OSError stands for a CUDA wheel that fails to load against the CPU torch), without
    running k_diffusion/__init__, and the torchvision placeholder k_diffusion.utils keeps fails loudly if
    anything uses it; afterwards no torchvision module is left in sys.modules."""
    r = _run("""
        block(["torchvision"], OSError)
        import sys
        import peers
        sampling = peers.k_diffusion_sampling()
        assert peers.k_diffusion_sampling() is sampling  # cached
        assert sampling.__name__ == "k_diffusion.sampling"
        assert "k_diffusion.models" not in sys.modules and "k_diffusion.evaluation" not in sys.modules
        s = sampling.get_sigmas_karras(3, 0.1, 10.0, rho=1.0)
        assert [round(float(v), 4) for v in s] == [10.0, 5.05, 0.1, 0.0], s
        assert "torchvision" not in sys.modules  # the placeholders are gone again (diffusers probes for it)
        tf = sys.modules["k_diffusion.utils"].TF
        try:
            tf.to_tensor(None)
        except peers.PeerUnavailable as e:
            assert "torchvision" in str(e) and "hidden by the test" in str(e), e
        else:
            raise SystemExit("placeholder did not raise")
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_k_diffusion_sampling_in_session(kdiff_sampling):
    assert kdiff_sampling.__name__ == "k_diffusion.sampling"
    assert callable(kdiff_sampling.get_sigmas_karras)


def test_diffusers_model_classes_import():
    """The project's environment must load diffusers' networks (no torchvision that cannot load is installed)."""
    r = _run("""
        from diffusers import UNet2DConditionModel, UNet2DModel, DiTTransformer2DModel  # noqa: F401
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_the_tests_import_the_installed_package_not_the_tree():
    """No repository folder but tests/ is on the test session's sys.path (importlib mode, the pytest script)."""
    assert not {os.path.abspath(p or os.curdir) for p in sys.path} & {REPO, os.path.join(REPO, "fastdiff")}


def test_nothing_in_the_tree_shadows_an_installed_distribution():
    """From the repository's root, ``import kernels`` is Hugging Face's package (transformers imports it), and
    diffusers' UNet classes import; the project's kernels are ``fastdiff.kernels`` only."""
    r = _run("""
        import os, sys
        assert sys.path[0] in ("", os.getcwd()), sys.path[:2]
        import kernels
        import fastdiff.kernels.op
        from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: F401
        print("KERNELS", kernels.__file__)
        print("FASTDIFF_KERNELS", fastdiff.kernels.op.__file__)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert os.path.join("site-packages", "kernels") in lines["KERNELS"], lines
    assert lines["FASTDIFF_KERNELS"].startswith(os.path.join(REPO, "fastdiff", "kernels")), lines
    assert not [
        name
        for name in os.listdir(REPO)
        if os.path.isfile(os.path.join(REPO, name, "__init__.py")) and name != "fastdiff"
    ], "a top-level package in the repository root can shadow a distribution"


@pytest.mark.parametrize(
    "command, blocked, extra",
    [
        ("fastdiff.cli.main(['serve'])", "uvicorn", "serve"),
        ("fastdiff.cli.main(['serve', '--ray'])", "ray", "ray"),
        ("fastdiff.bench.throughput.main(['--steps', '2', '--repeats', '1', '--json', ''])", "diffusers", "bench"),
        (
            "fastdiff.bench.throughput.main(['step', '--steps', '2', '--repeats', '1', '--json', ''])",
            "diffusers",
            "bench",
        ),
        ("__import__('fastdiff.diffusers')", "diffusers", "diffusers"),
        ("__import__('fastdiff.pretrained.train').pretrained.train.load_digits_dataset()", "sklearn", "digits"),
    ],
)
def test_a_feature_without_its_extra_names_the_extra(command, blocked, extra):
    """Each optional feature, run with its dependency missing, fails with one line naming the extra to install;
    the command line says it as a usage error (exit 2) rather than a traceback."""
    r = _run(f"""
        block([{blocked!r}])
        import fastdiff.cli, fastdiff.bench.throughput
        from fastdiff.extras import MissingExtra
        try:
            {command}
        except MissingExtra as exc:
            print("MESSAGE:", exc)
            raise SystemExit(3)
    """)
    hint = f"pip install 'fastdiff[{extra}]'"
    if command.startswith("fastdiff.cli"):
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.strip().count("\n") == 0 and hint in r.stderr and blocked in r.stderr, r.stderr
    else:
        assert r.returncode == 3 and hint in r.stdout and repr(blocked) in r.stdout, r.stdout + r.stderr


def test_require_and_missing_extra():
    from fastdiff.extras import EXTRAS, MissingExtra, require

    assert require("json", "serve").dumps([1]) == "[1]"
    with pytest.raises(MissingExtra, match=r"pip install 'fastdiff\[plot\]'") as info:
        require("fastdiff_no_such_module", "plot")
    assert info.value.name == "fastdiff_no_such_module" and isinstance(info.value, ImportError)
    with pytest.raises(ValueError, match="extra must be one of"):
        require("fastdiff_no_such_module", "bogus")
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        declared = tomllib.loads(f.read())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(declared), "every extra a hint names must exist in pyproject.toml"


def test_the_op_library_names_the_torch_it_was_built_against(tmp_path):
    import torch

    import fastdiff.kernels.op as op
    from fastdiff.kernels.ops_version import TORCH_VERSION_MARKER, built_torch_version

    library = importlib.util.find_spec("fastdiff._ops").origin
    assert built_torch_version(library) == torch.__version__ and op.CPU_KERNEL_IN_CPP
    fake = tmp_path / "lib.so"
    fake.write_bytes(b"\x7fELF junk" + TORCH_VERSION_MARKER + b"1.2.3+cu999\0more")
    assert built_torch_version(str(fake)) == "1.2.3+cu999"
    fake.write_bytes(b"no marker")
    assert built_torch_version(str(fake)) is None and built_torch_version(str(tmp_path / "missing.so")) is None


def test_an_op_library_built_for_another_torch_is_not_loaded(monkeypatch):
    """fastdiff._ops built for another torch (another C++ ABI) is refused with a warning before it is loaded; the op
    then keeps its Python CPU kernel (tests/test_fused_step_cpu.py runs that kernel)."""
    import fastdiff.kernels.op as op

    monkeypatch.setattr(op, "built_torch_version", lambda path: "0.0.1")
    with pytest.warns(UserWarning, match=r"built against torch 0\.0\.1.*make install"):
        assert op._load_cpp_cpu_kernel() is False


@pytest.mark.parametrize(
    "old, new",
    [
        ("fastdiff.models", "fastdiff.eval.exact"),
        ("fastdiff.interpolate", "fastdiff.solvers.interpolate"),
        ("fastdiff.likelihood", "fastdiff.solvers.likelihood"),
        ("fastdiff.ode", "fastdiff.solvers.ode"),
        ("fastdiff.quality", "fastdiff.eval.quality"),
        ("fastdiff.train", "fastdiff.pretrained.train"),
        ("fastdiff.x0_clip", "fastdiff.runtime.x0_clip"),
    ],
)
def test_moved_modules_answer_at_their_old_path(old, new):
    """The import paths the 0.2 README documented keep working for one release: the old name is the new module."""
    r = _run(f"""
        import importlib
        old = importlib.import_module({old!r})
        new = importlib.import_module({new!r})
        assert old is new, (old, new)
        exec("from {old} import *")
        import {old}
        assert {old} is new
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
