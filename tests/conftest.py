"""Shared helpers for the test-suite: closeness with informative messages and the loss-family grid."""
from __future__ import annotations

import math
import os

import pytest
import torch

# With no GPU the Triton kernels run on CPU tensors under Triton's interpreter, which triton chooses
# when a function is decorated. torch._dynamo imports triton, so whichever test module imports dynamo
# first would fix triton's standard library in compiled mode and test_triton.py could no longer run.
# Import triton and fusedface's kernels once here, under the interpreter, before any test module;
# the variable is then restored so the other modules see the environment they were given.
_TRITON_ENV = os.environ.get("TRITON_INTERPRET")  # as the suite was started
if not torch.cuda.is_available() and _TRITON_ENV is None:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
        import fusedface.triton_kernels.margin_softmax  # noqa: F401
    except ImportError:  # triton missing: test_triton.py and the shared tests' Triton cases skip with that reason
        pass
    else:
        try:  # the launcher too (the resolver imports it), in case it defines kernels of its own
            import fusedface
            fusedface.available_backends()
        except Exception:  # noqa: BLE001 - a broken launcher fails the Triton cases, not the whole session
            pass
    finally:
        del os.environ["TRITON_INTERPRET"]


# ------------------------------------------------------------------ the backends of the shared tests
#
# Every shared test that runs "on every backend" takes its cases from backend_cases() (``(device,
# backend)`` pairs) or backend_names() (names, CPU tensors). The Triton backend is always among them:
# on CPU tensors it runs under Triton's interpreter (TRITON_INTERPRET=1 is set for the duration of
# each Triton case by the autouse fixture below, so the resolver lists it), compiled on CUDA tensors;
# where it cannot run the case is skipped with the reason (shown by ``-ra``), never left out.


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_backend(device): a shared-test case on the Triton backend "
                            "(interpreted on CPU tensors); skipped with a reason where Triton cannot run")
    # the interpreter evaluates masked-off lanes too (log2(0), 0·inf, ...) and numpy warns about values
    # that the kernel then discards; the tests check what the kernels return
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def triton_unusable(device: str = "cpu") -> str:
    """Why the Triton backend cannot run ``device`` tensors in this process ("" when it can)."""
    try:
        import triton  # noqa: F401
        import triton.language.standard as tl_std
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install triton (tests: `pip install .[test]`)"
    if device != "cpu":
        return ""
    if _TRITON_ENV not in (None, "1"):
        return (f"TRITON_INTERPRET={_TRITON_ENV!r} in the environment: the Triton kernels can only run on CPU "
                "tensors under TRITON_INTERPRET=1")
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    if not isinstance(tl_std.sum, InterpretedFunction):
        why = ("a GPU is present, so conftest.py left Triton in compiled mode" if torch.cuda.is_available() else
               "triton was imported before conftest.py could set TRITON_INTERPRET=1")
        return (f"Triton's standard library was created in compiled mode ({why}), so CPU tensors cannot run "
                "under its interpreter in this process; run `TRITON_INTERPRET=1 pytest ...` for the CPU cases")
    compiled = sorted(f"{mod}.{attr}" for mod, module in list(sys.modules.items())
                      if mod.startswith("fusedface") and module is not None
                      for attr, obj in list(vars(module).items())
                      if isinstance(obj, JITFunction) and not isinstance(obj, InterpretedFunction))
    if compiled:
        return (f"fusedface's kernels {', '.join(compiled[:3])} were created in compiled mode before "
                "TRITON_INTERPRET=1 was set, so they cannot run on CPU tensors in this process; "
                "run `TRITON_INTERPRET=1 pytest ...`")
    return ""


def triton_test_file(module: str):
    """``(device, module or None, pytestmark)`` for a test file of the Triton backend: its tensors'
    device (CUDA where a GPU is, else CPU under the interpreter), the backend module ``module``
    imported when Triton can run here, and the marks that skip the file with the reason otherwise and
    set ``TRITON_INTERPRET=1`` for each test on CPU."""
    import importlib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = triton_unusable(device.type)
    mod = None if why else importlib.import_module(module)
    marks = [pytest.mark.skipif(mod is None, reason=f"Triton backend: {why}"),
             pytest.mark.usefixtures("_triton_interpreter_env")]
    return device, mod, marks


@pytest.fixture
def _triton_interpreter_env(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def is_interpreted(case) -> bool:
    """Whether a case (a ``(device, backend)`` pair or a backend name) runs the Triton interpreter:
    such cases get small shapes and few examples (each interpreted launch walks its grid in Python)."""
    device, backend = case if isinstance(case, tuple) else ("cpu", case)
    return backend == "triton" and device == "cpu"


def _available(device: str) -> list[str]:
    import fusedface
    return [b for b in fusedface.available_backends(device) if b != "triton"]


def _param(value, device: str, backend: str, test_id: str):
    marks = [pytest.mark.triton_backend(device)] if backend == "triton" else []
    return pytest.param(value, id=test_id, marks=marks)


def backend_cases(*, fused: bool = False) -> list:
    """``(device, backend)`` parameters: every backend for CPU tensors (reference, torch, native where
    built, triton interpreted), and for CUDA tensors where a GPU is (triton compiled). ``fused``:
    without the reference."""
    out = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        suffix = "" if device == "cpu" else f"-{device}"
        for b in _available(device) + ["triton"]:
            if not (fused and b == "reference"):
                out.append(_param((device, b), device, b, b + suffix))
    return out


def backend_names(*, fused: bool = False) -> list:
    """Backend-name parameters for CPU tensors: reference, torch, native where built, triton
    (interpreted). ``fused``: without the reference."""
    return [_param(b, "cpu", b, b) for b in _available("cpu") + ["triton"] if not (fused and b == "reference")]


@pytest.fixture(autouse=True)
def _triton_backend_case(request, monkeypatch):
    """For a Triton case: skip with the reason when Triton cannot run here; on CPU set
    TRITON_INTERPRET=1 for the test (the backend resolver lists Triton for CPU tensors only then)."""
    marker = request.node.get_closest_marker("triton_backend")
    if marker is None:
        return
    device = marker.args[0] if marker.args else "cpu"
    why = triton_unusable(device)
    if why:
        pytest.skip(f"Triton backend: {why}")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import fusedface
    if "triton" not in fusedface.available_backends(device):
        pytest.fail(f"triton is installed and usable for {device} tensors, yet fusedface.available_backends"
                    f"({device!r}) does not list it: the launcher failed to import")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, name: str = ""):
    """``max|a − e| <= atol + rtol·max|e|`` (relative to the tensor's scale); the message says where
    and how much."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
    err = (actual - expected).abs()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    bound = atol + rtol * max(scale, 1e-300)
    if err.numel() and float(err.max()) > bound:
        bad = int((err > bound).sum())
        idx = int(err.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: {bad}/{err.numel()} values differ by more than {bound:.3e} "
            f"(rtol={rtol:g} of max|expected|={scale:.3e}, atol={atol:g}); worst at {where}: "
            f"actual={actual.reshape(-1)[idx].item():.17g} expected={expected.reshape(-1)[idx].item():.17g} "
            f"(|diff|={float(err.max()):.3e}, relative {float(err.max()) / max(scale, 1e-300):.3e})")


# Every loss family of SPEC §2 as keyword arguments of margin_softmax_loss. ids name the family.
MARGIN_FAMILIES = [
    pytest.param(dict(m2=0.5), id="arcface"),
    pytest.param(dict(m2=0.5, theta_policy="threshold"), id="arcface-threshold"),
    pytest.param(dict(m2=0.5, grad_mode="straight_through"), id="arcface-straight-through"),
    pytest.param(dict(m3=0.35), id="cosface"),
    pytest.param(dict(m1=1.0, m2=0.3, m3=0.2), id="combined"),
    pytest.param(dict(m1=2.0, theta_policy="easy"), id="sphereface-easy"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="sv", t=1.2, theta_policy="easy"), id="sv-am"),
    pytest.param(dict(scale=32.0, m2=0.5, negative="mv_fixed", t=0.2), id="mv-fixed-arc"),
    pytest.param(dict(scale=32.0, m3=0.35, negative="mv_adaptive", t=0.2, theta_policy="easy"), id="mv-adaptive-am"),
    pytest.param(dict(m2="elastic"), id="elastic-per-row-m2"),
    pytest.param(dict(m3="elastic"), id="elastic-per-row-m3"),
]


def materialise_margins(kw: dict, B: int, dtype=torch.float64, seed: int = 7) -> dict:
    """Replace the ``"elastic"`` placeholder with fixed per-row ElasticFace-like draws."""
    kw = dict(kw)
    g = torch.Generator().manual_seed(seed)
    for key, mean in (("m2", 0.5), ("m3", 0.35)):
        if kw.get(key) == "elastic":
            kw[key] = (torch.randn(B, generator=g, dtype=torch.float64) * 0.05 + mean).to(dtype)
    return kw


def make_problem(B, D, C, *, dtype=torch.float64, seed=0, ignore=(), past_pi=(), near_centre=()):
    """Random embeddings/centres/labels with chosen rows ignored, at θ = π − 0.3 from their centre
    (so θ + 0.5 passes π; exactly opposite rows are left to the extreme-value tests, since acos is
    infinitely ill-conditioned at −1) or almost equal to their centre (cosine ≈ 1 − 5e-9)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    for i in past_pi:
        w = W[y[i]] / W[y[i]].norm()
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u = u - (u @ w) * w
        x[i] = 3.0 * (-math.cos(0.3) * w + math.sin(0.3) * u / u.norm())
    for i in near_centre:
        x[i] = 2.0 * W[y[i]] + 1e-4 * torch.randn(D, generator=g, dtype=torch.float64)
    for i in ignore:
        y[i] = -1
    return x.to(dtype), W.to(dtype), y


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def loss_and_grads(fn, x, W, *args, **kw):
    x, W = leaf(x, W)
    loss = fn(x, W, *args, **kw)
    gx, gW = torch.autograd.grad(loss, (x, W))
    return loss.detach(), gx, gW


RAD_PER_DEG = math.pi / 180.0
