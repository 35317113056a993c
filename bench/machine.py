"""The machine line every bench script prints (docs/benchmarks.md records it beside the numbers)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """Host, OS, architecture, CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"machine: {platform.node()} {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"
