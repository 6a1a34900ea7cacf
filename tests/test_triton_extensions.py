"""backend="triton", tile kernels: the extensions of issue 16 against the ``torch`` backend's protocol.

CurricularFace's quadratic rewrite with a per-row ``rt``, inter-class filtering and K sub-centres per
class, in fp32 to 1e-5 (relative to each tensor's scale; ``pred`` and the support-vector counts
exactly), at odd shapes (B = 37, D = 19, C = 53 classes) with ignored rows. On CUDA tensors where a GPU
is present, else on CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py; the module is skipped
with the reason where Triton cannot run), where the launcher's small blocks (16 rows, 32 classes, i.e.
8 classes of 4 padded sub-centre lanes for K = 3) leave several class tiles, partial on every axis, and
three class splits.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, triton_test_file
from fusedface._options import MarginOptions
from fusedface.backends import torch as R

DEV, T, pytestmark = triton_test_file("fusedface.backends.triton")

B, D, C = 37, 19, 53
IGNORED = (0, 9, 30)
TILE = 16  # the torch backend's class tile


def _problem(K: int, dtype=torch.float32, seed: int = 0, curricular: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    y[list(IGNORED)] = -1
    f = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 - 0.1  # target values: plenty of support vectors
    gl = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    dcy = torch.randn(B, generator=g, dtype=torch.float64)
    rt = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 - 0.2 if curricular else None  # t_b in (-0.2, 0.6)
    gl[y < 0] = 0.0
    dcy[y < 0] = 0.0
    x, W = x.to(DEV, dtype), W.to(DEV, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xinv = (1.0 / x.to(acc).norm(dim=1).clamp_min(1e-12)).contiguous()
    winv = (1.0 / W.to(acc).norm(dim=1).clamp_min(1e-12)).contiguous()
    to = dict(device=DEV, dtype=acc)
    return dict(x=x, W=W, xinv=xinv, winv=winv, y=y.to(DEV), f=f.to(**to), gl=gl.to(**to), dcy=dcy.to(**to),
                rt=None if rt is None else rt.to(**to))


def _compare(opts: MarginOptions, dtype=torch.float32, rtol=1e-5, seed=0):
    p = _problem(opts.subcenters, dtype, seed, curricular=opts.negative == "curricular")
    args = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"])
    l0, p0, s0, _ = R.margin_forward(*args, opts, TILE, rt=p["rt"])
    l1, p1, s1, blk = T.margin_forward(*args, opts, TILE, rt=p["rt"])
    assert blk is None
    assert_close(l1, l0, rtol=rtol, name=f"lse [{opts}]")
    assert torch.equal(p1.cpu(), p0.cpu()), f"pred differs [{opts}]: {p1.tolist()} vs {p0.tolist()}"
    assert torch.equal(s1.long().cpu(), s0.long().cpu()), f"sv count differs [{opts}]: {s1.tolist()} vs {s0.tolist()}"
    # the same lse for both backwards, so the gradients compare the kernels alone
    bwd = (*args, l0, p["gl"], p["dcy"], opts, TILE, True, True)
    g0, w0 = R.margin_backward(*bwd, rt=p["rt"])
    g1, w1 = T.margin_backward(*bwd, rt=p["rt"])
    assert g1.dtype == g0.dtype and w1.dtype == p["W"].dtype and w1.shape == p["W"].shape
    assert_close(g1, g0, rtol=rtol, name=f"Gx [{opts}]")
    assert_close(w1, w0, rtol=rtol, name=f"dW [{opts}]")
    # need_dx / need_dW separately
    gx_only, none_w = T.margin_backward(*bwd[:-2], True, False, rt=p["rt"])
    assert none_w is None and torch.equal(gx_only, g1)
    return p, (l0, p0, s0), (g0, w0)


CASES = [
    pytest.param(dict(negative="curricular"), id="curricular-rt"),
    pytest.param(dict(interclass_threshold=0.3), id="filter"),
    pytest.param(dict(interclass_threshold=0.3, negative="mv_adaptive", t=0.2), id="filter-mv-adaptive"),
    pytest.param(dict(subcenters=3), id="K3"),
    pytest.param(dict(subcenters=3, negative="curricular"), id="K3-curricular"),
    pytest.param(dict(subcenters=3, interclass_threshold=0.3), id="K3-filter"),
    pytest.param(dict(subcenters=3, negative="curricular", interclass_threshold=0.3), id="K3-curricular-filter"),
    pytest.param(dict(subcenters=2, negative="sv", t=1.2, interclass_threshold=0.25), id="K2-sv-filter"),
    pytest.param(dict(negative="sv", t=1.2), id="sv-unchanged"),
]


@pytest.mark.parametrize("kw", CASES)
def test_extensions_fp32_match_torch_backend(kw):
    opts = MarginOptions(scale=16.0, **kw)
    p, (_, _, svc), _ = _compare(opts)
    if opts.negative != "none":
        assert int(svc.sum()) > 0, "the problem must contain support vectors"


def test_problem_exercises_filter_and_subcentres():
    """The shapes above mean something: some negatives are filtered, and the arg-max sub-centre varies."""
    K = 3
    p = _problem(K, curricular=True)
    raw, c, arg = R._tile_cosines(p["x"].double(), p["W"].double(), p["xinv"].double(), p["winv"].double(), K)
    lab = p["y"][:, None] == torch.arange(C, device=DEV)[None, :]
    filt = (c > 0.3) & ~lab
    assert 0 < int(filt.sum()) < filt.numel() // 2
    assert set(arg.unique().tolist()) == {0, 1, 2}
    assert float(c.max()) > 0.3 and float(p["rt"].min()) < 0 < float(p["rt"].max())


def test_fp64_subcentres_curricular_filter_match_torch_backend():
    """fp64 keeps fp64 accuracy (the scalars and the threshold travel as fp32 hi + lo pairs)."""
    _compare(MarginOptions(scale=16.0, subcenters=3, negative="curricular", interclass_threshold=0.3),
             dtype=torch.float64, rtol=1e-10)


def test_ops_keep_their_old_call_and_flag():
    """The engine sees the extensions on the module it gets for backend="triton"; the registered ops
    still take the old argument list (the new arguments default to the plain kernels)."""
    assert T.MARGIN_EXTENSIONS is True
    from fusedface.backends import triton_tiles as TT
    p = _problem(1)
    opts = MarginOptions(scale=16.0, negative="mv_fixed", t=0.1)
    a, b = opts.rewrite
    args = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"])
    lse, pred, sv = TT._OPS["margin_forward"](*args, 16.0, a, b, 1)
    l1, p1, s1, _ = T.margin_forward(*args, opts, TILE)
    assert torch.equal(lse, l1) and torch.equal(pred, p1) and torch.equal(sv, s1)
    bwd = (*args, lse, p["gl"], p["dcy"], 16.0, a, b, 1)
    g1, w1 = T.margin_backward(*args, lse, p["gl"], p["dcy"], opts, TILE, True, True)
    assert torch.equal(TT._OPS["margin_backward_dx"](*bwd), g1)
    assert torch.equal(TT._OPS["margin_backward_dw"](*bwd), w1)


def test_rejects_w_rows_not_a_multiple_of_subcenters():
    p = _problem(1)
    with pytest.raises(ValueError, match="multiple of subcenters"):
        T.margin_forward(p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], MarginOptions(subcenters=2), TILE)
