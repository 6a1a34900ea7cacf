"""fusedface.reference: SPEC check values, float64 gradchecks of every loss family, reductions,
ignored rows, and agreement with pytorch-metric-learning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MARGIN_FAMILIES, assert_close, make_problem, materialise_margins
from fusedface import reference as R
from fusedface._options import MarginOptions


# ------------------------------------------------------------------ SPEC check values

def test_kappa_replaces_inf_and_nan():
    kappa = R.kappa_from_resultant(torch.tensor([0.5, 1.0, float("nan")], dtype=torch.float64), 512)
    assert kappa[1] == kappa[0], "r̄ = 1 gives +inf, which must become the largest finite κ"
    assert kappa[2] == 0, "NaN (a class with no sample) must become κ = 0"
    m = R.kappa_margins(torch.tensor([5.0, 5.0]), torch.tensor([3, 3]))
    assert torch.isfinite(m).all(), "equal κ (std 0) must not give NaN margins"


def test_elasticface_plus_ties_and_ignored_rows():
    cos = torch.tensor([0.3, 0.3, 0.9, 0.0])
    draws = torch.tensor([0.1, 0.4, 0.3, 0.2])
    # ties broken by row index: row 0 ranks before row 1; row 3 is ignored and ranks last
    out = R.plus_order(cos, draws, valid=torch.tensor([True, True, True, False]))
    assert out.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_elastic_draws_follow_the_generator():
    cos = torch.zeros(1000)
    a = R.elastic_margins(cos, 0.5, 0.05, generator=torch.Generator().manual_seed(3))
    b = R.elastic_margins(cos, 0.5, 0.05, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert abs(float(a.mean()) - 0.5) < 0.01 and abs(float(a.std()) - 0.05) < 0.005


@pytest.mark.parametrize("policy,c,m1,m2,m3,value,slope", [
    ("none", 0.6, 1.0, 0.5, 0.0, math.cos(math.acos(0.6) + 0.5), math.sin(math.acos(0.6) + 0.5) / 0.8),
    ("none", -0.95, 1.0, 0.5, 0.0, math.cos(math.acos(-0.95) + 0.5), math.sin(math.acos(-0.95) + 0.5) / math.sqrt(1 - 0.95 ** 2)),
    ("threshold", -0.95, 1.0, 0.5, 0.1, -0.95 - 0.5 * math.sin(0.5) - 0.1, 1.0),
    ("threshold", 0.6, 1.0, 0.5, 0.1, math.cos(math.acos(0.6) + 0.5) - 0.1, math.sin(math.acos(0.6) + 0.5) / 0.8),
    ("easy", -0.2, 1.0, 0.5, 0.0, -0.2, 1.0),
    ("easy", 0.2, 2.0, 0.0, 0.0, math.cos(2 * math.acos(0.2)), 2 * math.sin(2 * math.acos(0.2)) / math.sqrt(1 - 0.04)),
])
def test_theta_policies(policy, c, m1, m2, m3, value, slope):
    ct = torch.tensor([c], dtype=torch.float64, requires_grad=True)
    f = R.target_transform(ct, m1, m2, m3, policy, "exact")
    (g,) = torch.autograd.grad(f.sum(), ct)
    assert f.item() == pytest.approx(value, abs=1e-12)
    assert g.item() == pytest.approx(slope, abs=1e-12)
    f = R.target_transform(ct, m1, m2, m3, policy, "straight_through")
    (g,) = torch.autograd.grad(f.sum(), ct)
    assert g.item() == 1.0


def test_exact_slope_is_finite_at_cosines_of_plus_minus_one():
    ct = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    f = R.target_transform(ct, 1.0, 0.5, 0.0, "none", "exact")
    (g,) = torch.autograd.grad(f.sum(), ct)
    assert torch.isfinite(f).all() and torch.isfinite(g).all()


# ------------------------------------------------------------------ gradcheck, every family

# straight-through is not the derivative by design: test_straight_through_gradient_on_cosines holds it
EXACT_FAMILIES = [p for p in MARGIN_FAMILIES if p.values[0].get("grad_mode") != "straight_through"]


@pytest.mark.parametrize("kw", EXACT_FAMILIES)
def test_gradcheck_margin_family(kw):
    x, W, y = make_problem(6, 5, 7, seed=1, ignore=(2,))
    kw = materialise_margins(kw, 6)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.margin_softmax_loss(a, b, y, reduction="none", **kw), (x, W))


def test_gradcheck_cosface_straight_through_equals_exact():
    """For CosFace dT/dc = 1, so straight-through is the true derivative: gradcheck holds."""
    x, W, y = make_problem(6, 5, 7, seed=2)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: R.margin_softmax_loss(a, b, y, m3=0.35, grad_mode="straight_through"), (x, W))


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_npt(k):
    x, W, y = make_problem(6, 5, 9, seed=3, ignore=(0,))
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.npt_loss(a, b, y, k=k, reduction="sum"), (x, W))


def test_gradcheck_kappaface_margins():
    x, W, y = make_problem(6, 5, 7, seed=4)
    class_m = R.kappa_margins(R.kappa_from_resultant(torch.rand(7, dtype=torch.float64) * 0.9, 5),
                              torch.randint(1, 50, (7,)))
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.margin_softmax_loss(a, b, y, m2=class_m[y]), (x, W))


def test_gradcheck_ot_term():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    fmap = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: R.ot_triplet_loss(x, y, f, eps=0.5, iters=20, margin=1.0), (fmap,))


def test_gradcheck_otface_total():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    fmap = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, f: R.otface_loss(a, b, y, f, ot_eps=0.5, ot_iters=10, ot_margin=1.0, m2=0.5), (x, W, fmap))


# ------------------------------------------------------------------ gradients on the cosines

@pytest.mark.parametrize("m2,m3", [(0.5, 0.0), (0.3, 0.2)])
def test_straight_through_gradient_on_cosines(m2, m3):
    """InsightFace's straight-through mode: dℓ/dc = s·(p − onehot), p the softmax of the logits."""
    g = torch.Generator().manual_seed(7)
    s = 64.0
    c = (torch.rand(5, 9, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 3, 8, 1, 5])
    opts = MarginOptions(scale=s, grad_mode="straight_through", reduction="sum")
    loss, _ = R.margin_softmax_from_cosines(c, y, opts, m2=m2, m3=m3)
    (grad,) = torch.autograd.grad(loss, c)
    z = s * c.detach().clone()
    cy = c.detach()[torch.arange(5), y]
    z[torch.arange(5), y] = s * (torch.cos(torch.acos(cy) + m2) - m3)
    expected = s * (torch.softmax(z, dim=1) - F.one_hot(y, 9).double())
    assert_close(grad, expected, rtol=1e-12, name="dℓ/dc")


def test_exact_gradient_on_target_cosine():
    s, m2 = 64.0, 0.5
    c = torch.tensor([[0.3, 0.7, -0.2]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    loss, _ = R.margin_softmax_from_cosines(c, y, MarginOptions(scale=s), m2=m2)
    (grad,) = torch.autograd.grad(loss, c)
    theta = math.acos(0.7)
    z = torch.tensor([0.3, math.cos(theta + m2), -0.2], dtype=torch.float64) * s
    p = torch.softmax(z, 0)
    assert grad[0, 1].item() == pytest.approx(s * (p[1].item() - 1) * math.sin(theta + m2) / math.sin(theta), rel=1e-12)
    assert grad[0, 0].item() == pytest.approx(s * p[0].item(), rel=1e-12)


# ------------------------------------------------------------------ reductions and ignored rows

def test_reductions_and_ignored_rows():
    x, W, y = make_problem(8, 6, 11, seed=8, ignore=(1, 5))
    x.requires_grad_(True)
    rows = R.margin_softmax_loss(x, W, y, m2=0.5, reduction="none")
    assert rows[1] == 0 and rows[5] == 0
    assert_close(R.margin_softmax_loss(x, W, y, m2=0.5, reduction="sum"), rows.sum(), rtol=1e-15, name="sum")
    mean = R.margin_softmax_loss(x, W, y, m2=0.5, reduction="mean")
    assert_close(mean, rows.sum() / 6, rtol=1e-15, name="mean over non-ignored rows")
    (gx,) = torch.autograd.grad(mean, x)
    assert gx[1].abs().max() == 0 and gx[5].abs().max() == 0, "ignored rows must get zero gradient"
    # ignoring a row equals dropping it
    keep = torch.tensor([i not in (1, 5) for i in range(8)])
    assert_close(mean, R.margin_softmax_loss(x[keep], W, y[keep], m2=0.5), rtol=1e-14, name="ignore == drop")


@pytest.mark.parametrize("fn", ["margin", "npt"])
def test_all_rows_ignored_gives_zero_loss_in_the_graph(fn):
    x, W, y = make_problem(4, 5, 6, seed=9, ignore=(0, 1, 2, 3))
    x.requires_grad_(True)
    W.requires_grad_(True)
    loss = R.margin_softmax_loss(x, W, y, m2=0.5) if fn == "margin" else R.npt_loss(x, W, y)
    assert loss.item() == 0.0 and loss.requires_grad
    gx, gW = torch.autograd.grad(loss, (x, W))
    assert gx.abs().max() == 0 and gW.abs().max() == 0


def test_npt_value_by_hand():
    # three classes on the plane; x at angle 0; targets at 0.1 rad, negatives at 0.3 and 2.0 rad
    ang = torch.tensor([0.1, 0.3, 2.0], dtype=torch.float64)
    W = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    c = torch.cos(ang)
    expected = 2 * 1.5 ** 2 * (max(0.0, c[1] - c[0] + 0.5) + max(0.0, c[2] - c[0] + 0.5))
    assert R.npt_loss(x, W, y, k=2, r=1.5).item() == pytest.approx(float(expected), rel=1e-14)
    with pytest.raises(ValueError, match="k=3"):
        R.npt_loss(x, W, y, k=3)


def test_sinkhorn_properties():
    g = torch.Generator().manual_seed(10)
    a = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    same = R.sinkhorn_ot(a, a, eps=0.05, iters=2000)
    ab = R.sinkhorn_ot(a, b, eps=0.05, iters=2000)
    ba = R.sinkhorn_ot(b, a, eps=0.05, iters=2000)
    assert (same < ab).all(), "a cloud is closer to itself than to another cloud"
    assert_close(ab, ba, rtol=1e-6, name="OT symmetry")


def test_extremes_are_finite_at_scale_64():
    """Cosines of exactly ±1 (embedding equal to / opposite its centre), zero-norm rows."""
    W = torch.randn(5, 4, dtype=torch.float64)
    x = torch.stack([W[0], -W[1], torch.zeros(4, dtype=torch.float64), W[3] * 1e-30])
    y = torch.tensor([0, 1, 2, 3])
    for kw in (dict(m2=0.5), dict(m2=0.5, theta_policy="threshold"), dict(m1=4.0), dict(m3=0.35)):
        xl, Wl = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = R.margin_softmax_loss(xl, Wl, y, **kw)
        gx, gW = torch.autograd.grad(loss, (xl, Wl))
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gW).all(), kw


# ------------------------------------------------------------------ pytorch-metric-learning

def test_matches_pytorch_metric_learning_arcface_and_cosface():
    pml = pytest.importorskip("pytorch_metric_learning.losses",
                              reason="pytorch-metric-learning is a test-only dependency: pip install pytorch-metric-learning")
    torch.manual_seed(11)
    B, D, C = 16, 12, 20
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    x[0] = -torch.randn(D, dtype=torch.float64)  # a hard row: make its target centre its opposite
    arc = pml.ArcFaceLoss(num_classes=C, embedding_size=D, margin=28.6479, scale=64).double()
    arc.W.data[:, y[0]] = -x[0]
    m2 = math.radians(28.6479)
    ours = R.margin_softmax_loss(x, arc.W.data.t(), y, m2=m2, theta_policy="threshold")
    theirs = arc(x, y)
    assert abs(ours.item() - theirs.item()) <= 1e-10 * abs(theirs.item())
    cos = pml.CosFaceLoss(num_classes=C, embedding_size=D, margin=0.35, scale=64).double()
    ours = R.margin_softmax_loss(x, cos.W.data.t(), y, m3=0.35)
    theirs = cos(x, y)
    assert abs(ours.item() - theirs.item()) <= 1e-10 * abs(theirs.item())
