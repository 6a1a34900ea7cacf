"""The main job: train a small embedding network on synthetic identities with a fusedface head.

    python -m fusedface.demo [--loss arcface] [--classes 5000] [--steps 150] [--backend auto]

Identities are class centres on a sphere in the input space; each sample is its centre plus
Gaussian noise and a per-sample "nuisance" offset shared across identities. The demo trains an
MLP backbone and the head, prints the loss curve and the training accuracy that the fused pass
reports, then times one training step of the fused head against the materialised reference head
at a larger number of classes.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fusedface as ff
from fusedface._backends import resolve

LOSSES = {
    "arcface": lambda d, c, be: ff.ArcFace(d, c, backend=be),
    "cosface": lambda d, c, be: ff.CosFace(d, c, backend=be),
    "combined": lambda d, c, be: ff.CombinedMargin(d, c, backend=be),
    "elastic-arc+": lambda d, c, be: ff.ElasticArcFace(d, c, plus=True, backend=be),
    "kappaface": lambda d, c, be: ff.KappaFace(d, c, backend=be),
    "mv-arc": lambda d, c, be: ff.MVSoftmax(d, c, margin_type="arc", backend=be),
    "npt": lambda d, c, be: ff.NPT(d, c, k=2, backend=be),
}


def synthetic_identities(n_classes, per_class, in_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, in_dim, generator=g), dim=1) * 4.0
    nuisance = torch.randn(8, in_dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    X = centres[y] + 1.0 * torch.randn(len(y), in_dim, generator=g)
    X = X + nuisance[torch.randint(0, 8, (len(y),), generator=g)]
    return X, y


def _sparkline(values, width=60):
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in pts)


def time_step(head, dim, batch, reps=3):
    x = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(0, head.out_features, (batch,))
    head(x, y).backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        head.zero_grad(set_to_none=True)
        head(x, y).backward()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    p = argparse.ArgumentParser(description="Train on synthetic identities with a fusedface head.")
    p.add_argument("--loss", default="arcface", choices=sorted(LOSSES))
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--backend", default="auto")
    p.add_argument("--compare-classes", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    in_dim = 96
    X, Y = synthetic_identities(a.classes, a.per_class, in_dim, a.seed)
    net = nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, a.dim))
    head = LOSSES[a.loss](a.dim, a.classes, a.backend)
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    print(f"fusedface {ff.__version__}: {head}")
    print(f"backends here: {', '.join(ff.available_backends())}; {a.classes} identities, {len(Y)} samples")
    losses, accs = [], []
    t0 = time.perf_counter()
    for step in range(a.steps):
        idx = torch.randint(0, len(Y), (a.batch,))
        loss = head(net(X[idx]), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if getattr(head, "last_accuracy", None) is not None:
            accs.append(float(head.last_accuracy))
        if a.loss == "kappaface" and (step + 1) % max(1, len(Y) // a.batch) == 0:
            head.end_epoch()
        if step % max(1, a.steps // 10) == 0 or step == a.steps - 1:
            acc = f" train acc {accs[-1]:.3f}" if accs else ""
            print(f"  step {step:4d}/{a.steps}  loss {losses[-1]:8.3f}{acc}", flush=True)
    train_s = time.perf_counter() - t0
    print(f"loss curve: {_sparkline(losses)}  ({losses[0]:.2f} → {sum(losses[-10:]) / len(losses[-10:]):.2f})")
    print(f"trained {a.steps} steps in {train_s:.1f} s")

    print(f"\none training step of the head at C = {a.compare_classes:,}, B = {a.batch}, D = {a.dim}:")
    fused = LOSSES[a.loss](a.dim, a.compare_classes, a.backend)
    ref = LOSSES[a.loss](a.dim, a.compare_classes, "reference")
    t_f, t_r = time_step(fused, a.dim, a.batch), time_step(ref, a.dim, a.batch)
    bc = a.batch * a.compare_classes * 4 / 2**20
    print(f"  fusedface ({resolve(fused.backend, torch.device('cpu'))[0]}): {t_f * 1e3:8.1f} ms/step   reference: {t_r * 1e3:8.1f} ms/step "
          f"(ratio {t_r / t_f:.2f}×); the reference builds several {bc:.0f} MiB [B, C] matrices, "
          f"the fused pass none (python bench/memory.py measures both)")


if __name__ == "__main__":
    main()
