"""Issue 16, "beyond the seeds": AdaFace, CurricularFace, MagFace, sub-center ArcFace and inter-class
filtering, on the reference and on every fused CPU backend.

1. The reference equals each paper's formula as its authors' code computes it (written here from
   the papers and the released code's arithmetic, materialised, in float64), loss and gradients.
2. Each head equals its reference in float64 to 1e-10 on torch and native, at odd shapes with
   ignored rows, including its running state (AdaFace's μ, σ; CurricularFace's t) over steps.
3. Differentiable per-row margins: ``dL/dm2``, ``dL/dm3`` from the fused pass equal the reference's
   and pass ``torch.autograd.gradcheck``.
4. A 20-step CPU training loop's loss falls for each head, on each backend.
5. Sub-center ArcFace's cleaning step (dominant sub-centres, the 75° keep mask).

The Triton backend (interpreted) is held to the reference in tests/test_triton_extensions.py and
below (``test_heads_on_interpreted_triton``); the sharded twins in tests/test_distributed_extensions.py;
the memory contract at C = 400,000 in tests/test_memory_contract.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fusedface
from fusedface import functional as F_
from fusedface import reference as R

CPU_FUSED = [pytest.param(b, marks=() if b in fusedface.available_backends() else pytest.mark.skip(
    reason=f"backend {b!r} is not available here (available: {', '.join(fusedface.available_backends())})"))
    for b in ("torch", "native")]

B, D, C = 37, 19, 53


def _data(seed=0, K=1, scale_x=1.0, ignored=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C * K, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    x[:12] = W[y[:12] * K] * 2.0 + 0.3 * x[:12]  # rows near their (first) centre: hard negatives, margins active
    x = x * scale_x * (0.5 + torch.rand(B, 1, generator=g, dtype=dtype))  # norms spread (AdaFace, MagFace)
    if ignored:
        y[::7] = -1
    return x, W, y


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _close(a, b, tol):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0), err


# ------------------------------------------------------------------------- 1. the authors' formulas

def _official_adaface(emb_n, norms, W_t, label, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """AdaFace as mk-minchul/AdaFace's head computes it (kernel [D, C], normalised embeddings and
    their norms given separately): every cosine clamped to ±(1 − eps), the EMA updated first."""
    kernel_norm = W_t / W_t.norm(dim=0, keepdim=True)
    cosine = (emb_n @ kernel_norm).clamp(-1 + eps, 1 - eps)
    safe = norms.clamp(0.001, 100).detach()
    with torch.no_grad():
        state["mean"] = safe.mean() * t_alpha + (1 - t_alpha) * state["mean"]
        state["std"] = safe.std() * t_alpha + (1 - t_alpha) * state["std"]
    scaler = ((safe - state["mean"]) / (state["std"] + eps) * h).clip(-1, 1)
    onehot = torch.zeros_like(cosine).scatter_(1, label[:, None], 1.0)
    theta = cosine.acos()
    theta_m = (theta + onehot * (-m * scaler)[:, None]).clip(eps, math.pi - eps)
    logits = (theta_m.cos() - onehot * (m + m * scaler)[:, None]) * s
    return F.cross_entropy(logits, label)


def test_adaface_reference_is_the_authors_formula():
    """Cosines inside ±(1 − 1e-3) (where the authors' clamp of the negatives is inactive: the one
    documented difference, docs/differences.md): loss, gradients and the running statistics agree."""
    x, W, y = _data(1, scale_x=20.0, ignored=False)
    x.requires_grad_(True), W.requires_grad_(True)
    state = {"mean": torch.tensor(20.0, dtype=torch.float64), "std": torch.tensor(100.0, dtype=torch.float64)}
    want = _official_adaface(x / x.norm(dim=1, keepdim=True), x.norm(dim=1), W.t(), y, state)
    head = fusedface.AdaFace(D, C, backend="reference", dtype=torch.float64)
    head.batch_mean.fill_(20.0), head.batch_std.fill_(100.0)
    with torch.no_grad():
        head.weight.copy_(W)
    got = head(x, y)
    _close(got, want, 1e-12)
    for a, b in zip(_grads(got, [x, head.weight]), _grads(want, [x, W])):
        _close(a, b, 1e-12)
    _close(head.batch_mean, state["mean"], 1e-12), _close(head.batch_std, state["std"], 1e-12)


def _official_curricular(emb, W_t, label, t, m=0.5, s=64.0):
    """CurricularFace as HuangYG123/CurricularFace's head computes it; returns (loss, new t)."""
    cos = (F.normalize(emb, dim=1) @ F.normalize(W_t, dim=0)).clamp(-1, 1)
    target = cos[torch.arange(cos.shape[0]), label].view(-1, 1)
    sin = torch.sqrt(1.0 - target ** 2)
    cos_m = target * math.cos(m) - sin * math.sin(m)
    mask = cos > cos_m
    final = torch.where(target > math.cos(math.pi - m), cos_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        t = target.mean() * 0.01 + 0.99 * t
    hard = cos[mask]
    cos = cos.clone()
    cos[mask] = hard * (t + hard)
    cos = cos.scatter(1, label.view(-1, 1), final)
    return F.cross_entropy(cos * s, label), t


def test_curricular_reference_is_the_authors_formula():
    """Rows not past the threshold (θ + m ≤ π, where the authors' mask uses cos(θ + m) and
    fusedface's the final target: the same value there): loss, gradients and t over two steps."""
    x, W, y = _data(2, ignored=False)
    x.requires_grad_(True), W.requires_grad_(True)
    head = fusedface.CurricularFace(D, C, backend="reference", dtype=torch.float64)
    head.t.fill_(0.3)
    with torch.no_grad():
        head.weight.copy_(W)
    t = torch.tensor(0.3, dtype=torch.float64)
    for _ in range(2):
        want, t = _official_curricular(x, W.t(), y, t)
        got = head(x, y)
        _close(got, want, 1e-12)
        for a, b in zip(_grads(got, [x, head.weight]), _grads(want, [x, W])):
            _close(a, b, 1e-12)
        _close(head.t, t, 1e-12)


def _official_magface(x, W_t, label, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, s=64.0, easy=True):
    """MagFace as IrvingMeng/MagFace's MagLinear (easy_margin: its default, what the released trainers
    run; else the threshold branch) + MagLoss compute it."""
    x_norm = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    ada = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada), torch.sin(ada)
    cos = (F.normalize(x) @ F.normalize(W_t, dim=0)).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos ** 2)
    cos_theta_m = cos * cos_m - sin * sin_m
    if easy:
        cos_theta_m = torch.where(cos > 0, cos_theta_m, cos)
    else:
        mm = torch.sin(math.pi - ada) * ada
        cos_theta_m = torch.where(cos > torch.cos(math.pi - ada), cos_theta_m, cos - mm)
    onehot = torch.zeros_like(cos).scatter_(1, label.view(-1, 1), 1.0)
    logits = s * (onehot * cos_theta_m + (1 - onehot) * cos)
    g = (x_norm / u_a ** 2 + 1 / x_norm).mean()
    return F.cross_entropy(logits, label) + lambda_g * g


@pytest.mark.parametrize("policy", ["easy", "threshold"])
def test_magface_reference_is_the_authors_formula(policy):
    """Loss and gradients, through the norm-dependent margin and the regulariser (norms spread across
    [l_a, u_a] and beyond it, where the clamp stops the gradient); the default policy is the released
    trainers' easy margin, "threshold" the other branch of the same code."""
    x, W, y = _data(3, scale_x=15.0, ignored=False)
    x[20:] = -x[20:]  # rows with c_y <= 0 (where the policies differ)
    x.requires_grad_(True), W.requires_grad_(True)
    kw = {} if policy == "easy" else {"theta_policy": "threshold"}
    head = fusedface.MagFace(D, C, backend="reference", dtype=torch.float64, **kw)
    with torch.no_grad():
        head.weight.copy_(W)
    got, want = head(x, y), _official_magface(x, W.t(), y, easy=policy == "easy")
    _close(got, want, 1e-12)
    for a, b in zip(_grads(got, [x, head.weight]), _grads(want, [x, W])):
        _close(a, b, 1e-11)


def _official_subcenter_interclass(x, W, label, K, m=0.5, s=64.0, thr=None):
    """Sub-center ArcFace as InsightFace reshapes the fc output to (C, K) and takes the max, then
    PartialFC_V2's CombinedMarginLoss(64, 1, 0.5, 0, interclass_filtering_threshold=thr)."""
    logits = F.normalize(x) @ F.normalize(W).t()
    logits = logits.reshape(x.shape[0], -1, K).max(dim=2).values.clamp(-1, 1)
    if thr is not None:
        with torch.no_grad():
            dirty = (logits > thr).float()
            mask = torch.ones_like(logits).scatter_(1, label[:, None], 0)
            tensor_mul = 1 - dirty * mask
        logits = tensor_mul * logits
    target = logits[torch.arange(x.shape[0]), label]
    with torch.no_grad():
        theta = target.acos()
    final = torch.cos(theta + m)  # InsightFace's ArcFace branch: value cos(θ + m), gradient through it
    final = target + (final - target).detach() + (target - target.detach()) * (
        torch.sin(theta + m) / torch.sqrt((1 - target.detach() ** 2).clamp(min=1e-12)) - 1)
    logits = logits.scatter(1, label[:, None], final[:, None])
    return F.cross_entropy(logits * s, label)


@pytest.mark.parametrize("K,thr", [(3, None), (1, 0.3), (3, 0.2)])
def test_subcenter_and_interclass_reference_are_the_authors_formula(K, thr):
    x, W, y = _data(4, K=K, ignored=False)
    x.requires_grad_(True), W.requires_grad_(True)
    want = _official_subcenter_interclass(x, W, y, K, thr=thr)
    got = R.margin_softmax_loss(x, W, y, m2=0.5, subcenters=K, interclass_threshold=thr)
    _close(got, want, 1e-12)
    for a, b in zip(_grads(got, [x, W]), _grads(want, [x, W])):
        _close(a, b, 1e-11)


# ------------------------------------------------------------------------- 2. heads equal their reference

HEADS = {
    "adaface": (fusedface.AdaFace, {}, 20.0),
    "curricular": (fusedface.CurricularFace, {}, 1.0),
    "magface": (fusedface.MagFace, {}, 15.0),
    "subcenter": (fusedface.SubCenterArcFace, {"k": 3}, 1.0),
    "interclass": (fusedface.ArcFace, {"interclass_threshold": 0.2}, 1.0),
    "interclass-mv": (fusedface.MVSoftmax, {"interclass_threshold": 0.2, "margin_type": "arc"}, 1.0),
    "curricular-subcenter-filter": (fusedface.CurricularFace, {"subcenters": 2, "interclass_threshold": 0.4}, 1.0),
}


def _pair(name, backend, dtype=torch.float64):
    cls, kw, scale_x = HEADS[name]
    ref = cls(D, C, backend="reference", dtype=dtype, **kw)
    fused = cls(D, C, backend=backend, dtype=dtype, **kw)
    K = ref.options.subcenters
    x, W, y = _data(5, K=K, scale_x=scale_x, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(W)
    fused.load_state_dict(ref.state_dict())
    return ref, fused, x, y


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_heads_equal_their_reference_fp64(name, backend):
    """Three training-mode steps (running statistics move), odd shapes, ignored rows, several tiles."""
    ref, fused, x, y = _pair(name, backend)
    for step in range(3):
        xs = (x * (1.0 + 0.1 * step)).requires_grad_(True)
        xf = xs.detach().clone().requires_grad_(True)
        lr, lf = ref(xs, y), fused(xf, y)
        _close(lf, lr, 1e-10)
        gr, gf = _grads(lr, [xs, ref.weight]), _grads(lf, [xf, fused.weight])
        for a, b in zip(gf, gr):
            _close(a, b, 1e-10)
        for (n, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
            assert torch.equal(a, b), n
        assert torch.equal(fused.last_accuracy, ref.last_accuracy)
        assert torch.equal(fused.last_sv_fraction, ref.last_sv_fraction)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_heads_fp32_and_eval_mode(backend):
    """fp32 on the fused backends against the fp64 reference (1e-5 relative), and eval mode leaves
    the running statistics alone."""
    for name in HEADS:
        ref, fused, x, y = _pair(name, backend, dtype=torch.float64)
        f32 = copy.deepcopy(fused).float()
        lf = f32(x.float(), y)
        lr = ref(x, y)
        _close(lf.double(), lr, 1e-5)
        f32.eval()
        before = {n: b.clone() for n, b in f32.named_buffers()}
        f32(x.float(), y)
        for n, b in f32.named_buffers():
            assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("grad_mode", ["exact", "straight_through"])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_clip_at_clamped_target_cosines(grad_mode, backend):
    """Rows whose target cosine lies beyond ±(1 − ε), where the clip's clamp acts: "exact" gives them
    no target gradient, "straight_through" passes dT/dc = 1 through the clamp as the reference does
    (a property-test counterexample: the engine once gated straight-through slopes by the clip)."""
    x, W, y = _data(8, ignored=False)
    x[:6] = W[y[:6]] * 3.0 + 1e-3 * x[:6]          # cos ≈ 1 − 1e-7: beyond 1 − ε
    x[6:9] = -W[y[6:9]] * 2.0 + 1e-3 * x[6:9]      # cos ≈ −1: beyond −1 + ε
    cy = F.cosine_similarity(x, W[y], dim=1)
    assert bool((cy[:6] > 1 - 1e-3).all()) and bool((cy[6:9] < -1 + 1e-3).all())
    out = []
    for be in ("reference", backend):
        xg, Wg = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = F_.margin_softmax_loss(xg, Wg, y, scale=16.0, m2=0.4, theta_policy="clip", grad_mode=grad_mode,
                                      backend=be)
        out.append((loss,) + _grads(loss, [xg, Wg]))
    for a, b in zip(out[1], out[0]):
        _close(a, b, 1e-10)
    # the two modes differ exactly on those rows' target gradient
    other = "exact" if grad_mode == "straight_through" else "straight_through"
    xg = x.clone().requires_grad_(True)
    dx_other, = _grads(F_.margin_softmax_loss(xg, W, y, scale=16.0, m2=0.4, theta_policy="clip",
                                              grad_mode=other, backend=backend), [xg])
    assert float((dx_other[:9] - out[1][1][:9]).abs().max()) > 1e-6


# ------------------------------------------------------------------------- 3. differentiable margins

@pytest.mark.parametrize("policy", ["none", "threshold", "easy", "clip"])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_margin_gradients_equal_the_reference(policy, backend):
    x, W, y = _data(6)
    g = torch.Generator().manual_seed(1)
    m2 = (0.3 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_(True)
    m3 = (0.2 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_(True)
    kw = dict(theta_policy=policy, tile_size=16)
    out = []
    for be in ("reference", backend):
        a2, a3 = m2.detach().clone().requires_grad_(True), m3.detach().clone().requires_grad_(True)
        loss = F_.margin_softmax_loss(x, W, y, m2=a2, m3=a3, backend=be, **{k: v for k, v in kw.items()
                                                                          if be != "reference" or k != "tile_size"})
        out.append(_grads(loss, [a2, a3]))
    for a, b in zip(out[1], out[0]):
        _close(a, b, 1e-10)
    assert float(out[0][0].abs().max()) > 0  # the margins do get a gradient


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_margin_gradcheck(backend):
    x, W, y = _data(7)
    x, W = x[:9], W[:11]
    y = torch.tensor([0, 3, -1, 10, 5, 5, 2, 7, 1])
    xg = x.clone().requires_grad_(True)
    m2 = torch.linspace(0.2, 0.7, 9, dtype=torch.float64).requires_grad_(True)
    m3 = torch.linspace(0.0, 0.3, 9, dtype=torch.float64).requires_grad_(True)
    fn = lambda xx, a, b: F_.margin_softmax_loss(xx, W, y, m2=a, m3=b, scale=8.0, backend=backend,  # noqa: E731
                                                 reduction="sum", theta_policy="threshold")
    assert torch.autograd.gradcheck(fn, (xg, m2, m3), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- 4. training loops

@pytest.mark.parametrize("name", ["adaface", "curricular", "magface", "subcenter", "interclass"])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_twenty_step_training_loss_falls(name, backend):
    torch.manual_seed(0)
    cls, kw, scale_x = HEADS[name]
    head = cls(16, 40, backend=backend, **kw)
    backbone = torch.nn.Linear(24, 16)
    data = torch.randn(128, 24)
    labels = torch.randint(0, 40, (128,))
    labels[::11] = -1
    # (MagFace's regulariser grows the norms, and with them the margins: a smaller step)
    lr = 0.03 if name == "magface" else 0.1
    opt = torch.optim.SGD(list(head.parameters()) + list(backbone.parameters()), lr=lr, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = head(backbone(data) * scale_x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------------- 5. sub-center cleaning

def test_subcenter_cleaning_step():
    torch.manual_seed(0)
    head = fusedface.SubCenterArcFace(8, 5, k=3, backend="torch", dtype=torch.float64)
    W = head.weight.detach().view(5, 3, 8)
    y = torch.arange(5).repeat_interleave(6)
    pick = torch.tensor([0, 0, 0, 0, 1, 2] * 5)  # sub-centre 0 dominant in every class
    x = W[y, pick] + 1e-4 * torch.randn(30, 8, dtype=torch.float64)
    x[5] = -W[y[5], 0]  # a row opposite its dominant sub-centre: noise, dropped at 75°
    counts = head.nearest_counts(x[:15], y[:15])
    counts = head.nearest_counts(x[15:], y[15:], counts)
    assert counts.sum() == 30 and torch.equal(head.dominant(counts), torch.zeros(5, dtype=torch.long))
    keep = head.keep_mask(x, y, counts)
    assert not keep[5] and keep[0] and not keep[4] == bool(W[0, 1] @ W[0, 0] / (W[0, 1].norm() * W[0, 0].norm())
                                                           < math.cos(math.radians(75)))
    single = head.drop_non_dominant(counts)
    assert isinstance(single, fusedface.ArcFace) and single.weight.shape == (5, 8)
    assert torch.equal(single.weight.detach(), W[:, 0])
    yk = y.clone()
    yk[~keep] = -1
    assert torch.isfinite(single(x, yk))


def test_subcenter_needs_whole_classes():
    with pytest.raises(ValueError, match="not a multiple of subcenters=3"):
        F_.margin_softmax_loss(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 0]), subcenters=3,
                               backend="torch")
    with pytest.raises(ValueError, match=r"outside \[0, C=3\)"):
        F_.margin_softmax_loss(torch.randn(4, 8), torch.randn(9, 8), torch.tensor([0, 1, 3, 0]), subcenters=3,
                               backend="torch")


# ------------------------------------------------------------------------- 6. with the in-backward optimizer

@pytest.mark.parametrize("name", ["subcenter", "curricular-subcenter-filter", "magface", "adaface"])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_in_backward_sgd_equals_torch_optim(name, backend):
    """fusedface.optim.SGD (the update inside the fused backward, slice by slice: whole classes of
    sub-centres per slice) against torch.optim.SGD on the same head, five fp64 steps."""
    import fusedface._inbackward as IB

    ref, fused, x, y = _pair(name, backend)
    ref = copy.deepcopy(fused)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = fusedface.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    old = IB.SLICE_BYTES
    IB.SLICE_BYTES = 7 * D * 8  # several slices per backward (7 rows: not a multiple of the sub-centres)
    try:
        for _ in range(5):
            xr = x.clone().requires_grad_(True)
            xf = x.clone().requires_grad_(True)
            ref_opt.zero_grad()
            ref(xr, y).backward()
            ref_opt.step()
            opt.zero_grad()
            fused(xf, y).backward()
            opt.step()
            _close(xf.grad, xr.grad, 1e-10)
    finally:
        IB.SLICE_BYTES = old
    _close(fused.weight.detach(), ref.weight.detach(), 1e-10)


@pytest.mark.parametrize("kw", [dict(negative="curricular", t=0.3, theta_policy="threshold", m2=0.5),
                                dict(theta_policy="clip", m2=-0.1, m3=0.45), dict(interclass_threshold=0.1, m2=0.3),
                                dict(subcenters=3, m2=0.5), dict(subcenters=2, negative="curricular", t=0.1,
                                                                 interclass_threshold=0.2, m2=0.4)],
                         ids=["curricular", "clip", "interclass", "subcenter", "all"])
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_gradcheck_x_and_w(kw, backend):
    """float64 ``torch.autograd.gradcheck`` of the fused loss in ``x`` and ``W`` (away from the
    switches: the filter threshold, the support-vector mask and sub-centre ties are piecewise)."""
    g = torch.Generator().manual_seed(11)
    K = kw.get("subcenters", 1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    W = torch.randn(7 * K, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 3, -1, 6, 2, 2])
    fn = lambda a, b: F_.margin_softmax_loss(a, b, y, scale=4.0, backend=backend, tile_size=3, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------- 6. running state, edge cases

def _stat_heads(dtype=torch.float64):
    return {"adaface": fusedface.AdaFace(D, C, dtype=dtype, backend="torch"),
            "curricular": fusedface.CurricularFace(D, C, dtype=dtype, backend="torch")}


def _state(head):
    return {k: v.clone() for k, v in head.named_buffers()}


@pytest.mark.parametrize("name", ["adaface", "curricular"])
def test_running_statistics_skip_ignored_and_nonfinite_rows(name):
    """A NaN embedding on an ignored row, or on a valid one (an fp16 overflow GradScaler will skip),
    takes no part in AdaFace's μ, σ or CurricularFace's t: the state equals that of the same batch
    without the row, and stays finite for the next steps."""
    x, _, y = _data(9, ignored=False)
    y[::5] = -1
    clean = _stat_heads()[name]
    full, bad_ignored, bad_valid = (copy.deepcopy(clean) for _ in range(3))
    xi = x.clone()
    xi[0] = float("nan")                       # row 0 is ignored (y[0] = -1)
    assert torch.isfinite(bad_ignored(xi, y))  # an ignored row does not reach the loss through its margin
    full(x, y)
    keep = torch.ones(B, dtype=torch.bool)
    keep[1] = False
    xv = x.clone()
    xv[1] = float("nan")                       # row 1 is valid
    assert torch.isnan(bad_valid(xv, y))       # NaN in, NaN out
    clean(x[keep], y[keep])
    for head, ref in ((bad_ignored, full), (bad_valid, clean)):
        for k, v in _state(head).items():
            assert torch.isfinite(v).all(), k
            torch.testing.assert_close(v, _state(ref)[k], rtol=1e-12, atol=0)
    assert any(not torch.equal(v, _state(full)[k]) for k, v in _state(clean).items())  # the row did count


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_running_statistics_stay_fp32_when_the_head_is_cast(cast):
    """``head.to(bf16)`` keeps μ, σ and t in fp32, where an EMA step of weight 0.01 still moves them;
    a cast to fp64 follows the head."""
    for name, ref in _stat_heads(torch.float32).items():
        names = ("batch_mean", "batch_std") if name == "adaface" else ("t",)
        head = copy.deepcopy(ref)
        before = {n: getattr(head, n).clone() for n in names}
        head.to(cast)
        ref.weight.data.copy_(head.weight.float())
        assert head.weight.dtype == cast
        for n in names:
            assert getattr(head, n).dtype == torch.float32, (name, n)
            assert torch.equal(getattr(head, n), before[n])  # the value is not rounded through the cast
        x, _, y = _data(10, ignored=False, dtype=torch.float32)
        x = x.to(cast) * 20
        for _ in range(200):
            head(x, y)
        for _ in range(200):
            ref(x.float(), y)
        for n in names:  # the bf16 batch's own statistics differ from fp32 only by the rounding of x
            torch.testing.assert_close(getattr(head, n), getattr(ref, n), rtol=2e-2, atol=2e-3)
        head.double()
        assert all(getattr(head, n).dtype == torch.float64 for n in names)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_curricular_batch_of_one_twice_before_backward(backend):
    """Two training calls of a one-row batch before one backward: the op keeps its own copy of ``t``
    (the second call updates the buffer in place)."""
    head = fusedface.CurricularFace(D, C, dtype=torch.float64, backend=backend)
    x, _, y = _data(11, ignored=False)
    xg = x[:1].clone().requires_grad_(True)
    loss = head(xg, y[:1]) + head(xg, y[:1])
    loss.backward()
    assert torch.isfinite(xg.grad).all()


def test_heads_refuse_what_they_compute_themselves():
    for cls, kw, name in [(fusedface.AdaFace, {"m2": 0.3}, "m2"), (fusedface.AdaFace, {"m3": 0.1}, "m3"),
                          (fusedface.MagFace, {"m2": 0.5}, "m2"), (fusedface.MagFace, {"m3": 0.5}, "m3"),
                          (fusedface.CurricularFace, {"t": 0.2}, "t")]:
        with pytest.raises(TypeError, match=f"computes {name} itself"):
            cls(D, C, **kw)
    for k in (0, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            fusedface.SubCenterArcFace(D, C, k=k)
    assert "m2=m3=per row" in repr(fusedface.AdaFace(D, C))
    assert "m2=per row" in repr(fusedface.MagFace(D, C))
    r = repr(fusedface.CurricularFace(D, C))
    assert "negative='curricular'" in r and "t=" not in r.replace("momentum", "")


def test_interclass_threshold_one_filters_nothing():
    """The filter is strict on cosines clamped to [-1, 1]: a threshold of 1 drops nothing, and keeps
    the options in the seed family (the Triton step), with the loss of no filtering."""
    from fusedface._options import MarginOptions
    assert MarginOptions(interclass_threshold=1.0).seed_family
    assert not MarginOptions(interclass_threshold=0.999).seed_family
    x, W, y = _data(12)
    x[:5] = W[y[:5]]  # cosines of exactly 1 on the label column, and duplicates make more 1s likely
    for be in ("reference", "torch"):
        a = F_.margin_softmax_loss(x, W, y, m2=0.5, interclass_threshold=1.0, backend=be)
        b = F_.margin_softmax_loss(x, W, y, m2=0.5, backend=be)
        assert torch.equal(a, b)
