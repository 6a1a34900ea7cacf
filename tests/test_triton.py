"""backend="triton": the fused Triton kernels against the materialised reference.

Runs on CUDA tensors when a GPU is present, else on CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py
imports triton and the kernels under the interpreter before any test module; where that was impossible the
module is skipped with the reason ``conftest.triton_unusable`` gives, as the shared tests' Triton cases are). Under the interpreter the launcher uses small blocks (16 rows, 32
classes, 32 features) and three class splits, so B = 37, D = 45, C = 301 leaves partial tiles on every
axis; on a GPU the shipped configurations run, plus GPU-only tests at B = D = 512.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch

_CUDA = torch.cuda.is_available()

import pytest  # noqa: E402

from conftest import (MARGIN_FAMILIES, assert_close, leaf, make_problem, materialise_margins,  # noqa: E402
                      triton_test_file)
from fusedface import functional as F_  # noqa: E402
from fusedface._options import MarginOptions  # noqa: E402

# one check of whether Triton can run here, shared with every backend-parametrised test (conftest.py
# imports triton and the kernels under the interpreter before any test module, on a machine without GPU)
DEV, T, pytestmark = triton_test_file("fusedface.backends.triton_tiles")


B, D, C = 37, 45, 301
# Rows 5 and 6 sit at a cosine of 1 − 5e-9 from their centre only in the fp64 tests: in fp32 that
# cosine rounds to 1 and the exact slope m1·sin(θ + m2)/sin θ of the target transform is
# ill-conditioned there (sin θ ~ 1e-4), so every fused backend (torch included, same engine) differs
# from the fp32 reference by ~1e-5 on those rows; test_near_centre_rows_fp32_match_torch_backend
# checks the Triton kernels on them against the `torch` backend instead.
PROBLEM = dict(ignore=(0, 11), past_pi=(3, 4))


def _problem(dtype=torch.float32, b=B, d=D, c=C, seed=0, **kw):
    x, W, y = make_problem(b, d, c, dtype=torch.float64, seed=seed, **{**PROBLEM, **kw})
    return x.to(DEV, dtype), W.to(DEV, dtype), y.to(DEV)


def _run(fn, x, W, y, backend, **kw):
    """loss, dL/dx, dL/dW of ``fn`` on ``backend``; margins given as tensors go to the device."""
    kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xl, Wl = leaf(x, W)
    loss = fn(xl, Wl, y, backend=backend, **kw)
    gx, gW = torch.autograd.grad(loss, (xl, Wl))
    return loss.detach(), gx, gW


def _check_fp32(fn, kw, x, W, y, rtol=1e-5):
    """fp32 kernels against the reference evaluated in float64 on the same fp32 inputs, 1e-5 relative
    (the fp32 reference itself drifts ~1e-5 from that at D = 512, so it is not the yardstick)."""
    ref = _run(fn, x.double(), W.double(), y, "reference", **kw)
    got = _run(fn, x, W, y, "triton", **kw)
    for name, g in zip(("loss", "dL/dx", "dL/dW"), got):
        assert g.dtype == x.dtype, f"{name}: dtype {g.dtype}, expected {x.dtype}"
    for name, g, r in zip(("loss", "dL/dx", "dL/dW"), got, ref):
        assert_close(g, r, rtol=rtol, name=f"{name} [{kw}]")
    return got


def _err(a, truth):
    return float((a.double() - truth).abs().max())


def _no_worse_than_plain(fn, kw, dtype, slack=1.5):
    """fp16/bf16: the kernel's error against a float64 truth (the reference on the rounded inputs,
    in float64) is at most ``slack`` times plain PyTorch's at the same input precision (the
    reference run on the same fp16/bf16 tensors), plus 1e-6 of the truth's scale."""
    x, W, y = _problem(dtype)
    truth = _run(fn, x.double(), W.double(), y, "reference", **kw)
    plain = _run(fn, x, W, y, "reference", **kw)
    got = _run(fn, x, W, y, "triton", **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype, "gradients come back in the input dtype"
    for name, t, p, g in zip(("loss", "dL/dx", "dL/dW"), truth, plain, got):
        assert torch.isfinite(g).all(), f"{name}: {int((~torch.isfinite(g)).sum())} non-finite values"
        scale = float(t.abs().max())
        e_plain, e_got = _err(p, t), _err(g, t)
        assert e_got <= slack * e_plain + 1e-6 * scale, (
            f"{name} [{dtype}, {kw}]: max error {e_got:.3e} against the float64 truth, plain PyTorch at the "
            f"same precision {e_plain:.3e} (bound {slack * e_plain + 1e-6 * scale:.3e}, scale {scale:.3e})")
    return truth, plain, got


# ---------------------------------------------------------------------------------------------
# every loss family, fp32, 1e-5 relative
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", MARGIN_FAMILIES)
def test_margin_family_fp32_equals_reference(kw):
    x, W, y = _problem()
    _check_fp32(F_.margin_softmax_loss, materialise_margins(kw, B), x, W, y)


@pytest.mark.parametrize("k", [1, 5])
def test_npt_fp32_equals_reference(k):
    x, W, y = _problem()
    _check_fp32(F_.npt_loss, dict(k=k, delta=0.8), x, W, y)


def test_npt_k16_and_reduction_sum():
    x, W, y = _problem(b=19, c=97)
    _check_fp32(F_.npt_loss, dict(k=16, delta=0.9, reduction="sum"), x, W, y)


def test_reduction_none_sum_and_stats_equal_reference():
    """Per-row losses, the arg-max column and the support-vector count, across class splits."""
    x, W, y = _problem()
    opts = MarginOptions(scale=32.0, reduction="none", negative="mv_adaptive", t=0.2)
    l0, s0 = F_.margin_softmax_with_stats(x, W, y, opts, 0.5, 0.0, backend="reference")
    l1, s1 = F_.margin_softmax_with_stats(x, W, y, opts, 0.5, 0.0, backend="triton")
    assert_close(l1, l0, rtol=1e-5, name="per-row loss")
    assert torch.equal(s1["pred"].cpu(), s0["pred"].cpu()), "arg-max column differs"
    assert torch.equal(s1["sv_count"].long().cpu(), s0["sv_count"].long().cpu()), "support-vector count differs"
    assert int(s0["sv_count"].sum()) > 0, "the problem must contain support vectors for this test to mean anything"
    _check_fp32(F_.margin_softmax_loss, dict(m2=0.5, reduction="sum"), x, W, y)


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    x, W, y = _problem()
    y = torch.full_like(y, -1)
    loss, gx, gW = _run(F_.margin_softmax_loss, x, W, y, "triton", m2=0.5)
    assert float(loss) == 0.0 and not gx.any() and not gW.any()


# ---------------------------------------------------------------------------------------------
# precision: fp16/bf16 no worse than plain PyTorch, fp64, mixed dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2,
                                                   theta_policy="easy")], ids=["arcface", "mv-adaptive-am"])
def test_half_precision_no_worse_than_plain_pytorch(kw, dtype):
    _no_worse_than_plain(F_.margin_softmax_loss, kw, dtype)


def test_npt_bf16_no_worse_than_plain_pytorch():
    _no_worse_than_plain(F_.npt_loss, dict(k=5, delta=0.8), torch.bfloat16)


def test_near_centre_rows_fp32_no_worse_than_torch_backend():
    """Rows at a cosine of 1 − 5e-9 in fp32: ill-conditioned (see PROBLEM), so the Triton kernels are
    held to the `torch` backend's error against the float64 truth, not to 1e-5."""
    x, W, y = _problem(near_centre=(5, 6))
    kw = dict(scale=32.0, m2=0.5, negative="mv_fixed", t=0.2)
    truth = _run(F_.margin_softmax_loss, x.double(), W.double(), y, "reference", **kw)
    ref = _run(F_.margin_softmax_loss, x, W, y, "torch", **kw)
    got = _run(F_.margin_softmax_loss, x, W, y, "triton", **kw)
    for name, t, r, g in zip(("loss", "dL/dx", "dL/dW"), truth, ref, got):
        scale = float(t.abs().max())
        e_ref, e_got = _err(r, t), _err(g, t)
        assert e_got <= 2.0 * e_ref + 2e-6 * scale, (
            f"{name} (near-centre rows): error {e_got:.3e} against the float64 truth, backend='torch' {e_ref:.3e} "
            f"(scale {scale:.3e})")


def test_fp64_equals_reference():
    x, W, y = _problem(torch.float64, near_centre=(5, 6))
    kw = dict(scale=32.0, m2=0.5, negative="sv", t=1.2, theta_policy="threshold")
    ref = _run(F_.margin_softmax_loss, x, W, y, "reference", **kw)
    got = _run(F_.margin_softmax_loss, x, W, y, "triton", **kw)
    for name, g, r in zip(("loss", "dL/dx", "dL/dW"), got, ref):
        assert g.dtype == torch.float64, name
        assert_close(g, r, rtol=1e-10, name=name)


def test_legacy_mixed_dtypes_bf16_embeddings_fp32_centres(monkeypatch):
    """The earlier kernels (FUSEDFACE_TRITON_PATH=legacy), x in bf16 with fp32 centres: dots in fp32."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "legacy")
    x, W, y = _problem()
    xb = x.to(torch.bfloat16)
    ref = _run(F_.margin_softmax_loss, xb, W, y, "reference", m2=0.5)
    got = _run(F_.margin_softmax_loss, xb, W, y, "triton", m2=0.5)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_close(got[0], ref[0], rtol=1e-5, name="loss")
    assert_close(got[2], ref[2], rtol=1e-5, name="dL/dW")
    assert_close(got[1], ref[1], rtol=1e-2, name="dL/dx (bf16)")


def test_legacy_fast_gradient_mode_is_bounded(monkeypatch):
    """FUSEDFACE_TRITON_FAST_GRAD=1 (legacy kernels) rounds dℓ/dc to bf16 for the gradient products:
    documented as less accurate; it must stay within a few bf16 ulps of plain PyTorch's error."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "legacy")
    monkeypatch.setenv("FUSEDFACE_TRITON_FAST_GRAD", "1")
    _no_worse_than_plain(F_.margin_softmax_loss, dict(m2=0.5), torch.bfloat16, slack=4.0)


# ---------------------------------------------------------------------------------------------
# determinism, atomics, class splits, the launcher contract
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["auto", "legacy"])
def test_default_is_bitwise_deterministic_and_atomic_mode_is_correct(monkeypatch, path):
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", path)
    x, W, y = _problem()
    a = _run(F_.margin_softmax_loss, x, W, y, "triton", m2=0.5)
    b = _run(F_.margin_softmax_loss, x, W, y, "triton", m2=0.5)
    for name, u, v in zip(("loss", "dL/dx", "dL/dW"), a, b):
        assert torch.equal(u, v), f"{name}: two default runs differ (max {float((u - v).abs().max()):.3e})"
    monkeypatch.setenv("FUSEDFACE_TRITON_DETERMINISTIC", "0")
    _check_fp32(F_.margin_softmax_loss, dict(m2=0.5), x, W, y)


def test_resident_gradient_kernels_equal_reference(monkeypatch):
    """(legacy kernels) One feature chunk covers D (the path the shipped GPU configs take at D <= 512): x and W rows
    are loaded once per tile for both dots."""
    b = 32 if _CUDA else 16
    # the interpreter's defaults cover (dx: streamed, dW: transposed); here the other two combinations
    cfg = {"dx": T.LaunchConfig(b, b, 64, 64, grad_t=True), "dw": T.LaunchConfig(b, b, 64, 64, grad_t=False)}
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "legacy")
    x, W, y = _problem()
    with T.override(configs=cfg):
        _check_fp32(F_.margin_softmax_loss, dict(m2=0.5, negative="sv", t=1.2), x, W, y)


@pytest.mark.parametrize("splits", [1, 7])
def test_class_splits_do_not_change_the_result(splits, monkeypatch):
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "legacy")
    x, W, y = _problem()
    with T.override(splits=splits):
        _check_fp32(F_.margin_softmax_loss, dict(m3=0.35, negative="mv_fixed", t=0.2, scale=32.0), x, W, y)
        _check_fp32(F_.npt_loss, dict(k=5), x, W, y)


def test_launcher_matches_torch_backend_signatures_and_dtypes():
    from fusedface.backends import torch as torch_backend
    assert importlib.import_module("fusedface.backends.triton").name == "triton"
    for fn in ("margin_forward", "margin_backward", "npt_forward"):
        assert inspect.signature(getattr(T, fn)) == inspect.signature(getattr(torch_backend, fn)), fn
    from fusedface._engine import margin_prologue
    x, W, y = _problem()
    opts = MarginOptions(negative="sv", t=1.3)
    valid, y_lab, xinv, winv, c_y, f, slope = margin_prologue(x, W, y, opts, 0.5, 0.0, torch.float32)
    got = T.margin_forward(x, W, xinv, winv, y_lab, f, opts, 64)
    exp = torch_backend.margin_forward(x, W, xinv, winv, y_lab, f, opts, 64)
    for name, g, e in zip(("lse", "pred", "sv"), got, exp):
        assert g.dtype == e.dtype and g.shape == e.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
    assert_close(got[0], exp[0], rtol=1e-6, name="lse")
    assert torch.equal(got[1], exp[1]) and torch.equal(got[2], exp[2])
    gl = torch.rand_like(xinv)
    dcy = torch.randn_like(xinv)
    lse = exp[0]
    # against the torch backend's kernels in float64; on a GPU the fp32 dots run as tf32x3 by default and these
    # synthetic dcy (~N(0, 1), 30x a real label-column gradient) differed from the fp32 torch-backend kernels by
    # 1.7e-5 of the max on an H100
    rtol = 2e-5 if _CUDA else 1e-5
    d = [t.double() if t.is_floating_point() else t for t in (x, W, xinv, winv, y_lab, f, lse, gl, dcy)]
    for need in [(True, False), (False, True)]:
        gx, dW = T.margin_backward(x, W, xinv, winv, y_lab, f, lse, gl, dcy, opts, 64, *need)
        ex, eW = torch_backend.margin_backward(*d, opts, 64, *need)
        assert (gx is None) == (ex is None) and (dW is None) == (eW is None)
        if gx is not None:
            assert gx.dtype == torch.float32, gx.dtype
            assert_close(gx, ex, rtol=rtol, name="Gx")
        if dW is not None:
            assert dW.dtype == W.dtype, dW.dtype
            assert_close(dW, eW, rtol=rtol, name="dW")
    v, i = T.npt_forward(x, W, xinv, winv, y_lab, 4, 64)
    ev, ei = torch_backend.npt_forward(x, W, xinv, winv, y_lab, 4, 64)
    assert v.dtype == ev.dtype and i.dtype == torch.int64
    assert_close(v, ev, rtol=1e-6, name="top-k values")
    assert torch.equal(i, ei), "top-k columns differ"


# ---------------------------------------------------------------------------------------------
# torch.compile registration
# ---------------------------------------------------------------------------------------------

def test_ops_are_registered_for_torch_compile():
    assert T.REGISTERED, f"torch.library.triton_op registration failed: {T.REGISTRATION_ERROR}"
    for op in ("margin_forward", "margin_backward_dx", "margin_backward_dw", "npt_topk"):
        assert hasattr(torch.ops.fusedface, op), op


def test_opcheck_registered_ops():
    """``torch.library.opcheck``: schema and fake (shape) kernels everywhere; on CUDA also the
    autograd-registration and AOT-dispatch checks (under the interpreter make_fx cannot trace an
    interpreted kernel, so those two run on GPUs only)."""
    x, W, y = _problem()
    opts = MarginOptions(negative="sv", t=1.3)
    from fusedface._engine import margin_prologue
    _, y_lab, xinv, winv, _, f, _ = margin_prologue(x, W, y, opts, 0.5, 0.0, torch.float32)
    lse, _, _ = torch.ops.fusedface.margin_forward(x, W, xinv, winv, y_lab, f, 64.0, 1.3, 0.3, 1)
    gl, dcy = torch.rand_like(xinv), torch.randn_like(xinv)
    tests = None if _CUDA else ("test_schema", "test_faketensor")
    cases = [
        (torch.ops.fusedface.margin_forward, (x, W, xinv, winv, y_lab, f, 64.0, 1.3, 0.3, 1)),
        (torch.ops.fusedface.margin_backward_dx, (x, W, xinv, winv, y_lab, f, lse, gl, dcy, 64.0, 1.3, 0.3, 1)),
        (torch.ops.fusedface.margin_backward_dw, (x, W, xinv, winv, y_lab, f, lse, gl, dcy, 64.0, 1.3, 0.3, 1)),
        (torch.ops.fusedface.npt_topk, (x, W, xinv, winv, y_lab, 3)),
    ]
    for op, args in cases:
        kw = {} if tests is None else {"test_utils": tests}
        torch.library.opcheck(op, args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamo_captures_the_public_call_in_one_graph(dtype):
    """Dynamo (``backend="eager"``: graph capture only, so it also runs under the interpreter) takes
    ``margin_softmax_loss(backend="triton")`` in one graph: the Triton step's ops (fp32) and the
    engine's registered op around the tile kernels (fp64), no graph break in the entry points."""
    x, W, y = _problem()
    x, W = x.to(dtype), W.to(dtype)

    def step(xx, WW):
        return F_.margin_softmax_loss(xx, WW, y, m2=0.5, reduction="sum", backend="triton")

    eager = _run(lambda a, b, yy, backend: step(a, b), x, W, y, "triton")
    got = _run(lambda a, b, yy, backend: torch.compile(step, fullgraph=True, backend="eager")(a, b), x, W, y, "triton")
    for name, g, e in zip(("loss", "dL/dx", "dL/dW"), got, eager):
        assert_close(g, e, rtol=1e-6, name=f"captured {name}")


_NO_INDUCTOR = "Inductor compiles Triton kernels for CUDA tensors only (under the interpreter the kernels are Python)"


@pytest.mark.skipif(not _CUDA, reason=_NO_INDUCTOR)
def test_torch_compile_inductor_fullgraph_engine_matches_eager():
    x, W, y = _problem(b=64, d=128, c=5000, ignore=(0,), past_pi=(3,))

    def step(xx, WW):
        return F_.margin_softmax_loss(xx, WW, y, m2=0.5, scale=32.0, negative="mv_adaptive", t=0.2, backend="triton")

    eager = _run(lambda a, b, yy, backend: step(a, b), x, W, y, "triton")
    compiled = torch.compile(step, fullgraph=True)
    got = _run(lambda a, b, yy, backend: compiled(a, b), x, W, y, "triton")
    for name, g, e in zip(("loss", "dL/dx", "dL/dW"), got, eager):
        assert_close(g, e, rtol=1e-5, name=f"compiled {name}")


@pytest.mark.skipif(not _CUDA, reason=_NO_INDUCTOR)
def test_torch_compile_public_api_matches_eager():
    """The public functional under torch.compile. It reaches the Triton kernels through the opaque
    registered op ``fusedface::margin_softmax_fwd`` / ``_bwd``, so Inductor does not see them: they
    run eagerly inside the op. ``fullgraph`` is not requested here."""
    x, W, y = _problem(b=64, d=128, c=5000, ignore=(0,), past_pi=(3,))

    def step(xx, WW):
        return F_.margin_softmax_loss(xx, WW, y, m2=0.5, backend="triton")

    eager = _run(lambda a, b, yy, backend: step(a, b), x, W, y, "triton")
    got = _run(lambda a, b, yy, backend: torch.compile(step)(a, b), x, W, y, "triton")
    for name, g, e in zip(("loss", "dL/dx", "dL/dW"), got, eager):
        assert_close(g, e, rtol=1e-5, name=f"compiled {name}")


@pytest.mark.skipif(not _CUDA, reason="input_precision of fp32 dots only matters on a GPU (the interpreter uses numpy)")
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_gpu_fp32_precision_modes(precision, monkeypatch):
    monkeypatch.setenv("FUSEDFACE_TRITON_FP32_PRECISION", precision)
    x, W, y = _problem(b=256, d=512, c=10_007)
    _check_fp32(F_.margin_softmax_loss, dict(m2=0.5, negative="sv", t=1.2), x, W, y)
    _check_fp32(F_.npt_loss, dict(k=5), x, W, y)


# ---------------------------------------------------------------------------------------------
# GPU only: a moderate shape with the shipped launch configs, and int64 offsets
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _CUDA, reason="the shipped GPU launch configs need a GPU (the interpreter uses small blocks)")
@pytest.mark.parametrize("kw", [dict(m2=0.5), dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2, theta_policy="easy")],
                         ids=["arcface", "mv-adaptive-am"])
def test_gpu_moderate_shape_fp32(kw):
    x, W, y = _problem(b=512, d=512, c=20_011, ignore=(0, 11), past_pi=(3,), near_centre=(5,))
    _check_fp32(F_.margin_softmax_loss, kw, x, W, y)


@pytest.mark.skipif(not _CUDA, reason="autotuning times kernels on a GPU")
def test_gpu_autotune_mode(monkeypatch):
    """FUSEDFACE_TRITON_AUTOTUNE=1, with a three-config space per kernel to keep the test short; the
    resident config whose BLOCK_D (64) is narrower than D (128) must be pruned, not run."""
    monkeypatch.setenv("FUSEDFACE_TRITON_AUTOTUNE", "1")

    def space(k):
        if k in ("dx", "dw"):  # only the gradient kernels take BLOCK_D and the resident/transposed flags
            return [T.LaunchConfig(32, 32, 32, 64, num_warps=4, num_stages=2, resident=True),
                    T.LaunchConfig(64, 32, 32, 128, num_warps=4, num_stages=2, resident=True, grad_t=True),
                    T.LaunchConfig(32, 32, 32, 64, num_warps=4, num_stages=2, resident=False)]
        return [T.LaunchConfig(32, 32, 32, num_warps=4, num_stages=2), T.LaunchConfig(64, 32, 32, num_warps=4)]
    monkeypatch.setattr(T, "TUNE_SPACE", {(k, p): space(k) for k in ("fwd", "dx", "dw", "npt") for p in ("16", "32", "64")})
    monkeypatch.setattr(T, "_TUNED", {})
    x, W, y = _problem(b=64, d=128, c=3001)
    _check_fp32(F_.margin_softmax_loss, dict(m2=0.5), x, W, y)
    _check_fp32(F_.npt_loss, dict(k=3), x, W, y)
    _no_worse_than_plain(F_.margin_softmax_loss, dict(m2=0.5), torch.bfloat16)
    assert set(T._TUNED) >= {("fwd", "32"), ("dx", "32"), ("dw", "32"), ("npt", "32"), ("dx", "16")}
    for key in (("dx", "32"), ("dw", "32")):
        best = T._TUNED[key].best_config.kwargs
        assert not best["RESIDENT"] or best["BLOCK_D"] >= 128, (key, best)


@pytest.mark.skipif(not _CUDA, reason="C·D > 2³¹ needs about 17 GiB of GPU memory")
def test_gpu_int64_offsets_beyond_2_pow_31():
    """C·D = 4,200,000 × 512 > 2³¹: the last classes are read and written at offsets past int32."""
    if torch.cuda.get_device_properties(DEV).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    Bb, Dd, Cc = 64, 512, 4_200_000
    W = torch.randn(Cc, Dd, device=DEV, dtype=torch.bfloat16, generator=g)
    y = torch.randint(Cc - 1000, Cc, (Bb,), device=DEV, generator=g)  # labels among the last classes
    x = W[y].float() + 0.5 * torch.randn(Bb, Dd, device=DEV, generator=g)
    x = x.to(torch.bfloat16)
    got = _run(F_.margin_softmax_loss, x, W, y, "triton", m2=0.5)
    ref = _run(F_.margin_softmax_loss, x, W, y, "torch", m2=0.5)
    assert_close(got[0], ref[0], rtol=1e-5, name="loss")
    assert_close(got[1].float(), ref[1].float(), rtol=2e-2, name="dL/dx")
    tail = slice(Cc - 1000, Cc)
    assert_close(got[2][tail].float(), ref[2][tail].float(), rtol=2e-2, name="dL/dW of the last 1000 classes")


# ---------------------------------------------------------------------------------------------
# the training step (fusedface/backends/triton.py): fused and hybrid paths, mixed precision, autocast
# ---------------------------------------------------------------------------------------------

TS = importlib.import_module("fusedface.backends.triton") if T is not None else None  # noqa: E402

STEP_FAMILIES = [p for p in MARGIN_FAMILIES if p.id in ("arcface", "arcface-threshold", "arcface-straight-through",
                                                         "cosface", "combined", "sphereface-easy", "sv-am",
                                                         "mv-fixed-arc", "elastic-per-row-m2")]


def _with_path(monkeypatch, path, split=False):
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", path)
    if split:
        monkeypatch.setenv("FUSEDFACE_TRITON_SPLIT_GRAD", "1")


@pytest.mark.parametrize("kw", STEP_FAMILIES)
def test_step_hybrid_fp32_every_family_equals_reference(kw, monkeypatch):
    """fp32 inputs take the hybrid (cuBLAS products + Triton epilogues): 1e-5 of the float64 reference."""
    _with_path(monkeypatch, "auto")
    x, W, y = _problem()
    assert TS.choose_path(x, W) == "hybrid"
    _check_fp32(F_.margin_softmax_loss, materialise_margins(kw, B), x, W, y)


@pytest.mark.parametrize("kw", STEP_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_step_fused_every_family(kw, dtype, monkeypatch):
    """The fused kernels (forced; auto takes them from 16,384 classes): the loss within 1e-5 of the
    float64 reference on the same rounded inputs, gradients within 2x plain PyTorch's error at the
    same precision, in the input dtype. (Single-dot gradient products with 37 rows and 301 classes,
    where one term can dominate a gradient entry: up to 1.3x (bf16) and 1.8x (fp16) here; 1.00x at
    B = 512, C = 50,000 — docs/perf.md. The 1.25x bar is held by the next test.)"""
    _with_path(monkeypatch, "fused")
    x, W, y = _problem(dtype)
    assert TS.choose_path(x, W) == "fused"
    kw = materialise_margins(kw, B)
    truth, plain, got = _no_worse_than_plain(F_.margin_softmax_loss, kw, dtype, slack=2.0)
    assert_close(got[0], truth[0], rtol=1e-5, name=f"loss [{dtype}, {kw}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path, split", [("auto", False), ("fused", True)], ids=["auto", "fused-split"])
def test_step_16bit_gradients_within_1_25x_plain(dtype, path, split, monkeypatch):
    """The issue's bar: bf16/fp16 gradient errors against a float64 truth at most 1.25x plain PyTorch's
    on the same 16-bit inputs — the default at this size (the hybrid) and the opt-in hi + lo split of
    the fused kernels."""
    _with_path(monkeypatch, path, split)
    for kw in (dict(m2=0.5), dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2, theta_policy="easy")):
        _no_worse_than_plain(F_.margin_softmax_loss, kw, dtype, slack=1.25)


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_step_mixed_dtypes_are_the_16bit_path(path, monkeypatch):
    """x bf16 with fp32 master W: the 16-bit path with W rounded in registers (fused) or per chunk
    (hybrid): the loss equals the same call with W rounded to bf16; dL/dW comes back in fp32 and
    equals that call's dL/dW (bf16-rounded) to bf16 precision; dL/dx in bf16."""
    _with_path(monkeypatch, path)
    x, W, y = _problem()
    xb = x.to(torch.bfloat16)
    got = _run(F_.margin_softmax_loss, xb, W, y, "triton", m2=0.5)
    ref16 = _run(F_.margin_softmax_loss, xb, W.to(torch.bfloat16), y, "triton", m2=0.5)
    truth = _run(F_.margin_softmax_loss, xb.double(), W.to(torch.bfloat16).double(), y, "reference", m2=0.5)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert abs(float(got[0]) - float(ref16[0])) <= 1e-5 * abs(float(ref16[0])), (float(got[0]), float(ref16[0]))
    assert_close(got[0], truth[0], rtol=1e-5, name="loss vs float64 on W rounded")
    assert_close(got[2], ref16[2].float(), rtol=8e-3, name="dL/dW (fp32) vs the bf16 call")
    monkeypatch.setenv("FUSEDFACE_TRITON_MIXED", "32")  # opt-out: fp32 products on the unrounded W
    opt = _run(F_.margin_softmax_loss, xb, W, y, "triton", m2=0.5)
    exact = _run(F_.margin_softmax_loss, xb.double(), W.double(), y, "reference", m2=0.5)
    assert_close(opt[0], exact[0], rtol=1e-5, name="loss, FUSEDFACE_TRITON_MIXED=32")
    assert_close(opt[2], exact[2], rtol=1e-5, name="dL/dW, FUSEDFACE_TRITON_MIXED=32")


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_step_autocast_runs_the_16bit_path_without_copying_w(path, monkeypatch):
    """fp32 x and W inside torch.autocast(bf16): x is cast (its gradient flows back in fp32), W is not
    copied — the result is the mixed call's, and both gradients come back in fp32."""
    _with_path(monkeypatch, path)
    x, W, y = _problem()
    mixed = _run(F_.margin_softmax_loss, x.to(torch.bfloat16), W, y, "triton", m2=0.5)
    xl, Wl = leaf(x, W)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = F_.margin_softmax_loss(xl, Wl, y, backend="triton", m2=0.5)
    gx, gW = torch.autograd.grad(loss, (xl, Wl))
    assert loss.dtype == torch.float32 and gx.dtype == torch.float32 and gW.dtype == torch.float32
    assert torch.equal(loss.detach(), mixed[0]), (float(loss), float(mixed[0]))
    assert torch.equal(gW, mixed[2])
    assert torch.equal(gx, mixed[1].float())
    monkeypatch.setenv("FUSEDFACE_TRITON_MIXED", "32")  # the opt-out: fp32 products, x not cast
    xl, Wl = leaf(x, W)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = F_.margin_softmax_loss(xl, Wl, y, backend="triton", m2=0.5)
    exact = _run(F_.margin_softmax_loss, x.double(), W.double(), y, "reference", m2=0.5)
    assert_close(loss, exact[0], rtol=1e-5, name="loss under autocast with FUSEDFACE_TRITON_MIXED=32")


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_step_reductions_ignored_rows_and_stats(path, monkeypatch):
    _with_path(monkeypatch, path)
    x, W, y = _problem(torch.bfloat16)
    kw = dict(scale=32.0, m3=0.35, negative="sv", t=1.2, theta_policy="easy")
    for red in ("none", "sum", "mean"):
        truth = _run(lambda *a, **k: F_.margin_softmax_loss(*a, **k).sum(), x.double(), W.double(), y, "reference",
                     reduction=red, **kw)
        got = _run(lambda *a, **k: F_.margin_softmax_loss(*a, **k).sum(), x, W, y, "triton", reduction=red, **kw)
        assert_close(got[0], truth[0], rtol=1e-5, name=f"loss [{red}]")
        assert_close(got[2], truth[2], rtol=2e-2, name=f"dL/dW [{red}]")
    rows = F_.margin_softmax_loss(x, W, y, backend="triton", reduction="none", **kw)
    assert rows.shape == (B,) and float(rows[0]) == 0.0 and float(rows[11]) == 0.0  # ignored rows
    from fusedface.functional import margin_softmax_with_stats
    opts = MarginOptions(**{k: v for k, v in kw.items() if k != "m3"})
    _, stats = margin_softmax_with_stats(x, W, y, opts, m3=0.35, backend="triton")
    _, ref_stats = margin_softmax_with_stats(x.double(), W.double(), y, opts, m3=0.35, backend="reference")
    valid = ref_stats["valid"]
    assert torch.equal(stats["pred"][valid].cpu(), ref_stats["pred"][valid].cpu())
    assert torch.equal(stats["sv_count"][valid].cpu().long(), ref_stats["sv_count"][valid].cpu().long())


@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_step_all_rows_ignored_and_nan_propagation(path, monkeypatch):
    _with_path(monkeypatch, path)
    x, W, y = _problem(torch.bfloat16)
    loss, gx, gW = _run(F_.margin_softmax_loss, x, W, torch.full_like(y, -1), "triton", m2=0.5)
    assert float(loss) == 0.0 and not gx.any() and not gW.any()
    Wn = W.clone()
    Wn[17, 3] = float("nan")
    rows = F_.margin_softmax_loss(x, Wn, y, backend="triton", m2=0.5, reduction="none")
    valid = y != -1
    assert torch.isnan(rows[valid]).all() and (rows[~valid] == 0).all()  # NaN in a centre reaches every row
    xn = x.clone()
    xn[4, 0] = float("nan")
    rows = F_.margin_softmax_loss(xn, W, y, backend="triton", m2=0.5, reduction="none")
    assert torch.isnan(rows[4]) and torch.isfinite(rows[torch.arange(B) != 4]).all()


def test_step_fused_variants_and_splits(monkeypatch):
    """The transposed forward (T_DOT), the x-resident forward (X_RES), the non-transposed, streamed and
    class-major dW, one and five class splits: the same result."""
    _with_path(monkeypatch, "fused")
    x, W, y = _problem(torch.bfloat16)
    kw = dict(scale=32.0, m2=0.5, negative="mv_fixed", t=0.2)
    base = _run(F_.margin_softmax_loss, x, W, y, "triton", **kw)
    variants = [dict(fwd=T.LaunchConfig(16, 32, 16, 512, grad_t=True), splits=1),
                dict(fwd=T.LaunchConfig(16, 32, 32, 512, resident=True)),  # x resident (X_RES)
                dict(dw=T.LaunchConfig(16, 32, 32, 512, grad_t=False), splits=5),
                dict(dw=T.LaunchConfig(16, 32, 16, 512, grad_t=True, resident=False)),
                dict(dw=T.LaunchConfig(16, 64, 32, 512, grad_t=True))]  # class-major recompute (T_RECOMP)
    for v in variants:
        with TS.override(**v):
            got = _run(F_.margin_softmax_loss, x, W, y, "triton", **kw)
        assert_close(got[0], base[0], rtol=1e-6, name=f"loss {v}")
        for name, g, b in zip(("dL/dx", "dL/dW"), got[1:], base[1:]):
            assert_close(g, b, rtol=1e-2, name=f"{name} {v}")


def test_step_fp64_and_legacy_path_use_the_earlier_kernels(monkeypatch):
    x, W, y = _problem(torch.float64)
    assert not TS.applies(x, W)
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "legacy")
    assert not TS.applies(x.float(), W.float())


def test_step_launch_count_and_gemm_equivalents():
    """Through the public API, ArcFace bf16 on the fused path: at most 12 device operations per
    forward + backward (Triton launches plus kernel-launching torch ops; the label-range check that
    runs only for CPU tensors excluded) and 4 GEMM-equivalents of dot work (bench/count_tensor_work.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("count_tensor_work", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "count_tensor_work.py"))
    ctw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ctw)
    for dtype in ("bf16", "mixed"):
        r = ctw.count(64, 64, 512, dtype, "sm90", path="fused")
        assert r["path"] == "fused"
        assert r["device_ops"] <= 12, r
        assert abs(r["gemm_eq"] - 4.0) < 0.05, r
    r = ctw.count(64, 64, 512, "fp32", "sm90", path=None)
    assert r["path"] == "hybrid" and abs(r["gemm_eq"] - 4.0) < 0.05, r


def test_step_opcheck():
    x, W, y = _problem(torch.bfloat16)
    args = (x, W, y, None, None, 0.5, 0.0, 64.0, 1.0, "none", "exact", 1.0, 0.0, False, "mean", -1, True, False)
    torch.library.opcheck(torch.ops.fusedface.triton_step_fwd, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not _CUDA, reason="CUDA graphs need a GPU")
def test_gpu_step_is_cuda_graph_capturable():
    """The whole training step (forward, backward) captured in a CUDA graph and replayed: no host
    synchronisation, static shapes, allocations from the graph's pool; replays equal eager."""
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(20000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 20000, (256,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            x.grad = W.grad = None
            F_.margin_softmax_loss(x, W, y, backend="triton", m2=0.5).backward()
    torch.cuda.current_stream().wait_stream(s)
    eager = (x.grad.clone(), W.grad.clone())
    x.grad = W.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = F_.margin_softmax_loss(x, W, y, backend="triton", m2=0.5)
        loss.backward()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(x.grad, eager[0]) and torch.equal(W.grad, eager[1])
