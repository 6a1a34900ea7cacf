"""What docs/migration.md claims about InsightFace's Partial FC and FaceX-Zoo's ArcFace, checked
with the public API on CPU in float64.

The peers' behaviour is re-derived here from reading their released code (not copied):
  * deepinsight/insightface, recognition/arcface_torch/partial_fc_v2.py (PartialFC_V2,
    DistCrossEntropyFunc) and recognition/arcface_torch/losses.py (CombinedMarginLoss);
  * JDAI-CV/FaceX-Zoo, head/ArcFace.py (ArcFace) with the CrossEntropyLoss of
    training_mode/conventional_training/train.py.
The recipes `insightface_pfc_loss` and `facex_arcface_loss` are the ones printed in the doc.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF

import fusedface
from fusedface import functional as F
from fusedface import distributed as FD

DT = torch.float64
NEG_LOG_1E30 = -math.log(1e-30)  # 69.0776: InsightFace's per-row cap


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ============================================================================ the doc's recipes


def insightface_pfc_loss(x, W, y, *, scale=64.0, m2=0.5, m3=0.0, grad_mode="straight_through"):
    """PartialFC_V2 + CombinedMarginLoss (full softmax, one process), rows labelled -1 included."""
    keep = y != -1
    y0 = torch.where(keep, y, torch.zeros_like(y))  # any class will do on a -1 row: take class 0
    m2_rows = torch.full(y.shape, m2, dtype=torch.float64, device=x.device).masked_fill(~keep, 0.0)
    m3_rows = torch.full(y.shape, m3, dtype=torch.float64, device=x.device).masked_fill(~keep, 0.0)
    rows = F.margin_softmax_loss(x, W, y0, scale=scale, m2=m2_rows, m3=m3_rows, grad_mode=grad_mode,
                                 reduction="none")
    # on a -1 row (no margin) rows = logsumexp_k(s·c_bk) − s·c_b0; add s·c_b0 back
    lse = rows + scale * (tF.normalize(x, dim=1) @ tF.normalize(W[0], dim=0))
    labelled = rows - (rows - rows.clamp(max=NEG_LOG_1E30)).detach()  # value capped at 69.08, gradient not
    unlabelled = NEG_LOG_1E30 + (lse - lse.detach())  # value 69.08, gradient of the logsumexp
    return torch.where(keep, labelled, unlabelled).mean()  # mean over the FULL batch


def facex_arcface_loss(x, W, y, *, margin_arc=0.35, margin_am=0.0, scale=32.0):
    """FaceX-Zoo's ArcFace head + CrossEntropyLoss; W = facex_head.weight.t() ([C, D])."""
    with torch.no_grad():
        c_y = (tF.normalize(x.double(), dim=1) * tF.normalize(W[y].double(), dim=1)).sum(dim=1).clamp(-1, 1)
        past = c_y <= math.cos(math.pi - margin_arc)  # FaceX-Zoo's fall-back rows: θ ≥ π − m
        m2 = torch.full(y.shape, margin_arc, dtype=torch.float64, device=x.device).masked_fill(past, 0.0)
        m3 = torch.zeros(y.shape, dtype=torch.float64, device=x.device).masked_fill(past, margin_am)
    return F.margin_softmax_loss(x, W, y, scale=scale, m2=m2, m3=m3)  # theta_policy "none", grad "exact"


# ============================================================================ oracles from reading the peers


class _InsightFaceCrossEntropy(torch.autograd.Function):
    """One rank of InsightFace's distributed cross-entropy as read in partial_fc_v2.py: forward
    −mean_b log(max(p_b,y, 1e-30)) over ALL rows, with p_b,y = 0 on rows labelled −1; backward
    (softmax − one-hot on labelled rows) / B, whatever the forward clamped."""

    @staticmethod
    def forward(ctx, z, y):
        p = torch.softmax(z, dim=1)
        keep = y != -1
        p_y = torch.zeros(z.shape[0], dtype=z.dtype)
        p_y[keep] = p[keep, y[keep]]
        ctx.save_for_backward(p, y)
        return -p_y.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, g):
        p, y = ctx.saved_tensors
        keep = y != -1
        d = p.clone()
        rows = keep.nonzero()[:, 0]
        d[rows, y[rows]] -= 1.0
        return d / p.shape[0] * g, None


def insightface_oracle(x, W, y, *, scale, m2, m3):
    """CombinedMarginLoss (ArcFace branch with the identity backward, or the CosFace branch) on the
    labelled rows only, plain s·cos on every other entry, then the cross-entropy above."""
    c = (tF.normalize(x, dim=1) @ tF.normalize(W, dim=1).t()).clamp(-1, 1)
    keep = y != -1
    rows = keep.nonzero()[:, 0]
    ct = c[rows, y[rows]]
    if m3 == 0.0:  # ArcFace branch: value cos(θ + m2), derivative 1
        t = ct + (torch.cos(torch.acos(ct) + m2) - ct).detach()
    else:  # CosFace branch
        t = ct - m3
    z = c.clone()
    z[rows, y[rows]] = t
    return _InsightFaceCrossEntropy.apply(z * scale, y)


def facex_oracle(x, W, y, *, margin_arc, margin_am, scale, fallback=None, reduction="mean"):
    """FaceX-Zoo head/ArcFace.py as read (weight [D, C], normalised per column), cross-entropy.
    ``fallback(c)`` replaces FaceX-Zoo's ``c − margin_am`` past π − m (to state what else differs)."""
    W_facex = W.t()  # FaceX-Zoo stores [feat_dim, num_class]
    c = (tF.normalize(x) @ tF.normalize(W_facex, dim=0)).clamp(-1, 1)
    with_margin = c * math.cos(margin_arc) - torch.sqrt(1.0 - c ** 2) * math.sin(margin_arc)
    fb = c - margin_am if fallback is None else fallback(c)
    target = torch.where(c > math.cos(math.pi - margin_arc), with_margin, fb)
    logits = torch.where(tF.one_hot(y, c.shape[1]).bool(), target, c) * scale
    return tF.cross_entropy(logits, y, reduction=reduction)


def grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


def batch(B=10, D=16, C=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, dtype=DT, generator=g)
    W = torch.randn(C, D, dtype=DT, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return x, W, y


def put_at_angle(x, W, y, b, theta, seed=1):
    """Row b of x at angle θ from its class centre (norm 3)."""
    g = torch.Generator().manual_seed(seed + b)
    w = tF.normalize(W[y[b]], dim=0)
    u = torch.randn(W.shape[1], dtype=DT, generator=g)
    u = tF.normalize(u - (u @ w) * w, dim=0)
    x[b] = 3.0 * (math.cos(theta) * w + math.sin(theta) * u)


# ============================================================================ PartialFC_V2 → fusedface.distributed


@pytest.mark.parametrize("C,R", [(10, 1), (10, 3), (7, 7), (1_000_003, 8), (5, 2)])
def test_shard_layout_is_insightfaces(C, R):
    """PartialFC_V2: rank r holds num_local = C//R + (r < C%R) classes from
    class_start = C//R·r + min(r, C%R); fusedface's shard_range is the same layout."""
    for r in range(R):
        num_local = C // R + int(r < C % R)
        class_start = C // R * r + min(r, C % R)
        assert FD.shard_range(C, R, r) == (class_start, class_start + num_local)
    assert FD.shard_sizes(C, R) == [C // R + int(r < C % R) for r in range(R)]


def test_partial_fc_sample_keeps_positives_then_fills_to_rate():
    g = torch.Generator().manual_seed(0)
    num_local = 50
    y_shard = torch.tensor([3, 3, 17, -1, 42, -1, 8])  # -1: label on another rank (or ignored)
    index, y_sub = FD.sample_classes(y_shard, num_local, 0.2, generator=g)
    assert index.numel() == int(0.2 * num_local)  # InsightFace: num_sample = int(rate·num_local)
    assert torch.equal(index, index.sort().values)
    assert set([3, 17, 42, 8]) <= set(index.tolist())  # every positive kept
    owned = y_shard >= 0
    assert torch.equal(index[y_sub[owned]], y_shard[owned])  # labels remapped into the sample
    assert torch.equal(y_sub[~owned], y_shard[~owned])
    # more positives than the rate allows: the sample is the positives alone (as InsightFace)
    y_many = torch.arange(0, 20)
    index, _ = FD.sample_classes(y_many, num_local, 0.2, generator=g)
    assert torch.equal(index, y_many)


def test_sharded_head_world_of_one_and_insightface_weight():
    """ShardedCombinedMargin takes CombinedMargin's arguments; without a process group it is a world
    of one and equals the single-process head; sample_rate=1.0 equals no sampling; an InsightFace
    weight [num_local, D] (here one rank) loads with load_full_state_dict({"weight": ...})."""
    x, W, y = batch()
    y[2] = -1
    D, C = W.shape[1], W.shape[0]
    single = fusedface.CombinedMargin(D, C, scale=64.0, margin_list=(1.0, 0.5, 0.0),
                                      grad_mode="straight_through").double()
    single.weight.data.copy_(W)
    xs = x.clone().requires_grad_()
    ref = single(xs, y)
    gx_ref, gW_ref = grads(ref, xs, single.weight)
    for rate in (None, 1.0):
        head = FD.ShardedCombinedMargin(D, C, scale=64.0, margin_list=(1.0, 0.5, 0.0),
                                        grad_mode="straight_through", sample_rate=rate).double()
        head.load_full_state_dict({"weight": torch.cat([W[:6], W[6:]])})  # shards in rank order
        assert head.class_range == (0, C)
        xr = x.clone().requires_grad_()
        loss = head(xr, y)
        gx, gW = grads(loss, xr, head.weight)
        close(loss, ref)
        close(gx, gx_ref)
        close(gW, gW_ref)


def test_embedding_grad_scale_multiplies_only_the_embedding_gradient():
    """InsightFace's AllGather backward multiplies the embedding gradient by the world size;
    embedding_grad_scale does the same and leaves the loss and dL/dW alone."""
    x, W, y = batch()
    D, C = W.shape[1], W.shape[0]
    out = []
    for scale in (1.0, 4.0):
        head = FD.ShardedArcFace(D, C, embedding_grad_scale=scale).double()
        head.weight.data.copy_(W)
        xr = x.clone().requires_grad_()
        loss = head(xr, y)
        out.append((loss.detach(), *grads(loss, xr, head.weight)))
    close(out[1][0], out[0][0])
    close(out[1][1], 4.0 * out[0][1])
    close(out[1][2], out[0][2])


def test_partial_fc_gradient_is_zero_on_unsampled_rows():
    x, W, y = batch(B=6, C=40)
    head = FD.ShardedArcFace(W.shape[1], W.shape[0], sample_rate=0.25,
                             sample_generator=torch.Generator().manual_seed(3)).double()
    head.weight.data.copy_(W)
    head(x, y).backward()
    sampled = head.last_sampled_classes
    assert sampled.numel() == 10 and set(y.tolist()) <= set(sampled.tolist())
    others = torch.ones(40, dtype=torch.bool)
    others[sampled] = False
    assert head.weight.grad[others].abs().max() == 0
    assert head.weight.grad[sampled].abs().max() > 0


# ============================================================================ labels −1


@pytest.mark.parametrize("m2,m3,grad_mode", [(0.5, 0.0, "straight_through"), (0.0, 0.4, "exact")])
def test_recipe_reproduces_insightface_minus_one_rows(m2, m3, grad_mode):
    """The doc's recipe equals InsightFace's forward and backward (as read) with −1 rows, including a
    labelled row whose true loss exceeds the 69.08 cap."""
    x, W, y = batch()
    y[[1, 5, 6]] = -1
    x[0] = -3.0 * W[y[0]]  # c_y = −1: a loss above 69.08, capped by InsightFace
    x = x.requires_grad_()
    W = W.requires_grad_()
    a = insightface_pfc_loss(x, W, y, scale=64.0, m2=m2, m3=m3, grad_mode=grad_mode)
    b = insightface_oracle(x, W, y, scale=64.0, m2=m2, m3=m3)
    close(a, b)
    for ga, gb in zip(grads(a, x, W), grads(b, x, W)):
        close(ga, gb)
    # the cap really applied to row 0
    rows = F.margin_softmax_loss(x, W, y, scale=64.0, m2=m2, m3=m3, grad_mode=grad_mode, reduction="none")
    assert rows[0] > NEG_LOG_1E30


def test_minus_one_row_is_69_08_with_the_gradient_of_its_logsumexp():
    """A batch of −1 rows only: the loss is −log(1e-30) = 69.0776 whatever x and W are, yet the
    gradient is that of mean_b logsumexp_k(s·c_bk) (the plain scaled cosines, no margin)."""
    x, W, y = batch(B=4)
    y[:] = -1
    x = x.requires_grad_()
    W = W.requires_grad_()
    a = insightface_pfc_loss(x, W, y)
    b = insightface_oracle(x, W, y, scale=64.0, m2=0.5, m3=0.0)
    assert abs(a.item() - 69.07755278982137) < 1e-12
    close(a, b)
    c = tF.normalize(x, dim=1) @ tF.normalize(W, dim=1).t()
    lse_mean = torch.logsumexp(64.0 * c, dim=1).mean()
    for ga, gb, gl in zip(grads(a, x, W), grads(b, x, W), grads(lse_mean, x, W)):
        close(ga, gl)
        close(gb, gl)
        assert gl.abs().max() > 1e-6


def test_insightface_mean_is_over_the_full_batch_and_ignore_index_is_not_it():
    """InsightFace: (Σ_labelled ℓ_b + 69.08·n₋₁) / B. fusedface's ignore_index: Σ_labelled ℓ_b / n_labelled,
    no gradient on −1 rows."""
    x, W, y = batch()
    ign = torch.tensor([1, 5, 6])
    y[ign] = -1
    B, n_ign = y.numel(), ign.numel()
    s = 16.0  # small enough that no labelled row reaches the cap
    x = x.requires_grad_()
    ff = F.margin_softmax_loss(x, W, y, scale=s, m2=0.5, grad_mode="straight_through")  # ignore_index=-1
    rows = F.margin_softmax_loss(x, W, y, scale=s, m2=0.5, grad_mode="straight_through", reduction="none")
    assert rows.max() < NEG_LOG_1E30  # no cap involved in this batch
    insight = insightface_oracle(x, W, y, scale=s, m2=0.5, m3=0.0)
    close(insight, (ff * (B - n_ign) + n_ign * NEG_LOG_1E30) / B)
    close(insightface_pfc_loss(x, W, y, scale=s), insight)
    assert abs(ff.item() - insight.item()) > 1.0
    (gx_ff,) = grads(ff, x)
    (gx_in,) = grads(insight, x)
    assert gx_ff[ign].abs().max() == 0  # fusedface: ignored rows get nothing
    assert gx_in[ign].abs().sum(dim=1).min() > 1e-6  # InsightFace: every -1 row has a gradient


# ============================================================================ FaceX-Zoo ArcFace


def facex_batch():
    """Rows 0, 1 past π − m (m = 0.35), row 2 in (π/2, π − m), row 3 near its centre."""
    x, W, y = batch(B=8, D=16, C=11, seed=4)
    put_at_angle(x, W, y, 0, math.pi - 0.2)
    put_at_angle(x, W, y, 1, math.pi - 0.05)
    put_at_angle(x, W, y, 2, 2.0)
    put_at_angle(x, W, y, 3, 0.3)
    return x, W, y


@pytest.mark.parametrize("margin_am", [0.0, 0.2])
def test_facex_recipe_reproduces_facex_arcface(margin_am):
    x, W, y = facex_batch()
    x = x.requires_grad_()
    W = W.requires_grad_()
    a = facex_arcface_loss(x, W, y, margin_arc=0.35, margin_am=margin_am, scale=32.0)
    b = facex_oracle(x, W, y, margin_arc=0.35, margin_am=margin_am, scale=32.0)
    close(a, b)
    for ga, gb in zip(grads(a, x, W), grads(b, x, W)):
        close(ga, gb)


def _policy_rows(x, W, y, policy, m=0.35, s=32.0):
    return F.margin_softmax_loss(x, W, y, scale=s, m2=m, theta_policy=policy, reduction="none")


@pytest.mark.parametrize("margin_am", [0.0, 0.2])
def test_no_theta_policy_is_facex(margin_am):
    x, W, y = facex_batch()
    facex = facex_oracle(x, W, y, margin_arc=0.35, margin_am=margin_am, scale=32.0, reduction="none")
    past = torch.tensor([True, True, False, False, False, False, False, False])
    # rows short of π − m: "none" and "threshold" are FaceX-Zoo's margin branch
    for policy in ("none", "threshold"):
        rows = _policy_rows(x, W, y, policy)
        close(rows[~past], facex[~past])
        assert (rows[past] - facex[past]).abs().min() > 0.1
    # "threshold" = the same head with the fall-back c − m·sin(m) instead of c − margin_am
    m = 0.35
    thr = facex_oracle(x, W, y, margin_arc=m, margin_am=margin_am, scale=32.0, reduction="none",
                       fallback=lambda c: c - m * math.sin(m))
    close(_policy_rows(x, W, y, "threshold"), thr)
    # "easy" drops the margin on row 2 (π/2 < θ < π − m), where FaceX-Zoo keeps cos(θ + m)
    easy = _policy_rows(x, W, y, "easy")
    assert (easy[2] - facex[2]).abs() > 0.1
    if margin_am == 0.0:  # ... and on the rows past π − m it gives c, as FaceX-Zoo with margin_am = 0
        close(easy[past], facex[past])
    else:
        assert (easy[past] - facex[past]).abs().min() > 0.1


def _target_from_two_class_loss(loss, c_neg, s):
    """With two classes ℓ = softplus(s·(c_neg − f)): recover the target value f."""
    return c_neg - torch.log(torch.expm1(loss)) / s


def test_fallback_values_at_a_row_past_pi_minus_m():
    """Past π − m the target is: FaceX-Zoo c − margin_am; "threshold" c − m·sin(m) − m3;
    "none" cos(θ + m). Just past the boundary (θ = π − m + 0.01, m = 0.35): −0.9428, −1.0628, −0.99995."""
    m, s = 0.35, 32.0
    theta = math.pi - m + 0.01
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    x = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=DT)
    y = torch.tensor([0])
    c, c_neg = math.cos(theta), math.sin(theta)
    f = {p: _target_from_two_class_loss(_policy_rows(x, W, y, p, m, s), c_neg, s).item()
         for p in ("none", "threshold")}
    f["facex"] = _target_from_two_class_loss(facex_arcface_loss(x, W, y, margin_arc=m, scale=s), c_neg, s).item()
    assert abs(f["facex"] - c) < 1e-10
    assert abs(f["threshold"] - (c - m * math.sin(m))) < 1e-10
    assert abs(f["none"] - math.cos(theta + m)) < 1e-10
    assert round(f["facex"], 4) == -0.9428 and round(f["threshold"], 4) == -1.0628
    assert round(f["none"], 5) == -0.99995
