"""The one harness of the benchmark scripts: grids and points, timing, peak memory, the peers
(baselines), the machine's GEMM rate and description. Every script in bench/ that times something or
measures memory does it through this module; none has a helper of its own.

* **Timing**: :func:`time_reps` is the one timing loop (optional untimed warm-up calls, an untimed
  ``prepare()`` before each repetition, ``number`` calls between two clock readings — CPU:
  ``time.perf_counter``; CUDA: events after a synchronise — repeated until ``min_reps`` and
  ``target_s`` of timed work or ``max_reps``). :func:`median_ms` is the median in ms of a call
  with gradients reset before each: ``triton.testing.do_bench`` on CUDA, :func:`time_reps` elsewhere.
* **Memory**: :func:`status_kib` is the one reader of ``/proc/self/status`` (``VmRSS``, ``VmHWM``;
  and of ``/proc/meminfo``): it raises when the field is missing, never returns 0.
  :class:`PeakMemory` is the one peak measurement (CPU: ``VmHWM`` reset through
  ``/proc/self/clear_refs`` by :func:`reset_peak_rss`, against ``VmRSS`` at the start; CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, against
  ``memory_allocated`` at the start); :func:`measure_peak` runs one call under it and counts the
  gradients it allocates apart.
* **Peers**: :func:`insightface_loss` (InsightFace's head as arcface_torch writes it),
  :func:`materialised_arcface` (the margin on the target column only) and :func:`gemm_floor`
  (the bare matrix products of a fused design).
* :func:`env_vars` sets environment switches for a block.

Each op script (``bench_margin_softmax.py``, ``bench_npt.py``) defines

* ``OP``: its name;
* ``PROVIDERS``: ``{name: Provider}``: the fusedface backends of ``fusedface.available_backends(device)``
  (picked up at run time, so new backends fold in) and the peers;
* ``setup(provider, shape) -> Case``: inputs and a forward closure for one provider at one point;
* ``LOSSES`` and the FLOP formula of each provider (``Provider.flops``).

Every point runs in its own fresh subprocess (``python bench/harness.py --worker '<json>'``):
a warm-up on a tiny problem, then ONE step at the real size whose peak memory is measured with
:func:`measure_peak`, then the timed repetitions (:func:`time_reps`). A peer that runs out of
memory kills only its worker, and the point is reported as such.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for _p in (BENCH_DIR, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")
OPS = ("margin_softmax", "npt")


# ----------------------------------------------------------------------------- points and grids

@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point (everything but the provider)."""
    op: str
    loss: str
    B: int
    D: int
    C: int
    dtype: str = "fp32"
    mode: str = "full"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def id(self) -> str:
        return f"{self.loss}-B{self.B}-D{self.D}-C{human(self.C)}-{self.dtype}-{self.mode}"


def human(n: int) -> str:
    """10000 -> '10k', 1000000 -> '1M'."""
    for div, suf in ((10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suf}"
    return str(n)


def parse_count(s: str) -> int:
    """'10k' -> 10000, '1M' -> 1000000, '123' -> 123."""
    s = s.strip().lower()
    mult = {"k": 10**3, "m": 10**6}.get(s[-1:], 1)
    return int(float(s[:-1] if mult != 1 else s) * mult)


# Grids per op: axes of the full grid of issue 7, a default subset that finishes in about ten
# minutes on a 2-core CPU, and the tiny smoke grid that `pytest bench --benchmark-disable` runs.
GRIDS = {
    "full": dict(B=[128, 512], D=[128, 512], C=[10_000, 100_000, 1_000_000], dtype=["fp32", "bf16"],
                 mode=list(MODES)),
    "default": dict(B=[128], D=[128], C=[10_000, 100_000, 1_000_000], dtype=["fp32"], mode=["full"]),
    "smoke": dict(B=[8], D=[16], C=[300], dtype=["fp32", "bf16"], mode=list(MODES)),
}


def grid_points(op_module, grid: str = "default", *, B=None, D=None, C=None, dtype=None, mode=None,
                loss=None, provider=None, device="cpu"):
    """``[(provider, Shape)]`` for an op: the named grid, each axis optionally overridden."""
    g = dict(GRIDS[grid])
    for key, val in (("B", B), ("D", D), ("C", C), ("dtype", dtype), ("mode", mode)):
        if val:
            g[key] = list(val)
    losses = list(loss) if loss else list(op_module.DEFAULT_LOSSES if grid != "smoke" else op_module.LOSSES)
    for lo in losses:
        if lo not in op_module.LOSSES:
            raise SystemExit(f"loss {lo!r} is not one of {op_module.OP}'s losses: {', '.join(op_module.LOSSES)}")
    out = []
    for lo in losses:
        if provider:
            names = list(provider)
        elif grid == "default" and hasattr(op_module, "default_providers"):
            names = list(op_module.default_providers(lo, device))
        else:
            names = list(op_module.provider_names(device))
        for dt in g["dtype"]:
            for b in g["B"]:
                for d in g["D"]:
                    for md in g["mode"]:
                        for c in sorted(g["C"]):
                            sh = Shape(op_module.OP, lo, b, d, c, dt, md, device)
                            for name in names:
                                if name not in op_module.PROVIDERS:
                                    raise SystemExit(f"provider {name!r} unknown for {op_module.OP}: "
                                                     f"{', '.join(op_module.PROVIDERS)}")
                                if lo in op_module.PROVIDERS[name].losses:
                                    out.append((name, sh))
    return out


def add_grid_arguments(p, prefix: str = "") -> None:
    """The grid-selection flags shared by report.py and the pytest options (``--bench-...``)."""
    p.add_argument(f"--{prefix}B", type=int, nargs="+", help="batch sizes (overrides the grid)")
    p.add_argument(f"--{prefix}D", type=int, nargs="+", help="embedding sizes")
    p.add_argument(f"--{prefix}C", type=parse_count, nargs="+", help="class counts (10k, 100k, 1M …)")
    p.add_argument(f"--{prefix}dtype", nargs="+", choices=list(DTYPES))
    p.add_argument(f"--{prefix}mode", nargs="+", choices=list(MODES))
    p.add_argument(f"--{prefix}loss", nargs="+", help="loss configurations (arcface, cosface, ce; npt)")
    p.add_argument(f"--{prefix}provider", nargs="+", help="providers (default: every one available)")


# ----------------------------------------------------------------------------- providers and cases

@dataclasses.dataclass
class Case:
    """What ``setup(provider, shape)`` returns: ``forward()`` gives the scalar loss; ``params`` are
    the tensors that receive gradients (reset to ``None`` before every step, as
    ``zero_grad(set_to_none=True)``)."""
    forward: Callable[[], torch.Tensor]
    params: list

    def zero_grad(self):
        for p in self.params:
            p.grad = None


@dataclasses.dataclass
class Provider:
    """One implementation. ``fused``: never builds a ``[B, C]`` matrix (FLOPs with recompute).
    ``available(device) -> reason or None``. ``bc_matrices``: a rough count of fp32 ``[B, C]``
    matrices alive at the peak, used only to refuse points that would need more than ``--max-gib``
    before a measured point of the same provider gives a better estimate."""
    label: str
    losses: tuple
    fused: bool
    available: Callable[[str], str | None]
    bc_matrices: float = 0.0
    timed_on_cpu: bool = True
    note: str = ""


def flops(shape: Shape, fused: bool) -> float:
    """FLOPs of the class-dimension GEMMs (everything else is O(B·C), not counted).

    forward: ``2·B·C·D`` (x·Wᵀ). backward: fused backends recompute the logits and form both
    gradients, ``3 × 2·B·C·D``; materialised implementations keep the logits, ``2 × 2·B·C·D``.
    full = forward + backward. For NPT the backward has no class pass: 0 (fused) — see bench_npt.py.
    """
    g = 2.0 * shape.B * shape.C * shape.D
    bwd = (3 if fused else 2) * g
    return {"forward": g, "backward": bwd, "full": g + bwd}[shape.mode]


def estimate_bytes(provider: Provider, shape: Shape) -> float:
    """A rough peak (beyond inputs and gradients) used only to refuse hopeless points."""
    return provider.bc_matrices * shape.B * shape.C * 4 + (0 if provider.fused else shape.C * shape.D * 4)


# ----------------------------------------------------------------------------- timing

def sync(device) -> None:
    """Waits for the device's queued work (CUDA); nothing elsewhere."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_reps(fn, device="cpu", *, prepare=None, number=1, warmup=0, min_reps=1, max_reps=1,
              target_s=0.0) -> list:
    """Seconds per call of ``fn``, one entry per repetition: the one timing loop of bench/.

    ``warmup`` untimed calls first. Each repetition: ``state = prepare()`` (untimed: resetting
    gradients, the forward of a backward-only step …), then ``number`` calls of ``fn(state)`` —
    ``fn()`` when there is no ``prepare`` — between two clock readings, divided by ``number``.
    CPU: ``time.perf_counter``; CUDA: two events after a synchronise, read after another one.
    Repeats until ``min_reps`` are done and either ``target_s`` seconds of timed work or
    ``max_reps`` repetitions (``max_reps`` wins over ``min_reps``). The caller reduces the list
    (median, minimum …)."""
    cuda = str(device).startswith("cuda")

    def call(state):
        return fn(state) if prepare is not None else fn()

    for _ in range(warmup):
        call(prepare() if prepare is not None else None)
    sync(device)
    out = []
    while len(out) < max_reps and (len(out) < min_reps or sum(out) < target_s):
        state = prepare() if prepare is not None else None
        r = None
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(number):
                r = call(state)
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / number)
        else:
            t0 = time.perf_counter()
            for _ in range(number):
                r = call(state)
            out.append((time.perf_counter() - t0) / number)
        del r, state
    return out


def median_ms(fn, device="cpu", *, grads=(), reps=1) -> float:
    """Median milliseconds of ``fn()``, the ``.grad`` of every tensor in ``grads`` set to None
    before each call (untimed). CUDA: ``triton.testing.do_bench`` (50 ms of warm-up, 200 ms of
    repetitions, the L2 cache flushed before each call, CUDA events); elsewhere ``reps``
    repetitions of :func:`time_reps`."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=50, rep=200, grad_to_none=list(grads), return_mode="median"))

    def prepare():
        for t in grads:
            t.grad = None

    return statistics.median(time_reps(lambda _: fn(), device, prepare=prepare, min_reps=reps, max_reps=reps)) * 1e3


def step_fn(case: Case, mode: str, device: str):
    """``(prepare, timed)``: ``prepare()`` runs untimed before each repetition (for ``backward``:
    the forward pass); ``timed(state)`` is what the clock measures."""
    if mode == "forward":
        def prepare():
            case.zero_grad()
            return None

        def timed(_):
            return case.forward()
    elif mode == "backward":
        def prepare():
            case.zero_grad()
            loss = case.forward()
            sync(device)
            return loss

        def timed(loss):
            loss.backward()
    else:
        def prepare():
            case.zero_grad()
            return None

        def timed(_):
            case.forward().backward()
    return prepare, timed


def time_case(case: Case, mode: str, device: str, *, min_reps=1, max_reps=10, target_s=2.0) -> list:
    """Seconds of each repetition of one step (:func:`time_reps` with the step's ``prepare``):
    repeats until ``target_s`` of timed work or ``max_reps``."""
    prepare, timed = step_fn(case, mode, device)
    return time_reps(timed, device, prepare=prepare, min_reps=min_reps, max_reps=max_reps, target_s=target_s)


# ----------------------------------------------------------------------------- memory

from fusedface._procmem import MEMINFO, STATUS, reset_peak_rss, status_kib  # noqa: E402,F401  (the one /proc reader)


# glibc's malloc with a fixed mmap threshold: every block of 128 KiB or more is mapped when allocated
# and unmapped when freed, so the resident set follows the live tensors. With glibc's default dynamic
# threshold, a freed large block raises the threshold and later ones of that size come from the heap,
# which keeps them resident after free: a step's temporaries then hide in memory freed by the step
# before (a 244 MiB [C, D] temporary measured as 57 MiB). Set before the process starts.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def with_fixed_malloc(argv=None) -> None:
    """Re-executes this process with :data:`MALLOC_ENV` set, unless it already is (CPU peak-RSS
    measurements of a script that runs in its own process)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    argv = sys.argv if argv is None else argv
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **MALLOC_ENV})


def in_use_bytes(device="cpu") -> int:
    """Memory in use now: CPU the resident set size (``VmRSS``), CUDA ``torch.cuda.memory_allocated``
    (what :class:`PeakMemory` measures against)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return status_kib("VmRSS") * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``: the peak memory of the block beyond what was in use
    when it started — the one peak-memory measurement of bench/.

    CPU: the peak resident set size (``VmHWM``, reset on entry through ``/proc/self/clear_refs``)
    against the resident size (``VmRSS``) read just after the reset. CUDA:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, against
    ``memory_allocated`` at entry, synchronised on both sides.

    After the block: ``base`` and ``peak`` (bytes), ``delta = peak - base``, ``method`` (a label for
    reports) and ``reset``: False only on CPU when ``clear_refs`` cannot be written, where ``peak``
    is then the process's lifetime high-water mark. With ``require_reset=True`` (the default) that
    case raises instead."""

    def __init__(self, device="cpu", *, require_reset: bool = True):
        self.cuda = str(device).startswith("cuda")
        self.require_reset = require_reset
        self.base = self.peak = self.delta = None
        self.reset = False
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.reset = True
        else:
            self.reset = reset_peak_rss()
            if not self.reset and self.require_reset:
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): run on Linux")
            self.base = status_kib("VmRSS") * 1024
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.cuda:
                torch.cuda.synchronize()
                self.peak = torch.cuda.max_memory_allocated()
            else:
                self.peak = status_kib("VmHWM") * 1024
            self.delta = self.peak - self.base
        return False


def measure_peak(fn, device="cpu", grads=()) -> dict:
    """Peak memory of one call ``fn()`` (:class:`PeakMemory`), the gradients it gives the tensors
    in ``grads`` counted apart: their ``.grad`` is set to None before the call and again after.
    MiB, unrounded: ``peak_mib`` (beyond what was in use before the call), ``grads_mib`` (the
    gradients' bytes), ``extra_mib`` (``peak_mib - grads_mib``: what an implementation needs beyond
    dL/dx and dL/dW, which every one allocates), and ``memory_method``."""
    for t in grads:
        t.grad = None
    with PeakMemory(device) as pm:
        r = fn()
    del r
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    for t in grads:
        t.grad = None
    return {"peak_mib": pm.delta / 2**20, "extra_mib": (pm.delta - grad_bytes) / 2**20,
            "grads_mib": grad_bytes / 2**20, "memory_method": pm.method}


def measure_step_memory(case: Case, mode: str, device: str) -> dict:
    """Peak memory of one step (:func:`measure_peak`; for ``backward`` the forward is inside the
    measured window), rounded to 0.1 MiB."""
    prepare, timed = step_fn(case, mode, device)
    m = measure_peak(lambda: timed(prepare()), device, case.params)
    return {"peak_mib": round(m["peak_mib"], 1), "extra_mib": round(m["extra_mib"], 1),
            "grads_mib": round(m["grads_mib"], 1), "memory_method": m["memory_method"]}


# ----------------------------------------------------------------------------- peers

def insightface_loss(x, W, y, s: float = 64.0, m2: float = 0.0, m3: float = 0.0):
    """InsightFace's ``FC + CombinedMarginLoss + CrossEntropy`` on one device (arcface_torch):
    normalised logits, the margin applied in place without gradient (``arccos_`` / ``cos_`` of the
    whole matrix, a straight-through gradient), ``s·logits``, cross-entropy. The ``insightface``
    and ``insightface_compiled`` providers of bench_margin_softmax.py."""
    logits = F.linear(F.normalize(x), F.normalize(W)).clamp(-1, 1)
    idx = torch.arange(x.shape[0], device=x.device)
    with torch.no_grad():
        if m2:
            target = logits[idx, y]
            logits.arccos_()
            logits[idx, y] = target.arccos() + m2
            logits.cos_()
        if m3:
            logits[idx, y] -= m3
    return F.cross_entropy(logits.float() * s, y)


def materialised_arcface(x, W, y, s: float = 64.0, m: float = 0.5, *, fp32_logits: bool = True):
    """The materialised ArcFace head with the margin on the target column only: normalise, ONE
    matmul (a ``[B, C]`` matrix in the input dtype; ``fp32_logits``: then converted to fp32, as
    InsightFace does under fp16), clamp, ``cos(acos(c) + m)`` of the target cosine (fp32, without
    gradient: InsightFace's straight-through), written into a copy of the logits, ``F.cross_entropy``
    of ``s·logits`` in fp32. The ``insightface`` provider of bench_native.py (``fp32_logits=False``)
    and the ``materialised`` baselines of bench_triton_gpu.py and device_check.py."""
    logits = F.linear(F.normalize(x), F.normalize(W))
    if fp32_logits:
        logits = logits.float()
    logits = logits.clamp(-1, 1)
    idx = torch.arange(x.shape[0], device=x.device)
    target = logits[idx, y]
    with torch.no_grad():
        bent = torch.cos(torch.acos(target.float()) + m).to(logits.dtype)
    logits = logits.index_put((idx, y), target + (bent - target).detach())
    return F.cross_entropy(logits.float() * s, y)


def gemm_floor(x, W, dc=None, products: int = 4):
    """A zero-argument callable running only the matrix products of a fused design, on detached
    operands: the time no kernel of that design can beat by much. ``products``: 1 — the forward
    ``x·Wᵀ``; 3 — a design that keeps the ``[B, C]`` block: ``x·Wᵀ``, ``dc·W``, ``dcᵀ·x``; 4 — a
    recomputing design: ``x·Wᵀ``, the recompute ``x·Wᵀ``, ``dc·W``, ``dcᵀ·x``. ``dc``: the ``[B, C]``
    gradient operand, or a zero-argument callable giving it (made on first use)."""
    if products not in (1, 3, 4):
        raise ValueError(f"products must be 1, 3 or 4, not {products}")
    xd, Wd = x.detach(), W.detach()
    get_dc = dc if callable(dc) else (lambda: dc)

    def run():
        if products == 1:
            return torch.mm(xd, Wd.t())
        d = get_dc()
        for _ in range(products - 2):
            torch.mm(xd, Wd.t())
        torch.mm(d, Wd)
        torch.mm(d.t(), xd)
    return run


# ----------------------------------------------------------------------------- environment switches

@contextlib.contextmanager
def env_vars(**kv):
    """Sets the environment variables ``kv`` (values as ``str``) for the block and restores them
    (unset ones are removed again) afterwards."""
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- fresh-process worker

def load_op(op: str):
    return importlib.import_module(f"bench_{op}")


def worker(spec: dict) -> dict:
    """Runs in a fresh process: warm-up at a tiny size, one measured step, timed repetitions."""
    mod = load_op(spec["op"])
    sh = Shape(**spec["shape"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    tiny = dataclasses.replace(sh, B=min(sh.B, 8), C=min(sh.C, 300))
    warm = mod.setup(spec["provider"], tiny)
    prepare, timed = step_fn(warm, sh.mode, sh.device)
    timed(prepare())
    del warm, prepare, timed
    case = mod.setup(spec["provider"], sh)
    sync(sh.device)
    mem = measure_step_memory(case, sh.mode, sh.device)   # the first full-size step, also a warm-up
    times = time_case(case, sh.mode, sh.device, min_reps=spec.get("min_reps", 1),
                      max_reps=spec.get("max_reps", 10), target_s=spec.get("target_s", 2.0))
    return {**mem, "times_s": [round(t, 6) for t in times], "time_s": statistics.median(times)}


def run_in_subprocess(op: str, provider: str, shape: Shape, *, timeout=900, **timing) -> dict:
    """One point in a fresh process; never raises: failures come back as a status and a reason."""
    spec = {"op": op, "provider": provider, "shape": dataclasses.asdict(shape), **timing}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "harness.py"), "--worker", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"did not finish in {timeout} s"}
    wall = time.perf_counter() - t0
    if out.returncode == 0:
        for line in reversed(out.stdout.strip().splitlines()):
            if line.startswith("{"):
                return {"status": "ok", **json.loads(line), "worker_wall_s": round(wall, 1)}
    if out.returncode in (-9, 137):
        return {"status": "oom", "reason": "worker killed (SIGKILL: out of memory)"}
    err = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    if "out of memory" in out.stderr.lower() or "DefaultCPUAllocator" in out.stderr:
        return {"status": "oom", "reason": err[:300]}
    return {"status": "error", "reason": f"exit {out.returncode}: {err[:300]}"}


# ----------------------------------------------------------------------------- pytest-benchmark

_GEMM_CACHE: dict = {}


def cached_gemm_rate(dtype, device):
    key = (str(dtype), device)
    if key not in _GEMM_CACHE:
        _GEMM_CACHE[key] = gemm_rate(dtype, device)
    return _GEMM_CACHE[key]


def pytest_point(benchmark, mod, point, options: dict) -> None:
    """Body of every ``test_<op>`` benchmark: skips (with the reason) a provider that is not
    available or a point over ``--bench-max-gib``, times the step with ``benchmark.pedantic``
    (one round when benchmarks are disabled: the smoke test), and records FLOPs, the fraction of
    the GEMM rate and, with ``--bench-memory``, the peak memory from a fresh process."""
    import pytest

    provider, shape = point
    prov = mod.PROVIDERS[provider]
    why = prov.available(shape.device)
    if why:
        pytest.skip(why)
    disabled = options["disabled"]
    if shape.device == "cpu" and not prov.timed_on_cpu and not disabled:
        pytest.skip(prov.note)
    need = estimate_bytes(prov, shape)
    if need > options["max_gib"] * 2**30:
        pytest.skip(f"needs about {need / 2**30:.1f} GiB > --bench-max-gib {options['max_gib']}")
    case = mod.setup(provider, shape)
    prepare, timed = step_fn(case, shape.mode, shape.device)

    def timed_sync(state):
        timed(state)
        sync(shape.device)

    if not disabled:
        timed_sync(prepare())  # warm-up (and, for torch.compile, compilation)
    rounds = 1 if disabled else options["rounds"]
    benchmark.group = f"{mod.OP} {shape.id()}"
    benchmark.extra_info.update(provider=provider, **dataclasses.asdict(shape), flops=mod.flops(provider, shape))
    benchmark.pedantic(timed_sync, setup=lambda: ((prepare(),), {}), rounds=rounds, iterations=1)
    if not disabled and benchmark.stats is not None:
        med = benchmark.stats.stats.median
        rate = cached_gemm_rate(shape.torch_dtype, shape.device)
        benchmark.extra_info.update(gemm_flops_per_s=rate,
                                    gemm_fraction=mod.flops(provider, shape) / med / rate if med > 0 else None)
    if options["memory"]:
        res = run_in_subprocess(mod.OP, provider, shape, max_reps=1, target_s=0.0)
        assert res["status"] == "ok", f"{provider} {shape.id()}: {res}"
        benchmark.extra_info.update({k: res[k] for k in ("peak_mib", "extra_mib", "memory_method")})


# ----------------------------------------------------------------------------- the machine

def gemm_rate(dtype: torch.dtype, device: str, n: int | None = None, target_s: float = 1.0) -> float:
    """The machine's GEMM rate in ``dtype``: FLOP/s of ``torch.mm`` of two ``n × n`` matrices, the
    BEST of the repetitions (at least 3, until ``target_s``): a limit to measure kernels against,
    and noise from other processes only ever slows a repetition down. ``report.py`` measures it at
    the start and at the end of a run and keeps the larger. ``n``: 2048 on CPU, 8192 on GPUs."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ts = time_reps(lambda: torch.mm(a, b), device, warmup=1, min_reps=3, max_reps=100, target_s=target_s)
    return 2.0 * n ** 3 / min(ts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import fusedface
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fusedface": fusedface.__version__,
        "backends": fusedface.available_backends(device),
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import fusedface.backends.native as nat
        info["native_build"] = nat.build_info()
    except Exception:  # not built here: available_backends says so
        pass
    return info


def describe_machine(info: dict, gemm: dict | None = None) -> str:
    dev = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
    s = f"{dev}; torch {info['torch']}, Python {info['python']}; fusedface backends here: {', '.join(info['backends'])}"
    if gemm:
        s += f"; measured GEMM rate (torch.mm {'8192' if info['device'].startswith('cuda') else '2048'}³, best of a run) " + ", ".join(
            f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in gemm.items())
    return s


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        res = worker(json.loads(sys.argv[2]))
        print(json.dumps(res), flush=True)
    else:
        raise SystemExit("bench/harness.py is a library; run `python bench/report.py` "
                         "(its --worker mode is what report.py starts for each point)")
