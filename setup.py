"""Build script: the pure-Python package always, and the compiled module ``fusedface._C`` (the
native backend) whenever torch and a C++ compiler are there. Sources and flags come from
``csrc/build.json``, the one list that ``CMakeLists.txt`` reads too (see docs/build.md).

What is built:
* the CPU kernels, always (ninja through torch's BuildExtension; ``MAX_JOBS`` sets the parallel jobs);
* the CUDA kernels too, only when torch is a CUDA build (``torch.version.cuda``) AND a CUDA toolkit
  is found (``CUDA_HOME``/``nvcc``); ``TORCH_CUDA_ARCH_LIST`` picks the architectures. Never gated on
  ``torch.cuda.is_available()``: build machines have no GPU.

Environment: ``FUSEDFACE_SKIP_NATIVE=1`` builds the pure-Python package only;
``FUSEDFACE_SKIP_CUDA_BUILD=1`` builds the CPU kernels only even where CUDA could be built.
Every skip is printed with its reason. Nothing pretends a compiled module exists.
"""
import json
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fusedface: {msg}", flush=True)


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _build_config():
    with open(os.path.join(HERE, "csrc", "build.json")) as fh:
        return json.load(fh)


def _cuda_decision(torch, cpp_extension):
    """(build_cuda, reason) — the reason is printed either way."""
    if _flag("FUSEDFACE_SKIP_CUDA_BUILD"):
        return False, "FUSEDFACE_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return False, (f"torch is built for CUDA {torch.version.cuda} but no CUDA toolkit was found "
                       "(set CUDA_HOME or put nvcc on PATH)")
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def native_extensions():
    if _flag("FUSEDFACE_SKIP_NATIVE"):
        _say("FUSEDFACE_SKIP_NATIVE=1: skipping the native backend (fusedface._C); "
             "backends: reference, torch, and triton where Triton is installed")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:  # building without torch: the pure-Python package still works
        _say(f"torch is not importable at build time ({err}): skipping the native backend "
             "(build with `pip install --no-build-isolation .` in an environment that has torch)")
        return [], {}

    cfg = _build_config()
    include_dirs = [os.path.join(HERE, d) for d in cfg["include_dirs"]]
    cxx = list(cfg["cxx_flags"])
    link = []
    if torch.backends.openmp.is_available():  # at::parallel_for is inline OpenMP in such builds
        cxx += cfg["openmp_flags"]
        link += cfg["openmp_flags"]
    else:
        _say("torch is not built with OpenMP: the CPU kernels use torch's native thread pool")

    build_cuda, why = _cuda_decision(torch, cpp_extension)
    jobs = os.environ.get("MAX_JOBS", "(ninja default)")
    if build_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch's default list)")
        _say(f"building fusedface._C with CPU and CUDA kernels: {why}; TORCH_CUDA_ARCH_LIST={arch}; MAX_JOBS={jobs}")
        defines = [f"-D{d}" for d in cfg["cuda_defines"]]
        ext = cpp_extension.CUDAExtension(
            cfg["module"],
            cfg["cpu_sources"] + cfg["cuda_host_sources"] + cfg["cuda_sources"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + defines, "nvcc": list(cfg["nvcc_flags"]) + defines},
            extra_link_args=link,
        )
    else:
        _say(f"building fusedface._C with CPU kernels only; CUDA kernels SKIPPED: {why}; MAX_JOBS={jobs}")
        ext = cpp_extension.CppExtension(
            cfg["module"],
            cfg["cpu_sources"],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    packages=["fusedface", "fusedface.backends", "fusedface.distributed", "fusedface.triton_kernels"],
    package_dir={"fusedface": "fusedface", "fusedface.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
