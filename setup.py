"""Builds fastdiff's C++ core, fastdiff._C (pybind11, C++17, -O3, no torch headers)."""
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Compile the C++ sources in parallel (the build needs no ninja; ParallelCompile uses all cores).
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

ext = Pybind11Extension(
    "fastdiff._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    # OpenMP for the CPU fused step (csrc/fused_step.cpp); -ffp-contract=off keeps a*b + c two roundings
    # as in the reference, so the result does not depend on whether the compiler fuses; -fno-math-errno lets
    # sqrt vectorise (nothing here reads errno).
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
    extra_link_args=["-fopenmp"],
    depends=sorted(glob("csrc/*.h")),
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
