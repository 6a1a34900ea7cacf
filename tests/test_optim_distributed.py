"""fusedface.optim on the class-sharded heads: the in-backward update of each rank's shard, Partial
FC's sparse and dense semantics, and sharded checkpoints that carry the optimizer state across world
sizes (2 -> 3 -> 1), on 2 and 3 CPU processes (gloo, loopback only) and in a world of one.

As in tests/test_distributed.py, one process group per world size (2, then 3) runs every check and
writes its measurements to a file that the tests below read; the world of one runs in the test
process without a process group. fp64 throughout, held to 1e-10 (max |error| / max |expected|).
"""
from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedface as ff
import fusedface.distributed as FD
from fusedface.distributed._spawn import init_local_group, run_local_group
from fusedface.optim import AppliedGrad

C = 1009  # not divisible by 2 or 3
D = 16
STEPS = 20
PFC_STEPS = 20
NPT_STEPS = 6
CKPT_STEPS = (3, 1, 1)  # steps run by the 2-, 3- and 1-process heads of the checkpoint chain
SIZES = {1: [20], 2: [9, 11], 3: [8, 5, 7]}  # one global batch of 20 rows, split differently per world
IGNORED = (2, 13)  # global rows with the ignore label
TOL = 1e-10
SAMPLE_RATE = 0.3
GROUP_TIMEOUT_S = 300
BACKENDS = [b for b in ("torch", "native") if b in ff.available_backends()]
DT = torch.float64

# name: (in-backward optimizer, torch.optim optimizer, keyword arguments)
OPTIMS = {
    "sgd": (ff.optim.SGD, torch.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (ff.optim.SGD, torch.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "adamw": (ff.optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
}
# name: (single-process head, sharded head, keyword arguments)
FAMILIES = {
    "arcface": (ff.ArcFace, FD.ShardedArcFace, {}),
    "npt": (ff.NPT, FD.ShardedNPT, dict(k=3)),
}
# checkpoint chain: name -> (optimizer class, keyword arguments, the "wrong" arguments the resumed
# optimizer is built with: loading must restore the saved hyperparameters, sample_rate)
CKPT = {
    "sgd": (ff.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True),
            dict(lr=7.0, momentum=0.5), None),
    "adamw": (ff.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05), dict(lr=3.0), None),
    "torch-sgd": (torch.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=5e-4), dict(lr=7.0, momentum=0.1), None),
    "sgd-pfc-sparse": (ff.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=5e-4), dict(lr=7.0), SAMPLE_RATE),
}


# =============================================================================================
# shared by the workers and the test process


def _rel(a, e):
    """max|a − e| / max|e| (0 for empty tensors)."""
    a, e = a.detach().double(), e.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-300)


def _W0():
    return torch.randn(C, D, dtype=DT, generator=torch.Generator().manual_seed(7))


def _batch(t):
    """The global batch of step ``t``: 20 rows, two ignored, one class twice."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(sum(SIZES[1]), D, dtype=DT, generator=g)
    y = torch.randint(0, C, (x.shape[0],), generator=g)
    y[5] = y[6]
    for i in IGNORED:
        y[i] = -1
    return x, y


def _rows(world, rank):
    sizes = SIZES[world]
    off = sum(sizes[:rank])
    return slice(off, off + sizes[rank])


def _sharded(family, backend, **kw):
    _, cls, fkw = FAMILIES[family]
    head = cls(D, C, backend=backend, dtype=DT, **fkw, **kw)
    lo, hi = head.class_range
    with torch.no_grad():
        head.weight.copy_(_W0()[lo:hi])
    return head


def _single(family, backend):
    cls, _, fkw = FAMILIES[family]
    head = cls(D, C, backend=backend, dtype=DT, **fkw)
    with torch.no_grad():
        head.weight.copy_(_W0())
    return head


def _step(head, x, y):
    """One forward and backward from rows ``x``, ``y``: ``(loss, dL/dx)``."""
    x = x.detach().clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad


def _state_errors(got: dict, want: dict, names) -> dict:
    return {f"state {k}": _rel(got[k], want[k]) for k in names}


def _train(head, opt, sched, steps, sl, first=0):
    """``steps`` steps from step ``first`` on the rows ``sl`` of each global batch: losses, dL/dx,
    and whether W.grad was the AppliedGrad marker after every backward."""
    losses, dxs, marked = [], [], True
    for t in range(first, first + steps):
        x, y = _batch(t)
        loss, dx = _step(head, x[sl], y[sl])
        marked = marked and isinstance(head.weight.grad, AppliedGrad)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss)
        dxs.append(dx)
    return losses, dxs, marked


def _gather(comm, t):
    return comm.gather_rows_to(t.detach(), FD.shard_sizes(C, comm.world_size), 0)


# =============================================================================================
# 1. the in-backward optimizer of a sharded head against the single-process head


def _inbackward_checks(comm, world):
    res = {}
    sl = _rows(world, comm.rank)
    cases = [(fam, name, be) for fam in FAMILIES for name in OPTIMS for be in BACKENDS
             if fam == "arcface" or (name != "sgd-nesterov" and be == "torch")]
    for fam, name, be in cases:
        ib_cls, _, kw = OPTIMS[name]
        steps = STEPS if fam == "arcface" else NPT_STEPS
        runs = []
        for head, rows in ((_single(fam, be), slice(None)), (_sharded(fam, be), sl)):
            opt = ib_cls(head.parameters(), **kw)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
            runs.append((head, opt) + _train(head, opt, sched, steps, rows))
        (h1, o1, l1, dx1, _), (hd, od, ld, dxd, marked) = runs
        out = {"loss": max(_rel(a, e) for a, e in zip(ld, l1)),
               "dx": max(_rel(a, e[sl]) for a, e in zip(dxd, dx1)),
               "W.grad is AppliedGrad": marked,
               "lr schedule applied": od.param_groups[0]["lr"] == kw["lr"] * 0.5 ** (steps // 5)}
        full = _gather(comm, hd.weight)
        st1, std = o1.state[h1.weight], od.state[hd.weight]
        out["state keys"] = sorted(std) == sorted(st1)
        out["step"] = _rel(std["step"], st1["step"])
        per_class = [k for k in st1 if k != "step"]
        gathered = {k: _gather(comm, std[k]) for k in per_class}
        if full is not None:
            out["W"] = _rel(full, h1.weight)
            out["W moved"] = _rel(full, _W0())
            out.update(_state_errors(gathered, st1, per_class))
        res[f"{fam}/{name}/{be}"] = out
    return res


# =============================================================================================
# 2. Partial FC: sparse and dense semantics


def _pfc_check(comm, world, family, name, semantics, steps):
    """The in-backward optimizer of a sampled sharded head (``sparse=True`` / ``False``) against a
    reference built from torch.optim on an identically sampled head without it.

    sparse: each class row is its own parameter of one torch.optim optimizer whose step skips the
    rows without a gradient (``.grad`` None): every row is stepped by torch.optim exactly on the
    steps it was sampled in, with its own state (and AdamW step count); the gradient of a sampled
    row is the plain autograd gradient of the reference head. dense: torch.optim over the
    reference head's parameters (autograd gives the dense gradient with zeros on unsampled rows)."""
    rank = comm.rank
    sl = _rows(world, rank)
    ib_cls, t_cls, kw = OPTIMS[name]
    sparse = semantics == "sparse"
    heads = [_sharded(family, "torch", sample_rate=SAMPLE_RATE,
                      sample_generator=torch.Generator().manual_seed(100 + rank)) for _ in range(2)]
    A, B = heads
    lo, hi = A.class_range
    W0 = _W0()[lo:hi]
    oA = ib_cls(A.parameters(), sparse=sparse, **kw)
    sA = torch.optim.lr_scheduler.StepLR(oA, step_size=5, gamma=0.5)
    if sparse:
        rows = [nn.Parameter(W0[i].clone()) for i in range(hi - lo)]
        oB = t_cls(rows, **kw)
    else:
        oB = t_cls(B.parameters(), **kw)
    sB = torch.optim.lr_scheduler.StepLR(oB, step_size=5, gamma=0.5)
    counts = torch.zeros(hi - lo, dtype=torch.long)
    out = {"same samples": True, "loss": 0.0, "dx": 0.0, "W.grad is AppliedGrad": True}
    for t in range(steps):
        x, y = _batch(t)
        la, dxa = _step(A, x[sl], y[sl])
        out["W.grad is AppliedGrad"] = out["W.grad is AppliedGrad"] and isinstance(A.weight.grad, AppliedGrad)
        oA.step()
        oA.zero_grad()
        sA.step()
        lb, dxb = _step(B, x[sl], y[sl])
        local = B.last_sampled_classes - lo
        if sparse:
            for i in local.tolist():
                rows[i].grad = B.weight.grad[i].clone()
            oB.step()
            oB.zero_grad()
            with torch.no_grad():
                B.weight.copy_(torch.stack([r.detach() for r in rows]))
        else:
            oB.step()
            oB.zero_grad()
        B.weight.grad = None
        sB.step()
        counts[local] += 1
        out["same samples"] = out["same samples"] and torch.equal(A.last_sampled_classes, B.last_sampled_classes)
        out["loss"] = max(out["loss"], _rel(la, lb))
        out["dx"] = max(out["dx"], _rel(dxa, dxb))
        if t == 0:
            unsampled = torch.ones(hi - lo, dtype=torch.bool)
            unsampled[local] = False
            moved = (A.weight.detach()[unsampled] != W0[unsampled]).any(dim=1)
            # sparse: the rows outside the sample (and their state) did not change; dense: weight decay moved them
            out["unsampled rows after step 0"] = bool((~moved).all()) if sparse else bool(moved.all())
    out["W"] = _rel(A.weight, B.weight)
    out["W moved"] = _rel(A.weight, W0)
    stA = oA.state[A.weight]
    names = ("momentum_buffer",) if "sgd" in name else ("exp_avg", "exp_avg_sq")
    if sparse:
        for k in names:
            ref = torch.stack([oB.state[r][k] if k in oB.state[r] else torch.zeros(D, dtype=DT) for r in rows])
            out[f"state {k}"] = _rel(stA[k], ref)
        out["row_step counts the sampled steps"] = torch.equal(stA["row_step"].long(), counts)
        if "adamw" in name:
            ref_steps = torch.tensor([int(oB.state[r]["step"]) if "step" in oB.state[r] else 0 for r in rows])
            out["row_step is torch.optim's per-row step"] = torch.equal(stA["row_step"].long(), ref_steps)
    else:
        stB = oB.state[B.weight]
        out.update(_state_errors(stA, stB, names))
        out["no row_step"] = "row_step" not in stA
        if "step" in stB:
            out["step"] = _rel(stA["step"], stB["step"])
    return out


PFC_CASES = [f"{fam}/{name}/{sem}" for fam in FAMILIES for name in ("sgd", "adamw") for sem in ("sparse", "dense")]


def _pfc_checks(comm, world):
    res = {}
    for case in PFC_CASES:
        fam, name, sem = case.split("/")
        res[case] = _pfc_check(comm, world, fam, name, sem, PFC_STEPS if fam == "arcface" else NPT_STEPS)
    return res


# =============================================================================================
# 3. checkpoints with the optimizer state: 2 -> 3 -> 1


def _ckpt_head(world, rank, sample_rate):
    kw = {}
    if sample_rate is not None:
        kw = dict(sample_rate=sample_rate, sample_generator=torch.Generator().manual_seed(200 + 10 * world + rank))
    return _sharded("arcface", "torch", **kw)


def _same(a, b) -> bool:
    """Bitwise equality of nested states (tensors: dtype and values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _checkpoint_chain(comm, world, outdir):
    """world 2: train, save; world 3: load (resharded), compare with the saved state, train a step,
    save (world 1 runs in the test process: :func:`test_checkpoint_with_optimizer_reshards_2_3_1`)."""
    res = {}
    rank = comm.rank
    sl = _rows(world, rank)
    for name, (cls, kw, wrong, rate) in CKPT.items():
        head = _ckpt_head(world, rank, rate)
        if world == 2:
            opt = cls(head.parameters(), **kw)
            _train(head, opt, None, CKPT_STEPS[0], sl)
            FD.save_sharded(head, os.path.join(outdir, f"{name}-2"), optimizer=opt)
            res[name] = {"saved": True}
            continue
        opt = cls(head.parameters(), **dict(kw, **wrong))
        FD.load_sharded(head, os.path.join(outdir, f"{name}-2"), optimizer=opt)  # 2 -> 3
        got = head.full_state_dict(optimizer=opt)
        out = {"hyperparameters restored": all(opt.param_groups[0][k] == v for k, v in kw.items())}
        if rank == 0:
            want = FD.consolidate(os.path.join(outdir, f"{name}-2"), optimizer=True)
            out["2->3 identical (head and optimizer)"] = _same(got, want)
            out["per-class state resharded"] = sorted(
                k for k, v in got[1]["state"][0].items() if v.dim() >= 1 and v.shape[0] == C)
        # the full form, sliced by every rank: the same state as the per-shard load
        other = _ckpt_head(world, rank, rate)
        oopt = cls(other.parameters(), **dict(kw, **wrong))
        state, ostate = FD.consolidate(os.path.join(outdir, f"{name}-2"), optimizer=True)
        other.load_full_state_dict(state, optimizer=oopt, optimizer_state=ostate)
        out["load_full_state_dict identical"] = (_same(oopt.state[other.weight], opt.state[head.weight])
                                                 and _same(oopt.param_groups[0]["lr"], opt.param_groups[0]["lr"])
                                                 and torch.equal(other.weight, head.weight))
        _train(head, opt, None, CKPT_STEPS[1], sl, first=CKPT_STEPS[0])
        FD.save_sharded(head, os.path.join(outdir, f"{name}-3"), optimizer=opt)
        res[name] = out
    return res


def _agreement_check(comm, world, outdir):
    """Ranks whose replicated optimizer state differs: every rank raises (none hangs)."""
    head = _sharded("arcface", "torch")
    opt = ff.optim.SGD(head.parameters(), lr=0.1 * (1 + comm.rank), momentum=0.9)
    try:
        FD.save_sharded(head, os.path.join(outdir, f"disagree-{world}"), optimizer=opt)
    except ValueError as exc:
        return {"raised": "differs from rank 0" in str(exc)}
    return {"raised": False}


# =============================================================================================
# worker and process groups


def _worker(rank, world, port, outdir):
    init_local_group(rank, world, port)
    try:
        comm = FD.Comm()
        res = {}
        for section, fn in (("inbackward", _inbackward_checks), ("pfc", _pfc_checks)):
            t0 = time.perf_counter()
            res[section] = fn(comm, world)
            res[f"{section} seconds"] = time.perf_counter() - t0
        res["checkpoint"] = _checkpoint_chain(comm, world, outdir)
        res["agreement"] = _agreement_check(comm, world, outdir)
        torch.save(res, os.path.join(outdir, f"optim-world{world}-rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"optim-world{world}-rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _run_group(world, outdir, timeout=GROUP_TIMEOUT_S):
    """Spawn ``world`` processes; every one is gone when this returns (killed on timeout or error)."""
    run_local_group(_worker, world, str(outdir), timeout=timeout)
    return [torch.load(os.path.join(outdir, f"optim-world{world}-rank{r}.pt"), weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("optim-distributed")
    out = {"dir": outdir}
    for world in (2, 3):  # this order: the checkpoints go 2 -> 3 (-> 1 in the test process)
        out[world] = _run_group(world, outdir)
    return out


def _merged(ranks, section, key):
    """The worst value of every measurement over the ranks."""
    merged = {}
    for r in ranks:
        for k, v in r[section][key].items():
            if isinstance(v, bool):
                merged[k] = merged.get(k, True) and v
            elif isinstance(v, float):
                merged[k] = max(merged.get(k, 0.0), v)
            else:
                merged.setdefault(k, v)
    return merged


def _check(r: dict, where: str, moved=True):
    print(where, {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items()})
    for k, v in r.items():
        if isinstance(v, bool):
            assert v, f"{where}: {k}"
        elif isinstance(v, float) and k != "W moved":
            assert v <= TOL, f"{where}: {k} error {v:.3e} > {TOL}"
    if moved:
        assert r["W moved"] > 1e-3, f"{where}: W did not move (the update was not applied)"


# =============================================================================================
# tests


IB_CASES = [f"{fam}/{name}/{be}" for fam in FAMILIES for name in OPTIMS for be in BACKENDS
            if fam == "arcface" or (name != "sgd-nesterov" and be == "torch")]


@pytest.mark.parametrize("case", IB_CASES)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_inbackward_optimizer_equals_single_process(groups, world, case):
    """20 steps (NPT: 6) with a StepLR schedule: W (gathered), every state tensor (gathered), the
    step count, the loss and this rank's dL/dx of every step equal the single-process head with the
    same in-backward optimizer."""
    r = _merged(groups[world], "inbackward", case)
    assert "W" in r, "rank 0 did not report the gathered W"
    assert r.pop("state keys"), "the sharded state has other entries than the single-process state"
    _check(r, f"world {world} {case}")


@pytest.mark.parametrize("case", PFC_CASES)
@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc_semantics(groups, world, case):
    _check(_merged(groups[world], "pfc", case), f"world {world} {case}")


@pytest.mark.parametrize("case", ["arcface/sgd/sparse", "arcface/adamw/dense"])
def test_partial_fc_semantics_world_of_one_without_process_group(case):
    assert not (dist.is_available() and dist.is_initialized())
    fam, name, sem = case.split("/")
    _check(_pfc_check(FD.Comm(), 1, fam, name, sem, PFC_STEPS), f"world 1 {case}")


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_refuses_ranks_that_disagree(groups, world):
    assert all(r["agreement"]["raised"] for r in groups[world]), "a rank saved a state that differs from rank 0's"


@pytest.mark.parametrize("name", list(CKPT))
def test_checkpoint_with_optimizer_reshards_2_3_1(groups, name):
    """Trained 3 steps on 2 processes, saved; loaded into 3 (bitwise the saved state, hyperparameters
    restored over the ones the optimizer was built with), a step, saved; loaded into a world of
    one, a step: equal to 5 uninterrupted single-process steps (not for Partial FC, whose samples
    depend on the world size: there the resharded states are compared bitwise)."""
    w3 = _merged(groups[3], "checkpoint", name)
    assert w3["hyperparameters restored"], "load_sharded did not restore the saved hyperparameters"
    assert w3["2->3 identical (head and optimizer)"], "2 -> 3: the resharded state differs from the saved one"
    assert w3["load_full_state_dict identical"], "load_full_state_dict(optimizer=) differs from load_sharded"
    cls, kw, wrong, rate = CKPT[name]
    want_per_class = {"sgd": ["momentum_buffer"], "torch-sgd": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq"],
                      "sgd-pfc-sparse": ["momentum_buffer", "row_step"]}[name]
    assert w3["per-class state resharded"] == want_per_class
    d3 = groups["dir"] / f"{name}-3"
    head = _ckpt_head(1, 0, rate)
    opt = cls(head.parameters(), **dict(kw, **wrong))
    FD.load_sharded(head, d3, optimizer=opt)  # 3 -> 1
    assert _same(head.full_state_dict(optimizer=opt), FD.consolidate(d3, optimizer=True)), "3 -> 1 differs"
    if rate is not None:
        return
    _train(head, opt, None, CKPT_STEPS[2], slice(None), first=sum(CKPT_STEPS[:2]))
    ref = _single("arcface", "torch")
    ropt = cls(ref.parameters(), **kw)
    _train(ref, ropt, None, sum(CKPT_STEPS), slice(None))
    errs = {"W": _rel(head.weight, ref.weight)}
    st, rst = opt.state[head.weight], ropt.state[ref.weight]
    assert sorted(st) == sorted(rst)
    errs.update({f"state {k}": _rel(st[k], rst[k]) for k in rst})
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    # the consolidated optimizer state loads into the single-process head's optimizer
    state, ostate = FD.consolidate(d3, optimizer=True)
    single = ff.ArcFace(D, C, backend="torch", dtype=DT)
    single.load_state_dict(state)
    sopt = cls(single.parameters(), **dict(kw, **wrong))
    sopt.load_state_dict(ostate)
    assert all(sopt.param_groups[0][k] == v for k, v in kw.items())
    assert all(torch.equal(sopt.state[single.weight][k], v) for k, v in ostate["state"][0].items())


def test_checkpoint_torch_optim_state_loads_into_inbackward_optimizer(tmp_path):
    """torch.optim.SGD and fusedface.optim.SGD keep the same state: a checkpoint of one resumes the
    other (the hyperparameters both have come from the checkpoint), and the next step is the same."""
    kw = dict(lr=0.2, momentum=0.9, weight_decay=5e-4)
    head = _sharded("arcface", "torch")
    opt = torch.optim.SGD(head.parameters(), **kw)
    _train(head, opt, None, 2, slice(None))
    FD.save_sharded(head, tmp_path / "torch-sgd", optimizer=opt)
    other = _sharded("arcface", "torch")
    fopt = ff.optim.SGD(other.parameters(), lr=5.0, momentum=0.5, sparse=False)
    FD.load_sharded(other, tmp_path / "torch-sgd", optimizer=fopt)
    g = fopt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["sparse"]) == (0.2, 0.9, 5e-4, False)
    assert "maximize" not in g, "a key of torch.optim's group leaked into fusedface.optim's"
    _train(head, opt, None, 1, slice(None), first=2)
    _train(other, fopt, None, 1, slice(None), first=2)
    assert _rel(other.weight, head.weight) <= TOL
    assert _rel(fopt.state[other.weight]["momentum_buffer"], opt.state[head.weight]["momentum_buffer"]) <= TOL
    with pytest.raises(ValueError, match="cannot load into"):
        FD.load_sharded(other, tmp_path / "torch-sgd", optimizer=torch.optim.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="without optimizer state"):
        FD.save_sharded(head, tmp_path / "bare")
        FD.load_sharded(other, tmp_path / "bare", optimizer=fopt)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rate", [None, SAMPLE_RATE])
def test_second_backward_before_step_is_refused(family, rate):
    """retain_graph and a second backward before step(): the in-backward optimizer's error (the
    update cannot accumulate), before the updated shard is read, and W stays as the first backward left it."""
    kw = {} if rate is None else dict(sample_rate=rate, sample_generator=torch.Generator().manual_seed(0))
    head = _sharded(family, "torch", **kw)
    opt = ff.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch(0)
    loss = head(x.clone().requires_grad_(True), y)
    loss.backward(retain_graph=True)
    after = head.weight.detach().clone()
    with pytest.raises(ff.optim.InBackwardError, match="second backward"):
        loss.backward()
    assert torch.equal(head.weight, after)
    opt.step()
