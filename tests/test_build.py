"""The build of the native backend (issue 4): one list of sources and flags (csrc/build.json) read
by both setup.py and CMakeLists.txt, and setup.py's decisions (what it builds, what it skips and
says so). Cheap: nothing is compiled here. The compiles themselves are ci/check_cuda.sh (every .cu
for sm_80/sm_90, no register spill) and ci/check_cmake.sh (the CMake build passes the tests)."""
from __future__ import annotations

import glob
import json
import os
import runpy

import pytest
import setuptools
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = json.load(open(os.path.join(ROOT, "csrc", "build.json")))


def test_build_json_lists_every_source_once():
    listed = CFG["cpu_sources"] + CFG["cuda_host_sources"] + CFG["cuda_sources"]
    assert len(listed) == len(set(listed)), "a source is listed twice"
    on_disk = {os.path.relpath(p, ROOT) for ext in ("cpp", "cu") for p in glob.glob(os.path.join(ROOT, "csrc", f"*.{ext}"))}
    assert set(listed) == on_disk, f"csrc/build.json and csrc/ disagree: {set(listed) ^ on_disk}"
    assert all(s.endswith(".cu") for s in CFG["cuda_sources"])
    assert not any(s.endswith(".cu") for s in CFG["cpu_sources"] + CFG["cuda_host_sources"])
    assert CFG["check_cuda_archs"] == ["80", "90"]


def test_setup_and_cmake_read_the_same_list():
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert '"csrc", "build.json"' in setup_py and "csrc/build.json" in cmake
    for key in ("cpu_sources", "cuda_host_sources", "cuda_sources", "cxx_flags", "nvcc_flags", "openmp_flags",
                "cuda_defines", "include_dirs"):
        assert key in setup_py and key in cmake, key
    for src in CFG["cpu_sources"] + CFG["cuda_sources"]:  # no second list hiding in either file
        assert os.path.basename(src) not in setup_py and os.path.basename(src) not in cmake, src


def _run_setup(monkeypatch, capsys, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="fusedface_setup_test")
    return seen, capsys.readouterr().out


def test_setup_builds_cpu_kernels_and_says_why_cuda_is_skipped(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    seen, out = _run_setup(monkeypatch, capsys)
    (ext,) = seen["ext_modules"]
    assert ext.name == "fusedface._C"
    from torch.utils.cpp_extension import BuildExtension
    assert issubclass(seen["cmdclass"]["build_ext"], BuildExtension)
    if torch.version.cuda is None:
        assert sorted(ext.sources) == sorted(CFG["cpu_sources"])
        assert "CUDA kernels SKIPPED" in out and "CPU build" in out, out
    else:
        assert "CUDA" in out
    assert "MAX_JOBS" in out


def test_setup_skip_switches(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    seen, out = _run_setup(monkeypatch, capsys, FUSEDFACE_SKIP_NATIVE="1")
    assert seen["ext_modules"] == [] and "FUSEDFACE_SKIP_NATIVE=1" in out
    seen, out = _run_setup(monkeypatch, capsys, FUSEDFACE_SKIP_NATIVE="0", FUSEDFACE_SKIP_CUDA_BUILD="1")
    (ext,) = seen["ext_modules"]
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert "SKIPPED: FUSEDFACE_SKIP_CUDA_BUILD=1" in out


@pytest.mark.parametrize("script", ["check_cuda.sh", "check_cmake.sh"])
def test_ci_scripts_exist_and_are_executable(script):
    path = os.path.join(ROOT, "ci", script)
    assert os.path.isfile(path) and os.access(path, os.X_OK), path
