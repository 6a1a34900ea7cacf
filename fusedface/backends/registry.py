"""The backend registry (see the package docstring, :mod:`fusedface.backends`)."""
from __future__ import annotations

import importlib

import torch


BACKENDS = ("reference", "torch", "native", "triton")
BACKEND_NAMES = ("auto",) + BACKENDS
FUSED = BACKENDS[1:]

_MODULES = {"torch": "fusedface.backends.torch", "native": "fusedface.backends.native",
            "triton": "fusedface.backends.triton"}

_HOW = {
    "native": ("the compiled module fusedface._C was not built; build it with "
               "`pip install --no-build-isolation .` (needs a C++ compiler and ninja; CUDA kernels "
               "also need a CUDA build of torch and a CUDA toolkit)"),
    "triton": ("Triton kernels run on CUDA tensors with `pip install triton` (or on CPU tensors "
               "under TRITON_INTERPRET=1, for testing)"),
}


_LOADED: dict = {}  # name -> module (or None: cannot be imported here), filled by load()


def load(name: str):
    """The module of fused backend ``name``, or None when it cannot be imported here (the native
    backend without ``fusedface._C``, the Triton backend without ``triton``). Imported once per
    process: a failed import is not retried every call."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            _LOADED[name] = None
    return _LOADED[name]


def loaded(name: str):
    """The module of ``name`` if :func:`load` has imported it, else None (no import: safe to trace)."""
    return _LOADED.get(name)


def check_name(backend) -> None:
    """The name alone (availability is checked by :func:`resolve`)."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run tensors on ``device`` (default: CPU) in this installation."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = ["reference"]
    for name in FUSED:
        module = load(name)
        if module is not None and module.supports_device(dev):
            out.append(name)
    return out


def resolve_name(backend: str, device: torch.device) -> str:
    """The backend that runs ``device`` tensors: ``"auto"`` resolved (Triton on CUDA when it is
    importable, else the native backend on CPU when built, else ``"torch"``) and availability
    checked, with an error that says how to get a missing backend."""
    check_name(backend)
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
    return backend


def resolve(backend: str, device: torch.device):
    """``(name, module)`` for a call on ``device`` tensors: :func:`resolve_name`, then the backend's
    module (None for the reference, which has no fused kernels). What the public API does once per call."""
    name = resolve_name(backend, device)
    return name, (None if name == "reference" else load(name))


def get(name: str, device: torch.device):
    """The module of the fused backend ``name`` that :func:`resolve` already chose (a look-up and a
    device check); ``"auto"`` (what a compiled graph passes: Dynamo does not trace imports) or
    ``"reference"`` (the sharded heads take any name) is resolved here for ``device``."""
    module = load(name) if name in _MODULES else None
    if module is None or not module.supports_device(device):
        name, module = resolve(name, device)
        if module is None:
            raise ValueError(f"backend={name!r} has no fused kernels: the fused passes (and the sharded heads) need a "
                             "fused backend, 'auto', 'torch', 'native' or 'triton'; the reference is the materialised "
                             "oracle")
    return module


__all__ = ["BACKENDS", "BACKEND_NAMES", "available_backends", "resolve_name", "resolve", "get", "load", "loaded",
           "check_name"]
