"""Importing fastdiff without its compiled extension, and the peer loader in tests/peers.py.

Both run in a fresh interpreter so the test session's own imports are not disturbed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# A meta path finder that makes the named modules unimportable (as if never built / broken wheel).
BLOCKER = textwrap.dedent("""
    import sys

    class _Block:
        def __init__(self, names, exc):
            self.names, self.exc = names, exc

        def find_spec(self, name, path=None, target=None):
            if name in self.names or any(name.startswith(n + ".") for n in self.names):
                raise self.exc(f"{name} hidden by the test")
            return None

    def block(names, exc=ModuleNotFoundError):
        sys.meta_path.insert(0, _Block(set(names), exc))
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


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
