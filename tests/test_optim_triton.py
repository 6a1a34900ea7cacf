"""fusedface.optim on ``backend="triton"``: the update applied by the Triton step's backward itself.

The fused path applies ``torch.optim``'s update in the dW kernel's epilogue (``OPTIM`` = 1 SGD, 2 AdamW),
the hybrid path per class chunk with ``optim_update_kernel``; per-row (sparse) state falls back to
``Update.apply`` on each slice's dense ``dL/dW``. Runs on CUDA tensors when a GPU is present, else on
CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py imports triton under the interpreter
first, as for tests/test_triton.py), with larger interpreter blocks than the launcher's defaults
(fewer interpreted programs: about 0.5 s per step at C = 1009) that still leave several class chunks
and partial tiles.
"""
from __future__ import annotations


import pytest
import torch

from conftest import assert_close, triton_test_file

import fusedface
from fusedface import _inbackward as IB

DEV, TS, pytestmark = triton_test_file("fusedface.backends.triton")
_CUDA = DEV.type == "cuda"


B, D, C = 24, 32, 1009
STEPS = 20


def _blocks() -> dict:
    """Interpreter blocks: 4 hybrid chunks of 256 classes (the last partial), 8 fused dW tiles of 128."""
    if _CUDA:
        return {}
    from fusedface.backends.triton_tiles import LaunchConfig
    return dict(hybrid_chunk=256, epi=LaunchConfig(32, 128, 0), epi_bwd=LaunchConfig(32, 128, 0),
                fwd=LaunchConfig(32, 128, 32, 512, resident=False), dw=LaunchConfig(32, 128, 32, 512, grad_t=True),
                splits=2)


def _data(steps: int):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(C, D, generator=g)
    xs = [torch.randn(B, D, generator=g) for _ in range(steps)]
    ys = []
    for _ in range(steps):
        y = torch.randint(0, C, (B,), generator=g)
        y[::5] = -1  # ignored rows
        ys.append(y)
    return W0, xs, ys


def _train(backend, make_opt, steps, x_dtype=torch.float32, w_dtype=torch.float32, in_backward=False, snaps=None):
    """``steps`` steps of ArcFace with a StepLR(5, 0.5) schedule: ``(W, state, [dL/dx per step])``;
    ``snaps``: a list that gets ``(W, state, [])`` after each step."""
    W0, xs, ys = _data(steps)
    head = fusedface.ArcFace(D, C, backend=backend, device=DEV, dtype=w_dtype)
    with torch.no_grad():
        head.weight.copy_(W0.to(w_dtype))
    opt = make_opt(head.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    dxs = []
    with TS.override(**_blocks()):
        for i in range(steps):
            x = xs[i].to(DEV, x_dtype).requires_grad_(True)
            head(x, ys[i].to(DEV)).backward()
            if in_backward:
                assert isinstance(head.weight.grad, fusedface.optim.AppliedGrad), type(head.weight.grad)
            else:
                assert type(head.weight.grad) is torch.Tensor
            dxs.append(x.grad.clone())
            opt.step()
            opt.zero_grad()
            sched.step()
            if snaps is not None:
                snaps.append(_snapshot(head, opt, []))
    return _snapshot(head, opt, dxs)


def _snapshot(head, opt, dxs):
    state = {k: v.clone() for k, v in opt.state[head.weight].items() if torch.is_tensor(v) and v.dim() == 2}
    return head.weight.detach().clone(), state, dxs


def _sgd(mod, nesterov, **kw):
    return lambda p: mod.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, **kw)


def _adamw(mod, **kw):
    # lr 1e-3: AdamW normalises each entry by √v, so the rounding noise of a tiny gradient entry becomes a
    # change of W of lr × (its relative noise); at lr = 1e-2 the dense Triton step + torch.optim already
    # differs from the reference + torch.optim by 2.6e-5 of max|W| after 20 steps (the in-backward step from
    # the dense one by 1e-7), at 1e-3 by 2.6e-6
    return lambda p: mod.AdamW(p, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-2, **kw)


def _compare(got, exp, rtol, state_rtol=None, dx_rtol=None):
    W, st, dxs = got
    We, ste, dxe = exp
    assert_close(W, We, rtol=rtol, name="W")
    assert set(st) == set(ste), (set(st), set(ste))
    for k in st:
        assert st[k].dtype == ste[k].dtype, (k, st[k].dtype, ste[k].dtype)
        assert_close(st[k].float(), ste[k].float(), rtol=state_rtol or rtol, name=k)
    for i, (a, e) in enumerate(zip(dxs, dxe)):
        assert_close(a.float(), e.float(), rtol=dx_rtol or rtol, name=f"dL/dx, step {i}")


# ---------------------------------------------------------------------------------------------
# hybrid path (fp32): 20 steps against backend="reference" + torch.optim
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_hybrid_sgd_20_steps_equal_reference_with_torch_optim(nesterov, monkeypatch):
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "hybrid")
    got = _train("triton", _sgd(fusedface.optim, nesterov), STEPS, in_backward=True)
    ref = _train("reference", _sgd(torch.optim, nesterov), STEPS)
    _compare(got, ref, rtol=1e-5)


def test_hybrid_adamw_20_steps_equal_reference_with_torch_optim(monkeypatch):
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "hybrid")
    got = _train("triton", _adamw(fusedface.optim), STEPS, in_backward=True)
    ref = _train("reference", _adamw(torch.optim), STEPS)
    _compare(got, ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the epilogue alone: the same Triton step without the optimizer + torch.optim on its dense dW
# ---------------------------------------------------------------------------------------------

EPILOGUE_CASES = [pytest.param(lambda m: _sgd(m, False), id="sgd"), pytest.param(lambda m: _sgd(m, True), id="nesterov"),
                  pytest.param(lambda m: _adamw(m), id="adamw")]


@pytest.mark.parametrize("make", EPILOGUE_CASES)
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_update_equals_dense_step_plus_torch_optim(make, path, monkeypatch):
    """Fused: bf16 x with fp32 master W (the dW kernel's epilogue, OPTIM = 1/2); hybrid: fp32
    (optim_update_kernel per chunk). The first step's dL/dx is bitwise the dense step's (formed from W
    before its update); after it (the same gradient) W and the state are within fp32 rounding of
    torch.optim's (1e-6 of their max). 4 steps: the fused path (bf16 products on W rounded) stays
    within 1e-6; the fp32 hybrid within 1e-5, where W's last-bit differences, through logits scaled by
    64, move the next gradients by ~1e-6 of their size."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", path)
    xdt = torch.bfloat16 if path == "fused" else torch.float32
    snaps, dsnaps = [], []
    got = _train("triton", make(fusedface.optim), 4, x_dtype=xdt, in_backward=True, snaps=snaps)
    dense = _train("triton", make(torch.optim), 4, x_dtype=xdt, snaps=dsnaps)
    assert torch.equal(got[2][0], dense[2][0]), "dL/dx of the first step differs: W was updated before dL/dx read it"
    _compare(snaps[0], dsnaps[0], rtol=1e-6)
    _compare(got, dense, rtol=1e-6 if path == "fused" else 1e-5, dx_rtol=1e-2 if path == "fused" else 1e-5)


def _kernels_off(monkeypatch):
    """The launcher's fall-back: the dense dW slice by slice (4 slices of 256 classes), each through
    ``Update.apply`` (torch ops)."""
    monkeypatch.setattr(TS, "_optim_kernel_args", lambda *a: None)
    monkeypatch.setattr(IB, "SLICE_BYTES", 4 * D * 256)


@pytest.mark.parametrize("path, w_dtype", [("fused", torch.float32), ("fused", torch.bfloat16),
                                           ("hybrid", torch.float32)], ids=["fused", "fused-bf16W", "hybrid"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_bf16_state_kernels_equal_torch_op_update(path, w_dtype, kind, monkeypatch):
    """``state_dtype=torch.bfloat16`` (and a bf16 W): the kernels compute in fp32 and round what they
    store, as ``Update.apply``'s torch ops do (the fall-back path, which computes the same dense dW):
    3 steps, equal to one bf16 rounding (an fp32 last-bit difference may round the other way; measured:
    bitwise equal state, W within 7e-7 of its max for fp32 W, bitwise for bf16 W)."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", path)
    xdt = torch.bfloat16 if path == "fused" else torch.float32
    make = _sgd(fusedface.optim, True, state_dtype=torch.bfloat16) if kind == "sgd" else \
        _adamw(fusedface.optim, state_dtype=torch.bfloat16)
    got = _train("triton", make, 3, x_dtype=xdt, w_dtype=w_dtype, in_backward=True)
    assert all(v.dtype == torch.bfloat16 for v in got[1].values())
    with monkeypatch.context() as m:
        _kernels_off(m)
        ref = _train("triton", make, 3, x_dtype=xdt, w_dtype=w_dtype, in_backward=True)
    assert torch.equal(got[2][0], ref[2][0])
    ulp = 2.0 ** -8  # one bf16 rounding of the largest entry
    _compare(got, ref, rtol=ulp if w_dtype == torch.bfloat16 else 1e-6, state_rtol=ulp,
             dx_rtol=ulp if xdt == torch.bfloat16 else 1e-5)


def test_per_row_state_falls_back_to_update_apply(monkeypatch):
    """Per-row step counts (``row_step`` in the state: a sparse Partial FC run's state_dict) are not
    covered by the kernels: the launcher forms the dense dW slice by slice and hands it to
    ``Update.apply``. With every row at the parameter's step count the result is the dense one."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", "fused")
    monkeypatch.setattr(IB, "SLICE_BYTES", 4 * D * 256)  # 4 slices
    make = _adamw(fusedface.optim)
    got = _train("triton", make, 3, x_dtype=torch.bfloat16, in_backward=True)
    W0, xs, ys = _data(3)
    head = fusedface.ArcFace(D, C, backend="triton", device=DEV)
    with torch.no_grad():
        head.weight.copy_(W0)
    opt = make(head.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    calls = []
    real_apply = IB.Update.apply
    monkeypatch.setattr(IB.Update, "apply", lambda self, lo, hi, g: (calls.append((lo, hi)), real_apply(self, lo, hi, g)))
    with TS.override(**_blocks()):
        for i in range(3):
            if i == 1:
                opt.state[head.weight]["row_step"] = torch.full((C,), 1, dtype=torch.int32, device=DEV)
            head(xs[i].to(DEV, torch.bfloat16).requires_grad_(True), ys[i].to(DEV)).backward()
            opt.step()
            sched.step()
    assert calls == [(0, 256), (256, 512), (512, 768), (768, 1009)] * 2, calls
    assert (opt.state[head.weight]["row_step"] == 3).all()
    assert_close(head.weight.detach(), got[0], rtol=1e-6, name="W")
    for k in ("exp_avg", "exp_avg_sq"):
        assert_close(opt.state[head.weight][k], got[1][k], rtol=1e-6, name=k)


# ---------------------------------------------------------------------------------------------
# the dense path and the marker
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_without_optimizer_the_dense_gradient_is_unchanged(path, monkeypatch):
    """No in-backward optimizer: W.grad is the dense dL/dW (the OPTIM = 0 kernel), W is not touched,
    and it equals the float64 reference (fp32: 1e-5; bf16 x: bf16 rounding). After .detach_head() the
    head is back on this path; with the optimizer attached, W.grad is the AppliedGrad marker and
    refuses every use."""
    monkeypatch.setenv("FUSEDFACE_TRITON_PATH", path)
    W0, xs, ys = _data(1)
    xdt = torch.bfloat16 if path == "fused" else torch.float32
    head = fusedface.ArcFace(D, C, backend="triton", device=DEV)
    with torch.no_grad():
        head.weight.copy_(W0)
    ref = fusedface.ArcFace(D, C, backend="reference", device=DEV, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(W0)
    x = xs[0].to(DEV, xdt)
    ref(x.double(), ys[0].to(DEV)).backward()
    with TS.override(**_blocks()):
        head(x, ys[0].to(DEV)).backward()
        assert type(head.weight.grad) is torch.Tensor and torch.equal(head.weight.detach(), W0.to(DEV))
        assert_close(head.weight.grad, ref.weight.grad, rtol=1e-5 if path == "hybrid" else 2e-2, name="dL/dW")
        dense = head.weight.grad.clone()
        head.weight.grad = None
        opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
        head(x, ys[0].to(DEV)).backward()
        assert isinstance(head.weight.grad, fusedface.optim.AppliedGrad)
        with pytest.raises(fusedface.optim.InBackwardError):
            head.weight.grad.sum()
        # plain SGD (no momentum, no decay): W moved by exactly −lr·dW (dW rounded to W's dtype, fp32 here)
        assert_close(head.weight.detach(), W0.to(DEV) - 0.1 * dense, rtol=1e-6, name="W after plain SGD")
        opt.step()
        opt.detach_head()
        assert head.weight.grad is None
        with torch.no_grad():
            head.weight.copy_(W0)
        head(x, ys[0].to(DEV)).backward()
        assert type(head.weight.grad) is torch.Tensor and torch.equal(head.weight.grad, dense)
