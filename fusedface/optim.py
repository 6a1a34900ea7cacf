"""In-backward optimizers for the class matrix of fusedface heads (docs/optim.md).

At millions of identities the class matrix ``W`` and what training keeps beside it fill the GPU:
``W``, a dense ``W.grad`` of the same size and the optimizer's state. The fused backward forms
``dL/dW`` one class slice at a time; an optimizer of this module, built over a head's parameters,
applies ``torch.optim.SGD``'s or ``torch.optim.AdamW``'s update to each slice as soon as it is formed,
so ``W.grad`` is never allocated::

    head = fusedface.ArcFace(512, 2_000_000, device="cuda")
    opt_head = fusedface.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_backbone = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = head(backbone(images), labels)
    loss.backward()          # W and its momentum are updated here, slice by slice
    opt_backbone.step(); opt_head.step()   # opt_head.step() closes the step (the update is done)
    opt_backbone.zero_grad(); opt_head.zero_grad()

``param_groups`` behave as in ``torch.optim`` (an LR scheduler's or a hand-set ``lr`` applies at the
next backward); ``state_dict()`` / ``load_state_dict()`` round-trip and use ``torch.optim``'s state
names (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``). ``state_dtype=torch.bfloat16``
stores the state in bf16 (half of fp32), computing each update in fp32.

Partial FC (a sharded head with ``sample_rate``): ``sparse=True`` (default) updates only the sampled
rows and their state, as PaddlePaddle PLSC's sparse momentum, each row as if ``torch.optim`` had
stepped it on the steps it was sampled in; ``sparse=False`` keeps ``torch.optim``'s dense semantics
(unsampled rows still decay and coast on their momentum), as InsightFace's ``PartialFC_V2`` with
``torch.optim.SGD``.
"""
from __future__ import annotations

import torch

from . import _inbackward as IB

__all__ = ["SGD", "AdamW", "InBackwardError", "AppliedGrad"]

InBackwardError = IB.InBackwardError
AppliedGrad = IB.AppliedGrad


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    """The ``param_groups`` entry of ``optimizer`` that holds ``param`` (None if none does)."""
    return next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)


def mark_head_weight(param: torch.Tensor) -> None:
    """Called by the heads for their class matrix: the parameters an in-backward optimizer may drive."""
    param._fusedface_head = True


class _InBackward(torch.optim.Optimizer):
    """Shared part of :class:`SGD` and :class:`AdamW`: attachment, state, the step protocol."""

    def __init__(self, params, defaults):
        self._tokens: dict[int, int] = {}  # id(param) -> token
        self._pending: set[int] = set()  # id(param) updated by a backward since the last step()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._attach(p)
        sd = group.get("state_dtype")
        if sd is not None and sd not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"state_dtype must be None (W's dtype), torch.float32, torch.float64, torch.bfloat16 or "
                            f"torch.float16, got {sd!r}")

    def _attach(self, p: torch.Tensor) -> None:
        name = type(self).__name__
        if not getattr(p, "_fusedface_head", False):
            raise TypeError(f"fusedface.optim.{name} applies its update inside a fusedface head's backward, so it "
                            f"takes the class matrix of a fusedface head (head.parameters()); got a parameter of shape "
                            f"{tuple(p.shape)} that is not one. Use a torch.optim optimizer for the backbone")
        old = getattr(p, "_fusedface_inbackward", 0)
        if old and old in IB._REGISTRY and IB._REGISTRY[old][0]() is not None:
            raise ValueError(f"fusedface.optim.{name}: this head's class matrix already has an in-backward optimizer; "
                             "one parameter can be driven by one optimizer (detach the other with .detach_head())")
        token = IB.register(self, p)
        self._tokens[id(p)] = token
        p._fusedface_inbackward = token

    def detach_head(self) -> None:
        """Stops applying updates in the backward (the heads' backward forms ``W.grad`` again)."""
        for group in self.param_groups:
            for p in group["params"]:
                tok = self._tokens.pop(id(p), 0)
                IB.unregister(tok)
                if getattr(p, "_fusedface_inbackward", 0) == tok:
                    p._fusedface_inbackward = 0

    def __del__(self):
        try:
            for tok in self._tokens.values():
                IB.unregister(tok)
        except Exception:  # interpreter shutdown
            pass

    def _group_of(self, param):
        group = group_of(self, param)
        if group is None:
            raise IB.InBackwardError("this parameter is not in the optimizer's param_groups any more")
        return group

    def _hyper(self, group) -> IB.Hyper:
        raise NotImplementedError

    def _state_dtype(self, group, param) -> torch.dtype:
        return group.get("state_dtype") or param.dtype

    def _begin_update(self, param) -> IB.Update:
        """Called by the backward (through :func:`fusedface._inbackward.begin`)."""
        name = type(self).__name__
        if id(param) in self._pending:
            raise IB.InBackwardError(
                f"a second update of this head's class matrix before fusedface.optim.{name}.step(): either a second "
                "backward (gradient accumulation over several backwards, or backward twice with retain_graph), or "
                "one loss that uses the class matrix twice (two calls of the head, or one W shared by two heads; "
                "the first part of this backward was applied). The in-backward update applies one gradient per "
                "step: call step() after every backward (scale lr for the micro-batch), make one call of the head "
                "per step (concatenate the batches), or use a torch.optim optimizer for W (docs/optim.md, "
                "\"What does not combine\")")
        group = self._group_of(param)
        hyper = self._hyper(group)
        state = self.state[param]
        sdt = self._state_dtype(group, param)
        new = {k: torch.zeros(param.shape, dtype=sdt, device=param.device) for k in hyper.state_names()
               if k not in state}
        step = int(state["step"].item()) + 1 if "step" in state else 1
        # the arithmetic sees the new buffers; the optimizer keeps them (and the step count) at finish()
        view = {**state, **new}
        return IB.Update(param, hyper, view, step, bool(new), bool(group.get("sparse", True)), self._finish,
                         new_state=new)

    def _finish(self, upd: IB.Update) -> None:
        state = self.state[upd.param]
        state.update(upd.new_state)
        state["step"] = torch.tensor(float(upd.step), dtype=torch.float32)
        self._pending.add(id(upd.param))
        upd.param.grad = IB.AppliedGrad(upd.param, f"fusedface.optim.{type(self).__name__}")

    @torch.no_grad()
    def step(self, closure=None):
        """Closes the step: the update itself was applied by the backward. With ``closure`` (which
        computes the loss and calls ``backward``), runs it first, as ``torch.optim`` does."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p.grad, IB.AppliedGrad):
                    p.grad = None
                elif p.grad is not None and id(p) not in self._pending:
                    self._step_dense(p)
        self._pending.clear()
        return loss

    def _step_dense(self, p) -> None:
        """A dense ``W.grad`` (the backward did not apply the update: ``backend="reference"``, after
        :meth:`detach_head`, a ``W`` that reached the loss through another op): the same update, applied
        to the whole gradient here, as ``torch.optim`` would."""
        if p.grad.is_sparse:
            raise IB.InBackwardError(f"fusedface.optim.{type(self).__name__}: a sparse W.grad is not supported")
        upd = self._begin_update(p)
        upd.apply(0, p.shape[0], p.grad)
        upd.finish()
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the :class:`AppliedGrad` markers (and any dense gradient) of the parameters."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim``'s, except that the state keeps each group's ``state_dtype`` and the per-row
        step counts stay int32: ``torch.optim`` casts floating state to the parameter's dtype, which
        for a bf16 ``W`` would round an fp32 state and counts above 256; so they are converted here
        from the tensors as saved."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            group = self._group_of(p)
            sdt = self._state_dtype(group, p)
            st = self.state[p]
            for k, v in saved_state[pid].items():
                if k == "row_step":
                    st[k] = v.to(device=p.device, dtype=torch.int32)
                elif k != "step" and torch.is_tensor(v) and v.is_floating_point():
                    st[k] = v.to(device=p.device, dtype=sdt)
        self._pending.clear()


class SGD(_InBackward):
    """``torch.optim.SGD`` applied inside the fused backward, one class slice at a time (docs/optim.md).

    The same arguments and arithmetic as ``torch.optim.SGD`` (coupled weight decay, momentum with
    ``dampening``, Nesterov; the momentum buffer is the first step's ``d_p``), plus ``state_dtype``
    (the momentum buffer's dtype; None: ``W``'s) and ``sparse`` (Partial FC: update only the sampled
    rows). Its ``params`` must be fusedface heads' class matrices (``head.parameters()``)."""


    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, state_dtype=None,
                 *, sparse=True):
        if lr is None or float(lr) < 0.0:
            raise ValueError(f"lr must be a float >= 0, got {lr!r}")
        if momentum < 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        state_dtype=state_dtype, sparse=bool(sparse))
        super().__init__(params, defaults)

    def _hyper(self, group) -> IB.Hyper:
        return IB.Hyper("sgd", float(group["lr"]), float(group["weight_decay"]), momentum=float(group["momentum"]),
                        dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]))


class AdamW(_InBackward):
    """``torch.optim.AdamW`` applied inside the fused backward, one class slice at a time (docs/optim.md).

    Decoupled weight decay ``W ← W·(1 − lr·wd)``, then Adam's moments with bias correction, as
    ``torch.optim.AdamW`` (no ``amsgrad``). ``state_dtype``: the dtype of both moments (None:
    ``W``'s); ``sparse``: Partial FC updates only the sampled rows, each with its own step count."""


    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, state_dtype=None, *,
                 sparse=True):
        if float(lr) < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        sparse=bool(sparse))
        super().__init__(params, defaults)

    def _hyper(self, group) -> IB.Hyper:
        b1, b2 = group["betas"]
        return IB.Hyper("adamw", float(group["lr"]), float(group["weight_decay"]), beta1=float(b1), beta2=float(b2),
                        eps=float(group["eps"]))
