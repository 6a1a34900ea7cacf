"""Tensor-core work and device operations of one forward + backward of ``backend="triton"``, counted
on CPU under the Triton interpreter, with the shipped GPU launch configurations forced.

    python bench/count_tensor_work.py [--B 512 --D 512 --C 2048] [--dtypes bf16 fp16 fp32 mixed]
                                      [--arch sm90] [--json out.json]

* **GEMM-equivalents**: every ``tl.dot`` the interpreter executes (``M·N·K`` of its operands, padding
  included: a GPU does that work too) plus every matrix product torch runs (``mm``/``addmm``), divided
  by ``B·C·D`` — one product of the logits' shape. A recomputing design needs 4 (forward logits,
  backward recompute, the two gradient products).
* **Device operations**: Triton launches plus the torch ops that launch a kernel on a GPU (views,
  ``empty`` allocations and metadata ops launch none), over ``loss = F.margin_softmax_loss(...)``
  and ``loss.backward()`` through the public API. Ops that run only for CPU tensors (the label range
  check, which on CUDA runs only when ``fusedface.set_input_checks(True)``) are listed apart.

The path ``auto`` picks depends on C (``fusedface.backends.triton.FUSED_MIN_CLASSES``); ``--path`` forces
one. The interpreter is slow (B = D = 512, C = 2,048 takes a few minutes per dtype): the counts do not
depend on C beyond tile rounding, so a small C gives the same GEMM-equivalents as 10⁶.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# aten ops that launch no kernel on a GPU (views, allocations, metadata)
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "t", "transpose", "permute", "expand", "slice", "select", "alias", "detach", "unsqueeze", "squeeze",
    "reshape", "lift_fresh", "resize_", "set_", "_reshape_alias", "split", "unbind", "diagonal", "numpy_T",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "dim",
}


def _short(func) -> str:
    return func.name().split("::")[-1].split(".")[0]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel; fusedface's custom ops are opened up (their Python
    body runs under the counter) so the ops inside them count too. ``flops`` collects matrix products."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.cpu_only = collections.Counter()
        self.mm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("fusedface::"):
            from torch._library.custom_ops import _maybe_get_opdef
            opdef = _maybe_get_opdef(name)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        short = _short(func)
        if short in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if short == "mm" else (args[1], args[2])
            self.mm_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        if short not in NO_KERNEL:
            frames = [f.filename for f in _stack()]
            if any(os.sep + "triton" + os.sep in fn for fn in frames):
                pass  # the interpreter's own bookkeeping (moving tensors to and from numpy): no device op
            elif any(fn.endswith("_validate.py") for fn in frames):
                self.cpu_only[short] += 1
            else:
                self.ops[short] += 1
                if os.environ.get("COUNT_DEBUG") == short:
                    print("".join(f"  {f}\n" for f in frames[:8]))
        return func(*args, **kwargs)


def _stack():
    import inspect
    return inspect.stack(context=0)[2:40]


@contextlib.contextmanager
def dot_counter():
    """Records ``(M, N, K)`` of every ``tl.dot`` the interpreter executes."""
    from triton.runtime import interpreter as I
    shapes = []
    orig = I.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        shapes.append((a.data.shape[-2], b.data.shape[-1], a.data.shape[-1]))
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    I.InterpreterBuilder.create_dot = create_dot
    try:
        yield shapes
    finally:
        I.InterpreterBuilder.create_dot = orig


def forced_configs(arch: str):
    """The shipped GPU configurations of the step kernels, forced under the interpreter."""
    from fusedface.backends import triton as TS
    return dict(fwd=TS.STEP_CONFIGS[(arch, "fwd")], dw=TS.STEP_CONFIGS[(arch, "dw")], epi=TS.EPI, epi_bwd=TS.EPI_BWD)


def count(B: int, D: int, C: int, dtype: str, arch: str = "sm90", path: str | None = None, loss_kw=None,
          seed: int = 0) -> dict:
    """One forward + backward through the public API; returns the counts."""
    import fusedface.functional as F_
    from fusedface.backends import triton as TS

    g = torch.Generator().manual_seed(seed)
    xd, wd = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
              "fp32": (torch.float32, torch.float32), "mixed": (torch.bfloat16, torch.float32)}[dtype]
    x = torch.randn(B, D, generator=g).to(xd).requires_grad_()
    W = torch.randn(C, D, generator=g).to(wd).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    y[::37] = -1
    loss_kw = loss_kw or dict(m2=0.5)
    old = os.environ.get("FUSEDFACE_TRITON_PATH")
    if path:
        os.environ["FUSEDFACE_TRITON_PATH"] = path
    cfgs = forced_configs(arch)
    chunk = 32 * 2**20 // (4 * B) // 128 * 128
    t0 = time.time()
    try:
        with TS.override(**cfgs, splits=max(1, 132 // -(-B // cfgs["fwd"].block_m)), hybrid_chunk=chunk), \
                dot_counter() as dots:
            launches0 = TS.LAUNCHES[0]
            counter = OpCounter()
            with counter:
                loss = F_.margin_softmax_loss(x, W, y, backend="triton", **loss_kw)
                loss.backward()
            launches = TS.LAUNCHES[0] - launches0
            chosen = TS.choose_path(x.detach(), W.detach())
    finally:
        if path:
            if old is None:
                os.environ.pop("FUSEDFACE_TRITON_PATH", None)
            else:
                os.environ["FUSEDFACE_TRITON_PATH"] = old
    unit = 2.0 * B * C * D
    dot_flops = sum(2.0 * m * n * k for m, n, k in dots)
    torch_ops = sum(counter.ops.values())
    return dict(dtype=dtype, B=B, D=D, C=C, arch=arch, path=chosen, seconds=round(time.time() - t0, 1),
                tl_dot_calls=len(dots), tl_dot_gemm_eq=round(dot_flops / unit, 4),
                torch_mm_gemm_eq=round(counter.mm_flops / unit, 4),
                gemm_eq=round((dot_flops + counter.mm_flops) / unit, 4),
                triton_launches=launches, torch_kernel_ops=torch_ops, device_ops=launches + torch_ops,
                torch_ops=dict(counter.ops), cpu_only_check_ops=dict(counter.cpu_only),
                loss=float(loss.detach()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, default=2048)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32", "mixed"])
    ap.add_argument("--arch", default="sm90", choices=["sm90", "sm80"])
    ap.add_argument("--path", default="fused", choices=["auto", "fused", "hybrid", "legacy"],
                    help="fused (default here: what auto picks from 16,384 classes up), hybrid, legacy or auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    rows = []
    print(f"{'dtype':<6} {'path':<7} {'GEMM-eq':>8} {'tl.dot':>8} {'torch mm':>9} {'launches':>9} {'torch ops':>10} "
          f"{'device ops':>11}  torch ops (kernel-launching)")
    for dt in args.dtypes:
        r = count(args.B, args.D, args.C, dt, args.arch, None if args.path == "auto" else args.path)
        rows.append(r)
        print(f"{dt:<6} {r['path']:<7} {r['gemm_eq']:>8.3f} {r['tl_dot_gemm_eq']:>8.3f} {r['torch_mm_gemm_eq']:>9.3f} "
              f"{r['triton_launches']:>9} {r['torch_kernel_ops']:>10} {r['device_ops']:>11}  {r['torch_ops']}"
              + (f"  (CPU-only checks: {r['cpu_only_check_ops']})" if r["cpu_only_check_ops"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
