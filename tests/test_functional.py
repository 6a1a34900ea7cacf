"""The public API of SPEC §7: backend selection, clear errors for bad input."""
from __future__ import annotations

import pytest
import torch

import fusedface
from fusedface import functional as F_
from fusedface import reference as R


def _xy(B=4, D=6, C=9):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g), torch.randn(C, D, generator=g), torch.randint(0, C, (B,), generator=g)


def test_spec_names_exist():
    for name in ("margin_softmax_loss", "npt_loss"):
        assert callable(getattr(F_, name)) and callable(getattr(R, name))
    assert "reference" in fusedface.available_backends() and "torch" in fusedface.available_backends()


def test_unknown_backend_names_the_choices():
    x, W, y = _xy()
    with pytest.raises(ValueError, match="backend='cuda'.*'auto'.*'torch'"):
        F_.margin_softmax_loss(x, W, y, backend="cuda")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_missing_backend_says_what_exists_and_how_to_get_it(backend):
    if backend in fusedface.available_backends():
        pytest.skip(f"{backend} is available in this installation, so there is no error to check")
    x, W, y = _xy()
    with pytest.raises(RuntimeError, match=r"available: reference, torch.*(pip install|TRITON_INTERPRET)"):
        F_.margin_softmax_loss(x, W, y, backend=backend)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.randn(4)), ValueError, "x .*2-D"),
    (dict(W=torch.randn(9, 5)), ValueError, "D=6.*D=5"),
    (dict(W=torch.randn(6, 9)), ValueError, "pytorch-metric-learning"),
    (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "length B=4"),
    (dict(y=torch.zeros(4)), TypeError, "integer"),
    (dict(y=torch.tensor([0, 1, 9, 2])), ValueError, r"outside \[0, C=9\).*row 2: 9"),
    (dict(y=torch.tensor([0, -5, 1, 2])), ValueError, "ignore_index=-1"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, "floating"),
    (dict(x=torch.randn(0, 6), y=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
    (dict(m2=torch.zeros(3)), ValueError, "m2.*per-row"),
    (dict(scale=0.0), ValueError, "scale must be > 0"),
    (dict(theta_policy="clip"), ValueError, "theta_policy='clip'"),
    (dict(negative="hard"), ValueError, "negative='hard'"),
    (dict(negative="sv", t=0.5), ValueError, "t must be >= 1"),
    (dict(negative="mv_fixed", t=-0.1), ValueError, "t must be >= 0"),
    (dict(reduction="avg"), ValueError, "reduction='avg'"),
    (dict(grad_mode="ste"), ValueError, "grad_mode='ste'"),
])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_margin_inputs_raise_clear_errors(bad, exc, match, backend):
    x, W, y = _xy()
    args = dict(x=x, W=W, y=y)
    kw = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(exc, match=match):
        F_.margin_softmax_loss(args["x"], args["W"], args["y"], backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_npt_k_too_large(backend):
    x, W, y = _xy(C=5)
    with pytest.raises(ValueError, match="k=5.*k <= 4"):
        F_.npt_loss(x, W, y, k=5, backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        F_.npt_loss(x, W, y, k=0, backend=backend)


def test_input_checks_catch_non_finite_embeddings():
    x, W, y = _xy()
    x[1, 2] = float("nan")
    fusedface.set_input_checks(True)
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            F_.margin_softmax_loss(x, W, y, backend="torch")
    finally:
        fusedface.set_input_checks(False)
    assert torch.isnan(F_.margin_softmax_loss(x, W, y, backend="torch")), "a NaN input must never give a finite loss"


def test_non_contiguous_inputs_are_handled():
    x, W, y = _xy(D=6)
    xt = torch.randn(6, 4).t()  # non-contiguous [4, 6]
    Wt = torch.randn(6, 9).t()
    ref = F_.margin_softmax_loss(xt.contiguous(), Wt.contiguous(), y, m2=0.5, backend="reference")
    got = F_.margin_softmax_loss(xt, Wt, y, m2=0.5, backend="torch", tile_size=4)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
