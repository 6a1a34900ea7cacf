"""Which backends exist in this installation, and how ``backend="auto"`` picks one."""
from __future__ import annotations

import functools
import importlib

import torch

from ._env import env_flag

BACKENDS = ("reference", "torch", "native", "triton")


@functools.cache  # resolved once per process: a failed import is not retried every call
def _native_module():
    try:
        return importlib.import_module("fusedface._C")
    except ImportError:
        return None


@functools.cache
def _native_kernels():
    if _native_module() is None:
        return None
    try:
        return importlib.import_module("fusedface._native")
    except ImportError:
        return None


@functools.cache
def _triton_kernels():
    try:
        importlib.import_module("triton")
        kernels = importlib.import_module("fusedface._triton")
        # the training step's kernels are created now too (triton fixes a kernel's mode, compiled or
        # interpreted, when it is decorated)
        importlib.import_module("fusedface._triton_step")
        return kernels
    except ImportError:
        return None


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag("TRITON_INTERPRET", False)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run tensors on ``device`` (default: CPU) in this installation."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = ["reference", "torch"]
    if _native_kernels() is not None:
        native = _native_kernels()
        if dev.type == "cpu" or getattr(native, "supports_device", lambda d: False)(dev):
            out.append("native")
    if _triton_kernels() is not None and (dev.type == "cuda" or triton_interpreted()):
        out.append("triton")
    return out


_HOW = {
    "native": ("the compiled module fusedface._C was not built; build it with "
               "`pip install --no-build-isolation .` (needs a C++ compiler and ninja; CUDA kernels "
               "also need a CUDA build of torch and a CUDA toolkit)"),
    "triton": ("Triton kernels run on CUDA tensors with `pip install triton` (or on CPU tensors "
               "under TRITON_INTERPRET=1, for testing)"),
}


def resolve(backend: str, device: torch.device):
    """Returns ``(name, kernels)``; ``kernels`` is None for the reference."""
    from ._validate import check_backend_name
    check_backend_name(backend)
    avail = available_backends(device)
    if backend == "auto":
        if device.type == "cuda" and "triton" in avail:
            backend = "triton"
        elif "native" in avail and device.type != "cuda":
            # the native CUDA kernels compile in CI but have not yet run on a GPU: "auto" leaves them
            # to an explicit backend="native" until they have (docs/native.md)
            backend = "native"
        else:
            backend = "torch"
    if backend not in avail:
        raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors here "
                           f"(available: {', '.join(avail)}): {_HOW.get(backend, '')}")
    if backend == "reference":
        return backend, None
    if backend == "torch":
        from . import _chunked
        return backend, _chunked
    if backend == "native":
        return backend, _native_kernels()
    return backend, _triton_kernels()
