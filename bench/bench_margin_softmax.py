"""Micro-benchmarks of the margin-softmax loss: every fusedface backend against the peers.

    pytest bench/bench_margin_softmax.py                        # the default grid, timed by pytest-benchmark
    pytest bench/bench_margin_softmax.py --bench-grid full      # B∈{128,512} × D∈{128,512} × C∈{10k,100k,1M} × fp32/bf16 × modes
    pytest bench/bench_margin_softmax.py --bench-C 1M --bench-provider native insightface --bench-memory
    pytest bench --benchmark-disable                            # smoke test: every provider and mode once, tiny shapes
    python bench/report.py                                      # the same points, each in a fresh process, with peak memory

Loss configurations (``shape.loss``):

* ``arcface``: s = 64, ``cos(θ + 0.5)``; ``cosface``: s = 64, ``cos θ − 0.35``;
* ``ce``: plain softmax cross-entropy, the configuration of ``torch.nn.functional.linear_cross_entropy``
  (m1 = 1, m2 = m3 = 0). fusedface still normalises ``x`` and ``W`` and scales by s = 64 in this
  configuration (it has no un-normalised mode); the cost is the same GEMMs plus O(B·D + C·D) norms.

Providers:

* ``reference``, ``torch``, ``native``, ``triton``: fusedface's backends (``backend=NAME``), whichever
  ``fusedface.available_backends(device)`` lists at run time. ``reference`` is fusedface's own
  materialised oracle (clarity first: several ``[B, C]`` temporaries).
* ``insightface``: the materialised head as InsightFace writes it (``harness.insightface_loss``:
  ``F.linear`` of the normalised ``x`` and ``W``, the margin applied in place under ``no_grad`` — a
  straight-through gradient, as InsightFace's ``CombinedMarginLoss`` — then ``F.cross_entropy`` of
  ``s·logits``).
* ``insightface_compiled``: ``torch.compile`` (inductor, ``dynamic=True``) of the same function;
  compilation happens in the warm-up, outside the timed and measured step.
* ``pml``: pytorch-metric-learning's ``ArcFaceLoss`` (margin 28.65° = 0.5 rad) / ``CosFaceLoss``
  (m = 0.35), s = 64, its ``W`` stored ``[D, C]`` as pml does (a benchmark-only dependency).
* ``linear_ce``: ``F.linear_cross_entropy(x, W, y)`` (its reference path, ``options=None``);
  ``linear_ce_chunked``: the same with ``options=LinearCrossEntropyOptions()`` (torch's chunking over
  the batch, per-device defaults). Plain CE on raw ``x·Wᵀ`` (no normalisation, no margin).
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Case, Provider, Shape, insightface_loss  # noqa: E402  (the peer: harness.py)

OP = "margin_softmax"
LOSSES = ("arcface", "cosface", "ce")
DEFAULT_LOSSES = LOSSES
LOSS_KW = {  # fusedface keyword arguments of each configuration
    "arcface": dict(scale=64.0, m2=0.5),
    "cosface": dict(scale=64.0, m3=0.35),
    "ce": dict(scale=64.0, m1=1.0, m2=0.0, m3=0.0),
}


def _backend_available(name):
    def check(device):
        import fusedface
        from fusedface.backends.registry import _HOW
        avail = fusedface.available_backends(device)
        if name in avail:
            return None
        return f"backend {name!r} not available for {device} here (available: {', '.join(avail)}): {_HOW.get(name, '')}"
    return check


def _always(device):
    return None


def _pml_available(device):
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return "pytorch-metric-learning is not installed (pip install pytorch-metric-learning==2.9.0)"
    return None


def _linear_ce_available(device):
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def _linear_ce_chunked_available(device):
    why = _linear_ce_available(device)
    if why is None and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        why = f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
    return why


_FF = ("arcface", "cosface", "ce")
PROVIDERS = {
    "reference": Provider("fusedface reference (materialised oracle)", _FF, False, _backend_available("reference"), 9),
    "torch": Provider("fusedface torch (plain-PyTorch tiles)", _FF, True, _backend_available("torch")),
    "native": Provider("fusedface native (C++)", _FF, True, _backend_available("native")),
    "triton": Provider("fusedface triton", _FF, True, _backend_available("triton"), timed_on_cpu=False,
                       note="on CPU only under TRITON_INTERPRET=1, an interpreter for tests: not timed"),
    "insightface": Provider("InsightFace-style materialised", ("arcface", "cosface"), False, _always, 4),
    "insightface_compiled": Provider("torch.compile(InsightFace-style)", ("arcface", "cosface"), False, _always, 4),
    "pml": Provider("pytorch-metric-learning", ("arcface", "cosface"), False, _pml_available, 8),
    "linear_ce": Provider("F.linear_cross_entropy", ("ce",), False, _linear_ce_available, 3),
    "linear_ce_chunked": Provider("F.linear_cross_entropy (chunked)", ("ce",), False, _linear_ce_chunked_available, 2),
}
FUSEDFACE = ("reference", "torch", "native", "triton")


def provider_names(device="cpu"):
    """Every provider: fusedface's backends (unavailable ones are reported, not dropped) and the peers."""
    return list(PROVIDERS)


def default_providers(loss: str, device="cpu"):
    """The default subset: every provider for ArcFace; for CosFace and plain CE (there only to
    compare with the peers that implement those) fusedface's ``auto`` backend and the peers."""
    if loss == "arcface":
        return list(PROVIDERS)
    import torch as _torch
    from fusedface.backends import resolve
    auto = resolve("auto", _torch.device(device))[0]
    return [auto] + [p for p, v in PROVIDERS.items() if p not in FUSEDFACE and loss in v.losses]


def flops(provider: str, shape: Shape) -> float:
    return harness.flops(shape, PROVIDERS[provider].fused)


def make_inputs(shape: Shape, seed: int = 0):
    """``x [B, D]``, ``W [C, D]`` (leaves, requires_grad) and ``y [B]``: embeddings near their class
    centre (target cosine about 0.85), so the softmax is neither uniform nor saturated."""
    dev, dt = shape.device, shape.torch_dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    W = torch.randn(shape.C, shape.D, generator=g, device=dev) * 0.05
    y = torch.randint(0, shape.C, (shape.B,), generator=g, device=dev)
    x = F.normalize(W[y], dim=1) * 3.0 + (1.5 / math.sqrt(shape.D)) * torch.randn(shape.B, shape.D, generator=g, device=dev)
    return x.to(dt).requires_grad_(True), W.to(dt).requires_grad_(True), y


_compiled = None


def _compiled_insightface():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(insightface_loss, dynamic=True)
    return _compiled


def setup(provider: str, shape: Shape) -> Case:
    """Inputs and the forward closure of ``provider`` at ``shape`` (one per op, as STYLE.md asks)."""
    why = PROVIDERS[provider].available(shape.device)
    if why:
        raise RuntimeError(why)
    if shape.loss not in PROVIDERS[provider].losses:
        raise ValueError(f"provider {provider!r} does not implement loss {shape.loss!r}")
    x, W, y = make_inputs(shape)
    kw = LOSS_KW[shape.loss]
    if provider in FUSEDFACE:
        from fusedface import functional as F_
        return Case(lambda: F_.margin_softmax_loss(x, W, y, backend=provider, **kw), [x, W])
    if provider in ("insightface", "insightface_compiled"):
        fn = insightface_loss if provider == "insightface" else _compiled_insightface()
        m2, m3 = kw.get("m2", 0.0), kw.get("m3", 0.0)
        return Case(lambda: fn(x, W, y, kw["scale"], m2, m3), [x, W])
    if provider == "pml":
        from pytorch_metric_learning import losses
        if shape.loss == "arcface":
            fn = losses.ArcFaceLoss(shape.C, shape.D, margin=math.degrees(kw["m2"]), scale=kw["scale"])
        else:
            fn = losses.CosFaceLoss(shape.C, shape.D, margin=kw["m3"], scale=kw["scale"])
        fn = fn.to(shape.device)
        with torch.no_grad():  # pml keeps W as [D, C]: the same centres, transposed
            fn.W.data = W.detach().t().contiguous()
        del W
        return Case(lambda: fn(x, y), [x, fn.W])
    if provider == "linear_ce":
        return Case(lambda: F.linear_cross_entropy(x, W, y), [x, W])
    if provider == "linear_ce_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return Case(lambda: F.linear_cross_entropy(x, W, y, options=opts), [x, W])
    raise ValueError(f"unknown provider {provider!r}")


# ----------------------------------------------------------------------------- pytest-benchmark

def test_margin_softmax(benchmark, bench_point, bench_options):
    """One point: ``benchmark`` times the step (pedantic: the forward of a backward-only point runs
    in the untimed setup); ``--bench-memory`` adds the peak memory from a fresh process."""
    harness.pytest_point(benchmark, sys.modules[__name__], bench_point, bench_options)
