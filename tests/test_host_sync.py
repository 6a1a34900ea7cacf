"""No host synchronisation on the hot path, checked by running it rather than by reading it.

On a GPU a host synchronisation is any read of a device value into Python: ``.item()``,
``.tolist()``, ``int(t)``, ``float(t)``, ``bool(t)`` (an ``if`` on a tensor), ``nonzero``, ``.cpu()``,
``.numpy()``. Here (CPU) the same calls are free, so they would go unnoticed; the tests below run
the fused passes (forward and backward; single-process through the registered ops, and sharded
with a world of one) with every one of those calls turned into an error. The boundary checks run
before, outside the guard: on CPU they read the labels by design, and on a GPU they only do so when
``fusedface.set_input_checks(True)`` (tests/test_errors.py observes a real GPU when one is there).

The public functional path (``margin_softmax_loss`` / ``npt_loss``, forward and backward) runs
under the guard on every fused backend, the Triton one included (under its interpreter on CPU
tensors). Triton's interpreter copies kernel arguments to the host and works on numpy arrays (a
triton version may do so with ``.cpu()``/``.numpy()``, which must not count), and fusedface's label
check reads the labels of CPU tensors by design; so the guard decides by who called: walking the
Python stack out from the trapped call, the first frame that belongs to fusedface or to triton
decides. A call reached from triton's code (the interpreter running a kernel) or from a module the
test allows (``fusedface._validate`` for the public path) goes through; one reached from any other
fusedface code (the launchers, the engine, a grid function) or from no package at all (the test
itself) is a host sync. Every trapped call is also recorded, and the guard fails on leaving its
block even when the caller swallowed the exception.
"""
import contextlib
import sys

import pytest
import torch

from conftest import backend_names, is_interpreted
from fusedface import _engine
from fusedface import functional as F_
from fusedface._options import MarginOptions, NPTOptions

# every fused backend, for the public path, the registered ops and the sharded Functions alike: torch,
# native where built, triton (interpreted on CPU; skipped with the reason where it cannot run)
PUBLIC = backend_names(fused=True)
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
# the label check of the public boundary: on CPU tensors it reads the labels by design (on a GPU only
# behind fusedface.set_input_checks(True); tests/test_errors.py checks the GPU default path)
BOUNDARY = ("fusedface._validate",)


class HostSync(AssertionError):
    pass


def _package(module: str) -> str | None:
    for pkg in ("fusedface", "triton"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def _deciding_frame(frame):
    """The first frame, from ``frame`` outwards, whose code belongs to fusedface or to triton
    (``None``: neither is on the stack)."""
    while frame is not None:
        if _package(frame.f_globals.get("__name__") or ""):
            return frame
        frame = frame.f_back
    return None


@contextlib.contextmanager
def no_host_sync(allow: tuple[str, ...] = ()):
    """Every host-sync Tensor method raises :class:`HostSync` when called from fusedface's code or
    from no package (see the module docstring); calls made by triton's interpreter, and by the
    fusedface modules named in ``allow``, go through. Yields the list of trapped calls."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}
    caught: list[str] = []

    def trap(name):
        original = saved[name]

        def f(self, *a, **k):
            caller = sys._getframe(1)
            owner = _deciding_frame(caller)
            module = owner.f_globals.get("__name__", "") if owner is not None else ""
            if owner is not None and (_package(module) == "triton" or module in allow):
                return original(self, *a, **k)
            where = owner if owner is not None else caller
            what = (f"Tensor.{name} called from {where.f_code.co_filename}:{where.f_lineno} "
                    f"({where.f_code.co_name})")
            caught.append(what)
            raise HostSync(f"host synchronisation on the hot path: {what}")
        return f

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, trap(name))
        yield caught
    except HostSync:
        raise
    except BaseException as exc:
        if caught:  # a trapped call turned into another error on its way out
            raise HostSync("host synchronisation on the hot path:\n  " + "\n  ".join(caught)) from exc
        raise
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    if caught:  # trapped, but the exception was swallowed on the way
        raise HostSync("host synchronisation on the hot path (the exception was caught and dropped):\n  "
                       + "\n  ".join(caught))


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
               lambda: t.nonzero(), lambda: t.tolist(), lambda: t.cpu(), lambda: range(10)[t.long()[0]],
               lambda: t.numpy()):
        with pytest.raises(HostSync), no_host_sync():
            fn()
    assert t.sum().item() == 3.0  # restored afterwards


def _code_of(module: str):
    """A function whose code belongs to ``module`` (as far as the guard can tell)."""
    scope = {"__name__": module, "torch": torch}
    exec("def launch(t):\n    return int(t.max())\n"  # noqa: S102 - a fixed snippet
         "def grid(t):\n    return (lambda meta: (int(t.sum()),))({})\n"
         "def to_numpy(t):\n    import numpy\n    return numpy.asarray(t)\n"  # through Tensor.__array__
         "def swallow(t):\n    try:\n        return t.item()\n    except Exception:\n        return 0.0\n", scope)
    return scope


def test_the_guard_decides_by_the_calling_package():
    """A sync reached from fusedface's code (a launcher, a grid function) is caught, also through
    torch's own Python code in between and when the caller swallows the exception; one reached from
    triton's code (its interpreter converting arguments) or from a module the test allows passes."""
    t = torch.arange(4.0)
    fused = _code_of("fusedface.backends.triton_tiles")
    for fn, name in ((fused["launch"], "__int__"), (fused["grid"], "__int__"), (fused["to_numpy"], "numpy")):
        with pytest.raises(HostSync, match=rf"Tensor\.{name} called from .*\(({fn.__name__}|<lambda>)\)"), \
                no_host_sync():
            fn(t)
    with pytest.raises(HostSync, match="caught and dropped"), no_host_sync():
        assert fused["swallow"](t) == 0.0
    with no_host_sync():
        assert _code_of("triton.runtime.interpreter")["launch"](t) == 3
    with no_host_sync(allow=BOUNDARY):
        assert _code_of("fusedface._validate")["launch"](t) == 3
    with pytest.raises(HostSync), no_host_sync():
        _code_of("fusedface._validate")["launch"](t)  # allowed only where a test says so
    # triton code calling into fusedface code that syncs: the fusedface frame is nearer, so caught
    inner = _code_of("fusedface.backends.triton_tiles")["launch"]
    outer = {"__name__": "triton.runtime.interpreter", "inner": inner}
    exec("def run(t):\n    return inner(t)\n", outer)  # noqa: S102
    with pytest.raises(HostSync), no_host_sync():
        outer["run"](t)


@pytest.mark.parametrize("backend", PUBLIC)
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


@pytest.mark.parametrize("backend", PUBLIC)
def test_npt_pass_forward_and_backward(backend):
    x, W, y = _data()
    with no_host_sync():
        rows = torch.ops.fusedface.npt_fwd(x, W, y, backend, 0.5, 3, 1.0, -1, 64)[0]
        rows.sum().backward()
    assert torch.isfinite(rows).all() and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", PUBLIC)
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


# ------------------------------------------------------------------ the public path, every fused backend

def _public_data(backend, dtype=torch.float32):
    # the interpreted Triton backend: still past one block on every axis (16 rows, 32 classes, 32 features)
    x, W, y = _data(B=19, D=37, C=70) if is_interpreted(backend) else _data()
    return x.detach().to(dtype).requires_grad_(), W.detach().to(dtype).requires_grad_(), y


# both dtypes: a backend may take a different path for fp64 (Triton: the engine's tile kernels) than for fp32
@pytest.mark.parametrize("backend", PUBLIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("negative", ["none", "mv_adaptive"])
def test_public_margin_loss_forward_and_backward(backend, negative, dtype):
    """``margin_softmax_loss`` (per-row margins, the threshold policy), forward and backward, with
    every host sync trapped; only the CPU label check at the boundary may read a value."""
    x, W, y = _public_data(backend, dtype)
    m2 = torch.linspace(0.4, 0.6, x.shape[0], dtype=dtype)
    with no_host_sync(allow=BOUNDARY):
        loss = F_.margin_softmax_loss(x, W, y, m2=m2, m3=0.1, theta_policy="threshold", negative=negative, t=0.2,
                                      backend=backend)
        loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", PUBLIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_public_npt_loss_forward_and_backward(backend, dtype):
    x, W, y = _public_data(backend, dtype)
    with no_host_sync(allow=BOUNDARY):
        loss = F_.npt_loss(x, W, y, k=3, delta=0.5, reduction="sum", backend=backend)
        loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0 and W.grad.abs().sum() > 0
