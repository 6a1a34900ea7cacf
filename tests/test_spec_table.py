"""SPEC §2, checked from the SPEC's own formulas, independently of every table in the code.

The rewrite coefficients of the fused backends live in ``MarginOptions.rewrite``; the oracle has its
own table (``reference.rewritten_negatives``) and its own target transform. Neither is read here:
each loss below is recomputed row by row with Python's ``math`` on scalars, from the formulas as
the SPEC writes them (target value, threshold/easy policies, the support-vector rule, the rewrite
table and its "equivalent weight" column, ``ℓ = logsumexp − z_y``, reductions), and every backend
and the oracle are held to it. A changed coefficient anywhere (SV's ``(t, t − 1)`` made ``(t, t)``,
the threshold fall-back without ``− m3``) fails here, in seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close, backend_names, make_problem
from fusedface import functional as F_
from fusedface import reference as R
from fusedface._options import MarginOptions

# SPEC §2 table, "rewritten cosine g_bk" and "equivalent weight on e^{s·c}", as written there
SPEC_G = {
    "none": lambda c, t: c,
    "sv": lambda c, t: t * c + t - 1,
    "mv_fixed": lambda c, t: c + t,
    "mv_adaptive": lambda c, t: (t + 1) * c + t,
}
SPEC_WEIGHT = {
    "none": lambda c, t, s: 1.0,
    "sv": lambda c, t, s: math.exp(s * (t - 1) * (c + 1)),
    "mv_fixed": lambda c, t, s: math.exp(s * t),
    "mv_adaptive": lambda c, t, s: math.exp(s * t * (c + 1)),
}


def _spec_target(c, m1, m2, m3, policy):
    """``f_b`` of SPEC §2 for one row (the target value and the policy past π)."""
    theta = math.acos(c)
    T = math.cos(m1 * theta + m2) - m3
    if policy == "threshold" and m1 * theta + m2 > math.pi:
        return c - m2 * math.sin(m2) - m3
    if policy == "easy" and not c > 0:
        return c
    return T


def _spec_rows(cos, y, s, m1, m2, m3, policy, negative, t, ignore_index=-1):
    """Per-row losses ``ℓ_b`` of SPEC §2 with floats only (0 on ignored rows)."""
    rows = []
    for b, label in enumerate(y):
        if label == ignore_index:
            rows.append(0.0)
            continue
        c_row = cos[b]
        f = _spec_target(c_row[label], m1, m2[b], m3[b], policy)
        z = []
        for k, c in enumerate(c_row):
            if k == label:
                z.append(s * f)
            elif c > f:  # a support vector (strict)
                z.append(s * SPEC_G[negative](c, t))
            else:
                z.append(s * c)
        top = max(z)
        rows.append(top + math.log(sum(math.exp(v - top) for v in z)) - s * f)
    return rows


def _cosines(x, W):
    """``c_bj = clamp(x̂·ŵ, −1, 1)`` as nested Python floats (SPEC §1), from float64 dot products."""
    xs, ws = x.tolist(), W.tolist()
    nx = [max(math.sqrt(sum(v * v for v in r)), 1e-12) for r in xs]
    nw = [max(math.sqrt(sum(v * v for v in r)), 1e-12) for r in ws]
    return [[min(1.0, max(-1.0, math.fsum(a * b for a, b in zip(xr, wr)) / (nx[i] * nw[j])))
             for j, wr in enumerate(ws)] for i, xr in enumerate(xs)]


@pytest.mark.parametrize("negative,t", [("none", 0.0), ("sv", 1.12), ("sv", 1.5), ("mv_fixed", 0.2),
                                        ("mv_adaptive", 0.2), ("mv_adaptive", 0.7)])
def test_each_rewrite_is_its_formula(negative, t):
    """Both tables of the code against the SPEC's two columns (g, and the weight e^{s·g}/e^{s·c})."""
    s = 32.0
    for c in (-1.0, -0.73, -0.2, 0.0, 0.31, 0.9, 1.0):
        g = SPEC_G[negative](c, t)
        assert math.isclose(s * g - s * c, math.log(SPEC_WEIGHT[negative](c, t, s)), rel_tol=1e-12, abs_tol=1e-12)
        a, b = MarginOptions(negative=negative, t=t).rewrite
        assert math.isclose(a * c + b, g, rel_tol=1e-15, abs_tol=1e-15), ("MarginOptions.rewrite", negative, c)
        oracle = float(R.rewritten_negatives(torch.tensor(c, dtype=torch.float64), negative, t))
        assert math.isclose(oracle, g, rel_tol=1e-15, abs_tol=1e-15), ("reference.rewritten_negatives", negative, c)


@pytest.mark.parametrize("policy", ["none", "threshold", "easy"])
@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.0, 0.0, 0.35), (2.0, 0.1, 0.15)])
def test_target_value_is_its_formula(policy, m1, m2, m3):
    """The oracle's target transform against SPEC §2's ``T(c)`` and its policies, past π included."""
    cs = [-1.0, -0.999, -0.95, -0.6, -0.1, 0.0, 0.2, 0.7, 0.999, 1.0]
    got = R.target_transform(torch.tensor(cs, dtype=torch.float64), m1, m2, m3, policy, "exact").tolist()
    for c, g in zip(cs, got):
        assert math.isclose(g, _spec_target(c, m1, m2, m3, policy), rel_tol=1e-13, abs_tol=1e-13), (policy, c)


# (kw, rows placed past π) — every row of the table, every policy, m3 beside the threshold fall-back
CASES = [
    pytest.param(dict(m2=0.5, m3=0.1, theta_policy="threshold"), id="threshold-with-m3"),
    pytest.param(dict(m2=0.5, theta_policy="none"), id="arcface"),
    pytest.param(dict(m1=2.0, m3=0.1, theta_policy="easy"), id="easy-m1"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="sv", t=1.12, theta_policy="easy"), id="sv"),
    pytest.param(dict(scale=32.0, m2=0.5, negative="sv", t=1.3, theta_policy="threshold"), id="sv-threshold"),
    pytest.param(dict(scale=32.0, m2=0.5, negative="mv_fixed", t=0.2), id="mv-fixed"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2, theta_policy="easy"), id="mv-adaptive"),
]


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("kw", CASES)
def test_every_backend_equals_the_spec_formulas(kw, backend):
    """Per-row losses and their mean on every backend (and the oracle) against the scalar SPEC
    formulas, float64, with ignored rows, rows past π and per-row margins."""
    B, D, C = 7, 6, 13
    x, W, y = make_problem(B, D, C, seed=21, ignore=(2,), past_pi=(0, 4))
    g = torch.Generator().manual_seed(5)
    kw = dict(kw)  # (the parameter dict is shared by the backends)
    m2 = kw.pop("m2", 0.0)
    m2_rows = (m2 + 0.02 * torch.randn(B, generator=g, dtype=torch.float64)) if m2 else torch.zeros(B, dtype=torch.float64)
    full = dict(scale=64.0, m1=1.0, m3=0.0, theta_policy="none", negative="none", t=0.0)
    full.update(kw)
    m3 = full.pop("m3")
    expected = _spec_rows(_cosines(x, W), y.tolist(), full["scale"], full["m1"], m2_rows.tolist(), [m3] * B,
                          full["theta_policy"], full["negative"], full["t"])
    if full["theta_policy"] == "threshold" and m2:
        # the fall-back really is exercised: rows 0 and 4 lie past π
        cos = _cosines(x, W)
        assert all(math.acos(cos[i][int(y[i])]) + float(m2_rows[i]) > math.pi for i in (0, 4))
    got = F_.margin_softmax_loss(x, W, y, m2=m2_rows, m3=m3, reduction="none", backend=backend, **full)
    assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, name=f"{backend} rows")
    mean = F_.margin_softmax_loss(x, W, y, m2=m2_rows, m3=m3, reduction="mean", backend=backend, **full)
    assert math.isclose(float(mean), math.fsum(expected) / (B - 1), rel_tol=1e-10), backend
