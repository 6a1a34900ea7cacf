"""Numerics at the extremes, on every backend available here (issue 8).

For finite inputs the loss and both gradients are finite: zero-norm embeddings and centres, tiny
(1e-20) and large (1e4) norms, cosines of exactly ±1 (an embedding equal to its centre, or exactly
opposite), θ + m past π, very large margins (m1 = 8, m2 = 3, m3 = 2), s = 64 with fp16 and bf16
inputs, and C = 200,000. In float64 the fused backends also equal the reference there.
One documented exception: in fp16 the exact gradient of a row whose norm is below the
normalisation floor (``|dL/dx| ≈ s·|G| / 1e-12``, SPEC §2) does not fit fp16's range; the loss and
every other row stay finite (docs/guarantees.md).

A batch whose rows are all ignored gives a zero loss that is still part of the graph (backward
works and gives zero gradients), and a NaN in the input gives a NaN loss, never a finite number.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusedface as ff
from conftest import assert_close, backend_cases, is_interpreted, leaf, make_problem
from fusedface import functional as F_

# (device, backend) pairs: reference, torch, native where built, triton (interpreted on CPU tensors,
# skipped with the reason where it cannot run), and the CUDA backends where a GPU is (tests/conftest.py)
BACKENDS = backend_cases()
FUSED = backend_cases(fused=True)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# margin families, the usual ones and the very large margins of the issue; ids name them
FAMILIES = {
    "arcface": dict(m2=0.5),
    "arcface-threshold": dict(m2=0.5, theta_policy="threshold"),
    "arcface-straight-through": dict(m2=0.5, grad_mode="straight_through"),
    "cosface": dict(m3=0.35),
    "combined": dict(m2=0.3, m3=0.2),
    "sphereface-4": dict(m1=4.0, theta_policy="threshold"),
    "sv-am-easy": dict(scale=32.0, m3=0.35, negative="sv", t=1.2, theta_policy="easy"),
    "mv-adaptive-arc": dict(scale=32.0, m2=0.5, negative="mv_adaptive", t=0.2),
    "m2=3": dict(m2=3.0),
    "m2=3-threshold": dict(m2=3.0, theta_policy="threshold"),
    "m3=2": dict(m3=2.0),
    "m1=8": dict(m1=8.0),
    "m1=8-easy": dict(m1=8.0, theta_policy="easy"),
    "m1=8,m2=3,m3=2": dict(m1=8.0, m2=3.0, m3=2.0),
    "m1=8,m2=3,m3=2-mv-fixed": dict(m1=8.0, m2=3.0, m3=2.0, negative="mv_fixed", t=0.5),
}

B, D, C = 10, 16, 37
# The interpreted Triton backend (CPU tensors, TRITON_INTERPRET=1) walks its grid in Python, about a
# third of a second per forward + backward here, so it runs the finite-everywhere test on a subset of
# the families: the threshold policy past π, the SV rewrite with the easy policy, and all three very
# large margins with the MV rewrite (NPT as for every backend); its other tests run in full.
INTERPRETED_FAMILIES = ("arcface-threshold", "sv-am-easy", "m1=8,m2=3,m3=2-mv-fixed")


def _extreme(kind: str):
    """``(x, W, y, zero_x_rows, zero_W_rows)`` in float64. Rows 0–3 carry the extreme; the others
    are ordinary so the batch is mixed."""
    x, W, y = make_problem(B, D, C, seed=11)
    y[:4] = torch.tensor([0, 1, 2, 3])
    zx, zw = [], []
    if kind == "zero-embedding":
        x[0] = 0.0
        x[1] = 0.0
        zx = [0, 1]
    elif kind == "zero-centre":
        W[0] = 0.0  # the label centre of row 0
        W[20] = 0.0  # a negative centre of every row
        zw = [0, 20]
    elif kind == "equal-to-centre":
        x[0] = W[0]
        x[1] = 3.0 * W[1]
        x[2] = W[2]
        x[3] = 0.25 * W[3]
    elif kind == "opposite":
        x[0] = -W[0]
        x[1] = -3.0 * W[1]
        x[2] = -W[2]
        x[3] = -0.25 * W[3]
    elif kind == "past-pi":
        x, W, y = make_problem(B, D, C, seed=11, past_pi=(0, 1, 2, 3))
    elif kind == "norm-1e4":
        x = x / x.norm(dim=1, keepdim=True) * 1e4
        W = W / W.norm(dim=1, keepdim=True) * 1e4
    elif kind == "norm-1e-20":
        x[:4] = x[:4] / x[:4].norm(dim=1, keepdim=True) * 1e-20
        W[:4] = W[:4] / W[:4].norm(dim=1, keepdim=True) * 1e-20
        zx, zw = [0, 1, 2, 3], [0, 1, 2, 3]  # below the normalisation floor (and 0 in fp16)
    else:
        raise AssertionError(kind)
    return x, W, y, zx, zw


KINDS = ["zero-embedding", "zero-centre", "equal-to-centre", "opposite", "past-pi", "norm-1e4", "norm-1e-20"]
# kinds whose cosines are well-conditioned, so float64 results equal the reference tightly
# (exactly ±1 sits where acos and the exact slope are infinitely ill-conditioned: finite only)
COMPARABLE = {"zero-embedding", "zero-centre", "past-pi", "norm-1e4", "norm-1e-20"}


def _finite_except(name, g, allow_rows):
    bad = ~torch.isfinite(g)
    if allow_rows:
        bad[allow_rows] = False
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values in rows {sorted(set(bad.nonzero()[:, 0].tolist()))}"


def _run(fn, x, W, y, case, **kw):
    """loss and gradients (on the CPU) of ``fn`` on ``case = (device, backend)``."""
    device, backend = case
    x, W = leaf(x.to(device), W.to(device))
    loss = fn(x, W, y.to(device), backend=backend, **kw)
    loss.sum().backward()
    return loss.detach().cpu(), x.grad.cpu(), W.grad.cpu()


REF = ("cpu", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_inputs_give_finite_loss_and_gradients(kind, dtype, backend):
    x, W, y, zx, zw = _extreme(kind)
    x, W = x.to(dtype), W.to(dtype)
    # fp16 only: a row below the normalisation floor has a gradient beyond fp16's range (documented)
    allow_x = zx if dtype == torch.float16 else []
    allow_W = zw if dtype == torch.float16 else []
    cases = [(F_.margin_softmax_loss, name, kw) for name, kw in FAMILIES.items()
             if not is_interpreted(backend) or name in INTERPRETED_FAMILIES]
    cases.append((F_.npt_loss, "npt-k3", dict(k=3, delta=0.8)))
    for fn, name, kw in cases:
        loss, gx, gW = _run(fn, x, W, y, backend, **kw)
        where = f"{kind}/{name}/{dtype}/{backend}"
        assert torch.isfinite(loss), f"{where}: loss {loss}"
        assert gx.dtype == dtype and gW.dtype == dtype, where
        _finite_except(f"{where} dL/dx", gx, allow_x)
        _finite_except(f"{where} dL/dW", gW, allow_W)
        if dtype == torch.float64 and kind in COMPARABLE and backend[1] != "reference":
            ref = _run(fn, x, W, y, REF, **kw)
            assert_close(loss, ref[0], rtol=1e-9, name=f"{where} loss")
            if fn is F_.margin_softmax_loss:  # NPT's top-k has ties on the zero rows: any choice is right
                assert_close(gx, ref[1], rtol=1e-9, name=f"{where} dL/dx")
                assert_close(gW, ref[2], rtol=1e-9, name=f"{where} dL/dW")
        elif dtype == torch.float64 and backend[1] != "reference":
            ref = _run(fn, x, W, y, REF, **kw)
            # exactly ±1: a one-ulp difference in the cosine moves acos by sqrt(2·ulp) ≈ 1.5e-8
            assert_close(loss, ref[0], rtol=1e-6, name=f"{where} loss")


def test_the_extremes_are_really_there():
    """The constructions hit what they claim: cosines of ±1 (to rounding), θ + 0.5 past π."""
    from fusedface.margins import target_cosines
    c = target_cosines(*_extreme("equal-to-centre")[:3])
    assert (c[:4] > 1 - 1e-15).all(), c[:4]
    c = target_cosines(*_extreme("opposite")[:3])
    assert (c[:4] < -1 + 1e-15).all(), c[:4]
    c = target_cosines(*_extreme("past-pi")[:3])
    assert (torch.acos(c[:4]) + 0.5 > math.pi).all()


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_zero_norm_row_exception_is_only_that_row(backend):
    """The documented fp16 exception: the zero row's gradient overflows fp16 exactly as the
    reference's does (|dL/dx| = s·|G|/1e-12 > 65504); in fp32 the same gradient is finite and
    equals the reference."""
    x, W, y, zx, _ = _extreme("zero-embedding")
    got16 = _run(F_.margin_softmax_loss, x.half(), W.half(), y, backend, m2=0.5)
    ref16 = _run(F_.margin_softmax_loss, x.half(), W.half(), y, REF, m2=0.5)
    assert torch.isfinite(got16[0])
    assert torch.equal(torch.isfinite(got16[1]), torch.isfinite(ref16[1])), "same rows overflow as the reference"
    got32 = _run(F_.margin_softmax_loss, x.float(), W.float(), y, backend, m2=0.5)
    assert torch.isfinite(got32[1]).all() and float(got32[1][zx].abs().max()) > 65504


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_scale_64_half_precision_no_overflow(dtype, backend):
    """s = 64 with fp16/bf16 inputs and confident rows: exp(64·c) overflows fp16 (and the loss
    saturates at 69.08 if computed as −log(clamp(p))); the backends accumulate in fp32 and compute
    logsumexp − s·f, so the loss of a well-classified batch is small and finite, and the loss of a
    badly classified batch goes above 69.08."""
    # the interpreted Triton backend: B = 17, D = 40, C = 70 (past one block on every axis)
    x, W, y = make_problem(*((17, 40, 70) if is_interpreted(backend) else (32, 64, 500)), seed=5)
    good = W[y] * 4.0 + 0.01 * x  # cosine ≈ 1 with their centres
    for xx, low in ((good, True), (-W[y] * 4.0, False)):
        loss, gx, gW = _run(F_.margin_softmax_loss, xx.to(dtype), W.to(dtype), y, backend, m2=0.5, scale=64.0)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gW).all()
        if low:
            assert float(loss) < 1.0, float(loss)
        else:
            assert float(loss) > 69.08, f"the loss saturates: {float(loss)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_large_number_of_classes(backend):
    """C = 200,000 (B = 4, D = 8): finite, and in float64 equal to the reference. (The interpreted
    Triton backend, TRITON_INTERPRET=1 on CPU, runs C = 1,031: 33 class tiles of 32, walked in Python.)"""
    g = torch.Generator().manual_seed(3)
    Cb = 1_031 if is_interpreted(backend) else 200_000
    W = torch.randn(Cb, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, Cb // 2 + 7, Cb - 1, -1])
    x = W[y.clamp(min=0)] + 0.3 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    for fn, kw in ((F_.margin_softmax_loss, dict(m2=0.5)), (F_.npt_loss, dict(k=5))):
        loss, gx, gW = _run(fn, x, W, y, backend, **kw)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gW).all()
        if backend[1] != "reference":
            ref = _run(fn, x, W, y, REF, **kw)
            assert_close(loss, ref[0], rtol=1e-9, name=f"{fn.__name__} loss")
            assert_close(gx, ref[1], rtol=1e-9, name=f"{fn.__name__} dL/dx")
            assert_close(gW, ref[2], rtol=1e-9, name=f"{fn.__name__} dL/dW")
    for dtype in (torch.float16, torch.bfloat16):
        loss, gx, gW = _run(F_.margin_softmax_loss, x.to(dtype), W.to(dtype), y, backend, m2=0.5)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gW).all(), dtype


# ------------------------------------------------------------------ all rows ignored

LOSSES = [(F_.margin_softmax_loss, name, kw) for name, kw in FAMILIES.items() if "=" not in name]
LOSSES.append((F_.npt_loss, "npt", dict(k=2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_all_rows_ignored_gives_zero_loss_in_the_graph(reduction, dtype, backend):
    device, backend = backend
    x, W, _ = make_problem(5, 8, 13, seed=2, dtype=dtype)
    x, W, y = x.to(device), W.to(device), torch.full((5,), -1, device=device)
    for fn, name, kw in LOSSES:
        xx, WW = leaf(x, W)
        loss = fn(xx, WW, y, backend=backend, reduction=reduction, **kw)
        assert loss.requires_grad and loss.grad_fn is not None, f"{name}: the zero loss left the graph"
        assert torch.all(loss == 0), f"{name}: {loss}"
        loss.sum().backward()
        assert xx.grad is not None and WW.grad is not None, name
        assert torch.all(xx.grad == 0) and torch.all(WW.grad == 0), f"{name}: non-zero gradients"


HEADS = [
    (lambda: ff.ArcFace(8, 13)), (lambda: ff.CosFace(8, 13)), (lambda: ff.CombinedMargin(8, 13)),
    (lambda: ff.SphereFace(8, 13)), (lambda: ff.ElasticArcFace(8, 13, plus=True)),
    (lambda: ff.ElasticCosFace(8, 13)), (lambda: ff.KappaFace(8, 13)), (lambda: ff.SVSoftmax(8, 13)),
    (lambda: ff.MVSoftmax(8, 13)), (lambda: ff.NPT(8, 13, k=3)), (lambda: ff.OTFace(8, 13, ot_iters=3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_every_head(backend):
    device, backend = backend
    torch.manual_seed(0)
    x = torch.randn(5, 8, device=device, requires_grad=True)
    y = torch.full((5,), -1, device=device)
    for make in HEADS:
        head = make().to(device)
        head.backend = backend
        fmap = torch.randn(5, 2, 3, 3, device=device)
        loss = head(x, y, fmap) if isinstance(head, ff.OTFace) else head(x, y)
        name = type(head).__name__
        assert loss.requires_grad and float(loss) == 0.0, f"{name}: {loss}"
        x.grad = None
        loss.backward()
        assert torch.all(x.grad == 0) and torch.all(head.weight.grad == 0), name
        if isinstance(head, ff.KappaFace):
            assert int(head.epoch_counts.sum()) == 0


# ------------------------------------------------------------------ NaN in, NaN out

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("where", ["x-row", "x-inf", "W-label-row", "W-other-row"])
def test_nan_input_never_gives_a_finite_loss(where, reduction, backend):
    """Without input checks (the default) a NaN — or an Inf, which normalises to NaN — in a row
    that takes part gives a NaN loss (with reduction="none": on the rows it reaches) on every
    backend and every loss."""
    device, backend = backend
    x, W, y = make_problem(6, 8, 13, seed=4)
    y[5] = -1
    if where == "x-row":
        x[2, 3], rows = float("nan"), [2]
    elif where == "x-inf":
        x[2, 3], rows = float("inf"), [2]
    elif where == "W-label-row":
        W[y[2], 1], rows = float("nan"), [int(i) for i in (y == y[2]).nonzero()[:, 0]]
    else:
        free = [j for j in range(13) if j not in y.tolist()][0]
        W[free, 1], rows = float("nan"), [0, 1, 2, 3, 4]
    for fn, name, kw in LOSSES:
        loss = fn(x.to(device), W.to(device), y.to(device), backend=backend, reduction=reduction, **kw).cpu()
        if reduction == "none":
            if fn is F_.npt_loss and where == "W-other-row":
                # NPT only looks at its top-k: a NaN centre is selected (torch.topk ranks NaN
                # first) or not, depending on the backend; the loss must not be finite everywhere
                assert not torch.isfinite(loss).all(), f"{name}: {loss}"
                continue
            assert torch.isnan(loss[rows]).all(), f"{name}/{where}: rows {rows} give {loss[rows]}"
        else:
            assert torch.isnan(loss), f"{name}/{where}/{reduction}: finite loss {float(loss)} from a NaN input"
