"""pytest configuration of the benchmarks (``pytest bench ...``, a separate command from ``pytest``).

Collects the op scripts ``bench_margin_softmax.py`` and ``bench_npt.py`` (their names do not match
``test_*.py``) and parametrizes each ``test_<op>`` over its grid:

* ``--benchmark-disable`` (the CI smoke test): the tiny ``smoke`` grid, every provider, loss, dtype
  and mode once, unless ``--bench-grid`` names another grid;
* otherwise ``--bench-grid default`` (B = 128, D = 128, C ∈ {10k, 100k, 1M}, fp32, full step) or
  ``full`` (issue 7's whole grid), each axis overridable: ``--bench-B 512 --bench-C 1M`` ….

Points a provider cannot run are skipped WITH the reason (``-ra`` lists them); nothing is dropped.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

BENCH_SCRIPTS = ("bench_margin_softmax.py", "bench_npt.py")


def pytest_addoption(parser):
    g = parser.getgroup("fusedface benchmarks")
    g.addoption("--bench-grid", choices=list(harness.GRIDS), default=None,
                help="grid of points (default: 'smoke' with --benchmark-disable, else 'default')")
    g.addoption("--bench-device", default="cpu", help="cpu or cuda")
    g.addoption("--bench-memory", action="store_true", help="also measure peak memory in a fresh process per point")
    g.addoption("--bench-rounds", type=int, default=3, help="timed rounds per point")
    g.addoption("--bench-max-gib", type=float, default=12.0,
                help="skip (with the reason) points whose estimated peak exceeds this many GiB")
    for axis, kw in (("B", dict(type=int)), ("D", dict(type=int)), ("C", dict(type=harness.parse_count)),
                     ("dtype", dict(choices=list(harness.DTYPES))), ("mode", dict(choices=list(harness.MODES))),
                     ("loss", {}), ("provider", {})):
        g.addoption(f"--bench-{axis}", nargs="+", default=None, **kw)


def pytest_collect_file(file_path, parent):
    # a script named on the command line is collected by pytest itself (initial paths always are)
    if file_path.name in BENCH_SCRIPTS and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "bench_point" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    grid = cfg.getoption("bench_grid") or ("smoke" if _disabled(cfg) else "default")
    mod = metafunc.module
    # --bench-loss / --bench-provider select within each op; an op they do not name has no points
    losses, provs = cfg.getoption("bench_loss"), cfg.getoption("bench_provider")
    sel_l = [x for x in losses if x in mod.LOSSES] if losses else None
    sel_p = [x for x in provs if x in mod.PROVIDERS] if provs else None
    if (losses and not sel_l) or (provs and not sel_p):
        points = []
    else:
        points = harness.grid_points(
            mod, grid, B=cfg.getoption("bench_B"), D=cfg.getoption("bench_D"), C=cfg.getoption("bench_C"),
            dtype=cfg.getoption("bench_dtype"), mode=cfg.getoption("bench_mode"), loss=sel_l, provider=sel_p,
            device=cfg.getoption("bench_device"))
    metafunc.parametrize("bench_point", points, ids=[f"{p}-{s.id()}" for p, s in points])


@pytest.fixture
def bench_options(request):
    cfg = request.config
    return {"disabled": _disabled(cfg), "memory": cfg.getoption("bench_memory"),
            "rounds": cfg.getoption("bench_rounds"), "max_gib": cfg.getoption("bench_max_gib")}
