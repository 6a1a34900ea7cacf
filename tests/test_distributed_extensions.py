"""fusedface.distributed: the sharded twins of the issue-16 heads (AdaFace, CurricularFace, MagFace,
Sub-center ArcFace) and inter-class filtering, on 2 and 3 CPU processes (gloo, loopback only),
against ONE process's single-process head on the concatenated global batch, in float64 (1e-10).

As in tests/test_distributed.py: one process group per world size (2, then 3: the 3-process group
loads the checkpoint the 2-process group saved) runs every check and writes its measurements to a
file; the tests below read them. Local batch sizes differ between ranks and two global rows carry
the ignore label.
"""
from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fusedface as ff
import fusedface.distributed as FD
from fusedface.distributed._spawn import init_local_group, run_local_group

C = 101  # not divisible by 2 or 3
D = 16
K = 3  # sub-centres per class
DT = torch.float64
TOL = 1e-10
STEPS = 3
GROUP_TIMEOUT_S = 240
SIZES = {1: [23], 2: [9, 14], 3: [11, 5, 8]}  # one global batch of 23 rows, split unequally
IGNORED = (2, 17)  # global rows with the ignore label
BACKENDS = [b for b in ("torch", "native") if b in ff.available_backends()]

# name: (single-process head, sharded head, keyword arguments, buffers to compare after each step)
FAMILIES = {
    "adaface": (ff.AdaFace, FD.ShardedAdaFace, dict(t_alpha=0.3), ("batch_mean", "batch_std")),
    "curricularface": (ff.CurricularFace, FD.ShardedCurricularFace, dict(momentum=0.3), ("t",)),
    "magface": (ff.MagFace, FD.ShardedMagFace, {}, ()),
    "subcenter": (ff.SubCenterArcFace, FD.ShardedSubCenterArcFace, dict(k=K), ()),
    "arcface-interclass": (ff.ArcFace, FD.ShardedArcFace, dict(interclass_threshold=0.3), ()),
    "curricular-subcenter-interclass": (ff.CurricularFace, FD.ShardedCurricularFace,
                                        dict(momentum=0.3, subcenters=K, interclass_threshold=0.4), ("t",)),
}
CASES = [f"{fam}/{be}" for fam in FAMILIES for be in BACKENDS]


# =============================================================================================
# shared by the workers and the test process


def _rel(a, e):
    """max|a − e| / max|e| (0 for empty tensors)."""
    a, e = a.detach().double(), e.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-300)


def _W0(rows_per_class=1):
    return torch.randn(C * rows_per_class, D, dtype=DT, generator=torch.Generator().manual_seed(7))


def _batch(t):
    """The global batch of step ``t``: embeddings of norms 5 … 120 (MagFace's margin and regulariser
    clamp below 10 and above 110; AdaFace's statistics move), one class twice, two ignored rows."""
    g = torch.Generator().manual_seed(1000 + t)
    B = sum(SIZES[1])
    x = torch.randn(B, D, dtype=DT, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * torch.empty(B, 1, dtype=DT).uniform_(5.0, 120.0, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    y[5] = y[6]
    for i in IGNORED:
        y[i] = -1
    return x, y


def _rows(world, rank):
    sizes = SIZES[world]
    off = sum(sizes[:rank])
    return slice(off, off + sizes[rank])


def _heads(fam, backend, **dist_kw):
    s_cls, d_cls, kw, _ = FAMILIES[fam]
    single = s_cls(D, C, backend=backend, dtype=DT, **kw)
    sharded = d_cls(D, C, backend=backend, dtype=DT, **kw, **dist_kw)
    m = sharded.subcenters
    W = _W0(m)
    lo, hi = sharded.class_range
    with torch.no_grad():
        single.weight.copy_(W)
        sharded.weight.copy_(W[lo * m:hi * m])
    return single, sharded


def _step(head, x, y):
    x = x.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad


def _gather_rows(comm, t, rows_per_class=1):
    """A per-class tensor of every rank on rank 0 (None elsewhere)."""
    sizes = [s * rows_per_class for s in FD.shard_sizes(C, comm.world_size)]
    return comm.gather_rows_to(t.detach().contiguous(), sizes, 0)


# =============================================================================================
# worker side


def _family_checks(comm, world):
    """STEPS training steps (SGD on W) of each family, every step against the single-process head."""
    res = {}
    rank = comm.rank
    sl = _rows(world, rank)
    for fam, (_, _, _, buffers) in FAMILIES.items():
        for be in BACKENDS:
            single, sharded = _heads(fam, be)
            m = sharded.subcenters
            opt_s = torch.optim.SGD(single.parameters(), lr=0.5)
            opt_d = torch.optim.SGD(sharded.parameters(), lr=0.5)
            r = {}
            for t in range(STEPS):
                x, y = _batch(t)
                ls, gxs = _step(single, x, y)
                ld, gxd = _step(sharded, x[sl], y[sl])
                full = _gather_rows(comm, sharded.weight.grad, m)
                errs = {"loss": _rel(ld, ls), "dx": _rel(gxd, gxs[sl])}
                if full is not None:
                    errs["dW"] = _rel(full, single.weight.grad)
                for k in buffers:
                    errs[f"buffer {k}"] = _rel(getattr(sharded.head, k), getattr(single, k))
                if fam == "magface":
                    errs["last_regularizer"] = _rel(sharded.head.last_regularizer, single.last_regularizer)
                if t == 0:
                    r["accuracy_equal"] = bool(torch.equal(single.last_accuracy, sharded.last_accuracy))
                    r["sv_fraction_equal"] = bool(torch.equal(single.last_sv_fraction, sharded.last_sv_fraction))
                for k, v in errs.items():
                    r[k] = max(r.get(k, 0.0), v)
                opt_s.step()
                opt_d.step()
            # the full state (replicated buffers from rank 0, W resharded by class) is the single head's
            state = sharded.full_state_dict()
            if state is not None:
                ref = single.state_dict()
                r["state_keys_equal"] = set(state) == set(ref)
                r["state"] = max(_rel(state[k], ref[k]) for k in ref)
            # the buffers agree on every rank (the single-process comparison above is per rank too)
            for k in buffers:
                v = getattr(sharded.head, k).reshape(1)
                r[f"buffer {k} agrees"] = bool(torch.equal(comm.all_reduce(v.clone(), "max"), v)
                                               and torch.equal(comm.all_reduce(v.clone(), "min"), v))
            res[f"{fam}/{be}"] = r
    return res


def _magface_checks(comm, world):
    """MagFace: reduction "sum" and "none" (per-row totals of the global batch), eval mode, and
    embedding_grad_scale on the norm path too."""
    res = {}
    rank = comm.rank
    sl = _rows(world, rank)
    x, y = _batch(5)
    for red in ("sum", "none"):
        single = ff.MagFace(D, C, backend="torch", dtype=DT, reduction=red)
        sharded = FD.ShardedMagFace(D, C, backend="torch", dtype=DT, reduction=red)
        lo, hi = sharded.class_range
        with torch.no_grad():
            single.weight.copy_(_W0())
            sharded.weight.copy_(_W0()[lo:hi])
        xs = x.clone().requires_grad_(True)
        ls = single(xs, y)
        xd = x[sl].clone().requires_grad_(True)
        ld = sharded(xd, y[sl])
        wgt = torch.linspace(0.5, 1.5, ls.numel(), dtype=DT).reshape(ls.shape)  # a non-uniform upstream
        (ls * wgt).sum().backward()
        (ld * wgt).sum().backward()
        res[f"reduction-{red}"] = {"loss": _rel(ld, ls), "dx": _rel(xd.grad, xs.grad[sl])}
    single = ff.MagFace(D, C, backend="torch", dtype=DT)
    sharded = FD.ShardedMagFace(D, C, backend="torch", dtype=DT, embedding_grad_scale=float(world))
    lo, hi = sharded.class_range
    with torch.no_grad():
        single.weight.copy_(_W0())
        sharded.weight.copy_(_W0()[lo:hi])
    ls, gxs = _step(single, x, y)
    ld, gxd = _step(sharded, x[sl], y[sl])
    res["embedding_grad_scale"] = {"loss": _rel(ld, ls), "dx": _rel(gxd, world * gxs[sl])}
    single.eval()
    sharded.eval()
    with torch.no_grad():
        res["eval"] = {"loss": _rel(sharded(x[sl], y[sl]), single(x, y))}
    return res


def _subcenter_pfc_checks(comm, world):
    """Partial FC on a Sub-center ArcFace shard: classes sampled, all K rows of each run; the loss is
    the single-process loss over the sampled classes and dL/dW lands only in their rows."""
    res = {}
    rank = comm.rank
    sl = _rows(world, rank)
    rate = 0.3
    x, y = _batch(9)
    _, head = _heads("subcenter", "torch", sample_rate=rate)
    head.sample_generator = torch.Generator().manual_seed(50 + rank)
    ld, gxd = _step(head, x[sl], y[sl])
    lo, hi = head.class_range
    owned = (y >= 0) & (y >= lo) & (y < hi)
    index, _ = FD.sample_classes(torch.where(owned, y - lo, -1), hi - lo, rate, torch.Generator().manual_seed(50 + rank))
    kept = torch.zeros(hi - lo, dtype=torch.bool)
    kept[index] = True
    kept_all = comm.all_gather_rows(kept.to(torch.uint8), FD.shard_sizes(C, world)).bool()
    kept_ids = kept_all.nonzero().squeeze(1)
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[kept_ids] = torch.arange(kept_ids.numel())
    rows = (kept_ids[:, None] * K + torch.arange(K)).reshape(-1)
    W_sub = _W0(K)[rows].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    ls = ff.functional.margin_softmax_loss(xs, W_sub, torch.where(y >= 0, remap[y.clamp(min=0)], -1), m2=0.5,
                                           subcenters=K, backend="torch")
    ls.backward()
    r = {"loss": _rel(ld, ls), "dx": _rel(gxd, xs.grad[sl]),
         "sample_reported": torch.equal(index + lo, head.last_sampled_classes),
         "positives_kept": bool(kept[torch.unique(y[owned] - lo)].all()),
         "grad_shape_is_shard": tuple(head.weight.grad.shape) == ((hi - lo) * K, D)}
    full = _gather_rows(comm, head.weight.grad, K)
    if full is not None:
        full = full.view(C, K, D)
        r["dW"] = _rel(full[kept_ids].reshape(-1, D), W_sub.grad)
        r["dW_unsampled_zero"] = bool((full[~kept_all] == 0).all())
        r["dW_sampled_nonzero"] = bool((full[kept_ids].abs().sum(dim=(1, 2)) > 0).all())
    res["pfc"] = r
    return res


def _train(head, opt, world, rank, steps=2, first=20):
    sl = _rows(world, rank)
    losses = []
    for t in range(first, first + steps):
        x, y = _batch(t)
        loss, _ = _step(head, x[sl], y[sl])
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    return losses


def _subcenter_optim_checks(comm, world, outdir):
    """fusedface.optim's in-backward update of a Sub-center ArcFace shard (rows by class, K each):
    against torch.optim on the single-process head, and with Partial FC (sparse and dense semantics)
    against torch.optim on the sharded head; then the checkpoint of head and optimizer."""
    res = {}
    rank = comm.rank
    hyper = dict(lr=0.2, momentum=0.9, weight_decay=5e-4)
    single, sharded = _heads("subcenter", "torch")
    opt_s = torch.optim.SGD(single.parameters(), **hyper)
    opt_d = ff.optim.SGD(sharded.parameters(), **hyper)
    ls = _train(single, opt_s, 1, 0)
    ld = _train(sharded, opt_d, world, rank)
    full = _gather_rows(comm, sharded.weight, K)
    r = {"loss": max(_rel(a, b) for a, b in zip(ld, ls))}
    if full is not None:
        r["W"] = _rel(full, single.weight)
    # the full state: head and optimizer, as the single-process head's and torch.optim's
    state, opt_state = sharded.full_state_dict(optimizer=opt_d)
    if state is not None:
        r["state"] = _rel(state["weight"], single.weight)
        ref = opt_s.state_dict()["state"][0]["momentum_buffer"]
        r["momentum_buffer"] = _rel(opt_state["state"][0]["momentum_buffer"], ref)
        torch.save({"state": state, "opt": opt_state}, os.path.join(outdir, f"subcenter-full-{world}.pt"))
    comm.barrier()
    ref = torch.load(os.path.join(outdir, f"subcenter-full-{world}.pt"), weights_only=True)
    fresh = FD.ShardedSubCenterArcFace(D, C, k=K, backend="torch", dtype=DT)
    fresh_opt = ff.optim.SGD(fresh.parameters(), lr=9.0)
    fresh.load_full_state_dict(ref["state"], optimizer=fresh_opt, optimizer_state=ref["opt"])
    lo, hi = fresh.class_range
    r["load_full_state_dict slices"] = (torch.equal(fresh.weight, ref["state"]["weight"][lo * K:hi * K])
                                        and torch.equal(fresh_opt.state[fresh.weight]["momentum_buffer"],
                                                        ref["opt"]["state"][0]["momentum_buffer"][lo * K:hi * K]))
    # per-shard files: saved by the 2-process group, loaded (resharded by class) by the 3-process one
    if world == 2:
        FD.save_sharded(sharded, os.path.join(outdir, "subcenter-ckpt-2"), optimizer=opt_d)
    elif world == 3:
        other = FD.ShardedSubCenterArcFace(D, C, k=K, backend="torch", dtype=DT)
        other_opt = ff.optim.SGD(other.parameters(), lr=9.0)
        FD.load_sharded(other, os.path.join(outdir, "subcenter-ckpt-2"), optimizer=other_opt)
        got, got_opt = other.full_state_dict(optimizer=other_opt)
        if got is not None:
            saved = torch.load(os.path.join(outdir, "subcenter-full-2.pt"), weights_only=True)
            r["2->3 identical"] = (torch.equal(got["weight"], saved["state"]["weight"])
                                   and torch.equal(got_opt["state"][0]["momentum_buffer"],
                                                   saved["opt"]["state"][0]["momentum_buffer"])
                                   and got_opt["param_groups"][0]["lr"] == hyper["lr"])
    res["in-backward"] = r

    # Partial FC: sparse=True (plain SGD: only the sampled classes' rows move, as torch.optim's update
    # of the sampled rows) and sparse=False (momentum and weight decay: torch.optim's dense semantics)
    for sparse, hp in ((True, dict(lr=0.5)), (False, hyper)):
        _, a = _heads("subcenter", "torch", sample_rate=0.3)
        _, b = _heads("subcenter", "torch", sample_rate=0.3)
        a.sample_generator = torch.Generator().manual_seed(60 + rank)
        b.sample_generator = torch.Generator().manual_seed(60 + rank)
        W_before = a.weight.detach().clone()
        opt_a = ff.optim.SGD(a.parameters(), sparse=sparse, **hp)
        la = _train(a, opt_a, world, rank, steps=1)
        moved = (a.weight != W_before).any(dim=1).view(-1, K).any(dim=1)
        sampled = torch.zeros(moved.shape[0], dtype=torch.bool)
        sampled[a.last_sampled_classes - a.class_range[0]] = True
        la += _train(a, opt_a, world, rank, steps=1, first=21)
        lb = _train(b, torch.optim.SGD(b.parameters(), **hp), world, rank)
        res[f"pfc-sparse-{sparse}"] = {"loss": max(_rel(u, v) for u, v in zip(la, lb)), "W": _rel(a.weight, b.weight),
                                       "only_sampled_moved": bool(not sparse or not (moved & ~sampled).any())}
    return res


def _worker(rank, world, port, outdir):
    init_local_group(rank, world, port)
    try:
        comm = FD.Comm()
        t0 = time.perf_counter()
        res = {"families": _family_checks(comm, world), "magface": _magface_checks(comm, world),
               "subcenter": {**_subcenter_pfc_checks(comm, world), **_subcenter_optim_checks(comm, world, outdir)}}
        res["seconds"] = time.perf_counter() - t0
        torch.save(res, os.path.join(outdir, f"world{world}-rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"world{world}-rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# =============================================================================================
# parent side


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed_extensions")
    out = {}
    for world in (2, 3):  # this order: the 3-process group loads the 2-process group's checkpoint
        run_local_group(_worker, world, str(outdir), timeout=GROUP_TIMEOUT_S)
        out[world] = [torch.load(os.path.join(outdir, f"world{world}-rank{r}.pt"), weights_only=False)
                      for r in range(world)]
    return out


def _merged(ranks, section, key):
    """The worst value of every measurement over the ranks (dW and the full state: rank 0 only)."""
    merged = {}
    for r in ranks:
        for k, v in r[section][key].items():
            if isinstance(v, bool):
                merged[k] = merged.get(k, True) and v
            elif isinstance(v, float):
                merged[k] = max(merged.get(k, 0.0), v)
    return merged


def _assert_close(r, what):
    floats = {k: v for k, v in r.items() if not isinstance(v, bool)}
    bad = {k: v for k, v in floats.items() if v > TOL}
    assert not bad, f"{what}: differs from the single-process result by {bad} (tolerance {TOL:g})"
    flags = {k: v for k, v in r.items() if isinstance(v, bool) and not v}
    assert not flags, f"{what}: failed {sorted(flags)}"


WORLDS = [2, 3]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_head_equals_single_process_over_training_steps(groups, world, case):
    r = _merged(groups[world], "families", case)
    assert "dW" in r and "state" in r, "rank 0 did not report the gathered dL/dW and the full state"
    for k in FAMILIES[case.split("/")[0]][3]:
        assert f"buffer {k}" in r
    _assert_close(r, f"world {world}, {case}")


@pytest.mark.parametrize("check", ["reduction-sum", "reduction-none", "embedding_grad_scale", "eval"])
@pytest.mark.parametrize("world", WORLDS)
def test_magface_reductions_and_gradient_scale(groups, world, check):
    _assert_close(_merged(groups[world], "magface", check), f"world {world}, MagFace {check}")


@pytest.mark.parametrize("world", WORLDS)
def test_subcenter_partial_fc_samples_whole_classes(groups, world):
    r = _merged(groups[world], "subcenter", "pfc")
    assert "dW" in r and "dW_unsampled_zero" in r
    _assert_close(r, f"world {world}, Sub-center ArcFace with Partial FC")


@pytest.mark.parametrize("check", ["in-backward", "pfc-sparse-True", "pfc-sparse-False"])
@pytest.mark.parametrize("world", WORLDS)
def test_subcenter_in_backward_optimizer_and_checkpoints(groups, world, check):
    r = _merged(groups[world], "subcenter", check)
    if check == "in-backward":
        assert "W" in r and "momentum_buffer" in r and r["load_full_state_dict slices"]
        if world == 3:
            assert r.get("2->3 identical"), "the 2-process checkpoint did not reshard by class into 3 processes"
    _assert_close(r, f"world {world}, Sub-center ArcFace {check}")


def test_groups_are_quick(groups):
    slowest = max(r["seconds"] for rs in groups.values() for r in rs)
    assert slowest < 60, f"a group's checks took {slowest:.1f} s"


# =============================================================================================
# in-process: a world of one without a process group, and the guard


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_world_of_one_without_process_group(fam):
    assert not dist.is_initialized()
    single, sharded = _heads(fam, "torch")
    for t in range(2):
        x, y = _batch(t)
        a, b = _step(single, x, y), _step(sharded, x, y)
        assert _rel(b[0], a[0]) <= 1e-12 and _rel(b[1], a[1]) <= 1e-12
        assert _rel(sharded.weight.grad, single.weight.grad) <= 1e-12
    for k in FAMILIES[fam][3]:
        assert _rel(getattr(sharded.head, k), getattr(single, k)) <= 1e-12
    assert set(sharded.full_state_dict()) == set(single.state_dict())


def test_guard_admits_the_new_heads_and_refuses_other_hooks():
    for cls in (FD.ShardedAdaFace, FD.ShardedCurricularFace, FD.ShardedMagFace, FD.ShardedSubCenterArcFace):
        cls(D, C)

    class OwnT(ff.ArcFace):
        def row_rewrite(self, x, y):
            return torch.zeros(())

    class OwnAda(ff.AdaFace):
        def row_margins(self, x, y):
            return 0.1, 0.0

    with pytest.raises(TypeError, match="overrides row_rewrite"):
        FD.ShardedHead(D, C, head_class=OwnT)
    with pytest.raises(TypeError, match="overrides row_margins"):
        FD.ShardedHead(D, C, head_class=OwnAda)

    class OwnRegulariser(ff.MagFace):
        def forward(self, embeddings, labels):
            return super().forward(embeddings, labels) * 2

    with pytest.raises(TypeError, match="overrides forward"):
        FD.ShardedHead(D, C, head_class=OwnRegulariser)
    for cls in (FD.ShardedAdaFace, FD.ShardedCurricularFace, FD.ShardedMagFace, FD.ShardedSubCenterArcFace):
        with pytest.raises(ValueError, match="2-D"):  # the input checks come before the norms
            cls(D, C)(torch.randn(D, dtype=torch.float64), torch.tensor([0]))
    head = FD.ShardedSubCenterArcFace(D, C, k=K)
    assert tuple(head.weight.shape) == (C * K, D)
    x, y = _batch(0)
    with pytest.raises(ValueError, match="sub-centres per class"):
        FD.margin_softmax_loss(x, _W0(), y, num_classes=C, subcenters=K)
    rows = FD.margin_softmax_loss(x, _W0(K), y, num_classes=C, subcenters=K, m2=0.5, reduction="none",
                                  interclass_threshold=0.3, backend="torch")
    ref = ff.functional.margin_softmax_loss(x, _W0(K), y, subcenters=K, m2=0.5, reduction="none",
                                            interclass_threshold=0.3, backend="torch")
    assert _rel(rows, ref) <= 1e-12


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
