"""The package's layering, read from the source: no import cycle (function-level imports included),
an oracle that imports only torch, math and the options, backends that never import the engine,
the oracle, the validation layer or the registry, and every layer of an op findable by its name."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fusedface")


def _modules() -> dict[str, str]:
    """``{dotted name: path}`` of every Python module of the package (``fusedface.triton_kernels``
    maps to the top-level ``triton_kernels/``, as setup.py installs it)."""
    out = {}
    for base, prefix in ((PKG, "fusedface"), (os.path.join(ROOT, "triton_kernels"), "fusedface.triton_kernels")):
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            if "__pycache__" in parts:
                continue
            for f in files:
                if f.endswith(".py"):
                    name = ".".join([prefix] + parts + ([] if f == "__init__.py" else [f[:-3]]))
                    out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].endswith("__init__.py")


def _is_extension(package: str, name: str) -> bool:
    """Whether ``package.name`` is a compiled extension module (``fusedface._C``)."""
    if package not in MODULES or not _is_package(package):
        return False
    folder = os.path.dirname(MODULES[package])
    return (package, name) == ("fusedface", "_C") or any(
        f.startswith(name + ".") and f.endswith((".so", ".pyd")) for f in os.listdir(folder))


def imports_of(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (top level, inside
    functions, under ``if``/``try``), resolved: ``from X import y`` is ``X.y`` where that is a module
    of the package, else ``X``."""
    tree = ast.parse(open(MODULES[name]).read(), MODULES[name])
    here = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in MODULES:
                    found.add(f"{mod}.{a.name}")
                elif not _is_extension(mod, a.name):  # (``from .. import _C``: the compiled module, a leaf)
                    found.add(mod)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycle():
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_parser_sees_function_level_and_relative_imports():
    assert "fusedface._engine" in GRAPH["fusedface.functional"]
    assert "fusedface.backends" in GRAPH["fusedface.functional"], "a function-level import (kept block)"
    assert "fusedface.triton_kernels.margin_step" in GRAPH["fusedface.backends.triton"]


def test_no_import_cycle_in_the_package():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_oracle_imports_only_torch_math_and_the_options():
    tree = ast.parse(open(MODULES["fusedface.reference"]).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add("." * node.level + (node.module or ""))
    assert roots <= {"__future__", "math", "torch", "torch.nn.functional", "._options"}, roots


BACKEND_MODULES = [n for n in MODULES if n.startswith("fusedface.backends.") and n != "fusedface.backends.registry"]
FORBIDDEN = {"fusedface._engine", "fusedface.reference", "fusedface._validate", "fusedface.backends",
             "fusedface.backends.registry", "fusedface.functional", "fusedface.modules", "fusedface.margins",
             "fusedface.distributed", "fusedface.optim"}


@pytest.mark.parametrize("name", BACKEND_MODULES)
def test_backends_import_only_low_level_modules(name):
    bad = GRAPH[name] & FORBIDDEN
    assert not bad, f"{name} imports {sorted(bad)}: a backend may import the options, env and numerics modules and its own kernels"


def test_registry_imports_no_backend_and_no_upper_layer():
    deps = GRAPH["fusedface.backends.registry"]
    assert deps <= {"fusedface._env"}, deps


def test_every_backend_module_implements_the_protocol():
    import inspect

    from fusedface import backends
    protocol = {"margin_forward": ["x", "W", "xinv", "winv", "y", "f", "opts", "tile", "keep_block", "rt"],
                "margin_backward": ["x", "W", "xinv", "winv", "y", "f", "lse", "gl", "dcy", "opts", "tile", "need_dx",
                                    "need_dW", "block", "rt"],
                "npt_forward": ["x", "W", "xinv", "winv", "y", "k", "tile"]}
    loaded = [n for n in backends.FUSED if backends.load(n) is not None]
    assert "torch" in loaded
    for n in loaded:
        module = backends.load(n)
        assert module.name == n and callable(module.supports_device) and isinstance(module.KEEPS_BLOCK, bool)
        for fn, params in protocol.items():
            assert list(inspect.signature(getattr(module, fn)).parameters) == params, (n, fn)


# the layers of each op (docs/engine.md): one grep of the op's stem finds a definition in each
LAYERS = ["fusedface.functional", "fusedface._engine", "fusedface.reference", "fusedface.backends.torch",
          "fusedface.backends.native", "fusedface.backends.triton_tiles"]


@pytest.mark.parametrize("stem", ["margin", "npt"])
def test_every_layer_of_an_op_carries_its_name(stem):
    for layer in LAYERS:
        tree = ast.parse(open(MODULES[layer]).read())
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert any(n.startswith(stem) for n in names), f"{layer} has no top-level definition named {stem}*"
