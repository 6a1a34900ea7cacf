"""The heads of issue 16 on ``backend="triton"``: each equals its float64 reference within 1e-5 in
fp32 (CUDA tensors where a GPU is, else CPU tensors under ``TRITON_INTERPRET=1``; skipped with the
reason where Triton cannot run). The Triton whole-step kernels cover the seed family only
(``opts.seed_family``, no margin that requires grad): these heads run the engine's op with the Triton
tile kernels, whatever the dtype; a bf16 head is checked below.
"""
from __future__ import annotations

import pytest
import torch

import fusedface
from conftest import triton_test_file
from test_beyond_seeds import HEADS, _close, _pair

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
