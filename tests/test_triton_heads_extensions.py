"""The heads of issue 16 on ``backend="triton"``: each equals its float64 reference within 1e-5 in
fp32 (CUDA tensors where a GPU is, else CPU tensors under ``TRITON_INTERPRET=1``; skipped with the
reason where Triton cannot run). The Triton whole-step kernels cover the seed family and AdaFace's
``theta_policy="clip"`` (``triton.step_covers``; no margin that requires grad): AdaFace runs the
step (fp32 here: its hybrid path), the other heads the engine's op with the Triton tile kernels,
whatever the dtype; a bf16 head is checked below.
"""
from __future__ import annotations

import pytest
import torch

import fusedface
from conftest import triton_test_file
from test_beyond_seeds import HEADS, _close, _data, _pair
from fusedface import functional as F_

DEV, T, pytestmark = triton_test_file("fusedface.backends.triton")


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_equal_their_reference_fp32(name):
    ref, fused, x, y = _pair(name, "triton")
    fused = fused.float().to(DEV)
    for step in range(2):
        xs = (x * (1.0 + 0.1 * step)).requires_grad_(True)
        xf = xs.detach().float().to(DEV).requires_grad_(True)
        lr, lf = ref(xs, y), fused(xf, y.to(DEV))
        _close(lf.double().cpu(), lr, 1e-5)
        gr = torch.autograd.grad(lr, [xs, ref.weight])
        gf = torch.autograd.grad(lf, [xf, fused.weight])
        for a, b in zip(gf, gr):
            _close(a.double().cpu(), b, 1e-5)
        for (n, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
            _close(a.double().cpu(), b, 1e-6)


def test_sixteen_bit_outside_the_seed_family_takes_the_op_path():
    """bf16 inputs (which the whole-step kernels would take for ArcFace) with sub-centres: the op path,
    and the same loss as the torch backend on the same bf16 inputs."""
    torch.manual_seed(0)
    head = fusedface.SubCenterArcFace(16, 40, k=2, backend="triton", device=DEV, dtype=torch.bfloat16)
    twin = fusedface.SubCenterArcFace(16, 40, k=2, backend="torch", dtype=torch.bfloat16)
    twin.load_state_dict({k: v.cpu() for k, v in head.state_dict().items()})
    x = torch.randn(24, 16).to(torch.bfloat16)
    y = torch.randint(0, 40, (24,))
    _close(head(x.to(DEV), y.to(DEV)).double().cpu(), twin(x, y).double(), 1e-5)


def _count_steps(monkeypatch):
    import fusedface.backends.triton as TB
    calls = []
    real = TB.margin_step
    monkeypatch.setattr(TB, "margin_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_which_heads_take_the_whole_step(monkeypatch):
    """AdaFace (the clip policy, per-row margins without grad) runs the whole-step kernels; the
    curricular rewrite, filtering, sub-centres and MagFace's differentiable margin do not."""
    calls = _count_steps(monkeypatch)
    for name in HEADS:
        _, fused, x, y = _pair(name, "triton")
        fused = fused.float().to(DEV)
        before = len(calls)
        fused(x.float().to(DEV).requires_grad_(True), y.to(DEV)).backward()
        assert (len(calls) > before) == (name == "adaface"), name


@pytest.mark.parametrize("grad_mode", ["exact", "straight_through"])
def test_step_clip_at_clamped_target_cosines(grad_mode, monkeypatch):
    """The step's prologue (POLICY 3) on rows whose target cosine lies beyond ±(1 − ε) and with angles
    clipped at ε: the fp64 reference's loss and gradients within 1e-5, in both gradient modes."""
    calls = _count_steps(monkeypatch)
    x, W, y = _data(8, ignored=True)
    x[:6] = W[y[:6].clamp(min=0)] * 3.0 + 1e-3 * x[:6]
    x[6:9] = -W[y[6:9].clamp(min=0)] * 2.0 + 1e-3 * x[6:9]
    m2 = torch.linspace(-0.4, 0.4, x.shape[0], dtype=torch.float64)   # negative angular margins: angle clip at ε
    m3 = torch.linspace(0.0, 0.8, x.shape[0], dtype=torch.float64)
    kw = dict(scale=16.0, theta_policy="clip", grad_mode=grad_mode)
    xr, Wr = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    lr = F_.margin_softmax_loss(xr, Wr, y, m2=m2, m3=m3, backend="reference", **kw)
    xf = x.float().to(DEV).requires_grad_(True)
    Wf = W.float().to(DEV).requires_grad_(True)
    lf = F_.margin_softmax_loss(xf, Wf, y.to(DEV), m2=m2.float().to(DEV), m3=m3.float().to(DEV), backend="triton", **kw)
    assert calls, "the clip policy should run the whole-step kernels"
    _close(lf.double().cpu(), lr, 1e-5)
    for a, b in zip(torch.autograd.grad(lf, [xf, Wf]), torch.autograd.grad(lr, [xr, Wr])):
        _close(a.double().cpu(), b, 1e-5)
