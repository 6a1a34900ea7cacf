"""The memory model of one training step of a class matrix (docs/memory.md): what each device holds
for ``W``, its optimizer state, its gradient, the fused pass's buffers and, when sharded, the
gathered embeddings — dense (``torch.optim`` on ``W.grad``) or in-backward (:mod:`fusedface.optim`).

Every term is a formula of the code it describes (the slice of :mod:`fusedface._inbackward`, the
tile budget of the engine, the temporaries of ``torch.optim``'s single-tensor/foreach update);
``bench/optim_memory.py --check`` holds the model to measured peaks. Bytes throughout.

    >>> from fusedface.memory_model import per_device
    >>> round(per_device(C=10_000_000, D=512, B=128, world=8, optimizer="sgd", in_backward=True)["total"] / 2**30, 2)
    4.94

``python -m fusedface.memory_model`` prints the table of docs/memory.md.
"""
from __future__ import annotations

from ._inbackward import Hyper, slice_rows

MIB = 2**20
GIB = 2**30

# working set of the fused pass besides O(C) vectors, per backend (the engine's tile budget for the
# torch backend; the per-thread L2-sized tile buffers of the native CPU backend; the hybrid's
# chunk buffer of the Triton backend on fp32 inputs, its partials on 16-bit ones)
# (torch: what the engine's 32 MiB tile budget allows in practice, ~6 of the 8 budgeted [B, T] fp32
# temporaries at once, measured 26 MiB at B = 256, D = 128)
PASS_BUFFER = {"torch": 26 * MIB, "native": 2 * MIB, "triton": 32 * MIB}
PER_CLASS_FORWARD = 14  # bytes per class live in the forward: winv, the norms' temporaries, the NaN/Inf flags
PER_CLASS_BACKWARD = 8  # bytes per class live in the backward: winv and the backward's per-class vectors


def state_buffers(optimizer: str, momentum: float = 0.9) -> int:
    """Tensors of ``W``'s shape the optimizer keeps (its state names): SGD 1 with momentum (0 without),
    AdamW 2."""
    if optimizer in (None, "none"):
        return 0
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd', 'adamw' or 'none', got {optimizer!r}")
    return len(Hyper(optimizer, 0.0, 0.0, momentum=momentum).state_names())


def update_temporaries(optimizer: str, *, weight_decay: bool = True, nesterov: bool = False) -> int:
    """Tensors of the updated rows' shape that ``torch.optim``'s update allocates (and the in-backward
    update per slice, which runs the same ops): SGD ``d_p = g + wd·p`` (1 with weight decay) and
    ``d_p + momentum·buf`` (1 with Nesterov); AdamW ``sqrt(v)`` and its division (2)."""
    if optimizer == "sgd":
        return int(weight_decay) + int(nesterov)
    if optimizer == "adamw":
        return 2
    return 0


def per_device(*, C: int, D: int, B: int, world: int = 1, optimizer: str = "sgd", in_backward: bool = True,
               momentum: float = 0.9, nesterov: bool = False, weight_decay: bool = True, w_bytes: int = 4,
               state_bytes: int | None = None, backend: str = "triton", sample_rate: float | None = None,
               device: str = "cuda") -> dict:
    """Bytes one device holds at the peak of a step, by term, and ``total``.

    ``C`` global classes over ``world`` devices (balanced shards), ``B`` rows per device (the pass
    runs on the gathered global batch ``B·world`` when sharded), ``w_bytes``/``state_bytes`` the
    element sizes of ``W`` and of the state (None: ``W``'s). ``sample_rate``: Partial FC (the pass
    runs on a gathered copy of the sampled rows; dense mode's gradient is still ``[C_local, D]``).
    ``device``: sizes the in-backward slice (64 MiB on CUDA, 8 MiB on CPU).
    """
    state_bytes = w_bytes if state_bytes is None else state_bytes
    c = -(-C // world)  # the largest shard
    rows = c if sample_rate is None else max(1, int(sample_rate * c))
    Bg = B * world
    t = {}
    t["W"] = c * D * w_bytes
    t["state"] = state_buffers(optimizer, momentum) * c * D * state_bytes
    temps = update_temporaries(optimizer, weight_decay=weight_decay, nesterov=nesterov and optimizer == "sgd")
    if in_backward:
        n = slice_rows(rows, D, device)
        t["gradient"] = n * D * 4  # one fp32 slice of dL/dW
        t["update"] = temps * n * D * 4
    else:
        t["gradient"] = c * D * w_bytes  # W.grad (Partial FC too: index_select's backward is dense)
        t["update"] = temps * c * D * w_bytes
    t["sample"] = 0 if sample_rate is None else rows * D * w_bytes  # W.index_select(0, index)
    t["pass"] = PASS_BUFFER.get(backend, 32 * MIB)
    t["per_class"] = PER_CLASS_BACKWARD * rows
    t["embeddings"] = 3 * Bg * D * 4 if world > 1 else 2 * Bg * D * 4  # gathered x, Σ dℓ/dc·ŵ, dL/dx
    # the peak: the larger of the forward (its per-class temporaries) and the backward. In-backward, the
    # backward holds one slice and its update; dense, the larger of the backward (W.grad filled while the
    # pass runs) and torch.optim's step (W.grad and the update's temporaries)
    held = t["W"] + t["state"]
    forward = t["sample"] + t["pass"] + PER_CLASS_FORWARD * rows + t["embeddings"]
    backward = t["gradient"] + t["sample"] + t["pass"] + t["per_class"] + t["embeddings"]
    if in_backward:
        t["total"] = held + max(forward, backward + t["update"])
    else:
        t["total"] = held + max(forward, backward, t["gradient"] + t["update"])
    return t


def table(sizes=(1_000_000, 10_000_000, 29_000_000, 100_000_000), worlds=(1, 8), *, D: int = 512, B: int = 128,
          optimizer: str = "sgd") -> list[dict]:
    """Rows of docs/memory.md's table: GiB per device for each size, world, state dtype and mode."""
    out = []
    for C in sizes:
        for world in worlds:
            # torch.optim keeps the state in W's dtype: a bf16 state is the in-backward optimizer's option
            for ib, sb, sname in ((False, 4, "fp32"), (True, 4, "fp32"), (True, 2, "bf16")):
                t = per_device(C=C, D=D, B=B, world=world, optimizer=optimizer, in_backward=ib, state_bytes=sb)
                out.append({"C": C, "world": world, "state_dtype": sname, "mode": "in-backward" if ib else "dense",
                            **{k: v / GIB for k, v in t.items()}})
    return out


def main() -> None:
    """Prints docs/memory.md's table with every term (GiB per device)."""
    for opt in ("sgd", "adamw"):
        print(f"{opt}: D=512, 128 rows per device, fp32 W; GiB per device")
        for r in table(optimizer=opt):
            terms = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in ("C", "world", "state_dtype", "mode", "total"))
            print(f"  C={r['C']:>11,} devices={r['world']} {r['mode']:>11} {r['state_dtype']} state: total {r['total']:.2f}"
                  f"  ({terms})")


if __name__ == "__main__":
    main()


__all__ = ["per_device", "table", "state_buffers", "update_temporaries"]
