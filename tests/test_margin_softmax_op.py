"""The margin-softmax op, by op rather than by backend: per-row losses and the pass's statistics
(arg-max, support-vector counts) on every fused backend equal the oracle's, with ignored rows,
rows past π and rows at their centre (float64)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, backend_names, is_interpreted, make_problem
from fusedface import functional as F_
from fusedface._options import MarginOptions


@pytest.mark.parametrize("backend", backend_names(fused=True))
def test_reduction_none_and_statistics_equal_reference(backend):
    B, D, C = (17, 24, 130) if is_interpreted(backend) else (37, 123, 1009)
    x, W, y = make_problem(B, D, C, ignore=(0, 11), past_pi=(3, 4), near_centre=(5, 6))
    opts = MarginOptions(scale=32.0, reduction="none", negative="mv_adaptive", t=0.2)
    l0, s0 = F_.margin_softmax_with_stats(x, W, y, opts, 0.5, 0.0, backend="reference")
    l1, s1 = F_.margin_softmax_with_stats(x, W, y, opts, 0.5, 0.0, backend=backend, tile_size=128)
    assert_close(l1, l0, rtol=1e-10, name="per-row loss")
    assert torch.equal(s1["pred"], s0["pred"]), (s1["pred"], s0["pred"])
    assert torch.equal(s1["sv_count"].long(), s0["sv_count"].long())
    assert s0["sv_count"].sum() > 0, "the problem must contain support vectors for this test to mean anything"
    assert (l1[[0, 11]] == 0).all(), "ignored rows give 0"
