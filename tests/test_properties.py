"""Property-based tests (hypothesis) over shapes, margins, policies, rewrites, grad modes,
reductions, tile sizes and every backend available here (issue 8).

Properties, each run for at least 200 examples per backend (``settings(max_examples=200,
derandomize=True)``: the same examples every run, no example database; each test counts the
examples that ran to completion and asserts the count; the interpreted Triton backend runs 10,
see below):

1. every fused backend equals the float64 reference: loss, ``dL/dx``, ``dL/dW`` within 1e-9
   relative (to the largest entry of the tensor), the per-row statistics exactly;
2. on every backend the loss does not change when rows of ``x`` or of ``W`` are rescaled by
   positive factors, or when the classes are permuted together with the labels, and ignoring a
   row equals dropping it (mean reduction);
3. the CPU backends are bitwise deterministic run to run (a plain test, not hypothesis).

Backends: tests/conftest.py's ``backend_cases()``: reference, torch, native where built and triton
(on CPU tensors under Triton's interpreter, TRITON_INTERPRET=1 set for the case; skipped with the
reason where Triton cannot run), plus the CUDA backends where a GPU is.

Shapes: B in 1–24, D in 1–40, C in 2–300. The interpreted Triton backend walks its grid in Python,
so it runs 10 examples per property on B ≤ 17, D ≤ 40, C ≤ 70: still past one block on every axis
of its interpreter configuration (16 rows, 32 classes, 32 features).

Conditioning. Two correct float64 implementations compute the same cosine with different summation
orders, so they differ by δc ≈ D·2⁻⁵³. Most of the loss is Lipschitz in the cosines and 1e-9 is
ample, but three places are not:

* ``acos`` at ±1 and the exact slope ``m1·sin(m1θ + m2)/sinθ``: the condition number of the slope
  is ``≈ 1/(1 − c²)``. Generated target cosines keep ``1 − |c| ≥ 1e-4`` (the amplification of δc
  stays below 5e3, far under the 1e-9 budget); rows near their centre or opposite to it are
  generated deliberately, just not closer than that. With D = 1 every cosine is exactly ±1, so
  D = 1 problems use powers of two, for which every backend computes the cosines exactly and the
  comparison is exact again. Exactly ±1 in higher dimensions is tested for finiteness in
  tests/test_extremes.py.
* discontinuities: the support-vector mask ``c > f``, the ``threshold`` switch at ``m1θ + m2 = π``,
  the ``easy`` switch at ``c = 0``, NPT's top-k boundary and hinge kink. An example whose value
  lies within 1e-7 of such a switch is rejected (``assume``): there the two sides are both right.
* vanishing gradients (D = 1, or a gradient that the normalisation projects out): the comparison
  has an absolute floor of 1e-12 × the gradient's natural scale ``s·max(1, a, m1)·max(1/‖row‖)``.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusedface
from conftest import assert_close, backend_cases, is_interpreted
from fusedface import functional as F_
from fusedface import reference as R
from fusedface._options import MarginOptions

BACKENDS = backend_cases()
FUSED = backend_cases(fused=True)
EXAMPLES = 200
INTERPRETED_EXAMPLES = 10  # the interpreted Triton backend (about 1 s per example)


def _examples(case) -> int:
    return INTERPRETED_EXAMPLES if is_interpreted(case) else EXAMPLES


def _settings(case):
    return settings(max_examples=_examples(case), deadline=None, derandomize=True, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                            HealthCheck.data_too_large])

RTOL = 1e-9
COS_MARGIN = 1e-4  # 1 − |target cosine| at least this (see the module docstring)
SWITCH = 1e-7  # distance kept from every discontinuity


def _limits(case):
    if is_interpreted(case):
        return 17, 40, 70
    return 24, 40, 300


# ------------------------------------------------------------------ problem generation

@st.composite
def problems(draw, backend: str):
    """A loss call: tensors in float64 and the keyword arguments."""
    bmax, dmax, cmax = _limits(backend)
    B = draw(st.integers(1, bmax), label="B")
    D = draw(st.integers(1, dmax), label="D")
    C = draw(st.integers(2, cmax), label="C")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    loss = draw(st.sampled_from(["margin", "margin", "margin", "npt"]), label="loss")
    K = draw(st.sampled_from([1, 1, 1, 2, 3]), label="subcenters") if loss == "margin" else 1
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    C_rows, C = C * K, C  # (W holds K sub-centres per class, class j's at rows j·K … j·K + K − 1)
    if D == 1:  # powers of two: every backend computes the cosines (exactly ±1) exactly
        W = 2.0 ** torch.randint(-3, 4, (C_rows, 1), generator=g).double() * (
            torch.randint(0, 2, (C_rows, 1), generator=g) * 2 - 1)
        x = 2.0 ** torch.randint(-3, 4, (B, 1), generator=g).double() * (torch.randint(0, 2, (B, 1), generator=g) * 2 - 1)
    else:
        W = torch.randn(C_rows, D, generator=g, dtype=torch.float64) * torch.exp(
            torch.randn(C_rows, 1, generator=g, dtype=torch.float64))
        x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.exp(torch.randn(B, 1, generator=g, dtype=torch.float64))
        # some rows close to their centre (confident) or close to its opposite (θ + m past π)
        kinds = draw(st.lists(st.sampled_from(["random", "near", "opposite"]), min_size=B, max_size=B), label="row kinds")
        for b, kind in enumerate(kinds):
            if kind != "random":
                sign = 1.0 if kind == "near" else -1.0
                w = W[y[b] * K] / W[y[b] * K].norm()
                noise = torch.randn(D, generator=g, dtype=torch.float64)
                x[b] = 2.5 * (sign * w + 0.05 * noise / noise.norm())
    ignored = draw(st.lists(st.booleans(), min_size=B, max_size=B), label="ignored rows")
    y = torch.where(torch.tensor(ignored), torch.full_like(y, -1), y)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    tile = draw(st.one_of(st.none(), st.integers(1, C)), label="tile_size")
    if loss == "npt":
        if C < 2:
            assume(False)
        kw = dict(k=draw(st.integers(1, min(16, C - 1)), label="k"),
                  delta=draw(st.floats(0.0, 1.0), label="delta"), r=draw(st.floats(0.5, 2.0), label="r"))
    else:
        negative = draw(st.sampled_from(["none", "sv", "mv_fixed", "mv_adaptive", "curricular"]), label="negative")
        t = {"none": 0.0, "sv": draw(st.floats(1.0, 2.0)), "mv_fixed": draw(st.floats(0.0, 0.5)),
             "mv_adaptive": draw(st.floats(0.0, 0.5)), "curricular": draw(st.floats(-0.2, 0.6))}[negative]
        kw = dict(scale=draw(st.floats(1.0, 64.0), label="scale"),
                  m1=draw(st.sampled_from([1.0, 1.0, 2.0, 4.0, 1.5]), label="m1"),
                  m2=draw(st.one_of(st.floats(0.0, 1.0), st.just("per-row")), label="m2"),
                  m3=draw(st.one_of(st.floats(0.0, 0.5), st.just("per-row")), label="m3"),
                  theta_policy=draw(st.sampled_from(["none", "threshold", "easy", "clip"]), label="theta_policy"),
                  negative=negative, t=t,
                  grad_mode=draw(st.sampled_from(["exact", "straight_through"]), label="grad_mode"),
                  interclass_threshold=draw(st.one_of(st.none(), st.none(), st.floats(-0.3, 0.95)),
                                            label="interclass_threshold"),
                  subcenters=K)
        for key, mean in (("m2", 0.5), ("m3", 0.3)):
            if kw[key] == "per-row":  # ElasticFace-style draws, per row
                kw[key] = torch.randn(B, generator=g, dtype=torch.float64) * 0.1 + mean
    return dict(loss=loss, x=x, W=W, y=y, kw=dict(kw, reduction=reduction), tile=tile)


def _fn(p):
    return F_.npt_loss if p["loss"] == "npt" else F_.margin_softmax_loss


def _assume_well_conditioned(p):
    """Rejects examples that sit on a discontinuity or at an ill-conditioned cosine (docstring)."""
    x, W, y, kw = p["x"], p["W"], p["y"], p["kw"]
    B, D = x.shape
    valid = y != -1
    if not bool(valid.any()):
        return
    K = kw.get("subcenters", 1)
    c = R.cosine_matrix(x, W, K)
    ys = y.clamp(min=0)
    cy = c.gather(1, ys[:, None])[:, 0]
    label = torch.nn.functional.one_hot(ys, c.shape[1]).bool()
    if D > 1:
        assume(bool((1 - cy.abs() >= COS_MARGIN)[valid].all()))
    if K > 1 and D > 1:  # the arg-max sub-centre: no near-ties (the gradient goes to one of them)
        top2 = (R.cosine_matrix(x, W[:, :], 1).reshape(B, -1, K)).topk(2, dim=2).values
        assume(bool((top2[..., 0] - top2[..., 1] >= SWITCH)[valid].all()))
    if kw.get("interclass_threshold") is not None:
        assume(bool(((c - kw["interclass_threshold"]).abs() >= SWITCH)[valid].all()))
    if p["loss"] == "npt":
        neg = c.masked_fill(label, float("-inf")).sort(dim=1, descending=True).values
        k = kw["k"]
        hinge = neg[:, :k] - cy[:, None] + kw["delta"]
        assume(bool((hinge.abs() >= SWITCH)[valid].all()))
        if D > 1 and neg.shape[1] > k and torch.isfinite(neg[:, k]).all():
            assume(bool((neg[:, k - 1] - neg[:, k] >= SWITCH)[valid].all()))
        return
    m2 = R.row_margin(kw["m2"], B, x.device, torch.float64)
    m3 = R.row_margin(kw["m3"], B, x.device, torch.float64)
    f = R.target_transform(cy, kw["m1"], m2, m3, kw["theta_policy"], kw["grad_mode"]).detach()
    if kw["theta_policy"] == "threshold":
        angle = kw["m1"] * torch.acos(cy) + m2
        assume(bool(((angle - math.pi).abs() >= SWITCH)[valid].all()))
    if kw["theta_policy"] == "easy":
        assume(bool((cy.abs() >= SWITCH)[valid].all()))
    if kw["theta_policy"] == "clip":
        lim = 1.0 - 1e-3
        angle = kw["m1"] * torch.acos(cy.clamp(-lim, lim)) + m2
        far = ((cy.abs() - lim).abs() >= SWITCH) & ((angle - 1e-3).abs() >= SWITCH) & (
            (angle - math.pi + 1e-3).abs() >= SWITCH)
        assume(bool(far[valid].all()))
    gap = (c - f[:, None]).abs().masked_fill(label, float("inf"))
    assume(bool((gap >= SWITCH)[valid].all()))


def _to(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _run(fn, x, W, y, case, tile=None, **kw):
    """loss and gradients (on the CPU) on ``case = (device, backend)``."""
    device, backend = case
    x = x.detach().to(device).requires_grad_(True)
    W = W.detach().to(device).requires_grad_(True)
    extra = {} if backend == "reference" else {"tile_size": tile}
    loss = fn(x, W, y.to(device), backend=backend, **extra, **_to(kw, device))
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach().cpu(), x.grad.cpu(), W.grad.cpu()


REF = ("cpu", "reference")


def _atol(p, which):
    """Absolute floor for a vanishing gradient: 1e-12 × its natural scale."""
    kw = p["kw"]
    t = p["x"] if which == "x" else p["W"]
    inv = 1.0 / t.norm(dim=1).clamp(min=1e-12)
    if p["loss"] == "npt":
        s = 2.0 * kw["r"] ** 2
    else:
        q, a, _ = MarginOptions(negative=kw["negative"], t=kw["t"]).rewrite3
        s = kw["scale"] * max(1.0, kw["m1"], a + 2.0 * q + abs(kw["t"]) * q)
    return 1e-12 * s * float(inv.max()) * max(1, p["x"].shape[0])


def _loss_atol(p):
    """Absolute floor for the loss: ``ℓ = lse − s·f`` is a difference of numbers of size ``s``, so a
    confident row's loss near 0 carries the rounding of ``s`` (a few ulps of 64 ≈ 1e-14 in fp64)."""
    s = p["kw"].get("scale", 2.0 * p["kw"].get("r", 1.0) ** 2)
    return 1e-13 * max(1.0, s) * max(1, p["x"].shape[0])


def _counted(backend, body):
    """Runs the hypothesis property ``body(problem)`` and returns how many examples completed."""
    done = []

    @_settings(backend)
    @given(p=problems(backend))
    def prop(p):
        body(p)
        done.append(1)

    prop()
    return len(done)


# ------------------------------------------------------------------ 1. every fused backend equals the reference

@pytest.mark.parametrize("backend", FUSED)
def test_backend_equals_reference(backend, record_property):
    def body(p):
        _assume_well_conditioned(p)
        fn, x, W, y, kw = _fn(p), p["x"], p["W"], p["y"], p["kw"]
        ref = _run(fn, x, W, y, REF, **kw)
        got = _run(fn, x, W, y, backend, tile=p["tile"], **kw)
        assert_close(got[0], ref[0], rtol=RTOL, atol=_loss_atol(p), name=f"{backend} loss")
        assert_close(got[1], ref[1], rtol=RTOL, atol=_atol(p, "x"), name=f"{backend} dL/dx")
        assert_close(got[2], ref[2], rtol=RTOL, atol=_atol(p, "W"), name=f"{backend} dL/dW")
        if p["loss"] == "margin":
            opts = MarginOptions(**{k: v for k, v in kw.items() if k not in ("m2", "m3")})
            _, s_ref = F_.margin_softmax_with_stats(x, W, y, opts, kw["m2"], kw["m3"], backend="reference")
            dev, name = backend
            m = _to(dict(m2=kw["m2"], m3=kw["m3"]), dev)
            _, s_got = F_.margin_softmax_with_stats(x.to(dev), W.to(dev), y.to(dev), opts, m["m2"], m["m3"],
                                                    backend=name, tile_size=p["tile"])
            s_got = {k: v.cpu() for k, v in s_got.items()}
            valid = y != -1  # an ignored row's statistics are not used (and its "target" is arbitrary)
            assert torch.equal(s_got["sv_count"].long()[valid], s_ref["sv_count"].long()[valid]), "support-vector counts"
            top2 = R.cosine_matrix(x, W, kw["subcenters"]).topk(2, dim=1).values
            clear = top2[:, 0] - top2[:, 1] > 1e-12
            assert torch.equal(s_got["pred"][clear], s_ref["pred"][clear]), "arg-max columns (rows without ties)"

    n = _counted(backend, body)
    record_property("hypothesis_examples", n)
    print(f"\n{backend}: {n} examples equal to the reference")
    assert n >= _examples(backend), f"only {n} examples ran for {backend}"


# ------------------------------------------------------------------ 2. invariances, on every backend

def _permute_classes(p, perm):
    """``(W, y)`` with the classes permuted (whole groups of sub-centres) and the labels following."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    y = torch.where(p["y"] >= 0, inv[p["y"].clamp(min=0)], p["y"])
    return _groups(p)[perm].flatten(0, 1), y


def _groups(p, t=None):
    """``[C, K, D]`` view of ``W`` (or of a tensor shaped like it)."""
    K = p["kw"].get("subcenters", 1)
    t = p["W"] if t is None else t
    return t.reshape(-1, K, t.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariances(backend, record_property):
    """Rescaling rows of x and W by positive factors, permuting the classes with the labels, and
    ignoring a row versus dropping it (mean reduction) leave the loss — and the gradients, mapped
    accordingly — unchanged."""

    def body(p):
        _assume_well_conditioned(p)
        fn, x, W, y, kw, tile = _fn(p), p["x"], p["W"], p["y"], p["kw"], p["tile"]
        g = torch.Generator().manual_seed(int(x.shape[0] * 1000 + W.shape[0]))
        base = _run(fn, x, W, y, backend, tile=tile, **kw)
        # rescaling (the gradient scales by 1/factor: d/dx f(x/|x|) is homogeneous of degree −1)
        ax = torch.exp(torch.empty(x.shape[0], 1, dtype=torch.float64).uniform_(-6, 6, generator=g))
        aw = torch.exp(torch.empty(W.shape[0], 1, dtype=torch.float64).uniform_(-6, 6, generator=g))
        if x.shape[1] == 1:  # keep D = 1 problems exact: powers of two
            ax, aw = 2.0 ** torch.round(torch.log2(ax)), 2.0 ** torch.round(torch.log2(aw))
        sc = _run(fn, x * ax, W * aw, y, backend, tile=tile, **kw)
        assert_close(sc[0], base[0], rtol=RTOL, atol=_loss_atol(p), name="loss, rows rescaled")
        assert_close(sc[1] * ax, base[1], rtol=RTOL, atol=_atol(p, "x"), name="dL/dx × factor, rows rescaled")
        assert_close(sc[2] * aw, base[2], rtol=RTOL, atol=_atol(p, "W"), name="dL/dW × factor, rows rescaled")
        # classes permuted together with the labels
        perm = torch.randperm(_groups(p).shape[0], generator=g)
        Wp, yp = _permute_classes(p, perm)
        pm = _run(fn, x, Wp, yp, backend, tile=tile, **kw)
        assert_close(pm[0], base[0], rtol=RTOL, atol=_loss_atol(p), name="loss, classes permuted")
        assert_close(pm[1], base[1], rtol=RTOL, atol=_atol(p, "x"), name="dL/dx, classes permuted")
        assert_close(pm[2], _groups(p, base[2])[perm].flatten(0, 1), rtol=RTOL, atol=_atol(p, "W"),
                     name="dL/dW, classes permuted")
        # ignoring a row equals dropping it (mean reduction)
        valid = (y != -1).nonzero()[:, 0]
        if x.shape[0] >= 2 and len(valid) >= 1:
            r = int(valid[int(torch.randint(len(valid), (1,), generator=g))])
            keep = [i for i in range(x.shape[0]) if i != r]
            kw_mean = dict(kw, reduction="mean")
            kw_drop = dict(kw_mean)
            for key in ("m2", "m3"):
                if isinstance(kw.get(key), torch.Tensor):
                    kw_drop[key] = kw[key][keep]
            y_ign = y.clone()
            y_ign[r] = -1
            ign = _run(fn, x, W, y_ign, backend, tile=tile, **kw_mean)
            drop = _run(fn, x[keep], W, y[keep], backend, tile=tile, **kw_drop)
            assert_close(ign[0], drop[0], rtol=RTOL, atol=_loss_atol(p), name="loss, row ignored vs dropped")
            assert torch.all(ign[1][r] == 0), "an ignored row gets no gradient"
            assert_close(ign[1][keep], drop[1], rtol=RTOL, atol=_atol(p, "x"), name="dL/dx, row ignored vs dropped")
            assert_close(ign[2], drop[2], rtol=RTOL, atol=_atol(p, "W"), name="dL/dW, row ignored vs dropped")

    n = _counted(backend, body)
    record_property("hypothesis_examples", n)
    print(f"\n{backend}: {n} examples invariant")
    assert n >= _examples(backend), f"only {n} examples ran for {backend}"


# ------------------------------------------------------------------ 3. determinism (CPU)

CPU_BACKENDS = [c for c in BACKENDS if c.values[0][0] == "cpu"]


def _determinism(dtype, backend):
    # the interpreted Triton backend: B = 17, D = 40, C = 70 (past one block on every axis)
    B, D, C = (17, 40, 70) if is_interpreted(backend) else (96, 128, 3001)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, D, generator=g).to(dtype)
    W = torch.randn(C, D, generator=g).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[::7] = -1
    cases = [(F_.margin_softmax_loss, dict(m2=0.5, negative="mv_adaptive", t=0.2)), (F_.npt_loss, dict(k=5))]
    for fn, kw in cases:
        runs = [_run(fn, x, W, y, backend, **kw) for _ in range(3)]
        for i, run in enumerate(runs[1:], 1):
            for name, a, b in zip(("loss", "dL/dx", "dL/dW"), runs[0], run):
                diff = int((a != b).sum())
                assert diff == 0, f"{backend} {fn.__name__} run {i}: {name} differs in {diff} entries"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_backends_are_bitwise_deterministic(dtype, backend):
    """Same inputs, same process: loss and gradients bitwise equal over three runs, with every
    intra-op thread in use (B = 96, D = 128, C = 3001: several tiles, a partial last one; the
    interpreted Triton backend, in its default deterministic mode: B = 17, D = 40, C = 70)."""
    _determinism(dtype, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_backends_deterministic_mode(dtype, monkeypatch):
    """On CUDA, under ``torch.use_deterministic_algorithms(True)`` (which also forces Triton's
    atomics-free path), every fused backend is bitwise reproducible; Triton is by default."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    fused = [b for b in fusedface.available_backends("cuda") if b != "reference"]
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for b in fused:
            _determinism(dtype, ("cuda", b))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    if "triton" in fused:
        _determinism(dtype, ("cuda", "triton"))
