"""The collectives the sharded heads use, over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Every collective fusedface calls goes through :class:`Comm`, which

* pads rows to the largest batch of the group so that variable batch sizes travel through the
  equal-size collectives (``all_gather_single`` / ``reduce_scatter_single``, formerly
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor``) that both NCCL and gloo implement; on CPU
  tensors (gloo) the reduce-scatter is an ``all_to_all_single`` plus a local sum, because gloo's
  reduce-scatter is a full all-reduce and sends twice the bytes;
* does nothing in a world of one (no process group, or a group of size 1): the sharded heads then
  run exactly the single-process computation, without a collective;
* records, when a :func:`record_communication` block is open, what each call sends.

Bytes sent per rank, as recorded (``sent``): the bandwidth-optimal ring model, the figure NCCL's
ring algorithms reach and gloo's ring algorithms approach. With ``R`` ranks and ``n`` the bytes of
one rank's slice: ``all_gather`` sends ``(R − 1)·n``; ``reduce_scatter`` of ``R·n`` bytes sends
``(R − 1)·n``; ``all_reduce`` of ``N`` bytes sends ``2·(R − 1)/R·N``; ``gather`` to one rank sends
``n`` from every other rank. ``payload`` is the size of the tensor the rank hands to the call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Comm", "CommRecord", "record_communication", "shard_range", "shard_sizes"]


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Classes per rank in the contiguous balanced layout: ``C // R + (r < C % R)``."""
    base, extra = divmod(int(num_classes), int(world_size))
    return [base + (1 if r < extra else 0) for r in range(int(world_size))]


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)``, the classes rank ``rank`` owns."""
    base, extra = divmod(int(num_classes), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------------------------------------
# what each rank sends


@dataclass
class CommRecord:
    """The collectives one rank called inside a :func:`record_communication` block."""

    calls: list = field(default_factory=list)  # (op, dtype, payload bytes, sent bytes)

    def add(self, op: str, dtype: torch.dtype, payload: int, sent: int) -> None:
        self.calls.append((op, str(dtype).replace("torch.", ""), int(payload), int(sent)))

    @property
    def sent_bytes(self) -> int:
        return sum(c[3] for c in self.calls)

    @property
    def payload_bytes(self) -> int:
        return sum(c[2] for c in self.calls)

    def by_op(self) -> dict:
        out: dict = {}
        for op, _, payload, sent in self.calls:
            d = out.setdefault(op, {"calls": 0, "payload_bytes": 0, "sent_bytes": 0})
            d["calls"] += 1
            d["payload_bytes"] += payload
            d["sent_bytes"] += sent
        return out


_RECORDS: list[CommRecord] = []


@contextlib.contextmanager
def record_communication():
    """``with record_communication() as rec: ...`` — ``rec`` lists every collective this process
    called through fusedface inside the block (``rec.sent_bytes``, ``rec.by_op()``)."""
    rec = CommRecord()
    _RECORDS.append(rec)
    try:
        yield rec
    finally:
        _RECORDS.remove(rec)


def _log(op: str, t: torch.Tensor, sent: float) -> None:
    for rec in _RECORDS:
        rec.add(op, t.dtype, t.numel() * t.element_size(), round(sent))


_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor")
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor")


class Comm:
    """A process group seen by the sharded heads: rank, world size and the padded collectives.

    ``group=None`` takes the default group when ``torch.distributed`` is initialised, else a
    world of one (every collective is then the identity)."""

    def __init__(self, group=None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised; "
                               "call torch.distributed.init_process_group first (torchrun sets the environment)")
        else:
            self.rank, self.world_size = 0, 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size})"

    # -------------------------------------------------------------- batch sizes (the one host sync)

    def batch_sizes(self, n: int, device: torch.device) -> list[int]:
        """Every rank's batch size, as Python ints. This is the one host synchronisation of a
        step with variable batch sizes (the padded collectives need the sizes on the host);
        pass ``batch_sizes=`` to the heads to skip it when the sizes are known."""
        if not self.active:
            return [int(n)]
        mine = torch.tensor([n], dtype=torch.long, device=device)
        out = torch.empty(self.world_size, dtype=torch.long, device=device)
        _log("all_gather", mine, (self.world_size - 1) * mine.element_size())
        _all_gather_single(out, mine, group=self.group)
        return [int(v) for v in out.tolist()]

    # -------------------------------------------------------------- rows of the global batch

    def all_gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``t [sizes[r], ...]`` in rank order (padded to the largest)."""
        if not self.active:
            return t
        R, bmax = self.world_size, max(sizes)
        if t.shape[0] == bmax:
            src = t.contiguous()
        else:
            src = t.new_zeros((bmax,) + tuple(t.shape[1:]))
            src[: t.shape[0]] = t
        out = t.new_empty((R * bmax,) + tuple(t.shape[1:]))
        _log("all_gather", src, (R - 1) * src.numel() * src.element_size())
        _all_gather_single(out, src, group=self.group)
        if all(s == bmax for s in sizes):
            return out
        return torch.cat([out[r * bmax: r * bmax + s] for r, s in enumerate(sizes)])

    def reduce_scatter_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Sum ``t [Σ sizes, ...]`` over ranks and return this rank's rows ``[sizes[rank], ...]``."""
        if not self.active:
            return t
        R, bmax = self.world_size, max(sizes)
        if all(s == bmax for s in sizes):
            src = t.contiguous()
        else:
            src = t.new_zeros((R * bmax,) + tuple(t.shape[1:]))
            offset = 0
            for r, s in enumerate(sizes):
                src[r * bmax: r * bmax + s] = t[offset: offset + s]
                offset += s
        rest = tuple(t.shape[1:])
        _log("reduce_scatter", src, (R - 1) * bmax * src[0].numel() * src.element_size() if bmax else 0)
        if src.device.type == "cpu":
            # gloo runs reduce_scatter as a full all-reduce (twice the bytes of the ring); an
            # all-to-all of the row blocks and a local sum sends the ring's (R − 1)·b̂ rows
            recv = torch.empty_like(src)
            dist.all_to_all_single(recv, src, group=self.group)
            out = recv.view((R, bmax) + rest).sum(dim=0)
        else:
            out = t.new_empty((bmax,) + rest)
            _reduce_scatter_single(out, src, op=dist.ReduceOp.SUM, group=self.group)
        return out[: sizes[self.rank]]

    # -------------------------------------------------------------- O(B) merges

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; ``op`` is ``"sum"``, ``"max"`` or ``"min"``. Returns ``t``."""
        if not self.active:
            return t
        R = self.world_size
        _log(f"all_reduce_{op}", t, 2 * (R - 1) / R * t.numel() * t.element_size())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                               "min": dist.ReduceOp.MIN}[op], group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[R, *t.shape]``: every rank's ``t`` (same shape on every rank)."""
        if not self.active:
            return t[None]
        src = t.contiguous().reshape(-1)  # the concatenated form: gloo takes no stacked output
        out = src.new_empty(self.world_size * src.numel())
        _log("all_gather", src, (self.world_size - 1) * src.numel() * src.element_size())
        _all_gather_single(out, src, group=self.group)
        return out.view((self.world_size,) + tuple(t.shape))

    # -------------------------------------------------------------- checkpoints (not per step)

    def gather_rows_to(self, t: torch.Tensor, sizes: list[int], dst: int = 0):
        """Rank ``dst`` gets every rank's ``t [sizes[r], ...]`` concatenated; the others get None."""
        if not self.active:
            return t
        bmax = max(sizes)
        src = t.new_zeros((bmax,) + tuple(t.shape[1:]))
        src[: t.shape[0]] = t
        _log("gather", src, 0 if self.rank == dst else src.numel() * src.element_size())
        if self.rank == dst:
            bufs = [torch.empty_like(src) for _ in range(self.world_size)]
            dist.gather(src, bufs, dst=self._global_rank(dst), group=self.group)
            return torch.cat([b[:s] for b, s in zip(bufs, sizes)])
        dist.gather(src, None, dst=self._global_rank(dst), group=self.group)
        return None

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global_rank(src), group=self.group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order (checkpoints only: not recorded)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)
