"""Environment switches, parsed in one place: every flag accepts the same spellings, an unset or
empty variable means the default, and anything else is an error that names the variable."""
from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(var: str, default: bool) -> bool:
    """``1/true/yes/on`` → True, ``0/false/no/off`` → False (any case); unset or empty → ``default``."""
    value = os.environ.get(var, "").strip().lower()
    if value == "":
        return bool(default)
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{var}={os.environ[var]!r} is not a switch; set it to 1 or 0 (or unset it for the default, "
                     f"{int(bool(default))})")


def env_choice(var: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """One of ``choices`` (any case); unset or empty → ``default``."""
    value = os.environ.get(var, "").strip().lower()
    if value == "":
        return default
    if value not in choices:
        raise ValueError(f"{var}={os.environ[var]!r}: use one of {', '.join(choices)} (or unset it for the default)")
    return value


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag("TRITON_INTERPRET", False)
