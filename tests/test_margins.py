"""The margin sources (SPEC §3, ``fusedface.margins``) and the OTFace term (SPEC §5,
``fusedface.otface``) that the heads and the sharded heads use, against the oracle's own versions
(``fusedface.reference``) and SPEC's check values; KappaFace's κ end to end in float64."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close
import fusedface as ff
from fusedface import margins as M
from fusedface import otface as OT
from fusedface import reference as R


@pytest.mark.parametrize("mod", [M, R], ids=["margins", "reference"])
def test_kappa_check_values_of_spec(mod):
    kappa = mod.kappa_from_resultant(torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64), 512)
    assert_close(kappa, torch.tensor([341.1667, 702.0725, 2421.4263], dtype=torch.float64), rtol=0, atol=1e-4,
                 name="kappa")
    m = mod.kappa_margins(kappa, torch.tensor([10, 100, 400]), m0=0.8, temperature=0.4, gamma=0.7)
    assert_close(m, torch.tensor([0.560368, 0.510728, 0.218617], dtype=torch.float64), rtol=0, atol=1e-6, name="m")


@pytest.mark.parametrize("mod", [M, R], ids=["margins", "reference"])
def test_plus_example_of_spec(mod):
    out = mod.plus_order(torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([0.52, 0.47, 0.50, 0.55]))
    assert torch.equal(out, torch.tensor([0.55, 0.47, 0.52, 0.50]))


@pytest.mark.parametrize("seed", range(5))
def test_margin_sources_equal_the_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    B, C = 17, 23
    cos = torch.randint(-3, 4, (B,), generator=g).double() / 4  # ties
    valid = torch.rand(B, generator=g) > 0.2
    draws = torch.randn(B, generator=g)
    assert torch.equal(M.plus_order(cos, draws, valid), R.plus_order(cos, draws, valid))
    for plus in (False, True):
        a = M.elastic_margins(cos, 0.5, 0.05, plus=plus, generator=torch.Generator().manual_seed(seed), valid=valid)
        b = R.elastic_margins(cos, 0.5, 0.05, plus=plus, generator=torch.Generator().manual_seed(seed), valid=valid)
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)
    rbar = torch.rand(C, generator=g, dtype=torch.float64)
    rbar[[0, 5]] = 1.0
    rbar[3] = float("nan")
    counts = torch.randint(0, 60, (C,), generator=g)
    assert_close(M.kappa_from_resultant(rbar, 64), R.kappa_from_resultant(rbar, 64), rtol=1e-14, name="kappa")
    kappa = R.kappa_from_resultant(rbar, 64)
    assert_close(M.kappa_margins(kappa, counts, m0=0.7, temperature=0.5, gamma=0.6),
                 R.kappa_margins(kappa, counts, m0=0.7, temperature=0.5, gamma=0.6), rtol=1e-14, name="margins")


def _fp64_kappa(batches, C, D):
    """κ per class straight from SPEC §3 in float64: S_c = Σ x̂, r̄ = ‖S_c‖/n_c (1 for a class seen
    once), κ = r̄(d − r̄²)/(1 − r̄²), +inf → the largest finite κ, a class not seen → 0."""
    S = torch.zeros(C, D, dtype=torch.float64)
    n = torch.zeros(C, dtype=torch.float64)
    for x, y in batches:
        for b in range(x.shape[0]):
            if y[b] >= 0:
                S[y[b]] += x[b] / x[b].norm()
                n[y[b]] += 1
    out = []
    for c in range(C):
        if n[c] == 0:
            out.append(0.0)
            continue
        r = 1.0 if n[c] == 1 else float(S[c].norm() / n[c])
        out.append(math.inf if r == 1.0 else r * (D - r * r) / (1 - r * r))
    largest = max((k for k in out if math.isfinite(k)), default=0.0)
    return torch.tensor([k if math.isfinite(k) else largest for k in out], dtype=torch.float64), n


def test_kappaface_fp64_statistics_give_an_fp64_kappa():
    """A float64 head with float64 statistics: κ equals a float64 recomputation to 1e-12 (the unit
    vectors are formed in fp64; before, they were formed in fp32 and κ was off by ~2e-7)."""
    D, C = 12, 9
    g = torch.Generator().manual_seed(0)
    head = ff.KappaFace(D, C, dtype=torch.float64, stats_dtype=torch.float64, backend="torch")
    centres = torch.randn(C, D, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(4):
        y = torch.randint(0, C, (16,), generator=g)
        y[3] = -1
        x = 3.0 * centres[y.clamp(min=0)] + torch.randn(16, D, generator=g, dtype=torch.float64)
        batches.append((x, y))
        head(x, y)
    head.end_epoch()
    kappa, n = _fp64_kappa(batches, C, D)
    assert head.class_kappa.dtype == torch.float64 and head.class_margins.dtype == torch.float64
    assert_close(head.class_kappa, kappa, rtol=1e-12, name="kappa (fp64 statistics)")
    assert_close(head.class_margins, R.kappa_margins(kappa, n.long()), rtol=1e-12, name="margins")


def test_kappaface_fp32_statistics_stay_fp32_grade():
    D, C = 12, 9
    g = torch.Generator().manual_seed(1)
    head = ff.KappaFace(D, C, dtype=torch.float64, backend="torch")  # stats_dtype fp32 (default)
    x = torch.randn(40, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (40,), generator=g)
    head(x, y)
    head.end_epoch()
    kappa, _ = _fp64_kappa([(x, y)], C, D)
    assert head.resultant_sum.dtype == torch.float32
    assert_close(head.class_kappa, kappa, rtol=1e-4, name="kappa (fp32 statistics)")


def test_ot_term_equals_the_oracle_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, -1, 3, 1])  # row 5 ignored, row 6 has no positive
    fmap = torch.randn(8, 3, 2, 3, generator=g, dtype=torch.float64)
    fa, fb = fmap.clone().requires_grad_(), fmap.clone().requires_grad_()
    a = OT.ot_triplet_loss(x, y, fa, margin=0.3, eps=0.1, iters=30)
    b = R.ot_triplet_loss(x, y, fb, margin=0.3, eps=0.1, iters=30)
    assert a.item() > 0
    assert_close(a, b, rtol=1e-12, name="L_OT")
    (ga,), (gb,) = torch.autograd.grad(a, fa), torch.autograd.grad(b, fb)
    assert_close(ga, gb, rtol=1e-10, name="dL_OT/dfeature_maps")
    none = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # no anchor has a positive
    assert OT.ot_triplet_loss(x, none, fmap).item() == 0.0 == R.ot_triplet_loss(x, none, fmap).item()
