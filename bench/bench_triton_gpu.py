"""GPU benchmark of ``backend="triton"`` (forward + backward of ArcFace, s = 64, m = 0.5).

    python bench/bench_triton_gpu.py [--C 100000 1000000] [--dtype bf16 fp32] [--json out.json]
                                     [--check-only] [--sweep [bf16 fp32]] [--profile FILE]

Providers, at B = 512, D = 512:

* ``cublas_floor``: the four ``torch.mm`` products a recomputing design must do — forward ``x·Wᵀ``,
  backward recompute ``x·Wᵀ``, ``dc·W`` and ``dcᵀ·x`` ([B, C] operand precomputed, not timed) — with
  nothing else (``harness.gemm_floor``): the time no fused kernel of this design can beat by much.
  Forward alone: one product.
* ``triton``: ``F.margin_softmax_loss(..., backend="triton")`` + ``backward()`` (default: deterministic,
  ``dℓ/dc`` split hi + lo for fp32-grade gradients, fp32 dots as tf32x3); ``triton_fast``:
  ``FUSEDFACE_TRITON_FAST_GRAD=1``; ``triton_ieee`` / ``triton_tf32``: fp32 inputs with
  ``FUSEDFACE_TRITON_FP32_PRECISION=ieee`` / ``tf32``.
* ``torch``: the `torch` backend (``backend="torch"``).
* ``materialised`` (``harness.materialised_arcface``): what InsightFace does —
  ``F.linear(F.normalize(x), F.normalize(W))`` (a [B, C] matrix in the input dtype), ``.float()``,
  clamp, ``cos(acos(c) + m)`` on the target column, ``F.cross_entropy`` — plus autograd.

Times are medians of ``triton.testing.do_bench`` (``harness.median_ms``: CUDA events, gradients reset
between runs); peak memory (``harness.measure_peak``) is ``torch.cuda.max_memory_allocated`` during one
forward + backward minus what was allocated before it, minus the two gradients (``extra``), and
including them (``peak``). ``--sweep`` times the gradient kernels alone at C = 10⁶ bf16 for a few
launch configurations (every one compiles without spills, ``bench/check_triton_compile.py``) and runs
the 16-bit benchmarks with the fastest. A correctness check against the reference at a moderate
shape runs first. Prints tables; ``--json`` writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (timing, CUDA peak memory, the peers, environment switches)

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(B, D, C, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(C, D, device=device, generator=g) * 0.05).to(dtype)
    y = torch.randint(0, C, (B,), device=device, generator=g)
    # embeddings near their centre so the target cosines and the softmax are not degenerate
    x = (W[y].float() / W[y].float().norm(dim=1, keepdim=True) * 3.0
         + 0.15 * torch.randn(B, D, device=device, generator=g)).to(dtype)
    return x, W, y


def check(B=512, D=512, C=50_000):
    """fp32 against the reference (loss, dL/dx, dL/dW relative max errors) and bf16 against a float64
    truth next to plain PyTorch's error at the same precision."""
    from fusedface import functional as Fn
    out = {}
    for dt in ("fp32", "bf16"):
        x, W, y = _inputs(B, D, C, DT[dt], seed=1)
        y[::37] = -1  # ignored rows

        def run(backend, xx, WW, **kw):
            xl, Wl = xx.detach().clone().requires_grad_(True), WW.detach().clone().requires_grad_(True)
            loss = Fn.margin_softmax_loss(xl, Wl, y, m2=0.5, backend=backend, **kw)
            gx, gW = torch.autograd.grad(loss, (xl, Wl))
            return [loss.detach().double(), gx.double(), gW.double()]

        truth = run("reference", x.double(), W.double())
        plain = run("reference", x, W)
        got = run("triton", x, W)
        if dt == "bf16":
            with harness.env_vars(FUSEDFACE_TRITON_FAST_GRAD=1):
                fast = run("triton", x, W)
        else:
            with harness.env_vars(FUSEDFACE_TRITON_FP32_PRECISION="ieee"):
                fast = run("triton", x, W)
        rel = lambda a, t: float((a - t).abs().max() / t.abs().max())  # noqa: E731
        for i, name in enumerate(("loss", "dx", "dW")):
            out[f"{dt}_{name}_triton_vs_fp64"] = rel(got[i], truth[i])
            out[f"{dt}_{name}_reference_vs_fp64"] = rel(plain[i], truth[i])
            out[f"{dt}_{name}_triton_{'fast' if dt == 'bf16' else 'ieee'}_vs_fp64"] = rel(fast[i], truth[i])
    return out


def bench_one(B, D, C, dt, providers):
    from fusedface import functional as Fn
    dtype = DT[dt]
    x, W, y = _inputs(B, D, C, dtype)
    x.requires_grad_(True)
    W.requires_grad_(True)
    flops_fwd = 2.0 * B * C * D
    rows = []

    def add(provider, mode, ms, peak=None, extra=None, note=""):
        flops = flops_fwd if mode == "forward" else 4 * flops_fwd
        rows.append(dict(provider=provider, mode=mode, B=B, D=D, C=C, dtype=dt, ms=ms,
                         tflops_equiv=flops / (ms * 1e-3) / 1e12, peak_mib=peak, extra_mib=extra, note=note))

    if "cublas_floor" in providers:
        xd, Wd = x.detach(), W.detach()
        dc = (torch.randn(B, C, device="cuda") * 1e-3).to(dtype)
        add("cublas_floor", "forward", harness.median_ms(harness.gemm_floor(xd, Wd, products=1), "cuda"))
        add("cublas_floor", "fwd+bwd", harness.median_ms(harness.gemm_floor(xd, Wd, dc, products=4), "cuda"),
            note="4 GEMMs, no epilogue")
        del dc

    def loss_fn(backend):
        if backend == "materialised":
            return lambda: harness.materialised_arcface(x, W, y)
        return lambda: Fn.margin_softmax_loss(x, W, y, m2=0.5, backend=backend)

    for prov in providers:
        if prov == "cublas_floor":
            continue
        env = {"triton_fast": {"FUSEDFACE_TRITON_FAST_GRAD": 1},
               "triton_ieee": {"FUSEDFACE_TRITON_FP32_PRECISION": "ieee"},
               "triton_tf32": {"FUSEDFACE_TRITON_FP32_PRECISION": "tf32"}}.get(prov, {})
        backend = "triton" if prov.startswith("triton") else prov
        f = loss_fn(backend)
        try:
            with harness.env_vars(**env):
                with torch.no_grad():
                    t_f = harness.median_ms(f, "cuda")
                t_fb = harness.median_ms(lambda: f().backward(), "cuda", grads=(x, W))
                mem = harness.measure_peak(lambda: f().backward(), "cuda", grads=(x, W))
                peak, extra = mem["peak_mib"], mem["extra_mib"]
        except torch.OutOfMemoryError as exc:
            add(prov, "fwd+bwd", float("nan"), note=f"OOM: {str(exc)[:80]}")
            torch.cuda.empty_cache()
            continue
        add(prov, "forward", t_f)
        add(prov, "fwd+bwd", t_fb, peak, extra)
        torch.cuda.empty_cache()
    return rows


def kernel_breakdown(B, D, C, dt, configs=None):
    """Times of the three Triton kernels alone (plus their O(S·B) merges) at one shape; ``configs``
    maps kernel -> LaunchConfig to try instead of the defaults."""
    from fusedface.backends import triton_tiles as T
    from fusedface._engine import margin_prologue
    from fusedface._options import MarginOptions
    x, W, y = _inputs(B, D, C, DT[dt])
    opts = MarginOptions()
    _, y_lab, xinv, winv, _, f, _ = margin_prologue(x, W, y, opts, 0.5, 0.0, torch.float32)
    lse, _, _ = T._forward_impl(x, W, xinv, winv, y_lab, f, 64.0, 1.0, 0.0, 0)
    gl = torch.full_like(xinv, 1.0 / B)
    dcy = -64.0 * gl
    out = {}
    with T.override(configs=configs or {}):
        out["fwd"] = harness.median_ms(lambda: T._forward_impl(x, W, xinv, winv, y_lab, f, 64.0, 1.0, 0.0, 0), "cuda")
        out["dx"] = harness.median_ms(lambda: T._dx_impl(x, W, xinv, winv, y_lab, f, lse, gl, dcy, 64.0, 1.0, 0.0, 0),
                                      "cuda")
        out["dw"] = harness.median_ms(lambda: T._dw_impl(x, W, xinv, winv, y_lab, f, lse, gl, dcy, 64.0, 1.0, 0.0, 0),
                                      "cuda")
    return out


def profile(B, D, C, dt, path):
    """Where the time of one forward + backward goes (CPU launch overhead vs kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from fusedface import functional as Fn
    x, W, y = _inputs(B, D, C, DT[dt])
    x.requires_grad_(True)
    W.requires_grad_(True)
    for _ in range(3):
        Fn.margin_softmax_loss(x, W, y, m2=0.5, backend="triton").backward()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            Fn.margin_softmax_loss(x, W, y, m2=0.5, backend="triton").backward()
        torch.cuda.synchronize()
    with open(path, "w") as fh:
        fh.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        fh.write("\n\n")
        fh.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


SWEEP = {  # (block_m, block_n, block_k, block_d, num_warps, num_stages, resident, grad_t); all spill-free
    "bf16": {
        "dx": [(32, 64, 64, 512, 8, 3, True, False), (32, 64, 64, 512, 8, 3, True, True)],
        "dw": [(64, 32, 64, 512, 8, 3, False, False), (64, 32, 64, 512, 8, 3, False, True),
               (32, 32, 64, 512, 8, 3, True, True)],
    },
    "fp32": {  # spill-free with ieee, tf32 and tf32x3 dots
        "dx": [(32, 64, 32, 128, 8, 2, False, True), (64, 32, 32, 128, 8, 2, False, False)],
        "dw": [(64, 64, 32, 128, 8, 2, False, False), (64, 32, 32, 128, 8, 2, False, False)],
    },
}


def sweep(B, D, C, dt):
    """Times each candidate; returns the rows and the fastest config per kernel."""
    from fusedface.backends import triton_tiles as T
    res, best = [], {}
    for kern, cands in SWEEP[dt].items():
        for c in cands:
            cfg = T.LaunchConfig(*c[:4], num_warps=c[4], num_stages=c[5], resident=c[6], grad_t=c[7])
            try:
                t = kernel_breakdown(B, D, C, dt, {kern: cfg})[kern]
            except Exception as exc:  # a config that does not run is reported, not fatal
                t = float("nan")
                print(f"sweep {kern} {c}: {type(exc).__name__}: {str(exc)[:120]}")
            res.append(dict(kernel=kern, config=list(c), ms=t))
            print(f"sweep {kern:<4} M{c[0]} N{c[1]} K{c[2]} D{c[3]} w{c[4]} s{c[5]} resident={c[6]} grad_t={c[7]}: "
                  f"{t:8.3f} ms", flush=True)
            if t == t and (kern not in best or t < best[kern][0]):
                best[kern] = (t, cfg)
    return res, {k: v[1] for k, v in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--providers", nargs="+",
                    default=["cublas_floor", "triton", "triton_fast", "triton_ieee", "triton_tf32", "torch",
                             "materialised"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=None, choices=["bf16", "fp32"],
                    help="sweep the gradient kernels' configs at C = 10^6 for these dtypes (default bf16)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the C=1e5 bf16 step here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA GPU")
        return 2
    import triton
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, capability=list(torch.cuda.get_device_capability()))
    print(json.dumps(info))
    result = dict(info=info)
    t0 = time.time()
    result["check"] = check()
    print("correctness (max |err| / max |truth|):")
    for k, v in result["check"].items():
        print(f"  {k:<34} {v:.3e}")
    if args.check_only:
        return 0
    winners = {}
    if args.sweep is not None:
        args.sweep = args.sweep or ["bf16"]
        result["sweep"], result["sweep_winners"] = [], {}
        for dt in args.sweep:
            rows_s, winners[dt] = sweep(args.B, args.D, 1_000_000, dt)
            result["sweep"] += [dict(r, dtype=dt) for r in rows_s]
            result["sweep_winners"][dt] = {k: str(v) for k, v in winners[dt].items()}
            print(f"sweep winners {dt}, used for the {dt} runs below:", result["sweep_winners"][dt], flush=True)
    if args.profile:
        profile(args.B, args.D, 100_000, "bf16", args.profile)
    result["kernels"] = {}
    result["rows"] = []
    for dt in args.dtype:
        for C in args.C:
            provs = [p for p in args.providers if not (p == "triton_fast" and dt == "fp32")
                     and not (p in ("triton_ieee", "triton_tf32") and dt != "fp32")
                     and not (p == "triton_ieee" and C > 200_000)]  # 0.6 s a step: measured at 10^5 only
            rows = bench_one(args.B, args.D, C, dt, provs)
            result["rows"] += rows
            result["kernels"][f"{dt}_{C}"] = kernel_breakdown(args.B, args.D, C, dt)
            floor = {r["mode"]: r["ms"] for r in rows if r["provider"] == "cublas_floor"}
            print(f"\nB={args.B} D={args.D} C={C:,} {dt}   (kernels alone: " + ", ".join(
                f"{k} {v:.3f} ms" for k, v in result["kernels"][f"{dt}_{C}"].items()) + ")")
            print(f"{'provider':<14} {'mode':<8} {'ms':>9} {'TFLOP/s eq':>10} {'x floor':>8} {'peak MiB':>9} {'extra MiB':>10}")
            for r in rows:
                ratio = r["ms"] / floor[r["mode"]] if floor.get(r["mode"]) else float("nan")
                r["x_floor"] = ratio
                pk = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                ex = "" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
                print(f"{r['provider']:<14} {r['mode']:<8} {r['ms']:>9.3f} {r['tflops_equiv']:>10.1f} {ratio:>8.2f} "
                      f"{pk:>9} {ex:>10} {r['note']}", flush=True)
    result["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
