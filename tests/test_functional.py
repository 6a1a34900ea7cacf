"""The public API of SPEC §7: names, parameters, their kinds and defaults, read with ``inspect``.
Every bad input and the error it raises is listed in tests/test_errors.py (one place per check)."""
from __future__ import annotations

import inspect

import pytest

import fusedface
from fusedface import functional as F_
from fusedface import reference as R

KW = inspect.Parameter.KEYWORD_ONLY
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD

# SPEC §7, as written there
MARGIN = [("x", POS, None), ("W", POS, None), ("y", POS, None), ("scale", KW, 64.0), ("m1", KW, 1.0), ("m2", KW, 0.0),
          ("m3", KW, 0.0), ("theta_policy", KW, "none"), ("negative", KW, "none"), ("t", KW, 0.0),
          ("grad_mode", KW, "exact"), ("reduction", KW, "mean"), ("ignore_index", KW, -1),
          # issue 16 (beyond the seeds): InsightFace's inter-class filtering and sub-center ArcFace
          ("interclass_threshold", KW, None), ("subcenters", KW, 1)]
NPT = [("x", POS, None), ("W", POS, None), ("y", POS, None), ("delta", KW, 0.5), ("k", KW, 1), ("r", KW, 1.0),
       ("reduction", KW, "mean"), ("ignore_index", KW, -1)]
BACKEND = [("backend", KW, "auto")]


def _check(fn, spec):
    params = inspect.signature(fn).parameters
    for name, kind, default in spec:
        assert name in params, f"{fn.__module__}.{fn.__name__} has no parameter {name!r}"
        p = params[name]
        assert p.kind == kind, f"{fn.__name__}({name}): {p.kind} != {kind}"
        if default is None and kind == POS:  # (a positional spec entry without default: required)
            assert p.default is inspect.Parameter.empty, f"{fn.__name__}({name}) must be required"
        else:
            assert p.default == default and type(p.default) is type(default), \
                f"{fn.__name__}({name}) default {p.default!r} != SPEC's {default!r}"
    # the SPEC's positional order; anything beyond the SPEC is keyword-only
    positional = [n for n, p in params.items() if p.kind == POS]
    assert positional == [n for n, k, _ in spec if k == POS], positional
    extra = [n for n in params if n not in {s[0] for s in spec}]
    assert all(params[n].kind == KW for n in extra), extra
    return extra


@pytest.mark.parametrize("name,spec", [("margin_softmax_loss", MARGIN), ("npt_loss", NPT)])
def test_functional_signatures_are_the_spec(name, spec):
    extra = _check(getattr(F_, name), spec + BACKEND)
    assert set(extra) <= {"tile_size"}, extra


@pytest.mark.parametrize("name,spec", [("margin_softmax_loss", MARGIN), ("npt_loss", NPT)])
def test_reference_signatures_are_the_spec_minus_backend(name, spec):
    extra = _check(getattr(R, name), spec)
    assert extra == [], f"reference.{name} takes exactly the SPEC's parameters minus backend, extra: {extra}"


def test_backend_names_and_availability():
    assert fusedface.backends.BACKEND_NAMES == ("auto", "reference", "torch", "native", "triton")
    assert {"reference", "torch"} <= set(fusedface.available_backends())
    assert list(inspect.signature(fusedface.available_backends).parameters) == ["device"]


def test_heads_of_spec_7_exist_and_are_modules():
    import torch
    for name in ("ArcFace", "CosFace", "CombinedMargin", "ElasticArcFace", "ElasticCosFace", "KappaFace",
                 "SVSoftmax", "MVSoftmax", "NPT", "OTFace"):
        cls = getattr(fusedface, name)
        assert issubclass(cls, torch.nn.Module), name
        params = list(inspect.signature(cls).parameters)
        assert params[:2] == ["in_features", "out_features"], (name, params)
        assert "backend" in params or name in ("OTFace",) or "kw" in params, (name, params)
        head = cls(8, 5)
        assert isinstance(head.weight, torch.nn.Parameter) and head.weight.shape == (5, 8), name
