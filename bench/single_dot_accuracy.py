"""How accurate are single-dot 16-bit gradient products at realistic sizes? A float64 model of the
fused Triton step's rounding, fast enough for B = D = 512 and C = 50,000 on a CPU (the interpreter is
not): the gradients' error against the float64 truth, as a ratio to plain PyTorch's error on the same
16-bit inputs (the truth rounded to the input dtype once).

    python bench/single_dot_accuracy.py [--C 2048 50000] [--B 512] [--D 512]

What is modelled (``triton_kernels/margin_step.py``): the negatives' ``dℓ/dc·winv`` (dL/dx numerator)
and ``dℓ/dc·xinv`` (dW) rounded once to the input dtype (fp16 with a power-of-two scale per 64-row ×
16-class tile), products of 16-bit values exact, fp32-or-better accumulation, the label column exact,
the result rounded to the input dtype. The kernels themselves are checked against this at small sizes
by ``tests/test_triton.py`` under the interpreter, and on a GPU by ``bench/device_check.py``.
"""
from __future__ import annotations

import argparse

import torch


def model(B: int, D: int, C: int, dtype: torch.dtype, s: float = 64.0, m: float = 0.5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype).double()
    W = torch.randn(C, D, generator=g).to(dtype).double()
    y = torch.randint(0, C, (B,), generator=g)
    y[::37] = -1
    valid, ys, ar = y >= 0, y.clamp(min=0), torch.arange(B)
    xinv, winv = 1 / x.norm(dim=1), 1 / W.norm(dim=1)
    raw = (x @ W.T) * xinv[:, None] * winv[None, :]
    cy = raw[ar, ys]
    th = torch.acos(cy.clamp(-1, 1))
    f, slope_y = torch.cos(th + m), torch.sin(th + m) / torch.sqrt(1 - cy ** 2)
    z = s * raw
    z[ar, ys] = s * f
    p = torch.exp(z - torch.logsumexp(z, 1, keepdim=True))
    gl = valid.double() / valid.sum()
    dc = s * p * gl[:, None]
    dc[ar, ys] = s * (p[ar, ys] - 1) * gl * slope_y
    dc[~valid] = 0
    lab = torch.zeros_like(dc, dtype=torch.bool)
    lab[ar[valid], ys[valid]] = True
    neg, onlab = torch.where(lab, 0.0, dc), torch.where(lab, dc, 0.0)

    def rnd(t):  # one rounding to the input dtype (fp16: power-of-two scale per 64 × 16 tile)
        if dtype == torch.float16:
            rb, cb = max(1, B // 64), max(1, C // 16)
            t2 = t.reshape(rb, B // rb, cb, C // cb)
            up = 2.0 ** torch.floor(torch.log2(t2.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-30)))
            return ((t2 / up).float().to(dtype).double() * up).reshape(B, C)
        return t.float().to(dtype).double()

    def jx(G):
        xh = x * xinv[:, None]
        return (G - (G * xh).sum(1, keepdim=True) * xh) * xinv[:, None]

    r = (dc * raw).sum(0)

    def jw(Gw):
        return (Gw - (r * winv)[:, None] * W) * winv[:, None]

    truth_dx = jx((dc * winv[None, :]) @ W)
    truth_dw = jw((dc * xinv[:, None]).T @ x)
    got_dx = jx(rnd(neg * winv[None, :]) @ W + (onlab * winv[None, :]) @ W).to(dtype).double()
    got_dw = jw(rnd(neg * xinv[:, None]).T @ x + (onlab * xinv[:, None]).T @ x).to(dtype).double()

    def err(a, t):
        return float((a - t).abs().max() / t.abs().max())

    out = {}
    for name, got, truth in (("dx", got_dx, truth_dx), ("dW", got_dw, truth_dw)):
        e, e_plain = err(got, truth), err(truth.to(dtype).double(), truth)
        out[name] = dict(err=e, plain=e_plain, ratio=e / e_plain)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, nargs="+", default=[2048, 50000])
    args = ap.parse_args(argv)
    print(f"{'C':>7} {'dtype':<5} {'dx err':>9} {'plain':>9} {'ratio':>6} {'dW err':>9} {'plain':>9} {'ratio':>6}")
    for C in args.C:
        for dt in (torch.bfloat16, torch.float16):
            r = model(args.B, args.D, C, dt)
            print(f"{C:>7} {str(dt).split('.')[-1]:<5} {r['dx']['err']:>9.3e} {r['dx']['plain']:>9.3e} "
                  f"{r['dx']['ratio']:>6.2f} {r['dW']['err']:>9.3e} {r['dW']['plain']:>9.3e} {r['dW']['ratio']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
