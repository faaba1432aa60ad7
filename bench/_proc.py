"""Memory readings of this process from /proc (Linux), for the fresh-process memory benchmarks."""


def status(field: str) -> int:
    """VmRSS, VmHWM, ... in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
