"""The one harness of bench/ (part of ``pytest bench``): its RSS reader raises instead of reading a
missing field as 0, its peak measurement and timing loop do what they say, and no other file under
bench/ carries its own copy of them."""
from __future__ import annotations

import ast
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
LINUX_PROC = os.path.exists(harness.STATUS)


# ----------------------------------------------------------------------------- the RSS reader

def test_status_kib_raises_on_a_missing_field(tmp_path):
    fake = tmp_path / "status"
    fake.write_text("Name:\tpython\nVmRSS:\t    1234 kB\n")
    assert harness.status_kib("VmRSS", str(fake)) == 1234
    with pytest.raises(RuntimeError, match="VmHWM"):
        harness.status_kib("VmHWM", str(fake))
    with pytest.raises(RuntimeError, match="cannot read"):
        harness.status_kib("VmHWM", str(tmp_path / "no_such_file"))


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux's /proc/self/status")
def test_status_kib_reads_this_process():
    assert harness.status_kib("VmHWM") > 0
    assert harness.status_kib("VmRSS") > 0
    with pytest.raises(RuntimeError, match="NoSuchField"):
        harness.status_kib("NoSuchField")


# ----------------------------------------------------------------------------- peak memory and timing

@pytest.mark.skipif(not harness.reset_peak_rss(), reason="needs a writable /proc/self/clear_refs")
def test_peak_memory_sees_an_allocation():
    n = 64 * 2**20 // 4
    with harness.PeakMemory("cpu") as pm:
        t = torch.ones(n)  # touched: resident
        del t
    assert pm.reset and pm.method == "peak RSS (VmHWM)"
    assert pm.delta >= 0.9 * 64 * 2**20, pm.delta / 2**20


def test_measure_peak_counts_gradients_apart():
    if not harness.reset_peak_rss():
        pytest.skip("needs a writable /proc/self/clear_refs")
    x = torch.randn(64, 32, requires_grad=True)
    W = torch.randn(4096, 32, requires_grad=True)
    m = harness.measure_peak(lambda: (x @ W.t()).square().sum().backward(), "cpu", grads=(x, W))
    assert m["grads_mib"] == pytest.approx((x.numel() + W.numel()) * 4 / 2**20)
    assert m["extra_mib"] == pytest.approx(m["peak_mib"] - m["grads_mib"])
    assert x.grad is None and W.grad is None  # reset after the call


def test_time_reps():
    calls = []
    out = harness.time_reps(lambda s: calls.append(s), prepare=lambda: "state", number=3, warmup=2,
                            min_reps=4, max_reps=4)
    assert len(out) == 4 and all(t >= 0 for t in out)
    assert calls == ["state"] * (2 + 4 * 3)
    # until target_s, bounded by max_reps
    assert len(harness.time_reps(lambda: None, max_reps=7, target_s=60.0)) == 7
    x = torch.randn(4, requires_grad=True)
    x.grad = torch.ones(4)
    assert harness.median_ms(lambda: None, "cpu", grads=(x,), reps=3) >= 0 and x.grad is None


# ----------------------------------------------------------------------------- the peers

def test_the_two_insightface_style_heads_agree():
    """``insightface_loss`` (InsightFace's in-place form) and ``materialised_arcface`` (the margin
    on the target column only) are the same ArcFace head with a straight-through margin."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (8,), generator=g)
    a = harness.insightface_loss(x, W, y, 64.0, 0.5)
    ga = torch.autograd.grad(a, (x, W))
    for fp32_logits in (False, True):
        b = harness.materialised_arcface(x, W, y, 64.0, 0.5, fp32_logits=fp32_logits)
        gb = torch.autograd.grad(b, (x, W))
        assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-5)  # both: CE in fp32
        for u, v in zip(ga, gb):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-6)


def test_gemm_floor():
    x, W = torch.randn(4, 8), torch.randn(16, 8)
    assert harness.gemm_floor(x, W, products=1)().shape == (4, 16)
    made = []
    run = harness.gemm_floor(x, W, lambda: made.append(1) or torch.randn(4, 16), products=4)
    assert not made
    run()
    assert made
    with pytest.raises(ValueError):
        harness.gemm_floor(x, W, products=2)


def test_env_vars():
    key = "FUSEDFACE_BENCH_TEST_SWITCH"
    os.environ.pop(key, None)
    with harness.env_vars(**{key: 1}):
        assert os.environ[key] == "1"
    assert key not in os.environ


# ----------------------------------------------------------------------------- no copies elsewhere

# string constants (outside docstrings) that only a /proc reader or a peak reset would contain
PROC_STRINGS = ("/proc/self/status", "/proc/self/clear_refs", "clear_refs", "/proc/meminfo", "VmHWM", "VmRSS")
# names a copy of the peak-memory measurement or of the timing loop would use
HARNESS_NAMES = {"max_memory_allocated", "reset_peak_memory_stats", "memory_allocated", "do_bench", "elapsed_time"}


def _docstrings(tree) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _copies(path: pathlib.Path) -> list:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            hits = [s for s in PROC_STRINGS if s in node.value]
            if hits:
                found.append(f"{where}: string {node.value[:60]!r} ({', '.join(hits)})")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            low = node.name.lower()
            if any(k in low for k in ("status_kib", "rss", "reset_peak", "clear_refs", "hwm")):
                found.append(f"{where}: defines {node.name}()")
        elif isinstance(node, ast.Attribute) and node.attr in HARNESS_NAMES:
            found.append(f"{where}: uses .{node.attr}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in HARNESS_NAMES:
            found.append(f"{where}: imports {node.name}")
    return found


def test_no_other_file_in_bench_has_its_own_reader_peak_or_timer():
    """/proc/self/status (and /proc/meminfo) are read, the peak RSS reset, the CUDA allocator's peak
    read and do_bench / CUDA events used only in bench/harness.py."""
    files = sorted(p for p in BENCH.rglob("*.py") if p.name not in ("harness.py", "test_harness.py"))
    assert any(p.name == "bench_native.py" for p in files)
    found = [hit for p in files for hit in _copies(p)]
    assert not found, "copies of harness helpers outside bench/harness.py:\n" + "\n".join(found)


def test_the_scan_finds_a_copy(tmp_path):
    """The scan above would see the copies this change removed."""
    src = tmp_path / "copy.py"
    src.write_text('def _status_kib(key):\n'
                   '    with open("/proc/self/status") as f:\n'
                   '        return 0\n'
                   'def peak():\n'
                   '    import torch\n'
                   '    return torch.cuda.max_memory_allocated()\n')
    found = _copies(src)
    assert len(found) == 3, found
