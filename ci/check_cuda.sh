#!/usr/bin/env bash
# CI check of the CUDA side of the native backend on a machine without a GPU (issue 4):
#
#  1. every csrc/*.cu is listed in csrc/build.json (the one list setup.py and CMake build from);
#  2. every .cu compiles with the local nvcc for each architecture in build.json's
#     "check_cuda_archs" (sm_80, sm_90), with build.json's nvcc flags and `-Xptxas -v`;
#     the check FAILS on any compile error or any register spill ("N bytes spill stores/loads"
#     with N > 0) and prints registers/spills per kernel;
#  3. the thin ATen layer (csrc/margin_softmax_cuda.cpp, built only against a CUDA build of torch)
#     is compiled with -fsyntax-only against the installed torch's real ATen and c10/cuda headers
#     (ci/cuda_host_stubs supplies the one CMake-generated header a CPU wheel lacks).
#
# Usage: ci/check_cuda.sh        (NVCC=/path/to/nvcc picks the compiler, NVCC_EXTRA_FLAGS adds nvcc flags;
#                                 exit status 1 on any failure)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: FAIL: no nvcc on PATH (set NVCC=/path/to/nvcc); the CUDA kernels cannot be checked" >&2
  exit 1
fi
# the toolkit's include dir (nvcc may be a wrapper script): ask nvcc itself, else the usual places
CUDA_INC="$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
for cand in "$CUDA_INC" "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include; do
  if [[ -n "$cand" && -f "$cand/cuda_runtime.h" ]]; then CUDA_INC="$cand"; break; fi
done
echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

python - "$NVCC" "$OUT" <<'PY'
import glob, json, os, re, subprocess, sys

nvcc, out = sys.argv[1], sys.argv[2]
cfg = json.load(open("csrc/build.json"))
listed = set(cfg["cuda_sources"])
found = set(sorted(glob.glob("csrc/**/*.cu", recursive=True)))
failures = []
if found - listed:
    failures.append(f"not listed in csrc/build.json cuda_sources: {sorted(found - listed)}")
if listed - found:
    failures.append(f"listed in csrc/build.json but missing: {sorted(listed - found)}")

flags = list(cfg["nvcc_flags"]) + [f"-D{d}" for d in cfg["cuda_defines"]] + [f"-I{d}" for d in cfg["include_dirs"]]
flags += os.environ.get("NVCC_EXTRA_FLAGS", "").split()
spill_re = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
func_re = re.compile(r"Function properties for (\S+)")
regs_re = re.compile(r"Used (\d+) registers")
for src in sorted(found & listed):
    for arch in cfg["check_cuda_archs"]:
        obj = os.path.join(out, f"{os.path.basename(src)}.sm_{arch}.o")
        cmd = [nvcc, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", src, "-o", obj]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or re.search(r"\berror\b", log):
            failures.append(f"{src} sm_{arch}: nvcc failed (exit {proc.returncode})\n{log}")
            continue
        kernels, spills, current = 0, [], None
        rows = []
        for line in log.splitlines():
            m = func_re.search(line)
            if m:
                current = m.group(1)
                continue
            m = spill_re.search(line)
            if m and current:
                st, ld = int(m.group(1)), int(m.group(2))
                if st or ld:
                    spills.append(f"{current}: {st} bytes spill stores, {ld} bytes spill loads")
                rows.append([current, st, ld, None])
                continue
            m = regs_re.search(line)
            if m and rows and rows[-1][3] is None:
                rows[-1][3] = int(m.group(1))
        kernels = len(rows)
        maxreg = max((r[3] or 0) for r in rows) if rows else 0
        print(f"check_cuda: {src} sm_{arch}: OK to compile, {kernels} functions, max {maxreg} registers, "
              f"{len(spills)} with spills")
        for r in rows:
            name = subprocess.run(["c++filt", r[0]], capture_output=True, text=True).stdout.strip() or r[0]
            print(f"    regs={r[3]!s:>4} spill_st={r[1]:>3} spill_ld={r[2]:>3}  {name[:150]}")
        if not rows:
            failures.append(f"{src} sm_{arch}: no `ptxas -v` output parsed (did -Xptxas -v take effect?)")
        failures += [f"{src} sm_{arch}: register spill: {s}" for s in spills]

if failures:
    print("check_cuda: FAIL", file=sys.stderr)
    for f in failures:
        print("  - " + f, file=sys.stderr)
    sys.exit(1)
print("check_cuda: every .cu compiled for " + ", ".join(f"sm_{a}" for a in cfg["check_cuda_archs"]) +
      " with no register spill")
PY

# 3. the ATen layer: syntax against the real torch headers (a CUDA build of torch compiles it for real)
TORCH_INC=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
CXXFLAGS=$(python -c "import json; c = json.load(open('csrc/build.json')); print(' '.join(c['cxx_flags'] + ['-D' + d for d in c['cuda_defines']] + ['-I' + d for d in c['include_dirs']]))")
for src in $(python -c "import json; print(' '.join(json.load(open('csrc/build.json'))['cuda_host_sources']))"); do
  # the stub dir comes after torch's include dirs: it only fills the one missing header
  if ! ${CXX:-c++} $CXXFLAGS -fsyntax-only $TORCH_INC -I"$CUDA_INC" -Ici/cuda_host_stubs "$src"; then
    echo "check_cuda: FAIL: $src does not compile against torch's ATen/c10 CUDA headers" >&2
    exit 1
  fi
  echo "check_cuda: $src: syntax OK against torch $(python -c 'import torch; print(torch.__version__)') headers"
done
echo "check_cuda: PASS"
