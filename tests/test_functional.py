"""The public API of SPEC §7: the names exist. Every bad input and the error it raises is listed in
tests/test_errors.py (one place per check)."""
from __future__ import annotations

import fusedface
from fusedface import functional as F_
from fusedface import reference as R


def test_spec_names_exist():
    for name in ("margin_softmax_loss", "npt_loss"):
        assert callable(getattr(F_, name)) and callable(getattr(R, name))
    assert "reference" in fusedface.available_backends() and "torch" in fusedface.available_backends()
