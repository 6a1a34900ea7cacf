#!/usr/bin/env bash
# CI check that CMakeLists.txt builds the same native module as setup.py (issue 4), from the same
# csrc/build.json: configure and build with CMake + Ninja into a temporary directory, put the result
# into a temporary copy of the package, and run the float64 exactness tests of tests/test_native.py
# against THAT module (the script checks that fusedface._C really is the CMake one).
# About a minute of compiling on 2 cores (MAX_JOBS, default 2).
#
# Usage: ci/check_cmake.sh [extra pytest -k expression]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cmake -S "$ROOT" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release | grep -E "fusedface:|Error|error" || true
cmake --build "$WORK/build" -j "${MAX_JOBS:-2}"
SO="$(ls "$WORK"/build/_C.*.so)"
echo "check_cmake: built $SO"

# a package copy with the CMake module in place of any setup.py build
mkdir -p "$WORK/site"
cp -r "$ROOT/fusedface" "$WORK/site/fusedface"
rm -f "$WORK"/site/fusedface/_C*.so
cp -r "$ROOT/triton_kernels" "$WORK/site/fusedface/triton_kernels"
cp "$SO" "$WORK/site/fusedface/"

export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"  # not the checkout: its fusedface/ would shadow the copy
python - "$WORK/site" <<'PY'
import sys
import fusedface._C as C
assert C.__file__.startswith(sys.argv[1]), f"fusedface._C came from {C.__file__}, not the CMake build"
print(f"check_cmake: fusedface._C = {C.__file__}: {C.build_info()}")
PY
cat > "$WORK/site/fusedface_cmake_guard.py" <<PY
import fusedface._C

def pytest_sessionstart(session):
    assert fusedface._C.__file__.startswith("$WORK/site"), f"tests would use {fusedface._C.__file__}"
PY
cd "$ROOT/tests"
python -m pytest -q -p no:cacheprovider test_native.py -k "${1:-float64 or opcheck or kept_block}" \
  --rootdir "$WORK/site" -o addopts="" -p fusedface_cmake_guard 2>&1 | tail -n 5
echo "check_cmake: PASS"
