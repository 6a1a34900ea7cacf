"""Every bad input at the public boundary, with the error it must raise (issue 8).

One place per check: the functional API (``margin_softmax_loss``, ``npt_loss``) on every backend
available here (the reference validates on its own path, the fused backends share the functional
boundary), the heads, and the opt-in value checks of :func:`fusedface.set_input_checks`. Each case
says which exception and which words of the message (the argument's name and the fix) it expects.

Devices: the CPU-only suite moves tensors to the ``meta`` device to exercise the device checks
(they compare devices before any value is read); the GPU cases run where CUDA is present.
"""
from __future__ import annotations

import pytest
import torch

import fusedface
import fusedface as ff
from conftest import backend_names
from fusedface import functional as F_

# reference, torch, native where built, triton (interpreted: skipped with the reason where it cannot run)
BACKENDS = backend_names()
FUSED = backend_names(fused=True)
B0, D0, C0 = 4, 6, 9


def _xy(B=B0, D=D0, C=C0, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, D, generator=g, dtype=dtype), torch.randn(C, D, generator=g, dtype=dtype),
            torch.tensor([0, 3, 8, 1])[:B])


META = torch.device("meta")

# (what replaces the default x / W / y or which keyword is added, exception, regex of the message)
MARGIN_BAD = [
    # shapes
    pytest.param(dict(x=torch.randn(4)), ValueError, r"x \(embeddings\) must be 2-D", id="x-1d"),
    pytest.param(dict(x=torch.randn(4, 6, 1)), ValueError, r"x \(embeddings\) must be 2-D", id="x-3d"),
    pytest.param(dict(W=torch.randn(9)), ValueError, r"W \(class centres\) must be 2-D", id="W-1d"),
    pytest.param(dict(W=torch.randn(9, 5)), ValueError, r"D=6 .*D=5", id="D-mismatch"),
    pytest.param(dict(W=torch.randn(6, 9)), ValueError, r"\[D, C\].*pass W\.t\(\)", id="W-transposed-pml-layout"),
    pytest.param(dict(y=torch.zeros(3, dtype=torch.long)), ValueError, r"y \(labels\).*length B=4", id="y-wrong-length"),
    pytest.param(dict(y=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"y \(labels\) must be 1-D", id="y-2d"),
    pytest.param(dict(x=torch.randn(0, 6), y=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch",
                 id="empty-batch"),
    pytest.param(dict(W=torch.randn(0, 6)), ValueError, r"no classes \(C = 0\)", id="no-classes"),
    pytest.param(dict(x=torch.randn(4, 0), W=torch.randn(9, 0)), ValueError, r"no features \(D = 0\)", id="no-features"),
    pytest.param(dict(m2=torch.zeros(3)), ValueError, r"m2 .*per-row, shape \[B=4\]", id="m2-wrong-length"),
    pytest.param(dict(m3=torch.zeros(4, 1)), ValueError, r"m3 .*per-row", id="m3-2d"),
    # types and dtypes
    pytest.param(dict(x=[[0.0] * 6] * 4), TypeError, r"x \(embeddings\) must be a torch\.Tensor", id="x-list"),
    pytest.param(dict(W="centres"), TypeError, r"W \(class centres\) must be a torch\.Tensor", id="W-str"),
    pytest.param(dict(y=[0, 3, 8, 1]), TypeError, r"y \(labels\) must be a torch\.Tensor", id="y-list"),
    pytest.param(dict(y=torch.zeros(4)), TypeError, r"integer tensor.*y\.long\(\)", id="y-float"),
    pytest.param(dict(y=torch.zeros(4, dtype=torch.bool)), TypeError, "integer tensor", id="y-bool"),
    pytest.param(dict(x=torch.randint(0, 3, (4, 6))), TypeError, r"x \(embeddings\) must be floating", id="x-int"),
    pytest.param(dict(W=torch.randint(0, 3, (9, 6))), TypeError, r"W \(class centres\) must be floating", id="W-int"),
    pytest.param(dict(x=torch.randn(4, 6, dtype=torch.complex64)), TypeError, "floating point", id="x-complex"),
    pytest.param(dict(m2=torch.zeros(4, dtype=torch.long)), TypeError, "m2 must be a floating-point tensor", id="m2-int-tensor"),
    pytest.param(dict(m2=torch.tensor(1)), TypeError, "m2 must be a floating-point tensor", id="m2-int-0d-tensor"),
    pytest.param(dict(m2=torch.full((4,), float("nan"))), ValueError, "m2 holds NaN or Inf", id="m2-nan-tensor"),
    pytest.param(dict(m3=torch.tensor(float("inf"))), ValueError, "m3 holds NaN or Inf", id="m3-inf-0d-tensor"),
    pytest.param(dict(y=torch.tensor([0, 3, 8, 1], dtype=torch.uint8)), TypeError, r"signed integer.*y\.long\(\)",
                 id="y-uint8"),
    pytest.param(dict(m2=True), TypeError, "m2 must be a float or a Tensor", id="m2-bool"),
    pytest.param(dict(m3="0.35"), TypeError, "m3 must be a float or a Tensor", id="m3-str"),
    pytest.param(dict(m2=float("nan")), ValueError, "m2 must be finite", id="m2-nan"),
    pytest.param(dict(m3=float("inf")), ValueError, "m3 must be finite", id="m3-inf"),
    pytest.param(dict(ignore_index=-1.0), TypeError, "ignore_index must be an int", id="ignore-index-float"),
    # devices (the meta device stands in for a second device: no value is read before the check)
    pytest.param(dict(x=torch.randn(4, 6, device=META)), ValueError, r"x is on meta but W is on cpu.*same device",
                 id="x-other-device"),
    pytest.param(dict(y=torch.zeros(4, dtype=torch.long, device=META)), ValueError,
                 r"y \(labels\) is on meta.*y\.to\(x\.device\)", id="y-other-device"),
    pytest.param(dict(m2=torch.zeros(4, device=META)), ValueError, r"m2 is on meta.*move it", id="m2-other-device"),
    # label values (checked on CPU always; on GPU behind set_input_checks)
    pytest.param(dict(y=torch.tensor([0, 1, 9, 2])), ValueError, r"outside \[0, C=9\).*row 2: 9", id="label-equals-C"),
    pytest.param(dict(y=torch.tensor([0, -5, 1, 2])), ValueError, r"ignore_index=-1.*row 1: -5", id="label-negative"),
    pytest.param(dict(y=torch.tensor([0, -1, 1, 2]), ignore_index=-100), ValueError, r"ignore_index=-100.*row 1: -1",
                 id="minus-one-is-not-the-ignore-index"),
    # options
    pytest.param(dict(scale=0.0), ValueError, "scale must be > 0", id="scale-zero"),
    pytest.param(dict(scale=-64.0), ValueError, "scale must be > 0", id="scale-negative"),
    pytest.param(dict(scale=float("nan")), ValueError, "scale must be finite", id="scale-nan"),
    pytest.param(dict(scale=None), TypeError, "scale must be a real number", id="scale-none"),
    pytest.param(dict(m1=float("inf")), ValueError, "m1 must be finite", id="m1-inf"),
    pytest.param(dict(theta_policy="clamp"), ValueError, r"theta_policy='clamp'.*'none', 'threshold', 'easy', 'clip'",
                 id="policy"),
    pytest.param(dict(interclass_threshold=1.5), ValueError, r"interclass_threshold must be a cosine in \[-1, 1\]",
                 id="interclass-range"),
    pytest.param(dict(interclass_threshold=float("nan")), ValueError, "interclass_threshold must be finite",
                 id="interclass-nan"),
    pytest.param(dict(subcenters=0), ValueError, "subcenters must be an int >= 1", id="subcenters-0"),
    pytest.param(dict(subcenters=2), ValueError, "not a multiple of subcenters=2", id="subcenters-rows"),
    pytest.param(dict(t=torch.tensor(0.1)), TypeError, "t must be a float for negative='none'", id="t-tensor"),
    pytest.param(dict(negative="hard"), ValueError, r"negative='hard'.*'sv'", id="rewrite"),
    pytest.param(dict(grad_mode="ste"), ValueError, r"grad_mode='ste'.*'straight_through'", id="grad-mode"),
    pytest.param(dict(reduction="avg"), ValueError, r"reduction='avg'.*'mean'", id="reduction"),
    pytest.param(dict(negative="sv", t=0.5), ValueError, "t must be >= 1 for negative='sv'", id="sv-t-below-1"),
    pytest.param(dict(negative="mv_fixed", t=-0.1), ValueError, "t must be >= 0", id="mv-fixed-t-negative"),
    pytest.param(dict(negative="mv_adaptive", t=-0.1), ValueError, "t must be >= 0", id="mv-adaptive-t-negative"),
    pytest.param(dict(negative="sv", t=float("nan")), ValueError, "t must be finite", id="t-nan"),
    pytest.param(dict(backend="cuda"), ValueError, r"backend='cuda' is unknown.*'auto'.*'torch'", id="backend-unknown"),
]


def _call(fn, bad, backend):
    x, W, y = _xy()
    args = dict(x=x, W=W, y=y)
    kw = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    kw.setdefault("backend", backend)
    return fn(args["x"], args["W"], args["y"], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc,match", MARGIN_BAD)
def test_margin_softmax_bad_input(bad, exc, match, backend):
    with pytest.raises(exc, match=match):
        _call(F_.margin_softmax_loss, bad, backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("tile", [0, -3, True, 2.5])
def test_tile_size_must_be_a_positive_int(tile, backend):
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        _call(F_.margin_softmax_loss, dict(tile_size=tile), backend)


NPT_BAD = [
    pytest.param(dict(k=9), ValueError, r"k=9 .*at least k \+ 1 classes.*k <= 8", id="k-above-C-minus-1"),
    pytest.param(dict(k=0), ValueError, "k must be an int >= 1", id="k-zero"),
    pytest.param(dict(k=2.0), ValueError, "k must be an int >= 1", id="k-float"),
    pytest.param(dict(k=17), ValueError, "k <= 16", id="k-above-16"),
    pytest.param(dict(delta=float("nan")), ValueError, "delta must be finite", id="delta-nan"),
    pytest.param(dict(r=float("inf")), ValueError, "r must be finite", id="r-inf"),
    pytest.param(dict(reduction="max"), ValueError, "reduction='max'", id="reduction"),
    pytest.param(dict(y=torch.tensor([0, 1, 9, 2])), ValueError, r"outside \[0, C=9\).*row 2: 9", id="label-out-of-range"),
    pytest.param(dict(W=torch.randn(9, 5)), ValueError, r"D=6 .*D=5", id="D-mismatch"),
    pytest.param(dict(x=torch.randn(0, 6), y=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch", id="empty-batch"),
    pytest.param(dict(y=torch.zeros(4)), TypeError, "integer tensor", id="y-float"),
    pytest.param(dict(backend="gpu"), ValueError, "backend='gpu' is unknown", id="backend-unknown"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc,match", NPT_BAD)
def test_npt_bad_input(bad, exc, match, backend):
    with pytest.raises(exc, match=match):
        _call(F_.npt_loss, bad, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_npt_k_equal_to_C_minus_1_is_accepted(backend):
    x, W, y = _xy()
    assert torch.isfinite(F_.npt_loss(x, W, y, k=8, backend=backend)), backend


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_missing_backend_says_what_exists_and_how_to_get_it(backend):
    if backend in fusedface.available_backends():
        pytest.skip(f"{backend} is available in this installation, so there is no error to check")
    x, W, y = _xy()
    with pytest.raises(RuntimeError, match=r"available: reference, torch.*(pip install|TRITON_INTERPRET)"):
        F_.margin_softmax_loss(x, W, y, backend=backend)


# ------------------------------------------------------------------ opt-in value checks

@pytest.fixture
def input_checks():
    fusedface.set_input_checks(True)
    yield
    fusedface.set_input_checks(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,value", [("x", float("nan")), ("x", float("inf")), ("W", float("nan")), ("W", float("-inf"))])
def test_input_checks_reject_non_finite_inputs(where, value, backend, input_checks):
    x, W, y = _xy()
    (x if where == "x" else W)[1, 2] = value
    name = "x (embeddings)" if where == "x" else "W (class centres)"
    with pytest.raises(ValueError, match=rf"{name.replace('(', '[(]').replace(')', '[)]')} holds NaN or Inf"):
        F_.margin_softmax_loss(x, W, y, m2=0.5, backend=backend)
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        F_.npt_loss(x, W, y, backend=backend)


def test_input_checks_are_off_by_default():
    assert not fusedface._validate.input_checks_enabled()
    x, W, y = _xy()
    x[1, 2] = float("nan")
    assert torch.isnan(F_.margin_softmax_loss(x, W, y, backend="torch")), "without checks a NaN input gives a NaN loss"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: label values on a GPU are checked "
                    "only behind fusedface.set_input_checks(True)")
def test_gpu_labels_checked_behind_input_checks(input_checks):
    x, W, _ = _xy()
    y = torch.tensor([0, 1, 9, 2])
    for backend in fusedface.available_backends("cuda"):
        with pytest.raises(ValueError, match=r"outside \[0, C=9\).*row 2: 9"):
            F_.margin_softmax_loss(x.cuda(), W.cuda(), y.cuda(), backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to observe host synchronisations")
def test_gpu_default_path_never_synchronises():
    """With checks off (the default), forward and backward on CUDA make no host synchronisation:
    ``torch.cuda.set_sync_debug_mode("error")`` turns any sync into an error."""
    x, W, y = (t.cuda() for t in _xy())
    for backend in [b for b in fusedface.available_backends("cuda") if b != "reference"]:
        for fn, kw in ((F_.margin_softmax_loss, dict(m2=0.5)), (F_.npt_loss, dict(k=2))):
            xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
            fn(xx, WW, y, backend=backend, **kw)  # warm-up: lazy initialisation may sync once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn(xx, WW, y, backend=backend, **kw).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------ heads

HEAD_CTOR_BAD = [
    pytest.param(lambda: ff.ArcFace(0, 10), ValueError, "in_features and out_features must be >= 1", id="in-features-0"),
    pytest.param(lambda: ff.CosFace(8, 0), ValueError, "in_features and out_features must be >= 1", id="out-features-0"),
    pytest.param(lambda: ff.ArcFace(4, 4, theta_policy="clamp"), ValueError, "theta_policy='clamp'", id="policy"),
    pytest.param(lambda: ff.AdaFace(4, 4, t_alpha=2.0), ValueError, "t_alpha must be in", id="adaface-alpha"),
    pytest.param(lambda: ff.CurricularFace(4, 4, momentum=-1), ValueError, "momentum must be in", id="curricular-momentum"),
    pytest.param(lambda: ff.MagFace(4, 4, l_a=50, u_a=10), ValueError, "0 < l_a < u_a", id="magface-range"),
    pytest.param(lambda: ff.SubCenterArcFace(4, 4, k=0), ValueError, "k must be an int >= 1", id="subcenter-k"),
    pytest.param(lambda: ff.CosFace(4, 4, scale=0), ValueError, "scale must be > 0", id="scale"),
    pytest.param(lambda: ff.CombinedMargin(4, 4, grad_mode="st"), ValueError, "grad_mode='st'", id="grad-mode"),
    pytest.param(lambda: ff.SVSoftmax(4, 4, t=0.9), ValueError, "t must be >= 1", id="sv-t"),
    pytest.param(lambda: ff.MVSoftmax(4, 4, margin_type="sphere"), ValueError, "margin_type='sphere'", id="margin-type"),
    pytest.param(lambda: ff.MVSoftmax(4, 4, negative="mv_fixed", t=-1.0), ValueError, "t must be >= 0", id="mv-t"),
    pytest.param(lambda: ff.NPT(4, 5, k=5), ValueError, "k=5 needs at least k", id="npt-k"),
    pytest.param(lambda: ff.OTFace(4, 5, ot_eps=0.0), ValueError, "ot_eps must be > 0", id="ot-eps"),
    pytest.param(lambda: ff.ArcFace(4, 4, reduction="avg"), ValueError, "reduction='avg'", id="reduction"),
]


@pytest.mark.parametrize("make,exc,match", HEAD_CTOR_BAD)
def test_head_constructor_bad_options(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


HEADS = [
    pytest.param(lambda be: ff.ArcFace(6, 9, backend=be), id="ArcFace"),
    pytest.param(lambda be: ff.KappaFace(6, 9, backend=be), id="KappaFace"),
    pytest.param(lambda be: ff.ElasticArcFace(6, 9, plus=True, backend=be), id="ElasticArcFace-plus"),
    pytest.param(lambda be: ff.ElasticCosFace(6, 9, backend=be), id="ElasticCosFace"),
    pytest.param(lambda be: ff.NPT(6, 9, k=2, backend=be), id="NPT"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", HEADS)
def test_head_forward_bad_labels_and_shapes(make, backend):
    """Heads that use the labels themselves (KappaFace's statistics and per-class margins,
    ElasticFace+'s target cosines) check them first: a clear ValueError, never an IndexError."""
    head = make(backend)
    x, _, y = _xy()
    with pytest.raises(ValueError, match=r"outside \[0, C=9\).*row 2: 9"):
        head(x, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match=r"D=5 .*D=6"):
        head(torch.randn(4, 5), y)
    with pytest.raises(ValueError, match=r"length B=4"):
        head(x, y[:3])
    if isinstance(head, ff.KappaFace):
        assert int(head.epoch_counts.sum()) == 0, "a rejected batch must not touch KappaFace's statistics"


def test_kappaface_update_statistics_checks_labels():
    head = ff.KappaFace(6, 9)
    with pytest.raises(ValueError, match=r"outside \[0, C=9\)"):
        head.update_statistics(torch.randn(4, 6), torch.tensor([0, 1, 9, 2]))


def test_otface_feature_maps_shape():
    head = ff.OTFace(6, 9)
    x, _, y = _xy()
    with pytest.raises(ValueError, match=r"feature_maps must be \[B=4, Cf, H, W\]"):
        head(x, y, torch.randn(3, 2, 2, 2))


# ------------------------------------------------------------------ accepted inputs (handled, not rejected)

def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values, laid out transposed (strides (1, rows)): not contiguous."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_handled(backend):
    """Transposed-layout x and W, a strided label vector and a strided per-row margin give the
    same loss and gradients as their contiguous copies."""
    x, W, y = _xy(dtype=torch.float64)
    y_big = torch.stack([y, y]).t().reshape(-1)[::2]  # strided view of the labels
    m2 = torch.linspace(0.3, 0.6, 8, dtype=torch.float64)[::2]
    assert not y_big.is_contiguous() and not m2.is_contiguous()

    def run(xx, WW, yy, mm):
        xx, WW = xx.detach().requires_grad_(), WW.detach().requires_grad_()
        loss = F_.margin_softmax_loss(xx, WW, yy, m2=mm, backend=backend, negative="sv", t=1.2)
        loss.backward()
        return loss.detach(), xx.grad, WW.grad

    a = run(x, W, y, m2.contiguous())
    b = run(_noncontig(x), _noncontig(W), y_big, m2)
    for name, u, v in zip(("loss", "dL/dx", "dL/dW"), a, b):
        assert torch.allclose(u, v, rtol=1e-12, atol=0), name
    npt_a = F_.npt_loss(x, W, y, k=3, backend=backend)
    npt_b = F_.npt_loss(_noncontig(x), _noncontig(W), y_big, k=3, backend=backend)
    assert torch.allclose(npt_a, npt_b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_embeddings_are_handled(backend):
    """A zero-stride (expanded) x is read correctly."""
    x, W, y = _xy(dtype=torch.float64)
    xe = x[:1].expand(4, -1)
    assert xe.stride(0) == 0
    got = F_.margin_softmax_loss(xe, W, y, m2=0.5, backend=backend, reduction="none")
    ref = F_.margin_softmax_loss(xe.contiguous(), W, y, m2=0.5, backend="reference", reduction="none")
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt,wdt", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float64), (torch.float16, torch.bfloat16)])
def test_mixed_floating_dtypes_promote(xdt, wdt, backend):
    """x and W of different floating dtypes are accepted: the computation runs in fp32 (fp64 if
    either is fp64), equal to the reference on the promoted inputs; each gradient comes back in its
    own input's dtype. Triton's step runs a 16-bit x with an fp32 W as F.linear does under autocast:
    on W rounded to x's dtype (docs/triton.md), so it is held to the reference on those inputs."""
    x, W, y = _xy()
    x, W = x.to(xdt), W.to(wdt)
    xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F_.margin_softmax_loss(xx, WW, y, m2=0.5, backend=backend)
    loss.backward()
    cdt = torch.float64 if torch.float64 in (xdt, wdt) else torch.float32
    assert loss.dtype == cdt and xx.grad.dtype == xdt and WW.grad.dtype == wdt
    if backend == "triton" and wdt == torch.float32 and xdt in (torch.float16, torch.bfloat16):
        W = W.to(xdt)  # the 16-bit path: W's tiles are rounded to x's dtype
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    ref = F_.margin_softmax_loss(x64, W64, y, m2=0.5, backend="reference")
    ref.backward()
    tol = 1e-10 if cdt == torch.float64 else 2e-5
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()), (loss.item(), ref.item())
    for g, r in ((xx.grad, x64.grad), (WW.grad, W64.grad)):
        lowp = torch.finfo(g.dtype).eps  # the gradient is rounded once to its own dtype
        assert (g.double() - r).abs().max() <= (lowp + tol) * r.abs().max() * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_label_dtypes_are_accepted(backend):
    x, W, y = _xy(dtype=torch.float64)
    ref = F_.margin_softmax_loss(x, W, y, m2=0.5, backend=backend)
    for dt in (torch.int32, torch.int16):
        assert torch.equal(F_.margin_softmax_loss(x, W, y.to(dt), m2=0.5, backend=backend), ref), dt
