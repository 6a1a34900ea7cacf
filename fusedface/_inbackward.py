"""The machinery of the in-backward optimizers (:mod:`fusedface.optim`): the update of one backward.

A :class:`fusedface.optim.SGD` / :class:`~fusedface.optim.AdamW` attached to a head's class matrix
``W`` registers it here under an integer *token*. The engine passes the token through the fused
op; the op's backward (any backend, the sharded Functions, the Triton step) calls :func:`begin`,
which returns an :class:`Update` bound to this step's hyperparameters and state, forms ``dL/dW`` one
class slice at a time and hands each slice to :meth:`Update.apply` (or :meth:`Update.apply_index`
for the rows of a Partial FC sample) before the next slice is formed. ``W.grad`` is never
allocated: :meth:`Update.finish` sets it to :class:`AppliedGrad`, a tensor of ``W``'s shape without
storage whose every use raises an error that names the cause (global-norm clipping, a second
optimizer, accumulation).

The arithmetic is ``torch.optim.SGD``'s and ``torch.optim.AdamW``'s single-tensor code, op for op,
on fp32/fp64 ``W`` with state of the same dtype (so the fused step equals ``torch.optim`` to
rounding of the gradient); with a 16-bit ``W`` or ``state_dtype`` it computes in fp32 and rounds
what it stores, as ``torch.optim``'s ``fused=True`` kernels do. Only ``torch`` and this package's
``_numerics`` are imported: every layer (backends included) may use it.
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass

import torch

SLICE_BYTES = 8 * 2**20  # bytes of one fp32 slice of dL/dW (and of each temporary of its update), CPU
SLICE_BYTES_CUDA = 64 * 2**20  # on a GPU: fewer, larger slices (each costs a few kernel launches)

_TOKENS = itertools.count(1)
_REGISTRY: dict[int, tuple] = {}  # token -> (weakref to the optimizer, weakref to the parameter)


class InBackwardError(RuntimeError):
    """A use that cannot combine with an update applied inside the backward."""


class AppliedGrad(torch.Tensor):
    """The ``.grad`` of a class matrix whose update was applied in the backward: the shape, dtype and
    device of ``W``, no storage. Any operation on it raises :class:`InBackwardError` (what reads
    ``W.grad`` after such a backward — global-norm clipping, another optimizer, gradient
    accumulation into it — would otherwise see no gradient and silently differ from dense training)."""

    @staticmethod
    def __new__(cls, like: torch.Tensor, owner: str = "fusedface.optim"):
        t = torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)
        t.owner = owner
        return t

    def __repr__(self):
        return f"AppliedGrad(shape={tuple(self.shape)}, applied in backward by {self.owner})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise InBackwardError(
            f"{func}: this class matrix's gradient was applied inside the backward by an in-backward optimizer "
            "(fusedface.optim), so W.grad holds no values. Gradient clipping by a global norm, a second optimizer "
            "over W and gradient accumulation need the dense gradient: clip the backbone's parameters only "
            "(InsightFace does), keep W out of other optimizers, or use a torch.optim optimizer for W "
            "(docs/optim.md, \"What does not combine\")")


def register(optimizer, param) -> int:
    """A new token for ``param`` driven by ``optimizer`` (weak references: nothing is kept alive)."""
    token = next(_TOKENS)
    _REGISTRY[token] = (weakref.ref(optimizer), weakref.ref(param))
    return token


def unregister(token: int) -> None:
    _REGISTRY.pop(token, None)


def token_of(W: torch.Tensor) -> int:
    """The token of the optimizer attached to ``W`` when this call will form ``dL/dW`` (grad mode on,
    ``W`` requires grad), else 0."""
    tok = getattr(W, "_fusedface_inbackward", 0)
    if not tok or not (torch.is_grad_enabled() and W.requires_grad):
        return 0
    if tok not in _REGISTRY:
        return 0
    return tok


def _accumulates_into(param: torch.Tensor) -> bool:
    """Whether the running backward will accumulate into ``param.grad`` (False for
    ``torch.autograd.grad(loss, x)`` and ``loss.backward(inputs=[x])``, which must leave ``W`` alone).
    Asks the engine about ``param``'s AccumulateGrad node; True where the engine cannot say."""
    try:
        with torch.enable_grad():
            node = param.view_as(param).grad_fn.next_functions[0][0]
        return bool(torch._C._will_engine_execute_node(node))
    except Exception:  # no node (not a leaf that requires grad) or not inside a backward: the update runs
        return True


def begin(token: int) -> "Update | None":
    """The update of this backward for ``token``'s parameter, or None when this backward does not ask
    for ``dL/dW`` (``autograd.grad`` of other inputs, ``backward(inputs=...)`` without ``W``): the
    caller then forms no ``dL/dW`` and ``W`` does not move. Raises :class:`InBackwardError` for a second
    backward before ``optimizer.step()`` and for a backward that builds a graph. Nothing of the
    optimizer's state changes before :meth:`Update.finish`."""
    entry = _REGISTRY.get(token)
    opt = entry[0]() if entry else None
    param = entry[1]() if entry else None
    if opt is None or param is None:
        raise InBackwardError("the in-backward optimizer of this head was deleted between forward and backward")
    if not _accumulates_into(param):
        return None
    if torch.is_grad_enabled():
        raise InBackwardError("backward(create_graph=True) through a head with an in-backward optimizer: the update "
                              "is applied while the gradient is formed and cannot be differentiated; use a "
                              "torch.optim optimizer for W for higher-order gradients")
    return opt._begin_update(param)


def slice_rows(C: int, D: int, device=None) -> int:
    """Classes per slice: one fp32 ``[rows, D]`` slice of the gradient in :data:`SLICE_BYTES`
    (:data:`SLICE_BYTES_CUDA` for a CUDA ``device``), at least 64."""
    budget = SLICE_BYTES_CUDA if device is not None and torch.device(device).type == "cuda" else SLICE_BYTES
    return max(64, min(C, budget // (4 * max(D, 1)) // 64 * 64))


def slice_labels(y: torch.Tensor, lo: int, hi: int, elsewhere=-1) -> torch.Tensor:
    """The labels as columns of the class slice ``lo:hi``: ``y − lo`` where the label falls in it,
    ``elsewhere`` (an int or a per-row tensor) on the other rows."""
    inside = (y >= lo) & (y < hi)
    return torch.where(inside, y - lo, elsewhere if torch.is_tensor(elsewhere) else torch.full_like(y, elsewhere))


@dataclass
class Hyper:
    """One step's hyperparameters of a parameter's group, read when its backward runs."""

    kind: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def state_names(self) -> tuple[str, ...]:
        """The state tensors of ``W``'s shape, named as ``torch.optim`` names them."""
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        return ("exp_avg", "exp_avg_sq")


class Update:
    """The update of one parameter in one backward. ``apply(lo, hi, g)`` updates rows ``lo:hi`` of
    ``W`` and their state from their gradient ``g [hi − lo, D]``; ``apply_index(index, g)`` the rows
    ``index`` (each row at most once per backward); ``apply_rows_without_grad(mask)`` gives rows that
    formed no gradient this step the update of a zero gradient (the dense semantics of Partial FC)."""

    def __init__(self, param: torch.Tensor, hyper: Hyper, state: dict, step: int, first: bool, sparse: bool,
                 on_finish, *, new_state: dict | None = None):
        self.param = param
        self.hyper = hyper
        self.state = state
        self.step = step  # this parameter's step count after this update (AdamW's bias correction)
        self.first = first  # SGD: the momentum buffer is formed by this update (torch.optim's first step)
        self.sparse = sparse
        self._on_finish = on_finish
        # buffers created by this update: in ``state`` for the arithmetic, kept by the optimizer only
        # when the update finishes (a backward that fails before its first slice leaves no trace)
        self.new_state = new_state or {}

    # ---------------------------------------------------------------- the arithmetic

    def _math(self, p, g, bufs, first, step):
        """``torch.optim``'s update of ``p`` (rows) from ``g`` in place; ``bufs`` the state rows (same
        dtype as ``p``); ``first``: bool, or a bool ``[n]`` per row; ``step``: int, or ``[n]`` per row."""
        h = self.hyper
        if h.kind == "sgd":
            d = g if h.weight_decay == 0 else g.add(p, alpha=h.weight_decay)
            if h.momentum != 0:
                buf = bufs[0]
                if first is True:
                    buf.copy_(d)
                elif first is False:
                    buf.mul_(h.momentum).add_(d, alpha=1 - h.dampening)
                else:
                    buf.copy_(torch.where(first[:, None], d, buf * h.momentum + d * (1 - h.dampening)))
                d = d.add(buf, alpha=h.momentum) if h.nesterov else buf
            p.add_(d, alpha=-h.lr)
            return
        m, v = bufs
        if h.weight_decay != 0:
            p.mul_(1 - h.lr * h.weight_decay)
        m.lerp_(g, 1 - h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        if isinstance(step, torch.Tensor):
            st = step.to(p.dtype)[:, None]
            bc1 = 1 - h.beta1 ** st
            bc2_sqrt = (1 - h.beta2 ** st).sqrt()
            p.sub_((h.lr / bc1) * m / ((v.sqrt() / bc2_sqrt).add_(h.eps)))
            return
        bc1 = 1 - h.beta1 ** step
        bc2_sqrt = (1 - h.beta2 ** step) ** 0.5
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(h.eps), value=-(h.lr / bc1))

    def _run(self, p, g, bufs, first, step):
        """Runs :meth:`_math` in fp32 copies when ``p`` or a buffer is 16-bit, writing back rounded."""
        exact = p.dtype in (torch.float32, torch.float64) and all(b.dtype == p.dtype for b in bufs)
        if exact:
            self._math(p, g.to(p.dtype), bufs, first, step)
            return
        pc, bc = p.float(), [b.float() for b in bufs]
        self._math(pc, g.float(), bc, first, step)
        p.copy_(pc)
        for b, c in zip(bufs, bc):
            b.copy_(c)

    # ---------------------------------------------------------------- the rows

    def _per_row(self) -> bool:
        return "row_step" in self.state

    def _ensure_row_steps(self) -> None:
        """Sparse semantics start: every row has taken the steps the parameter took before this one (at
        least one when its state existed before: e.g. a momentum buffer loaded from ``torch.optim.SGD``,
        whose state has no step count)."""
        if not self._per_row():
            before = max(self.step - 1, 0 if self.first else 1)
            rs = torch.full((self.param.shape[0],), before, dtype=torch.int32, device=self.param.device)
            self.state["row_step"] = rs
            self.new_state["row_step"] = rs

    @torch.no_grad()
    def apply(self, lo: int, hi: int, g: torch.Tensor) -> None:
        """Rows ``lo:hi`` (contiguous) from their gradient."""
        bufs = [self.state[k][lo:hi] for k in self.hyper.state_names()]
        self._run(self.param[lo:hi], g, bufs, *self._steps(lambda: torch.arange(lo, hi, device=g.device)))

    def _steps(self, rows):
        """``(first, step)`` of the rows ``rows()`` (a thunk: the index is only built when needed).
        Per row, once the sparse semantics started: a row is first when it never stepped, or when its
        buffer was made by this update (momentum switched on), and its count is advanced. Otherwise
        the parameter's."""
        if not self._per_row():
            return self.first, self.step
        index = rows()
        rs = self.state["row_step"]
        before = rs.index_select(0, index)
        rs.index_copy_(0, index, before + 1)
        return (before == 0) | self.first, before + 1

    @torch.no_grad()
    def apply_index(self, index: torch.Tensor, g: torch.Tensor) -> None:
        """Rows ``index`` (distinct) from their gradient ``g [len(index), D]``: gathered, updated,
        scattered. Sparse semantics (``sparse=True``): only these rows and their state change, each row
        as if ``torch.optim`` had stepped it alone on the steps it was sampled in."""
        names = self.hyper.state_names()
        p = self.param.index_select(0, index)
        bufs = [self.state[k].index_select(0, index) for k in names]
        if self.sparse:
            self._ensure_row_steps()
        self._run(p, g, bufs, *self._steps(lambda: index))
        self.param.index_copy_(0, index, p)
        for k, b in zip(names, bufs):
            self.state[k].index_copy_(0, index, b)

    @torch.no_grad()
    def apply_rows_without_grad(self, formed: torch.Tensor) -> None:
        """Dense semantics: every row not in ``formed`` (bool ``[C]``, or a ``[k]`` index of the rows that
        had a gradient) gets the update of a zero gradient (weight decay, momentum), slice by slice."""
        C, D = self.param.shape
        if formed.dtype != torch.bool:
            mask = torch.zeros(C, dtype=torch.bool, device=self.param.device)
            mask[formed] = True
            formed = mask
        rest = (~formed).nonzero().squeeze(1)
        n = slice_rows(C, D, self.param.device)
        for i in range(0, rest.numel(), n):
            idx = rest[i:i + n]
            self.apply_index(idx, torch.zeros(idx.numel(), D, dtype=self.param.dtype, device=self.param.device))

    def mark_applied(self) -> None:
        """For rows a kernel of a backend updated itself (the Triton step's epilogue): bumps ``W``'s
        version counter, as the in-place ops of :meth:`apply` do (a later use of a saved ``W`` then
        raises instead of reading the updated values)."""
        torch.autograd.graph.increment_version(self.param)

    def finish(self) -> None:
        """Marks the step done: ``W.grad`` becomes :class:`AppliedGrad`."""
        self._on_finish(self)
