"""The fused backends: a registry (which backends exist in this installation, and how a name
resolves: :mod:`fusedface.backends.registry`) and one module per backend (``torch``, ``native``,
``triton``).

Every fused backend is one module of this package implementing the same tile-kernel protocol
(``docs/backends.md``); the fused algorithm around it (prologue, reductions, autograd, the
registered ops) is :mod:`fusedface._engine`. A backend module imports only shared low-level
modules (``_options``, ``_env``, ``_numerics``) and its own kernels, never the engine, the
oracle or this registry, which finds it by name. ``"reference"`` is not a module here: it is the
materialised oracle, :mod:`fusedface.reference`, which the public API calls directly.

The protocol (``name`` is the module's backend name; ``block`` is the kept ``[C, B]`` cosine block,
None unless the backend has ``KEEPS_BLOCK`` and the engine asked for it):

``supports_device(device) -> bool``
``margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False) -> (lse, pred, sv, block)``
``margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None) -> (Gx, dW)``
``npt_forward(x, W, xinv, winv, y, k, tile) -> (values, index)``

and, optionally, a whole training step that replaces the engine's route where it applies:
``step_applies(x, W) -> bool`` and ``margin_step(x, W, y, opts, m2, m3, want_stats) -> (loss, pred, sv)``;
with ``STEP_IN_BACKWARD = True`` the step also takes ``optim_token=`` (an in-backward optimizer,
:mod:`fusedface.optim`, whose update its backward applies; without it the engine's route runs such calls).
"""
from .registry import (BACKEND_NAMES, BACKENDS, FUSED, available_backends, check_name, get, load, loaded,  # noqa: F401
                       resolve, resolve_name)

# (no ``import torch`` here: the backend module ``fusedface.backends.torch`` becomes this package's
# attribute ``torch`` once it is imported)
