"""Environment switches: one parser (fusedface._env), the same spellings for every flag, unset or
empty means the default, anything else is an error naming the variable."""
import pytest

from fusedface import _env, backends
from fusedface._env import env_choice, env_flag

VAR = "FUSEDFACE_TEST_SWITCH"


@pytest.mark.parametrize("value, want", [("1", True), ("true", True), ("True", True), (" ON ", True), ("yes", True),
                                         ("0", False), ("false", False), ("FALSE", False), ("off", False),
                                         ("no", False)])
def test_flag_spellings(monkeypatch, value, want):
    monkeypatch.setenv(VAR, value)
    assert env_flag(VAR, not want) is want


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_flag_is_the_default(monkeypatch, default):
    monkeypatch.delenv(VAR, raising=False)
    assert env_flag(VAR, default) is default
    monkeypatch.setenv(VAR, "")
    assert env_flag(VAR, default) is default
    monkeypatch.setenv(VAR, "   ")
    assert env_flag(VAR, default) is default


def test_unknown_flag_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(VAR, "2")
    with pytest.raises(ValueError, match=f"{VAR}='2'.*1 or 0"):
        env_flag(VAR, False)


def test_choice(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    assert env_choice(VAR, ("a", "b"), "a") == "a"
    monkeypatch.setenv(VAR, "B")
    assert env_choice(VAR, ("a", "b"), "a") == "b"
    monkeypatch.setenv(VAR, "c")
    with pytest.raises(ValueError, match=f"{VAR}='c': use one of a, b"):
        env_choice(VAR, ("a", "b"), "a")


def test_every_fusedface_switch_uses_the_shared_parser(monkeypatch):
    """FAST_GRAD=True used to read as off, and an empty DETERMINISTIC turned determinism off."""
    if "native" in backends.available_backends():
        from fusedface.backends import native
        monkeypatch.setenv("FUSEDFACE_NATIVE_FAST_GRAD", "True")
        assert native.fast_grad() == 1
        monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "BF16")
        assert native.bf16_gemm() == 1
        monkeypatch.setenv("FUSEDFACE_NATIVE_PRECISION", "")
        assert native.bf16_gemm() == 0
    if backends.load("triton") is not None:
        from fusedface.backends import triton_tiles
        monkeypatch.setenv("FUSEDFACE_TRITON_DETERMINISTIC", "")
        assert triton_tiles.deterministic()
        monkeypatch.setenv("FUSEDFACE_TRITON_AUTOTUNE", "maybe")
        with pytest.raises(ValueError, match="FUSEDFACE_TRITON_AUTOTUNE"):
            triton_tiles.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert _env.triton_interpreted()
