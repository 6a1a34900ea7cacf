"""No host synchronisation on the hot path, checked by running it rather than by reading it.

On a GPU a host synchronisation is any read of a device value into Python: ``.item()``,
``.tolist()``, ``int(t)``, ``float(t)``, ``bool(t)`` (an ``if`` on a tensor), ``nonzero``, ``.cpu()``,
``.numpy()``. Here (CPU) the same calls are free, so they would go unnoticed; the tests below run
the fused passes (forward and backward; single-process through the registered ops, and sharded
with a world of one) with every one of those calls turned into an error. The boundary checks run
before, outside the guard: on CPU they read the labels by design, and on a GPU they only do so when
``fusedface.set_input_checks(True)`` (tests/test_errors.py observes a real GPU when one is there).

The Triton backend is left out here: its CPU interpreter itself converts tensors to numpy.
"""
import contextlib

import pytest
import torch

import fusedface as ff
from fusedface import _engine
from fusedface._options import MarginOptions, NPTOptions

BACKENDS = [b for b in ff.available_backends() if b in ("torch", "native")]
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def trap(name):
        def f(self, *a, **k):
            raise HostSync(f"host synchronisation: Tensor.{name} on the hot path")
        return f

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, trap(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _data(B=19, D=24, C=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    W = torch.randn(C, D, generator=g, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    y[3] = -1
    return x, W, y


def test_the_guard_catches_each_kind_of_sync():
    t = torch.ones(3)
    for fn in (lambda: t.sum().item(), lambda: int(t.sum()), lambda: bool(t.any()), lambda: float(t[0]),
               lambda: t.nonzero(), lambda: t.tolist(), lambda: t.cpu(), lambda: range(10)[t.long()[0]]):
        with no_host_sync(), pytest.raises(HostSync):
            fn()
    assert t.sum().item() == 3.0  # restored afterwards


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negative", ["none", "mv_adaptive"])
def test_margin_pass_forward_and_backward(backend, negative):
    x, W, y = _data()
    m2 = torch.full((x.shape[0],), 0.5)
    m3 = torch.zeros(x.shape[0])
    with no_host_sync():
        rows, pred, sv, *_ = torch.ops.fusedface.margin_softmax_fwd(
            x, W, y, m2, m3, backend, 64.0, 1.0, "threshold", negative, 0.2, "exact", -1, 64)
        rows.sum().backward()
    assert torch.isfinite(rows).all() and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_npt_pass_forward_and_backward(backend):
    x, W, y = _data()
    with no_host_sync():
        rows = torch.ops.fusedface.npt_fwd(x, W, y, backend, 0.5, 3, 1.0, -1, 64)[0]
        rows.sum().backward()
    assert torch.isfinite(rows).all() and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["margin", "npt"])
def test_sharded_pass_forward_and_backward(backend, family):
    """The sharded Functions (world of one: the same code, with identity collectives), with the
    batch sizes given, as ``docs/distributed.md`` recommends for a sync-free step."""
    from fusedface.distributed import _functions as SF
    from fusedface.distributed._comm import Comm

    x, W, y = _data()
    comm = Comm(None)
    if family == "margin":
        opts = MarginOptions(scale=64.0, m1=1.0, theta_policy="none", negative="none", t=0.0, grad_mode="exact",
                             reduction="none", ignore_index=-1)
        W_used, plan = SF.margin_plan(comm, x, W, y, opts, num_classes=W.shape[0], backend=backend, m2=0.5,
                                      batch_sizes=[x.shape[0]], tile_size=64, stats=True)
        fn = SF.MarginSoftmaxShardFunction
    else:
        opts = NPTOptions(delta=0.5, k=3, r=1.0, reduction="none", ignore_index=-1)
        W_used, plan = SF.npt_plan(comm, x, W, y, opts, num_classes=W.shape[0], backend=backend,
                                   batch_sizes=[x.shape[0]], tile_size=64)
        fn = SF.NPTShardFunction
    with no_host_sync():
        out = fn.apply(x, W_used, plan)
        rows = out[0] if isinstance(out, tuple) else out
        rows.sum().backward()
    assert torch.isfinite(rows).all() and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


def test_engine_prologue_has_no_sync():
    x, W, y = _data()
    opts = MarginOptions(scale=64.0, m1=1.0, theta_policy="easy", negative="none", t=0.0, grad_mode="exact",
                         reduction="none", ignore_index=-1)
    with no_host_sync():
        _engine.margin_prologue(x.detach(), W.detach(), y, opts, 0.5, 0.1, torch.float32)
