"""Shared helpers for the test-suite: closeness with informative messages and the loss-family grid."""
from __future__ import annotations

import math
import os

import pytest
import torch

# With no GPU the Triton kernels run on CPU tensors under Triton's interpreter, which triton chooses
# when a function is decorated. torch._dynamo imports triton, so whichever test module imports dynamo
# first would fix triton's standard library in compiled mode and test_triton.py could no longer run.
# Import triton and fusedface's kernels once here, under the interpreter, before any test module;
# the variable is then restored so the other modules see the environment they were given.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
        import fusedface.triton_kernels.margin_softmax  # noqa: F401
    except ImportError:  # triton missing: test_triton.py skips with that reason
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, name: str = ""):
    """``max|a − e| <= atol + rtol·max|e|`` (relative to the tensor's scale); the message says where
    and how much."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    err = (actual - expected).abs()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    bound = atol + rtol * max(scale, 1e-300)
    if err.numel() and float(err.max()) > bound:
        bad = int((err > bound).sum())
        idx = int(err.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: {bad}/{err.numel()} values differ by more than {bound:.3e} "
            f"(rtol={rtol:g} of max|expected|={scale:.3e}, atol={atol:g}); worst at {where}: "
            f"actual={actual.reshape(-1)[idx].item():.17g} expected={expected.reshape(-1)[idx].item():.17g} "
            f"(|diff|={float(err.max()):.3e}, relative {float(err.max()) / max(scale, 1e-300):.3e})")


# Every loss family of SPEC §2 as keyword arguments of margin_softmax_loss. ids name the family.
MARGIN_FAMILIES = [
    pytest.param(dict(m2=0.5), id="arcface"),
    pytest.param(dict(m2=0.5, theta_policy="threshold"), id="arcface-threshold"),
    pytest.param(dict(m2=0.5, grad_mode="straight_through"), id="arcface-straight-through"),
    pytest.param(dict(m3=0.35), id="cosface"),
    pytest.param(dict(m1=1.0, m2=0.3, m3=0.2), id="combined"),
    pytest.param(dict(m1=2.0, theta_policy="easy"), id="sphereface-easy"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="sv", t=1.2, theta_policy="easy"), id="sv-am"),
    pytest.param(dict(scale=32.0, m2=0.5, negative="mv_fixed", t=0.2), id="mv-fixed-arc"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2, theta_policy="easy"), id="mv-adaptive-am"),
    pytest.param(dict(m2="elastic"), id="elastic-per-row-m2"),
    pytest.param(dict(m3="elastic"), id="elastic-per-row-m3"),
]


def materialise_margins(kw: dict, B: int, dtype=torch.float64, seed: int = 7) -> dict:
    """Replace the ``"elastic"`` placeholder with fixed per-row ElasticFace-like draws."""
    kw = dict(kw)
    g = torch.Generator().manual_seed(seed)
    for key, mean in (("m2", 0.5), ("m3", 0.35)):
        if kw.get(key) == "elastic":
            kw[key] = (torch.randn(B, generator=g, dtype=torch.float64) * 0.05 + mean).to(dtype)
    return kw


def make_problem(B, D, C, *, dtype=torch.float64, seed=0, ignore=(), past_pi=(), near_centre=()):
    """Random embeddings/centres/labels with chosen rows ignored, at θ = π − 0.3 from their centre
    (so θ + 0.5 passes π; exactly opposite rows are left to the extreme-value tests, since acos is
    infinitely ill-conditioned at −1) or almost equal to their centre (cosine ≈ 1 − 5e-9)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    for i in past_pi:
        w = W[y[i]] / W[y[i]].norm()
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u = u - (u @ w) * w
        x[i] = 3.0 * (-math.cos(0.3) * w + math.sin(0.3) * u / u.norm())
    for i in near_centre:
        x[i] = 2.0 * W[y[i]] + 1e-4 * torch.randn(D, generator=g, dtype=torch.float64)
    for i in ignore:
        y[i] = -1
    return x.to(dtype), W.to(dtype), y


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def loss_and_grads(fn, x, W, *args, **kw):
    x, W = leaf(x, W)
    loss = fn(x, W, *args, **kw)
    gx, gW = torch.autograd.grad(loss, (x, W))
    return loss.detach(), gx, gW


RAD_PER_DEG = math.pi / 180.0
