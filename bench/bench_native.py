"""Speed and memory of backend="native" on this CPU (issue 4's acceptance), all in one run.

    python bench/bench_native.py                      # everything (about 20-40 min on 2 cores)
    python bench/bench_native.py --C 100000 --D 128 --dtype float32 --reps 3
    python bench/bench_native.py --threads 1 --out bench/results/bench_native_1thread.json

For each shape (B = 512, C ∈ {100,000, 1,000,000}, D ∈ {128, 512}, fp32 and bf16) one training
step — forward + backward of an ArcFace loss (s = 64, m = 0.5), both gradients — is timed for:

  native          backend="native" (fusedface._C): recomputing backward, 4 GEMMs per tile
  native_fast     bf16 only: the same with FUSEDFACE_NATIVE_FAST_GRAD=1 (dc rounded to bf16 in the
                  two gradient GEMMs, like autocast training)
  native_bf16     bf16 only: the same with FUSEDFACE_NATIVE_PRECISION=bf16 (every tile GEMM a plain
                  bf16 GEMM with bf16 output, as torch.mm and a plain bf16 pipeline; fp32 epilogue)
  native_kept     fusedface.functional.margin_softmax_loss_kept_block: keeps the [C, B] block of
                  cosines between forward and backward (3 GEMMs), when it fits --block-budget
  torch           backend="torch" (the chunked plain-PyTorch engine)
  insightface     the materialised baseline (harness.materialised_arcface, logits in the input dtype):
                  normalise, ONE matmul, margin on the target column, F.cross_entropy (three matrix
                  products and a dozen [B, C] passes); skipped where its measured peak memory, scaled
                  to the shape, would not fit in the available RAM
  mm4             the floor of a recomputing design (harness.gemm_floor): the four torch.mm products of
                  the same shapes and dtype (x·Wᵀ, the recompute x·Wᵀ, dc·W, dcᵀ·x)
  mm3             the floor of a design that keeps the block (harness.gemm_floor): x·Wᵀ, dc·W, dcᵀ·x
  mm4_f32out      bf16 only: the four products as a design with fp32 cosines must run them on this
                  kind of CPU — the two cosine products bf16×bf16 with fp32 OUTPUT (fp32 copies of the
                  bf16 operands on oneDNN's bf16 units, exact), the two gradient products plain bf16.
                  torch.mm of bf16 writes bf16 cosines (2⁻⁹ relative), which a loss at s = 64 cannot use

Each timed call goes through bench/harness.py (``time_reps`` for the time, ``PeakMemory`` for the
peak RSS growth). Providers are interleaved round-robin within each repetition and the minimum is
reported (other jobs share the machine; the load average is recorded). The two slow baselines (torch, insightface) are
timed three times; above C = 200,000 there is no warm-up step and they are timed once. Throughput is reported against the FLOP
count of the four products, 4·2·B·C·D. Ratios: native/mm4 (acceptance: ≤ 1.25), native/torch and
native/insightface (acceptance: < 1), native_kept/mm3 (the three-product floor), and the same three
for native_bf16.

The memory contract (peak RSS beyond x, W and their gradients at B = 256, D = 128, C = 400,000 fp32,
< 96 MiB) is measured in a fresh subprocess by bench/memory.py.

Results: a table on stdout and a JSON file (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import harness  # noqa: E402  (timing, peak RSS and the peers)
import fusedface.functional as F_  # noqa: E402
from fusedface import functional as FF  # noqa: E402
from fusedface.backends import native  # noqa: E402

S, M2 = 64.0, 0.5


# ----------------------------------------------------------------------------------- providers

class Inputs:
    """One shape's inputs, shared by every provider (at a million classes W alone is 2 GB in fp32:
    one copy per provider would not fit). The gradient ``dc`` of the matmul floors and the fp32
    copies of ``mm4_f32out`` are made on first use and dropped with the shape."""

    def __init__(self, B, C, D, dtype):
        g = torch.Generator().manual_seed(0)
        self.B, self.C, self.D, self.dtype = B, C, D, dtype
        self.x = torch.randn(B, D, generator=g).to(dtype).requires_grad_(True)
        self.W = torch.randn(C, D, generator=g).to(dtype).requires_grad_(True)
        self.y = torch.randint(0, C, (B,), generator=g)
        self._dc = self._xf = self._Wf = None

    @property
    def dc(self):
        if self._dc is None:
            self._dc = torch.randn(self.B, self.C, generator=torch.Generator().manual_seed(1)).to(self.dtype)
        return self._dc

    @property
    def f32(self):
        if self._xf is None:
            self._xf, self._Wf = self.x.detach().float(), self.W.detach().float()
        return self._xf, self._Wf


def setup(provider, inp: Inputs, block_budget):
    """A zero-argument callable that runs one step of ``provider`` on the shared inputs, or a string
    saying why the provider is skipped here."""
    x, W, y, dtype = inp.x, inp.W, inp.y, inp.dtype
    B, C = inp.B, inp.C

    def loss_step(fn):
        def run():
            loss = fn()
            torch.autograd.grad(loss, (x, W))
        return run

    if provider == "native":
        return loss_step(lambda: F_.margin_softmax_loss(x, W, y, scale=S, m2=M2, backend="native"))
    switches = {"native_fast": ("FUSEDFACE_NATIVE_FAST_GRAD", "1", "fast_grad"),
                "native_bf16": ("FUSEDFACE_NATIVE_PRECISION", "bf16", "the bf16-GEMM mode")}
    if provider in switches:
        var, value, what = switches[provider]
        if dtype != torch.bfloat16:
            return f"{what} only changes bf16 inputs"

        def run():
            with harness.env_vars(**{var: value}):
                loss = F_.margin_softmax_loss(x, W, y, scale=S, m2=M2, backend="native")
                torch.autograd.grad(loss, (x, W))
        return run
    if provider == "native_kept":
        need = B * C * 4
        if need > block_budget:
            return (f"the [C, B] fp32 block needs {need / 2**20:.0f} MiB > --block-budget "
                    f"{block_budget / 2**20:.0f} MiB")
        return loss_step(lambda: FF.margin_softmax_loss_kept_block(x, W, y, scale=S, m2=M2, budget=block_budget))
    if provider == "torch":
        return loss_step(lambda: F_.margin_softmax_loss(x, W, y, scale=S, m2=M2, backend="torch"))
    if provider == "insightface":
        return loss_step(lambda: harness.materialised_arcface(x, W, y, S, M2, fp32_logits=False))
    xd, Wd = x.detach(), W.detach()
    if provider == "mm4":
        return harness.gemm_floor(x, W, lambda: inp.dc, products=4)
    if provider == "mm4_f32out":
        if dtype != torch.bfloat16:
            return "only defined for bf16 inputs"

        def run():
            xf, Wf = inp.f32
            dc = inp.dc
            with mkldnn_fp32_precision("bf16"):
                torch.mm(xf, Wf.t())
                torch.mm(xf, Wf.t())
            torch.mm(dc, Wd)
            torch.mm(dc.t(), xd)
        return run
    if provider == "mm3":
        return harness.gemm_floor(x, W, lambda: inp.dc, products=3)
    raise ValueError(provider)


PROVIDERS = ["native", "native_fast", "native_bf16", "native_kept", "torch", "insightface", "mm4", "mm3",
             "mm4_f32out"]


@contextlib.contextmanager
def mkldnn_fp32_precision(value):
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


# ------------------------------------------------------------------------------------ measuring

def timed(run):
    """(seconds, peak RSS growth in MiB during the call; NaN where the peak cannot be reset)."""
    with harness.PeakMemory("cpu", require_reset=False) as pm:
        dt = harness.time_reps(run)[0]
    return dt, (pm.delta / 2**20 if pm.reset else float("nan"))


def bench_shape(B, C, D, dtype, reps, block_budget, providers, peak_hint):
    """Interleaved repetitions; returns {provider: record}."""
    runs, out = {}, {}
    inp = Inputs(B, C, D, dtype)
    for p in providers:
        if p == "insightface" and peak_hint.get(("insightface", D, str(dtype))) is not None:
            per_class = peak_hint[("insightface", D, str(dtype))]
            need = per_class * C * 2**20
            avail = harness.status_kib("MemAvailable", harness.MEMINFO) * 1024
            if need > 0.5 * avail:
                out[p] = {"skipped": f"needs about {need / 2**30:.1f} GiB (measured peak at C=100,000 scaled to "
                                     f"C={C:,}) > 50% of the {avail / 2**30:.1f} GiB available"}
                continue
        r = setup(p, inp, block_budget)
        if isinstance(r, str):
            out[p] = {"skipped": r}
        else:
            runs[p] = r
    times = {p: [] for p in runs}
    peaks = {p: 0.0 for p in runs}
    warm = C <= 200_000  # at a million classes one step takes seconds: the first rep is the warm-up's cost only
    if warm:
        for p, run in runs.items():
            run()
    slow = {"torch", "insightface"}
    for rep in range(reps):
        for p, run in runs.items():
            if p in slow and (rep >= 3 or (rep > 0 and not warm)):
                continue  # the slow baselines: three timed runs, one at a million classes
            dt, pk = timed(run)
            times[p].append(dt)
            peaks[p] = max(peaks[p], pk)
            print(f"    rep {rep + 1}/{reps} {p:<12} {dt * 1e3:9.1f} ms  peak +{pk:8.1f} MiB", flush=True)
    flops = 4 * 2 * B * C * D
    for p in runs:
        t = min(times[p])
        out[p] = {"time_s": t, "times_s": times[p], "peak_rss_mib": round(peaks[p], 1),
                  "gflops_4products": round(flops / t / 1e9, 1)}
    return out


def ratios(res):
    def t(p):
        return res.get(p, {}).get("time_s")
    r = {}
    for name, (a, b) in {"native/mm4": ("native", "mm4"), "native/torch": ("native", "torch"),
                         "native/insightface": ("native", "insightface"),
                         "native_fast/mm4": ("native_fast", "mm4"), "native_fast/torch": ("native_fast", "torch"),
                         "native_fast/insightface": ("native_fast", "insightface"),
                         "native_bf16/mm4": ("native_bf16", "mm4"), "native_bf16/torch": ("native_bf16", "torch"),
                         "native_bf16/insightface": ("native_bf16", "insightface"),
                         "native_kept/mm3": ("native_kept", "mm3"), "native_kept/mm4": ("native_kept", "mm4"),
                         "native/mm4_f32out": ("native", "mm4_f32out"),
                         "native_fast/mm4_f32out": ("native_fast", "mm4_f32out"),
                         "mm3/mm4": ("mm3", "mm4")}.items():
        if t(a) is not None and t(b) is not None:
            r[name] = round(t(a) / t(b), 3)
    return r


def memory_contract():
    cmd = [sys.executable, os.path.join(HERE, "memory.py"), "--backend", "native", "--B", "256", "--D", "128",
           "--C", "400000", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["limit_mib"] = 96
    res["ok"] = res["extra_mib"] < 96
    res["command"] = " ".join(cmd[1:])
    return res


def markdown(doc):
    """Markdown tables (step times and ratios) of a saved result file."""
    cols = [c for c in PROVIDERS if any(c in r["providers"] for r in doc["results"])]
    names = ["native/mm4", "native/torch", "native/insightface", "native_fast/mm4", "native_bf16/mm4",
             "native_bf16/torch", "native_bf16/insightface", "native_kept/mm3", "native_fast/mm4_f32out"]
    names = [n for n in names if any(n in r["ratios"] for r in doc["results"])]
    lines = ["| C | D | dtype | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for r in doc["results"]:
        cells = []
        for c in cols:
            v = r["providers"].get(c, {})
            cells.append(f"{v['time_s'] * 1e3:,.0f}" if "time_s" in v else ("skip" if "skipped" in v else "-"))
        lines.append(f"| {r['C']:,} | {r['D']} | {r['dtype']} | " + " | ".join(cells) + " |")
    lines += ["", "| C | D | dtype | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for r in doc["results"]:
        lines.append(f"| {r['C']:,} | {r['D']} | {r['dtype']} | " +
                     " | ".join(f"{r['ratios'][n]:.2f}" if n in r["ratios"] else "-" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--C", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--D", type=int, nargs="+", default=[128, 512])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions at C <= 200,000 (torch, insightface: 3)")
    p.add_argument("--reps-large", type=int, default=2,
                   help="timed repetitions above C = 200,000 (torch and insightface: one)")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--block-budget", type=int, default=512 * 2**20,
                   help="bytes the kept [C, B] block may use (default 512 MiB)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every provider (default: torch's, = the cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory-contract subprocess")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_native.json"))
    p.add_argument("--markdown", metavar="JSON", help="print the tables of a saved result file and exit")
    a = p.parse_args(argv)
    if a.markdown:
        with open(a.markdown) as fh:
            print(markdown(json.load(fh)))
        return
    if a.threads is not None:
        torch.set_num_threads(a.threads)

    info = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "cpu": harness.cpu_model(),
        "native_build": native.build_info(), "loadavg_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    print(f"fusedface native bench: torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
          f"{info['native_build']['cpu']}; load average {info['loadavg_start']}", flush=True)
    results, peak_hint = [], {}
    for C in sorted(a.C):
        for D in a.D:
            for dt_name in a.dtype:
                dtype = getattr(torch, dt_name)
                reps = a.reps if C <= 200_000 else a.reps_large
                print(f"  B={a.B} C={C:,} D={D} {dt_name}", flush=True)
                res = bench_shape(a.B, C, D, dtype, reps, a.block_budget, a.providers, peak_hint)
                ins = res.get("insightface", {})
                if "peak_rss_mib" in ins and (("insightface", D, str(dtype)) not in peak_hint):
                    peak_hint[("insightface", D, str(dtype))] = max(ins["peak_rss_mib"], 1.0) / C
                results.append({"B": a.B, "C": C, "D": D, "dtype": dt_name, "providers": res, "ratios": ratios(res)})
    info["loadavg_end"] = os.getloadavg()
    mem = None if a.no_memory else memory_contract()

    # ---- table
    cols = [c for c in PROVIDERS if c in a.providers]
    print()
    print("step time (ms; min over repetitions, providers interleaved)")
    print(f"{'C':>9} {'D':>4} {'dtype':>8} " + " ".join(f"{c:>11}" for c in cols))  # noqa: E501
    for r in results:
        cells = []
        for c in cols:
            v = r["providers"].get(c, {})
            cells.append(f"{v['time_s'] * 1e3:11.1f}" if "time_s" in v else f"{'skip' if 'skipped' in v else '-':>11}")
        print(f"{r['C']:>9} {r['D']:>4} {r['dtype']:>8} " + " ".join(cells))
    print()
    names = ["native/mm4", "native/torch", "native/insightface", "native_fast/mm4", "native_fast/insightface",
             "native_bf16/mm4", "native_bf16/torch", "native_bf16/insightface", "native_kept/mm3",
             "native_fast/mm4_f32out", "mm3/mm4"]
    print("ratios (acceptance: native/mm4 <= 1.25; native/torch < 1; native/insightface < 1)")
    print(f"{'C':>9} {'D':>4} {'dtype':>8} " + " ".join(f"{n:>18}" for n in names))
    for r in results:
        print(f"{r['C']:>9} {r['D']:>4} {r['dtype']:>8} " +
              " ".join(f"{r['ratios'][n]:18.3f}" if n in r["ratios"] else f"{'-':>18}" for n in names))
    skipped = [(r["C"], r["D"], r["dtype"], p, v["skipped"]) for r in results for p, v in r["providers"].items()
               if "skipped" in v]
    if skipped:
        print()
        print("skipped:")
        for C, D, dt, prov, why in skipped:
            print(f"  C={C:,} D={D} {dt} {prov}: {why}")
    if mem is not None:
        print()
        if "error" in mem:
            print(f"memory contract: ERROR {mem['error']}")
        else:
            print(f"memory contract (B=256, D=128, C=400,000 fp32, native): {mem['extra_mib']} MiB beyond x, W and "
                  f"their gradients (limit 96 MiB: {'OK' if mem['ok'] else 'FAIL'}; {mem['method']})")
    print(f"load average at start {info['loadavg_start']}, at end {info['loadavg_end']}")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"info": info, "results": results, "memory_contract": mem}, fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
