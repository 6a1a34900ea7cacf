"""Smoke test of the report pipeline (part of ``pytest bench``): a few providers on the tiny smoke
grid, each in its fresh worker process, then the JSON, the markdown, the PNG and a README-style
section written into a temporary directory (the real README is not touched)."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import report  # noqa: E402


def test_report_smoke(tmp_path, capsys):
    out = tmp_path / "results"
    report.main(["--subset", "smoke", "--dtype", "fp32", "--mode", "full", "--provider", "reference", "torch",
                 "insightface", "linear_ce", "triton", "--out", str(out), "--no-readme"])
    data = json.loads((out / "margin_softmax_cpu.json").read_text())
    by = {(r["provider"], r["loss"]): r for r in data["results"]}
    for key in (("reference", "arcface"), ("torch", "arcface"), ("insightface", "arcface"), ("linear_ce", "ce")):
        if key[0] == "linear_ce" and not hasattr(__import__("torch").nn.functional, "linear_cross_entropy"):
            assert by[key]["status"] == "unavailable"
            continue
        r = by[key]
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["peak_mib"] is not None and r["gemm_fraction"] > 0, {k: r.get(k) for k in ("provider", "time_ms", "peak_mib", "gemm_fraction")}
    # a provider that cannot run is reported with its reason, never dropped
    tri = by[("triton", "arcface")]
    assert tri["status"] in ("ok", "unavailable", "not_timed") and (tri["status"] == "ok" or tri["reason"]), tri
    md = (out / "margin_softmax_cpu.md").read_text()
    assert "| arcface | `torch`" in md and "GEMM" in md
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in out.iterdir())
    assert (out / "npt_cpu.json").exists()
    # the README section is rewritten between its markers, nothing else
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    report.publish(data, str(out), str(readme), None)
    text = readme.read_text()
    assert text.startswith("head\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\ntail\n")
    assert "old" not in text and "÷ fusedface" in text


def test_worker_reports_failures(tmp_path):
    """An unknown provider inside a worker comes back as an error with its message, not an exception."""
    sh = harness.Shape("margin_softmax", "arcface", 8, 16, 300)
    res = harness.run_in_subprocess("margin_softmax", "no_such_provider", sh, timeout=300)
    assert res["status"] == "error" and "no_such_provider" in res["reason"], res
