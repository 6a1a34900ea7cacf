"""Micro-benchmarks of NPT-Loss (nearest proxies triplet, k = 5 nearest negative proxies, δ = 0.5).

    pytest bench/bench_npt.py [--bench-C 1M ...]      python bench/report.py --op npt

Providers: fusedface's backends from ``fusedface.available_backends(device)`` (``reference`` is the
materialised oracle: ``[B, C]`` cosines, a masked copy and ``topk``; the fused backends stream a
top-k over class tiles). No library ships NPT-Loss, so there is no third-party peer.

FLOPs: forward ``2·B·C·D`` for every provider. The fused backward is sparse (only the ``k + 1``
selected columns carry gradient: ``O(B·k·D)``, counted as 0 class-GEMM FLOPs, so a fused
backward-only point has no GEMM fraction); the materialised backward multiplies the ``[B, C]``
gradient of the cosines by ``W`` and ``x``: ``2 × 2·B·C·D``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_margin_softmax import _backend_available, make_inputs  # noqa: E402
import harness  # noqa: E402
from harness import Case, Provider, Shape  # noqa: E402

OP = "npt"
LOSSES = ("npt",)
DEFAULT_LOSSES = LOSSES
NPT_KW = dict(delta=0.5, k=5, r=1.0)

PROVIDERS = {
    "reference": Provider("fusedface reference (materialised oracle)", LOSSES, False, _backend_available("reference"), 5),
    "torch": Provider("fusedface torch (plain-PyTorch tiles)", LOSSES, True, _backend_available("torch")),
    "native": Provider("fusedface native (C++)", LOSSES, True, _backend_available("native")),
    "triton": Provider("fusedface triton", LOSSES, True, _backend_available("triton"), timed_on_cpu=False,
                       note="on CPU only under TRITON_INTERPRET=1, an interpreter for tests: not timed"),
}


def provider_names(device="cpu"):
    return list(PROVIDERS)


def flops(provider: str, shape: Shape) -> float:
    g = 2.0 * shape.B * shape.C * shape.D
    bwd = 0.0 if PROVIDERS[provider].fused else 2 * g
    return {"forward": g, "backward": bwd, "full": g + bwd}[shape.mode]


def setup(provider: str, shape: Shape) -> Case:
    why = PROVIDERS[provider].available(shape.device)
    if why:
        raise RuntimeError(why)
    from fusedface import functional as F_
    x, W, y = make_inputs(shape)
    return Case(lambda: F_.npt_loss(x, W, y, backend=provider, **NPT_KW), [x, W])


def test_npt(benchmark, bench_point, bench_options):
    harness.pytest_point(benchmark, sys.modules[__name__], bench_point, bench_options)
