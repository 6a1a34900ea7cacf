"""Peak memory of one forward + backward, beyond the inputs and their gradients, in a fresh process.

    python bench/memory.py --backend torch --B 256 --D 128 --C 400000 [--dtype float32] [--json]

A warm-up step on a small problem comes first, so library code paged in by the first call is not
counted. The measurement is the harness's (``bench/harness.py``: ``measure_peak``): CPU: the peak
resident set size (VmHWM, reset through /proc/self/clear_refs after the inputs are allocated and
touched) minus the resident size at that moment, minus the bytes of dL/dx and dL/dW (which autograd
allocates). CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` on the same terms. Prints
one line; ``--json`` prints a JSON object instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


# the heads of issue 16 ("beyond the seeds"), measured through the head itself (its W is the parameter)
HEADS = {"adaface": ("AdaFace", {}), "curricular": ("CurricularFace", {}), "magface": ("MagFace", {}),
         "subcenter": ("SubCenterArcFace", {"k": 3}), "interclass": ("ArcFace", {"interclass_threshold": 0.3})}
LOSSES = ["arcface", "npt"] + list(HEADS)


def measure(backend: str, B: int, D: int, C: int, dtype: torch.dtype, device: str, loss: str = "arcface") -> dict:
    import fusedface
    import fusedface.functional as F_

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g, device=device)
    if loss in HEADS:
        name, kw = HEADS[loss]

        def make(classes):
            head = getattr(fusedface, name)(D, classes, backend=backend, device=device, dtype=dtype, **kw)
            return head, head.weight

        head, W = make(C)
    else:
        W = torch.randn(C, D, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
    grads_bytes = (x.numel() + W.numel()) * x.element_size()

    def run(x, W, y, head=None):
        if head is not None:
            return head(x, y)
        if loss == "npt":
            return F_.npt_loss(x, W, y, k=5, backend=backend)
        return F_.margin_softmax_loss(x, W, y, m2=0.5, backend=backend)

    def step():
        out = run(x, W, y, head if loss in HEADS else None)
        out.backward()
        return out

    # warm-up on a small problem: faults in the library code and allocator pools the step uses,
    # which RSS would otherwise count as memory of the loss
    xs = x[:8].detach().clone().requires_grad_(True)
    ys = torch.randint(0, 300, (8,), generator=g, device=device)
    if loss in HEADS:
        small, _ = make(300)
        run(xs, None, ys, small).backward()
        del small
    else:
        Ws = W[:300].detach().clone().requires_grad_(True)
        run(xs, Ws, ys).backward()
        del Ws
    del xs, ys

    m = harness.measure_peak(step, device, grads=(x, W))
    extra, method = m["extra_mib"], m["memory_method"]
    return {"backend": backend, "loss": loss, "B": B, "D": D, "C": C, "dtype": str(dtype).replace("torch.", ""),
            "device": device, "extra_mib": round(extra, 1), "inputs_mib": round(grads_bytes / 2**20, 1),
            "bc_matrix_mib": round(B * C * 4 / 2**20, 1), "method": method}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--loss", default="arcface", choices=LOSSES)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--C", type=int, default=400_000)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.device == "cpu" and argv is None:
        harness.with_fixed_malloc()  # (re-executes with glibc's fixed mmap threshold: harness.MALLOC_ENV)
    res = measure(a.backend, a.B, a.D, a.C, getattr(torch, a.dtype), a.device, a.loss)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['backend']:>10} {res['loss']} B={a.B} D={a.D} C={a.C} {res['dtype']}: "
              f"{res['extra_mib']:.1f} MiB beyond x, W and their gradients ({res['method']}; "
              f"one [B, C] fp32 matrix is {res['bc_matrix_mib']:.1f} MiB)")


if __name__ == "__main__":
    main()
