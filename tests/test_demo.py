"""The main job (README command 1) on a tiny problem: it runs end to end, writes its outputs, and
``--identities auto`` sizes the problem to what the time limit can teach."""
import argparse
import json
import os

import pytest
import torch

from fusedface import demo


@pytest.mark.parametrize("head_optimizer", ["in-backward", "torch"])
def test_demo_end_to_end_small(tmp_path, capsys, head_optimizer):
    out = tmp_path / "out"
    demo.main(["--identities", "300", "--heldout", "60", "--per-heldout", "3", "--steps", "25", "--batch", "64",
               "--time-limit", "60", "--threads", "1", "--no-compare", "--out", str(out),
               "--head-optimizer", head_optimizer])
    text = capsys.readouterr().out
    assert ("fusedface.optim.SGD inside the backward" in text) == (head_optimizer == "in-backward")
    assert "TAR@FAR=1e-3, held-out identities:" in text and "trained 25 steps of 64" in text
    for name in ("demo.md", "demo.json"):
        assert os.path.getsize(out / name) > 0, name
    res = json.loads((out / "demo.json").read_text())
    assert res["steps"] == 25


@pytest.mark.parametrize("bad", ["many", "1"])
def test_demo_rejects_bad_identities(bad):
    with pytest.raises(SystemExit):
        demo.main(["--identities", bad, "--no-compare", "--steps", "1"])


def test_auto_identities_follows_the_time_limit():
    torch.manual_seed(0)
    world = demo.SyntheticFaces(seed=0)
    base = dict(loss="arcface", dim=32, batch=64, backend="auto", scale=32.0, steps=10**6)
    short = demo.auto_identities(argparse.Namespace(**base, time_limit=1.0), world)
    long = demo.auto_identities(argparse.Namespace(**base, time_limit=10**5), world)
    assert short == 2_000, short  # one second teaches nothing: the floor
    assert long == 20_000, long  # a day's budget: the ceiling
    capped = demo.auto_identities(argparse.Namespace(**{**base, "steps": 1500}, time_limit=10**5), world)
    assert capped == 1500 * 64 // 30 // 1000 * 1000, capped  # --steps ends training first
