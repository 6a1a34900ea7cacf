"""backend="torch": the `torch` backend of SPEC §6 against the materialised reference."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import MARGIN_FAMILIES, assert_close, loss_and_grads, make_problem, materialise_margins
from fusedface import functional as F_
from fusedface.backends import resolve
from fusedface._engine import choose_tile
from fusedface.margins import target_cosines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# odd shapes: the last tile of 128 is partial (1009 = 7·128 + 113); rows ignored, past π, near centre
B, D, C, TILE = 37, 123, 1009, 128
PROBLEM = dict(ignore=(0, 11), past_pi=(3, 4), near_centre=(5, 6))


def _both(fn_kw, family_kw, dtype=torch.float64, **problem):
    x, W, y = make_problem(B, D, C, dtype=dtype, **{**PROBLEM, **problem})
    kw = materialise_margins(family_kw, B)
    ref = loss_and_grads(getattr(F_, fn_kw), x, W, y, backend="reference", **kw)
    got = loss_and_grads(getattr(F_, fn_kw), x, W, y, backend="torch", tile_size=TILE, **kw)
    return ref, got


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", MARGIN_FAMILIES)
def test_margin_family_float64_equals_reference(kw, reduction):
    (l0, gx0, gW0), (l1, gx1, gW1) = _both("margin_softmax_loss", {**kw, "reduction": reduction})
    assert_close(l1, l0, rtol=1e-10, name="loss")
    assert_close(gx1, gx0, rtol=1e-10, name="dL/dx")
    assert_close(gW1, gW0, rtol=1e-10, name="dL/dW")


def test_rows_past_pi_and_near_centre_are_really_there():
    x, W, y = make_problem(B, D, C, **PROBLEM)
    c = target_cosines(x, W, y)
    assert (torch.acos(c[[3, 4]]) + 0.5 > torch.pi).all() and (c[[5, 6]] > 0.999999).all()


@pytest.mark.parametrize("k", [1, 5, 16])
def test_npt_float64_equals_reference(k):
    (l0, gx0, gW0), (l1, gx1, gW1) = _both("npt_loss", dict(k=k, delta=0.8))
    assert_close(l1, l0, rtol=1e-10, name="loss")
    assert_close(gx1, gx0, rtol=1e-10, name="dL/dx")
    assert_close(gW1, gW0, rtol=1e-10, name="dL/dW")


@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m3=0.35, negative="sv", t=1.3), dict(m1=2.0, theta_policy="easy")])
def test_gradcheck_torch_backend(kw):
    x, W, y = make_problem(6, 5, 23, ignore=(1,), seed=3)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: F_.margin_softmax_loss(a, b, y, backend="torch", tile_size=4, reduction="none", **kw), (x, W))


def test_gradcheck_torch_backend_npt():
    x, W, y = make_problem(6, 5, 23, ignore=(1,), seed=4)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: F_.npt_loss(a, b, y, k=3, backend="torch", tile_size=5, reduction="none"), (x, W))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m3=0.35, negative="mv_adaptive", t=0.2, scale=32.0)])
def test_half_precision_no_worse_than_plain_pytorch(dtype, kw):
    """Error against the float64 truth is no larger than the materialised reference's at the same
    input precision (plus a small tolerance); gradients come back in the input dtype."""
    x, W, y = make_problem(64, 96, 700, ignore=(2,), past_pi=(4,), near_centre=(5,))
    xq, Wq = x.to(dtype), W.to(dtype)
    truth = loss_and_grads(F_.margin_softmax_loss, xq.double(), Wq.double(), y, backend="reference", **kw)
    ref = loss_and_grads(F_.margin_softmax_loss, xq, Wq, y, backend="reference", **kw)
    got = loss_and_grads(F_.margin_softmax_loss, xq, Wq, y, backend="torch", tile_size=128, **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, t, r, g in zip(("loss", "dL/dx", "dL/dW"), truth, ref, got):
        assert torch.isfinite(g).all(), name
        err_ref = float((r.double() - t).abs().max())
        err_got = float((g.double() - t).abs().max())
        assert err_got <= 1.5 * err_ref + 1e-6 * float(t.abs().max()), f"{name}: {err_got:.3e} vs plain {err_ref:.3e}"


def test_tile_from_budget_and_override():
    assert choose_tile(256, 128, 400_000) < 400_000
    small = choose_tile(256, 128, 400_000, budget=4 * 2**20)
    big = choose_tile(256, 128, 400_000, budget=64 * 2**20)
    assert small < big and small % 64 == 0
    assert choose_tile(256, 128, 1000, tile=77) == 77
    with pytest.raises(ValueError, match="tile_size"):
        choose_tile(4, 4, 10, tile=0)


def test_auto_picks_a_fused_backend_on_cpu():
    name, _ = resolve("auto", torch.device("cpu"))
    assert name in ("torch", "native"), name
    try:
        import fusedface._C  # noqa: F401
        native = True
    except ImportError:
        native = False
    assert name == ("native" if native else "torch")


def test_no_host_sync_calls_in_the_hot_path():
    """The engine and the torch kernels never call .item()/.tolist()/nonzero (host syncs)."""
    for mod in ("_engine.py", "backends/torch.py"):
        src = open(os.path.join(ROOT, "fusedface", mod)).read()
        for bad in (".item()", ".tolist()", "nonzero(", ".cpu()"):
            assert bad not in src, f"{mod} contains {bad}"
