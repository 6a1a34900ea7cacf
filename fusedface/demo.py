"""The main job: train a small embedding network on synthetic identities with a fusedface head.

    python -m fusedface.demo                      # ArcFace head, up to 20,000 identities, under three minutes on 2 CPU cores
    python -m fusedface.demo --loss cosface --identities 100000 --steps 3000 --time-limit 600
    python -m fusedface.demo --help

What it does:

1. **Data.** A synthetic "face" world (:class:`SyntheticFaces`): each identity is a centre on the
   unit sphere of a 32-dimensional identity space; each sample perturbs its identity (noise 0.5 in
   that space), adds a 16-dimensional *nuisance* (pose/illumination-like factors shared by every
   identity, 1.5× stronger than the identity signal) and renders both through a fixed random
   linear map and a ``tanh`` into a 96-dimensional "image", plus pixel noise 0.1. Samples are drawn
   fresh at every step. Held-out identities (never trained on) come from a different seed.
   On raw inputs the nuisance dominates the cosine: verification there is near chance.
2. **Training.** An MLP backbone (96 → 512 → 512 → 128, batch norm) and a fusedface head train
   together with SGD (momentum 0.9, weight decay 5e-4), a tqdm bar showing the loss and the
   training accuracy that the fused pass computes for free (``head.last_accuracy``). The head's
   class matrix is updated inside the fused backward by ``fusedface.optim.SGD`` (no ``W.grad``;
   ``--head-optimizer torch`` gives it to the backbone's ``torch.optim.SGD`` instead: the same update).
3. **Verification.** TAR at FAR = 1e-3 on held-out identities (all genuine pairs, two million
   random impostor pairs, cosine scores), before, during and after training.
4. **Cost.** Time per training step and the head's peak memory, fusedface against the same head
   on the materialised reference backend, each measured in a fresh process, at the training size
   and at ``--compare-classes`` (default 100,000).
5. **Output.** Printed, and saved to ``--out`` (default ``demo_out/``): ``demo.md``, ``demo.png``
   (loss, accuracy and TAR curves), ``demo.json``.

Choices that make it learn visibly in two CPU minutes (see docs/benchmarks.md, "The demo"):
the scale is 32 (s = 64 with 128-d embeddings from scratch stalls), the margin ramps linearly
from 0 to its value over the first 30 % of training (a margin warm-up: the full ArcFace margin on
random embeddings pushes every target past the negatives and the loss cannot fall), the learning
rate warms up over 5 % and then follows a cosine to 0, and each identity is seen about 30 times:
``--identities auto`` (default) times two steps of the head and the backbone and picks the number of
identities (2,000 to 20,000) that the time limit can show 30 times each on this machine — 20,000
on a fast 2-core machine, fewer on a slower one (with 100,000 identities a two-minute run shows each
identity about five times: fine for verification, too few to learn from). Training stops at
``--steps`` or ``--time-limit`` seconds, whichever comes first; the schedules follow the further
along of the two, so a slower machine still anneals fully (and runs fewer steps: the output says
how many). ``--threads auto`` (default) times the first steps with all cores and with one and
keeps the faster: on a busy machine, OpenMP threads waiting for a descheduled sibling can make
all-core steps several times slower than one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import fusedface as ff
from fusedface._procmem import reset_peak_rss, status_kib
from fusedface.backends import resolve_name

# name -> constructor(dim, classes, backend, scale)
LOSSES = {
    "arcface": lambda d, c, be, s: ff.ArcFace(d, c, scale=s, backend=be),
    "cosface": lambda d, c, be, s: ff.CosFace(d, c, scale=s, backend=be),
    "combined": lambda d, c, be, s: ff.CombinedMargin(d, c, scale=s, backend=be),
    "elastic-arc+": lambda d, c, be, s: ff.ElasticArcFace(d, c, scale=s, plus=True, backend=be),
    "kappaface": lambda d, c, be, s: ff.KappaFace(d, c, scale=s, backend=be),
    "mv-arc": lambda d, c, be, s: ff.MVSoftmax(d, c, scale=s, margin_type="arc", backend=be),
    "npt": lambda d, c, be, s: ff.NPT(d, c, k=2, backend=be),
    "adaface": lambda d, c, be, s: ff.AdaFace(d, c, scale=s, backend=be),
    "curricularface": lambda d, c, be, s: ff.CurricularFace(d, c, scale=s, backend=be),
    "magface": lambda d, c, be, s: ff.MagFace(d, c, scale=s, backend=be),
    "subcenter-arc": lambda d, c, be, s: ff.SubCenterArcFace(d, c, k=3, scale=s, backend=be),
}
# float margins a warm-up can scale (KappaFace, NPT: none; AdaFace's base margin; MagFace's range)
MARGIN_ATTRS = ("m2", "m3", "margin_mean", "margin", "l_margin", "u_margin")


# ----------------------------------------------------------------------------- data

class SyntheticFaces:
    """A synthetic many-identity world: ``render(identity centres) -> inputs``.

    ``x = tanh(gain·(3·A·ẑ + P·n)) + noise·ε`` with ``ẑ = normalise(z + id_noise·ε/√d_id)`` (the
    identity, perturbed per sample), ``n ~ N(0, nuisance²·I)`` (pose/illumination-like, the same
    directions for every identity), ``A`` and ``P`` fixed random maps.
    """

    def __init__(self, in_dim=96, id_dim=32, nuisance_dim=16, id_noise=0.5, nuisance=1.5, noise=0.1,
                 gain=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(in_dim, id_dim, generator=g) / math.sqrt(id_dim)
        self.P = torch.randn(in_dim, nuisance_dim, generator=g) / math.sqrt(nuisance_dim)
        self.in_dim, self.id_dim = in_dim, id_dim
        self.id_noise, self.nuisance, self.noise, self.gain = id_noise, nuisance, noise, gain

    def centres(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        return nn.functional.normalize(torch.randn(n, self.id_dim, generator=g), dim=1)

    def render(self, z, g):
        zz = nn.functional.normalize(z + self.id_noise * torch.randn(z.shape, generator=g) / math.sqrt(self.id_dim), dim=1)
        n = self.nuisance * torch.randn(z.shape[0], self.P.shape[1], generator=g)
        h = self.gain * (3.0 * zz @ self.A.t() + n @ self.P.t())
        return torch.tanh(h) + self.noise * torch.randn(h.shape, generator=g)


def auto_identities(a, world, samples=30, lo=2_000, hi=20_000, probe_classes=20_000) -> int:
    """The number of training identities the time limit can teach: each seen about ``samples``
    times in ``--time-limit`` seconds, between ``lo`` and ``hi``. A step costs about
    ``t_fixed + t_head·C/probe_classes`` (the head's matrix products grow with C, the backbone's
    do not); both are timed here, on two steps of a throw-away network and head (about a second).
    Solves ``steps(C)·batch/C = samples`` for C."""
    net = backbone(world.in_dim, a.dim)
    head = LOSSES[a.loss](a.dim, probe_classes, a.backend, a.scale)
    x = torch.randn(a.batch, world.in_dim)
    y = torch.randint(0, probe_classes, (a.batch,))
    times = {"fixed": [], "head": []}
    for _ in range(3):
        t0 = time.perf_counter()
        e = net(x)
        e.sum().backward()
        t1 = time.perf_counter()
        head(e.detach().requires_grad_(), y).backward()
        t2 = time.perf_counter()
        times["fixed"].append(t1 - t0)
        times["head"].append(t2 - t1)
    t_fixed = statistics.median(times["fixed"][1:]) * 1.5  # + data, optimiser, bookkeeping
    per_class = statistics.median(times["head"][1:]) / probe_classes
    # steps(C) = T / (t_fixed + per_class·C) and steps·B/C = samples: per_class·C² + t_fixed·C − T·B/samples = 0
    budget = a.time_limit * a.batch / samples
    C = (-t_fixed + math.sqrt(t_fixed ** 2 + 4 * per_class * budget)) / (2 * per_class)
    C = min(C, a.steps * a.batch / samples)  # --steps may end training before the time limit
    return int(min(hi, max(lo, C)) // 1000 * 1000)


def backbone(in_dim, dim):
    return nn.Sequential(nn.Linear(in_dim, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, dim), nn.BatchNorm1d(dim))


# ----------------------------------------------------------------------------- verification

def tar_at_far(emb, labels, far=1e-3, impostors=2_000_000, seed=0):
    """``(TAR, threshold)``: the fraction of genuine pairs (every same-identity pair) whose cosine
    exceeds the threshold that ``far`` of the impostor pairs exceed (random different-identity
    pairs; 2 million give about 2,000 above the threshold at FAR = 1e-3)."""
    e = nn.functional.normalize(emb.float(), dim=1)
    order = torch.argsort(labels, stable=True)
    e, labels = e[order], labels[order]
    _, counts = torch.unique_consecutive(labels, return_counts=True)
    k = int(counts[0])
    if not bool((counts == k).all()):
        raise ValueError("tar_at_far expects the same number of samples per identity")
    E = e.view(-1, k, e.shape[1])
    iu = torch.triu_indices(k, k, 1)
    genuine = (E @ E.transpose(1, 2))[:, iu[0], iu[1]].reshape(-1)
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(labels), (impostors,), generator=g)
    j = torch.randint(0, len(labels), (impostors,), generator=g)
    keep = labels[i] != labels[j]
    imp = (e[i[keep]] * e[j[keep]]).sum(dim=1)
    n_above = max(1, int(far * len(imp)))
    thr = torch.topk(imp, n_above).values[-1]
    return float((genuine > thr).float().mean()), float(thr)


# ----------------------------------------------------------------------------- cost probes

def probe(spec: dict) -> dict:
    """Runs in a fresh process. Head-only peak memory of one forward + backward at ``C`` classes
    (peak RSS beyond what was allocated before, minus dL/dx and dL/dW; the method of
    bench/memory.py, after a warm-up on a tiny problem), then the median time of a whole training
    step (backbone + head + SGD) over ``reps`` steps after one warm-up step."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    B, D, C, in_dim = spec["batch"], spec["dim"], spec["classes"], spec["in_dim"]
    make = LOSSES[spec["loss"]]
    small = make(D, 300, spec["backend"], spec["scale"])
    small(torch.randn(8, D, requires_grad=True), torch.randint(0, 300, (8,))).backward()
    del small
    head = make(D, C, spec["backend"], spec["scale"])
    emb = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    grads = (emb.numel() + head.weight.numel()) * 4
    mem = None
    if reset_peak_rss():
        base = status_kib("VmRSS") * 1024
        head(emb, y).backward()
        mem = (status_kib("VmHWM") * 1024 - base - grads) / 2**20
    head.zero_grad(set_to_none=True)
    net = backbone(in_dim, D)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4)
    X = torch.randn(B, in_dim)
    times = []
    for r in range(spec["reps"] + 1):
        t0 = time.perf_counter()
        loss = head(net(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if r:
            times.append(time.perf_counter() - t0)
    return {"backend": resolve_name(spec["backend"], torch.device("cpu")), "classes": C,
            "step_s": statistics.median(times), "head_peak_mib": mem}


def run_probe(spec: dict, timeout=600) -> dict:
    out = subprocess.run([sys.executable, "-m", "fusedface.demo", "--probe", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- training

def base_margin_note(a) -> bool:
    """Whether this run ramps a margin (the loss rises while it does)."""
    return a.margin_warmup > 0 and a.loss not in ("kappaface", "npt")


def _sparkline(values, width=60):
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in pts)


def _smooth(v, k=25):
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


class _PlainBar:
    """Progress without tqdm (it is optional): a line every tenth of the steps."""

    def __init__(self, total, desc, **_):
        self.total, self.desc, self.n, self.post = total, desc, 0, {}

    def update(self, k):
        self.n += k
        if self.n % max(1, self.total // 10) == 0:
            print(f"  {self.desc}: step {self.n}/{self.total} " + " ".join(f"{a}={b}" for a, b in self.post.items()),
                  flush=True)

    def set_postfix(self, **kw):
        self.post = kw

    def close(self):
        pass


def train(a, world, log=print):
    try:
        from tqdm import tqdm
    except ImportError:  # progress without the bar
        tqdm = _PlainBar

    torch.manual_seed(a.seed)
    train_z = world.centres(a.identities, seed=a.seed + 1)
    held_z = world.centres(a.heldout, seed=a.seed + 2)  # identities never trained on
    held_y = torch.arange(a.heldout).repeat_interleave(a.per_heldout)
    held_x = world.render(held_z[held_y], torch.Generator().manual_seed(a.seed + 3))

    net = backbone(world.in_dim, a.dim)
    head = LOSSES[a.loss](a.dim, a.identities, a.backend, a.scale)
    base_margins = {k: getattr(head, k) for k in MARGIN_ATTRS if isinstance(getattr(head, k, None), float)}
    sgd = dict(lr=a.lr, momentum=0.9, weight_decay=5e-4)
    if a.head_optimizer == "in-backward":  # W updated slice by slice inside the fused backward
        opts = [torch.optim.SGD(net.parameters(), **sgd), ff.optim.SGD(head.parameters(), **sgd)]
    else:
        opts = [torch.optim.SGD([*net.parameters(), *head.parameters()], **sgd)]
    log(f"head: {head}; its class matrix updated by "
        + ("fusedface.optim.SGD inside the backward" if len(opts) == 2 else "torch.optim.SGD"))

    def evaluate():
        net.eval()
        with torch.no_grad():
            e = net(held_x)
        net.train()
        return tar_at_far(e, held_y)[0]

    hist = {"step": [], "loss": [], "acc": [], "tar": [], "full_margin_step": None}
    raw_tar = tar_at_far(held_x, held_y)[0]
    hist["tar"].append((0, evaluate()))
    log(f"TAR@FAR=1e-3 on {a.heldout:,} held-out identities before training: {hist['tar'][0][1]:.4f} "
        f"(raw inputs: {raw_tar:.4f}; chance: 0.001)")
    g = torch.Generator().manual_seed(a.seed + 4)
    kappa_epoch = max(1, (4 * a.identities) // a.batch)
    next_eval = 0.2
    t0 = time.perf_counter()
    bar = tqdm(total=a.steps, desc=f"training {a.loss}", unit="step", dynamic_ncols=True, file=sys.stdout)
    # threads: on a shared machine, OpenMP threads that wait for a descheduled sibling can make
    # all-cores steps several times slower than one thread; "auto" times a few steps each way
    n_all = torch.get_num_threads()
    options = ([n_all, 1] if n_all > 1 else [1]) if a.threads == "auto" else [int(a.threads)]
    trial = {n: [] for n in options}
    per_trial = 4
    threads = options[0]
    torch.set_num_threads(threads)
    step = 0
    while step < a.steps:
        tuning = a.threads == "auto" and step < per_trial * len(options)
        if tuning:
            threads = options[step // per_trial]
            torch.set_num_threads(threads)
            t_step = time.perf_counter()
        elapsed = time.perf_counter() - t0
        progress = max(step / a.steps, elapsed / a.time_limit)
        if progress >= 1.0:
            break
        warm = 0.05
        lr = a.lr * (progress / warm if progress < warm else 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm))))
        for group in (g for opt in opts for g in opt.param_groups):
            group["lr"] = lr
        frac = min(1.0, progress / a.margin_warmup) if a.margin_warmup > 0 else 1.0
        for k, v in base_margins.items():
            setattr(head, k, v * frac)
        if frac >= 1.0 and hist["full_margin_step"] is None:
            hist["full_margin_step"] = step + 1

        y = torch.randint(0, a.identities, (a.batch,), generator=g)
        x = world.render(train_z[y], g)
        loss = head(net(x), y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        if a.loss == "kappaface" and (step + 1) % kappa_epoch == 0:
            head.end_epoch()
        if tuning:
            trial[threads].append(time.perf_counter() - t_step)
            if step + 1 == per_trial * len(options):
                threads = min(options, key=lambda n: statistics.median(trial[n][1:]))
                torch.set_num_threads(threads)
                bar.write("threads: " + ", ".join(f"{n}: {statistics.median(trial[n][1:]) * 1e3:.0f} ms/step"
                                                  for n in options) + f" -> training with {threads}")
        step += 1
        hist["step"].append(step)
        hist["loss"].append(loss.item())
        acc = getattr(head, "last_accuracy", None)
        hist["acc"].append(float(acc) if acc is not None else float("nan"))
        if progress >= next_eval:
            hist["tar"].append((step, evaluate()))
            next_eval += 0.2
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{hist['loss'][-1]:.2f}", acc=f"{hist['acc'][-1]:.3f}", lr=f"{lr:.3f}",
                            margin=f"{frac:.2f}", TAR=f"{hist['tar'][-1][1]:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    for k, v in base_margins.items():
        setattr(head, k, v)
    hist["tar"].append((step, evaluate()))
    return {"hist": hist, "train_s": train_s, "steps": step, "raw_tar": raw_tar, "head": head, "threads": threads}


# ----------------------------------------------------------------------------- outputs

def save_plot(path, hist, title):
    """The three curves as a PNG; returns False (and saves nothing) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
    axes[0].plot(hist["step"], hist["loss"], alpha=0.3, lw=0.8)
    axes[0].plot(hist["step"], _smooth(hist["loss"]), lw=1.5)
    if hist.get("full_margin_step"):
        axes[0].axvline(hist["full_margin_step"], color="grey", ls=":", label="margin at full value")
        axes[0].legend(fontsize=7)
    axes[0].set_title("training loss")
    axes[1].plot(hist["step"], hist["acc"], alpha=0.3, lw=0.8)
    axes[1].plot(hist["step"], _smooth(hist["acc"]), lw=1.5)
    axes[1].set_title("training accuracy (fused pass)")
    axes[1].set_ylim(0, 1)
    s, t = zip(*hist["tar"])
    axes[2].plot(s, t, marker="o")
    axes[2].axhline(1e-3, color="grey", ls=":", label="chance (= FAR)")
    axes[2].set_title("TAR @ FAR = 1e-3, held-out identities")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def cost_table(rows):
    lines = ["| classes | head | time / training step | head peak memory (fwd + bwd, beyond x, W, grads) |",
             "|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['classes']:,} | {r['label']} | failed: {r['error']} | |")
            continue
        mem = f"{r['head_peak_mib']:,.1f} MiB" if r.get("head_peak_mib") is not None else "n/a (no /proc)"
        lines.append(f"| {r['classes']:,} | {r['label']} | {r['step_s'] * 1e3:,.1f} ms | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusedface.demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--loss", default="arcface", choices=sorted(LOSSES))
    p.add_argument("--identities", default="auto",
                   help="training identities (classes of the head), or 'auto' (default): as many as the time "
                        "limit can show about 30 times each on this machine, from 2,000 to 20,000")
    p.add_argument("--heldout", type=int, default=2_000, help="held-out identities for verification")
    p.add_argument("--per-heldout", type=int, default=5, help="samples per held-out identity")
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--time-limit", type=float, default=100.0, help="seconds of training at most")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=32.0, help="logit scale s (NPT has none)")
    p.add_argument("--margin-warmup", type=float, default=0.3,
                   help="fraction of training over which the margin ramps from 0 (0: full margin at once)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--head-optimizer", default="in-backward", choices=["in-backward", "torch"],
                   help="update W inside the fused backward (fusedface.optim.SGD, default) or with torch.optim.SGD")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or 'auto' (time a few steps with all cores and with one, keep the faster)")
    p.add_argument("--compare-classes", type=int, default=100_000,
                   help="also compare fusedface and the reference head at this many classes (0: skip)")
    p.add_argument("--no-compare", action="store_true", help="skip the cost comparison")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(json.loads(a.probe))))
        return

    t_all = time.perf_counter()
    backend = resolve_name(a.backend, torch.device("cpu"))
    world = SyntheticFaces(seed=a.seed)
    print(f"fusedface {ff.__version__}, backend {backend!r} (available: {', '.join(ff.available_backends())}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if a.identities == "auto":
        a.identities = auto_identities(a, world)
        print(f"identities: {a.identities:,} (auto: about 30 samples each within --time-limit {a.time_limit:g} s "
              "on this machine; set --identities to choose)")
    else:
        try:
            a.identities = int(a.identities)
        except ValueError:
            p.error(f"--identities must be an integer or 'auto', got {a.identities!r}")
        if a.identities < 2:
            p.error(f"--identities must be at least 2, got {a.identities}")
    print(f"data: {a.identities:,} synthetic identities, fresh samples every step; "
          f"{a.heldout:,} held-out identities × {a.per_heldout} samples for verification")
    res = train(a, world)
    hist = res["hist"]
    n = max(1, min(50, len(hist["loss"]) // 10))
    last_loss = sum(hist["loss"][-n:]) / n
    last_acc = sum(hist["acc"][-n:]) / n
    tar_before, tar_after = hist["tar"][0][1], hist["tar"][-1][1]
    print(f"\ntrained {res['steps']:,} steps of {a.batch} in {res['train_s']:.1f} s "
          f"({res['train_s'] / max(res['steps'], 1) * 1e3:.1f} ms/step, {res['threads']} thread(s))"
          + ("" if res["steps"] >= a.steps else f"; stopped by --time-limit {a.time_limit:g} s before --steps {a.steps}"))
    fm = hist["full_margin_step"]
    at_fm = (f", {sum(hist['loss'][fm - n:fm]) / n:.2f} when the margin reached its full value (step {fm})"
             if fm and fm >= n and fm < len(hist["loss"]) and base_margin_note(a) else "")
    loss_line = f"{hist['loss'][0]:.2f} at step 1{at_fm}, {last_loss:.2f} at the end (means of {n} steps)"
    print(f"loss curve: {_sparkline(hist['loss'])}")
    print(f"loss: {loss_line}")
    if not math.isnan(last_acc):
        print(f"training accuracy (fused pass, last {n} steps): {last_acc:.3f}")
    print(f"TAR@FAR=1e-3, held-out identities: {tar_before:.4f} before → {tar_after:.4f} after training "
          f"(raw inputs {res['raw_tar']:.4f}; chance 0.001)")

    rows = []
    if not a.no_compare:
        sizes = [a.identities] + ([a.compare_classes] if a.compare_classes and a.compare_classes != a.identities else [])
        print(f"\ncost, each measured in a fresh process with {res['threads']} thread(s) (time: median training step, "
              "backbone + head + SGD; memory: the head's forward + backward):")
        for C in sizes:
            for be, label in ((a.backend, f"fusedface ({backend})"), ("reference", "reference (materialised)")):
                spec = {"loss": a.loss, "backend": be, "scale": a.scale, "batch": a.batch, "dim": a.dim,
                        "classes": C, "in_dim": world.in_dim, "reps": 5, "threads": res["threads"]}
                r = {**run_probe(spec), "classes": C, "label": label}
                rows.append(r)
                if "error" in r:
                    print(f"  C = {C:>9,}  {label:<26} failed: {r['error']}")
                else:
                    mem = f"{r['head_peak_mib']:9,.1f} MiB" if r["head_peak_mib"] is not None else "n/a"
                    print(f"  C = {C:>9,}  {label:<26} {r['step_s'] * 1e3:9.1f} ms/step   head peak {mem}", flush=True)
            f_r = [r for r in rows if r["classes"] == C and "error" not in r]
            if len(f_r) == 2 and f_r[0].get("head_peak_mib") and f_r[1].get("head_peak_mib"):
                print(f"  C = {C:>9,}  reference ÷ fusedface: time {f_r[1]['step_s'] / f_r[0]['step_s']:.2f}×, "
                      f"memory {f_r[1]['head_peak_mib'] / max(f_r[0]['head_peak_mib'], 0.1):.1f}×")

    os.makedirs(a.out, exist_ok=True)
    title = (f"fusedface demo: {a.loss} (s = {a.scale:g}), {a.identities:,} identities, B = {a.batch}, "
             f"D = {a.dim}, backend {backend}, {res['steps']} steps in {res['train_s']:.0f} s")
    plotted = save_plot(os.path.join(a.out, "demo.png"), hist, title)
    md = ["# fusedface demo\n", f"`python -m fusedface.demo {' '.join(argv if argv is not None else sys.argv[1:])}`"
          f" — fusedface {ff.__version__}, torch {torch.__version__}, {res['threads']} thread(s).\n",
          f"Head: `{res['head']}` on {a.identities:,} synthetic identities; {res['steps']:,} steps of {a.batch} "
          f"in {res['train_s']:.1f} s.\n",
          "| | value |", "|---|---|",
          f"| loss | {loss_line} |",
          f"| training accuracy, fused pass (last {n} steps) | {'n/a' if math.isnan(last_acc) else f'{last_acc:.3f}'} |",
          f"| TAR @ FAR = 1e-3, {a.heldout:,} held-out identities, before → after | {tar_before:.4f} → {tar_after:.4f} |",
          f"| same on raw inputs / chance | {res['raw_tar']:.4f} / 0.001 |",
          "", "TAR during training: " + ", ".join(f"step {s}: {t:.3f}" for s, t in hist["tar"]) + "\n"]
    if rows:
        md += ["## Cost: fusedface against the reference head\n", cost_table(rows), ""]
    md += ["![loss, accuracy and TAR](demo.png)\n" if plotted else
           "(no plot: matplotlib is not installed; `pip install matplotlib`)\n"]
    with open(os.path.join(a.out, "demo.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "probe"}, "steps": res["steps"],
                   "train_s": res["train_s"], "loss": hist["loss"], "accuracy": hist["acc"], "tar": hist["tar"],
                   "raw_tar": res["raw_tar"], "full_margin_step": hist["full_margin_step"], "cost": rows}, f)
    png = f"{a.out}/demo.png" if plotted else "no PNG (matplotlib is not installed)"
    print(f"\nsaved {a.out}/demo.md, {png}, {a.out}/demo.json "
          f"(total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
