"""Checkpoints of sharded heads, loadable into any world size.

Two ways, both exact (a copy of every value, no arithmetic):

* **Per-shard files** (scales to any ``C``: no rank ever holds more than its shard plus one source
  file, memory-mapped). :func:`save_sharded` writes ``shard-RRRRR-of-WWWWW.pt`` per rank;
  :func:`load_sharded` loads them into a head of ANY world size, each rank reading only the source
  shards that overlap its classes (reshard on load: 2 → 3 → 1 …). :func:`consolidate` turns a
  directory into the full single-process ``state_dict`` without a process group.
* **Full state** on one rank: :func:`full_state_dict` gathers the shards (row chunks at a time,
  onto the CPU) into the ``state_dict`` of the single-process head over all classes, which
  ``fusedface.ArcFace(D, C).load_state_dict`` accepts; :func:`load_full_state_dict` slices one.

What is sharded: every entry listed by ``head.per_class_keys`` (``weight`` and KappaFace's
``class_margins``, ``resultant_sum``, ``epoch_counts``, ``class_counts``, ``class_kappa``), by CLASS:
with Sub-center ArcFace's ``K`` sub-centres per class ``weight`` (and its optimizer state) has K rows
per class (``head.rows_per_class(key)``), cut and concatenated K rows at a time.
What is replicated: everything else (KappaFace's ``epochs_seen``; ElasticFace's generator state,
taken from rank 0, the rank that draws). Not included: the Partial FC sampling generator (per
rank, with no meaning in another world size).

**Optimizer state** (``optimizer=`` of every function): the state an optimizer keeps for the head's
parameters — an in-backward :mod:`fusedface.optim` optimizer or a ``torch.optim`` one, over the
head's parameters alone or with others (only the head's entries are read and written) — is saved
with its shard and reshards like the weights: a state tensor of a class matrix whose first
dimension is the shard's classes (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, the per-row
``row_step`` of sparse Partial FC) is cut and concatenated by class; everything else (``step``,
the hyperparameters of the parameter's group: ``lr``, ``momentum``, ``initial_lr`` of a scheduler
…) is replicated and must agree between the ranks (checked when saving and when loading).
Loading sets the state of the head's parameters and the hyperparameters of their group, as
``optimizer.load_state_dict`` would; the full form (:func:`consolidate`, :func:`full_state_dict`)
is the ``state_dict()`` of the same optimizer over the single-process head's parameters. A state
saved by ``torch.optim.SGD`` loads into ``fusedface.optim.SGD`` and back (likewise ``AdamW``): the
state names are the same; the hyperparameters both have are taken from the checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..optim import group_of
from ._comm import shard_range, shard_sizes

__all__ = ["save_sharded", "load_sharded", "consolidate", "full_state_dict", "load_full_state_dict"]

FORMAT = "fusedface.sharded/1"
_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})\.pt$")
_CHUNK_BYTES = 64 * 2**20  # rows gathered per collective in full_state_dict


def _head_name(head) -> str:
    cls = type(head.head)
    return f"{cls.__module__}.{cls.__qualname__}"


def _shard_files(directory) -> tuple[int, dict]:
    """``(world size, {rank: path})`` of the one complete set of shard files in ``directory``."""
    found: dict = {}
    for p in Path(directory).iterdir():
        m = _NAME.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no shard files (shard-RRRRR-of-WWWWW.pt) in {directory}")
    if len(found) > 1:
        raise ValueError(f"{directory} holds shard files of several world sizes {sorted(found)}; "
                         "keep one checkpoint per directory")
    (world, files), = found.items()
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise FileNotFoundError(f"{directory}: shard files of ranks {missing} of {world} are missing")
    return world, files


def _load(path):
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fusedface sharded checkpoint ({FORMAT})")
    return payload


def save_sharded(head, directory, optimizer=None) -> Path:
    """Every rank writes its shard to ``directory/shard-<rank>-of-<world>.pt`` (then a barrier).

    ``optimizer``: also save its state for the head's parameters (every rank passes its own; one
    all-gather of the replicated part checks that the ranks agree). Refuses a directory that already
    holds shards of another world size."""
    opt_payload = None
    if optimizer is not None:
        opt_payload = _optimizer_payload(head, optimizer)
        _check_ranks_agree(head.comm, opt_payload)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    R, r = head.world_size, head.rank
    others = [p.name for p in path.iterdir() if _NAME.match(p.name) and int(_NAME.match(p.name).group(2)) != R]
    if others:
        raise FileExistsError(f"{directory} already holds shards of another world size ({others[0]} …); "
                              "save each checkpoint to its own directory")
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in head.head.state_dict().items()}
    payload = {"format": FORMAT, "head_class": _head_name(head), "in_features": head.in_features,
               "num_classes": head.num_classes, "world_size": R, "rank": r, "class_range": list(head.class_range),
               "per_class_keys": list(head.per_class_keys), "subcenters": head.subcenters, "state": state}
    if opt_payload is not None:
        payload["optimizer"] = opt_payload
    out = path / f"shard-{r:05d}-of-{R:05d}.pt"
    torch.save(payload, out)
    head.comm.barrier()
    return out


def _check_compatible(head, payload, where) -> None:
    if payload["num_classes"] != head.num_classes or payload["in_features"] != head.in_features:
        raise ValueError(f"{where}: a head of {payload['num_classes']} classes × {payload['in_features']} features "
                         f"cannot load into one of {head.num_classes} × {head.in_features}")
    if payload["head_class"] != _head_name(head):
        raise ValueError(f"{where} holds a {payload['head_class']} head, this is a {_head_name(head)}")
    if payload.get("subcenters", 1) != head.subcenters:
        raise ValueError(f"{where} holds {payload.get('subcenters', 1)} sub-centres per class, this head has "
                         f"{head.subcenters}")


def load_sharded(head, directory, optimizer=None) -> None:
    """Load the shards in ``directory`` (saved by any world size) into ``head``: each rank reads
    the source shards that overlap its classes, memory-mapped. ``optimizer``: also load the
    optimizer state saved with them (:func:`save_sharded` with ``optimizer=``) into it, resharded."""
    world, files = _shard_files(directory)
    lo, hi = head.class_range
    target = head.head.state_dict()
    per_class = set(head.per_class_keys)
    new = {}
    opt_new, opt_first = {}, None
    for s in range(world):
        slo, shi = shard_range(head.num_classes, world, s)
        a, b = max(lo, slo), min(hi, shi)
        if a >= b and s != 0:
            continue
        payload = _load(files[s])
        _check_compatible(head, payload, files[s])
        if tuple(payload["class_range"]) != (slo, shi):
            raise ValueError(f"{files[s]} holds classes {payload['class_range']}, expected [{slo}, {shi})")
        state = payload["state"]
        for key, ref in target.items():
            if key not in state:
                raise KeyError(f"{files[s]} has no entry {key!r}")
            if key in per_class:
                m = head.rows_per_class(key)
                if key not in new:
                    new[key] = torch.empty(((hi - lo) * m,) + tuple(ref.shape[1:]), dtype=state[key].dtype)
                if a < b:
                    new[key][(a - lo) * m: (b - lo) * m] = state[key][(a - slo) * m: (b - slo) * m]
            elif s == 0:
                new[key] = state[key]
        if optimizer is not None:
            opt = payload.get("optimizer")
            if opt is None:
                raise ValueError(f"{files[s]} was saved without optimizer state (save_sharded(..., optimizer=opt))")
            if opt_first is None:
                opt_first = opt
                opt_new = {name: {"group": e["group"], "per_class": list(e["per_class"]),
                                  "state": {k: v for k, v in e["state"].items() if k not in e["per_class"]}}
                           for name, e in opt["params"].items()}
            elif _digest(opt) != _digest(opt_first):
                raise ValueError(f"{files[s]} and {files[0]} disagree on the optimizer's hyperparameters or scalar "
                                 "state (a checkpoint whose shards were saved at different steps?)")
            for name, e in opt["params"].items():
                m = head.rows_per_class(name)
                for k in e["per_class"]:
                    v = e["state"][k]
                    dest = opt_new[name]["state"]
                    if k not in dest:
                        dest[k] = torch.empty(((hi - lo) * m,) + tuple(v.shape[1:]), dtype=v.dtype)
                    if a < b:
                        dest[k][(a - lo) * m: (b - lo) * m] = v[(a - slo) * m: (b - slo) * m]
    head.head.load_state_dict(new, strict=True)
    if optimizer is not None:
        _install_optimizer_state(head, optimizer, opt_first["class"], opt_new)


def consolidate(directory, optimizer: bool = False):
    """The full single-process ``state_dict`` of the head saved in ``directory`` (no process group
    needed: loads every shard). ``optimizer=True``: ``(state, optimizer_state)``, the second the
    ``state_dict()`` of the saved optimizer over the single-process head's parameters (loadable by
    ``fusedface.optim.SGD(single_head.parameters(), ...).load_state_dict``, or by torch.optim's)."""
    world, files = _shard_files(directory)
    payloads = [_load(files[s]) for s in range(world)]
    per_class = payloads[0]["per_class_keys"]
    out = {}
    for key, value in payloads[0]["state"].items():
        out[key] = torch.cat([p["state"][key] for p in payloads]) if key in per_class else value
    if not optimizer:
        return out
    opts = [p.get("optimizer") for p in payloads]
    if any(o is None for o in opts):
        raise ValueError(f"{directory} was saved without optimizer state (save_sharded(..., optimizer=opt))")
    for s, o in enumerate(opts):
        if _digest(o) != _digest(opts[0]):
            raise ValueError(f"{files[s]} and {files[0]} disagree on the optimizer's hyperparameters or scalar state")
    entries = {}
    for name, e in opts[0]["params"].items():
        st = {k: (torch.cat([o["params"][name]["state"][k] for o in opts]) if k in e["per_class"]
                  else v.clone() if isinstance(v, torch.Tensor) else v)
              for k, v in e["state"].items()}
        entries[name] = {"group": e["group"], "state": st}
    return out, _entries_to_state_dict(entries, list(opts[0]["params"]))


def full_state_dict(head, dst: int = 0, optimizer=None):
    """The single-process ``state_dict`` over all classes on rank ``dst`` (CPU tensors); None on
    the other ranks. Per-class entries travel in row chunks of at most 64 MiB. ``optimizer``:
    ``(state, optimizer_state)`` on ``dst`` (``(None, None)`` elsewhere), the second the
    ``state_dict()`` of that optimizer over the single-process head's parameters."""
    comm = head.comm
    opt_payload = None
    if optimizer is not None:
        opt_payload = _optimizer_payload(head, optimizer)
        _check_ranks_agree(comm, opt_payload)
    local = head.head.state_dict()
    per_class = set(head.per_class_keys)
    out = {}
    for key, value in local.items():
        if key not in per_class:
            if dst != 0:
                value = comm.broadcast_object(value, src=0)
            out[key] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            continue
        out[key] = _gather_classes(head, value, dst, head.rows_per_class(key))
    if opt_payload is None:
        return out if comm.rank == dst else None
    entries = {}
    for name, e in opt_payload["params"].items():
        st = {}
        for k, v in e["state"].items():
            if k in e["per_class"]:
                st[k] = _gather_classes(head, v, dst, head.rows_per_class(name))
            else:  # replicated (checked equal on every rank above)
                st[k] = v.clone() if isinstance(v, torch.Tensor) else v
        entries[name] = {"group": e["group"], "state": st}
    if comm.rank != dst:
        return None, None
    return out, _entries_to_state_dict(entries, list(opt_payload["params"]))


def _gather_classes(head, value, dst, rows_per_class: int = 1):
    """A per-class tensor of every rank (its first dimension the rank's classes, ``rows_per_class``
    rows each) concatenated over all classes on rank ``dst`` (CPU), in row chunks of at most 64 MiB;
    None on the other ranks."""
    comm = head.comm
    R = comm.world_size
    sizes = [s * rows_per_class for s in shard_sizes(head.num_classes, R)]
    value = value.detach()
    row_bytes = max(1, value[0].numel() * value.element_size()) if value.shape[0] else 1
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    full = None
    if comm.rank == dst:
        full = torch.empty((head.num_classes * rows_per_class,) + tuple(value.shape[1:]), dtype=value.dtype)
    starts = [sum(sizes[:r]) for r in range(R)]
    for j in range(0, max(sizes), chunk):
        part_sizes = [max(0, min(s - j, chunk)) for s in sizes]
        got = comm.gather_rows_to(value[j: j + chunk], part_sizes, dst)
        if got is not None:
            got = got.cpu()
            o = 0
            for r, n in enumerate(part_sizes):
                full[starts[r] + j: starts[r] + j + n] = got[o: o + n]
                o += n
    return full


def load_full_state_dict(head, state: dict, optimizer=None, optimizer_state: dict | None = None) -> None:
    """Load a single-process ``state_dict`` over all classes: each rank copies its classes.
    ``optimizer`` and ``optimizer_state`` (the ``state_dict()`` of an optimizer over the
    single-process head's parameters, e.g. from :func:`full_state_dict`): also load that state,
    each rank taking its classes, into ``optimizer`` (which holds this head's parameters)."""
    if (optimizer is None) != (optimizer_state is None):
        raise ValueError("pass both optimizer and optimizer_state (or neither)")
    entries = _state_dict_to_entries(head, optimizer_state) if optimizer is not None else None
    lo, hi = head.class_range
    per_class = set(head.per_class_keys)
    local = {}
    for key in head.head.state_dict():
        if key not in state:
            raise KeyError(f"the state has no entry {key!r} (a {_head_name(head)} state over all classes is expected)")
        value = state[key]
        if key in per_class:
            m = head.rows_per_class(key)
            if value.shape[0] != head.num_classes * m:
                raise ValueError(f"{key!r} has {value.shape[0]} rows, the head has num_classes={head.num_classes}"
                                 + (f" × {m} sub-centres" if m > 1 else ""))
            value = value[lo * m:hi * m]
        local[key] = value
    unexpected = set(state) - set(local)
    if unexpected:
        raise KeyError(f"unexpected entries {sorted(unexpected)} for a {_head_name(head)} head")
    head.head.load_state_dict(local, strict=True)
    if optimizer is not None:
        _install_optimizer_state(head, optimizer, None, entries)


# ---------------------------------------------------------------------------------------------
# optimizer state
#
# Internally the optimizer state of a head is ``{name: {"group": hyperparameters, "state": {key:
# value}, "per_class": [keys]}}`` over the head's named parameters (``head.head``): ``per_class``
# lists the state tensors cut by class (first dimension = the parameter's classes); the rest, and
# the group, is replicated.

_KINDS = {"torch.optim.sgd.SGD": "SGD", "fusedface.optim.SGD": "SGD",
          "torch.optim.adamw.AdamW": "AdamW", "fusedface.optim.AdamW": "AdamW"}


def _optimizer_name(optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _group_of(optimizer, param, name: str) -> dict:
    group = group_of(optimizer, param)
    if group is not None:
        return group
    raise ValueError(f"the optimizer ({_optimizer_name(optimizer)}) does not hold the head's parameter {name!r} "
                     "(this rank's shard): pass the optimizer built over the sharded head's parameters")


def _optimizer_payload(head, optimizer) -> dict:
    """This rank's optimizer state for the head's parameters (CPU tensors)."""
    per_class_params = set(head.per_class_keys)
    params = {}
    for name, p in head.head.named_parameters():
        group = _group_of(optimizer, p, name)
        state, per_class = {}, []
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().clone()
                if v.dim() >= 1 and name in per_class_params:
                    if v.shape[0] != p.shape[0]:
                        raise ValueError(f"optimizer state {k!r} of {name!r} has shape {tuple(v.shape)}: a state tensor "
                                         f"of a class matrix must have its classes ({p.shape[0]}) first to be resharded")
                    per_class.append(k)
            state[k] = v
        params[name] = {"group": {k: v for k, v in group.items() if k != "params"}, "state": state,
                        "per_class": per_class}
    return {"class": _optimizer_name(optimizer), "params": params}


def _plain(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), v.detach().cpu().reshape(-1).tolist())
    return v


def _digest(payload: dict) -> dict:
    """What every rank's optimizer payload must share: the class, the groups, the state keys and the
    replicated state values."""
    return {"class": payload["class"],
            "params": {name: (e["group"], sorted(e["state"]), sorted(e["per_class"]),
                              {k: _plain(v) for k, v in e["state"].items() if k not in e["per_class"]})
                       for name, e in payload["params"].items()}}


def _check_ranks_agree(comm, payload: dict) -> None:
    """Raises on every rank (none hangs in a later collective) when the ranks' replicated state differs."""
    digests = comm.all_gather_object(_digest(payload))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise ValueError(f"the optimizer state of ranks {bad} differs from rank 0's in its hyperparameters, step or "
                         "state entries; every rank must pass its optimizer over the sharded head, at the same step")


def _entries_to_state_dict(entries: dict, names: list) -> dict:
    """The ``state_dict()`` format of an optimizer over the single-process head's parameters
    (``names`` in the head's order: parameter ``i`` is ``names[i]``); parameters with the same
    hyperparameters share a group."""
    groups: list = []
    state = {}
    for i, name in enumerate(names):
        e = entries[name]
        if e["state"]:
            state[i] = e["state"]
        for g in groups:
            if {k: v for k, v in g.items() if k != "params"} == e["group"]:
                g["params"].append(i)
                break
        else:
            groups.append(dict(e["group"], params=[i]))
    return {"state": state, "param_groups": groups}


def _state_dict_to_entries(head, sd: dict) -> dict:
    """This rank's part of a full optimizer ``state_dict`` (over the single-process head's parameters)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("optimizer_state must be an optimizer state_dict() ({'state': ..., 'param_groups': ...})")
    lo, hi = head.class_range
    per_class_params = set(head.per_class_keys)
    entries = {}
    for i, (name, p) in enumerate(head.head.named_parameters()):
        group = next((g for g in sd["param_groups"] if i in g["params"]), None)
        if group is None:
            raise KeyError(f"optimizer_state has no parameter {i} ({name!r} of the head) in its param_groups")
        state, per_class = {}, []
        for k, v in sd["state"].get(i, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and name in per_class_params:
                m = head.rows_per_class(name)
                if v.shape[0] != head.num_classes * m:
                    raise ValueError(f"optimizer state {k!r} of {name!r} has {v.shape[0]} rows, the head has "
                                     f"num_classes={head.num_classes}" + (f" × {m} sub-centres" if m > 1 else ""))
                v = v[lo * m:hi * m]
                per_class.append(k)
            state[k] = v
        entries[name] = {"group": {k: v for k, v in group.items() if k != "params"}, "state": state,
                         "per_class": per_class}
    return entries


def _install_optimizer_state(head, optimizer, saved_class, entries: dict) -> None:
    """Sets the state of the head's parameters in ``optimizer`` and the hyperparameters of their
    group from ``entries`` (this rank's part). State tensors are copied onto the parameter's device:
    floating ones in the dtype the optimizer keeps (``state_dtype`` of a fusedface.optim optimizer,
    else the parameter's), ``step`` as saved (torch.optim's rule: on the parameter's device only for
    ``fused`` / ``capturable`` groups), integer ones (``row_step``) as saved."""
    mine = _optimizer_name(optimizer)
    same = saved_class is None or saved_class == mine
    if not same and _KINDS.get(saved_class, saved_class) != _KINDS.get(mine, mine):
        raise ValueError(f"the checkpoint holds the state of a {saved_class} optimizer; it cannot load into a {mine}")
    plan = []
    for name, p in head.head.named_parameters():
        if name not in entries:
            raise KeyError(f"the optimizer state has no entry for the head's parameter {name!r}")
        group = _group_of(optimizer, p, name)
        e = entries[name]
        hyper = {k: v for k, v in e["group"].items() if same or k in group or k == "initial_lr"}
        plan.append((p, group, hyper, e["state"]))
    for p, group, hyper, saved in plan:
        group.update(hyper)
        sdt = optimizer._state_dtype(group, p) if hasattr(optimizer, "_state_dtype") else p.dtype
        st = {}
        for k, v in saved.items():
            if not isinstance(v, torch.Tensor):
                st[k] = v
            elif k == "step":
                on_device = group.get("fused") or group.get("capturable")
                st[k] = (v.to(device=p.device, dtype=torch.float32, copy=True) if on_device else v.clone())
            elif v.is_floating_point():
                st[k] = v.to(device=p.device, dtype=sdt if p.is_floating_point() else v.dtype, copy=True)
            else:
                st[k] = v.to(device=p.device, copy=True)
        optimizer.state.pop(p, None)
        if st:
            optimizer.state[p] = st
