"""Build script: the pure-Python package always; the compiled module ``fusedface._C`` only when
``csrc/`` holds sources (see docs/build.md). Nothing pretends a compiled module exists."""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        print("fusedface: csrc/ holds no C++ sources yet: building the pure-Python package "
              "(backends: reference, torch, and triton where Triton is installed)")
        return [], {}
    raise RuntimeError("csrc/ holds sources but setup.py does not know how to build them yet")


ext_modules, cmdclass = native_extensions()

setup(
    packages=["fusedface", "fusedface.triton_kernels"],
    package_dir={"fusedface": "fusedface", "fusedface.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
