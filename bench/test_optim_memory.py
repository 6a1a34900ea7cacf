"""The memory model of docs/memory.md against measured peaks (``bench/optim_memory.py``), in the
benchmark smoke run (``pytest bench --benchmark-disable``): two sizes of in-backward SGD on the
default CPU backend, and the issue-15 point (B = 256, D = 128, C = 1.6M, fp32: under 96 MiB beyond
``W`` and the optimizer state)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optim_memory  # noqa: E402


def _backend():
    import fusedface
    return "native" if "native" in fusedface.available_backends("cpu") else "torch"


@pytest.mark.parametrize("C", [200_000, 800_000])
def test_the_model_matches_the_measured_step_peak_within_ten_percent(C):
    r = optim_memory.run(dict(optimizer="sgd", dense=False, B=256, D=128, C=C, backend=_backend()))
    r.update(optim_memory.predicted(r))
    assert abs(r["model_mib"] - r["total_mib"]) <= 0.10 * r["total_mib"], r
    # and the part the model is about: beyond W and the state (about 5% of the step here)
    assert abs(r["model_extra_mib"] - r["extra_mib"]) <= 0.10 * r["extra_mib"], r


def test_a_dense_step_peak_matches_the_model():
    r = optim_memory.run(dict(optimizer="sgd", dense=True, B=256, D=128, C=200_000, backend=_backend()))
    r.update(optim_memory.predicted(r))
    assert abs(r["model_mib"] - r["total_mib"]) <= 0.10 * r["total_mib"], r
    assert abs(r["model_extra_mib"] - r["extra_mib"]) <= 0.10 * r["extra_mib"], r
    assert r["extra_mib"] > 0.9 * r["W_mib"]  # W.grad (and the weight-decay temporary) is there


def test_in_backward_sgd_at_1_6m_classes_stays_under_96_mib_beyond_w_and_state():
    r = optim_memory.run(dict(optimizer="sgd", dense=False, B=256, D=128, C=1_600_000, backend=_backend()))
    assert r["extra_mib"] < 96, r
