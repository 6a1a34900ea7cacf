"""Class-sharded heads: bytes each rank sends and each rank's peak memory per training step.

    python bench/bench_distributed.py [--classes 1000000] [--dim 128] [--batch 128] [--worlds 1 2]
                                      [--heads arcface arcface-pfc0.1 npt] [--backend auto] [--json out.json]

For every world size (CPU processes, gloo, 127.0.0.1 only) and head, each rank runs two warm-up
steps and one measured step (forward + backward + SGD step) on ``--batch`` rows of its own
(global batch ``batch·R``). Per rank it reports:

* **bytes sent**: every collective fusedface called, counted by wrapping them
  (:func:`fusedface.distributed.record_communication`): ``payload`` (bytes handed to the
  collective) and ``sent`` (the ring model of docs/distributed.md). Nothing here grows with ``C``;
  for scale, the ``[B, C]`` fp32 logits a materialising model-parallel head would move are shown.
* **wire bytes**: the bytes the loopback interface carried during the step (all ranks together,
  TCP/IP overhead included; /proc/net/dev), a check of the counted figures.
* **peak RSS** of the step (``harness.PeakMemory``: VmHWM, reset through /proc/self/clear_refs
  after the set-up) and the resident size before it (``W`` and the process, no gradient:
  ``zero_grad(set_to_none=True)``); their difference is the step's extra memory, against its floor
  ``dL/dW = C_local·D·4`` bytes. The step's time is one repetition of ``harness.time_reps``.

Prints a table, then the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (peak RSS and timing)
from fusedface.distributed._spawn import init_local_group, run_local_group  # noqa: E402

HEADS = {
    "arcface": ("ShardedArcFace", {}),
    "arcface-pfc0.1": ("ShardedArcFace", {"sample_rate": 0.1}),
    "npt": ("ShardedNPT", {"k": 4}),
}


def _lo_tx_bytes() -> int | None:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
    except OSError:
        pass
    return None


def _worker(rank, world, port, args, name, outdir):
    init_local_group(rank, world, port, timeout_s=600, threads=max(1, (os.cpu_count() or 1) // world))
    import fusedface.distributed as FD

    try:  # one head per process group, so the RSS figures start from a clean process
        cls_name, kw = HEADS[name]
        g = torch.Generator().manual_seed(1000 + rank)
        head = getattr(FD, cls_name)(args.dim, args.classes, backend=args.backend,
                                     sample_generator=g if "sample_rate" in kw else None, **kw)
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        x = torch.randn(args.batch, args.dim, generator=g).requires_grad_(True)
        y = torch.randint(0, args.classes, (args.batch,), generator=g)

        def step():
            loss = head(x, y)
            loss.backward()
            opt.step()
            return loss

        for _ in range(2):
            step()
            opt.zero_grad(set_to_none=True)  # the step's dL/dW becomes .grad without a copy
        dist.barrier()
        losses = []
        with harness.PeakMemory("cpu", require_reset=False) as pm:  # VmHWM reset through clear_refs
            wire0 = _lo_tx_bytes()
            dist.barrier()
            with FD.record_communication() as rec:
                seconds = harness.time_reps(lambda: losses.append(step()))[0]
            dist.barrier()
            wire1 = _lo_tx_bytes()
        loss = losses[0]
        rss_before, peak, reset = pm.base, pm.peak, pm.reset
        lo, hi = head.class_range
        result = {
            "head": name, "world": world, "rank": rank, "classes": args.classes, "classes_local": hi - lo,
            "dim": args.dim, "batch_local": args.batch, "batch_global": args.batch * world,
            "backend": head.head.backend, "loss": float(loss.detach()), "step_seconds": seconds,
            "payload_bytes": rec.payload_bytes, "sent_bytes": rec.sent_bytes, "by_op": rec.by_op(),
            "wire_bytes_all_ranks": (wire1 - wire0) if (rank == 0 and wire0 is not None) else None,
            "rss_before_step": rss_before, "peak_rss_step": peak if reset else None,
            "peak_rss_process": peak if not reset else None,
            "W_bytes": (hi - lo) * args.dim * 4,
            "logits_bytes_BxC": args.batch * world * args.classes * 4,
        }
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(outdir, f"{name}-world{world}-rank{rank}.pt"))


def run(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as outdir:
        for name, world in [(n, w) for n in args.heads for w in args.worlds]:
            run_local_group(_worker, world, args, name, outdir, timeout=args.timeout)
            for r in range(world):
                rows.append(torch.load(os.path.join(outdir, f"{name}-world{world}-rank{r}.pt"), weights_only=False))
    return rows


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def _kib(n) -> str:
    return "—" if n is None else f"{n / 2**10:,.1f}"


def table(rows) -> str:
    head = ("| head | R | rank | C_local | B global | sent KiB (ring) | payload KiB | wire KiB (all ranks) "
            "| [B,C] logits MiB | W MiB | RSS before MiB | peak RSS step MiB | step extra MiB | step s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peak = r["peak_rss_step"] or r["peak_rss_process"]
        out.append(f"| {r['head']} | {r['world']} | {r['rank']} | {r['classes_local']:,} | {r['batch_global']} "
                   f"| {_kib(r['sent_bytes'])} | {_kib(r['payload_bytes'])} | {_kib(r['wire_bytes_all_ranks'])} "
                   f"| {_mib(r['logits_bytes_BxC'])} | {_mib(r['W_bytes'])} | {_mib(r['rss_before_step'])} "
                   f"| {_mib(peak)} | {_mib(peak - r['rss_before_step'])} "
                   f"| {r['step_seconds']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128, help="rows per rank")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--heads", nargs="+", default=["arcface", "arcface-pfc0.1", "npt"], choices=sorted(HEADS))
    p.add_argument("--backend", default="auto")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows))
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
