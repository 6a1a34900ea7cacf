"""backend="native" tile kernels with the issue-16 extensions, against the `torch` backend's kernels.

The `torch` backend (fusedface/backends/torch.py) is the executable definition of the tile-kernel
protocol; here the native kernels are called directly with the same inputs (no engine around them):
the general rewrite with a per-row ``rt`` (CurricularFace), inter-class filtering and sub-centres,
plus the seed rewrites (nothing regressed). Odd shapes: B = 37 (no 16-lane group fills evenly),
D = 19, C = 53 classes in tiles of 16 (a partial last tile). float64 to 1e-10, fp32 to 1e-5 (both
relative to the largest value); lse, pred and the support-vector counts compared exactly where
they are integers.
"""
from __future__ import annotations

import importlib

import pytest
import torch

try:
    importlib.import_module("fusedface._C")
except ImportError as err:  # a visible skip, never a silent pass
    pytest.skip(f"fusedface._C is not built ({err}); build it with `pip install --no-build-isolation -e .`",
                allow_module_level=True)

from fusedface.backends import native  # noqa: E402
from fusedface.backends import torch as torch_backend  # noqa: E402
from fusedface._numerics import inverse_norms  # noqa: E402
from fusedface._options import MarginOptions  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*no bf16 matrix instructions:RuntimeWarning")]
B, D, C, TILE = 37, 19, 53, 16
OPS = torch.ops.fusedface

CASES = {
    "seed-none": dict(),
    "seed-sv": dict(negative="sv", t=1.2),
    "seed-mv_adaptive": dict(negative="mv_adaptive", t=0.2),
    "curricular": dict(negative="curricular"),
    "filter": dict(interclass_threshold=0.3),
    "filter-mv_adaptive": dict(interclass_threshold=0.3, negative="mv_adaptive", t=0.2),
    "filter-curricular": dict(interclass_threshold=0.3, negative="curricular"),
    "filter-negative-threshold": dict(interclass_threshold=-0.1, negative="sv", t=1.2),
    "K3": dict(subcenters=3),
    "K3-sv": dict(subcenters=3, negative="sv", t=1.2),
    "K3-curricular": dict(subcenters=3, negative="curricular"),
    "K3-filter": dict(subcenters=3, interclass_threshold=0.3),
    "K3-filter-curricular": dict(subcenters=3, interclass_threshold=0.3, negative="curricular"),
}


def _problem(dtype, kw, seed=0, scale=32.0):
    """Inputs of both backends' kernels; lse from the torch backend's forward."""
    opts = MarginOptions(scale=scale, **kw)
    K = opts.subcenters
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(C * K, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[[0, 11, 36]] = -1  # ignored rows
    xinv, winv = inverse_norms(x, cdt), inverse_norms(W, cdt)
    f = (torch.rand(B, generator=g, dtype=torch.float64) * 1.4 - 0.5).to(cdt)
    rt = (torch.rand(B, generator=g, dtype=torch.float64) * 0.8 - 0.2).to(cdt) if opts.negative == "curricular" else None
    gl = torch.rand(B, generator=g, dtype=torch.float64).to(cdt)
    dcy = torch.randn(B, generator=g, dtype=torch.float64).to(cdt)
    return dict(x=x, W=W, xinv=xinv, winv=winv, y=y, f=f, opts=opts, rt=rt, gl=gl, dcy=dcy)


def _forward(mod, p, tile=TILE):
    return mod.margin_forward(p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], p["opts"], tile, rt=p["rt"])


def _backward(mod, p, lse, tile=TILE, need_dx=True, need_dW=True):
    return mod.margin_backward(p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], lse, p["gl"], p["dcy"], p["opts"],
                               tile, need_dx, need_dW, rt=p["rt"])


def _close(got, ref, rtol, name):
    assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype, got.shape, ref.shape)
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((got.double() - ref.double()).abs().max()) / scale
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def _compare(p, rtol, tile=TILE):
    lse_r, pred_r, sv_r, _ = _forward(torch_backend, p, tile)
    lse_n, pred_n, sv_n, blk = _forward(native, p, tile)
    assert blk is None
    _close(lse_n, lse_r, rtol, "lse")
    assert torch.equal(pred_n, pred_r), "pred"
    assert sv_n.dtype == torch.int32 and torch.equal(sv_n, sv_r), "sv counts"
    assert (sv_r > 0).any()
    Gx_r, dW_r = _backward(torch_backend, p, lse_r, tile)
    Gx_n, dW_n = _backward(native, p, lse_r, tile)
    _close(Gx_n, Gx_r, rtol, "Gx")
    _close(dW_n, dW_r, rtol, "dW")
    return Gx_r, dW_r


@pytest.mark.parametrize("name", list(CASES))
def test_float64_equals_torch_backend(name):
    _compare(_problem(torch.float64, CASES[name]), 1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_equals_torch_backend(name):
    _compare(_problem(torch.float32, CASES[name]), 1e-5)


@pytest.mark.parametrize("tile", [1, 5, 1000])
@pytest.mark.parametrize("name", ["K3-filter-curricular", "filter-mv_adaptive"])
def test_tile_widths(name, tile):
    _compare(_problem(torch.float64, CASES[name], seed=1), 1e-10, tile=tile)


def test_row_blocks_and_small_tile_buffer(monkeypatch):
    """Several row blocks per tile and the smallest tile buffer (16 classes of K rows)."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_ROW_BLOCK", "10")
    monkeypatch.setenv("FUSEDFACE_NATIVE_TILE_BYTES", "1024")
    for name in ("K3-filter-curricular", "filter-curricular", "seed-sv"):
        _compare(_problem(torch.float64, CASES[name], seed=2), 1e-10, tile=64)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_one_gradient_only(need):
    p = _problem(torch.float64, CASES["K3-filter-curricular"], seed=3)
    lse = _forward(torch_backend, p)[0]
    ref = _backward(torch_backend, p, lse, need_dx=need[0], need_dW=need[1])
    got = _backward(native, p, lse, need_dx=need[0], need_dW=need[1])
    for r, g, n in zip(ref, got, ("Gx", "dW")):
        assert (r is None) == (g is None), n
        if r is not None:
            _close(g, r, 1e-10, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_with_subcentres(dtype):
    """16-bit x and W (widened tile by tile): the torch backend's numbers, fp32-grade."""
    _compare(_problem(dtype, CASES["K3-filter-curricular"], seed=4), 1e-5)


def test_bf16_switches_with_subcentres(monkeypatch):
    """The bf16-GEMM mode keeps exact products with sub-centres (forward and backward see one cosine);
    its bf16 gradient GEMMs round dℓ/dc to bf16 (autocast-grade)."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "bf16")
    p = _problem(torch.bfloat16, CASES["K3-filter-curricular"], seed=5)
    lse_r, pred_r, sv_r, _ = _forward(torch_backend, p)
    lse_n, pred_n, sv_n, _ = _forward(native, p)
    _close(lse_n, lse_r, 1e-5, "lse")
    assert torch.equal(pred_n, pred_r) and torch.equal(sv_n, sv_r)
    Gx_r, dW_r = _backward(torch_backend, p, lse_r)
    Gx_n, dW_n = _backward(native, p, lse_r)
    _close(Gx_n, Gx_r, 3e-2, "Gx")
    _close(dW_n.float(), dW_r.float(), 3e-2, "dW")


def test_subcentre_gradient_reaches_only_the_argmax_rows():
    """dW rows of sub-centres that are no (row, class)'s arg-max get exactly nothing."""
    p = _problem(torch.float64, CASES["K3"], seed=6)
    K = 3
    raw = (p["x"] @ p["W"].t()) * p["xinv"][:, None] * p["winv"][None, :]
    arg = raw.unflatten(1, (C, K)).argmax(dim=2)  # [B, C]
    hit = torch.zeros(C, K, dtype=torch.bool)
    hit.scatter_(1, arg.t(), True)
    lse = _forward(native, p)[0]
    _, dW = _backward(native, p, lse)
    rows = dW.abs().sum(dim=1).view(C, K)
    assert (rows[~hit] == 0).all() and (rows[hit] > 0).all()


def test_default_arguments_are_the_seed_kernels():
    """Old call sites (no extension arguments) and explicit defaults give identical results."""
    p = _problem(torch.float32, CASES["seed-sv"], seed=7)
    a, b = p["opts"].rewrite
    args = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], 32.0, a, b, TILE, 0)
    old = OPS.native_margin_forward(*args)
    new = OPS.native_margin_forward(*args, 0, 0.0, None, 2.0, 1)
    for o, n in zip(old[:3], new[:3]):
        assert torch.equal(o, n)
    bargs = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], old[0], p["gl"], p["dcy"], None, 32.0, a, b, TILE,
             1, 1, 0)
    for o, n in zip(OPS.native_margin_backward(*bargs), OPS.native_margin_backward(*bargs, 0, 0.0, None, 2.0, 1)):
        assert torch.equal(o, n)


def test_opcheck_with_extensions():
    """The schemas and fake kernels (torch.compile) with rt, thr and K."""
    p = _problem(torch.float32, CASES["K3-filter-curricular"], seed=8)
    common = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"])
    ext = (1.0, p["rt"], 0.3, 3)
    torch.library.opcheck(OPS.native_margin_forward, (*common, 32.0, 0.0, 0.0, 8, 0, 0, *ext))
    lse = OPS.native_margin_forward(*common, 32.0, 0.0, 0.0, 8, 0, 0, *ext)[0]
    args = (*common, lse, p["gl"], p["dcy"], None, 32.0, 0.0, 0.0, 8)
    torch.library.opcheck(OPS.native_margin_backward, (*args, 1, 1, 0, 0, *ext))


def test_extension_argument_errors():
    p = _problem(torch.float32, CASES["K3"], seed=9)
    common = (p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], 32.0, 1.0, 0.0, 8)
    with pytest.raises(RuntimeError, match="keep_block is not implemented with sub-centres"):
        OPS.native_margin_forward(*common, 1, 0, 0.0, None, 2.0, 3)
    with pytest.raises(RuntimeError, match="not a multiple of K=4"):
        OPS.native_margin_forward(*common, 0, 0, 0.0, None, 2.0, 4)
    with pytest.raises(RuntimeError, match="rt must be a Float vector of length B=37"):
        OPS.native_margin_forward(*common, 0, 0, 1.0, p["f"][:5], 2.0, 3)
    with pytest.raises(RuntimeError, match="rt must be a Float"):
        OPS.native_margin_forward(*common, 0, 0, 1.0, p["f"].double(), 2.0, 3)
    lse = OPS.native_margin_forward(*common, 0, 0, 0.0, None, 2.0, 3)[0]
    block = torch.zeros(C, B)
    with pytest.raises(RuntimeError, match="kept block is not implemented with sub-centres"):
        OPS.native_margin_backward(p["x"], p["W"], p["xinv"], p["winv"], p["y"], p["f"], lse, p["gl"], p["dcy"], block,
                                   32.0, 1.0, 0.0, 8, 1, 1, 0, 0, 0.0, None, 2.0, 3)


def test_kept_block_with_extensions_k1():
    """keep_block (K = 1) with the curricular rewrite and filtering: the backward reads the block."""
    p = _problem(torch.float64, CASES["filter-curricular"], seed=10)
    a = p
    lse, pred, sv, block = native.margin_forward(a["x"], a["W"], a["xinv"], a["winv"], a["y"], a["f"], a["opts"], TILE,
                                                 keep_block=True, rt=a["rt"])
    assert block is not None and block.shape == (C, B)
    lse_r = _forward(torch_backend, p)[0]
    _close(lse, lse_r, 1e-10, "lse")
    ref = _backward(torch_backend, p, lse_r)
    got = native.margin_backward(a["x"], a["W"], a["xinv"], a["winv"], a["y"], a["f"], lse_r, a["gl"], a["dcy"],
                                 a["opts"], TILE, True, True, block=block, rt=a["rt"])
    for r, g, n in zip(ref, got, ("Gx", "dW")):
        _close(g, r, 1e-10, n)


def test_module_advertises_extensions():
    assert native.MARGIN_EXTENSIONS is True
