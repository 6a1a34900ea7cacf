"""bench/device_check.py, the prepared GPU check, in its --smoke mode: CPU tensors, tiny shapes,
the Triton kernels under the interpreter. Checks that every stage is recorded (with results or the
reason it was skipped) and that the PASS / FAIL lines are printed, so that a session lent a GPU
does not spend it on a broken script."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"
STAGES = ("correctness", "timings", "launches", "optim", "extensions", "graph_step", "tests")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("triton", reason="the smoke run interprets the Triton kernels")
    out = tmp_path_factory.mktemp("device_check") / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("FUSEDFACE_TRITON")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_every_stage_has_results_or_a_skip_reason(smoke):
    data, _ = smoke
    assert data["finished"] is True
    assert list(data["stages"]) == list(STAGES)
    for name, st in data["stages"].items():
        assert st["status"] in ("done", "skipped"), f"stage {name}: {st.get('status')}: {st.get('error')}"
        if st["status"] == "done":
            assert st["results"], f"stage {name} is done but recorded nothing"
        else:
            assert isinstance(st.get("reason"), str) and st["reason"], f"stage {name} skipped without a reason"
    # the CUDA-only stages say why they did not run on CPU
    assert data["stages"]["graph_step"]["status"] == "skipped"
    assert data["stages"]["launches"]["status"] == "skipped"


def test_stage_contents(smoke):
    data, _ = smoke
    # a dtype whose fusedface call raises is recorded with the error and a FAIL check (that is the
    # script working: fusedface itself is tested elsewhere); otherwise every error is there
    corr = data["stages"]["correctness"]["results"]
    checks = {c["name"]: c for c in data["checks"]}
    for dt in ("bf16", "fp16", "fp32", "mixed"):
        if "error" in corr[dt]:
            assert checks[f"{dt} runs"]["verdict"] == "FAIL"
            continue
        for q in ("loss", "dx", "dW"):
            assert corr[dt][q]["fusedface_err"] is not None and corr[dt][q]["plain_err"] is not None, (dt, q)
    if "error" not in corr["mixed"]:
        assert "loss_rel_diff" in corr["mixed"]["vs_W_rounded_to_bf16"]
        assert checks["mixed dW dtype"]["value"] == "torch.float32"
    timings = data["stages"]["timings"]["results"]["C=300"]
    # the arithmetic against the floor (mixed: the bf16 floor) and against fusedface's loss
    assert timings["bf16"]["materialised"]["x_floor"] is not None
    for dt in ("bf16", "fp32", "mixed"):
        r = timings[dt]["fusedface"]
        assert r.get("error") or r["x_floor"] is not None, (dt, r)
    # every timed point has a time, a recorded error, or the reason it was skipped
    for dt, provs in timings.items():
        for prov, r in provs.items():
            assert "ms" in r or r.get("error") or r.get("skipped"), (dt, prov, r)
    # the in-backward optimizer's update is checked on CPU too (its timings need a GPU)
    for dt in ("mixed", "fp32"):
        assert checks[f"{dt} in-backward SGD == dense torch.optim.SGD"]["verdict"] == "PASS"
    assert "GPU" in data["stages"]["optim"]["reason"]
    tests = data["stages"]["tests"]["results"]
    assert "collected" in tests["summary"], tests
    assert data["checks"] and data["targets"]
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "FAIL", "SKIP"}


def test_pass_fail_lines_are_printed(smoke):
    data, stdout = smoke
    lines = stdout.splitlines()
    verdicts = [ln for ln in lines if ln.startswith(("PASS ", "FAIL "))]
    assert verdicts, stdout[-3000:]
    for check in data["checks"]:
        assert check["line"] in lines, check["line"]
    for target in data["targets"]:
        assert any(target["name"] in ln for ln in lines), target["name"]
