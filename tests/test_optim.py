"""fusedface.optim: SGD and AdamW applied inside the fused backward (issue 15), single process.

The acceptance: float64, 20 steps with a step LR schedule, ArcFace, C = 1009, ignored rows — ``W``
and the optimizer state after an in-backward ``fusedface.optim.SGD`` (momentum 0.9, Nesterov on and
off, weight decay 5e-4) or ``AdamW`` equal a materialised reference head trained with
``torch.optim`` to 1e-10 on the torch and native backends. The Triton step is in
tests/test_optim_triton.py, the sharded heads in tests/test_optim_distributed.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedface
from fusedface import _inbackward
from fusedface.optim import AppliedGrad, InBackwardError

from conftest import backend_names

FUSED_CPU = [p for p in backend_names(fused=True) if p.values[0] != "triton"]

C, D, B = 1009, 24, 37


@pytest.fixture
def small_slices(monkeypatch):
    """Several slices per backward at C = 1009 (one fp32 slice of 64·D·4 bytes: 64 classes)."""
    monkeypatch.setattr(_inbackward, "SLICE_BYTES", 64 * D * 4)


def batches(n, *, seed=0, dtype=torch.float64, C=C, D=D, B=B):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(B, D, generator=g, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=g)
        y[::7] = -1  # ignored rows
        out.append((x, y))
    return out


def make_opts(kind, params, ref: bool, **extra):
    if kind.startswith("sgd"):
        kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=kind == "sgd_nesterov")
        return torch.optim.SGD(params, **kw) if ref else fusedface.optim.SGD(params, **kw, **extra)
    kw = dict(lr=1e-2, weight_decay=1e-2)
    return torch.optim.AdamW(params, **kw) if ref else fusedface.optim.AdamW(params, **kw, **extra)


def train(head, opt, data, sched=True):
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5) if sched else None
    for x, y in data:
        head(x, y).backward()
        opt.step()
        if s is not None:
            s.step()
        opt.zero_grad()


def pair(head_cls=fusedface.ArcFace, backend="torch", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    head = head_cls(D, C, backend=backend, dtype=dtype, **kw)
    ref = head_cls(D, C, backend="reference", dtype=dtype, **kw)
    ref.load_state_dict(head.state_dict())
    return head, ref


def state_err(opt, ropt):
    a, b = opt.state_dict()["state"][0], ropt.state_dict()["state"][0]
    return {k: (a[k] - b[k]).abs().max().item() for k in b if k != "step"}


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov"])
def test_twenty_steps_equal_torch_optim_on_a_reference_head(backend, kind, small_slices):
    head, ref = pair(backend=backend)
    opt, ropt = make_opts(kind, head.parameters(), False), make_opts(kind, ref.parameters(), True)
    data = batches(20)
    train(head, opt, data)
    train(ref, ropt, data)
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"] < 0.1 * 0.5 ** 3  # the schedule ran
    assert (head.weight - ref.weight).abs().max().item() < 1e-10
    errs = state_err(opt, ropt)
    assert errs and max(errs.values()) < 1e-10, errs
    assert int(opt.state_dict()["state"][0]["step"]) == 20


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_twenty_adamw_steps_equal_torch_optim_on_the_dense_gradient(backend, small_slices):
    """The in-backward AdamW equals ``torch.optim.AdamW`` stepping the same backend's dense ``W.grad``
    (the same gradient, only where the update runs differs): measured 8.8e-15 (torch), 0.0 (native)."""
    head, dense = pair(backend=backend)
    dense.backend = backend
    opt, ropt = make_opts("adamw", head.parameters(), False), make_opts("adamw", dense.parameters(), True)
    data = batches(20)
    train(head, opt, data)
    train(dense, ropt, data)
    assert (head.weight - dense.weight).abs().max().item() < 1e-10
    assert max(state_err(opt, ropt).values()) < 1e-10


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_twenty_adamw_steps_equal_torch_optim_on_a_reference_head(backend, small_slices):
    """Against the materialised reference, AdamW multiplies the fp64 rounding of near-zero gradient
    entries (|g| << eps) by lr/eps: 1e6 at torch's eps = 1e-8, where W drifts apart by 1.1e-6 in 20
    steps (the same for torch.optim on two orderings of one sum). At eps = 1e-4 (lr/eps = 100) the
    comparison is well conditioned and the heads agree to 1e-10."""
    head, ref = pair(backend=backend)
    opt = fusedface.optim.AdamW(head.parameters(), lr=1e-2, eps=1e-4)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-4)
    data = batches(20)
    train(head, opt, data)
    train(ref, ropt, data)
    assert (head.weight - ref.weight).abs().max().item() < 1e-10
    a, b = opt.state[head.weight], ropt.state[ref.weight]
    for k in ("exp_avg", "exp_avg_sq"):
        assert ((a[k] - b[k]).abs().max() / b[k].abs().max()).item() < 1e-9, k


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_the_update_is_applied_in_backward_and_w_grad_is_a_marker(backend):
    head, _ = pair(backend=backend)
    opt = fusedface.optim.SGD(head.parameters(), lr=0.5)
    (x, y), = batches(1)
    before = head.weight.detach().clone()
    head(x, y).backward()
    assert isinstance(head.weight.grad, AppliedGrad)
    assert not torch.equal(head.weight.detach(), before)  # moved by the backward, before step()
    moved = head.weight.detach().clone()
    opt.step()
    assert head.weight.grad is None and torch.equal(head.weight.detach(), moved)


def test_the_slice_holds_a_bounded_number_of_classes():
    assert _inbackward.slice_rows(10_000_000, 512) * 512 * 4 <= _inbackward.SLICE_BYTES
    assert _inbackward.slice_rows(100, 512) == 100
    assert _inbackward.slice_rows(10_000_000, 10**6) == 64
    assert _inbackward.slice_rows(10**7, 512, "cuda") * 512 * 4 == _inbackward.SLICE_BYTES_CUDA


# ----------------------------------------------------------------------- what does not combine

def _one_backward(head, opt):
    (x, y), = batches(1)
    head(x, y).backward()
    return x, y


def test_global_norm_clipping_of_w_raises_and_names_the_alternative():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    _one_backward(head, opt)
    with pytest.raises(InBackwardError, match="clip the backbone's parameters only"):
        torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)


def test_a_second_optimizer_over_w_raises():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841  (attached while it lives)
    other = torch.optim.SGD(head.parameters(), lr=0.1)
    (x, y), = batches(1)
    head(x, y).backward()
    with pytest.raises(InBackwardError):
        other.step()


def test_accumulating_two_backwards_before_step_raises():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    x, y = _one_backward(head, opt)
    with pytest.raises(InBackwardError, match="second backward"):
        head(x, y).backward()
    opt.step()
    head(x, y).backward()  # after step() the next backward is fine


def test_retain_graph_second_backward_raises():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841
    (x, y), = batches(1)
    loss = head(x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(InBackwardError, match="second backward"):
        loss.backward()


def test_create_graph_raises():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841
    (x, y), = batches(1)
    with pytest.raises(InBackwardError, match="create_graph"):
        head(x.requires_grad_(True), y).backward(create_graph=True)


def test_only_head_class_matrices_are_accepted():
    with pytest.raises(TypeError, match="class matrix of a fusedface head"):
        fusedface.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841
    with pytest.raises(ValueError, match="already has an in-backward optimizer"):
        fusedface.optim.AdamW(head.parameters())


def test_bad_hyperparameters_are_refused():
    head, _ = pair()
    with pytest.raises(ValueError, match="nesterov"):
        fusedface.optim.SGD(head.parameters(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        fusedface.optim.AdamW(head.parameters(), betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="state_dtype"):
        fusedface.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, state_dtype=torch.int32)


def test_a_deleted_optimizer_lets_the_head_form_its_gradient_again():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    del opt
    _one_backward(head, None)
    assert type(head.weight.grad) is torch.Tensor


def test_detach_head_gives_the_dense_gradient_back():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    opt.detach_head()
    _one_backward(head, opt)
    assert type(head.weight.grad) is torch.Tensor and head.weight.grad.abs().sum() > 0


def test_compile_refuses_with_a_clear_error():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841
    (x, y), = batches(1)
    with pytest.raises(Exception, match="in-backward optimizer"):
        torch.compile(lambda a, b: head(a, b), backend="eager", fullgraph=True)(x, y)


# ----------------------------------------------------------------------- param_groups, state_dict

def test_lr_changes_apply_at_the_next_backward():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    _one_backward(head, opt)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = head.weight.detach().clone()
    _one_backward(head, opt)
    assert torch.equal(head.weight.detach(), before)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_dict_round_trips_and_reads_as_torch_optim(kind):
    data = batches(6)
    head, _ = pair()
    opt = make_opts(kind, head.parameters(), False)
    train(head, opt, data[:3], sched=False)
    saved_w, saved_opt = copy.deepcopy(head.state_dict()), copy.deepcopy(opt.state_dict())
    train(head, opt, data[3:], sched=False)
    torch.manual_seed(1)
    head2 = fusedface.ArcFace(D, C, backend="torch", dtype=torch.float64)
    head2.load_state_dict(saved_w)
    opt2 = make_opts(kind, head2.parameters(), False)
    opt2.load_state_dict(copy.deepcopy(saved_opt))  # (torch.optim loads tensors without copying them)
    train(head2, opt2, data[3:], sched=False)
    assert torch.equal(head2.weight, head.weight)
    # torch.optim's state names: the state loads into torch.optim and continues the same training
    ref = fusedface.ArcFace(D, C, backend="reference", dtype=torch.float64)
    ref.load_state_dict(saved_w)
    ropt = make_opts(kind, ref.parameters(), True)
    ropt.load_state_dict(saved_opt)
    train(ref, ropt, data[3:], sched=False)
    assert (ref.weight - head.weight).abs().max().item() < 1e-10


def test_bf16_state_halves_the_state_and_tracks_fp32():
    data = batches(5, dtype=torch.float32)
    h32, _ = pair(dtype=torch.float32)
    h16, _ = pair(dtype=torch.float32)
    o32 = fusedface.optim.AdamW(h32.parameters(), lr=1e-2)
    o16 = fusedface.optim.AdamW(h16.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    train(h32, o32, data, sched=False)
    train(h16, o16, data, sched=False)
    s32, s16 = o32.state[h32.weight], o16.state[h16.weight]
    assert s16["exp_avg"].dtype == torch.bfloat16 and s16["exp_avg_sq"].dtype == torch.bfloat16
    assert s16["exp_avg"].element_size() * 2 == s32["exp_avg"].element_size()
    delta32 = (h32.weight - pair(dtype=torch.float32)[0].weight).detach()
    delta16 = (h16.weight - pair(dtype=torch.float32)[0].weight).detach()
    assert (delta16 - delta32).norm() < 0.05 * delta32.norm()
    # and the state survives a round trip in bf16 (torch.optim would cast it to W's dtype)
    o16b = fusedface.optim.AdamW(pair(dtype=torch.float32)[0].parameters(), state_dtype=torch.bfloat16)
    o16b.load_state_dict(o16.state_dict())
    assert next(iter(o16b.state.values()))["exp_avg"].dtype == torch.bfloat16


def test_closure_runs_the_backward():
    head, ref = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    (x, y), = batches(1)
    for h, o in ((head, opt), (ref, ropt)):
        def closure(h=h, o=o):
            o.zero_grad()
            loss = h(x, y)
            loss.backward()
            return loss
        o.step(closure)
    assert (head.weight - ref.weight).abs().max().item() < 1e-12


# ----------------------------------------------------------------------- every head and path

HEADS = [
    (fusedface.CosFace, {}),
    (fusedface.SVSoftmax, {}),
    (fusedface.MVSoftmax, {"margin_type": "arc"}),
    (fusedface.ElasticArcFace, {"plus": True}),
    (fusedface.KappaFace, {}),
    (fusedface.NPT, {"k": 3}),
]


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("head_cls,kw", HEADS, ids=[h.__name__ for h, _ in HEADS])
def test_every_head_equals_its_reference_with_torch_optim(head_cls, kw, backend, small_slices):
    if head_cls is fusedface.ElasticArcFace:
        kw = dict(kw)
        head = head_cls(D, C, backend=backend, dtype=torch.float64, generator=torch.Generator().manual_seed(3), **kw)
        ref = head_cls(D, C, backend="reference", dtype=torch.float64, generator=torch.Generator().manual_seed(3), **kw)
        ref.load_state_dict(head.state_dict())
    else:
        head, ref = pair(head_cls, backend=backend, **kw)
    opt, ropt = make_opts("sgd_nesterov", head.parameters(), False), make_opts("sgd_nesterov", ref.parameters(), True)
    data = batches(4)
    train(head, opt, data)
    train(ref, ropt, data)
    assert (head.weight - ref.weight).abs().max().item() < 1e-10
    assert max(state_err(opt, ropt).values()) < 1e-10


def test_kept_block_route_applies_the_update(small_slices):
    pytest.importorskip("fusedface._C", reason="the kept block runs the native backend, which is not built")
    from fusedface.functional import margin_softmax_loss, margin_softmax_loss_kept_block

    head, ref = pair(backend="native")
    opt, ropt = make_opts("sgd_nesterov", head.parameters(), False), make_opts("sgd_nesterov", ref.parameters(), True)
    for x, y in batches(3):
        margin_softmax_loss_kept_block(x, head.weight, y, m2=0.5).backward()
        opt.step()
        margin_softmax_loss(x, ref.weight, y, m2=0.5, backend="reference").backward()
        ropt.step()
        ropt.zero_grad()
    assert (head.weight - ref.weight).abs().max().item() < 1e-10


def test_a_bf16_class_matrix_updates_in_fp32_and_stays_finite():
    torch.manual_seed(0)
    head = fusedface.ArcFace(D, C, backend="torch", dtype=torch.bfloat16)
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in batches(3, dtype=torch.bfloat16):
        head(x, y).backward()
        opt.step()
    assert head.weight.dtype == torch.bfloat16 and torch.isfinite(head.weight).all()
    assert opt.state[head.weight]["momentum_buffer"].dtype == torch.bfloat16


def test_no_dense_gradient_is_formed(monkeypatch):
    """The tile kernels are asked for dL/dW of one slice at a time, never of all of W."""
    from fusedface.backends import torch as tb

    seen = []
    real = tb.margin_backward

    def spy(x, W, *a, **k):
        seen.append(W.shape[0])
        return real(x, W, *a, **k)

    monkeypatch.setattr(tb, "margin_backward", spy)
    monkeypatch.setattr(_inbackward, "SLICE_BYTES", 128 * D * 4)
    head, _ = pair(backend="torch")
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)
    _one_backward(head, opt)
    assert seen and max(seen) <= 128 and sum(seen) == C


# ----------------------------------------------------------------------- the memory model

def test_the_documented_table_is_the_model():
    """docs/memory.md's table (SGD) is what fusedface.memory_model computes."""
    import os
    import re

    from fusedface.memory_model import GIB, per_device

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "memory.md")).read()
    rows = re.findall(r"^\| (\d+)M \| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert len(rows) == 8
    for millions, world, dense, ib32, ib16 in rows:
        kw = dict(C=int(millions) * 10**6, D=512, B=128, world=int(world), optimizer="sgd")
        got = [per_device(**kw, in_backward=False)["total"], per_device(**kw, in_backward=True)["total"],
               per_device(**kw, in_backward=True, state_bytes=2)["total"]]
        assert [round(g / GIB, 2) for g in got] == [float(dense), float(ib32), float(ib16)], (millions, world)


def test_the_model_counts_w_grad_only_when_dense():
    from fusedface.memory_model import per_device

    dense = per_device(C=10**6, D=128, B=256, optimizer="sgd", in_backward=False, device="cpu")
    ib = per_device(C=10**6, D=128, B=256, optimizer="sgd", in_backward=True, device="cpu")
    assert dense["gradient"] == 10**6 * 128 * 4 and ib["gradient"] <= _inbackward.SLICE_BYTES
    assert dense["total"] - ib["total"] > 0.9 * 2 * 10**6 * 128 * 4  # W.grad and the weight-decay temporary


def test_loading_keeps_an_fp32_state_and_row_counts_of_a_bf16_w():
    """torch.optim casts the loaded state to W's dtype; fusedface.optim keeps ``state_dtype`` and the
    int32 per-row step counts (1.0001 and 301 are not bf16 numbers)."""
    torch.manual_seed(0)
    head = fusedface.ArcFace(D, C, backend="torch", dtype=torch.bfloat16)
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, state_dtype=torch.float32)
    buf = torch.full((C, D), 1.0001)
    sd = {"state": {0: {"step": torch.tensor(3.0), "momentum_buffer": buf,
                        "row_step": torch.full((C,), 301, dtype=torch.int32)}},
          "param_groups": opt.state_dict()["param_groups"]}
    opt.load_state_dict(sd)
    st = opt.state[head.weight]
    assert st["momentum_buffer"].dtype == torch.float32 and torch.equal(st["momentum_buffer"], buf)
    assert st["row_step"].dtype == torch.int32 and int(st["row_step"][0]) == 301


# ----------------------------------------------------------------------- found by review

def test_autograd_grad_of_x_and_backward_inputs_leave_w_alone():
    """``torch.autograd.grad(loss, x)`` and ``backward(inputs=[x])`` do not ask for dL/dW: W does not move
    and W.grad is not touched (the update runs only in a backward that accumulates into W)."""
    for backend in [p.values[0] for p in FUSED_CPU]:
        head, _ = pair(backend=backend)
        opt = fusedface.optim.SGD(head.parameters(), lr=0.5)
        (x, y), = batches(1)
        before = head.weight.detach().clone()
        xg = x.clone().requires_grad_(True)
        gx, = torch.autograd.grad(head(xg, y), xg)
        assert torch.isfinite(gx).all() and gx.abs().sum() > 0
        head(xg, y).backward(inputs=[xg])
        assert torch.equal(head.weight.detach(), before) and head.weight.grad is None, backend
        head(xg, y).backward()  # the ordinary backward still updates
        assert not torch.equal(head.weight.detach(), before)
        opt.step()


def test_step_applies_the_update_from_a_dense_gradient():
    """W.grad formed densely (a reference head, or after detach_head) is stepped by step(), as torch.optim."""
    head, ref = pair(backend="torch")
    ref2 = fusedface.ArcFace(D, C, backend="reference", dtype=torch.float64)
    ref2.load_state_dict(ref.state_dict())
    opt = fusedface.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ropt = torch.optim.SGD(ref2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in batches(3):
        for h, o in ((ref, opt), (ref2, ropt)):
            h(x, y).backward()
            o.step()
            o.zero_grad()
    assert (ref.weight - ref2.weight).abs().max().item() < 1e-12


def test_a_failed_backward_changes_no_state():
    """A retain_graph second backward after step() fails autograd's version check; the optimizer's step
    count and buffers are as before it (they are kept only when an update finishes)."""
    head, _ = pair()
    opt = fusedface.optim.AdamW(head.parameters())
    (x, y), = batches(1)
    loss = head(x, y)
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError):
        loss.backward()
    assert int(opt.state[head.weight]["step"]) == 1
    head(x, y).backward()  # the next step is a normal one, not "a second update"
    opt.step()
    assert int(opt.state[head.weight]["step"]) == 2


def test_sparse_rows_continue_a_momentum_loaded_from_torch_optim():
    """A torch.optim.SGD state has no step count: sparse per-row counts start at 1, not 0, so the
    loaded momentum is continued (not replaced by the first step's d)."""
    from fusedface._inbackward import Hyper, Update

    W = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    buf = torch.randn(10, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    idx = torch.tensor([1, 4, 7])
    upd = Update(W, Hyper("sgd", 0.1, 0.0, momentum=0.9), {"momentum_buffer": buf.clone()}, 1, False, True,
                 lambda u: None)
    upd.apply_index(idx, g)
    assert torch.allclose(upd.state["momentum_buffer"][idx], 0.9 * buf[idx] + g)
    assert torch.equal(upd.state["momentum_buffer"][0], buf[0])  # unsampled rows untouched


def test_the_head_used_twice_in_one_loss_names_that_cause():
    head, _ = pair()
    opt = fusedface.optim.SGD(head.parameters(), lr=0.1)  # noqa: F841
    (x, y), = batches(1)
    with pytest.raises(InBackwardError, match="uses the class matrix twice"):
        (head(x, y) + head(x, y)).backward()


def test_a_deep_copied_head_takes_an_in_backward_optimizer():
    head, _ = pair()
    twin = copy.deepcopy(head)
    fusedface.optim.SGD(twin.parameters(), lr=0.1)
    h2 = fusedface.ArcFace(D, C, backend="torch", dtype=torch.float64)
    h2.load_state_dict(head.state_dict(), assign=True)
    fusedface.optim.SGD(h2.parameters(), lr=0.1)
