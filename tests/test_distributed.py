"""fusedface.distributed: class-sharded heads on 1, 2 and 3 CPU processes (gloo, loopback only)
against the single-process heads on the same global batch.

Few process groups, many checks: one group per world size (2, then 3, then 1) runs every check
inside and writes its measurements to a file; the tests below read them (so a failure names the
check, the world size and the error). The groups run in that order because the checkpoint saved
by the 2-process group is loaded by the 3-process group and its save by the 1-process group.
Processes are started with torch.multiprocessing (spawn), on 127.0.0.1 only, and killed on
timeout.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fusedface as ff
import fusedface.distributed as FD
from fusedface.distributed._spawn import init_local_group, run_local_group
from conftest import backend_names, make_problem

C = 1001  # not divisible by 2 or 3
D = 24
GROUP_TIMEOUT_S = 300
BATCH_SIZES = {1: [23], 2: [9, 14], 3: [11, 5, 8]}  # variable per rank
TOL = {"float64": 1e-10, "float32": 1e-5}
# The CPU backends only, not conftest.backend_names(): every case runs in gloo worker processes (three
# worlds x families x dtypes), where the Triton interpreter would multiply the module's ~1 min by the
# interpreter's per-launch cost; the sharded Functions' Triton path (the same tile kernels) is covered
# in-process by tests/test_host_sync.py::test_sharded_pass_forward_and_backward[triton].
BACKENDS = [b for b in ("torch", "native") if b in ff.available_backends()]

# name: (single-process head, sharded head, keyword arguments)
FAMILIES = {
    "arcface": (ff.ArcFace, FD.ShardedArcFace, {}),
    "arcface-threshold": (ff.ArcFace, FD.ShardedArcFace, dict(theta_policy="threshold")),
    "cosface": (ff.CosFace, FD.ShardedCosFace, {}),
    "combined": (ff.CombinedMargin, FD.ShardedCombinedMargin, {}),
    "sv-softmax": (ff.SVSoftmax, FD.ShardedSVSoftmax, {}),
    "mv-softmax-arc": (ff.MVSoftmax, FD.ShardedMVSoftmax, dict(margin_type="arc")),
    "elastic-arc-plus": (ff.ElasticArcFace, FD.ShardedElasticArcFace, dict(plus=True)),
    "elastic-cos": (ff.ElasticCosFace, FD.ShardedElasticCosFace, {}),
    "kappaface": (ff.KappaFace, FD.ShardedKappaFace, {}),
    "npt": (ff.NPT, FD.ShardedNPT, dict(k=3)),
}
CASES = [f"{fam}/{dt}/{be}" for fam in FAMILIES for dt in TOL for be in BACKENDS]


# =============================================================================================
# worker side (runs in the spawned processes)


def _rel(a, e):
    """max|a − e| / max|e| (0 for empty tensors)."""
    a, e = a.detach().double(), e.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-300)


def _data(world, dtype, seed=0, sizes=None, labels_below=None, near=None):
    """The same global batch on every rank: two ignored rows, one at θ = π − 0.3 from its centre
    (past π with the ArcFace margin) and two close to their centre (so the merged arg-max has
    correct rows to find). ``near="exact"`` (the fp64 default) puts them at cosine ≈ 1 − 5e-9,
    below fp32's resolution; ``"moderate"`` (the fp32 default) at cosine ≈ 0.95: see
    ``_fp32_drift_checks`` for why fp32 is held to a fixed tolerance only on resolvable rows."""
    sizes = sizes or BATCH_SIZES[world]
    near = near or ("exact" if dtype == torch.float64 else "moderate")
    B = sum(sizes)
    x, W, y = make_problem(B, D, C, dtype=torch.float64, seed=seed, ignore=(2, B - 1), past_pi=(1,),
                           near_centre=(3, 4) if near == "exact" else ())
    if near == "moderate":
        g = torch.Generator().manual_seed(seed + 1000)
        for i in (3, 4):
            x[i] = W[y[i]] + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    if labels_below is not None:
        y = torch.where(y >= 0, y % labels_below, y)
    return x.to(dtype), W.to(dtype), y, sizes


def _pair(single_cls, sharded_cls, kw, W, dtype, backend, rank, **dist_kw):
    """The single-process head over all classes and the sharded head, with the same ``W``."""
    s_kw, d_kw = dict(kw), dict(kw, **dist_kw)
    if issubclass(single_cls, ff.modules._Elastic):
        s_kw["generator"] = torch.Generator().manual_seed(123)
        # only rank 0's generator may matter: the others are seeded differently on purpose
        d_kw["generator"] = torch.Generator().manual_seed(123 if rank == 0 else 9000 + rank)
    single = single_cls(D, C, backend=backend, dtype=dtype, **s_kw)
    sharded = sharded_cls(D, C, backend=backend, dtype=dtype, **d_kw)
    lo, hi = sharded.class_range
    with torch.no_grad():
        single.weight.copy_(W)
        sharded.weight.copy_(W[lo:hi])
    return single, sharded


def _step(head, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = head(x, y, **kw)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


def _gather_full(comm, t, num_classes=C):
    return comm.gather_rows_to(t.detach(), FD.shard_sizes(num_classes, comm.world_size), 0)


def _compare(comm, single, sharded, x, y, sizes, **kw):
    """Loss, this rank's dL/dx and the gathered dL/dW (rank 0) against the single-process head."""
    rank = comm.rank
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    ls, gxs, gWs = _step(single, x, y)
    ld, gxd, gWd = _step(sharded, x[sl], y[sl], **kw)
    full = _gather_full(comm, gWd)
    out = {"loss": _rel(ld, ls), "dx": _rel(gxd, gxs[sl]), "loss_value": float(ls)}
    if full is not None:
        out["dW"] = _rel(full, gWs)
    return out


def _family_checks(comm, world):
    res = {}
    for fam, (s_cls, d_cls, kw) in FAMILIES.items():
        for dt in TOL:
            dtype = getattr(torch, dt)
            for be in BACKENDS:
                x, W, y, sizes = _data(world, dtype)
                single, sharded = _pair(s_cls, d_cls, kw, W, dtype, be, comm.rank)
                extra = {}
                if fam == "kappaface":
                    # two batches of statistics and an epoch end, so the margins differ per class
                    for seed in (11, 12):
                        xe, _, ye, _ = _data(world, dtype, seed=seed)
                        off = sum(sizes[:comm.rank])
                        with torch.no_grad():
                            single(xe, ye)
                            sharded(xe[off: off + sizes[comm.rank]], ye[off: off + sizes[comm.rank]])
                    single.end_epoch()
                    sharded.end_epoch()
                    m = _gather_full(comm, sharded.head.class_margins)
                    if m is not None:
                        extra["class_margins"] = _rel(m, single.class_margins)
                r = _compare(comm, single, sharded, x, y, sizes)
                r.update(extra)
                if fam != "npt":
                    r["accuracy_equal"] = bool(torch.equal(single.last_accuracy, sharded.last_accuracy))
                    r["sv_fraction_equal"] = bool(torch.equal(single.last_sv_fraction, sharded.last_sv_fraction))
                    r["accuracy"] = float(single.last_accuracy)
                res[f"{fam}/{dt}/{be}"] = r
    return res


def _special_checks(comm, world, outdir):
    res = {}
    rank = comm.rank
    dtype = torch.float64

    # a rank (or several) with no positive class: every label in rank 0's shard
    x, W, y, sizes = _data(world, dtype, labels_below=FD.shard_sizes(C, world)[0])
    single, sharded = _pair(ff.ArcFace, FD.ShardedArcFace, {}, W, dtype, "torch", rank)
    res["no-positive"] = _compare(comm, single, sharded, x, y, sizes)

    # a rank with no rows at all (and the batch sizes passed in: no size all-gather)
    sizes0 = [10, 0, 7][:world] if world > 1 else [10]
    if world == 2:
        sizes0 = [0, 12]
    x, W, y, _ = _data(world, dtype, sizes=sizes0)
    single, sharded = _pair(ff.CosFace, FD.ShardedCosFace, {}, W, dtype, "torch", rank)
    res["empty-rank"] = _compare(comm, single, sharded, x, y, sizes0, batch_sizes=sizes0)

    # NPT with a large k on an ElasticCos-free problem: candidates of every rank merge
    x, W, y, sizes = _data(world, dtype, seed=5)
    single, sharded = _pair(ff.NPT, FD.ShardedNPT, dict(k=16), W, dtype, "torch", rank)
    res["npt-k16"] = _compare(comm, single, sharded, x, y, sizes)

    # OTFace: the margin softmax over the global batch plus the OT term of this rank's rows
    x, W, y, sizes = _data(world, dtype, seed=6)
    g = torch.Generator().manual_seed(3)
    fm = torch.randn(sum(sizes), 3, 2, 2, generator=g, dtype=dtype)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    single, sharded = _pair(ff.ArcFace, FD.ShardedOTFace, {}, W, dtype, "torch", rank)
    ls, gxs, gWs = _step(single, x, y)
    fml = fm[sl].clone().requires_grad_(True)
    xl = x[sl].clone().requires_grad_(True)
    ld = sharded(xl, y[sl], fml)
    ld.backward()
    fmr = fm[sl].clone().requires_grad_(True)
    term = ff.reference.ot_triplet_loss(x[sl], y[sl], fmr)
    (sharded.head.ot_weight * term).backward()
    res["otface"] = {"loss": _rel(ld, ls + sharded.head.ot_weight * term.detach()), "dx": _rel(xl.grad, gxs[sl]),
                     "dfeature": _rel(fml.grad, fmr.grad)}
    full = _gather_full(comm, sharded.weight.grad)
    if full is not None:
        res["otface"]["dW"] = _rel(full, gWs)

    # Partial FC, sample_rate = 1: bit-identical to the unsampled head (margin, NPT, KappaFace)
    x, W, y, sizes = _data(world, dtype, seed=7)
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    exact = True
    for fam in ("arcface", "npt", "kappaface"):
        s_cls, d_cls, kw = FAMILIES[fam]
        _, plain = _pair(s_cls, d_cls, kw, W, dtype, "torch", rank)
        _, sampled = _pair(s_cls, d_cls, kw, W, dtype, "torch", rank, sample_rate=1.0)
        sampled.sample_generator = torch.Generator().manual_seed(40 + rank)
        a = _step(plain, x[sl], y[sl])
        b = _step(sampled, x[sl], y[sl])
        exact = exact and all(torch.equal(u, v) for u, v in zip(a, b))
    res["pfc-rate-1"] = {"exact": exact}

    # Partial FC, sample_rate = 0.1: every positive class kept; the loss equals the single-process
    # loss over the sampled classes; the gradient of the other classes is exactly 0
    for dt in TOL:
        dtype_s = getattr(torch, dt)
        x, W, y, sizes = _data(world, dtype_s, seed=8)
        _, sampled = _pair(ff.ArcFace, FD.ShardedArcFace, {}, W, dtype_s, "torch", rank, sample_rate=0.1)
        sampled.sample_generator = torch.Generator().manual_seed(50 + rank)
        ld, gxd, gWd = _step(sampled, x[sl], y[sl])
        lo, hi = sampled.class_range
        # replay the sampling (same generator seed) to learn which classes were kept
        valid = y >= 0
        owned = valid & (y >= lo) & (y < hi)
        index, _ = FD.sample_classes(torch.where(owned, y - lo, -1), hi - lo, 0.1,
                                     torch.Generator().manual_seed(50 + rank))
        kept = torch.zeros(hi - lo, dtype=torch.bool)
        kept[index] = True
        positives = torch.unique(y[owned] - lo)
        kept_all = comm.all_gather_rows(kept.to(torch.uint8), FD.shard_sizes(C, world)).bool()
        kept_ids = kept_all.nonzero().squeeze(1)
        remap = torch.full((C,), -1, dtype=torch.long)
        remap[kept_ids] = torch.arange(kept_ids.numel())
        W_sub = W[kept_ids].clone().requires_grad_(True)
        xs = x.clone().requires_grad_(True)
        ls = ff.functional.margin_softmax_loss(xs, W_sub, torch.where(valid, remap[y.clamp(min=0)], -1), m2=0.5,
                                               backend="torch")
        ls.backward()
        full = _gather_full(comm, gWd)
        r = {"positives_kept": bool(kept[positives].all()), "n_kept": int(kept.sum()),
             "sample_reported": torch.equal(index + lo, sampled.last_sampled_classes),
             "n_expected": max(int(0.1 * (hi - lo)), int(positives.numel())),
             "loss": _rel(ld, ls), "dx": _rel(gxd, xs.grad[sl]), "tol": TOL[dt]}
        if full is not None:
            r["dW"] = _rel(full[kept_ids], W_sub.grad)
            r["dW_unsampled_zero"] = bool((full[~kept_all] == 0).all())
        # any optimizer: the gradient sits in the full shard's .grad
        opt = torch.optim.Adam(sampled.parameters(), lr=1e-3)
        opt.step()
        r["grad_shape_is_shard"] = tuple(sampled.weight.grad.shape) == (hi - lo, D)
        res[f"pfc-rate-0.1/{dt}"] = r

    # communication of one step: every byte accounted for, none of it grows with C
    x, W, y, sizes = _data(world, torch.float32, seed=9)
    _, head = _pair(ff.ArcFace, FD.ShardedArcFace, {}, W, torch.float32, "torch", rank)
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    with FD.record_communication() as rec, _tap_collectives() as tap:
        _step(head, x[sl], y[sl])
    B, R, bmax = sum(sizes), world, max(sizes)
    expected = 0
    if R > 1:
        expected = (8  # batch sizes
                    + bmax * D * 4 + bmax * 8  # x and y all-gathers
                    + B * 4  # shared target cosines
                    + 3 * B * 4 + 2 * B * 8 + B * 8  # (lse, best, NaN flag) max, (sum-exp, sv) sum, arg-max min
                    + B * 4  # upstream gradient
                    + R * bmax * D * 4)  # reduce-scatter of dL/dx partials
    res["communication"] = {"payload": rec.payload_bytes, "expected": expected, "sent": rec.sent_bytes,
                            "ops": rec.by_op(), "tapped": tap}

    return res


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
                "gather", "gather_object", "scatter", "reduce", "send", "recv", "isend", "irecv", "barrier")


@contextlib.contextmanager
def _tap_collectives():
    """Counts, at torch.distributed itself (not through fusedface's own log), every collective
    called and the bytes of its input tensor: ``{name: [calls, bytes]}``."""
    from fusedface.distributed import _comm
    seen: dict = {}
    saved = []

    def wrap(name, fn):
        def tapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            src = tensors[-1] if tensors else None  # (out, in) for the *_single / *_tensor forms
            entry = seen.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += src.numel() * src.element_size() if src is not None else 0
            return fn(*args, **kwargs)
        return tapped

    targets = [(dist, n) for n in _COLLECTIVES if hasattr(dist, n)]
    targets += [(_comm, n) for n in ("_all_gather_single", "_reduce_scatter_single")]
    try:
        for mod, n in targets:
            fn = getattr(mod, n)
            saved.append((mod, n, fn))
            setattr(mod, n, wrap(n.lstrip("_"), fn))
        yield seen
    finally:
        for mod, n, fn in saved:
            setattr(mod, n, fn)


DRIFT_FAMILIES = ("arcface", "combined", "mv-softmax-arc")


def _fp32_drift_checks(comm, world):
    """fp32 on rows whose cosine to their centre is within fp32 rounding of 1: the exact slope
    ``m1·sin(θ + m2)/sin θ`` of the target is then in the hundreds and ``p_y − 1`` cancels, so the
    single-process fp32 head itself drifts from the fp64 truth by up to ~1e-3 (MV-Softmax) and any
    change of summation order (the merged log-sum-exp) moves the gradient by the same order. The
    sharded head is held to the STYLE rule there: its distance to the single-process fp32 result at
    most twice the single-process fp32 drift from fp64 (or 1e-5, whichever is larger)."""
    res = {}
    for fam in DRIFT_FAMILIES:
        s_cls, d_cls, kw = FAMILIES[fam]
        x, W, y, sizes = _data(world, torch.float64, near="exact")
        truth, _ = _pair(s_cls, d_cls, kw, W, torch.float64, "torch", comm.rank)
        single, sharded = _pair(s_cls, d_cls, kw, W.float(), torch.float32, "torch", comm.rank)
        t = _step(truth, x, y)
        s = _step(single, x.float(), y)
        rank, off = comm.rank, sum(sizes[:comm.rank])
        sl = slice(off, off + sizes[rank])
        ld, gxd, gWd = _step(sharded, x.float()[sl], y[sl])
        full = _gather_full(comm, gWd)
        r = {"drift_dx": _rel(s[1], t[1]), "dx": _rel(gxd, s[1][sl]), "drift_loss": _rel(s[0], t[0]),
             "loss": _rel(ld, s[0])}
        if full is not None:
            r["drift_dW"], r["dW"] = _rel(s[2], t[2]), _rel(full, s[2])
        res[fam] = r
    return res


def _kappa_head(world, rank):
    """A KappaFace head in a known non-trivial state: statistics of two batches, an epoch end,
    one SGD step, and statistics of a third batch accumulated (not yet an epoch)."""
    _, W, _, _ = _data(world, torch.float32)
    head = FD.ShardedKappaFace(D, C, backend="torch")
    lo, hi = head.class_range
    with torch.no_grad():
        head.weight.copy_(W[lo:hi])
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for seed in (21, 22, 23):
        x, _, y, sizes = _data(world, torch.float32, seed=seed)
        sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        loss = head(x[sl], y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if seed == 22:
            head.end_epoch()
    return head


def _checkpoint_checks(comm, world, outdir):
    res = {}
    rank = comm.rank
    if world == 2:
        head = _kappa_head(world, rank)
        full = head.full_state_dict()
        if rank == 0:
            torch.save(full, os.path.join(outdir, "full.pt"))
        FD.save_sharded(head, os.path.join(outdir, "ckpt-2"))
        res["saved"] = True
    elif world == 3:
        ref = torch.load(os.path.join(outdir, "full.pt"), weights_only=True)
        head = FD.ShardedKappaFace(D, C, backend="torch")
        FD.load_sharded(head, os.path.join(outdir, "ckpt-2"))  # 2 -> 3
        got = head.full_state_dict()
        if rank == 0:
            res["2->3 identical"] = _same_state(got, ref)
        FD.save_sharded(head, os.path.join(outdir, "ckpt-3"))
        other = FD.ShardedKappaFace(D, C, backend="torch")
        other.load_full_state_dict(ref)
        lo, hi = other.class_range
        res["load_full_state_dict slices"] = all(
            torch.equal(other.head.state_dict()[k], ref[k][lo:hi] if k in other.per_class_keys else ref[k])
            for k in other.head.state_dict())
    else:  # world 1
        ref = torch.load(os.path.join(outdir, "full.pt"), weights_only=True)
        head = FD.ShardedKappaFace(D, C, backend="torch")
        FD.load_sharded(head, os.path.join(outdir, "ckpt-3"))  # 3 -> 1
        res["3->1 identical"] = _same_state(head.full_state_dict(), ref)
        res["consolidate identical"] = _same_state(FD.consolidate(os.path.join(outdir, "ckpt-3")), ref)
        single = ff.KappaFace(D, C, backend="torch")
        single.load_state_dict(ref)  # the full state is the single-process head's
        x, _, y, _ = _data(1, torch.float32, seed=30)
        single.eval()
        head.eval()
        res["single-process head loads it"] = bool(torch.equal(single(x, y), head(x, y)))
    return res


def _same_state(a, b) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        u, v = a[k], b[k]
        if isinstance(u, torch.Tensor):
            if not (isinstance(v, torch.Tensor) and u.dtype == v.dtype and torch.equal(u, v)):
                return False
        elif u != v:
            return False
    return True


TRITON_FAMILIES = ("arcface", "sv-softmax", "elastic-arc-plus", "npt")


def _triton_checks(comm, world):
    """The Triton kernels (interpreted on CPU) behind the same sharded pass, fp32."""
    res = {}
    for fam in TRITON_FAMILIES:
        s_cls, d_cls, kw = FAMILIES[fam]
        x, W, y, sizes = _data(world, torch.float32)
        single, sharded = _pair(s_cls, d_cls, kw, W, torch.float32, "triton", comm.rank)
        res[fam] = _compare(comm, single, sharded, x, y, sizes)
    return res


def _worker(rank, world, port, outdir, scenario="main"):
    init_local_group(rank, world, port)
    try:
        comm = FD.Comm()
        t0 = time.perf_counter()
        if scenario == "triton":
            res = {"triton": _triton_checks(comm, world)}
        else:
            res = {"families": _family_checks(comm, world), "special": _special_checks(comm, world, outdir),
                   "fp32-drift": _fp32_drift_checks(comm, world),
                   "checkpoint": _checkpoint_checks(comm, world, outdir)}
        res["seconds"] = time.perf_counter() - t0
        torch.save(res, os.path.join(outdir, f"{scenario}-world{world}-rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{scenario}-world{world}-rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# =============================================================================================
# parent side


def _run_group(world, outdir, scenario="main", timeout=GROUP_TIMEOUT_S, env=None):
    """Spawn ``world`` processes; every one is gone when this returns (killed on timeout or error).
    ``env``: variables the children start with (set here only while they are spawned)."""
    run_local_group(_worker, world, str(outdir), scenario, timeout=timeout, env=env)
    return [torch.load(os.path.join(outdir, f"{scenario}-world{world}-rank{r}.pt"), weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    out = {}
    for world in (2, 3, 1):  # this order: the checkpoint goes 2 -> 3 -> 1
        out[world] = _run_group(world, outdir)
    return out


def _merged(ranks, section, key):
    """The worst value of every measurement over the ranks (dW is only on rank 0)."""
    merged = {}
    for r in ranks:
        for k, v in r[section][key].items():
            if isinstance(v, float) and k not in ("loss_value", "accuracy", "tol"):
                merged[k] = max(merged.get(k, 0.0), v)
            elif isinstance(v, bool):
                merged[k] = merged.get(k, True) and v
            else:
                merged.setdefault(k, v)
    return merged


WORLDS = [1, 2, 3]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_head_equals_single_process(groups, world, case):
    fam, dt, be = case.split("/")
    tol = TOL[dt]
    r = _merged(groups[world], "families", case)
    for what in ("loss", "dx", "dW", "class_margins"):
        if what in r:
            assert r[what] <= tol, (f"world {world}, {case}: {what} differs from the single-process head by "
                                    f"{r[what]:.3e} (relative to its largest value; tolerance {tol:g})")
    assert "dW" in r, "rank 0 did not report the gathered dL/dW"
    if fam != "npt":
        assert r["accuracy_equal"] and r["sv_fraction_equal"], f"world {world}, {case}: merged statistics differ"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", ["no-positive", "empty-rank", "npt-k16", "otface"])
def test_special_batches(groups, world, check):
    r = _merged(groups[world], "special", check)
    for what in ("loss", "dx", "dW", "dfeature"):
        if what not in r:
            continue
        err = r[what]
        assert err <= 1e-10, f"world {world}, {check}: {what} differs from the single-process result by {err:.3e}"


@pytest.mark.parametrize("fam", DRIFT_FAMILIES)
@pytest.mark.parametrize("world", WORLDS)
def test_fp32_near_centre_rows_within_single_process_drift(groups, world, fam):
    r = _merged(groups[world], "fp32-drift", fam)
    for what in ("loss", "dx", "dW"):
        if what not in r:
            continue
        bound = max(1e-5, 2.0 * r[f"drift_{what}"])
        assert r[what] <= bound, (f"world {world}, {fam}, fp32: {what} is {r[what]:.3e} from the single-process fp32 "
                                  "result, more than twice that result's own drift from fp64 "
                                  f"({r[f'drift_{what}']:.3e})")


@pytest.mark.parametrize("world", WORLDS)
def test_partial_fc_rate_one_is_the_unsampled_head(groups, world):
    r = _merged(groups[world], "special", "pfc-rate-1")
    assert r["exact"], f"world {world}: Partial FC with sample_rate=1 is not bit-identical to the unsampled head"


@pytest.mark.parametrize("dt", list(TOL))
@pytest.mark.parametrize("world", WORLDS)
def test_partial_fc_keeps_positives_and_matches_the_sampled_problem(groups, world, dt):
    for rank, res in enumerate(groups[world]):
        r = res["special"][f"pfc-rate-0.1/{dt}"]
        assert r["positives_kept"], f"world {world}, rank {rank}: a positive class of the batch was not sampled"
        assert r["n_kept"] == r["n_expected"], \
            f"world {world}, rank {rank}: kept {r['n_kept']} classes, expected {r['n_expected']}"
        assert r["grad_shape_is_shard"]
        assert r["sample_reported"], "head.last_sampled_classes is not the sample the step ran"
        for what in ("loss", "dx", "dW"):
            if what in r:
                assert r[what] <= r["tol"], f"world {world}, rank {rank}, {dt}: {what} off by {r[what]:.3e}"
        if "dW_unsampled_zero" in r:
            assert r["dW_unsampled_zero"], "classes outside the sample received a gradient"


@pytest.mark.parametrize("world", WORLDS)
def test_communication_per_step_is_O_B_D(groups, world):
    for rank, res in enumerate(groups[world]):
        r = res["special"]["communication"]
        assert r["payload"] == r["expected"], (f"world {world}, rank {rank}: {r['payload']} bytes handed to "
                                               f"collectives, the formula says {r['expected']}: {r['ops']}")
        # observed at torch.distributed: nothing bypasses fusedface's log, and the bytes agree
        tapped = sum(b for _, b in r["tapped"].values())
        assert tapped == r["expected"], (f"world {world}, rank {rank}: torch.distributed saw {r['tapped']} "
                                         f"({tapped} bytes), the formula says {r['expected']}")
        assert sum(c for c, _ in r["tapped"].values()) == sum(o["calls"] for o in r["ops"].values())


def test_checkpoint_reshards_2_to_3_to_1(groups):
    checks = {}
    for world in (2, 3, 1):
        for res in groups[world]:
            for k, v in res["checkpoint"].items():
                checks[k] = checks.get(k, True) and v
    for name in ("saved", "2->3 identical", "load_full_state_dict slices", "3->1 identical",
                 "consolidate identical", "single-process head loads it"):
        assert checks.get(name), f"checkpoint check failed: {name}"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed: no Triton backend to shard")
def test_triton_backend_sharded_over_two_processes(tmp_path):
    """Triton's kernels behind the sharded pass (on CPU under TRITON_INTERPRET=1, set only in the
    spawned processes, before they import triton)."""
    ranks = _run_group(2, tmp_path, scenario="triton", env={"TRITON_INTERPRET": "1"})
    for fam in TRITON_FAMILIES:
        r = _merged(ranks, "triton", fam)
        assert "dW" in r
        for what in ("loss", "dx", "dW"):
            assert r[what] <= TOL["float32"], f"triton, {fam}: {what} off by {r[what]:.3e}"


def test_statistics_are_not_trivial(groups):
    """The data gives some correctly classified rows, so the merged arg-max is really tested."""
    acc = [groups[3][0]["families"][c]["accuracy"] for c in CASES if not c.startswith("npt")]
    assert max(acc) > 0.0


# =============================================================================================
# in-process: a world of one without a process group, and argument errors


def test_world_of_one_without_process_group():
    assert not dist.is_initialized()
    x, W, y, _ = _data(1, torch.float64, seed=4)
    for fam in ("arcface", "elastic-arc-plus", "npt"):
        s_cls, d_cls, kw = FAMILIES[fam]
        single, sharded = _pair(s_cls, d_cls, kw, W, torch.float64, "torch", 0)
        a, b = _step(single, x, y), _step(sharded, x, y)
        for name, u, v in zip(("loss", "dx", "dW"), a, b):
            assert _rel(v, u) <= 1e-12, f"{fam}: {name} off by {_rel(v, u):.3e}"
    rows = FD.margin_softmax_loss(x, W, y, num_classes=C, m2=0.5, reduction="none", backend="torch")
    ref = ff.functional.margin_softmax_loss(x, W, y, m2=0.5, reduction="none", backend="torch")
    assert _rel(rows, ref) <= 1e-12


def test_argument_errors_name_the_fix():
    x, W, y, _ = _data(1, torch.float64)
    with pytest.raises(ValueError, match="owns 1001 of num_classes=1001"):
        FD.margin_softmax_loss(x, W[:-1], y, num_classes=C)
    with pytest.raises(ValueError, match="sample_rate"):
        FD.ShardedArcFace(D, C, sample_rate=1.5)
    with pytest.raises(ValueError, match="fused backend"):
        FD.margin_softmax_loss(x, W, y, num_classes=C, backend="reference")
    with pytest.raises(ValueError, match="batch_sizes"):
        FD.margin_softmax_loss(x, W, y, num_classes=C, batch_sizes=[3])
    with pytest.raises(ValueError, match=r"needs at least k \+ 1 classes"):
        FD.ShardedNPT(D, 4, k=4)
    with pytest.raises(ValueError, match="outside"):
        FD.ShardedArcFace(D, C)(x, torch.full_like(y, C))
    class OwnMargins(ff.ArcFace):
        def row_margins(self, x, y):
            return 0.5 * torch.ones(x.shape[0], dtype=x.dtype), 0.0

    with pytest.raises(TypeError, match="overrides row_margins"):
        FD.ShardedHead(D, C, head_class=OwnMargins)
    with pytest.raises(TypeError, match="head_class must be a fusedface head"):
        FD.ShardedHead(D, C, head_class=torch.nn.Linear)
    head = FD.ShardedArcFace(D, C)
    with pytest.raises(ValueError, match="feature_maps is only for OTFace"):
        head(x, y, torch.zeros(x.shape[0], 1, 1, 1))
    with pytest.raises(TypeError, match="no KappaFace statistics"):
        head.end_epoch()


def test_shard_layout_is_contiguous_and_balanced():
    for Cn, R in ((1001, 3), (10, 4), (7, 7), (1_000_000, 8)):
        sizes = FD.shard_sizes(Cn, R)
        assert sum(sizes) == Cn and max(sizes) - min(sizes) <= 1
        assert sizes == [Cn // R + (r < Cn % R) for r in range(R)]
        ranges = [FD.shard_range(Cn, R, r) for r in range(R)]
        assert ranges[0][0] == 0 and ranges[-1][1] == Cn
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(R - 1))


def test_checkpoint_refuses_mixed_world_sizes(tmp_path):
    head = FD.ShardedArcFace(D, C)
    FD.save_sharded(head, tmp_path)
    (tmp_path / "shard-00000-of-00002.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="several world sizes"):
        FD.load_sharded(head, tmp_path)
    with pytest.raises(FileExistsError):
        FD.save_sharded(head, tmp_path)
    other = FD.ShardedCosFace(D, C)
    good = tmp_path / "good"
    FD.save_sharded(head, good)
    with pytest.raises(ValueError, match="holds a"):
        FD.load_sharded(other, good)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("backend", backend_names(fused=True))
def test_sharded_nan_centre_gives_nan_loss(backend):
    """NaN in, NaN out across shards, as in one process: a NaN class centre makes the loss NaN
    (the streaming top-k and the kernels' max may skip a NaN cosine; the shards must not)."""
    x, W, y, _ = _data(1, torch.float32, seed=5)
    W = W.clone()
    W[7, 3] = float("nan")
    single = ff.functional.npt_loss(x, W, y, k=2, backend=backend)
    assert torch.isnan(single), "single-process NPT should already give NaN here"
    assert torch.isnan(FD.npt_loss(x, W, y, num_classes=C, k=2, backend=backend))
    assert torch.isnan(FD.margin_softmax_loss(x, W, y, num_classes=C, m2=0.5, backend=backend))
    head = FD.ShardedArcFace(D, C, backend=backend)  # the head's pass also merges arg-max statistics
    with torch.no_grad():
        head.weight.copy_(W)
    assert torch.isnan(head(x, y))


def test_sharded_boundary_checks_are_the_single_process_ones():
    """The sharded API runs the same checks as fusedface.functional on a rank's rows (b = 0 aside)."""
    x, W, y, _ = _data(1, torch.float64)
    with pytest.raises(ValueError, match="D = 0"):
        FD.margin_softmax_loss(x[:, :0], W[:, :0], y, num_classes=C)
    with pytest.raises(TypeError, match="floating point"):
        FD.margin_softmax_loss(x.long(), W, y, num_classes=C)
    bad = x.clone()
    bad[2, 0] = float("inf")
    ff.set_input_checks(True)
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            FD.margin_softmax_loss(bad, W, y, num_classes=C)
        with pytest.raises(ValueError, match="NaN or Inf"):
            FD.npt_loss(bad, W, y, num_classes=C)
    finally:
        ff.set_input_checks(False)
    # an empty local batch is allowed on a rank (the global batch must not be empty)
    with pytest.raises(ValueError, match="the global batch is empty"):
        FD.margin_softmax_loss(x[:0], W, y[:0], num_classes=C)
