"""torch.compile(fullgraph=True) of training steps with every head, and torch.library.opcheck on
every op fusedface registers for the engine (issue 8).

The fused engine is registered as custom ops (``fusedface::margin_softmax_fwd``/``_bwd``,
``fusedface::npt_fwd``; ``fusedface/_engine.py``): Dynamo sees one opaque op per pass with a
shape-only fake kernel, and the tile loop runs eagerly inside it. ElasticFace's seeded draws go
through ``fusedface::normal_draws`` (a ``torch.Generator`` cannot enter a graph). Value checks
(labels in range) become ``torch._assert_async`` under compile.

Compiling is slow on two cores, so the heads are compiled with ``backend="aot_eager"`` (Dynamo
captures forward and backward in full, AOTAutograd traces both through the fake kernels: every
graph break or fake-kernel mismatch fails here), and two steps go through Inductor (C++ codegen).
Each compiled step is checked against the same step run eagerly.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import fusedface
import fusedface as ff
from conftest import assert_close, backend_names
from fusedface import functional as F_
from fusedface._engine import REGISTERED_OPS

# reference, torch, native where built, triton (interpreted: skipped with the reason where it cannot run)
BACKENDS = backend_names()
FUSED = backend_names(fused=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles its own step; no recompile limit carried over
    counters.clear()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------ opcheck

def _engine_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, generator=g, dtype=dtype)
    W = torch.randn(13, 7, generator=g, dtype=dtype)
    y = torch.tensor([0, 3, -1, 12, 5, 3])
    x[1] = 2.0 * W[3]  # a confident row
    return x, W, y


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_opcheck_engine_ops(dtype, backend):
    """Schema, fake (shape) kernel, autograd registration and AOT dispatch (static and dynamic
    shapes) of the engine's ops, on every fused backend."""
    x, W, y = _engine_inputs(dtype)
    B = x.shape[0]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    m2 = torch.linspace(0.3, 0.6, B, dtype=cdt)
    m3 = torch.zeros(B, dtype=cdt)
    fwd = torch.ops.fusedface.margin_softmax_fwd.default
    bwd = torch.ops.fusedface.margin_softmax_bwd.default
    npt = torch.ops.fusedface.npt_fwd.default
    for opts in (("threshold", "sv", 1.2, "exact"), ("easy", "mv_adaptive", 0.2, "straight_through")):
        policy, negative, t, grad_mode = opts
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        args = (xx, WW, y, m2, m3, backend, 32.0, 1.0, policy, negative, t, grad_mode, -1, 4)
        torch.library.opcheck(fwd, args)
        out = fwd(x, W, y, m2, m3, backend, 32.0, 1.0, policy, negative, t, grad_mode, -1, 4)
        rows, pred, sv, lse, f, slope, xinv, winv, block = out
        assert rows.dtype == cdt and pred.dtype == torch.long and sv.dtype == torch.int32 and winv.shape == (13,)
        assert block.numel() == 0, "no block is kept unless keep_block"
        gr = torch.rand(B, dtype=cdt)
        for need in ((1, 1), (0, 1)) if negative == "sv" else ((1, 0),):
            torch.library.opcheck(bwd, (gr, x, W, y, lse, f, slope, xinv, winv, backend, 32.0, 1.0, policy,
                                        negative, t, grad_mode, -1, 4) + need)
        if backend == "native":  # the kept-block option: the forward's [C, B] cosines into the backward
            torch.library.opcheck(fwd, args + (True,))
            block = fwd(*((x, W) + args[2:]), True)[8]
            assert block.shape == (13, B) and block.dtype == cdt
            torch.library.opcheck(bwd, (gr, x, W, y, lse, f, slope, xinv, winv, backend, 32.0, 1.0, policy,
                                        negative, t, grad_mode, -1, 4, 1, 1, block))
    for k in (1, 4):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        torch.library.opcheck(npt, (xx, WW, y, backend, 0.5, k, 1.0, -1, 5))


def test_opcheck_normal_draws():
    """The ElasticFace draw op (random: checked for schema, fake kernel and autograd registration;
    not for equal outputs across runs)."""
    g = torch.Generator().manual_seed(0)
    fusedface.margins.register_generator(g)
    torch.library.opcheck(torch.ops.fusedface.normal_draws.default, (5, torch.device("cpu"), id(g)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    g.manual_seed(0)  # (opcheck ran the op)
    a = torch.ops.fusedface.normal_draws(5, torch.device("cpu"), id(g))
    assert torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(0))), "the generator's stream"


def test_every_engine_op_is_registered_and_checked_here():
    registered = set(REGISTERED_OPS) | {"fusedface::normal_draws"}
    for name in registered:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), name
    assert registered == {"fusedface::margin_softmax_fwd", "fusedface::margin_softmax_bwd", "fusedface::npt_fwd",
                          "fusedface::normal_draws"}, "a new op needs an opcheck case above"


# ------------------------------------------------------------------ training steps with every head

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.neck = nn.Linear(24, 8)

    def forward(self, x):
        h = self.body(x)
        return self.neck(h), h.view(-1, 6, 2, 2)


HEADS = {
    "ArcFace": lambda be: ff.ArcFace(8, 17, backend=be),
    "CosFace": lambda be: ff.CosFace(8, 17, backend=be),
    "CombinedMargin": lambda be: ff.CombinedMargin(8, 17, backend=be),
    "SphereFace": lambda be: ff.SphereFace(8, 17, margin=2.0, backend=be),
    "ElasticArcFace-plus": lambda be: ff.ElasticArcFace(8, 17, plus=True, backend=be,
                                                        generator=torch.Generator().manual_seed(5)),
    "ElasticCosFace": lambda be: ff.ElasticCosFace(8, 17, backend=be, generator=torch.Generator().manual_seed(6)),
    "KappaFace": lambda be: ff.KappaFace(8, 17, backend=be),
    "SVSoftmax": lambda be: ff.SVSoftmax(8, 17, backend=be),
    "MVSoftmax": lambda be: ff.MVSoftmax(8, 17, margin_type="arc", backend=be),
    "NPT": lambda be: ff.NPT(8, 17, k=3, backend=be),
    "OTFace": lambda be: ff.OTFace(8, 17, ot_iters=4, backend=be),
}


def _train(name, backend, compile_backend, steps=3):
    """``steps`` SGD steps of net + head, eager or with the loss computation compiled
    (fullgraph=True); returns the losses, the parameters and the head's buffers."""
    torch.manual_seed(0)
    net, head = _Net().double(), HEADS[name](backend).double()
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(steps, 10, 12, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 17, (steps, 10), generator=g)
    Y[:, 0] = Y[:, 1]  # a positive pair for OTFace
    Y[:, -1] = -1  # an ignored row

    def step(xb, yb):
        emb, fmap = net(xb)
        return head(emb, yb, fmap) if isinstance(head, ff.OTFace) else head(emb, yb)

    if compile_backend is not None:
        torch._dynamo.reset()
        counters.clear()
    run = step if compile_backend is None else torch.compile(step, fullgraph=True, backend=compile_backend)
    losses = []
    for i in range(steps):
        loss = run(X[i], Y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if isinstance(head, ff.KappaFace) and i == 1:
            head.end_epoch()  # eager, between compiled steps: the next step uses the new margins
    if compile_backend is not None:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1, "nothing was compiled"
        assert graphs == 1, f"{graphs} graphs for one step: it recompiled"
    params = [p.detach().clone() for p in list(net.parameters()) + list(head.parameters())]
    return torch.stack(losses), params, {k: v.clone() for k, v in head.named_buffers()}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(HEADS))
def test_compiled_training_step_every_head(name, backend):
    eager = _train(name, backend, None)
    got = _train(name, backend, "aot_eager")
    assert_close(got[0], eager[0], rtol=1e-12, name=f"{name} losses")
    for i, (a, b) in enumerate(zip(got[1], eager[1])):
        assert_close(a, b, rtol=1e-12, name=f"{name} parameter {i} after 3 steps")
    for key in eager[2]:
        assert torch.equal(got[2][key], eager[2][key]), f"{name} buffer {key}"


@pytest.mark.parametrize("backend", [c for c in FUSED if c.values[0] != "torch"])
def test_compiled_training_step_other_fused_backends(backend):
    for name in ("ArcFace", "NPT"):
        eager = _train(name, backend, None)
        got = _train(name, backend, "aot_eager")
        assert_close(got[0], eager[0], rtol=1e-12, name=f"{name} losses")


@pytest.mark.parametrize("name,backend", [("ArcFace", "torch"), ("ElasticArcFace-plus", "reference")])
def test_inductor_training_step(name, backend):
    """Inductor (C++ code generation on CPU) around the opaque engine op / the reference's
    materialised ops, ElasticFace's draw op included."""
    eager = _train(name, backend, None, steps=2)
    got = _train(name, backend, "inductor", steps=2)
    assert_close(got[0], eager[0], rtol=1e-10, name=f"{name} losses")
    for i, (a, b) in enumerate(zip(got[1], eager[1])):
        assert_close(a, b, rtol=1e-10, name=f"{name} parameter {i}")


# ------------------------------------------------------------------ the functional API under compile

@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_functional_api_fullgraph(backend):
    """``margin_softmax_loss`` and ``npt_loss`` themselves, per-row margins included;
    ``backend="auto"`` is resolved when the op runs (Dynamo does not trace the import machinery)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, -1, 4, 10, 3])
    m2 = torch.linspace(0.4, 0.6, 7, dtype=torch.float64)

    def f(a, b):
        return (F_.margin_softmax_loss(a, b, y, m2=m2, m3=0.1, negative="mv_adaptive", t=0.2, backend=backend)
                + F_.npt_loss(a, b, y, k=2, backend=backend))

    want = torch.autograd.grad(f(x, W), (x, W))
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, W)
    got = torch.autograd.grad(loss, (x, W))
    assert_close(loss, f(x, W), rtol=1e-12, name="loss")
    for a, b, n in zip(got, want, ("dL/dx", "dL/dW")):
        assert_close(a, b, rtol=1e-12, name=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_schedule_under_compile(backend):
    """Changing a head's margin between compiled calls (a warm-up schedule) gives the eager value
    each time (Dynamo may turn the float into a symbol on recompiling)."""
    torch.manual_seed(3)
    head = ff.ArcFace(6, 9, backend=backend).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 8])
    f = torch.compile(lambda a, b: head(a, b), fullgraph=True, backend="aot_eager")
    for m in (0.1, 0.2, 0.3, 0.5):
        head.m2 = m
        want = F_.margin_softmax_loss(x, head.weight, y, m2=m, backend=backend)
        assert_close(f(x, y), want, rtol=1e-12, name=f"m2={m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_checked_inside_the_compiled_graph(backend):
    """Out-of-range labels still raise under torch.compile (an assertion in the graph, no break)."""
    x, W = torch.randn(4, 6), torch.randn(9, 6)
    f = torch.compile(lambda a, b, yy: F_.margin_softmax_loss(a, b, yy, backend=backend), fullgraph=True,
                      backend="aot_eager")
    assert torch.isfinite(f(x, W, torch.tensor([0, 1, 2, -1])))
    with pytest.raises(RuntimeError, match=r"y \(labels\) holds value\(s\) outside \[0, C=9\)"):
        f(x, W, torch.tensor([0, 1, 9, 2]))
