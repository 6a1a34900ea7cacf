"""backend="native" (csrc/, fusedface._C) against the materialised reference (issue 4).

Odd shapes everywhere: B = 37, D = 123, C = 1009 with a class tile of 128, so the last tile is
partial (1009 = 7·128 + 113) and no row group fills the 16-lane vector loops evenly; rows ignored,
rows past θ + m = π, rows almost on their centre. float64 must match the reference to 1e-10,
float32 the float64 truth to 1e-5 (relative to the largest value; where fp32 itself cannot, as close
as the fp32 reference). 16-bit inputs are held to how far plain PyTorch at
the same precision drifts from a float64 truth.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from conftest import MARGIN_FAMILIES, assert_close, leaf, loss_and_grads, make_problem, materialise_margins

try:
    importlib.import_module("fusedface._C")
except ImportError as err:  # a visible skip, never a silent pass
    pytest.skip(f"fusedface._C is not built ({err}); build it with `pip install --no-build-isolation -e .`",
                allow_module_level=True)

from fusedface.backends import native  # noqa: E402
from fusedface import functional as F_  # noqa: E402
from fusedface.backends import resolve  # noqa: E402
from fusedface._engine import choose_tile, margin_prologue  # noqa: E402
from fusedface._numerics import inverse_norms  # noqa: E402
from fusedface._options import MarginOptions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the bf16 switches warn on CPUs without bf16 matrix instructions; the tests that set them check
# numbers, test_bf16_switches_warn_where_the_cpu_lacks_bf16_matmul checks the warning
pytestmark = [*globals().get("pytestmark", []),
              pytest.mark.filterwarnings("ignore:.*no bf16 matrix instructions:RuntimeWarning")]
B, D, C, TILE = 37, 123, 1009, 128
PROBLEM = dict(ignore=(0, 11), past_pi=(3, 4), near_centre=(5, 6))
OPS = torch.ops.fusedface


def _pair(fn, family_kw, dtype=torch.float64, backend="native", **problem):
    x, W, y = make_problem(B, D, C, dtype=dtype, **{**PROBLEM, **problem})
    kw = materialise_margins(family_kw, B, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ref = loss_and_grads(getattr(F_, fn), x, W, y, backend="reference", **kw)
    got = loss_and_grads(getattr(F_, fn), x, W, y, backend=backend, tile_size=TILE, **kw)
    return ref, got


def _check(ref, got, rtol):
    for name, g, r in zip(("loss", "dL/dx", "dL/dW"), got, ref):
        assert_close(g, r, rtol=rtol, name=name)


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kw", MARGIN_FAMILIES)
def test_margin_family_float64_equals_reference(kw, reduction):
    ref, got = _pair("margin_softmax_loss", {**kw, "reduction": reduction})
    _check(ref, got, 1e-10)


def _check_float32(fn, family_kw):
    """fp32 inputs: within 1e-5 (relative to the largest value) of the float64 truth computed from the
    same inputs, or within 1.5x of the fp32 reference's own distance to it where fp32 itself cannot
    do 1e-5 (rows on their centre: cosines within 5e-9 of 1)."""
    x, W, y = make_problem(B, D, C, dtype=torch.float32, **PROBLEM)
    kw = materialise_margins(family_kw, B, dtype=torch.float32)
    truth = loss_and_grads(getattr(F_, fn), x.double(), W.double(), y, backend="reference", **kw)
    ref = loss_and_grads(getattr(F_, fn), x, W, y, backend="reference", **kw)
    got = loss_and_grads(getattr(F_, fn), x, W, y, backend="native", tile_size=TILE, **kw)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, t, r, g in zip(("loss", "dL/dx", "dL/dW"), truth, ref, got):
        scale = float(t.abs().max())
        err_ref = float((r.double() - t).abs().max()) / scale
        assert_close(g, t, rtol=max(1e-5, 1.5 * err_ref), name=f"{name} (fp32 reference's own error {err_ref:.2e})")


@pytest.mark.parametrize("kw", MARGIN_FAMILIES)
def test_margin_family_float32_equals_reference(kw):
    _check_float32("margin_softmax_loss", kw)


@pytest.mark.parametrize("k", [1, 5, 16])
def test_npt_float64_equals_reference(k):
    ref, got = _pair("npt_loss", dict(k=k, delta=0.8))
    _check(ref, got, 1e-10)


@pytest.mark.parametrize("k", [1, 5, 16])
def test_npt_float32_equals_reference(k):
    _check_float32("npt_loss", dict(k=k, delta=0.8))


def test_rows_past_pi_are_really_there():
    from fusedface.margins import target_cosines
    x, W, y = make_problem(B, D, C, **PROBLEM)
    c = target_cosines(x, W, y)
    assert (torch.acos(c[[3, 4]]) + 0.5 > math.pi).all() and (c[[5, 6]] > 0.999999).all()


@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m2=0.5, theta_policy="threshold"),
                                dict(m2=0.5, grad_mode="straight_through"), dict(m3=0.35)])
def test_embedding_exactly_opposite_its_centre(kw):
    """x_b = −2.5·W_y: θ = π, so θ + m2 passes π. acos is infinitely ill-conditioned at −1, so the
    float64 reference itself is only good to about 1e-8 here: the native backend must be as close
    to it as the `torch` backend is (and both within 1e-8)."""
    x, W, y = make_problem(B, D, C, ignore=(0,))
    x[7] = -2.5 * W[y[7]]
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", reduction="sum", **kw)
    chk = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="torch", reduction="sum", tile_size=TILE, **kw)
    nat = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", reduction="sum", tile_size=TILE, **kw)
    for name, n, c, r in zip(("loss", "dL/dx", "dL/dW"), nat, chk, ref):
        assert torch.isfinite(n).all(), name
        err_n = float((n - r).abs().max()) / float(r.abs().max())
        err_c = float((c - r).abs().max()) / float(r.abs().max())
        assert err_n <= max(10 * err_c, 1e-8), f"{name}: native {err_n:.3e} vs torch backend {err_c:.3e}"


@pytest.mark.parametrize("tile", [1, 16, 113, 5000])
def test_tile_widths_do_not_change_the_result(tile):
    x, W, y = make_problem(B, D, C, **PROBLEM)
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", m2=0.5, negative="sv", t=1.1)
    got = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", tile_size=tile, m2=0.5,
                         negative="sv", t=1.1)
    _check(ref, got, 1e-10)


def test_row_blocks_and_small_tile_buffer(monkeypatch):
    """Several row blocks per tile (FUSEDFACE_NATIVE_ROW_BLOCK) and a tiny cache budget."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_ROW_BLOCK", "10")
    monkeypatch.setenv("FUSEDFACE_NATIVE_TILE_BYTES", "4096")
    ref, got = _pair("margin_softmax_loss", dict(m2=0.3, m3=0.2))
    _check(ref, got, 1e-10)
    ref, got = _pair("npt_loss", dict(k=5))
    _check(ref, got, 1e-10)


def test_one_thread_and_two_threads_agree():
    x, W, y = make_problem(B, D, C, **PROBLEM)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", tile_size=TILE, m2=0.5)
        torch.set_num_threads(2)
        two = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", tile_size=TILE, m2=0.5)
        again = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", tile_size=TILE, m2=0.5)
    finally:
        torch.set_num_threads(before)
    _check(one, two, 1e-12)
    for a, b in zip(two, again):
        assert torch.equal(a, b), "a fixed thread count must give bitwise identical results"


def test_mixed_precision_inputs_float64_embeddings_float32_centres():
    x, W, y = make_problem(B, D, C, **PROBLEM)
    W = W.float()
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", m2=0.5)
    got = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", tile_size=TILE, m2=0.5)
    assert got[2].dtype == torch.float32
    _check(ref, got, 1e-6)


def test_gradcheck_native():
    x, W, y = make_problem(6, 5, 23, ignore=(1,), seed=3)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: F_.margin_softmax_loss(a, b, y, backend="native", tile_size=4, reduction="none", m2=0.5,
                                            negative="mv_adaptive", t=0.2), (x, W))


# --------------------------------------------------------------------------- 16-bit inputs

def _plain_half_baseline(x, W, y, kw):
    """InsightFace-style plain PyTorch at the input precision: normalise, one matmul and the
    logits in that dtype, then margin and cross-entropy in fp32."""
    import torch.nn.functional as F
    opts = MarginOptions(**{k: v for k, v in kw.items() if k not in ("m2", "m3")})
    from fusedface import reference as R
    xn = F.normalize(x, dim=1)
    wn = F.normalize(W, dim=1)
    c = (xn @ wn.t()).float().clamp(-1, 1)
    return R.margin_softmax_from_cosines(c, y, opts, kw.get("m2", 0.0), kw.get("m3", 0.0))[0]


@pytest.mark.parametrize("fast", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m3=0.35, negative="mv_adaptive", t=0.2, scale=32.0)])
def test_half_precision_finite_and_close(dtype, kw, fast, monkeypatch):
    """Error against the float64 truth (computed from the same rounded inputs) is no larger than
    the error of plain PyTorch at the same input precision. Default mode (fast = 0): within
    1.5× the fp32-promoting reference's own error (fp32-grade gradients). fast_grad (bf16 only
    rounds dc to bf16): within the InsightFace-style 16-bit pipeline's error."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_FAST_GRAD", str(fast))
    x, W, y = make_problem(64, 96, 700, ignore=(2,), past_pi=(4,), near_centre=(5,))
    xq, Wq = x.to(dtype), W.to(dtype)
    truth = loss_and_grads(F_.margin_softmax_loss, xq.double(), Wq.double(), y, backend="reference", **kw)
    ref = loss_and_grads(F_.margin_softmax_loss, xq, Wq, y, backend="reference", **kw)
    plain = loss_and_grads(_plain_half_baseline, xq, Wq, y, kw)
    got = loss_and_grads(F_.margin_softmax_loss, xq, Wq, y, backend="native", tile_size=128, **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, t, r, p, g in zip(("loss", "dL/dx", "dL/dW"), truth, ref, plain, got):
        assert torch.isfinite(g).all(), name
        err_ref = float((r.double() - t).abs().max())
        err_plain = float((p.double() - t).abs().max())
        err_got = float((g.double() - t).abs().max())
        if fast and dtype == torch.bfloat16:
            bound = max(1.5 * err_ref + 1e-6 * float(t.abs().max()), err_plain)
        else:
            bound = 1.5 * err_ref + 1e-6 * float(t.abs().max())
        assert err_got <= bound, (f"{name}: native {err_got:.3e} > bound {bound:.3e} (fp32-promoting reference "
                                  f"{err_ref:.3e}, plain {dtype} pipeline {err_plain:.3e})")


# --------------------------------------------------------------------------- bf16-GEMM mode

BF16_FAMILIES = [pytest.param(dict(m2=0.5), id="arcface"),
                 pytest.param(dict(m3=0.35, negative="mv_adaptive", t=0.2, scale=32.0), id="mv-adaptive-am"),
                 pytest.param(dict(m1=1.0, m2=0.3, m3=0.2), id="combined"),
                 pytest.param(dict(scale=32.0, m3=0.35, negative="sv", t=1.2, theta_policy="easy"), id="sv-am")]


def _bf16_mode_errors(x, W, y, kw, fn=None, **native_kw):
    """(truth, plain, got) for bf16 x, W: the float64 reference on the rounded inputs, the plain
    normalise / bf16 matmul / fp32 CE pipeline, and the native backend in the bf16-GEMM mode."""
    truth = loss_and_grads(F_.margin_softmax_loss, x.double(), W.double(), y, backend="reference", **kw)
    plain = loss_and_grads(_plain_half_baseline, x, W, y, kw)
    if fn is None:
        got = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", **native_kw, **kw)
    else:
        got = loss_and_grads(fn, x, W, y, **native_kw, **kw)
    return truth, plain, got


def _assert_no_worse_than_plain(truth, plain, got, slack=1.5, what=""):
    for name, t, p, g in zip(("loss", "dL/dx", "dL/dW"), truth, plain, got):
        assert torch.isfinite(g).all(), f"{name}{what}: {int((~torch.isfinite(g)).sum())} non-finite values"
        scale = float(t.abs().max())
        e_plain = float((p.double() - t).abs().max())
        e_got = float((g.double() - t).abs().max())
        bound = slack * e_plain + 1e-6 * scale
        assert e_got <= bound, (f"{name}{what}: bf16-GEMM mode error {e_got:.3e} against the float64 truth > "
                                f"{slack} x the plain bf16 pipeline's {e_plain:.3e} (+1e-6 of {scale:.3e})")


@pytest.mark.parametrize("kw", BF16_FAMILIES)
def test_bf16_gemm_mode_no_worse_than_plain_bf16(kw, monkeypatch):
    """FUSEDFACE_NATIVE_PRECISION=bf16: every tile GEMM writes bf16, like a plain bf16 pipeline. Its
    error against the float64 truth (the reference on the same rounded inputs) must be no larger
    than that pipeline's (normalise, bf16 matmul, fp32 cross-entropy), within 1.5x."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "bf16")
    x, W, y = make_problem(64, 96, 700, ignore=(2,), past_pi=(4,), near_centre=(5,))
    xq, Wq = x.bfloat16(), W.bfloat16()
    truth, plain, got = _bf16_mode_errors(xq, Wq, y, kw, tile_size=128)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    _assert_no_worse_than_plain(truth, plain, got)


def test_bf16_gemm_mode_row_blocks_small_tiles_and_kept_block(monkeypatch):
    """Several row blocks per tile (dW summed in fp32 over them), a tiny tile buffer with a partial
    last tile, and the kept-block variant (fp32 block, bf16 gradient GEMMs): same bound."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "bf16")
    x, W, y = make_problem(B, D, C, **PROBLEM)
    xq, Wq = x.bfloat16(), W.bfloat16()
    kw = dict(m2=0.5)
    monkeypatch.setenv("FUSEDFACE_NATIVE_ROW_BLOCK", "10")
    monkeypatch.setenv("FUSEDFACE_NATIVE_TILE_BYTES", "4096")
    _assert_no_worse_than_plain(*_bf16_mode_errors(xq, Wq, y, kw, tile_size=TILE), what=" (row blocks)")
    monkeypatch.delenv("FUSEDFACE_NATIVE_ROW_BLOCK")
    monkeypatch.delenv("FUSEDFACE_NATIVE_TILE_BYTES")
    _assert_no_worse_than_plain(*_bf16_mode_errors(xq, Wq, y, kw, fn=F_.margin_softmax_loss_kept_block,
                                                   tile_size=TILE), what=" (kept block)")


def test_bf16_gemm_mode_cosines_exactly_plus_and_minus_one(monkeypatch):
    """s = 64, rows exactly on their centre (cosine +1), exactly opposite it (−1) and exactly on
    ANOTHER class's centre (a negative at +1, whose logit then beats the target's): the bf16
    products may round past ±1 — the clamp must keep every value finite."""
    monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "bf16")
    x, W, y = make_problem(32, 64, 300, seed=5)
    xq, Wq = x.bfloat16(), W.bfloat16()
    xq[0] = 2 * Wq[y[0]]      # cos = +1 (x2 is exact in bf16)
    xq[1] = -2 * Wq[y[1]]     # cos = −1: θ + m passes π
    xq[2] = Wq[(int(y[2]) + 1) % 300]  # a negative column at cos = +1
    for kw in (dict(m2=0.5), dict(m3=0.35), dict(m2=0.5, negative="mv_adaptive", t=0.2)):
        got = loss_and_grads(F_.margin_softmax_loss, xq, Wq, y, backend="native", scale=64.0, tile_size=64, **kw)
        for name, g in zip(("loss", "dL/dx", "dL/dW"), got):
            assert torch.isfinite(g).all(), f"{name} {kw}: {int((~torch.isfinite(g)).sum())} non-finite values"
        truth = loss_and_grads(F_.margin_softmax_loss, xq.double(), Wq.double(), y, backend="reference", scale=64.0,
                               **kw)
        assert_close(got[0], truth[0], rtol=1e-3, name=f"loss {kw}")


def test_bf16_gemm_mode_changes_nothing_else(monkeypatch):
    """The switch only touches bf16 x and W on CPU: fp32, fp64 and fp16 inputs give bitwise the
    default's results; 'fp32' is the default; an unknown value is an error naming the choices."""
    x, W, y = make_problem(B, D, C, **PROBLEM)
    for dtype in (torch.float64, torch.float32, torch.float16):
        xd, Wd = x.to(dtype), W.to(dtype)
        monkeypatch.delenv("FUSEDFACE_NATIVE_PRECISION", raising=False)
        default = loss_and_grads(F_.margin_softmax_loss, xd, Wd, y, backend="native", tile_size=TILE, m2=0.5)
        for value in ("fp32", "bf16"):
            monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", value)
            got = loss_and_grads(F_.margin_softmax_loss, xd, Wd, y, backend="native", tile_size=TILE, m2=0.5)
            for a, b in zip(default, got):
                assert torch.equal(a, b), (dtype, value)
    monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "half")
    with pytest.raises(ValueError, match="FUSEDFACE_NATIVE_PRECISION='half': use one of fp32"):
        F_.margin_softmax_loss(x.bfloat16(), W.bfloat16(), y, backend="native")


def test_bf16_gemm_mode_opcheck_and_thread_determinism():
    x, W, xinv, winv, y, f = _op_args(torch.bfloat16, B_=21, D_=17, C_=53)
    torch.library.opcheck(OPS.native_margin_forward, (x, W, xinv, winv, y, f, 64.0, 1.2, 0.2, 8, 0, 1))
    lse = OPS.native_margin_forward(x, W, xinv, winv, y, f, 64.0, 1.2, 0.2, 8, 0, 1)[0]
    gl, dcy = torch.ones_like(lse), -torch.ones_like(lse)
    args = (x, W, xinv, winv, y, f, lse, gl, dcy, None, 64.0, 1.2, 0.2, 8)
    for need_dx, need_dW in ((1, 1), (1, 0), (0, 1)):
        torch.library.opcheck(OPS.native_margin_backward, (*args, need_dx, need_dW, 0, 1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one = OPS.native_margin_backward(*args, 1, 1, 0, 1)
        two = OPS.native_margin_backward(*args, 1, 1, 0, 1)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b), "a fixed thread count must give bitwise identical results"


# --------------------------------------------------------------------------- kept block

@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kept_block_variant_equals_reference(dtype, rtol):
    x, W, y = make_problem(B, D, C, dtype=dtype, **PROBLEM)
    kw = dict(m2=0.5, negative="sv", t=1.2)
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", **kw)
    got = loss_and_grads(F_.margin_softmax_loss_kept_block, x, W, y, tile_size=TILE, **kw)
    _check(ref, got, rtol)


def test_kept_block_refuses_what_does_not_fit():
    x, W, y = make_problem(4, 8, 50)
    with pytest.raises(ValueError, match="does not fit budget"):
        F_.margin_softmax_loss_kept_block(x, W, y, budget=100)


def test_kept_block_backward_twice_retain_graph():
    x, W, y = make_problem(B, D, C, **PROBLEM)
    xl, Wl = leaf(x, W)
    loss = F_.margin_softmax_loss_kept_block(xl, Wl, y, m2=0.5, tile_size=TILE)
    g1 = torch.autograd.grad(loss, (xl, Wl), retain_graph=True)
    g2 = torch.autograd.grad(loss, (xl, Wl))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), "the backward must not consume the kept block"


# --------------------------------------------------------------------------- dispatcher

def _op_args(dtype=torch.float32, B_=7, D_=5, C_=19):
    """Inputs of the raw ops, prepared by the engine's prologue (ArcFace m2 = 0.5)."""
    x, W, y = make_problem(B_, D_, C_, dtype=dtype, ignore=(1,))
    opts = MarginOptions()
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    valid, y_lab, xinv, winv, c_y, f, slope = margin_prologue(x, W, y, opts, 0.5, 0.0, cdt)
    return x, W, xinv, winv, y_lab, f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_backward_npt(dtype):
    x, W, xinv, winv, y, f = _op_args(dtype)
    for keep in (0, 1):
        torch.library.opcheck(OPS.native_margin_forward, (x, W, xinv, winv, y, f, 64.0, 1.2, 0.2, 4, keep))
    lse = OPS.native_margin_forward(x, W, xinv, winv, y, f, 64.0, 1.2, 0.2, 4, 0)[0]
    gl = torch.ones_like(lse)
    dcy = -torch.ones_like(lse)
    block = OPS.native_margin_forward(x, W, xinv, winv, y, f, 64.0, 1.2, 0.2, 4, 1)[3]
    for blk in (None, block):
        for need_dx, need_dW in ((1, 1), (1, 0), (0, 1)):
            torch.library.opcheck(OPS.native_margin_backward,
                                  (x, W, xinv, winv, y, f, lse, gl, dcy, blk, 64.0, 1.2, 0.2, 4, need_dx, need_dW, 0))
    torch.library.opcheck(OPS.native_npt_forward, (x, W, xinv, winv, y, 3, 4))


def test_ops_compile_fullgraph():
    x, W, xinv, winv, y, f = _op_args(torch.float32)

    def fwd(x, W, xinv, winv, y, f):
        lse, pred, sv, _ = OPS.native_margin_forward(x, W, xinv, winv, y, f, 64.0, 1.0, 0.0, 4, 0)
        vals, idx = OPS.native_npt_forward(x, W, xinv, winv, y, 2, 4)
        return lse.sum() + vals.sum(), pred, sv, idx

    eager = fwd(x, W, xinv, winv, y, f)
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")(x, W, xinv, winv, y, f)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_boundary_checks_name_the_argument():
    x, W, xinv, winv, y, f = _op_args(torch.float32)
    with pytest.raises(RuntimeError, match="xinv must be a Float vector of length B=7"):
        OPS.native_margin_forward(x, W, xinv.double(), winv, y, f, 64.0, 1.0, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match=r"y \(labels\) must hold class indices in \[0, C=19\)"):
        OPS.native_margin_forward(x, W, xinv, winv, torch.full_like(y, 19), f, 64.0, 1.0, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="x has D=5 features but W has D=4"):
        OPS.native_margin_forward(x, W[:, :4].contiguous(), xinv, winv, y, f, 64.0, 1.0, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="W must be contiguous"):
        OPS.native_margin_forward(x, W.t().contiguous().t(), xinv, winv, y, f, 64.0, 1.0, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="k must be in \\[1, 16\\]"):
        OPS.native_npt_forward(x, W, xinv, winv, y, 17, 4)
    with pytest.raises(RuntimeError, match="block must be the \\[C=19, B=7\\]"):
        OPS.native_margin_backward(x, W, xinv, winv, y, f, f, f, f, torch.zeros(3, 3), 64.0, 1.0, 0.0, 4, 1, 1, 0)


def test_auto_picks_native_on_cpu_and_kernels_have_the_torch_backend_signatures():
    import inspect

    from fusedface.backends import torch as torch_backend
    name, kernels = resolve("auto", torch.device("cpu"))
    assert name == "native" and kernels is native
    for fn in ("margin_forward", "margin_backward", "npt_forward"):
        assert inspect.signature(getattr(native, fn)) == inspect.signature(getattr(torch_backend, fn)), fn
    assert native.supports_device("cpu") and not native.supports_device("meta")


def test_kernel_outputs_have_the_torch_backend_dtypes():
    from fusedface.backends import torch as torch_backend
    x, W, xinv, winv, y, f = _op_args(torch.bfloat16)
    opts = MarginOptions(scale=64.0)
    for mod in (torch_backend, native):
        lse, pred, sv, block = mod.margin_forward(x, W, xinv, winv, y, f, opts, 4)
        assert block is None, "a block is kept only when the engine asks (keep_block=True)"
        assert (lse.dtype, pred.dtype, sv.dtype) == (torch.float32, torch.int64, torch.int32), mod.name
        gl = torch.ones_like(lse)
        Gx, dW = mod.margin_backward(x, W, xinv, winv, y, f, lse, gl, -gl, opts, 4, True, True)
        assert (Gx.dtype, dW.dtype) == (torch.float32, torch.bfloat16), mod.name
        v, i = mod.npt_forward(x, W, xinv, winv, y, 3, 4)
        assert (v.dtype, i.dtype) == (torch.float32, torch.int64), mod.name


def test_build_info_says_what_was_built():
    info = native.build_info()
    assert set(info) == {"cpu", "cuda"} and "epilogue" in info["cpu"]
    assert info["cuda"] == native.cuda_built()
    if torch.version.cuda is None:
        assert not info["cuda"], "a CPU build of torch cannot have the CUDA kernels"


def test_tile_choice_is_an_upper_bound_only():
    # the engine's budget tile for the bench shape is wider than one cache-sized native tile
    assert choose_tile(512, 128, 100_000) > 256
    x, W, y = make_problem(8, 16, 300)
    a = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", m2=0.5)
    b = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="native", m2=0.5, tile_size=7)
    _check(a, b, 1e-12)
    assert inverse_norms(x, torch.float64).shape == (8,)


# --------------------------------------------------------------------------- CUDA (when built and a GPU exists)

CUDA_READY = torch.cuda.is_available() and native.cuda_built()
CUDA_WHY = ("fusedface._C has no CUDA kernels (torch is a CPU build or no toolkit at build time)"
            if not native.cuda_built() else "no CUDA device here")


@pytest.mark.skipif(not CUDA_READY, reason=CUDA_WHY)
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(m3=0.35, negative="sv", t=1.2, theta_policy="easy"),
                                dict(m2="elastic"), dict(m1=2.0, theta_policy="easy")])
def test_cuda_float64_equals_reference(kw):
    x, W, y = make_problem(B, D, C, **PROBLEM)
    kw = materialise_margins(kw, B)
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", **kw)
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = loss_and_grads(F_.margin_softmax_loss, x.cuda(), W.cuda(), y.cuda(), backend="native", tile_size=TILE,
                         **kw_cuda)
    _check(ref, got, 1e-10)


@pytest.mark.skipif(not CUDA_READY, reason=CUDA_WHY)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_cuda_npt_float64_equals_reference(k):
    x, W, y = make_problem(B, D, C, **PROBLEM)
    ref = loss_and_grads(F_.npt_loss, x, W, y, backend="reference", k=k, delta=0.8)
    got = loss_and_grads(F_.npt_loss, x.cuda(), W.cuda(), y.cuda(), backend="native", tile_size=TILE, k=k, delta=0.8)
    _check(ref, got, 1e-10)


@pytest.mark.skipif(not CUDA_READY, reason=CUDA_WHY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_low_precision_close_and_opcheck(dtype):
    x, W, y = make_problem(64, 96, 700, ignore=(2,), past_pi=(4,))
    ref = loss_and_grads(F_.margin_softmax_loss, x, W, y, backend="reference", m2=0.5)
    got = loss_and_grads(F_.margin_softmax_loss, x.to(dtype).cuda(), W.to(dtype).cuda(), y.cuda(),
                         backend="native", tile_size=128, m2=0.5)
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # TF32 may be on for fp32 matmuls; 16-bit inputs
    _check(ref, got, tol)
    xa, Wa, xinv, winv, yl, f = _op_args(torch.float32)
    args = [t.cuda() for t in (xa, Wa, xinv, winv, yl, f)]
    torch.library.opcheck(OPS.native_margin_forward, (*args, 64.0, 1.0, 0.0, 4, 0))
    torch.library.opcheck(OPS.native_npt_forward, (*args[:5], 3, 4))


def test_no_host_sync_calls_in_the_native_python_layer():
    src = open(os.path.join(ROOT, "fusedface", "backends", "native.py")).read()
    for bad in (".item()", ".tolist()", "nonzero(", ".cpu()"):
        assert bad not in src, f"backends/native.py contains {bad}"


@pytest.mark.filterwarnings("default")
@pytest.mark.parametrize("var, value", [("FUSEDFACE_NATIVE_PRECISION", "bf16"), ("FUSEDFACE_NATIVE_FAST_GRAD", "1")])
def test_bf16_switches_warn_where_the_cpu_lacks_bf16_matmul(monkeypatch, var, value):
    """Without AVX512-BF16 or AMX a bf16 GEMM is several times slower than an fp32 one (measured:
    native 1.2 s default, 4.7 s FAST_GRAD, 11.5 s bf16 mode at B=512, C=100k, D=128 on an AVX2
    machine), so the switches warn there; fp32 inputs never warn (the switches do not apply)."""
    import warnings
    x, W, y = make_problem(16, 24, 300, dtype=torch.float32, seed=3)[:3]
    xb, Wb = leaf(x.bfloat16(), W.bfloat16())
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(native, "cpu_has_bf16_matmul", lambda: False)
    with pytest.warns(RuntimeWarning, match=f"{var}.*no bf16 matrix instructions"):
        F_.margin_softmax_loss(xb, Wb, y, m2=0.5, backend="native").backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F_.margin_softmax_loss(x, W, y, m2=0.5, backend="native")  # fp32: not applicable, silent
        monkeypatch.setattr(native, "cpu_has_bf16_matmul", lambda: True)
        F_.margin_softmax_loss(xb, Wb, y, m2=0.5, backend="native").backward()
