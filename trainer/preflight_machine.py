"""What this machine offers the pre-flight checks (preflight.py): GPUs, their memory, RAM, free disk space.

Measured once per check, in one object, so tests can hand the checks a full disk or a GPU machine instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Machine", "free_bytes", "human_bytes"]


def _gpu_memory() -> tuple[int, int | None]:
    import torch

    if not torch.cuda.is_available():
        return 0, None
    count = torch.cuda.device_count()
    return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) if count else None


def _available_ram() -> int:
    """MemAvailable, or the container's memory limit left when that is lower (cgroup v2)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def free_bytes(path: str) -> int:
    """Free space of the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return shutil.disk_usage(current).free


@dataclass(frozen=True)
class Machine:
    """What this machine offers; ``Machine.this()`` measures it, tests build one."""

    gpus: int
    gpu_memory: int | None  # bytes of the smallest visible GPU
    ram_available: int
    free_bytes: Callable[[str], int] = free_bytes

    @classmethod
    def this(cls, *, gpus: bool = True) -> Machine:
        """``gpus=False``: no phase uses GPUs, so torch (seconds to import) is not asked how many there are."""
        count, memory = _gpu_memory() if gpus else (0, None)
        return cls(gpus=count, gpu_memory=memory, ram_available=_available_ram())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
