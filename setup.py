"""Builds fastdiff's C++ extensions:

- ``fastdiff._C`` (pybind11, C++17, -O3, no torch headers): schedules, grids, coefficient programs, Philox, the CPU
  step on raw pointers;
- ``fastdiff._ops`` (torch's C++ extension API): the CPU kernel of the ``fastdiff::fused_step`` op registered in
  C++, so a sampler step reaches the C++ step without Python in between (kernels/op.py loads it). It is built
  against the torch that runs it, so only where torch is importable at build time: ``make`` builds it in the
  project's environment (``setup.py build_ext --inplace``); an isolated pip build without torch makes ``_C`` alone,
  and the op then runs its Python CPU kernel (same results, ~8 us more per step).
"""
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    BuildExtension = CppExtension = None

# OpenMP for the CPU fused step (csrc/fused_step.cpp); -ffp-contract=off keeps a*b + c two roundings as in the
# reference, so the result does not depend on whether the compiler fuses; -fno-math-errno lets sqrt vectorise
# (nothing here reads errno).
KERNEL_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

extensions = [Pybind11Extension(
    "fastdiff._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=KERNEL_FLAGS,
    extra_link_args=["-fopenmp"],
    depends=sorted(glob("csrc/*.h")),
)]
if CppExtension is not None:
    extensions.append(CppExtension(
        "fastdiff._ops",
        sorted(glob("csrc/torch/*.cpp")),  # the op's kernel, and the CPU step's sources (which include no torch)
        include_dirs=["csrc"],
        extra_compile_args=KERNEL_FLAGS + ["-std=c++20"],  # what torch's headers are written for
        extra_link_args=["-fopenmp"],
        depends=sorted(glob("csrc/*.h")),
    ))
    # torch's BuildExtension compiles both (with ninja, in parallel).
    command = BuildExtension
else:
    ParallelCompile("NPY_NUM_BUILD_JOBS").install()  # compile the C++ sources in parallel
    command = build_ext

setup(ext_modules=extensions, cmdclass={"build_ext": command})
