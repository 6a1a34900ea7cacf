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
``class_margins``, ``resultant_sum``, ``epoch_counts``, ``class_counts``, ``class_kappa``).
What is replicated: everything else (KappaFace's ``epochs_seen``; ElasticFace's generator state,
taken from rank 0, the rank that draws). Not included: the optimiser's state and the Partial FC
sampling generator (per rank, with no meaning in another world size).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

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


def save_sharded(head, directory) -> Path:
    """Every rank writes its shard to ``directory/shard-<rank>-of-<world>.pt`` (then a barrier).

    Refuses a directory that already holds shards of another world size."""
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
               "per_class_keys": list(head.per_class_keys), "state": state}
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


def load_sharded(head, directory) -> None:
    """Load the shards in ``directory`` (saved by any world size) into ``head``: each rank reads
    the source shards that overlap its classes, memory-mapped."""
    world, files = _shard_files(directory)
    lo, hi = head.class_range
    target = head.head.state_dict()
    per_class = set(head.per_class_keys)
    new = {}
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
                if key not in new:
                    new[key] = torch.empty((hi - lo,) + tuple(ref.shape[1:]), dtype=state[key].dtype)
                if a < b:
                    new[key][a - lo: b - lo] = state[key][a - slo: b - slo]
            elif s == 0:
                new[key] = state[key]
    head.head.load_state_dict(new, strict=True)


def consolidate(directory) -> dict:
    """The full single-process ``state_dict`` of the head saved in ``directory`` (no process group
    needed: loads every shard)."""
    world, files = _shard_files(directory)
    payloads = [_load(files[s]) for s in range(world)]
    per_class = payloads[0]["per_class_keys"]
    out = {}
    for key, value in payloads[0]["state"].items():
        out[key] = torch.cat([p["state"][key] for p in payloads]) if key in per_class else value
    return out


def full_state_dict(head, dst: int = 0):
    """The single-process ``state_dict`` over all classes on rank ``dst`` (CPU tensors); None on
    the other ranks. Per-class entries travel in row chunks of at most 64 MiB."""
    comm = head.comm
    R = comm.world_size
    sizes = shard_sizes(head.num_classes, R)
    local = head.head.state_dict()
    per_class = set(head.per_class_keys)
    out = {}
    for key, value in local.items():
        if key not in per_class:
            if dst != 0:
                value = comm.broadcast_object(value, src=0)
            out[key] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            continue
        value = value.detach()
        row_bytes = max(1, value[0].numel() * value.element_size()) if value.shape[0] else 1
        chunk = max(1, _CHUNK_BYTES // row_bytes)
        full = None
        if comm.rank == dst:
            full = torch.empty((head.num_classes,) + tuple(value.shape[1:]), dtype=value.dtype)
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
        if comm.rank == dst:
            out[key] = full
    return out if comm.rank == dst else None


def load_full_state_dict(head, state: dict) -> None:
    """Load a single-process ``state_dict`` over all classes: each rank copies its classes."""
    lo, hi = head.class_range
    per_class = set(head.per_class_keys)
    local = {}
    for key in head.head.state_dict():
        if key not in state:
            raise KeyError(f"the state has no entry {key!r} (a {_head_name(head)} state over all classes is expected)")
        value = state[key]
        if key in per_class:
            if value.shape[0] != head.num_classes:
                raise ValueError(f"{key!r} has {value.shape[0]} rows, the head has num_classes={head.num_classes}")
            value = value[lo:hi]
        local[key] = value
    unexpected = set(state) - set(local)
    if unexpected:
        raise KeyError(f"unexpected entries {sorted(unexpected)} for a {_head_name(head)} head")
    head.head.load_state_dict(local, strict=True)
