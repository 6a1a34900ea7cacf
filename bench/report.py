"""Runs the benchmarks and publishes them: JSON, markdown tables, PNG plots, README's bench section.

    python bench/report.py                                # default subset (about 10 min on a 2-core CPU)
    python bench/report.py --subset full                  # issue 7's whole grid (hours on a small CPU)
    python bench/report.py --C 10k 100k --provider native insightface --no-readme
    python bench/report.py --device cuda --out bench/results     # the GPU variant
    python bench/report.py --from-json bench/results/margin_softmax_cpu.json   # re-render only

Every (provider, point) runs in a fresh subprocess (``bench/harness.py``): warm-up at a tiny size,
one step whose peak memory is measured (peak RSS on CPU, ``max_memory_allocated`` on CUDA), then
timed repetitions (median). Points that cannot run are reported with the reason: a provider not
available here, a point whose estimated memory exceeds ``--max-gib`` (estimated from the same
provider's measured smaller C when there is one), a worker killed for memory, an error, a timeout.
The machine's GEMM rate (``torch.mm`` at each point's B and D) is measured in the same run, and each
provider's throughput is reported as a fraction of it (FLOP formulas: ``harness.flops``).

Writes ``OUT/<op>_<device>.json`` (every number), ``OUT/<op>_<device>.md`` (tables),
``OUT/<op>_<device>_<group>.png`` (time and peak memory against C, log scales), and — for
``margin_softmax`` with ``--readme`` (default) — README.md's section between ``<!-- bench:start -->``
and ``<!-- bench:end -->`` and docs/benchmarks.md's section between ``<!-- results:start -->`` and
``<!-- results:end -->``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Shape, human  # noqa: E402

STATUS_TEXT = {"unavailable": "n/a", "not_timed": "not timed", "skipped": "too large", "oom": "OOM",
               "error": "error", "timeout": "timeout"}


# ----------------------------------------------------------------------------- running

def _estimate_gib(op_mod, provider, sh: Shape, done: list) -> float:
    """Peak GiB of a point (inputs, gradients and extra): from the same provider's largest measured
    smaller C (scaled by C), else the provider's rough model."""
    esz = sh.torch_dtype.itemsize
    inputs = 2 * (sh.C * sh.D + sh.B * sh.D) * esz
    best = None
    for r in done:
        if (r["provider"] == provider and r["status"] == "ok" and r["C"] < sh.C and r["B"] == sh.B
                and r["D"] == sh.D and r["dtype"] == sh.dtype and r["loss"] == sh.loss and r["mode"] == sh.mode):
            if best is None or r["C"] > best["C"]:
                best = r
    if best is not None:
        extra = max(best["extra_mib"], 0.0) * 2**20 * sh.C / best["C"]
    else:
        extra = harness.estimate_bytes(op_mod.PROVIDERS[provider], sh)
    return (inputs + extra) / 2**30


def run_points(op_mod, points, args, progress) -> list:
    done = []
    for provider, sh in points:
        prov = op_mod.PROVIDERS[provider]
        progress.set_postfix_str(f"{provider} {sh.id()}")
        rec = {"op": sh.op, "provider": provider, "label": prov.label, "fused": prov.fused,
               **{k: v for k, v in dataclasses.asdict(sh).items() if k != "op"}}
        why = prov.available(sh.device)
        need = _estimate_gib(op_mod, provider, sh, done)
        if why:
            rec.update(status="unavailable", reason=why)
        elif sh.device == "cpu" and not prov.timed_on_cpu:
            rec.update(status="not_timed", reason=prov.note)
        elif need > args.max_gib:
            rec.update(status="skipped", reason=f"needs about {need:.1f} GiB (inputs, gradients and "
                                                f"temporaries) > --max-gib {args.max_gib:g}")
        else:
            rec.update(harness.run_in_subprocess(sh.op, provider, sh, timeout=args.timeout, min_reps=args.min_reps,
                                                 max_reps=args.max_reps, target_s=args.target_s, threads=args.threads))
        if rec["status"] == "ok":
            rec["time_ms"] = round(rec["time_s"] * 1e3, 3)
        done.append(rec)
        progress.update(1)
        if rec["status"] != "ok":
            progress.write(f"  {provider:>20} {sh.id()}: {rec['status']}: {rec.get('reason', '')}")
    return done


# ----------------------------------------------------------------------------- rendering

def add_throughput(op_mod, results, gemm: dict) -> None:
    """FLOPs (``op_mod.flops``), FLOP/s and the fraction of the machine's GEMM rate per point."""
    for r in results:
        if r["status"] != "ok":
            continue
        sh = Shape(**{k: r[k] for k in ("op", "loss", "B", "D", "C", "dtype", "mode", "device")})
        fl = op_mod.flops(r["provider"], sh)
        r.update(flops=fl, gflops_per_s=float(f"{fl / r['time_s'] / 1e9:.4g}"),
                 gemm_fraction=float(f"{fl / r['time_s'] / gemm[r['dtype']]:.4g}") if fl else None)


def _fmt_ms(t):
    return f"{t:,.0f}" if t >= 100 else (f"{t:.1f}" if t >= 10 else f"{t:.2f}")


def _fmt_mib(m):
    if abs(m) < 0.05:
        return "0.0"
    return f"{m:,.0f}" if abs(m) >= 10 else f"{m:.1f}"


def _group_key(r):
    return (r["dtype"], r["B"], r["D"], r["mode"])


def _group_name(key):
    dtype, B, D, mode = key
    return f"B{B}-D{D}-{dtype}-{mode}"


def baseline_backend(device: str) -> str:
    """The backend ``backend="auto"`` picks for this device: the 'fusedface' of the ratios."""
    import torch
    from fusedface.backends import resolve
    return resolve("auto", torch.device(device))[0]


def cell(r) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return STATUS_TEXT.get(r["status"], r["status"])
    frac = f" · {100 * r['gemm_fraction']:.0f}%" if r.get("gemm_fraction") else ""
    return f"{_fmt_ms(r['time_ms'])} ms · {_fmt_mib(r['extra_mib'])} MiB{frac}"


def markdown_tables(data: dict) -> str:  # noqa: C901
    """Per group (dtype, B, D, mode): one row per (loss, provider), one column per C."""
    res = data["results"]
    out = []
    reasons = {}
    for key in sorted({_group_key(r) for r in res}, key=str):
        rows = [r for r in res if _group_key(r) == key]
        Cs = sorted({r["C"] for r in rows})
        dtype, B, D, mode = key
        out.append(f"#### {data['op']}, {mode}, B = {B}, D = {D}, {dtype}\n")
        out.append("| loss | provider | " + " | ".join(f"C = {human(c)}" for c in Cs) + " |")
        out.append("|---|---|" + "---|" * len(Cs))
        seen = []
        for r in rows:
            if (r["loss"], r["provider"]) not in seen:
                seen.append((r["loss"], r["provider"]))
        for loss, prov in seen:
            cells = []
            for c in Cs:
                r = next((r for r in rows if r["loss"] == loss and r["provider"] == prov and r["C"] == c), None)
                cells.append(cell(r))
                if r is not None and r["status"] != "ok":
                    reasons.setdefault((prov, r["status"], r.get("reason", "")), []).append(f"{loss} C={human(c)}")
            label = next(r["label"] for r in rows if r["provider"] == prov)
            out.append(f"| {loss} | `{prov}`: {label} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: median time of one step · peak memory beyond the inputs and their gradients · "
               "throughput as a fraction of the machine's measured GEMM rate in that dtype (FLOP formulas in docs/benchmarks.md).\n")
    if reasons:
        out.append("Points not measured, and why:\n")
        for (prov, status, why), where in reasons.items():
            out.append(f"- `{prov}` ({', '.join(where)}): **{STATUS_TEXT.get(status, status)}**: {why}")
        out.append("")
    return "\n".join(out)


def headline(data: dict):
    """(markdown, group key, C): the largest C of the first group, every loss, ratios against the
    auto backend. The README shows it."""
    res = data["results"]
    keys = sorted({_group_key(r) for r in res}, key=str)
    if not keys:
        return "", None, None
    # prefer the default subset's group when present
    pref = ("fp32", 128, 128, "full")
    key = pref if pref in keys else keys[0]
    rows = [r for r in res if _group_key(r) == key]
    C = max(r["C"] for r in rows)
    rows = [r for r in rows if r["C"] == C]
    base_name = data["baseline"]
    dtype, B, D, mode = key
    lines = [f"{mode.replace('full', 'forward + backward')} at B = {B}, D = {D}, **C = {C:,}**, {dtype}; "
             f"\"÷ fusedface\" divides by fusedface's `{base_name}` backend (what `backend=\"auto\"` picks here) "
             "in the same loss configuration.\n",
             "| loss | provider | time / step | time ÷ fusedface | peak memory beyond inputs | memory ÷ fusedface | GEMM fraction |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for loss in dict.fromkeys(r["loss"] for r in rows):
        base = next((r for r in rows if r["loss"] == loss and r["provider"] == base_name and r["status"] == "ok"), None)
        for r in (r for r in rows if r["loss"] == loss):
            name = f"`{r['provider']}`: {r['label']}"
            if r["status"] != "ok":
                lines.append(f"| {loss} | {name} | {STATUS_TEXT.get(r['status'], r['status'])} | | | | |")
                continue
            tr = f"{r['time_ms'] / base['time_ms']:.2f}×" if base else ""
            mr = f"{r['extra_mib'] / max(base['extra_mib'], 1e-9):,.1f}×" if base and base["extra_mib"] > 0 else ""
            gf = f"{100 * r['gemm_fraction']:.0f}%" if r.get("gemm_fraction") else ""
            lines.append(f"| {loss} | {name} | {_fmt_ms(r['time_ms'])} ms | {tr} | {_fmt_mib(r['extra_mib'])} MiB | "
                         f"{mr} | {gf} |")
    lines.append("")
    return "\n".join(lines), key, C


def plot(data: dict, out_dir: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = data["results"]
    files = []
    providers = list(dict.fromkeys(r["provider"] for r in res))
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    styles = ["-", "--", ":", "-."]
    for key in sorted({_group_key(r) for r in res}, key=str):
        rows = [r for r in res if _group_key(r) == key and r["status"] == "ok"]
        if not rows:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 5), dpi=80)
        losses = list(dict.fromkeys(r["loss"] for r in rows))
        for li, loss in enumerate(losses):
            for p in providers:
                pts = sorted((r for r in rows if r["provider"] == p and r["loss"] == loss), key=lambda r: r["C"])
                if not pts:
                    continue
                Cs = [r["C"] for r in pts]
                kw = dict(color=colours[p], linestyle=styles[li % len(styles)], marker="o", markersize=3)
                ax_t.plot(Cs, [r["time_ms"] for r in pts], label=f"{p} ({loss})", **kw)
                ax_m.plot(Cs, [max(r["extra_mib"], 1.0) for r in pts], **kw)
        dtype, B, D, mode = key
        for ax, yl in ((ax_t, "time per step (ms)"), (ax_m, "peak memory beyond inputs (MiB, ≥ 1)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        m = data["machine"]
        where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
        fig.suptitle(f"{data['op']}, {mode.replace('full', 'forward + backward')}, B = {B}, D = {D}, {dtype} — "
                     f"{where}, torch {m['torch']}", fontsize=9)
        handles, labels = ax_t.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 4) // 5), 1, 1))
        name = f"{data['op']}_{data['device']}_{_group_name(key)}.png"
        path = os.path.join(out_dir, name)
        fig.savefig(path)
        plt.close(fig)
        _shrink_png(path)
        files.append(name)
    return files


def _shrink_png(path: str) -> None:
    """Re-save with a 256-colour palette: plots stay small enough to commit."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def _replace_between(path: str, start: str, end: str, body: str) -> bool:
    if not os.path.exists(path):
        return False
    text = open(path, encoding="utf-8").read()
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return False
    new = text[: i + len(start)] + "\n" + body.rstrip() + "\n" + text[j:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return True


def publish(data: dict, out_dir: str, readme: str | None, docs: str | None, readme_device: str = "cpu") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{data['op']}_{data['device']}"
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    pngs = plot(data, out_dir)
    head, key, C = headline(data)
    tables = markdown_tables(data)
    md = [f"# {data['op']} benchmarks ({data['device']})\n",
          f"{data['date']}, `{data['command']}`, commit {data['commit']}.\n",
          f"Machine: {data['machine_short']}.\n", "## Headline\n", head, "## All points\n", tables]
    md += [f"![{p}]({p})\n" for p in pngs]
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write("\n".join(md))
    written = {"json": stem + ".json", "md": stem + ".md", "png": pngs}
    rel = os.path.relpath(out_dir, harness.ROOT)
    if readme and data["op"] == "margin_softmax" and key is not None and data["device"] == readme_device:
        png = f"{data['op']}_{data['device']}_{_group_name(key)}.png"
        body = (f"Latest run of `python bench/report.py` ({data['date']}): {data['machine_short']}. "
                f"Peak memory is the step's peak (RSS on CPU, allocator on CUDA) beyond `x`, `W` and their "
                f"gradients, each point in a fresh process; method, FLOP formulas and every point in "
                f"[docs/benchmarks.md](docs/benchmarks.md) and [{rel}/{stem}.md]({rel}/{stem}.md).\n\n"
                + head + f"\n![time and peak memory against C]({rel}/{png})\n")
        written["readme"] = _replace_between(readme, "<!-- bench:start -->", "<!-- bench:end -->", body)
    if docs:
        body = (f"### {data['op']} ({data['device']}), {data['date']}\n\n{data['machine_short']}.\n\n"
                + head + "\n" + tables + "".join(f"\n![{p}](../{rel}/{p})\n" for p in pngs))
        tag = f"{data['op']}-{data['device']}"
        written["docs"] = _replace_between(docs, f"<!-- results:{tag}:start -->", f"<!-- results:{tag}:end -->", body)
    return written


def _commit() -> str:
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=harness.ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=harness.ROOT).stdout.strip()
        return h + ("+uncommitted changes" if dirty else "") if h else "unknown"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--op", nargs="+", default=["margin_softmax", "npt"], choices=list(harness.OPS))
    p.add_argument("--subset", default="default", choices=list(harness.GRIDS), help="grid (axes overridable below)")
    harness.add_grid_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(harness.BENCH_DIR, "results"))
    p.add_argument("--max-gib", type=float, default=12.0, help="refuse points estimated to need more (reported)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per point before it is reported as a timeout")
    p.add_argument("--target-s", type=float, default=2.0, help="timed seconds per point (at least --min-reps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every worker (default: torch's default, all cores)")
    p.add_argument("--min-reps", type=int, default=1)
    p.add_argument("--max-reps", type=int, default=5)
    p.add_argument("--no-readme", dest="readme", action="store_false",
                   help="do not touch README.md and docs/benchmarks.md")
    p.add_argument("--readme-device", default="cpu",
                   help="README.md shows the results of this device (docs/benchmarks.md shows every device's)")
    p.add_argument("--from-json", nargs="+", help="re-render these results files instead of running")
    a = p.parse_args(argv)
    readme = os.path.join(harness.ROOT, "README.md") if a.readme else None
    docs = os.path.join(harness.ROOT, "docs", "benchmarks.md") if a.readme else None

    if a.from_json:
        for path in a.from_json:
            data = json.load(open(path))
            print(json.dumps(publish(data, os.path.dirname(os.path.abspath(path)), readme, docs, a.readme_device)))
        return

    import torch
    from tqdm import tqdm

    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)  # the GEMM rate is measured with the workers' thread count
    info = harness.machine_info(a.device)
    plans = []
    for op in a.op:
        mod = harness.load_op(op)
        losses = [x for x in a.loss if x in mod.LOSSES] if a.loss else None
        provs = [x for x in a.provider if x in mod.PROVIDERS] if a.provider else None
        if (a.loss and not losses) or (a.provider and not provs):
            print(f"{op}: nothing selected (--loss/--provider name none of its losses {', '.join(mod.LOSSES)} "
                  f"or providers {', '.join(mod.PROVIDERS)}): not run")
            continue
        pts = harness.grid_points(mod, a.subset, B=a.B, D=a.D, C=a.C, dtype=a.dtype, mode=a.mode,
                                  loss=losses, provider=provs, device=a.device)
        plans.append((op, mod, pts))
    unknown = [x for x in (a.provider or []) if not any(x in harness.load_op(op).PROVIDERS for op in a.op)]
    unknown += [x for x in (a.loss or []) if not any(x in harness.load_op(op).LOSSES for op in a.op)]
    if unknown:
        raise SystemExit(f"unknown provider or loss: {', '.join(unknown)}")
    # the machine's GEMM rate in every dtype of the run: at the start, and again at the end
    dtypes = sorted({sh.dtype for _, _, pts in plans for _, sh in pts})
    a.gemm = {dt: harness.gemm_rate(harness.DTYPES[dt], a.device) for dt in dtypes}
    short = harness.describe_machine(info, a.gemm)
    print(f"machine: {short}", flush=True)
    total = sum(len(pts) for _, _, pts in plans)
    runs = []
    with tqdm(total=total, desc="benchmarks", unit="point", dynamic_ncols=True) as bar:
        for op, mod, pts in plans:
            runs.append((op, mod, run_points(mod, pts, a, bar)))
    end = {dt: harness.gemm_rate(harness.DTYPES[dt], a.device) for dt in dtypes}
    a.gemm = {dt: max(a.gemm[dt], end[dt]) for dt in dtypes}
    short = harness.describe_machine(info, a.gemm)
    for op, mod, results in runs:
        add_throughput(mod, results, a.gemm)
        data = {
            "op": op, "device": a.device,
            "date": datetime.date.today().isoformat(),
            "command": "python bench/report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": _commit(), "machine": info, "machine_short": short,
            "gemm_flops_per_s": a.gemm,
            "baseline": baseline_backend(a.device),
            "flop_formula": {"forward": "2·B·C·D", "backward": "fused (recompute): 3 × 2·B·C·D; materialised: 2 × 2·B·C·D"
                             + ("; NPT fused backward: 0 (sparse)" if op == "npt" else "")},
            "wall_s": round(time.perf_counter() - t_start, 1),
            "results": results,
        }
        written = publish(data, a.out, readme, docs, a.readme_device)
        print(f"{op}: wrote {json.dumps(written)} under {a.out}")
        print(headline(data)[0])
    print(f"report done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
