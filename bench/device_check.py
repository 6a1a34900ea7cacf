"""One prepared GPU check of the Triton backend: correctness, timings against baselines measured in
the same run, CUDA-graph replay, launches per step, and the GPU tests, inside a fixed time budget.

    python bench/device_check.py --json out.json            # on a CUDA GPU (written for an H200)
    python bench/device_check.py --smoke --json out.json    # on CPU: tiny shapes, Triton interpreter

Problem: ArcFace (s = 64, m2 = 0.5) through ``fusedface.functional.margin_softmax_loss(...,
backend="triton")``, forward + backward (dL/dx and dL/dW).

Stages, in order (each records ``status`` "done", "skipped" with a ``reason``, "error" or "timeout"):

1. ``correctness``: B = D = 512, C = 50,000, every 37th row ignored (label -1); dtypes bf16, fp16,
   fp32 and "mixed" (x bf16, W fp32). For loss, dL/dx and dL/dW: max |err| / max |truth| against
   ``fusedface.reference.margin_softmax_loss`` in float64 on the same (rounded) inputs, the same
   error of the plain reference run on the inputs as given, and the ratio fusedface / plain.
   For mixed, "plain" is the reference on ``x.float(), W.float()`` (an fp32 computation), and the
   reference under ``torch.autocast(bfloat16)`` is recorded next to it; both ratios are for
   information only: fusedface's mixed path rounds W to bf16 by design, so its error against the
   exact fp32-W truth is bf16-sized while the fp32 plain one is fp32-sized.
   Checks: dx and dW ratio <= 1.25 for bf16 and fp16; fp32 loss error <= 1e-5; mixed loss within
   1e-5 (relative) of the same call with W rounded to bf16; mixed dL/dW comes back in fp32.
2. ``timings``: B = D = 512, C in {1e5, 1e6}, dtypes bf16, fp32, mixed. Providers: the cuBLAS
   floors (1 GEMM ``x·Wᵀ``; 4 GEMMs: forward, recompute, ``dc·W``, ``dcᵀ·x``; mixed uses the bf16
   floor), the materialised InsightFace-style head in the dtype, under ``torch.autocast(bf16)``
   (fp32 and mixed inputs) and under ``torch.compile``, fusedface default and with
   ``FUSEDFACE_TRITON_PATH=hybrid|fused|legacy`` or ``FUSEDFACE_TRITON_SPLIT_GRAD=1`` (a switch
   that raises is recorded as that point's error). Median ms of ``triton.testing.do_bench``
   (forward alone and forward + backward), × the 4-GEMM floor, and the extra memory (peak of
   ``torch.cuda.max_memory_allocated`` beyond x, W and their gradients). Points run in priority
   order (the ones the targets need first), each only while the budget allows.
3. ``launches``: CUDA kernels of one eager forward + backward at C = 1e5 bf16, from
   ``torch.profiler`` (kernel events; memcpy/memset counted apart), with their GPU time.
4. ``optim``: the in-backward optimizer (``fusedface.optim.SGD``, momentum 0.9, weight decay 5e-4)
   on the Triton step (ArcFace head, ``backend="triton"``), dtypes "mixed" (x bf16, W fp32: the dW
   kernel's update epilogue) and fp32 (the hybrid's update kernel), C = 1e5: ``W`` and the momentum
   buffer after two steps against the same head stepped by ``torch.optim.SGD`` on its dense gradient
   (checks: max |diff| / max |W| <= 1e-5); at C = 1e6 mixed: ms per step (forward, backward,
   optimizer step) and peak memory beyond ``W`` and the state, in-backward against dense.
5. ``extensions`` (issue 16): the options beyond the seed family on ``backend="triton"`` (the Triton
   tile kernels; AdaFace's clip policy alone runs the whole-step kernels) and on the native CUDA
   kernels where they were built: CurricularFace's quadratic rewrite (t = 0.3), inter-class filtering
   (0.2), the clip policy, 3 sub-centres per class, and all of them together; B = D = 512, C = 20,000, fp32
   and bf16. Errors of loss, dL/dx and dL/dW against the float64 reference on the same inputs, and the
   ``torch`` backend's (fp32 products) beside them. Checks: fp32 loss error <= 1e-5 and gradient errors
   <= 5e-5 (the CPU interpreter measures up to 6e-6); bf16 errors <= 1.25×
   the torch backend's. Then fwd + bwd ms at C = 1e5 bf16 of each option against ArcFace on the same
   path (information: what the extensions cost).
6. ``graph_step``: C = 1e5 bf16: the eager step (grads set to None, forward, backward) against the
   same step captured in a ``torch.cuda.CUDAGraph`` (warm-up on a side stream, grads None before
   capture so they live in the graph's pool) and replayed: ms per step from a loop of 50 steps
   between CUDA events (median of 5; do_bench numbers too), and the replayed results against the
   eager ones. Last of the GPU stages, as a failed capture can leave the CUDA context unusable.
7. ``tests``: ``pytest -x -q tests/test_triton.py tests/test_optim_triton.py tests/test_triton_extensions.py
   tests/test_triton_heads_extensions.py tests/test_gpu*.py`` (the files that exist) with
   the rest of the budget as its timeout; skipped when under 60 s remain.

Targets (printed as PASS / FAIL / SKIP lines before the tests stage and again at the end):

* bf16, C = 1e6: fusedface default <= 2.0× the 4-GEMM floor (moonshot, reported apart: <= 1.3×);
* fp32, C = 1e6: fusedface default <= 0.75× the materialised fp32 head;
* mixed, C = 1e6: fusedface default <= 1.15× fusedface bf16;
* C = 1e5 bf16: CUDA-graph-replayed step <= 1.5 ms, eager step <= 1.15× the replayed one.

Budget: ``--budget-s`` (default 400) is the wall-clock time of the whole run, checked between
stages and between points; what does not fit is recorded as skipped with the reason. The timings
stop while ``--reserve-s`` (default 120) remains, for the later stages. A watchdog ends the process
at ``--hard-limit-s`` (default 415, under 7 minutes) after writing the JSON and stopping the tests.
The JSON (``--json``) is rewritten after every stage and every timed point, so an interrupted run
still leaves its results. The exit status is 0 when the script ran to its end, whatever the
verdicts; they are in the JSON's ``checks`` and ``targets``.

``--smoke`` tests this script's logic without a GPU: CPU tensors, B = 16, D = 32, C = 300 for every
stage, Triton kernels under its interpreter (``TRITON_INTERPRET=1`` is set before triton is
imported), ``torch.compile(backend="eager")`` (Dynamo tracing only), ``perf_counter`` timing (one repetition), the
floors as CPU ``torch.mm`` stand-ins (so the target arithmetic runs; the numbers mean nothing), the
graph and profiler stages skipped with the reason, and the tests stage collecting only.
``tests/test_device_check.py`` runs it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

T_START = time.monotonic()  # the budget counts from here (before torch and triton are imported)
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for _p in (BENCH_DIR, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

STAGES = ("correctness", "timings", "launches", "optim", "extensions", "graph_step", "tests")
SCALE, M2 = 64.0, 0.5
PATH_VAR, SPLIT_VAR = "FUSEDFACE_TRITON_PATH", "FUSEDFACE_TRITON_SPLIT_GRAD"
# fusedface providers of the timings and the environment each runs under ("" = unset = default)
FUSEDFACE_ENV = {
    "fusedface": {PATH_VAR: "", SPLIT_VAR: ""},
    "fusedface_hybrid": {PATH_VAR: "hybrid", SPLIT_VAR: ""},
    "fusedface_fused": {PATH_VAR: "fused", SPLIT_VAR: ""},
    "fusedface_split_grad": {PATH_VAR: "", SPLIT_VAR: "1"},
    "fusedface_legacy": {PATH_VAR: "legacy", SPLIT_VAR: ""},
}
TIMING_DTYPES = ("bf16", "fp32", "mixed")
# (tier, dtype) -> providers; tiers run one after the other, C = 1e6 first within each
TIERS = (
    {"bf16": ["cublas_floor", "fusedface", "materialised"], "fp32": ["cublas_floor", "fusedface", "materialised"],
     "mixed": ["fusedface", "materialised_autocast"]},
    {dt: ["fusedface_hybrid", "fusedface_fused", "fusedface_split_grad", "fusedface_legacy"] for dt in TIMING_DTYPES},
    {"bf16": ["materialised_compiled"], "fp32": ["materialised_autocast", "materialised_compiled"], "mixed": []},
)
NOT_APPLICABLE = {("mixed", "materialised"): "F.linear needs one dtype; materialised_autocast is the mixed baseline",
                  ("mixed", "materialised_compiled"): "F.linear needs one dtype; not compiled for mixed inputs",
                  ("mixed", "cublas_floor"): "mixed is measured against the bf16 floor (its GEMMs run in bf16)"}
MIN_POINT_S = 5.0  # a timing point starts only with this much budget left beyond the reserve ...
POINT_MIN_S = {"materialised_compiled": 45.0,  # ... more where it may compile first (Inductor; new Triton kernels)
               **{p: 15.0 for p in FUSEDFACE_ENV if p != "fusedface"}}


class Skip(Exception):
    """Raised by a stage that cannot run here; the message is the recorded reason."""


# ----------------------------------------------------------------------------- the record

class Report:
    """The JSON record and the wall clock of the run. ``save`` is atomic (temp file + rename) and
    safe to call from the watchdog thread."""

    def __init__(self, path, budget_s, reserve_s, hard_limit_s):
        self.t0 = T_START
        self.path = path
        self.budget_s, self.reserve_s, self.hard_limit_s = budget_s, reserve_s, hard_limit_s
        self.lock = threading.RLock()
        self.lines: list[str] = []  # every PASS / FAIL / SKIP line, for the final summary
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self.data = {"script": "bench/device_check.py", "started": started,
                     "budget": {"budget_s": budget_s, "reserve_s": reserve_s, "hard_limit_s": hard_limit_s},
                     "info": {}, "stages": {}, "checks": [], "targets": [], "finished": False}
        self.current_stage: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self):
        if not self.path:
            return
        with self.lock:
            self.data["budget"]["elapsed_s"] = round(self.elapsed(), 1)
            text = json.dumps(_finite(self.data), indent=1, default=str)
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as fh:
                fh.write(text + "\n")
            os.replace(tmp, self.path)

    def verdict(self, kind, entry):
        """Appends a check or target entry and prints its PASS / FAIL / SKIP line."""
        line = f"{entry['verdict']} {kind} {entry['name']}: {entry['detail']}"
        entry["line"] = line
        print(line, flush=True)
        with self.lock:
            self.lines.append(line)


def _finite(obj):
    """The record with NaN / inf floats as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _err(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= 600 else msg[:600] + " ..."


def run_stage(ctx, name, fn, min_s):
    """Runs ``fn(ctx, st)`` as stage ``name`` if ``min_s`` seconds of budget remain, and records it."""
    rep = ctx.report
    st = rep.data["stages"].setdefault(name, {})
    left = rep.remaining()
    print(f"\n== stage {name} (t = {rep.elapsed():.0f} s, {left:.0f} s of the budget left)", flush=True)
    if name not in ctx.args.stages:
        st.update(status="skipped", reason=f"not selected (--stages {','.join(ctx.args.stages)})")
    elif left < min_s:
        st.update(status="skipped", reason=f"{left:.0f} s of the budget left; the stage needs at least {min_s:.0f} s")
    else:
        st.update(status="running", started_s=round(rep.elapsed(), 1), results={})
        rep.current_stage = name
        t = time.monotonic()
        try:
            fn(ctx, st)
            st["status"] = "done"
        except Skip as why:
            st.update(status="skipped", reason=str(why))
        except Exception as exc:  # recorded, and the next stage still runs
            st.update(status="error", error=_err(exc), traceback=traceback.format_exc()[-3000:])
            print(f"stage {name} failed: {_err(exc)}", flush=True)
        st["seconds"] = round(time.monotonic() - t, 1)
        rep.current_stage = None
    if st.get("status") == "skipped":
        print(f"stage {name} skipped: {st['reason']}", flush=True)
    rep.data["targets"] = evaluate_targets(ctx)
    rep.save()


def start_watchdog(ctx):
    """At the hard limit: mark the running stage, stop the test subprocess, write the JSON, exit."""
    def fire():
        rep = ctx.report
        print(f"\nwatchdog: hard limit of {rep.hard_limit_s:.0f} s reached; writing the JSON and exiting", flush=True)
        if ctx.child is not None:
            with contextlib.suppress(OSError):
                os.killpg(ctx.child.pid, signal.SIGKILL)
        for _ in range(3):  # the main thread may be changing the record: retry a copy
            try:
                with rep.lock:
                    if rep.current_stage:
                        rep.data["stages"][rep.current_stage].update(
                            status="timeout", reason=f"stopped by the watchdog at {rep.hard_limit_s:.0f} s")
                    rep.data["watchdog"] = f"fired at {rep.elapsed():.0f} s during stage {rep.current_stage}"
                    rep.save()
                break
            except RuntimeError:
                time.sleep(0.2)
        os._exit(3)

    timer = threading.Timer(max(1.0, ctx.report.hard_limit_s - ctx.report.elapsed()), fire)
    timer.daemon = True
    timer.start()
    return timer


# ----------------------------------------------------------------------------- context and helpers

class Ctx:
    """What every stage needs: arguments, device, shapes, the record, and the timing primitives."""

    def __init__(self, args, report):
        import torch
        self.args, self.report = args, report
        self.smoke = args.smoke
        self.cuda = not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.B, self.D = (16, 32) if self.smoke else (args.B, args.D)
        self.C_check = 300 if self.smoke else args.C_check
        self.Cs = [300] if self.smoke else sorted(args.C)
        self.child = None  # the pytest subprocess while it runs
        self._compiled = None

    def sync(self):
        import harness
        harness.sync(self.device)

    def inputs(self, C, dt, seed=0):
        """``(x, W, y)`` of ``bench_triton_gpu._inputs``; mixed: x bf16 and W fp32 from the fp32 draw.
        Smoke (D = 32): more noise on x, so that the target cosines are about what they are at
        D = 512 (~0.7) rather than ~0.96, where the loss is ~1e-4 and cancels in any precision."""
        import torch
        from bench_triton_gpu import DT, _inputs
        x, W, y = _inputs(self.B, self.D, C, torch.float32 if dt == "mixed" else DT[dt], seed=seed,
                          device=self.device)
        if self.smoke:
            g = torch.Generator(device=self.device).manual_seed(seed + 1000)
            x = (x.float() + 0.45 * torch.randn(x.shape, device=self.device, generator=g)).to(x.dtype)
        if dt == "mixed":
            x = x.to(torch.bfloat16)
        return x, W, y

    def time_ms(self, fn, grads=()):
        """Median ms (``harness.median_ms``): ``triton.testing.do_bench`` on CUDA; ``--cpu-reps``
        ``perf_counter`` repetitions on CPU."""
        import harness
        return harness.median_ms(fn, self.device, grads=grads, reps=self.args.cpu_reps)

    def peak_mib(self, fn, grads):
        """``(peak, extra)`` MiB of one call (CUDA allocator, ``harness.measure_peak``), or
        ``(None, None)`` on CPU."""
        if not self.cuda:
            return None, None
        import harness
        m = harness.measure_peak(fn, self.device, grads)
        return m["peak_mib"], m["extra_mib"]

    def autocast(self):
        import torch
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def compiled_head(self):
        if self._compiled is None:
            import torch
            import harness
            self._compiled = torch.compile(harness.materialised_arcface, dynamic=False,
                                           backend=self.args.compile_backend)
        return self._compiled

    def check(self, stage, name, value, limit, ok, detail):
        entry = dict(stage=stage, name=name, value=value, limit=limit,
                     verdict="PASS" if ok else "FAIL", detail=detail)
        self.report.data["checks"].append(entry)
        self.report.verdict("check", entry)


@contextlib.contextmanager
def fusedface_env(provider):
    import harness
    with harness.env_vars(**FUSEDFACE_ENV[provider]):
        yield


def fusedface_loss(x, W, y):
    from fusedface import functional as Fn
    return Fn.margin_softmax_loss(x, W, y, scale=SCALE, m2=M2, backend="triton")


def _rel(a, truth) -> float:
    """max |a - truth| / max |truth| in float64."""
    a, truth = a.detach().double(), truth.detach().double()
    return float((a - truth).abs().max() / truth.abs().max())


def _ratio(a, b):
    if a is None or b is None:
        return None
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


def _fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


# ----------------------------------------------------------------------------- stage 1: correctness

def loss_and_grads(fn, x, W, y, autocast=None):
    """``(loss, dL/dx, dL/dW)`` of ``fn(x, W, y)`` on fresh leaf copies (the dtypes kept)."""
    import torch
    xl, Wl = x.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = fn(xl, Wl, y)
    gx, gW = torch.autograd.grad(loss, (xl, Wl))
    return loss.detach(), gx, gW


def stage_correctness(ctx, st):
    from fusedface import reference as R

    def ref(x, W, y):
        return R.margin_softmax_loss(x, W, y, scale=SCALE, m2=M2)

    res = st["results"]
    st["shape"] = dict(B=ctx.B, D=ctx.D, C=ctx.C_check, ignored_rows="every 37th (label -1)")
    for dt in ("bf16", "fp16", "fp32", "mixed"):
        if ctx.report.remaining() < 15:
            res[dt] = {"skipped": f"{ctx.report.remaining():.0f} s of the budget left"}
            continue
        t = time.monotonic()
        try:
            res[dt] = _correctness_one(ctx, dt, ref)
        except Exception as exc:  # recorded as a failed check; the other dtypes still run
            res[dt] = {"error": _err(exc)}
            ctx.check("correctness", f"{dt} runs", None, None, False, res[dt]["error"])
        res[dt]["seconds"] = round(time.monotonic() - t, 1)
        ctx.report.save()
        _free(ctx)


def _correctness_one(ctx, dt, ref):
    """Errors of one dtype against the float64 truth, and its checks."""
    x, W, y = ctx.inputs(ctx.C_check, dt, seed=1)
    y[::37] = -1
    truth = loss_and_grads(ref, x.double(), W.double(), y)
    with fusedface_env("fusedface"):
        got = loss_and_grads(fusedface_loss, x, W, y)
    if dt == "mixed":
        plain = loss_and_grads(ref, x.float(), W.float(), y)
        plain_ac = loss_and_grads(ref, x, W, y, autocast=ctx.autocast())
        note = ("plain = reference on x.float(), W.float() (an fp32 computation); plain_autocast = the reference "
                "on x bf16, W fp32 under torch.autocast(bfloat16). Ratios for information: fusedface's mixed "
                "path rounds W to bf16, so it is checked against the same call with W rounded to bf16")
    else:
        plain = loss_and_grads(ref, x, W, y)
        note = "plain = reference on the inputs in their dtype"
    r = {"dtypes": {"x": str(x.dtype), "W": str(W.dtype), "dx": str(got[1].dtype), "dW": str(got[2].dtype)},
         "note": note}
    for i, q in enumerate(("loss", "dx", "dW")):
        e_got, e_plain = _rel(got[i], truth[i]), _rel(plain[i], truth[i])
        r[q] = {"fusedface_err": e_got, "plain_err": e_plain, "ratio": _ratio(e_got, e_plain)}
        if dt == "mixed":
            e_ac = _rel(plain_ac[i], truth[i])
            r[q].update(plain_autocast_err=e_ac, ratio_vs_autocast=_ratio(e_got, e_ac))
    if dt == "mixed":
        with fusedface_env("fusedface"):
            w16 = loss_and_grads(fusedface_loss, x, W.bfloat16(), y)
        r["vs_W_rounded_to_bf16"] = {"loss_rel_diff": abs(float(got[0]) - float(w16[0])) / abs(float(w16[0])),
                                     "dx_rel_diff": _rel(got[1], w16[1]), "dW_rel_diff": _rel(got[2], w16[2])}
    err = {q: (r[q]["fusedface_err"], r[q]["plain_err"]) for q in ("loss", "dx", "dW")}
    print(f"{dt:<6} max|err|/max|truth|  fusedface: " + " ".join(f"{q} {e[0]:.2e}" for q, e in err.items())
          + "   plain: " + " ".join(f"{q} {e[1]:.2e}" for q, e in err.items()), flush=True)
    if dt in ("bf16", "fp16"):
        for q in ("dx", "dW"):
            v = r[q]["ratio"]
            ctx.check("correctness", f"{dt} {q} error ratio", v, 1.25, v is not None and v <= 1.25,
                      f"fusedface {err[q][0]:.3e} / plain {err[q][1]:.3e} = {_fmt(v)} (limit 1.25)")
    if dt == "fp32":
        v = r["loss"]["fusedface_err"]
        ctx.check("correctness", "fp32 loss error", v, 1e-5, v <= 1e-5, f"{v:.3e} (limit 1e-5)")
    if dt == "mixed":
        v = r["vs_W_rounded_to_bf16"]["loss_rel_diff"]
        ctx.check("correctness", "mixed == W rounded to bf16 (loss)", v, 1e-5, v <= 1e-5,
                  f"relative difference {v:.3e} (limit 1e-5)")
        got_dt = r["dtypes"]["dW"]
        ctx.check("correctness", "mixed dW dtype", got_dt, "torch.float32", got_dt == "torch.float32",
                  f"dL/dW is {got_dt} (want torch.float32)")
    return r


def _free(ctx):
    import gc

    import torch
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- stage 2: timings

def timing_plan(Cs, smoke=False):
    """``[(C, dtype, provider)]`` in the order they run. Smoke: the fusedface variants at bf16 only
    (the same code for every dtype; each interpreted step takes about a second)."""
    plan = []
    for i, tier in enumerate(TIERS):
        for C in sorted(Cs, reverse=True):
            for dt in TIMING_DTYPES:
                if smoke and i == 1 and dt != "bf16":
                    continue
                plan += [(C, dt, p) for p in tier[dt]]
    return plan


def measure_floor(ctx, x, W):
    """The 1-GEMM forward and the 4-GEMM step of a recomputing design, nothing else."""
    import torch

    import harness
    dc = (torch.randn(x.shape[0], W.shape[0], device=ctx.device) * 1e-3).to(W.dtype)
    four = harness.gemm_floor(x, W, dc, products=4)
    four()  # warm-up (cuBLAS handles, workspaces)
    out = {"fwd_ms": ctx.time_ms(harness.gemm_floor(x, W, products=1)), "ms": ctx.time_ms(four),
           "note": "4 GEMMs: x·Wᵀ, recompute x·Wᵀ, dc·W, dcᵀ·x ([B, C] dc precomputed); fwd: 1 GEMM"}
    if ctx.cuda:
        out["fp32_tf32_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        out["stand_in"] = "CPU torch.mm, not cuBLAS (smoke: exercises the arithmetic, the numbers mean nothing)"
    return out


def measure_loss_provider(ctx, provider, x, W, y):
    """Forward ms, forward + backward ms, extra memory and the loss value of one provider."""
    import torch

    import harness
    x.requires_grad_(True)
    W.requires_grad_(True)
    fwd_timed = True
    if provider in FUSEDFACE_ENV:
        env = FUSEDFACE_ENV[provider]
        f = lambda: fusedface_loss(x, W, y)  # noqa: E731
        fwd_timed = ctx.cuda  # smoke: an interpreted forward costs ~0.5 s and times nothing real
    elif provider == "materialised":
        env, f = {}, (lambda: harness.materialised_arcface(x, W, y, s=SCALE, m=M2))
    elif provider == "materialised_autocast":
        def f():
            with ctx.autocast():
                return harness.materialised_arcface(x, W, y, s=SCALE, m=M2)
        env = {}
    elif provider == "materialised_compiled":
        head = ctx.compiled_head()
        env, f, fwd_timed = {}, (lambda: head(x, W, y, s=SCALE, m=M2)), False  # no_grad would compile another graph
    else:
        raise ValueError(provider)
    out = {"env": env} if env else {}
    last = []

    def step():
        loss = f()
        loss.backward()
        last[:] = [loss.detach()]

    with harness.env_vars(**env):
        if ctx.cuda:  # on CPU (smoke) the timed repetition is the first call: interpreted steps are slow
            t = time.monotonic()
            step()  # warm-up: compiles the kernels (or the graph)
            ctx.sync()
            out["warmup_s"] = round(time.monotonic() - t, 2)
            x.grad = W.grad = None
        if fwd_timed:
            with torch.no_grad():
                out["fwd_ms"] = ctx.time_ms(f)
        out["ms"] = ctx.time_ms(step, grads=(x, W))
        out["loss"] = float(last[0].float())
        out["peak_mib"], out["extra_mib"] = ctx.peak_mib(step, (x, W))
    x.grad = W.grad = None
    return out


def stage_timings(ctx, st):
    import torch
    res = st["results"]
    st["shape"] = dict(B=ctx.B, D=ctx.D, C=ctx.Cs, loss=f"ArcFace s={SCALE} m2={M2}")
    st["method"] = ("median ms of triton.testing.do_bench (CUDA events, L2 flushed, grads set to None); "
                    "extra_mib: max_memory_allocated of one step beyond x, W and their gradients"
                    if ctx.cuda else f"median of {ctx.args.cpu_reps} perf_counter repetition(s) on CPU (smoke)")
    for C in ctx.Cs:
        for (dt, prov), reason in NOT_APPLICABLE.items():
            res.setdefault(f"C={C}", {}).setdefault(dt, {})[prov] = {"skipped": reason}
    current = (None, None)
    x = W = y = None
    for C, dt, prov in timing_plan(ctx.Cs, ctx.smoke):
        slot = res.setdefault(f"C={C}", {}).setdefault(dt, {})
        need = POINT_MIN_S.get(prov, MIN_POINT_S)
        if ctx.report.remaining() - ctx.report.reserve_s < need:
            slot[prov] = {"skipped": f"budget: {ctx.report.remaining():.0f} s left, {ctx.report.reserve_s:.0f} s of "
                                     f"them reserved for the later stages, the point needs about {need:.0f} s"}
            continue
        if current != (C, dt):
            x = W = y = None
            _free(ctx)
            x, W, y = ctx.inputs(C, dt)
            current = (C, dt)
        t = time.monotonic()
        try:
            if prov == "cublas_floor":
                slot[prov] = measure_floor(ctx, x, W)
            else:
                slot[prov] = measure_loss_provider(ctx, prov, x, W, y)
        except torch.OutOfMemoryError as exc:
            slot[prov] = {"error": "OOM: " + _err(exc)[:300]}
            _free(ctx)
        except Exception as exc:  # a switch not implemented yet, a failing kernel: recorded, the run goes on
            slot[prov] = {"error": _err(exc)}
        x.grad = W.grad = None
        slot[prov]["seconds"] = round(time.monotonic() - t, 1)
        _annotate(res, C, dt, prov)
        _print_point(C, dt, prov, slot[prov])
        ctx.report.save()
    x = W = y = None
    _free(ctx)


def _annotate(res, C, dt, prov):
    """× the 4-GEMM floor (mixed: the bf16 floor) and the loss against fusedface default's."""
    r = res[f"C={C}"][dt][prov]
    floor = res[f"C={C}"].get("bf16" if dt == "mixed" else dt, {}).get("cublas_floor", {})
    if "ms" in r and "ms" in floor:
        r["x_floor"] = r["ms"] / floor["ms"]
    if "fwd_ms" in r and "fwd_ms" in floor:
        r["fwd_x_floor"] = r["fwd_ms"] / floor["fwd_ms"]
    base = res[f"C={C}"][dt].get("fusedface", {})
    if prov != "fusedface" and "loss" in r and "loss" in base:
        r["loss_rel_diff_vs_fusedface"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])


def _print_point(C, dt, prov, r):
    if "error" in r or "skipped" in r:
        what = "error" if "error" in r else "skipped"
        print(f"C={C:<8} {dt:<5} {prov:<22} {what}: {r[what]}", flush=True)
        return
    extra = r.get("extra_mib")
    print(f"C={C:<8} {dt:<5} {prov:<22} fwd {_fmt(r.get('fwd_ms'), '9.3f')} ms  fwd+bwd {r['ms']:9.3f} ms  "
          f"x floor {_fmt(r.get('x_floor'), '6.2f')}  extra {_fmt(extra, '8.0f')} MiB"
          + (f"  loss diff {r['loss_rel_diff_vs_fusedface']:.1e}" if "loss_rel_diff_vs_fusedface" in r else ""),
          flush=True)


# ----------------------------------------------------------------------------- stage 3: launches

def _step_inputs(ctx):
    """The step problem of the launch and graph stages: the smallest C, bf16, leaves that need grad."""
    C = min(ctx.Cs)
    x, W, y = ctx.inputs(C, "bf16")
    return C, x.requires_grad_(True), W.requires_grad_(True), y


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def stage_launches(ctx, st):
    if not ctx.cuda:
        raise Skip("CUDA kernel counts need a GPU and the CUDA profiler (smoke run on CPU)")
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    C, x, W, y = _step_inputs(ctx)
    with fusedface_env("fusedface"):
        for _ in range(3):
            x.grad = W.grad = None
            fusedface_loss(x, W, y).backward()
        torch.cuda.synchronize()
        x.grad = W.grad = None
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fusedface_loss(x, W, y).backward()
            torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]

    def kind(e):
        act, name = str(getattr(e, "activity_type", "") or "").lower(), e.name.lower()
        for k in ("memcpy", "memset"):
            if k in act or k in name:
                return k
        return "kernel" if act in ("", "kernel", "concurrent_kernel") else "other"  # other: GPU-side annotations
    kinds = collections.Counter(kind(e) for e in device_events)
    kernels = [e for e in device_events if kind(e) == "kernel"]
    names = collections.Counter(e.name for e in kernels)
    res = st["results"]
    res.update(C=C, dtype="bf16", what="one eager forward + backward, fusedface default",
               kernels=len(kernels), memcpy=kinds["memcpy"], memset=kinds["memset"], other_device_events=kinds["other"],
               activity_types=dict(collections.Counter(str(getattr(e, "activity_type", "")) for e in device_events)),
               kernel_gpu_ms=sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
               host_launch_calls=sum(e.name in LAUNCH_CALLS for e in prof.events() if e.device_type == DeviceType.CPU),
               by_name=dict(names.most_common(40)))
    print(f"C={C} bf16 forward + backward: {res['kernels']} CUDA kernels ({res['kernel_gpu_ms']:.3f} ms of GPU time), "
          f"{res['memcpy']} memcpy, {res['memset']} memset, {res['host_launch_calls']} host launch calls", flush=True)
    for name, n in names.most_common(12):
        print(f"  {n:3d} x {name[:100]}")
    x.grad = W.grad = None


# ----------------------------------------------------------------------------- stage 4: in-backward optimizer

def _optim_heads(ctx, C, dt):
    """Two ArcFace heads on the Triton backend with the same ``W`` of ``ctx.inputs``: one driven by
    ``fusedface.optim.SGD`` (in-backward), one by ``torch.optim.SGD`` (dense ``W.grad``)."""
    import torch

    import fusedface
    x, W, y = ctx.inputs(C, dt)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    heads, opts = [], []
    for in_backward in (True, False):
        h = fusedface.ArcFace(ctx.D, C, scale=SCALE, margin=M2, backend="triton", device=ctx.device, dtype=W.dtype)
        with torch.no_grad():
            h.weight.copy_(W)
        heads.append(h)
        opts.append(fusedface.optim.SGD(h.parameters(), **kw) if in_backward else torch.optim.SGD(h.parameters(), **kw))
    return x, y, heads, opts


def _optim_step(head, opt, x, y):
    head(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def stage_optim(ctx, st):
    import harness
    res = st["results"]
    C = min(ctx.Cs)
    for dt in ("mixed", "fp32"):
        x, y, (hi, hd), (oi, od) = _optim_heads(ctx, C, dt)
        with fusedface_env("fusedface"):
            for _ in range(2):
                _optim_step(hi, oi, x, y)
                _optim_step(hd, od, x, y)
        scale = hd.weight.detach().abs().max()
        w_err = float((hi.weight - hd.weight).detach().abs().max() / scale)
        b_err = _rel(oi.state[hi.weight]["momentum_buffer"], od.state[hd.weight]["momentum_buffer"])
        res[f"{dt} C={C}"] = {"W_rel_diff": w_err, "momentum_rel_diff": b_err, "steps": 2}
        print(f"{dt:<6} C={C} in-backward SGD vs torch.optim.SGD on the dense gradient, 2 steps: "
              f"W {w_err:.2e}, momentum {b_err:.2e}", flush=True)
        ok = w_err <= 1e-5 and b_err <= 1e-5
        ctx.check("optim", f"{dt} in-backward SGD == dense torch.optim.SGD", max(w_err, b_err), 1e-5, ok,
                  f"W {w_err:.2e}, momentum {b_err:.2e} (limit 1e-5)")
        del hi, hd, oi, od
        _free(ctx)
    if not ctx.cuda:
        raise Skip("step timings and CUDA memory need a GPU (the smoke run checked the update only)")
    Cb = max(ctx.Cs)
    x, y, heads, opts = _optim_heads(ctx, Cb, "mixed")
    for name, h, o in (("in_backward", heads[0], opts[0]), ("dense", heads[1], opts[1])):
        with fusedface_env("fusedface"):
            for _ in range(3):
                _optim_step(h, o, x, y)
            with harness.PeakMemory(ctx.device) as pm:  # beyond what the step starts with: W and the state
                _optim_step(h, o, x, y)
            peak = pm.delta
            ms = loop_ms(lambda: _optim_step(h, o, x, y), n=10, repeats=3)
        res[f"mixed C={Cb} {name}"] = {"ms_per_step": ms, "extra_mib": peak / 2**20}
        print(f"mixed C={Cb} {name}: {ms:.3f} ms per step (forward, backward, optimizer), "
              f"{peak / 2**20:.1f} MiB beyond W and the state", flush=True)
    r_ib, r_d = res[f"mixed C={Cb} in_backward"], res[f"mixed C={Cb} dense"]
    res["in_backward_over_dense_ms"] = r_ib["ms_per_step"] / r_d["ms_per_step"]


# ----------------------------------------------------------------------------- stage 5: extensions

EXTENSIONS = {  # issue 16's options beyond the seed family (SPEC §2 family + the kernels' extensions)
    "curricular": dict(m2=0.5, theta_policy="threshold", negative="curricular", t=0.3),
    "interclass": dict(m2=0.5, interclass_threshold=0.2),
    "clip": dict(m2=-0.05, m3=0.45, theta_policy="clip"),  # AdaFace's policy alone: the whole-step kernels
    "subcenters3": dict(m2=0.5, subcenters=3),
    "all+clip": dict(m2=-0.05, m3=0.45, theta_policy="clip", negative="curricular", t=0.3,
                     interclass_threshold=0.2, subcenters=3),
}


def _extension_inputs(ctx, C, dt, K, seed=3):
    """``(x, W [C·K, D], y)``: every 37th row ignored, a third of the rows near a sub-centre of their
    class (hard negatives and filtered columns appear)."""
    import torch
    x, _, y = ctx.inputs(C, "fp32", seed=seed)
    g = torch.Generator(device=ctx.device).manual_seed(seed + 7)
    W = torch.randn(C * K, ctx.D, device=ctx.device, generator=g)
    n = x.shape[0] // 3
    x[:n] = W[y[:n] * K] + 0.8 * x[:n] * W[:1].norm() / x[:n].norm(dim=1, keepdim=True)
    y[::37] = -1
    DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    return x.to(DT), W.to(DT), y


def stage_extensions(ctx, st):
    from fusedface import backends, functional as Fn, reference as R
    native = backends.load("native")  # (None where fusedface._C was not built)
    res = st["results"]
    C = 300 if ctx.smoke else 20_000
    providers = ["triton"] + (["native"] if ctx.cuda and native is not None and native.cuda_built() else [])
    st["shape"] = dict(B=ctx.B, D=ctx.D, C=C, providers=providers)
    for name, kw in EXTENSIONS.items():
        K = kw.get("subcenters", 1)
        for dt in ("fp32", "bf16"):
            if ctx.report.remaining() < 25:
                res[f"{name} {dt}"] = {"skipped": f"{ctx.report.remaining():.0f} s of the budget left"}
                continue
            x, W, y = _extension_inputs(ctx, C, dt, K)
            truth = loss_and_grads(lambda a, b, c: R.margin_softmax_loss(a, b, c, **kw), x.double(), W.double(), y)
            errs = {}
            for prov in ["torch"] + providers:
                got = loss_and_grads(lambda a, b, c: Fn.margin_softmax_loss(a, b, c, backend=prov, **kw), x, W, y)
                errs[prov] = [_rel(g, t) for g, t in zip(got, truth)]
            res[f"{name} {dt}"] = {p: dict(zip(("loss", "dx", "dW"), e)) for p, e in errs.items()}
            for prov in providers:
                e = errs[prov]
                if dt == "fp32":
                    ok = e[0] <= 1e-5 and max(e[1:]) <= 5e-5
                    limit, detail = 5e-5, f"loss/dx/dW {e[0]:.2e}/{e[1]:.2e}/{e[2]:.2e} (limits 1e-5, 5e-5)"
                else:
                    base = [max(v, 1e-7) for v in errs["torch"]]
                    ratio = max(a / b for a, b in zip(e, base))
                    ok, limit, detail = ratio <= 1.25, 1.25, f"{ratio:.2f}× the torch backend's errors"
                print(f"extensions {name:<11} {dt} {prov:<6}: {detail}", flush=True)
                ctx.check("extensions", f"{name} {dt} {prov}", max(e), limit, ok, detail)
            ctx.report.save()
            _free(ctx)
    if not ctx.cuda:
        raise Skip("timings need a GPU (the smoke run checked the errors only)")
    Ct = max(ctx.Cs[0], 100_000)
    for name, kw in [("arcface", dict(m2=0.5))] + list(EXTENSIONS.items()):
        if ctx.report.remaining() < 20:
            break
        x, W, y = _extension_inputs(ctx, Ct, "bf16", kw.get("subcenters", 1))
        xl, Wl = x.detach().requires_grad_(True), W.detach().requires_grad_(True)

        def step():
            Fn.margin_softmax_loss(xl, Wl, y, backend="triton", **kw).backward()

        res[f"{name} C={Ct} bf16 fwd+bwd ms"] = ctx.time_ms(step, grads=(xl, Wl))
        print(f"extensions timing {name:<11} C={Ct} bf16: {res[f'{name} C={Ct} bf16 fwd+bwd ms']:.3f} ms", flush=True)
        del xl, Wl, x, W
        _free(ctx)


# ----------------------------------------------------------------------------- stage 6: CUDA graph

def stage_graph_step(ctx, st):
    if not ctx.cuda:
        raise Skip("CUDA graphs need a GPU (smoke run on CPU)")
    import torch
    C, x, W, y = _step_inputs(ctx)
    res = st["results"]
    res.update(C=C, dtype="bf16", method="ms per step from a loop of 50 steps between two CUDA events, median of 5; "
               "eager step = grads set to None, forward, backward")

    def eager_step():
        x.grad = W.grad = None
        fusedface_loss(x, W, y).backward()

    with fusedface_env("fusedface"):
        for _ in range(3):
            eager_step()
        loss_e = fusedface_loss(x, W, y)
        x.grad = W.grad = None
        loss_e.backward()
        gx_e, gW_e = x.grad.clone(), W.grad.clone()
        res["eager_ms"] = loop_ms(eager_step)
        res["eager_do_bench_ms"] = ctx.time_ms(lambda: fusedface_loss(x, W, y).backward(), grads=(x, W))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(3):
                eager_step()
        torch.cuda.current_stream().wait_stream(side)
        x.grad = W.grad = None  # allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = fusedface_loss(x, W, y)
            static_loss.backward()
        graph.replay()
        torch.cuda.synchronize()
        res["replay_vs_eager"] = {"loss_rel_diff": abs(float(static_loss) - float(loss_e)) / abs(float(loss_e)),
                                  "dx_rel_diff": _rel(x.grad, gx_e), "dW_rel_diff": _rel(W.grad, gW_e)}
        res["graph_ms"] = loop_ms(graph.replay)
        res["graph_do_bench_ms"] = ctx.time_ms(graph.replay)
    res["eager_over_graph"] = res["eager_ms"] / res["graph_ms"]
    print(f"C={C} bf16 step: eager {res['eager_ms']:.3f} ms, graph replay {res['graph_ms']:.3f} ms "
          f"(eager / graph {res['eager_over_graph']:.2f}); replay vs eager: {res['replay_vs_eager']}", flush=True)
    del graph, static_loss
    x.grad = W.grad = None


def loop_ms(fn, n=50, repeats=5):
    """ms per call: ``n`` calls between two CUDA events (``harness.time_reps``), median of ``repeats``."""
    import harness
    return statistics.median(harness.time_reps(fn, "cuda", number=n, min_reps=repeats, max_reps=repeats)) * 1e3


# ----------------------------------------------------------------------------- stage 6: GPU tests

TESTS_MIN_S = 60.0
SUMMARY = re.compile(r"\b(passed|failed|errors?|skipped|deselected|xfailed|xpassed|collected|no tests ran)\b")


def stage_tests(ctx, st):
    files = [f for f in ["tests/test_triton.py", "tests/test_optim_triton.py", "tests/test_triton_extensions.py",
                         "tests/test_triton_heads_extensions.py", *sorted(glob.glob("tests/test_gpu*.py", root_dir=ROOT))]
             if os.path.exists(os.path.join(ROOT, f))]
    if not files:
        raise Skip("no tests/test_triton.py or tests/test_gpu*.py in this checkout")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *files]
    if ctx.smoke:  # the GPU tests under the interpreter take minutes: smoke checks the plumbing only
        cmd += ["--collect-only", "-p", "no:hypothesispytest", "-p", "no:cacheprovider"]
    timeout = ctx.report.remaining() - 5  # leaves time to write the record
    if timeout < TESTS_MIN_S:
        raise Skip(f"{ctx.report.remaining():.0f} s of the budget left; the GPU tests need at least {TESTS_MIN_S:.0f} s "
                   "(+5 s to write the record)")
    _free(ctx)
    res = st["results"]
    res.update(command=" ".join(cmd[1:]), timeout_s=round(timeout))
    print(f"running {' '.join(cmd[1:])} (timeout {timeout:.0f} s)", flush=True)
    t = time.monotonic()
    ctx.child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # its own group: a timeout stops pytest and its workers
    try:
        out, _ = ctx.child.communicate(timeout=timeout)
        res["returncode"] = ctx.child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(ctx.child.pid, signal.SIGKILL)
        out, _ = ctx.child.communicate()
        res["returncode"] = None
        res["timed_out"] = True
    finally:
        ctx.child = None
    res["seconds"] = round(time.monotonic() - t, 1)
    lines = [ln for ln in (out or "").splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if SUMMARY.search(ln)), None)
    res["summary"] = summary or "(no pytest summary line)"
    if res.get("timed_out"):
        res["summary"] = f"timed out after {timeout:.0f} s; last summary-like line: {res['summary']}"
    res["output_tail"] = "\n".join(lines[-40:])
    print(f"tests: {res['summary']} (exit {res['returncode']}, {res['seconds']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- targets

def evaluate_targets(ctx):
    """The performance targets from what has been measured so far (SKIP where a number is missing)."""
    timings = ctx.report.data["stages"].get("timings", {}).get("results", {}) or {}
    graph = ctx.report.data["stages"].get("graph_step", {}).get("results", {}) or {}
    big, small = max(ctx.Cs), min(ctx.Cs)

    def ms(C, dt, prov):
        return (timings.get(f"C={C}", {}).get(dt, {}).get(prov) or {}).get("ms")

    def target(name, value, limit, detail, required=True, missing=""):
        if value is None:
            return dict(name=name, value=None, limit=limit, verdict="SKIP", required=required,
                        detail=f"not measured ({missing})")
        return dict(name=name, value=value, limit=limit, required=required,
                    verdict="PASS" if value <= limit else "FAIL", detail=detail.format(v=value, lim=limit))

    ff, floor = ms(big, "bf16", "fusedface"), ms(big, "bf16", "cublas_floor")
    r1 = ff / floor if ff and floor else None
    miss1 = f"bf16 C={big}: fusedface {_fmt(ff)} ms, 4-GEMM floor {_fmt(floor)} ms"
    out = [target(f"bf16 C={big} fusedface / 4-GEMM floor", r1, 2.0,
                  f"{_fmt(ff, '.3f')} / {_fmt(floor, '.3f')} ms = {{v:.2f}}x (limit {{lim}}x)", missing=miss1),
           target(f"bf16 C={big} fusedface / 4-GEMM floor (moonshot)", r1, 1.3,
                  "{v:.2f}x (moonshot {lim}x)", required=False, missing=miss1)]
    f32, mat = ms(big, "fp32", "fusedface"), ms(big, "fp32", "materialised")
    out.append(target(f"fp32 C={big} fusedface / materialised fp32 head", f32 / mat if f32 and mat else None, 0.75,
                      f"{_fmt(f32, '.3f')} / {_fmt(mat, '.3f')} ms = {{v:.2f}} (limit {{lim}})",
                      missing=f"fusedface {_fmt(f32)} ms, materialised {_fmt(mat)} ms"))
    mix = ms(big, "mixed", "fusedface")
    out.append(target(f"mixed C={big} fusedface / bf16 fusedface", mix / ff if mix and ff else None, 1.15,
                      f"{_fmt(mix, '.3f')} / {_fmt(ff, '.3f')} ms = {{v:.3f}} (limit {{lim}})",
                      missing=f"mixed {_fmt(mix)} ms, bf16 {_fmt(ff)} ms"))
    g, e = graph.get("graph_ms"), graph.get("eager_ms")
    gst = ctx.report.data["stages"].get("graph_step", {})
    gmiss = gst.get("reason") or gst.get("error") or "the graph_step stage has not measured it"
    out.append(target(f"C={small} bf16 CUDA-graph-replayed step ms", g, 1.5, "{v:.3f} ms (limit {lim} ms)",
                      missing=gmiss))
    out.append(target(f"C={small} bf16 eager / graph-replayed step", e / g if e and g else None, 1.15,
                      f"{_fmt(e, '.3f')} / {_fmt(g, '.3f')} ms = {{v:.3f}} (limit {{lim}})", missing=gmiss))
    for t in out:
        if ctx.smoke:
            t["detail"] += " [smoke: CPU numbers, not a verdict on the GPU]"
        t["line"] = f"{t['verdict']} target {t['name']}: {t['detail']}"
    return out


def print_targets(ctx):
    print("\n== targets", flush=True)
    for t in ctx.report.data["targets"]:
        print(t["line"], flush=True)
        ctx.report.lines.append(t["line"])


# ----------------------------------------------------------------------------- main

def machine_info(ctx):
    import torch
    import triton

    import fusedface
    info = dict(mode="smoke (CPU, Triton interpreter)" if ctx.smoke else "gpu", python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__, fusedface=getattr(fusedface, "__version__", "?"),
                env={k: v for k, v in os.environ.items() if k.startswith("FUSEDFACE_") or k == "TRITON_INTERPRET"})
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, capability=list(torch.cuda.get_device_capability()),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusedface", "triton_kernels"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        info["git"] = {"commit": head.stdout.strip(), "uncommitted_in_fusedface": dirty.stdout.splitlines()[:20]}
    except (OSError, subprocess.SubprocessError):
        pass
    # whether the switches the timings set appear in fusedface's source at all (an unread switch
    # silently measures the default path)
    src = ""
    for pat in ("fusedface/*.py", "triton_kernels/*.py"):
        for f in glob.glob(os.path.join(ROOT, pat)):
            with open(f, errors="replace") as fh:
                src += fh.read()
    info["switches_in_source"] = {v: v in src for v in (PATH_VAR, SPLIT_VAR)}
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the record here (rewritten after every stage and point)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: tests the script")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the whole run")
    ap.add_argument("--reserve-s", type=float, default=120.0,
                    help="the timings stop while this much budget remains (for graph, launches and tests)")
    ap.add_argument("--hard-limit-s", type=float, default=415.0, help="the watchdog ends the process here")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C-check", dest="C_check", type=int, default=50_000, help="classes of the correctness stage")
    ap.add_argument("--C", type=int, nargs="+", default=[100_000, 1_000_000], help="classes of the timings")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled head (default inductor; smoke: eager)")
    ap.add_argument("--cpu-reps", type=int, default=1, help="timed repetitions on CPU (smoke)")
    args = ap.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        # before anything imports triton: kernels decorated now run in the interpreter on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if args.smoke:
        import triton.language  # noqa: F401
        import fusedface.triton_kernels.margin_softmax  # noqa: F401
    elif not torch.cuda.is_available():
        print("bench/device_check.py needs a CUDA GPU; run it with --smoke to test it on CPU")
        return 2
    report = Report(args.json, args.budget_s, args.reserve_s, args.hard_limit_s)
    ctx = Ctx(args, report)
    report.data["args"] = vars(args)
    report.data["info"] = machine_info(ctx)
    print(json.dumps(report.data["info"]), flush=True)
    report.save()
    start_watchdog(ctx)
    run_stage(ctx, "correctness", stage_correctness, min_s=20)
    run_stage(ctx, "timings", stage_timings, min_s=MIN_POINT_S + args.reserve_s)
    run_stage(ctx, "launches", stage_launches, min_s=10)
    run_stage(ctx, "optim", stage_optim, min_s=20)
    run_stage(ctx, "extensions", stage_extensions, min_s=30)
    # last of the in-process GPU stages: a failed capture can leave the CUDA context unusable
    run_stage(ctx, "graph_step", stage_graph_step, min_s=15)
    print_targets(ctx)
    report.save()
    run_stage(ctx, "tests", stage_tests, min_s=TESTS_MIN_S + 5)
    checks, targets = report.data["checks"], report.data["targets"]
    report.data["summary"] = {
        "checks": dict(collections.Counter(c["verdict"] for c in checks)),
        "targets": dict(collections.Counter(t["verdict"] for t in targets if t["required"])),
        "moonshot": next((t["verdict"] for t in targets if not t["required"]), None),
        "stages": {k: v.get("status") for k, v in report.data["stages"].items()},
        "tests": report.data["stages"].get("tests", {}).get("results", {}).get("summary"),
    }
    report.data["finished"] = True
    report.save()
    print(f"\n== summary ({report.elapsed():.0f} s)")
    for line in report.lines:
        print("  " + line)
    print("  stages: " + ", ".join(f"{k} {v}" for k, v in report.data["summary"]["stages"].items()))
    if report.data["summary"]["tests"]:
        print(f"  tests: {report.data['summary']['tests']}")
    if args.json:
        print(f"  record: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
