"""Peak resident memory of this process, read from Linux's ``/proc`` (the one reader in the project:
``python -m fusedface.demo`` reports its step's memory with it and ``bench/harness.py`` re-exports it)."""
from __future__ import annotations

STATUS = "/proc/self/status"
MEMINFO = "/proc/meminfo"


def status_kib(key: str, path: str = STATUS) -> int:
    """Field ``key`` of ``/proc/self/status`` in KiB (``VmRSS``: resident set size now; ``VmHWM``:
    its peak), or of another file in that format (``path=MEMINFO``: ``MemAvailable`` …). The one
    reader of these files in the project: raises ``RuntimeError`` when the file cannot be read or has
    no such field (a missing field never reads as 0)."""
    try:
        with open(path) as f:
            for line in f:
                name, sep, rest = line.partition(":")
                if sep and name.strip() == key:
                    return int(rest.split()[0])
    except OSError as exc:
        raise RuntimeError(f"cannot read {path} ({exc}): memory is measured through Linux's /proc") from exc
    raise RuntimeError(f"{key!r} is not a field of {path}: this kernel does not report it, "
                       "so the memory measurement that needs it cannot run here")


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (``VmHWM``) to its current RSS by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
